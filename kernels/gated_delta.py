"""Chunked log-linear Gated DeltaNet forward: ``O = (P ⊙ Mλ) V`` (docs/mathematics.md §13).

``P[t, s] = scale β_s q_tᵀ A_t ⋯ A_{s+1} k_s`` with ``A_t = exp(g_t) (I - β_t k_t k_tᵀ)`` and
``Mλ[t, s] = λ[t, level(t, s)]``.  With chunk size ``C = 2^c`` (chunks aligned at 0), per chunk
(``Γ[t, s] = exp(Σ_{k=s+1..t} g_k)``, ``γ_t = exp(Σ_{k=start..t} g_k)``, ``d_s = Γ[end, s]``,
``N = I + strictly_lower(diag(β) (K Kᵀ ⊙ Γ))``, ``X = N⁻¹``):

* ``P = (Q Kᵀ ⊙ Γ) X diag(β)``: the pairs inside the chunk (times the in-chunk λ-mask, levels
  ``0..c``);
* ``W = X diag(βγ) K``: the chunk's transitions in WY form, so that the queries moved to the
  chunk's start are ``Q̃ = diag(γ) Q - (Q Kᵀ ⊙ Γ) W`` and the chunk's transition is
  ``Tr = γ_end I - (diag(d) K)ᵀ W`` (``Dk x Dk``);
* ``U = (diag(d) K)ᵀ X diag(β) V``: the chunk's writes moved to its end (``Dk x Dv``).

Across chunks the aligned block hierarchy (the layout of :mod:`kernels.states`, level ``h`` holding
``n >> h`` blocks of ``2^h`` chunks) carries states *and* transitions:
``H_{h+1}[m] = T_h[2m+1] H_h[2m] + H_h[2m+1]``, ``T_{h+1}[m] = T_h[2m+1] T_h[2m]``.  Chunk ``i``
reads it walking its set bits ``h`` from low to high with one moved query per row, starting from
``q̂ = Q̃``: ``o_t += scale λ[t, c+1+h] q̂_tᵀ H_h[(i >> h) - 1]``, then ``q̂_t <- T_h[(i >> h) - 1]ᵀ q̂_t``
(the blocks of the lower set bits are the gap between a higher block and the chunk).

Every transition is held as ``T = γ I + R``: ``γ`` (float32, float64 for float64 inputs: the
product of the block's chunk decays ``γ_end``) and the rest ``R`` (``R = -(diag(d) K)ᵀ W`` for a
chunk), which is all that is rounded when the hierarchy is held in bfloat16: the identity part,
near 1 on the diagonal of the transitions of short blocks, keeps its full precision
(docs/kernels.md §7.1).

Launches (see ``docs/kernels.md``):

1. ``_chunk_kernel``, grid ``(chunk, batch)``: ``X`` (stored), ``W`` (stored), ``Tr`` and ``U``
   (level 0 of the hierarchy); for narrow keys a pair of chunks a program, which also builds their
   parent on level 1 (:data:`CHUNK_KERNEL_PARENTS`);
2. ``_hierarchy_kernel``, one launch per :data:`HIERARCHY_LEVELS` levels, grid ``(subtree, batch)``:
   ``H`` and ``T`` of the levels above, each program a subtree read back from what it stored;
3. ``_output_kernel``, grid ``(chunk, batch, Dv-tile)`` (a pair of chunks a program for wide keys,
   :data:`OUTPUT_PAIRS`): the in-chunk part and the walk.

Every decay is the exponential of a sum of its own terms inside one chunk (no difference of
prefix sums).  ``X`` comes from doubling the inverted diagonal blocks of ``N``, ``1 x 1`` to
``C x C``, two dots a step (:func:`unit_lower_inverse`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from hodlr.fenwick.arrays import check_scale

from . import _layout, states as _states
from ._device import (causal_decay, chunk_decays, chunk_rows, dot, intra_scales, matrix_tile, next_level, read_entry,
                      rows_inside, split_dot, store_matrix_tile, validate_rows)
from ._layout import (MAX_REGISTERS, NUM_WARPS, block, cdiv, check_block, check_chunk, check_flag, chunk_count,
                      compute_types, hierarchy_sizes, interpreting, level_offsets, output_buffer)
from .attention import attention_layout

MAX_DK = 128
"""Widest key head the Gated DeltaNet kernels take (the moved queries and the ``Dk x Dk``
transitions are held whole in a program)."""

STATE_KEY_ROWS = 64
"""Key rows of a chunk's transition ``R`` and state ``U`` the forward chunk kernel forms at a time,
reloading those key columns: a ``128 x 128`` float32 tile whole asks 128 registers a thread of a
4-warp program (ptxas at ``Dk = 128``: 247 registers in one block, 166 in two; H200, chunk kernel
0.84 -> 0.75 ms at D = 128, 8K; docs/kernels.md §3).  The value tiles are loaded once a block."""


# ---------------------------------------------------------------------------------------
# device helpers shared with the backward
# ---------------------------------------------------------------------------------------
@triton.jit
def gates(g_row, t, tmask, sgt, T, C: tl.constexpr, HAS_G: tl.constexpr, ACC: tl.constexpr, EXACT: tl.constexpr):
    """``(Γ, γ, d, γ_end)`` of one chunk: ``Γ[t, s] = exp(Σ_{k=s+1..t} g_k)`` for ``s <= t`` (0
    above the diagonal and on rows past ``T``), ``γ_t = exp(Σ_{k=start..t} g_k)``,
    ``d_s = exp(Σ_{k=s+1..end} g_k)`` and ``γ_end``; without decay the causal ones and ones."""
    r = tl.arange(0, C)
    G, g_next = chunk_decays(g_row, t, tmask, sgt, T, C, HAS_G, ACC)
    Gam = causal_decay(G, g_next, tmask, C, HAS_G, EXACT)
    if HAS_G:
        gamma = tl.exp(G)
        d = tl.exp(tl.cumsum(g_next, 0, reverse=True))
        gamma_end = tl.exp(tl.sum(tl.where(r == C - 1, G, 0.0), 0))
    else:
        gamma = tl.full((C,), 1.0, dtype=ACC)
        d = gamma
        gamma_end = tl.full((), 1.0, dtype=ACC)
    return Gam, gamma, d, gamma_end


@triton.jit
def unit_lower_inverse(Lm, C: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    """``(I + Lm)⁻¹`` for a strictly lower-triangular ``(C, C)`` ``Lm`` (``C`` a power of two).

    By doubling the diagonal blocks: with ``X_b`` the inverse of ``I`` plus the ``b x b`` diagonal
    blocks of ``Lm`` and ``F_b`` the lower-left ``b x b`` blocks of its ``2b x 2b`` diagonal blocks,
    ``X_2b = X_b - X_b F_b X_b`` (``X_b F_b`` squares to 0), from ``X_1 = I`` to ``X_C``: two
    ``(C, C)`` dots a step, ``log2(C)`` steps, no step a reduction across the tile.  Each step's
    result is itself the inverse of a block-diagonal part of ``I + Lm``, so no power of ``Lm``
    (whose entries grow like binomial coefficients for correlated keys) is ever formed."""
    r = tl.arange(0, C)
    X = tl.where(r[:, None] == r[None, :], 1.0, 0.0).to(ACC)
    for s in tl.static_range(8):
        if (2 << s) <= C:
            F = tl.where(((r[:, None] >> (s + 1)) == (r[None, :] >> (s + 1))) & ((r[:, None] >> s) != (r[None, :] >> s)),
                         Lm, 0.0)
            X = X - dot(dot(X, F, ACC, PREC, False), X, ACC, PREC, False)
    return X


@triton.jit
def load_rows(ptr, b0, b1, t, tmask, sb0, sb1, st, sd, cols, D, ACC: tl.constexpr):
    """The ``(len(t), len(cols))`` tile of rows ``t`` and columns ``cols`` of batch entry
    ``(b0, b1)`` in ``ACC``, zero outside ``tmask`` and past ``D``."""
    return tl.load(ptr + b0 * sb0 + b1 * sb1 + t[:, None] * st + cols[None, :] * sd,
                   mask=tmask[:, None] & (cols[None, :] < D), other=0.0).to(ACC)


@triton.jit
def block_decay(gm_ptr, index, HAS_G: tl.constexpr, ACC: tl.constexpr):
    """``γ`` of hierarchy block ``index``, the product of its chunks' ``γ_end`` (1 without decay)."""
    if HAS_G:
        return tl.load(gm_ptr + index).to(ACC)
    else:
        return tl.full((), 1.0, dtype=ACC)


