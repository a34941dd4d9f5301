"""One decoding step of log-linear attention or log-linear Gated DeltaNet for a batch of sequences,
each at its own position.

The state is that of ``hodlr.LogLinearState`` (``docs/models.md``): ``states (N, H, S, Dk, Dv)``,
slot ``l - 1`` the level-``l`` Fenwick bucket of ``positions[n]``, decayed to the last consumed token.
The token at position ``p`` reads every live slot (the set bits of ``p``) with its decay ``exp(g)``:

``o = scale * (λ[0] (q · k) v + exp(g) Σ_l λ[l] qᵀ S_l)``

and the state moves to ``p + 1`` as a binary increment: with ``D = bit_length(p XOR (p + 1))`` (the
trailing ones of ``p``, plus one), the buckets of levels ``l < D`` merge with the token into the
bucket of level ``D`` (slot ``D - 1``: ``exp(g) Σ_{l<D} S_l + k vᵀ``) and become empty (0); those of
levels ``l > D`` are decayed by ``exp(g)``.

Gated DeltaNet (a ``beta``) moves every live slot by ``A = exp(g) (I - β k kᵀ)`` instead of
``exp(g)`` before it is read, merged or stored (``S - β k (kᵀ S)``: a program holds every key row
of its value columns, so the product ``kᵀ S`` is its own), writes ``β k vᵀ`` and reads level 0 as
``λ[0] β (q · k) v`` (``docs/mathematics.md`` §13, the recurrent form).

Two launches, no host synchronisation (capturable in a CUDA graph): ``_step_kernel``, grid
``(N·H, Dv-tiles)``, reads ``positions`` and updates ``states`` in place; ``_advance_kernel``
increments ``positions`` afterwards (so that no program reads a position another has moved).  A row
whose step would leave ``2**S - 1`` or read past the ``L`` level scales is left unchanged, its
output NaN.  Runs on CUDA, and on the CPU under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hodlr.fenwick.arrays import describe

from ._layout import MIN_BLOCK, cdiv, compute_types, next_power_of_2

__all__ = ["decode_step"]

NUM_WARPS = 4
"""Warps per program of the step kernel."""

TILE_ELEMENTS = 4096
"""Elements of a program's state tile: all ``Dk`` rows of ``TILE_ELEMENTS // Dk`` value columns (at
most 64).  Offline for sm_90 (Triton 3.9, bf16, 4 warps) the step at ``Dk = Dv = 64`` takes 255
registers and a 128-byte stack a thread (256 with ``beta``) at 4096, 168 (205) and none at 2048;
on the GPU 4096 is still the faster, both steps (docs/kernels.md §7.6)."""


@triton.jit
def _fits(p, S, L):
    """The step from ``p`` stays in ``S`` slots (``p + 1 < 2**S``) and in ``L`` level scales
    (``num_levels(p + 1) = bit_length(p) + 1 <= L``)."""
    return (p >= 0) & (((p + 1) >> S) == 0) & ((p >> (L - 1)) == 0)


@triton.jit
def _step_kernel(q_ptr, k_ptr, v_ptr, g_ptr, b_ptr, l_ptr, s_ptr, pos_ptr, o_ptr, idx_ptr,
                 H, GROUP, L, DK, DV, scale,
                 sqn, sqh, sqd, skn, skh, skd, svn, svh, svd, sgn, sgh, sbn, sbh, sln, slh, sll, spn,
                 ssn, ssh, sss, ssk, ssv,
                 S: tl.constexpr, BDK: tl.constexpr, BDV: tl.constexpr, HAS_G: tl.constexpr, DELTA: tl.constexpr,
                 ACC: tl.constexpr, HAS_IDX: tl.constexpr):
    nh = tl.program_id(0).to(tl.int64)
    n = nh // H
    h = nh % H
    if HAS_IDX:  # input row n steps the state's row idx[n]
        r = tl.load(idx_ptr + n).to(tl.int64)
    else:
        r = n
    hq = h // GROUP
    dk = tl.arange(0, BDK)
    dv = tl.program_id(1) * BDV + tl.arange(0, BDV)
    kmask = dk < DK
    vmask = dv < DV
    tile = kmask[:, None] & vmask[None, :]
    p = tl.load(pos_ptr + r * spn)
    o_row = o_ptr + nh * DV + dv
    if _fits(p, S, L):
        q = tl.load(q_ptr + n * sqn + hq * sqh + dk * sqd, mask=kmask, other=0.0).to(ACC)
        k = tl.load(k_ptr + n * skn + hq * skh + dk * skd, mask=kmask, other=0.0).to(ACC)
        v = tl.load(v_ptr + n * svn + h * svh + dv * svd, mask=vmask, other=0.0).to(ACC)
        lam_row = l_ptr + n * sln + h * slh
        if HAS_G:  # the log-decay of absolute position 0 multiplies no pair (no state to decay)
            e = tl.where(p > 0, tl.exp(tl.load(g_ptr + n * sgn + h * sgh).to(ACC)), 1.0)
        else:
            e = 1.0
        if DELTA:
            beta = tl.load(b_ptr + n * sbn + h * sbh).to(ACC)
        else:
            beta = 1.0
        carry = p ^ (p + 1)  # bits 0 .. D-1 set: the slots that merge, and slot D itself
        read = tl.zeros((BDV,), dtype=ACC)
        merged = tl.zeros((BDK, BDV), dtype=ACC)
        base = s_ptr + r * ssn + h * ssh + dk[:, None] * ssk + dv[None, :] * ssv
        for i in range(S):
            if ((p >> i) & 1) == 1:
                ptrs = base + i * sss
                Sl = tl.load(ptrs, mask=tile, other=0.0).to(ACC)
                if DELTA:  # A S = exp(g) (S - β k (kᵀ S)): the correction here, exp(g) with the others
                    Sl = Sl - (beta * k)[:, None] * tl.sum(k[:, None] * Sl, 0)[None, :]
                read += tl.load(lam_row + (i + 1) * sll).to(ACC) * tl.sum(q[:, None] * Sl, 0)
                if ((carry >> i) & 1) == 1:
                    merged += Sl
                    tl.store(ptrs, tl.zeros((BDK, BDV), dtype=ACC), mask=tile)
                elif HAS_G or DELTA:
                    tl.store(ptrs, e * Sl, mask=tile)
        D = ((carry + 1).to(tl.float32).to(tl.int32, bitcast=True) >> 23) - 127  # carry + 1 = 2**D, exact
        tl.store(base + (D - 1) * sss, e * merged + (beta * k)[:, None] * v[None, :], mask=tile)
        diag = tl.load(lam_row).to(ACC) * beta * tl.sum(q * k, 0)
        tl.store(o_row, scale * (diag * v + e * read), mask=vmask)
    else:
        tl.store(o_row, tl.full((BDV,), float("nan"), ACC), mask=vmask)


@triton.jit
def _advance_kernel(pos_ptr, idx_ptr, N, S, L, spn, BLOCK: tl.constexpr, HAS_IDX: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < N
    if HAS_IDX:
        r = tl.load(idx_ptr + i, mask=m, other=0).to(tl.int64)
    else:
        r = i
    p = tl.load(pos_ptr + r * spn, mask=m, other=0)
    tl.store(pos_ptr + r * spn, p + _fits(p, S, L).to(p.dtype), mask=m)


def decode_step(q, k, v, log_decay, level_scales, states, positions, scale: float = 1.0, *, beta=None, out=None,
                state_indices=None):
    """One token per sequence: returns ``o (N, H, Dv)``; ``states`` and ``positions`` updated in place.

    Parameters
    ----------
    q, k : torch.Tensor, shape ``(N, Hqk, Dk)``
        ``Hqk`` divides ``H``; head ``h`` reads head ``h // (H // Hqk)``.  Any strides.
    v : torch.Tensor, shape ``(N, H, Dv)``
    log_decay : torch.Tensor, shape ``(N, H)``, or None
    level_scales : torch.Tensor, shape ``(N, H, L)``
        Level 0 and the levels of the live slots are read.
    states : torch.Tensor, shape ``(R, H, S, Dk, Dv)``, float32 (float64 under the interpreter), any
        strides (no two elements at one address), updated in place; ``R = N`` without
        ``state_indices``.
    positions : torch.Tensor, shape ``(R,)``, int64 (any stride: a column of a larger table),
        incremented in place.
    scale : float
    beta : torch.Tensor, shape ``(N, H)``, optional
        Gated DeltaNet's write strengths: the step of log-linear Gated DeltaNet (module docstring);
        None: log-linear attention's.
    out : torch.Tensor, optional
        Contiguous ``(N, H, Dv)`` buffer with ``v``'s dtype (for CUDA graphs).
    state_indices : torch.Tensor, shape ``(N,)``, int64, optional
        Input row ``n`` steps the state's row ``state_indices[n]`` (the rows of a preallocated cache
        that decode now; distinct, in ``[0, R)``: not checked here).

    Rows whose position would leave the state (``p + 1 >= 2**S``) or whose ``L`` is too small
    (``L < bit_length(p) + 1``) are not changed; their output is NaN.  Nothing is read on the host.
    """
    N, Hqk, DK = q.shape
    H, DV = v.shape[1], v.shape[2]
    S = states.shape[2]
    L = level_scales.shape[-1]
    if tuple(k.shape) != (N, Hqk, DK) or tuple(v.shape[:1]) != (N,) or Hqk < 1 or H % Hqk:
        raise ValueError(f"shapes disagree: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} "
                         "(want q, k (N, Hqk, Dk), v (N, H, Dv), Hqk dividing H)")
    if tuple(level_scales.shape[:2]) != (N, H) or L < 1:
        raise ValueError(f"level_scales must have shape (N, H, L) = ({N}, {H}, L >= 1), "
                         f"got {tuple(level_scales.shape)}")
    if log_decay is not None and tuple(log_decay.shape) != (N, H):
        raise ValueError(f"log_decay must have shape (N, H) = ({N}, {H}), got {tuple(log_decay.shape)}")
    if beta is not None and tuple(beta.shape) != (N, H):
        raise ValueError(f"beta must have shape (N, H) = ({N}, {H}), got {tuple(beta.shape)}")
    R = N if state_indices is None else states.shape[0]
    if tuple(states.shape) != (R, H, S, DK, DV):
        raise ValueError(f"states must be a tensor of shape (N, H, S, Dk, Dv) = ({R}, {H}, S, {DK}, {DV}), "
                         f"got {tuple(states.shape)}")
    if positions.dtype != torch.int64 or tuple(positions.shape) != (R,):
        raise ValueError(f"positions must be an int64 tensor of shape ({R},), "
                         f"got {positions.dtype} {tuple(positions.shape)}")
    if state_indices is not None:
        if not isinstance(state_indices, torch.Tensor) or state_indices.dtype != torch.int64:
            raise TypeError(f"state_indices must be an int64 tensor, got {describe(state_indices)}")
        if tuple(state_indices.shape) != (N,) or state_indices.device != states.device:
            raise ValueError(f"state_indices must have shape ({N},) and lie on {states.device}, got "
                             f"{describe(state_indices)}")
    acc, _, _ = compute_types(states.dtype)
    if states.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"states must be float32 (float64 under the interpreter), got {states.dtype}")
    if out is None:
        out = torch.empty((N, H, DV), dtype=v.dtype, device=v.device)
    elif tuple(out.shape) != (N, H, DV) or out.dtype != v.dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {v.dtype} tensor of shape ({N}, {H}, {DV}), "
                         f"got {out.dtype} {tuple(out.shape)}")
    if N == 0 or H == 0 or DV == 0:
        return out
    BDK = max(MIN_BLOCK, next_power_of_2(DK))
    BDV = max(MIN_BLOCK, min(64, next_power_of_2(DV), max(MIN_BLOCK, TILE_ELEMENTS // BDK)))
    g = level_scales if log_decay is None else log_decay
    sg = (0, 0) if log_decay is None else (log_decay.stride(0), log_decay.stride(1))
    sb = (0, 0) if beta is None else (beta.stride(0), beta.stride(1))
    _step_kernel[(N * H, cdiv(DV, BDV))](
        q, k, v, g, level_scales if beta is None else beta, level_scales, states, positions, out,
        positions if state_indices is None else state_indices, H, H // Hqk, L, DK, DV, float(scale),
        *q.stride(), *k.stride(), *v.stride(), *sg, *sb, *level_scales.stride(), positions.stride(0),
        *states.stride(), S=S, BDK=BDK, BDV=BDV, HAS_G=log_decay is not None, DELTA=beta is not None, ACC=acc,
        HAS_IDX=state_indices is not None, num_warps=NUM_WARPS)
    BLOCK = 256
    _advance_kernel[(cdiv(N, BLOCK),)](positions, positions if state_indices is None else state_indices, N, S, L,
                                       positions.stride(0), BLOCK=BLOCK, HAS_IDX=state_indices is not None)
    return out
