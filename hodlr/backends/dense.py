"""Dense backend: materialise the ``T x T`` mask and multiply.

The reference every other backend is checked against.  Runs natively on numpy and on
torch (any device, autograd included).  ``O(T^2)`` memory: refuses, before allocating,
masks over ``hodlr.options.dense_max_bytes``.
"""

from __future__ import annotations

from fenwick.arrays import cast, namespace
from hodlr.mask import LogLinearMask

DESCRIPTION = "materialised T x T mask (the reference); numpy or torch, autograd"


def unavailable_reason(library, device):
    return None


def _mask(level_scales, log_decay):
    return LogLinearMask(level_scales, log_decay, validate=False).to_dense()


def matmul(level_scales, log_decay, x):
    return namespace(x).matmul(cast(_mask(level_scales, log_decay), x.dtype), x)


def attention(q, k, v, level_scales, log_decay, scale):
    xp = namespace(q)
    dense = cast(_mask(level_scales, log_decay), q.dtype)
    scores = xp.matmul(q, xp.swapaxes(k, -1, -2)) * scale
    return xp.matmul(dense * scores, v)
