"""Dense backend: materialise the ``T x T`` mask and multiply.

The reference every other backend is checked against.  Runs natively on numpy and on
torch (any device, autograd included).  ``O(T^2)`` memory: refuses, before allocating,
masks over ``hodlr.options.dense_max_bytes``.  float16 / bfloat16 operands are computed in
the mask's dtype (float32) and cast back, as in the other backends.
"""

from __future__ import annotations

from hodlr._formulas import dense_mask
from hodlr.fenwick.arrays import cast, namespace

DESCRIPTION = "materialised T x T mask (the reference); numpy or torch, autograd"


def unavailable_reason(library, device):
    return None


def _mask(level_scales, log_decay, op: str, arrays: int):
    """The dense mask, checked against the budget for ``arrays`` dense arrays at once."""
    return dense_mask(level_scales, log_decay, f"backend 'dense' {op}", arrays)


def matmul(level_scales, log_decay, x):
    return cast(namespace(x).matmul(_mask(level_scales, log_decay, "matmul", 1), cast(x, level_scales.dtype)), x.dtype)


def attention(q, k, v, level_scales, log_decay, scale):
    xp = namespace(q)
    out_dtype = v.dtype
    q, k, v = (cast(a, level_scales.dtype) for a in (q, k, v))
    mask = _mask(level_scales, log_decay, "attention", 3)  # the mask, the scores, their product
    scores = xp.matmul(q, xp.swapaxes(k, -1, -2)) * scale
    return cast(xp.matmul(mask * scores, v), out_dtype)
