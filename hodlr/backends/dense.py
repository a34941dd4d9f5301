"""Dense backend: materialise the ``T x T`` mask and multiply.

The reference every other backend is checked against.  Runs natively on numpy and on
torch (any device, autograd included).  ``O(T^2)`` memory: refuses, before allocating,
masks over ``hodlr.options.dense_max_bytes``.  float16 / bfloat16 operands are computed in
the mask's dtype (float32) and cast back, as in the other backends.
"""

from __future__ import annotations

from hodlr.fenwick.arrays import cast, namespace
from hodlr.mask import LogLinearMask

DESCRIPTION = "materialised T x T mask (the reference); numpy or torch, autograd"


def unavailable_reason(library, device):
    return None


def _mask(level_scales, log_decay):
    return LogLinearMask(level_scales, log_decay, validate=False).to_dense()


def matmul(level_scales, log_decay, x):
    return cast(namespace(x).matmul(_mask(level_scales, log_decay), cast(x, level_scales.dtype)), x.dtype)


def attention(q, k, v, level_scales, log_decay, scale):
    xp = namespace(q)
    out_dtype = v.dtype
    q, k, v = (cast(a, level_scales.dtype) for a in (q, k, v))
    scores = xp.matmul(q, xp.swapaxes(k, -1, -2)) * scale
    return cast(xp.matmul(_mask(level_scales, log_decay) * scores, v), out_dtype)