@triton.jit
def transition_tile(tr_ptr, gm_ptr, index, rows, cols, DK, HAS_G: tl.constexpr, ACC: tl.constexpr):
    """The ``(rows, cols)`` tile of block ``index``'s transition ``T = γ I + R`` in ``ACC`` (the
    hierarchy holds ``R`` in ``tr_ptr`` and ``γ`` in ``gm_ptr``)."""
    diagonal = (rows[:, None] == cols[None, :]) & (rows[:, None] < DK)
    return matrix_tile(tr_ptr, index, rows, cols, DK, DK, ACC) + tl.where(
        diagonal, block_decay(gm_ptr, index, HAS_G, ACC), 0.0)


# ---------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------
@triton.jit
def _chunk_block(k_ptr, v_ptr, b_ptr, g_ptr, x_ptr, w_ptr, h_ptr, tr_ptr, gm_ptr, i, bh, b0, b1, t, tmask,
                 T, n_chunks, n_total, GRP, DK: tl.constexpr, DV: tl.constexpr,
                 skb0, skb1, skt, skd, svb0, svb1, svt, svd, sbb0, sbb1, sbt, sgb0, sgb1, sgt,
                 C: tl.constexpr, BDK: tl.constexpr, BDV: tl.constexpr, HAS_G: tl.constexpr, ACC: tl.constexpr,
                 PREC: tl.constexpr, EXACT: tl.constexpr, NATIVE: tl.constexpr, KB: tl.constexpr):
    """Chunk ``i`` of batch entry ``bh`` (rows ``t``, ``tmask``): what :func:`_chunk_kernel` stores for it."""
    r = tl.arange(0, C)
    dk = tl.arange(0, BDK)
    Kin = load_rows(k_ptr, b0, b1 // GRP, t, tmask, skb0, skb1, skt, skd, dk, DK, k_ptr.dtype.element_ty)
    K = Kin.to(ACC)
    beta = tl.load(b_ptr + b0 * sbb0 + b1 * sbb1 + t * sbt, mask=tmask, other=0.0).to(ACC)
    Gam, gamma, d, gamma_end = gates(g_ptr + b0 * sgb0 + b1 * sgb1, t, tmask, sgt, T, C, HAS_G, ACC, EXACT)
    KK = dot(Kin, tl.trans(Kin), ACC, PREC, NATIVE)  # 16-bit inputs: exact products on the tensor cores
    Lm = tl.where(r[:, None] > r[None, :], beta[:, None] * KK * Gam, 0.0)
    X = unit_lower_inverse(Lm, C, ACC, PREC)
    row = bh * n_chunks + i
    store_matrix_tile(x_ptr, row, X, r, r, C, C)
    W = dot(X, (beta * gamma)[:, None] * K, ACC, PREC, False)
    store_matrix_tile(w_ptr, row, W, r, dk, C, DK)
    blk = bh * n_total + i
    if HAS_G:
        tl.store(gm_ptr + blk, gamma_end)
    Y = X * beta[None, :]
    for k0 in tl.static_range(0, BDK, KB):  # R and U a block of KB key rows at a time
        kr = k0 + tl.arange(0, KB)
        Kd = d[:, None] * load_rows(k_ptr, b0, b1 // GRP, t, tmask, skb0, skb1, skt, skd, kr, DK, ACC)
        store_matrix_tile(tr_ptr, blk, -dot(tl.trans(Kd), W, ACC, PREC, False), kr, dk, DK, DK)
        E = dot(tl.trans(Kd), Y, ACC, PREC, False)  # column s: β_s k_s moved to the chunk's end
        for d0 in tl.static_range(0, DV, BDV):
            dv = d0 + tl.arange(0, BDV)
            V = load_rows(v_ptr, b0, b1, t, tmask, svb0, svb1, svt, svd, dv, DV, v_ptr.dtype.element_ty)
            store_matrix_tile(h_ptr, blk, split_dot(E, V, ACC, PREC, NATIVE), kr, dv, DK, DV)


@triton.jit
def _parent_block(h_ptr, tr_ptr, gm_ptr, even, dst, with_transition, DK: tl.constexpr, DV: tl.constexpr,
                  BDK: tl.constexpr, BDV: tl.constexpr, HAS_G: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
                  NATIVE: tl.constexpr, TB: tl.constexpr, RELOAD: tl.constexpr):
    """Block ``dst`` of the level above from its children ``even``, ``even + 1``, with the
    transitions ``T = γ I + R``: ``H = T_o H_e + H_o = R_o H_e + γ_o H_e + H_o`` (value tiles of
    ``BDV``) and, where ``with_transition``, ``T = T_o T_e``: ``R = R_o R_e + γ_o R_e + γ_e R_o``
    (``TB`` of its columns at a time; ``RELOAD``: ``R_o``'s columns for the ``γ_e R_o`` term loaded
    again rather than taken from the tile held for the products, as the chunk kernel, short of
    registers, does), ``γ = γ_o γ_e``."""
    dk = tl.arange(0, BDK)
    HELD = h_ptr.dtype.element_ty  # bfloat16 tiles go to the tensor cores as they are (exact products)
    R_odd = matrix_tile(tr_ptr, even + 1, dk, dk, DK, DK, HELD)
    gamma_odd = block_decay(gm_ptr, even + 1, HAS_G, ACC)
    for d0 in tl.static_range(0, DV, BDV):
        dv = d0 + tl.arange(0, BDV)
        H_even = matrix_tile(h_ptr, even, dk, dv, DK, DV, HELD)
        H = dot(R_odd, H_even, ACC, PREC, NATIVE) + gamma_odd * H_even.to(ACC)
        store_matrix_tile(h_ptr, dst, H + matrix_tile(h_ptr, even + 1, dk, dv, DK, DV, ACC), dk, dv, DK, DV)
    if with_transition:
        gamma_even = block_decay(gm_ptr, even, HAS_G, ACC)
        for c0 in tl.static_range(0, BDK, TB):  # TB columns of R at a time
            dc = c0 + tl.arange(0, TB)
            R_even = matrix_tile(tr_ptr, even, dk, dc, DK, DK, HELD)
            if TB == BDK and not RELOAD:  # R_odd's columns: the tile loaded above
                R_odd_cols = R_odd.to(ACC)
            else:  # loaded again (from L1 / L2): a register tile cannot be sliced, and a reload holds fewer registers
                R_odd_cols = matrix_tile(tr_ptr, even + 1, dk, dc, DK, DK, ACC)
            R = dot(R_odd, R_even, ACC, PREC, NATIVE) + gamma_odd * R_even.to(ACC) + gamma_even * R_odd_cols
            store_matrix_tile(tr_ptr, dst, R, dk, dc, DK, DK)
        if HAS_G:
            tl.store(gm_ptr + dst, gamma_odd * gamma_even)


@triton.jit(do_not_specialize=["T", "B1", "n_chunks", "n_total", "GRP", "sbb0", "sbb1", "sgb0", "sgb1",
                               "parent_transitions"])
def _chunk_kernel(k_ptr, v_ptr, b_ptr, g_ptr, x_ptr, w_ptr, h_ptr, tr_ptr, gm_ptr,
                  T, B1, n_chunks, n_total, GRP, DK: tl.constexpr, DV: tl.constexpr,
                  skb0, skb1, skt, skd, svb0, svb1, svt, svd, sbb0, sbb1, sbt, sgb0, sgb1, sgt, parent_transitions,
                  C: tl.constexpr, FULL_CHUNKS: tl.constexpr,
                  BDK: tl.constexpr, BDV: tl.constexpr, HAS_G: tl.constexpr, ACC: tl.constexpr,
                  PREC: tl.constexpr, EXACT: tl.constexpr, NATIVE: tl.constexpr, KB: tl.constexpr,
                  PARENTS: tl.constexpr):
    """Program ``(chunk i, batch entry)``: ``X = N⁻¹`` and ``W`` of the chunk (stored, ``(C, C)``
    and ``(C, Dk)``), its transition ``Tr = γ_end I + R`` (``R`` and ``γ_end``) and its state ``U``
    (level 0 of the hierarchy), ``R`` and ``U`` ``KB`` key rows at a time (``STATE_KEY_ROWS``).
    With ``PARENTS`` the program is ``(pair p, batch entry)``: chunks ``2p`` and ``2p + 1``, then
    block ``p`` of level 1 from the two it has just stored (read back from L2; its transition
    where ``parent_transitions``), so the hierarchy starts from level 1."""
    G: tl.constexpr = 2 if PARENTS else 1
    p, bh, b0, b1, _, _ = chunk_rows(B1, T, G * C, False)
    for c in tl.static_range(G):
        i = G * p + c
        if (G == 1) or (i < n_chunks):  # (one chunk a program: the grid's chunks, all inside)
            t = i * C + tl.arange(0, C)
            tmask = rows_inside(t, T, C, FULL_CHUNKS)
            _chunk_block(k_ptr, v_ptr, b_ptr, g_ptr, x_ptr, w_ptr, h_ptr, tr_ptr, gm_ptr, i, bh, b0, b1, t, tmask,
                         T, n_chunks, n_total, GRP, DK, DV, skb0, skb1, skt, skd, svb0, svb1, svt, svd,
                         sbb0, sbb1, sbt, sgb0, sgb1, sgt, C, BDK, BDV, HAS_G, ACC, PREC, EXACT, NATIVE, KB)
    if PARENTS:
        if 2 * p + 1 < n_chunks:
            tl.debug_barrier()  # the parent reads what the two chunks stored
            _parent_block(h_ptr, tr_ptr, gm_ptr, bh * n_total + 2 * p, bh * n_total + n_chunks + p,
                          parent_transitions != 0, DK, DV, BDK, BDV, HAS_G, ACC, PREC, NATIVE, KB, True)


@triton.jit(do_not_specialize=["n_total", "off_child", "n_child", "n_build", "n_transitions"])
def _hierarchy_kernel(h_ptr, tr_ptr, gm_ptr, n_total, off_child, n_child, n_build, n_transitions,
                      DK: tl.constexpr, DV: tl.constexpr, BDK: tl.constexpr, BDV: tl.constexpr,
                      LEVELS: tl.constexpr, HAS_G: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
                      NATIVE: tl.constexpr):
    """Program ``(subtree m, batch entry)``: from the ``2^LEVELS`` blocks ``m 2^LEVELS, ...`` of a
    level (``n_child`` blocks at offset ``off_child``), the ``n_build <= LEVELS`` levels above it
    in its subtree, level by level with a barrier in between: a level is read back only by the
    program that wrote it (from L2), so only the first one comes from DRAM.  The transitions of
    the first ``n_transitions`` built levels are formed (those of the top level are never read)."""
    m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    off = off_child
    size = n_child
    for lv in tl.static_range(LEVELS):
        if lv < n_build:
            per_program: tl.constexpr = 1 << (LEVELS - lv - 1)  # parents of this subtree on this level
            parents = size // 2
            for p in range(per_program):
                parent = m * per_program + p
                if parent < parents:
                    _parent_block(h_ptr, tr_ptr, gm_ptr, bh * n_total + off + 2 * parent,
                                  bh * n_total + off + size + parent, lv < n_transitions, DK, DV, BDK, BDV, HAS_G,
                                  ACC, PREC, NATIVE, BDK, False)
            tl.debug_barrier()  # the next level reads what this one stored
            off += size
            size = parents


@triton.jit
def _chunk_output(q_ptr, k_ptr, v_ptr, b_ptr, l_base, g_ptr, x_ptr, w_ptr, i, bh, b0, b1, n_chunks, T, L, DK, DV, GRP,
                  sqb0, sqb1, sqt, sqd, skb0, skb1, skt, skd, svb0, svb1, svt, svd, sbb0, sbb1, sbt, slt, sll,
                  sgb0, sgb1, sgt, dk, dv, C: tl.constexpr, FULL_CHUNKS: tl.constexpr, HAS_G: tl.constexpr,
                  ACC: tl.constexpr, PREC: tl.constexpr, EXACT: tl.constexpr, NATIVE: tl.constexpr):
    """``(acc, q̃)`` of chunk ``i``: its in-chunk output ``(P ⊙ Λ) V`` (unscaled, ``(C, BDV)``) and its
    queries moved to its start, ``Q̃ = diag(γ) Q - Sq W`` (``(C, BDK)``); rows past ``T`` zero (a
    chunk at or past ``n_chunks`` reads the last chunk's ``X`` and ``W``, and masks every row)."""
    r = tl.arange(0, C)
    t = i * C + r
    tmask = rows_inside(t, T, C, FULL_CHUNKS)
    Qin = load_rows(q_ptr, b0, b1 // GRP, t, tmask, sqb0, sqb1, sqt, sqd, dk, DK, q_ptr.dtype.element_ty)
    Kin = load_rows(k_ptr, b0, b1 // GRP, t, tmask, skb0, skb1, skt, skd, dk, DK, k_ptr.dtype.element_ty)
    beta = tl.load(b_ptr + b0 * sbb0 + b1 * sbb1 + t * sbt, mask=tmask, other=0.0).to(ACC)
    Gam, gamma, d, gamma_end = gates(g_ptr + b0 * sgb0 + b1 * sgb1, t, tmask, sgt, T, C, HAS_G, ACC, EXACT)
    Sq = dot(Qin, tl.trans(Kin), ACC, PREC, NATIVE) * Gam  # 16-bit inputs: exact products on the tensor cores
    row = bh * n_chunks + tl.minimum(i, n_chunks - 1)
    P = dot(Sq, matrix_tile(x_ptr, row, r, r, C, C, ACC), ACC, PREC, False) * beta[None, :]
    Lam = intra_scales(l_base + (i * C).to(tl.int64) * slt, slt, sll, L, tmask, C).to(ACC)
    # 16-bit values and hierarchy tiles enter the dots in their own dtype: a widened 16-bit value is
    # a fixed point of round_tf32, so they skip it (H200, D = 64, 2K: output kernel 0.97 ms against
    # 1.29 with float32 reads, docs/kernels.md §7.4)
    V = load_rows(v_ptr, b0, b1, t, tmask, svb0, svb1, svt, svd, dv, DV, v_ptr.dtype.element_ty)
    acc = split_dot(P * Lam, V, ACC, PREC, NATIVE)
    qh = gamma[:, None] * Qin.to(ACC) - dot(Sq, matrix_tile(w_ptr, row, r, dk, C, DK, ACC), ACC, PREC, False)
    return acc, qh


@triton.jit
def _stacked(top, bottom, C: tl.constexpr, D: tl.constexpr):
    """The ``(2C, D)`` tile of ``top`` over ``bottom`` (two ``(C, D)`` tiles)."""
    return tl.reshape(tl.permute(tl.join(top, bottom), (2, 0, 1)), (2 * C, D))


@triton.jit(do_not_specialize=["T", "B1", "n_chunks", "n_total", "n_bits", "L", "GRP", "slb0", "slb1", "slt",
                               "sbb0", "sbb1", "sgb0", "sgb1", "n_far", "cross_row", "cross_level"])
def _output_kernel(q_ptr, k_ptr, v_ptr, b_ptr, l_ptr, g_ptr, x_ptr, w_ptr, h_ptr, tr_ptr, gm_ptr, o_ptr, flag_ptr,
                   far_ptr, far_lev_ptr, n_far, cross_row, cross_level,
                   T, B1, n_chunks, n_total, n_bits, L, DK: tl.constexpr, DV: tl.constexpr, scale, GRP,
                   sqb0, sqb1, sqt, sqd, skb0, skb1, skt, skd, svb0, svb1, svt, svd, sbb0, sbb1, sbt,
                   slb0, slb1, slt, sll, sgb0, sgb1, sgt, sob0, sob1, sot, sod,
                   C: tl.constexpr, LOG_C: tl.constexpr, FULL_CHUNKS: tl.constexpr,
                   BDK: tl.constexpr, BDV: tl.constexpr, HAS_G: tl.constexpr,
                   ACC: tl.constexpr, PREC: tl.constexpr, EXACT: tl.constexpr, NATIVE: tl.constexpr,
                   BL: tl.constexpr, CARRIED: tl.constexpr, PAIR: tl.constexpr):
    """Program ``(chunk i, batch entry, Dv-tile)``, or with ``PAIR`` ``(chunks 2i and 2i + 1, ...)``:
    ``(P ⊙ Λ) V`` inside each chunk, then the walk over the set bits of the chunk index with the moved
    queries ``q̂``.  A pair's odd chunk reads its even one at level 0 and moves its queries across it,
    and from level 1 up, where the two chunk indices have the same bits, the pair walks as one tile
    of ``2C`` rows (each block's tiles loaded once for both; ``FULL_CHUNKS``: ``T`` a multiple of the
    program's rows).  With a ``flag_ptr`` (not None) the program also validates the level scales and
    log-decays its rows read (:func:`validate_rows`).  ``CARRIED``: the walk also moves ``q̂`` across
    its last block, to the start of the call, where it reads the ``n_far`` carried states ``far_ptr``
    (``(batch, n_far, Dk, Dv)``, of levels ``far_lev_ptr``), each at its level, or at ``cross_level``
    if higher, for the rows from ``cross_row`` on (:class:`Carried`)."""
    G: tl.constexpr = 2 if PAIR else 1
    p, bh, b0, b1, t, tmask = chunk_rows(B1, T, G * C, FULL_CHUNKS)  # the program's rows, all its chunks'
    i = p * G  # the program's first chunk
    # the mask's validation (with a flag), before the products need the registers
    validate_rows(flag_ptr, l_ptr + b0 * slb0 + b1 * slb1, slt, sll, L, g_ptr + b0 * sgb0 + b1 * sgb1, sgt, t, tmask,
                  BL, HAS_G)
    dk = tl.arange(0, BDK)
    dv = tl.program_id(2) * BDV + tl.arange(0, BDV)
    l_base = l_ptr + b0 * slb0 + b1 * slb1
    HELD = h_ptr.dtype.element_ty
    acc, qh = _chunk_output(q_ptr, k_ptr, v_ptr, b_ptr, l_base, g_ptr, x_ptr, w_ptr, i, bh, b0, b1, n_chunks, T, L,
                            DK, DV, GRP, sqb0, sqb1, sqt, sqd, skb0, skb1, skt, skd, svb0, svb1, svt, svd,
                            sbb0, sbb1, sbt, slt, sll, sgb0, sgb1, sgt, dk, dv, C, FULL_CHUNKS, HAS_G, ACC, PREC, EXACT,
                            NATIVE)
    off = 0
    h = 0
    if PAIR:  # the odd chunk: its level-0 block (the even chunk), then both chunks as one tile
        acc_odd, qh_odd = _chunk_output(q_ptr, k_ptr, v_ptr, b_ptr, l_base, g_ptr, x_ptr, w_ptr, i + 1, bh, b0, b1,
                                        n_chunks, T, L, DK, DV, GRP, sqb0, sqb1, sqt, sqd, skb0, skb1, skt, skd,
                                        svb0, svb1, svt, svd, sbb0, sbb1, sbt, slt, sll, sgb0, sgb1, sgt, dk, dv, C,
                                        FULL_CHUNKS, HAS_G, ACC, PREC, EXACT, NATIVE)
        t_odd = (i + 1) * C + tl.arange(0, C)
        blk = read_entry(bh * n_total, i + 1, 0, 0, False)
        lam_odd = tl.load(l_base + t_odd.to(tl.int64) * slt + (LOG_C + 1) * sll, mask=t_odd < T, other=0.0).to(ACC)
        acc_odd = split_dot(lam_odd[:, None] * qh_odd, matrix_tile(h_ptr, blk, dk, dv, DK, DV, HELD), ACC, PREC, NATIVE,
                            acc_odd)
        if CARRIED or i != 0:  # something earlier is read after this block: move across it
            qh_odd = split_dot(qh_odd, matrix_tile(tr_ptr, blk, dk, dk, DK, DK, HELD), ACC, PREC, NATIVE,
                               block_decay(gm_ptr, blk, HAS_G, ACC) * qh_odd)
        acc = _stacked(acc, acc_odd, C, BDV)
        qh = _stacked(qh, qh_odd, C, BDK)
        off = next_level(off, h, n_chunks, 0, False)
        h = 1
    while h < n_bits:  # a while loop: the interpreter cannot range() over a computed bound
        if ((i >> h) & 1) == 1:
            blk = read_entry(bh * n_total + off, i, h, 0, False)
            lam = tl.load(l_base + t.to(tl.int64) * slt + (LOG_C + 1 + h) * sll, mask=tmask, other=0.0).to(ACC)
            acc = split_dot(lam[:, None] * qh, matrix_tile(h_ptr, blk, dk, dv, DK, DV, HELD), ACC, PREC, NATIVE, acc)
            if CARRIED or (i >> (h + 1)) != 0:  # something earlier is read after this block: move across it
                qh = split_dot(qh, matrix_tile(tr_ptr, blk, dk, dk, DK, DK, HELD), ACC, PREC, NATIVE,
                               block_decay(gm_ptr, blk, HAS_G, ACC) * qh)
        off = next_level(off, h, n_chunks, 0, False)
        h += 1
    if CARRIED:  # q̂ at the call's start: the carried states before it
        j = 0
        while j < n_far:
            lev = tl.load(far_lev_ptr + j)
            lev = tl.where(t >= cross_row, tl.maximum(lev, cross_level), lev)
            lam = tl.load(l_base + t.to(tl.int64) * slt + lev * sll, mask=tmask, other=0.0).to(ACC)
            acc = split_dot(lam[:, None] * qh, matrix_tile(far_ptr, bh * n_far + j, dk, dv, DK, DV, ACC), ACC, PREC,
                            NATIVE, acc)
            j += 1
    tl.store(o_ptr + b0 * sob0 + b1 * sob1 + t[:, None] * sot + dv[None, :] * sod, acc * scale,
             mask=tmask[:, None] & (dv[None, :] < DV))


# ---------------------------------------------------------------------------------------
# host side
# ---------------------------------------------------------------------------------------
class Chunks(NamedTuple):
    """What the chunk kernel and the hierarchy leave for the output kernel and the backward:
    ``X (B, n, C, C)``, ``W (B, n, C, Dk)``, and the hierarchy ``states (B, N, Dk*Dv)``, and its
    transitions ``T = γ I + R`` as ``trans (B, N, Dk*Dk)`` holding ``R`` and ``decays (B, N)``
    holding ``γ`` (None without decay: ``γ = 1``), level ``h`` at offset ``Σ_{h'<h} n >> h'``;
    in the accumulator dtype (states and ``R`` in bfloat16 for bfloat16 inputs, see
    :data:`BF16_HIERARCHY`); ``C`` and the chunk count ``n``."""

    X: torch.Tensor
    W: torch.Tensor
    states: torch.Tensor
    trans: torch.Tensor
    decays: torch.Tensor | None
    C: int
    n: int

    def decay_pointer(self):
        """``decays``, or (without decay, never read) ``trans`` for the kernels' pointer."""
        return self.trans if self.decays is None else self.decays


class Carried(NamedTuple):
    """What a call that continues from bucket states adds to the forward (laid out by
    ``hodlr.backends.triton.gated_delta_with_state``, which places the call so that these are all
    it needs):

    * ``level0_index (n0,)`` int64 and ``level0_states (batch, n0, Dk, Dv)``: added to the chunk
      states of level 0 (chunks ``level0_index``) before the hierarchy is built (carried buckets
      that are whole chunks of the launch's front padding, as their last chunk's state, and the
      in-chunk ones moved to their chunk's end);
    * ``far_states (batch, n_far, Dk, Dv)`` and ``far_levels (n_far,)`` int32: the carried buckets
      before the launch's first row, read by every row with its queries moved to that row, each at
      its level, or at ``cross_level`` if higher for the rows from ``cross_row`` on.

    States in the accumulator dtype; ``batch`` the call's broadcast batch shape."""

    level0_index: torch.Tensor
    level0_states: torch.Tensor
    far_states: torch.Tensor
    far_levels: torch.Tensor
    cross_row: int
    cross_level: int


def gated_delta_layout(q, k, v, beta, level_scales, log_decay, *, do=None, out=None):
    """:func:`kernels.attention.attention_layout` with ``beta (*batch, T)`` (the layout's
    ``(*batch, T, 1)`` tensor ``"beta"``), a cotangent ``do`` and output buffers ``out`` as there;
    ``Dk <= MAX_DK``."""
    if beta is None:
        raise TypeError("beta must be a torch.Tensor of shape (*batch, T), got None")
    layout = attention_layout(q, k, v, level_scales, log_decay, beta=beta, do=do, out=out)
    if layout.DK > MAX_DK:
        raise ValueError(f"the Gated DeltaNet kernels take Dk <= {MAX_DK}, got Dk={layout.DK} "
                         f"(use the 'chunked' backend for wider keys)")
    return layout


OUTPUT_VALUE_TILE = 128
"""Widest value tile of the forward's output kernel: every program moves its chunk's queries
across the blocks it reads, so a head of up to 128 value columns is one program, whose queries
are moved once (H200, D = 128, T = 8K, bf16, whole forward: 6.67 ms against 7.81 ms with tiles of 64;
``docs/kernels.md`` §7.4)."""


OUTPUT_PAIRS = {True: False, False: True}
"""Whether an output-kernel program takes two chunks (``{Dk <= 64: ..., Dk > 64: ...}``): each
chunk's in-chunk products apart, then the pair's odd chunk reads the even one at level 0, and from
level 1 up the two walk as one tile of ``2C`` rows, each block's state and transition loaded once
for both (H100, bf16, D = 128, B·T = 65,536: output kernel 1.040 / 1.268 / 1.398 / 1.634 ->
0.979 / 1.109 / 1.189 / 1.310 ms at 2K / 8K / 16K / 64K, the same outputs bit for bit; at D = 64
slower, 0.676 -> 0.954 ms at 2K on 4 warps; docs/kernels.md §3)."""


CHUNK_KERNEL_PARENTS = {True: True, False: False}
"""Whether the chunk kernel also builds level 1 of the hierarchy (``{Dk <= 64: ..., Dk > 64: ...}``):
a program takes a pair of chunks and forms their parent from the tiles it has just stored, read back
from L2 instead of from DRAM by the hierarchy's first launch (not for calls that add carried states
to level 0).  H100, bf16, B·T = 65,536, public forward: D = 64 1.934 -> 1.854 ms at 2K and 2.259 ->
2.222 at 64K (chunk kernel 0.74 -> 0.92, hierarchy 0.50 -> 0.24), the outputs equal bit for bit; at
D = 128 slower, 3.07 -> 4.22 ms at 2K (chunk kernel 0.80 -> 2.72); docs/kernels.md §3."""


BF16_HIERARCHY = True
"""bfloat16 calls hold the hierarchy (the states and the transitions' rests ``R``; the ``γ`` stay
float32) in bfloat16: its products take bfloat16 operands on the tensor cores (exact products,
float32 sums), each result rounded once when stored; False: float32 (``docs/kernels.md`` §3 has
both measured)."""


HIERARCHY_LEVELS = 2
"""Levels of the hierarchy one launch builds for key heads of up to 64 columns: each program owns a
subtree of ``2**HIERARCHY_LEVELS`` blocks of its base level and reads the levels it builds back
from L2 (H200, bf16, D = 64: hierarchy 0.46 -> 0.36 ms at 2K against one level a launch in
separate programs for the states and the transitions; 2 levels beat 3 and 4, ``docs/kernels.md`` §3)."""

HIERARCHY_LEVELS_WIDE = 1
""":data:`HIERARCHY_LEVELS` for wider key heads: one level a launch, each program a whole block
(its states and its transition; H200, bf16, D = 128, 8K: hierarchy 1.00 ms, 1.21 with 2 levels a
launch, 1.25 with states and transitions in separate programs)."""


def tiles(layout, widest: int = 64):
    """``(BDK, BDV, Dv tiles)`` of a call: the whole key width, value tiles of at most ``widest``
    columns (64 for the chunk and hierarchy kernels and the backward's chunk and reverse-hierarchy
    kernels; the output and reader kernels take up to 128)."""
    BDK, BDV = block(layout.DK, MAX_DK), block(layout.DV, widest)
    return BDK, BDV, cdiv(layout.DV, BDV)


def chunk_shapes(B: int, T: int, DK: int, DV: int, dtype, has_decay: bool, C: int) -> dict:
    """``{name: (shape, dtype)}`` of the :class:`Chunks` tensors of a call over ``B`` batch entries of
    length ``T``, ``Dk x Dv`` heads and inputs of ``dtype`` at chunk ``C`` (``decays`` only with a
    log-decay): what :func:`chunk_hierarchy` allocates, and what the backward accepts in their place.
    ``X``, ``W`` and the decays in the accumulator dtype (float32, float64 for float64), the hierarchy
    in bfloat16 for bfloat16 inputs (:data:`BF16_HIERARCHY`).  The hierarchy's entries are those of
    :func:`kernels.states.shapes` (a bound linear in ``n``; the kernels take the rows as the batch
    stride)."""
    work = torch.float64 if dtype == torch.float64 else torch.float32
    held = torch.bfloat16 if dtype == torch.bfloat16 and BF16_HIERARCHY else work
    n = chunk_count(T, C)
    (state_shape, decay_shape), (trans_shape, _) = _states.shapes(B, n, DK * DV), _states.shapes(B, n, DK * DK)
    shapes = {"X": ((B, n, C, C), work), "W": ((B, n, C, DK), work), "states": (state_shape, held),
              "trans": (trans_shape, held)}
    if has_decay:
        shapes["decays"] = (decay_shape, work)
    return shapes


def chunk_hierarchy(layout, C: int, carried=None) -> Chunks:
    """Launches 1 and 2 (see the module docstring) for the call ``layout`` with chunk size ``C``;
    shared by the forward and the backward (which recomputes them).  With ``carried``
    (:class:`Carried`) its level-0 states are added before the hierarchy is built, and the
    transitions of every level are formed (the walk then crosses every block it reads)."""
    v = layout.tensors["v"]
    acc, prec, exact = compute_types(v.dtype)
    DK, DV, B = layout.DK, layout.DV, layout.B
    levels = HIERARCHY_LEVELS if DK <= 64 else HIERARCHY_LEVELS_WIDE
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 1:
        raise ValueError(f"HIERARCHY_LEVELS{'' if DK <= 64 else '_WIDE'} must be an int >= 1 (levels one launch "
                         f"of the hierarchy builds), got {levels!r}")
    n = chunk_count(layout.T, C)
    sizes, offsets = hierarchy_sizes(n), level_offsets(n)
    shapes = chunk_shapes(B, layout.T, DK, DV, v.dtype, layout.tensors["g"] is not None, C)
    made = {name: _layout.scratch(shape, dtype, v.device) for name, (shape, dtype) in shapes.items()}
    N = made["states"].shape[1]  # the rows a batch entry (the kernels' batch stride)
    ch = Chunks(made["X"], made["W"], made["states"], made["trans"], made.get("decays"), C, n)
    X, W, states, trans = ch.X, ch.W, ch.states, ch.trans
    has_g = ch.decays is not None
    BDK, BDV, _ = tiles(layout)
    top = len(sizes) - 1
    # level 1 built by the chunk kernel, unless carried states are added to level 0 after it
    parents = CHUNK_KERNEL_PARENTS[DK <= 64] and top >= 1 and (carried is None or not carried.level0_index.numel())
    _chunk_kernel[(cdiv(n, 2) if parents else n, B)](
        layout.tensors["k"], v, layout.tensors["beta"], layout.decay_args()[0], X, W, states, trans,
        ch.decay_pointer(),
        layout.T, layout.B1, n, N, layout.group, DK, DV, *layout.args("k")[1:], *layout.args("v")[1:],
        *layout.args("beta")[1:4], *layout.decay_args()[1:], int(carried is not None or top > 1),
        C=C, FULL_CHUNKS=layout.T % C == 0, BDK=BDK, BDV=BDV, HAS_G=has_g, ACC=acc, PREC=prec, EXACT=exact,
        NATIVE=not interpreting(), PARENTS=parents,
        KB=min(BDK, STATE_KEY_ROWS), num_warps=NUM_WARPS["gated_delta"],
        # capped where measured: 64-wide key tiles (narrower ones use more registers, 143 at Dk = 32,
        # and would spill under the cap; ptxas of Triton 3.6)
        **({"maxnreg": MAX_REGISTERS["gated_delta"]} if BDK == 64 and v.dtype in (torch.float16, torch.bfloat16)
           else {}))
    if carried is not None and carried.level0_index.numel():
        rows = carried.level0_index.to(states.device)
        add = carried.level0_states.reshape(B, -1, DK * DV).to(states.dtype)
        states.index_add_(1, rows, add)
    h = 1 if parents else 0
    while h < top:  # top-level transitions only with carried states: no other query crosses a top-level block
        build = min(levels, top - h)
        _hierarchy_kernel[(cdiv(sizes[h], 1 << levels), B)](
            states, trans, ch.decay_pointer(), N, offsets[h], sizes[h], build,
            top - h if carried is not None else top - 1 - h, DK, DV, BDK=BDK,
            BDV=BDV, LEVELS=levels, HAS_G=has_g, ACC=acc, PREC=prec, NATIVE=not interpreting(),
            num_warps=NUM_WARPS["gated_delta_hierarchy"])
        h += build
    return ch


def gated_delta_forward(q, k, v, beta, level_scales, log_decay=None, scale: float = 1.0, *, chunk=None,
                        out=None, check=None, return_chunks: bool = False, carried=None):
    """Log-linear Gated DeltaNet forward on the GPU (or the Triton interpreter).

    Parameters
    ----------
    q, k : torch.Tensor, shape ``(*batch, T, Dk)``, ``Dk <= MAX_DK``
    v : torch.Tensor, shape ``(*batch, T, Dv)``
    beta : torch.Tensor, shape ``(*batch, T)``
    level_scales : torch.Tensor, shape ``(*batch, T, L)``, ``L >= fenwick.num_levels(T)``
    log_decay : torch.Tensor, shape ``(*batch, T)``, optional
        Leading dims broadcast (read through stride-0 views, never copied); any strides.
        float16 / bfloat16 / float32 on CUDA (float64 too under ``TRITON_INTERPRET=1``); every
        intermediate (``X``, ``W``, the hierarchy, the moved queries) in float32 (float64 for
        float64), except the hierarchy of bfloat16 calls, held in bfloat16 (:data:`BF16_HIERARCHY`).
    scale : float, default 1.0
        Multiplies ``P`` (no ``Dk ** -0.5`` here, unlike ``hodlr.gated_delta_attention``).
    chunk : int, optional
        Chunk size ``C``, a power of two in ``[16, 256]`` (default ``DEFAULT_CHUNK["gated_delta"]``).
    out : torch.Tensor, optional
        Contiguous ``(*batch, T, Dv)`` output buffer with ``v``'s dtype.
    check : torch.Tensor, optional
        A one-element int32 tensor holding 0 on the inputs' device: the output kernel sets it to 1
        if a level scale that is read or a log-decay is NaN or infinite (as
        :func:`hodlr.kernels.attention_forward`'s ``check``).
    return_chunks : bool
        Also return the :class:`Chunks` (``X``, ``W`` and the hierarchy) that
        :func:`hodlr.kernels.gated_delta_backward` takes (``chunks=``) instead of
        recomputing them, at the same chunk (so only for ``chunk <= MAX_BACKWARD_CHUNK``).
    carried : Carried, optional
        The carried bucket states of a call that continues from a state (laid out by
        ``hodlr.backends.triton.gated_delta_with_state``; no backward).

    Returns
    -------
    torch.Tensor ``(*batch, T, Dv)``, or ``(output, Chunks)`` with ``return_chunks``.
    """
    if not isinstance(return_chunks, bool):
        raise TypeError(f"return_chunks must be a bool, got {type(return_chunks).__name__}")
    scale = check_scale(scale)
    layout = gated_delta_layout(q, k, v, beta, level_scales, log_decay)
    C = check_chunk(chunk, "gated_delta")
    check_flag(check, q.device)
    T, DK, DV = layout.T, layout.DK, layout.DV
    v = layout.tensors["v"]
    acc, prec, exact = compute_types(v.dtype)
    out = output_buffer(out, layout.batch + (T, DV), v, {"q": q, "k": k, "v": v, "beta": beta,
                                                         "level_scales": level_scales, "log_decay": log_decay})
    o_flat = out.reshape((layout.B0, layout.B1, T, DV))
    ch = chunk_hierarchy(layout, C, carried)
    BDK, BDV, n_dv = tiles(layout, OUTPUT_VALUE_TILE)
    far_read = carried is not None and carried.far_levels.numel() > 0
    if not far_read:
        far = (ch.X, ch.X, 0, 1 << 62, 0)  # never read nor compiled (no empty tensor is handed to a launch)
    else:
        far = (carried.far_states.reshape(layout.B, -1, DK, DV).to(ch.X.dtype).contiguous(),
               carried.far_levels.to(device=v.device, dtype=torch.int32), carried.far_levels.numel(),
               carried.cross_row, carried.cross_level)
    pair = OUTPUT_PAIRS[DK <= 64]
    _output_kernel[(cdiv(ch.n, 2 if pair else 1), layout.B, n_dv)](
        layout.tensors["q"], layout.tensors["k"], v, layout.tensors["beta"], layout.tensors["l"],
        layout.decay_args()[0], ch.X, ch.W, ch.states, ch.trans, ch.decay_pointer(), o_flat, check, *far,
        T, layout.B1, ch.n, ch.states.shape[1], (ch.n - 1).bit_length(), layout.L, DK, DV, scale, layout.group,
        *layout.args("q")[1:], *layout.args("k")[1:], *layout.args("v")[1:], *layout.args("beta")[1:4],
        *layout.args("l")[1:], *layout.decay_args()[1:], *o_flat.stride(),
        C=C, LOG_C=C.bit_length() - 1, FULL_CHUNKS=T % ((2 if pair else 1) * C) == 0, BDK=BDK, BDV=BDV,
        HAS_G=layout.tensors["g"] is not None, ACC=acc, PREC=prec, EXACT=exact, NATIVE=not interpreting(),
        BL=check_block(T, check), CARRIED=far_read, PAIR=pair,
        num_warps=NUM_WARPS["gated_delta_output" if DK <= 64 else "gated_delta_output_wide"])
    return (out, ch) if return_chunks else out
