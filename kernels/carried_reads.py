"""The reads of a carried state by a shard that starts at an aligned position, forward and backward.

A call over ``T`` tokens that starts at absolute position ``a``, with ``a`` a multiple of
``2**K >= T``, splits exactly in two: within the shard the levels of absolute positions are those
of the local ones (``a + t`` and ``a + s`` differ in the bits of ``t XOR s`` only), so the call
from position 0 gives every term between two of its tokens; every other term comes from the
buckets of the state at ``a``, one per set bit ``j`` of ``a`` (slot ``j``, level ``j + 1``),
which every token of the shard reads whole.  This module adds that second part:

``out[b, t, h] = o[b, t, h]``
``    + scale · exp(G[b, t, h]) · Σ_{j in live[b]} λ[b, t, h, j + 1] · X[b, h, j]ᵀ q[b, t, h // grp]``

with ``G`` the log-decay summed over the shard's tokens up to ``t`` inclusive (from the state's
position), ``X (B, H, S, Dk, Dv)`` the carried state and ``live[b]`` the bit mask of its live
slots (``a`` itself).  Level-scale columns of dead slots are never read.

The backward, given ``dout``, with ``f_j = scale · exp(G) · λ_j`` and ``r_j = (X_jᵀ q) · dout``:
``dq = Σ_j f_j X_j dout`` (per value head: the caller sums a group), ``dλ_j = scale · exp(G) · r_j``,
``dG = Σ_j λ_j dλ_j`` and ``dX_j = Σ_t f_j q_t dout_tᵀ`` (one sum over the tokens, split into
stretches added atomically).  ``q (B, T, Hqk, Dk)`` and the ``(B, T, H, ·)`` operands in the op's
token-major layout, any strides.  Runs on CUDA, and on the CPU under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._device import dot, token_tile
from ._layout import block, cdiv, compute_types, interpreting, scratch

__all__ = ["carried_reads_backward", "carried_reads_forward"]

ROWS = 128
"""Tokens per program of the forward (each program reads the state's tiles once: fewer, longer
programs read them less often)."""

BACKWARD_ROWS = 64
"""Tokens per step of the backward."""

STRETCH = 4096
"""Tokens one program of the backward runs through (it adds its part of the state gradient once)."""

NUM_WARPS = 4
"""Warps per program: the fastest forward and backward of the settings measured on the H200
(docs/kernels.md §6.2 gives them)."""


@triton.jit
def _factor(l_ptr, g_ptr, b, t, tmask, hd, j, scale, slb, slt, slh, sll, sgb, sgt, sgh, ACC: tl.constexpr,
            HAS_G: tl.constexpr):
    """``(scale · exp(G), λ_j)`` ``(R,)`` in ``ACC`` for the rows ``t`` (zero outside ``tmask``)."""
    e = tl.full(t.shape, scale, ACC)
    if HAS_G:
        e = e * tl.exp(tl.load(g_ptr + b * sgb + t * sgt + hd * sgh, mask=tmask, other=0.0).to(ACC))
    lam = tl.load(l_ptr + b * slb + t * slt + hd * slh + (j + 1) * sll, mask=tmask, other=0.0).to(ACC)
    return tl.where(tmask, e, 0.0), lam


@triton.jit
def _state_tile(x_ptr, b, hd, j, H, S, dk, dv, DK, DV, like_ptr, TRANSPOSED: tl.constexpr = False):
    """The ``(BDK, BDV)`` tile of slot ``j`` of ``X[b, hd]`` (contiguous ``(B, H, S, Dk, Dv)``),
    in the element type of ``like_ptr`` (the queries': 16-bit operands go to the tensor cores);
    with ``TRANSPOSED``, the ``(BDV, BDK)`` tile of ``X_jᵀ``, loaded as such."""
    base = x_ptr + ((b * H + hd) * S + j) * (DK * DV)
    if TRANSPOSED:
        x = tl.load(base + dv[:, None] + dk[None, :] * DV, mask=(dv[:, None] < DV) & (dk[None, :] < DK), other=0.0)
    else:
        x = tl.load(base + dk[:, None] * DV + dv[None, :], mask=(dk[:, None] < DK) & (dv[None, :] < DV), other=0.0)
    return x.to(like_ptr.dtype.element_ty)


@triton.jit
def _rows_of_program(live_ptr, T, H, R: tl.constexpr):
    """``(t, tmask, b, head, live)`` of program ``(row tile, b * H + head, ·)``."""
    t = tl.program_id(0) * R + tl.arange(0, R)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    return t, t < T, b, bh % H, tl.load(live_ptr + b)


@triton.jit
def _reads(q_ptr, x_ptr, b, t, tmask, hd, j, GRP, H, S, DK, DV, dv, sqb, sqt, sqh, sqd, R: tl.constexpr,
           BDK: tl.constexpr, BDV: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr, NATIVE: tl.constexpr):
    """The ``(R, BDV)`` tile ``X_jᵀ q_t`` (columns ``dv``) of the rows ``t``, in ``ACC``."""
    part = tl.zeros((R, BDV), dtype=ACC)
    for c in range(0, DK, BDK):
        dk = c + tl.arange(0, BDK)
        qb = token_tile(q_ptr, b, t, tmask, hd // GRP, dk, DK, sqb, sqt, sqh, sqd)
        part += dot(qb, _state_tile(x_ptr, b, hd, j, H, S, dk, dv, DK, DV, q_ptr), ACC, PREC, NATIVE)
    return part


@triton.jit
def _forward_kernel(o_ptr, q_ptr, l_ptr, g_ptr, x_ptr, live_ptr, out_ptr, T, H, S, GRP, DK, DV, scale,
                    sob, sot, soh, sod, sqb, sqt, sqh, sqd, slb, slt, slh, sll, sgb, sgt, sgh,
                    R: tl.constexpr, BDK: tl.constexpr, BDV: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
                    NATIVE: tl.constexpr, HAS_G: tl.constexpr):
    """Program ``(row tile, b * H + head, Dv tile)``: ``out = o + the carried reads``
    (``out (B, T, H, Dv)`` contiguous)."""
    t, tmask, b, hd, live = _rows_of_program(live_ptr, T, H, R)
    dv = tl.program_id(2) * BDV + tl.arange(0, BDV)
    acc = tl.zeros((R, BDV), dtype=ACC)
    for j in range(0, S):
        if ((live >> j) & 1) == 1:
            e, lam = _factor(l_ptr, g_ptr, b, t, tmask, hd, j, scale, slb, slt, slh, sll, sgb, sgt, sgh, ACC, HAS_G)
            part = _reads(q_ptr, x_ptr, b, t, tmask, hd, j, GRP, H, S, DK, DV, dv, sqb, sqt, sqh, sqd, R, BDK, BDV,
                          ACC, PREC, NATIVE)
            acc += (e * lam)[:, None] * part
    ob = token_tile(o_ptr, b, t, tmask, hd, dv, DV, sob, sot, soh, sod).to(ACC)
    token = (b * T + t) * H + hd
    tl.store(out_ptr + token[:, None] * DV + dv[None, :], (ob + acc).to(out_ptr.dtype.element_ty),
             mask=tmask[:, None] & (dv[None, :] < DV))


@triton.jit
def _put(ptrs, value, mask, first):
    """Store ``value``, or add it to what is stored there (``first`` false)."""
    if not first:
        value += tl.load(ptrs, mask=mask, other=0.0).to(value.dtype)
    tl.store(ptrs, value.to(ptrs.dtype.element_ty), mask=mask)


@triton.jit
def _put_level(dl_ptr, dg_ptr, token, L, j, tmask, e, lam, r, first):
    """``dλ[token, j + 1] = e · r`` and ``dG[token] (+)= λ_j dλ_j``."""
    dlam = e * r
    tl.store(dl_ptr + token * L + j + 1, dlam.to(dl_ptr.dtype.element_ty), mask=tmask)
    _put(dg_ptr + token, lam * dlam, tmask, first)


@triton.jit
def _backward_kernel(q_ptr, l_ptr, g_ptr, x_ptr, live_ptr, do_ptr, dq_ptr, dl_ptr, dg_ptr, dx_ptr, T, H, S, L, GRP,
                     DK, DV, scale, sqb, sqt, sqh, sqd, slb, slt, slh, sll, sgb, sgt, sgh, sdb, sdt, sdh, sdd,
                     N_DK_TILES: tl.constexpr, N_DV_TILES: tl.constexpr, R: tl.constexpr, STRETCH: tl.constexpr,
                     BDK: tl.constexpr, BDV: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
                     NATIVE: tl.constexpr, HAS_G: tl.constexpr):
    """Program ``(stretch, b * H + head, Dk tile a x Dv tile c)``, one pass over the stretch's tokens
    per live slot ``j``: adds the stretch's part of ``dX_j[a, c]`` (atomically: ``dX (B, H, S, Dk,
    Dv)`` float32 contiguous, zero-filled); the programs with ``c = 0`` also write the ``a`` columns
    of ``dq`` (per value head, ``(B, T, H, Dk)`` contiguous), the program of tile 0 the live columns
    of ``dλ`` (``(B, T, H, L)`` contiguous, zero-filled) and ``dG`` (``(B, T, H)`` contiguous).  The
    first live slot stores ``dq`` and ``dG``, later ones add to them (the same program).  With one
    tile along each width the queries and ``dout`` are read once per token and slot."""
    t0 = tl.program_id(0) * STRETCH
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    hd = bh % H
    tile = tl.program_id(2)
    a = tile // N_DV_TILES
    c = tile % N_DV_TILES
    dk = a * BDK + tl.arange(0, BDK)
    dv = c * BDV + tl.arange(0, BDV)
    ONE: tl.constexpr = N_DK_TILES == 1 and N_DV_TILES == 1
    live = tl.load(live_ptr + b)
    for j in range(0, S):
        if ((live >> j) & 1) == 1:
            first = ((live >> j) << j) == live  # no live slot below j
            tl.debug_barrier()  # (what the slots below stored is read back)
            if ONE:  # the slot's X_jᵀ, read once
                xt = _state_tile(x_ptr, b, hd, j, H, S, dk, dv, DK, DV, q_ptr, True)
            acc = tl.zeros((BDK, BDV), dtype=ACC)
            for start in range(0, tl.minimum(STRETCH, T - t0), R):
                t = t0 + start + tl.arange(0, R)
                tmask = t < T
                token = (b * T + t) * H + hd
                e, lam = _factor(l_ptr, g_ptr, b, t, tmask, hd, j, scale, slb, slt, slh, sll, sgb, sgt, sgh, ACC,
                                 HAS_G)
                f = e * lam
                qb = token_tile(q_ptr, b, t, tmask, hd // GRP, dk, DK, sqb, sqt, sqh, sqd).to(ACC)
                db = token_tile(do_ptr, b, t, tmask, hd, dv, DV, sdb, sdt, sdh, sdd)
                acc += dot(tl.trans(qb * f[:, None]), db, ACC, PREC, NATIVE)
                dq_ptrs = dq_ptr + token[:, None] * DK + dk[None, :]
                dq_mask = tmask[:, None] & (dk[None, :] < DK)
                if ONE:  # dout X_jᵀ gives dq and, against q, r = (X_jᵀ q) · dout
                    part = dot(db, xt, ACC, PREC, NATIVE)
                    _put(dq_ptrs, f[:, None] * part, dq_mask, first)
                    _put_level(dl_ptr, dg_ptr, token, L, j, tmask, e, lam, tl.sum(qb * part, 1), first)
                else:
                    if c == 0:  # dq[:, a] = f · Σ_c dout_c X_j[a, c]ᵀ
                        part = tl.zeros((R, BDK), dtype=ACC)
                        for cv in range(0, DV, BDV):
                            dvc = cv + tl.arange(0, BDV)
                            dbc = token_tile(do_ptr, b, t, tmask, hd, dvc, DV, sdb, sdt, sdh, sdd)
                            part += dot(dbc, _state_tile(x_ptr, b, hd, j, H, S, dk, dvc, DK, DV, q_ptr, True), ACC,
                                        PREC, NATIVE)
                        _put(dq_ptrs, f[:, None] * part, dq_mask, first)
                    if tile == 0:  # r = (X_jᵀ q) · dout over all the tiles
                        r = tl.zeros((R,), dtype=ACC)
                        for cv in range(0, DV, BDV):
                            dvc = cv + tl.arange(0, BDV)
                            p = _reads(q_ptr, x_ptr, b, t, tmask, hd, j, GRP, H, S, DK, DV, dvc, sqb, sqt, sqh, sqd,
                                       R, BDK, BDV, ACC, PREC, NATIVE)
                            r += tl.sum(p * token_tile(do_ptr, b, t, tmask, hd, dvc, DV, sdb, sdt, sdh,
                                                       sdd).to(ACC), 1)
                        _put_level(dl_ptr, dg_ptr, token, L, j, tmask, e, lam, r, first)
            out = dx_ptr + ((b * H + hd) * S + j) * (DK * DV) + dk[:, None] * DV + dv[None, :]
            tl.atomic_add(out, acc.to(dx_ptr.dtype.element_ty), mask=(dk[:, None] < DK) & (dv[None, :] < DV),
                          sem="relaxed")
    if live == 0:  # no carried bucket: zero gradients
        for start in range(0, tl.minimum(STRETCH, T - t0), R):
            t = t0 + start + tl.arange(0, R)
            tmask = t < T
            token = (b * T + t) * H + hd
            if c == 0:
                tl.store(dq_ptr + token[:, None] * DK + dk[None, :], tl.zeros((R, BDK), dtype=dq_ptr.dtype.element_ty),
                         mask=tmask[:, None] & (dk[None, :] < DK))
            if tile == 0:
                tl.store(dg_ptr + token, tl.zeros((R,), dtype=dg_ptr.dtype.element_ty), mask=tmask)


def _check(o, q, level_scales, log_decay, states, live):
    for name, x, ndim in (("o", o, 4), ("q", q, 4), ("level_scales", level_scales, 4), ("states", states, 5),
                          ("live", live, 1)):
        if not isinstance(x, torch.Tensor) or x.dim() != ndim:
            raise ValueError(f"{name} must be a {ndim}-d tensor, got {getattr(x, 'shape', type(x).__name__)}")
    B, T, Hqk, DK = q.shape
    H, DV = o.shape[2], o.shape[3]
    S, L = states.shape[2], level_scales.shape[3]
    if (tuple(o.shape[:2]) != (B, T) or Hqk < 1 or H % Hqk or tuple(level_scales.shape[:3]) != (B, T, H)
            or tuple(states.shape) != (B, H, S, DK, DV) or tuple(live.shape) != (B,)
            or (log_decay is not None and tuple(log_decay.shape) != (B, T, H))):
        raise ValueError(f"shapes disagree: o {tuple(o.shape)}, q {tuple(q.shape)}, level_scales "
                         f"{tuple(level_scales.shape)}, log_decay "
                         f"{None if log_decay is None else tuple(log_decay.shape)}"
                         f", states {tuple(states.shape)}, live {tuple(live.shape)} (want o (B, T, H, Dv), q (B, T, "
                         f"Hqk, Dk), level_scales (B, T, H, L), log_decay (B, T, H), states (B, H, S, Dk, "
                         f"Dv), live (B,))")
    return B, T, Hqk, H, DK, DV, S, L


def _for_dots(states, q):
    """The state as the dots read it: rounded once to bfloat16 for bfloat16 queries (the tensor
    cores' operand, half the bytes of every read), as it is otherwise."""
    return states.to(torch.bfloat16).contiguous() if q.dtype == torch.bfloat16 else states


def _decay_args(log_decay, level_scales):
    """``(pointer, strides...)`` of the summed log-decay, or the level scales' pointer (never read)."""
    return (level_scales, 0, 0, 0) if log_decay is None else (log_decay, *log_decay.stride())


def carried_reads_forward(o, q, level_scales, log_decay, states, live, scale: float) -> torch.Tensor:
    """``o`` plus the reads of the carried ``states`` (module docstring): ``(B, T, H, Dv)`` in
    ``o``'s dtype.  ``log_decay (B, T, H)``: the summed log-decay ``G`` (or None: no decay);
    ``states (B, H, S, Dk, Dv)`` contiguous, in the state dtype; ``live (B,)`` int64 bit masks (of
    slots below ``S`` whose level ``j + 1`` is below ``L``: not checked here, the masks stay on the
    device)."""
    B, T, Hqk, H, DK, DV, S, L = _check(o, q, level_scales, log_decay, states, live)
    acc, prec, _ = compute_types(q.dtype)
    states = _for_dots(states, q)
    out = scratch((B, T, H, DV), o.dtype, o.device)
    BDK, BDV = block(DK, 64), block(DV, 64)
    n_dv = cdiv(DV, BDV)
    if B * T * H:
        _forward_kernel[(cdiv(T, ROWS), B * H, n_dv)](
            o, q, level_scales, _decay_args(log_decay, level_scales)[0], states, live, out, T, H, S, H // Hqk, DK, DV,
            scale, *o.stride(), *q.stride(), *level_scales.stride(),
            *_decay_args(log_decay, level_scales)[1:], R=ROWS, BDK=BDK, BDV=BDV, ACC=acc, PREC=prec,
            NATIVE=not interpreting(), HAS_G=log_decay is not None, num_warps=NUM_WARPS)
    return out


def carried_reads_backward(q, level_scales, log_decay, states, live, scale: float, dout):
    """``(dq (B, T, H, Dk), dlevel_scales (B, T, H, L), dlog_decay (B, T, H), dstates (B, H, S, Dk,
    Dv))`` of :func:`carried_reads_forward` for the gradient ``dout`` of its result (the gradient of
    ``o`` is ``dout`` itself).  ``dq`` holds one row per value head (sum each group of ``H // Hqk``
    heads for the query's gradient; in ``q``'s dtype without groups, else in float32);
    ``dlevel_scales`` is zero outside the live columns; ``dlog_decay`` is None without a decay;
    ``dlog_decay`` and ``dstates`` in float32 (float64 for float64 inputs)."""
    B, T, Hqk, H, DK, DV, S, L = _check(dout, q, level_scales, log_decay, states, live)
    acc, prec, _ = compute_types(q.dtype)
    states = _for_dots(states, q)
    dev = q.device
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    dq = scratch((B, T, H, DK), q.dtype if H == Hqk else work, dev)
    dl = torch.zeros((B, T, H, L), dtype=level_scales.dtype, device=dev)
    dg = scratch((B, T, H), work, dev)
    dx = torch.zeros((B, H, S, DK, DV), dtype=work, device=dev)
    BDK, BDV = block(DK, 64), block(DV, 64)
    n_dv = cdiv(DV, BDV)
    decay = _decay_args(log_decay, level_scales)
    common = dict(ACC=acc, PREC=prec, NATIVE=not interpreting(), HAS_G=log_decay is not None)
    if B * T * H:
        n_dk = cdiv(DK, BDK)
        _backward_kernel[(cdiv(T, STRETCH), B * H, n_dk * n_dv)](
            q, level_scales, decay[0], states, live, dout, dq, dl, dg, dx, T, H, S, L, H // Hqk, DK, DV, scale,
            *q.stride(), *level_scales.stride(), *decay[1:], *dout.stride(), N_DK_TILES=n_dk, N_DV_TILES=n_dv,
            R=BACKWARD_ROWS, STRETCH=STRETCH, BDK=BDK, BDV=BDV, num_warps=NUM_WARPS, **common)
    return dq, dl, (None if log_decay is None else dg), dx
