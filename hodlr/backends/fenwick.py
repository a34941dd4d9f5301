"""Fenwick backend: the recurrent form, one state per Fenwick level (``fenwick.scan``).

A loop over positions holding at most ``log2(T) + 1`` states: ``O(T log T Dk Dv)`` work for
attention, ``O(T log T D)`` for matmul, ``O(log T)`` state memory.  Runs on numpy and on
torch (any device); autograd works (updates are out of place while it records).
Half-precision torch operands are computed in the mask's float32 and cast back.

Log-linear Gated DeltaNet runs the same loop with one ``Dk x Dv`` state per bucket, each
moved by every transition: ``O(T log T Dk Dv)`` work, and it continues from a state.
"""

from __future__ import annotations

from hodlr.fenwick import delta, scan
from hodlr.fenwick.arrays import cast, is_torch

DESCRIPTION = "Fenwick scan: O(log T) recurrent states, loop over time; numpy or torch, autograd"


def unavailable_reason(library, device):
    return None


def matmul(level_scales, log_decay, x):
    work = level_scales.dtype
    return cast(scan.matmul(level_scales, log_decay, cast(x, work)), x.dtype)


def attention(q, k, v, level_scales, log_decay, scale):
    work = level_scales.dtype
    out = scan.attention(cast(q, work), cast(k, work), cast(v, work), level_scales, log_decay, scale)
    return cast(out, v.dtype)


def gated_delta_attention(q, k, v, beta, level_scales, log_decay, scale, *, state=None, position: int = 0,
                          final_state: bool = False):
    """Log-linear Gated DeltaNet by the bucket recurrence (:class:`hodlr.fenwick.delta.GatedDeltaState`).

    ``state (*batch, S, Dk, Dv)``: the bucket states of ``position``, where the first token
    sits (``None``: a fresh start).  With ``final_state`` returns ``(o, states)``, the bucket
    states of ``position + T`` in ``max(S, (position + T).bit_length())`` slots.
    """
    work, out_dtype = level_scales.dtype, v.dtype
    batch = tuple(v.shape[:-2])
    T = int(v.shape[-2])
    st = delta.GatedDeltaState(batch, int(q.shape[-1]), int(v.shape[-1]), dtype=work,
                               device=v.device if is_torch(v) else None, position=position,
                               states=None if state is None else cast(state, work))
    q, k, v, beta = (cast(a, work) for a in (q, k, v, beta))
    out = cast(st.prefill(q, k, v, beta, level_scales, log_decay, scale), out_dtype)
    if not final_state:
        return out
    slots = max(0 if state is None else int(state.shape[-3]), (int(position) + T).bit_length())
    return out, st.stacked(slots)
