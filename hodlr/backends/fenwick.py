"""Fenwick backend: the recurrent form, one state per Fenwick level (``fenwick.scan``).

A loop over positions holding at most ``log2(T) + 1`` states: ``O(T log T Dk Dv)`` work for
attention, ``O(T log T D)`` for matmul, ``O(log T)`` state memory.  Runs on numpy and on
torch (any device); autograd works (updates are out of place while it records).
Half-precision torch operands are computed in the mask's float32 and cast back.
"""

from __future__ import annotations

from hodlr._formulas import tie_decay
from hodlr.fenwick import scan
from hodlr.fenwick.arrays import cast

DESCRIPTION = "Fenwick scan: O(log T) recurrent states, loop over time; numpy or torch, autograd"


def unavailable_reason(library, device):
    return None


def matmul(level_scales, log_decay, x):
    work = level_scales.dtype
    return cast(tie_decay(scan.matmul(level_scales, log_decay, cast(x, work)), log_decay), x.dtype)


def attention(q, k, v, level_scales, log_decay, scale):
    work = level_scales.dtype
    out = scan.attention(cast(q, work), cast(k, work), cast(v, work), level_scales, log_decay, scale)
    return cast(tie_decay(out, log_decay), v.dtype)
