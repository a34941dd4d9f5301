"""Fenwick backend: the recurrent form, one state per Fenwick level (``fenwick.scan``).

A loop over positions holding at most ``log2(T) + 1`` states: ``O(T log T Dk Dv)`` work for
attention, ``O(T log T D)`` for matmul, ``O(log T)`` state memory.  Runs on numpy and on
torch (any device); autograd works (updates are out of place while it records).
Half-precision torch operands are computed in the mask's float32 and cast back.

Log-linear Gated DeltaNet runs the same loop with one ``Dk x Dv`` state per bucket, each
moved by every transition: ``O(T log T Dk Dv)`` work, and it continues from a state.
"""

from __future__ import annotations

from hodlr._formulas import tie_decay
from hodlr._transfer import to_device
from hodlr.fenwick import delta, num_slots, scan
from hodlr.fenwick.arrays import cast, is_torch

GATED_DELTA_STATE = True
"""``gated_delta_attention`` takes ``state``, ``position`` and ``final_state`` (:mod:`hodlr.backends`)."""

DESCRIPTION = "Fenwick scan: O(log T) recurrent states, loop over time; numpy or torch, autograd"


def unavailable_reason(library, device):
    if str(device) == "meta":
        return "the scan reads the positions' values, which meta tensors do not hold"
    return None


def matmul(level_scales, log_decay, x):
    work = level_scales.dtype
    return cast(tie_decay(scan.matmul(level_scales, log_decay, cast(x, work)), log_decay), x.dtype)


def attention(q, k, v, level_scales, log_decay, scale):
    work = level_scales.dtype
    out = scan.attention(cast(q, work), cast(k, work), cast(v, work), level_scales, log_decay, scale)
    return cast(tie_decay(out, log_decay), v.dtype)


def attention_state(q, k, v, level_scales, log_decay, scale, initial_state, initial_positions, cu_seqlens,
                    output_final_state):
    """The state-aware attention of the backend contract (layout in :mod:`hodlr.backends`): for each
    sequence, a :class:`FenwickState` at its start position holding the initial buckets, then
    :meth:`FenwickState.prefill` over its tokens (torch tensors; autograd flows through the
    initial state)."""
    import torch

    from hodlr import fenwick
    from hodlr.fenwick.scan import FenwickState
    from hodlr.state import segments

    work = level_scales.dtype
    N, Hqk, T, Dk = q.shape
    H, Dv = v.shape[1], v.shape[-1]
    grp = H // Hqk
    batch, offset, length, start = segments(N, T, cu_seqlens, initial_positions)
    S_in = 0 if initial_state is None else initial_state.shape[2]
    S_out = max(S_in, fenwick.level(int((start + length).max(initial=0)), 0))
    outs, finals = [], []
    for n in range(start.size):
        b, sl, a = int(batch[n]), slice(int(offset[n]), int(offset[n] + length[n])), int(start[n])
        Tn = int(length[n])
        qn, kn = (x[b, :, sl].to(work)[:, None].expand(Hqk, grp, Tn, Dk) for x in (q, k))
        vn = v[b, :, sl].to(work).unflatten(0, (Hqk, grp))
        lam = level_scales[b, :, sl].unflatten(0, (Hqk, grp))
        g = None if log_decay is None else log_decay[b, :, sl].unflatten(0, (Hqk, grp))
        buckets = {lev: initial_state[n, :, lev - 1].to(work).unflatten(0, (Hqk, grp))
                   for lev in range(1, a.bit_length() + 1) if (a >> (lev - 1)) & 1}
        state = FenwickState.from_states(a, buckets, (Hqk, grp), Dk, Dv, work, v.device)
        outs.append(state.prefill(qn, kn, vn, lam, g, scale).flatten(0, 1))
        if output_final_state:
            final = torch.zeros((H, S_out, Dk, Dv), dtype=work, device=v.device)
            live = state.states()
            if live:
                levels = sorted(live)
                final = final.index_copy(1, to_device([lev - 1 for lev in levels], v.device, torch.int64),
                                         torch.stack([live[lev].flatten(0, 1) for lev in levels], 1))
            finals.append(final)
    if not outs:  # an empty batch
        o = v.new_zeros((0, H, T, Dv))
    else:
        o = (torch.stack(outs) if cu_seqlens is None else torch.cat(outs, 1)[None]).to(v.dtype)
    if not output_final_state:
        return o
    positions = to_device(start + length, v.device, torch.int64)
    states = torch.stack(finals) if finals else torch.zeros((0, H, S_out, Dk, Dv), dtype=work, device=v.device)
    return o, (states, positions)


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
    out = cast(tie_decay(st.prefill(q, k, v, beta, level_scales, log_decay, scale), log_decay), out_dtype)
    if not final_state:
        return out
    slots = max(0 if state is None else int(state.shape[-3]), num_slots(int(position) + T))
    return out, st.stacked(slots)
