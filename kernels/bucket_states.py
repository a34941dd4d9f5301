"""Weighted sums of key-value outer products over stretches of tokens: the Fenwick bucket states
of a segment of a sequence, forward and backward.

A *piece* is a stretch of consecutive tokens of one batch row that all belong to one bucket: slot
``j`` of sequence ``i``.  With ``a`` the log-weights (``a[b, t, h]``: the log-decay from token ``t``
to the end of its segment),

``X[i, h, j] = Σ_{pieces (b, t0, n, i, j)} Σ_{t0 <= t < t0 + n} exp(a[b, t, h]) k[b, t, h // grp] v[b, t, h]ᵀ``

(``k (B, T, Hqk, Dk)``, ``v (B, T, H, Dv)``, ``a (B, T, H)``: the op's token-major layout, any
strides).  A bucket of ``2**j`` tokens is cut into pieces of at most :data:`PIECE` tokens, so a long
bucket is summed by many programs at once (a single product over a long bucket, ``Dk x T`` times
``T x Dv``, leaves the device almost idle); their partial states are added atomically.

The backward, given ``dX``: ``dk_t = exp(a_t) dX v_t`` (per value head: the caller sums a group),
``dv_t = exp(a_t) dXᵀ k_t`` and ``da_t = k_t · dk_t`` (``d exp(a_t) / da_t = exp(a_t)``).
Runs on CUDA, and on the CPU under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import triton
import triton.language as tl

from ._device import dot, matrix_tile, token_tile
from ._layout import block, cdiv, compute_types, interpreting, scratch, state_dtypes

__all__ = ["PIECE", "Pieces", "bucket_pieces", "bucket_states_backward", "bucket_states_forward"]

PIECE = 1024
"""Most tokens one program sums (a power of two, a multiple of :data:`ROWS`)."""

ROWS = 64
"""Tokens per tile inside a program."""

NUM_WARPS = 4
"""Warps per program of both kernels (not tuned: the kernels read each token once)."""


class Pieces(NamedTuple):
    """The device table ``(n_pieces, 5)`` int64 of :func:`bucket_pieces` and the number of tokens
    it covers."""

    table: torch.Tensor
    tokens: int


def check_buckets(buckets, B: int, T: int, count: int, slots: int) -> np.ndarray:
    """``buckets`` as an int64 ``(n, 5)`` array of rows ``(b, t0, n, i, j)``, checked: integers,
    each bucket's tokens inside batch row ``b`` of ``T`` tokens, ``0 <= i < count``,
    ``0 <= j < slots``, no token in two buckets (the kernels add each bucket's sum to its slot and
    each token's gradient once).  ``ValueError`` / ``TypeError`` naming the first bad row."""
    rows = np.asarray(buckets)
    if rows.size and not np.issubdtype(rows.dtype, np.integer):
        raise TypeError(f"buckets must hold integers (rows b, t0, n, i, j), got {rows.dtype}")
    rows = rows.astype(np.int64).reshape(-1, 5) if rows.size else np.zeros((0, 5), dtype=np.int64)
    b, t0, n, i, j = rows.T
    bad = (b < 0) | (b >= B) | (t0 < 0) | (n < 0) | (t0 + n > T) | (i < 0) | (i >= count) | (j < 0) | (j >= slots)
    if bad.any():
        r = int(np.argmax(bad))
        raise ValueError(f"buckets row {r} {rows[r].tolist()} (b, t0, n, i, j) must have 0 <= b < B={B}, "
                         f"0 <= t0, t0 + n <= T={T}, 0 <= i < count={count}, 0 <= j < slots={slots}")
    live = rows[n > 0]
    order = np.lexsort((live[:, 1], live[:, 0]))
    live = live[order]
    clash = (live[1:, 0] == live[:-1, 0]) & (live[1:, 1] < live[:-1, 1] + live[:-1, 2])
    if clash.any():
        r = int(np.argmax(clash))
        raise ValueError(f"buckets {live[r].tolist()} and {live[r + 1].tolist()} (b, t0, n, i, j) share tokens: "
                         f"the buckets must be disjoint")
    return rows


def bucket_pieces(buckets, device) -> Pieces:
    """``buckets`` (rows ``(b, t0, n, i, j)``: batch row, first token, token count, sequence,
    slot; disjoint) each cut into pieces of at most :data:`PIECE` tokens, as a device table;
    buckets with no tokens are dropped."""
    buckets = np.asarray(buckets, dtype=np.int64).reshape(-1, 5)
    buckets = buckets[buckets[:, 2] > 0]
    count = -(-buckets[:, 2] // PIECE)
    table = np.repeat(buckets, count, axis=0)
    within = np.arange(len(table)) - np.repeat(np.cumsum(count) - count, count)
    table[:, 1] += within * PIECE
    table[:, 2] = np.minimum(table[:, 2] - within * PIECE, PIECE)
    return Pieces(torch.as_tensor(table, device=device), int(buckets[:, 2].sum()))


@triton.jit
def _piece(tab_ptr, p):
    """``(b, t0, n, i, j)`` of piece ``p``."""
    row = tab_ptr + p * 5
    return tl.load(row), tl.load(row + 1), tl.load(row + 2), tl.load(row + 3), tl.load(row + 4)


@triton.jit
def _weights(a_ptr, b, t, tmask, hd, sab, sat, sah, ACC: tl.constexpr):
    """``exp(a[b, t, hd])`` ``(R,)`` in ``ACC``, zero outside ``tmask``."""
    w = tl.exp(tl.load(a_ptr + b * sab + t * sat + hd * sah, mask=tmask, other=0.0).to(ACC))
    return tl.where(tmask, w, 0.0)


@triton.jit
def _forward_kernel(k_ptr, v_ptr, a_ptr, x_ptr, tab_ptr, H, S, GRP, DK, DV, N_DV_TILES,
                    skb, skt, skh, skd, svb, svt, svh, svd, sab, sat, sah,
                    R: tl.constexpr, BDK: tl.constexpr, BDV: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
                    NATIVE: tl.constexpr):
    """Program ``(piece, head, Dk-tile x Dv-tile)``: adds the piece's sum to its bucket's state."""
    p = tl.program_id(0).to(tl.int64)
    hd = tl.program_id(1).to(tl.int64)
    tile = tl.program_id(2)
    dk = (tile // N_DV_TILES) * BDK + tl.arange(0, BDK)
    dv = (tile % N_DV_TILES) * BDV + tl.arange(0, BDV)
    b, t0, n, i, j = _piece(tab_ptr, p)
    acc = tl.zeros((BDK, BDV), dtype=ACC)
    for start in range(0, n, R):
        t = t0 + start + tl.arange(0, R)
        tmask = t < t0 + n
        kb = token_tile(k_ptr, b, t, tmask, hd // GRP, dk, DK, skb, skt, skh, skd)
        vb = token_tile(v_ptr, b, t, tmask, hd, dv, DV, svb, svt, svh, svd)
        w = _weights(a_ptr, b, t, tmask, hd, sab, sat, sah, ACC)
        acc += dot(tl.trans(kb.to(ACC) * w[:, None]), vb, ACC, PREC, NATIVE)
    out = x_ptr + ((i * H + hd) * S + j) * (DK * DV) + dk[:, None] * DV + dv[None, :]
    tl.atomic_add(out, acc, mask=(dk[:, None] < DK) & (dv[None, :] < DV), sem="relaxed")


@triton.jit
def _backward_kernel(k_ptr, v_ptr, a_ptr, dx_ptr, dk_ptr, dv_ptr, da_ptr, tab_ptr, T, H, S, GRP, DK, DV,
                     skb, skt, skh, skd, svb, svt, svh, svd, sab, sat, sah, N_DK_TILES: tl.constexpr,
                     N_DV_TILES: tl.constexpr, R: tl.constexpr, BDK: tl.constexpr, BDV: tl.constexpr,
                     ACC: tl.constexpr, PREC: tl.constexpr,
                     NATIVE: tl.constexpr):
    """Program ``(piece, head, tile)``: a tile ``< N_DK_TILES`` writes a Dk-tile of the piece's
    ``dk`` and adds its part of ``da``; a later tile writes a Dv-tile of ``dv``.  With one tile
    along the other width the program reads its tile of ``dX`` once, before its tokens.
    ``dk (B, T, H, Dk)``, ``dv (B, T, H, Dv)`` and ``da (B, T, H)`` are contiguous (``da``
    zero-filled)."""
    p = tl.program_id(0).to(tl.int64)
    hd = tl.program_id(1).to(tl.int64)
    tile = tl.program_id(2)
    b, t0, n, i, j = _piece(tab_ptr, p)
    dx = dx_ptr + ((i * H + hd) * S + j) * (DK * DV)
    if tile < N_DK_TILES:  # dk = w * (V dXᵀ), da = k · dk
        dk = tile * BDK + tl.arange(0, BDK)
        if N_DV_TILES == 1:  # one tile of dXᵀ: read once
            dxt = tl.trans(matrix_tile(dx, 0, dk, tl.arange(0, BDV), DK, DV, ACC))
        for start in range(0, n, R):
            t = t0 + start + tl.arange(0, R)
            tmask = t < t0 + n
            w = _weights(a_ptr, b, t, tmask, hd, sab, sat, sah, ACC)
            token = (b * T + t) * H + hd  # (R,) row of the (B, T, H) grid
            acc = tl.zeros((R, BDK), dtype=ACC)
            for c in range(N_DV_TILES):
                dv = c * BDV + tl.arange(0, BDV)
                vb = token_tile(v_ptr, b, t, tmask, hd, dv, DV, svb, svt, svh, svd)
                if N_DV_TILES != 1:
                    dxt = tl.trans(matrix_tile(dx, 0, dk, dv, DK, DV, ACC))
                acc += dot(vb, dxt, ACC, PREC, NATIVE)
            grad = acc * w[:, None]
            kb = token_tile(k_ptr, b, t, tmask, hd // GRP, dk, DK, skb, skt, skh, skd).to(ACC)
            tl.store(dk_ptr + token[:, None] * DK + dk[None, :], grad, mask=tmask[:, None] & (dk[None, :] < DK))
            part = tl.sum(kb * grad, 1)
            if N_DK_TILES == 1:
                tl.store(da_ptr + token, part, mask=tmask)
            else:
                tl.atomic_add(da_ptr + token, part, mask=tmask, sem="relaxed")
    else:  # dv = w * (K dX)
        dv = (tile - N_DK_TILES) * BDV + tl.arange(0, BDV)
        if N_DK_TILES == 1:  # one tile of dX: read once
            dxs = matrix_tile(dx, 0, tl.arange(0, BDK), dv, DK, DV, ACC)
        for start in range(0, n, R):
            t = t0 + start + tl.arange(0, R)
            tmask = t < t0 + n
            w = _weights(a_ptr, b, t, tmask, hd, sab, sat, sah, ACC)
            token = (b * T + t) * H + hd
            acc = tl.zeros((R, BDV), dtype=ACC)
            for c in range(N_DK_TILES):
                dk = c * BDK + tl.arange(0, BDK)
                kb = token_tile(k_ptr, b, t, tmask, hd // GRP, dk, DK, skb, skt, skh, skd)
                if N_DK_TILES != 1:
                    dxs = matrix_tile(dx, 0, dk, dv, DK, DV, ACC)
                acc += dot(kb, dxs, ACC, PREC, NATIVE)
            tl.store(dv_ptr + token[:, None] * DV + dv[None, :], acc * w[:, None],
                     mask=tmask[:, None] & (dv[None, :] < DV))


def _check(k, v, log_weight):
    for name, x, ndim in (("k", k, 4), ("v", v, 4), ("log_weight", log_weight, 3)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != ndim:
            raise ValueError(f"{name} must be a {ndim}-d tensor, got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got {x.dtype}")
    B, T, Hqk, DK = k.shape
    H, DV = v.shape[2], v.shape[3]
    if tuple(v.shape[:2]) != (B, T) or Hqk < 1 or H % Hqk or tuple(log_weight.shape) != (B, T, H):
        raise ValueError(f"shapes disagree: k {tuple(k.shape)}, v {tuple(v.shape)}, log_weight "
                         f"{tuple(log_weight.shape)} (want k (B, T, Hqk, Dk), v (B, T, H, Dv), log_weight (B, T, H) "
                         f"with Hqk dividing H)")
    return B, T, Hqk, H, DK, DV


def bucket_states_forward(k, v, log_weight, pieces, count: int, slots: int) -> torch.Tensor:
    """``X (count, H, slots, Dk, Dv)`` (float32; float64 for float64 inputs) of the module
    docstring; ``pieces`` from :func:`bucket_pieces`."""
    B, T, Hqk, H, DK, DV = _check(k, v, log_weight)
    acc, prec, _ = compute_types(v.dtype)
    x = torch.zeros((count, H, slots, DK, DV), dtype=state_dtypes(v.dtype)[0], device=v.device)
    BDK, BDV = block(DK, 64), block(DV, 64)
    n_dv = cdiv(DV, BDV)
    if len(pieces.table) and H:
        _forward_kernel[(len(pieces.table), H, cdiv(DK, BDK) * n_dv)](
            k, v, log_weight, x, pieces.table, H, slots, H // Hqk, DK, DV, n_dv, *k.stride(), *v.stride(),
            *log_weight.stride(), R=ROWS, BDK=BDK, BDV=BDV, ACC=acc, PREC=prec, NATIVE=not interpreting(),
            num_warps=NUM_WARPS)
    return x


def bucket_states_backward(k, v, log_weight, pieces, dx):
    """``(dk (B, T, H, Dk), dv (B, T, H, Dv), dlog_weight (B, T, H))`` of
    :func:`bucket_states_forward` for the gradient ``dx`` of its result.  ``dk`` holds one row per
    value head (sum each group of ``H // Hqk`` heads for the key's gradient), in ``k``'s dtype
    without groups and in the state dtype with them; ``dv`` in ``v``'s dtype; ``dlog_weight`` in
    the state dtype.  Tokens in no piece get zeros."""
    B, T, Hqk, H, DK, DV = _check(k, v, log_weight)
    acc, prec, _ = compute_types(v.dtype)
    dtype = state_dtypes(v.dtype)[0]
    dx = dx.to(dtype).contiguous()
    def buffer(shape, dtype):  # every token written, or zeros where none is
        return scratch(shape, dtype, v.device) if pieces.tokens == B * T else torch.zeros(shape, dtype=dtype,
                                                                                          device=v.device)

    dk = buffer((B, T, H, DK), k.dtype if H == Hqk else dtype)
    dv = buffer((B, T, H, DV), v.dtype)
    da = torch.zeros((B, T, H), dtype=dtype, device=v.device)
    BDK, BDV = block(DK, 64), block(DV, 64)
    n_dk, n_dv = cdiv(DK, BDK), cdiv(DV, BDV)
    if len(pieces.table) and H:
        _backward_kernel[(len(pieces.table), H, n_dk + n_dv)](
            k, v, log_weight, dx, dk, dv, da, pieces.table, T, H, dx.shape[2], H // Hqk, DK, DV, *k.stride(),
            *v.stride(), *log_weight.stride(), N_DK_TILES=n_dk, N_DV_TILES=n_dv, R=ROWS, BDK=BDK, BDV=BDV, ACC=acc,
            PREC=prec,
            NATIVE=not interpreting(), num_warps=NUM_WARPS)
    return dk, dv, da
