"""Triton backward of chunked log-linear Gated DeltaNet (the forward: :mod:`kernels.gated_delta`).

Reverse mode through the forward's three stages, for a cotangent ``dO``:

1. :func:`kernels.gated_delta.chunk_hierarchy` recomputes ``X``, ``W`` and the hierarchy ``H``, ``T``
   (``T = γ I + R`` held as ``γ`` and ``R``; the reader reads whole transitions, ``transition_tile``,
   and so does the reverse hierarchy up to ``SPLIT_REVERSE_HIERARCHY_ABOVE``, beyond it multiplying
   by ``R`` and adding the ``γ`` part),
   unless the forward's are handed over (``chunks=``, what :func:`kernels.gated_delta` keeps).
2. ``_reader_kernel`` (one program per group of ``READER_GROUP`` chunks) differentiates the walk.
   With the set bits ``h_1 < ... < h_m`` of chunk ``i``, ``q_0 = Q̃`` and ``q_k = q_{k-1} T_{h_k}``,
   the reads are ``scale λ_{h_k} ⊙ q_{k-1} H_{h_k}``; level by level from the top down it writes
   ``dλ[t, c+1+h] = scale q_{k-1,t} · (dO H_hᵀ)_t``, forms the shares ``scale (λ_h ⊙ q_{k-1})ᵀ dO``
   of ``dH_h`` and ``q_{k-1}ᵀ dq_k`` of ``dT_h`` of the block it reads (summed over the group's
   chunks that read it, then added once: stored where the group holds every reader of the block,
   atomically otherwise), and carries ``dq_{k-1} = dq_k T_{h_k}ᵀ + scale λ_{h_k} ⊙ dO H_{h_k}ᵀ``
   down to ``dQ̃ = dq_0``.  ``q_{k-1}`` is recomputed at each set bit, nothing of size ``T log T``
   is stored: below the group's level ``Q̃`` moved across every set bit below the level, from the
   group's level up ``P`` (the chunk's ``Q̃`` moved across its set bits below the group's level,
   once) moved across the set bits from the group's level to the level.
3. ``_reverse_hierarchy_kernel`` (one launch per level, top down) is the adjoint of
   ``H_{h+1}[m] = T_h[2m+1] H_h[2m] + H_h[2m+1]``, ``T_{h+1}[m] = T_h[2m+1] T_h[2m]``: it moves
   ``dH``, ``dT`` of every block to its two halves, down to the chunks (level 0: ``dU``, ``dTr``).
   An odd block's ``dH`` is its parent's (odd blocks have no readers), so it is not stored: its
   readers read the lowest even (or top-level) ancestor's, ``_dh_entry``.
4. ``_chunk_kernel`` (one program per chunk) differentiates everything inside the chunk: the
   in-chunk output ``scale (P ⊙ Λ) V`` (``dλ`` of levels ``0..c``), ``Q̃``, ``Tr`` and ``U`` through
   ``X = N⁻¹`` (``dN = -Xᵀ dX Xᵀ``) back to ``q, k, v, β`` and the chunk-local cumulative
   log-decay, to ``dg`` (every decay of the forward is a sum of ``g`` inside one chunk, so no sum
   runs along the sequence; each term of ``dg_u`` is added once, never as a difference of sums).

The derivation, term by term, is in ``docs/kernels.md`` (the Gated DeltaNet section).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hodlr.fenwick.arrays import check_scale

from . import _layout
from ._device import (chunk_rows, dot, intra_scales, level_size, level_start, level_sums, matrix_tile, next_level,
                      read_entry, split_dot, store_matrix_tile)
from ._layout import (MAX_REGISTERS, NUM_WARPS, block, cdiv, check_chunk, compute_types, hierarchy_sizes, interpreting,
                      level_offsets, next_power_of_2)
from .gated_delta import (Chunks, block_decay, chunk_hierarchy, chunk_shapes, gated_delta_layout, gates, load_rows,
                          tiles, transition_tile)


READER_GROUP = 8
"""Chunks per program of the reader kernel, a power of two (groups aligned to it hold every
reader of a block of the levels below ``log2(READER_GROUP)``): the chunks of a group that read
one block add their ``dH``, ``dT`` shares to it once (H200: ``docs/kernels.md`` §3)."""

READER_VALUE_TILE = 128
"""Widest value tile of the reader kernel: one tile keeps a group's ``dH`` share in registers;
wider value heads add each chunk's share atomically, tile by tile."""

SIDE_LAUNCHES = {"gated_delta_backward": 1, "gated_delta_backward_wide": 2}
"""Launches of the backward chunk kernel for keys up to 64 wide and wider: 1, or 2 (everything up
to the adjoint of the solve, then that adjoint, handing over float32 tiles).  Two launches cut
the wide kernel's spills (ptxas: 696 + 72 bytes against 1,700) and its time by a tenth on the
H200; at ``Dk = 64`` one launch spills 372 bytes and is the faster (docs/kernels.md §3)."""

SPLIT_READER_SHARE_UP_TO = 64
"""Keys up to this wide, bfloat16 inputs: the reader adds each chunk's ``dH`` share ``(λ q̃)ᵀ dO``
through ``split_dot`` (the float32 moved queries as two bfloat16 parts against the bfloat16
``dO``); wider keys, and other dtypes, as one dot of the widened operands (H200: reader 3.67 ->
3.43 ms at D = 64, 2K, 7.10 -> 6.72 at 64K, but 9.23 -> 10.52 at D = 128, 8K; docs/kernels.md
§7.4)."""

SPLIT_REVERSE_HIERARCHY_ABOVE = 64
"""Keys wider than this: the reverse hierarchy multiplies the bfloat16 hierarchy's tiles as they are
held, beside the float32 gradients through ``split_dot`` (two bfloat16 dots), and adds each
transition's ``γ I`` part apart; up to it, by the widened tiles in tf32, the transitions whole
(H200: reverse hierarchy 5.21 -> 4.50 ms at D = 128, 8K, but 1.42 -> 1.65 at D = 64, 2K;
docs/kernels.md §7.4)."""

SPLIT_VALUE_SIDE_ABOVE = 64
"""Keys wider than this, bfloat16 inputs: the backward chunk kernel multiplies ``V`` and ``dO`` as
they are (``dO Vᵀ`` a bfloat16 dot, ``dU Vᵀ`` and ``(P ⊙ Λ)ᵀ dO`` through ``split_dot``); up to it,
and for other dtypes, widened to float32 (tf32 dots for float16) (H200: chunk kernels 6.67 ->
6.32 ms at D = 128, 8K, but 4.01 -> 4.12 at D = 64, 2K; the gradients' bf16 errors lower at both;
docs/kernels.md §7.4)."""

MAX_BACKWARD_CHUNK = 32
"""Largest chunk of the backward: its chunk kernel holds every ``(C, C)`` and ``(C, Dk)`` tile of
a chunk's gradients at once, and at ``C = 64`` asks more shared memory than the H200's 227 KiB
(bfloat16: 248 KiB at ``Dk = Dv = 64``, 464 KiB at 128).  The gradients do not
depend on the chunk, so :func:`kernels.gated_delta` differentiates a forward of any chunk with a
backward of at most this one."""


@triton.jit
def _add_block(ptr, index, value, rows, cols, R, S, OWNED):
    """Add ``value`` to the ``R x S`` matrix ``index`` of a stack: stored where this program holds
    the block's whole sum (``OWNED``: the block was not zeroed), an atomic add otherwise."""
    if OWNED:
        store_matrix_tile(ptr, index, value, rows, cols, R, S)
    else:
        tl.atomic_add(ptr + index * (R * S) + rows[:, None] * S + cols[None, :], value,
                      mask=(rows[:, None] < R) & (cols[None, :] < S), sem="relaxed")


@triton.jit
def _add_shares(dh_ptr, dt_ptr, blk, acc_h, acc_t, moved, owned, dk, DK, DV, BDV: tl.constexpr,
                ONE_TILE: tl.constexpr):
    """Add a group's summed shares to block ``blk``: ``dH`` (held whole only for one value tile:
    wider heads add theirs chunk by chunk) and, where a chunk carried a gradient across the block
    (``moved``), ``dT``; an ``owned`` block gets both stored, ``dT = 0`` where none moved."""
    if ONE_TILE:
        _add_block(dh_ptr, blk, acc_h, dk, tl.arange(0, BDV), DK, DV, owned)
    if moved == 1 or owned:
        _add_block(dt_ptr, blk, acc_t, dk, dk, DK, DK, owned)


@triton.jit
def _dh_share(lq, dO, SPLIT: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr, NATIVE: tl.constexpr, acc=None):
    """A chunk's share ``(scale λ ⊙ q̃)ᵀ dO`` of ``dH`` (``+ acc``): through :func:`split_dot` with
    ``SPLIT`` (``SPLIT_READER_SHARE_UP_TO``), a :func:`dot` otherwise."""
    if SPLIT:
        return split_dot(lq, dO, ACC, PREC, NATIVE, acc)
    else:
        return dot(lq, dO, ACC, PREC, NATIVE, acc)


@triton.jit
def _moved_between(x, i, BOTTOM: tl.constexpr, top, tr_ptr, gm_ptr, base, n_chunks, dk, DK, HAS_G: tl.constexpr,
                   ACC: tl.constexpr, PREC: tl.constexpr):
    """The rows ``x`` of chunk ``i`` moved across the blocks it reads from level ``BOTTOM`` below
    level ``top``: times the transition of block ``(i >> h) - 1`` of level ``h`` for each set bit
    ``BOTTOM <= h < top``, low to high (``base``: the batch entry's first block)."""
    h = BOTTOM
    off = level_start(n_chunks, BOTTOM)
    while h < top:
        if ((i >> h) & 1) == 1:
            x = tl.dot(x, transition_tile(tr_ptr, gm_ptr, read_entry(base + off, i, h, 0, False), dk, dk, DK, HAS_G,
                                          ACC), input_precision=PREC, out_dtype=ACC)
        off = next_level(off, h, n_chunks, 0, False)
        h += 1
    return x


@triton.jit(do_not_specialize=["T", "B1", "n_chunks", "n_total", "n_bits", "L", "slb0", "slb1", "slt", "sgb0",
                               "sgb1", "sdlb0", "sdlb1", "sdlt", "GRP"])
def _reader_kernel(q_ptr, k_ptr, do_ptr, l_ptr, g_ptr, w_ptr, h_ptr, tr_ptr, gm_ptr, dh_ptr, dt_ptr, qt_ptr,
                   pt_ptr, dqt_ptr, dl_ptr, T, B1, n_chunks, n_total, n_bits, L, DK: tl.constexpr,
                   DV: tl.constexpr, scale, GRP,
                   sqb0, sqb1, sqt, sqd, skb0, skb1, skt, skd, sob0, sob1, sot, sod, slb0, slb1, slt, sll,
                   sgb0, sgb1, sgt, sdlb0, sdlb1, sdlt, sdll, C: tl.constexpr, LOG_C: tl.constexpr,
                   BDK: tl.constexpr, BDV: tl.constexpr, BL: tl.constexpr, GROUP: tl.constexpr,
                   LOG_GROUP: tl.constexpr, HAS_G: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
                   EXACT: tl.constexpr, SPLIT: tl.constexpr, NATIVE: tl.constexpr):
    """Program ``(group of GROUP chunks, batch entry)``: stage 2 of the module docstring, level by
    level from the top down, the group's chunks in order inside a level.  The chunks of a group
    that read one block add their shares to ``dH``, ``dT`` in registers and the block gets them
    once: stored where the group holds all of the block's readers (levels below ``LOG_GROUP``),
    added atomically otherwise (a value side wider than one tile adds each chunk's ``dH`` share
    atomically, tile by tile).  ``Q̃`` and the carried ``dq`` of each chunk live in ``qt`` and
    ``dqt`` between levels.  A level below ``LOG_GROUP`` moves ``Q̃`` across every set bit below it;
    a level from ``LOG_GROUP`` up moves ``P`` (in ``pt``: the chunk's ``Q̃`` moved across its set
    bits below ``LOG_GROUP``, once) across the set bits from ``LOG_GROUP`` below the level."""
    grp = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b0, b1 = bh // B1, bh % B1
    r = tl.arange(0, C)
    dk = tl.arange(0, BDK)
    one_tile: tl.constexpr = DV <= BDV
    l_base = l_ptr + b0 * slb0 + b1 * slb1
    dl_base = dl_ptr + b0 * sdlb0 + b1 * sdlb1
    col_l = tl.arange(0, BL)
    for c in range(GROUP):  # Q̃ of each chunk, dQ̃ = 0 of chunk 0, and the level scales no chunk reads
        i = grp * GROUP + c
        if i < n_chunks:
            t = i * C + r
            tmask = t < T
            Q = load_rows(q_ptr, b0, b1 // GRP, t, tmask, sqb0, sqb1, sqt, sqd, dk, DK, ACC)
            K = load_rows(k_ptr, b0, b1 // GRP, t, tmask, skb0, skb1, skt, skd, dk, DK, ACC)
            Gam, gamma, d, gamma_end = gates(g_ptr + b0 * sgb0 + b1 * sgb1, t, tmask, sgt, T, C, HAS_G, ACC, EXACT)
            Sq = tl.dot(Q, tl.trans(K), input_precision=PREC, out_dtype=ACC) * Gam
            row = bh * n_chunks + i
            Qt = gamma[:, None] * Q - tl.dot(Sq, matrix_tile(w_ptr, row, r, dk, C, DK, ACC), input_precision=PREC,
                                             out_dtype=ACC)
            store_matrix_tile(qt_ptr, row, Qt, r, dk, C, DK)
            if n_bits > LOG_GROUP:  # P: Q̃ moved across the set bits below LOG_GROUP
                store_matrix_tile(pt_ptr, row, _moved_between(Qt, i, 0, LOG_GROUP, tr_ptr, gm_ptr, bh * n_total,
                                                              n_chunks, dk, DK, HAS_G, ACC, PREC), r, dk, C, DK)
            if i == 0:  # reads no block: dQ̃ = 0 (every other chunk stores its dq at its lowest set bit)
                store_matrix_tile(dqt_ptr, row, tl.zeros((C, BDK), dtype=ACC), r, dk, C, DK)
            hi = LOG_C + 1 + n_bits + col_l
            tl.store(dl_base + t[:, None] * sdlt + hi[None, :] * sdll, tl.zeros((C, BL), dtype=ACC),
                     mask=tmask[:, None] & (hi[None, :] < L))
    tl.debug_barrier()
    off = level_start(n_chunks, n_bits - 1)
    h = n_bits - 1
    while h >= 0:
        owned = h < LOG_GROUP  # every reader of a block of this level is a chunk of this group
        col = LOG_C + 1 + h  # the level-scale column of this level
        acc_h = tl.zeros((BDK, BDV), dtype=ACC)
        acc_t = tl.zeros((BDK, BDK), dtype=ACC)
        held = bh * 0 - 1  # the block whose shares acc_h, acc_t hold
        moved = 0  # some chunk added to acc_t
        for c in range(GROUP):
            i = grp * GROUP + c
            if i < n_chunks:
                t = i * C + r
                tmask = t < T
                row = bh * n_chunks + i
                if ((i >> h) & 1) == 1:
                    blk = read_entry(bh * n_total + off, i, h, 0, False)
                    if held >= 0 and blk != held:
                        _add_shares(dh_ptr, dt_ptr, held, acc_h, acc_t, moved, owned, dk, DK, DV, BDV, one_tile)
                        acc_h = tl.zeros((BDK, BDV), dtype=ACC)
                        acc_t = tl.zeros((BDK, BDK), dtype=ACC)
                        moved = 0
                    held = blk
                    if owned:  # Q̃ moved across the blocks of the set bits below h
                        qh = _moved_between(matrix_tile(qt_ptr, row, r, dk, C, DK, ACC), i, 0, h, tr_ptr, gm_ptr,
                                            bh * n_total, n_chunks, dk, DK, HAS_G, ACC, PREC)
                    else:  # P moved across the blocks of the set bits from LOG_GROUP below h
                        qh = _moved_between(matrix_tile(pt_ptr, row, r, dk, C, DK, ACC), i, LOG_GROUP, h, tr_ptr,
                                            gm_ptr, bh * n_total, n_chunks, dk, DK, HAS_G, ACC, PREC)
                    lam = tl.load(l_base + t * slt + col * sll, mask=tmask, other=0.0).to(ACC)
                    lq = tl.trans(scale * lam[:, None] * qh)
                    G_h = tl.zeros((C, BDK), dtype=ACC)  # dO H_hᵀ
                    for d0 in tl.static_range(0, DV, BDV):
                        dv = d0 + tl.arange(0, BDV)
                        dO = load_rows(do_ptr, b0, b1, t, tmask, sob0, sob1, sot, sod, dv, DV, do_ptr.dtype.element_ty)
                        G_h = dot(dO, tl.trans(matrix_tile(h_ptr, blk, dk, dv, DK, DV, h_ptr.dtype.element_ty)), ACC,
                                  PREC, NATIVE, G_h)
                        if one_tile:
                            acc_h = _dh_share(lq, dO, SPLIT, ACC, PREC, NATIVE, acc_h)
                        else:
                            _add_block(dh_ptr, blk, _dh_share(lq, dO, SPLIT, ACC, PREC, NATIVE), dk, dv, DK, DV, False)
                    tl.store(dl_base + t * sdlt + col * sdll, scale * tl.sum(qh * G_h, 1), mask=tmask)
                    dq = scale * lam[:, None] * G_h
                    if (i >> (h + 1)) != 0:  # a higher block was read: the stored dq carries its gradient
                        dq_k = matrix_tile(dqt_ptr, row, r, dk, C, DK, ACC)
                        acc_t = tl.dot(tl.trans(qh), dq_k, acc_t, input_precision=PREC, out_dtype=ACC)
                        moved = 1
                        dq = tl.dot(dq_k, tl.trans(transition_tile(tr_ptr, gm_ptr, blk, dk, dk, DK, HAS_G, ACC)), dq,
                                    input_precision=PREC, out_dtype=ACC)
                    store_matrix_tile(dqt_ptr, row, dq, r, dk, C, DK)
                else:
                    tl.store(dl_base + t * sdlt + col * sdll, tl.zeros((C,), dtype=ACC), mask=tmask)
        if held >= 0:
            _add_shares(dh_ptr, dt_ptr, held, acc_h, acc_t, moved, owned, dk, DK, DV, BDV, one_tile)
        tl.debug_barrier()  # the next level reads the dq this one stored
        h -= 1
        if h >= 0:
            off -= level_size(h, n_chunks, 0, False)


@triton.jit
def _dh_entry(entry, b, h, top, n_chunks):
    """The entry that holds ``dH`` of block ``b`` of level ``h`` (whose own entry is ``entry``): an
    odd block below the top level has no reader, so its ``dH`` is its parent's, which the reverse
    hierarchy does not copy down; the entry is that of its lowest even ancestor (or of a top-level
    block)."""
    lv = h + 0 * b  # (a tensor: the loop carries it)
    while ((b & 1) == 1) & (lv < top):
        entry += level_size(lv, n_chunks, 0, False) - b + (b >> 1)  # past level lv's end, to the parent
        b = b >> 1
        lv += 1
    return entry


@triton.jit(do_not_specialize=["n_total", "off_child", "off_parent", "n_chunks", "h_parent", "top"])
def _reverse_hierarchy_kernel(h_ptr, tr_ptr, gm_ptr, dh_ptr, dt_ptr, n_total, off_child, off_parent, n_chunks, h_parent,
                              top, DK: tl.constexpr,
                              DV: tl.constexpr, N_DV_TILES: tl.constexpr, N_TILES: tl.constexpr, BDK: tl.constexpr,
                              BDV: tl.constexpr, BT: tl.constexpr, HAS_G: tl.constexpr, ACC: tl.constexpr,
                              PREC: tl.constexpr, SPLIT: tl.constexpr, NATIVE: tl.constexpr):
    """Program ``(tile j of block m of level h + 1, batch entry)``, the ``N_TILES`` tiles of a block
    consecutive (they read the same parent gradients, which so stay in L2): the adjoint of the block's
    two equations (stage 3).  Tile ``j < N_DV_TILES``: ``dH_h[2m] += T_h[2m+1]ᵀ dH_{h+1}[m]`` on those
    columns (``dH_h[2m+1] = dH_{h+1}[m]`` is not stored: :func:`_dh_entry`); tile
    ``j = N_DV_TILES + a * (BDK / BT) + b``: the ``BT x BT`` block ``(a, b)`` of
    ``dT_h[2m+1] = dH_{h+1}[m] H_h[2m]ᵀ + dT_{h+1}[m] T_h[2m]ᵀ`` and of
    ``dT_h[2m] += T_h[2m+1]ᵀ dT_{h+1}[m]`` (square blocks keep the operands of a 128-wide key inside
    the shared memory).  The readers add only to even blocks (a chunk reads block ``(i >> h) - 1``
    with ``i >> h`` odd), so an odd block's ``dT`` is its parent's terms alone: stored, not added to."""
    m = tl.program_id(0) // N_TILES
    j = tl.program_id(0) % N_TILES
    bh = tl.program_id(1).to(tl.int64)
    even = bh * n_total + off_child + 2 * m
    odd = even + 1
    parent = bh * n_total + off_parent + m
    parent_h = _dh_entry(parent, m, h_parent, top, n_chunks)  # where the parent's dH is
    dk = tl.arange(0, BDK)
    if SPLIT:  # the hierarchy's tiles as they are held
        HELD: tl.constexpr = tr_ptr.dtype.element_ty
    else:
        HELD: tl.constexpr = ACC
    if j < N_DV_TILES:
        dv = j * BDV + tl.arange(0, BDV)
        dHp = matrix_tile(dh_ptr, parent_h, dk, dv, DK, DV, ACC)
        dHe = matrix_tile(dh_ptr, even, dk, dv, DK, DV, ACC)
        T_odd = _transition_operand(tr_ptr, gm_ptr, odd, dk, dk, DK, HAS_G, ACC, SPLIT, HELD)
        dHe += _held_dot(tl.trans(T_odd), dHp, ACC, PREC, NATIVE)
        if SPLIT:  # the γ I part the operand leaves out
            dHe += block_decay(gm_ptr, odd, HAS_G, ACC) * dHp
        store_matrix_tile(dh_ptr, even, dHe, dk, dv, DK, DV)  # the odd child's dH is the parent's (_dh_entry)
    else:
        block_id = j - N_DV_TILES
        rows = (block_id // (BDK // BT)) * BT + tl.arange(0, BT)
        cols = (block_id % (BDK // BT)) * BT + tl.arange(0, BT)
        if SPLIT:  # meets the γ I parts the operands leave out
            dTp = matrix_tile(dt_ptr, parent, rows, cols, DK, DK, ACC)
        acc = _held_dot(matrix_tile(dt_ptr, parent, rows, dk, DK, DK, ACC),
                        tl.trans(_transition_operand(tr_ptr, gm_ptr, even, cols, dk, DK, HAS_G, ACC, SPLIT, HELD)), ACC,
                        PREC, NATIVE)
        if SPLIT:
            acc += block_decay(gm_ptr, even, HAS_G, ACC) * dTp
        for d0 in tl.static_range(0, DV, BDV):
            dv = d0 + tl.arange(0, BDV)
            acc += _held_dot(matrix_tile(dh_ptr, parent_h, rows, dv, DK, DV, ACC),
                             tl.trans(matrix_tile(h_ptr, even, cols, dv, DK, DV, HELD)), ACC, PREC, NATIVE)
        store_matrix_tile(dt_ptr, odd, acc, rows, cols, DK, DK)
        dTe = _held_dot(tl.trans(_transition_operand(tr_ptr, gm_ptr, odd, dk, rows, DK, HAS_G, ACC, SPLIT, HELD)),
                        matrix_tile(dt_ptr, parent, dk, cols, DK, DK, ACC), ACC, PREC, NATIVE)
        if SPLIT:
            dTe += block_decay(gm_ptr, odd, HAS_G, ACC) * dTp
        store_matrix_tile(dt_ptr, even, matrix_tile(dt_ptr, even, rows, cols, DK, DK, ACC) + dTe, rows, cols, DK, DK)


@triton.jit
def _transition_operand(tr_ptr, gm_ptr, index, rows, cols, DK, HAS_G: tl.constexpr, ACC: tl.constexpr,
                        SPLIT: tl.constexpr, HELD: tl.constexpr):
    """The ``(rows, cols)`` tile of block ``index``'s transition as the reverse hierarchy multiplies
    it: ``R`` as the hierarchy holds it (``HELD``) when ``SPLIT`` (the caller adds the ``γ I``
    part), the whole ``T = γ I + R`` in ``ACC`` otherwise."""
    if SPLIT:
        return matrix_tile(tr_ptr, index, rows, cols, DK, DK, HELD)
    else:
        return transition_tile(tr_ptr, gm_ptr, index, rows, cols, DK, HAS_G, ACC)


@triton.jit
def _held_dot(a, b, ACC: tl.constexpr, PREC: tl.constexpr, NATIVE: tl.constexpr):
    """``a @ b`` with operands as they are held (a tile of the bfloat16 hierarchy, the 16-bit
    inputs): :func:`split_dot` for a bfloat16 tile beside a float32 one or two bfloat16 tiles, a dot
    of the operands widened to ``ACC`` otherwise (the backward's dots on float32 operands keep the
    tensor cores' truncation, docs/kernels.md §7.4)."""
    if a.dtype == tl.bfloat16 or b.dtype == tl.bfloat16:
        return split_dot(a, b, ACC, PREC, NATIVE)
    else:
        return tl.dot(a.to(ACC), b.to(ACC), input_precision=PREC, out_dtype=ACC)


@triton.jit(do_not_specialize=["T", "B1", "n_chunks", "n_total", "top", "L", "slb0", "slb1", "slt", "sbb0", "sbb1",
                               "sgb0", "sgb1", "sdbb0", "sdbb1", "sdlb0", "sdlb1", "sdlt", "sdgb0", "sdgb1", "GRP"])
def _chunk_kernel(q_ptr, k_ptr, v_ptr, b_ptr, do_ptr, l_ptr, g_ptr, x_ptr, w_ptr, dh_ptr, dt_ptr, dqt_ptr,
                  dq_ptr, dk_ptr, dv_ptr, db_ptr, dl_ptr, dg_ptr, hc_ptr, hk_ptr, hv_ptr,
                  T, B1, n_chunks, n_total, top, L, DK: tl.constexpr, DV: tl.constexpr, scale, GRP,
                  sqb0, sqb1, sqt, sqd, skb0, skb1, skt, skd, svb0, svb1, svt, svd, sbb0, sbb1, sbt,
                  sob0, sob1, sot, sod, slb0, slb1, slt, sll, sgb0, sgb1, sgt,
                  sdqb0, sdqb1, sdqt, sdqd, sdkb0, sdkb1, sdkt, sdkd, sdvb0, sdvb1, sdvt, sdvd, sdbb0, sdbb1, sdbt,
                  sdlb0, sdlb1, sdlt, sdll, sdgb0, sdgb1, sdgt,
                  C: tl.constexpr, LOG_C: tl.constexpr, FULL_CHUNKS: tl.constexpr,
                  BDK: tl.constexpr, BDV: tl.constexpr, BL: tl.constexpr,
                  HAS_G: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr, EXACT: tl.constexpr,
                  SPLIT: tl.constexpr, NATIVE: tl.constexpr, SIDE: tl.constexpr = 0):
    """Program ``(chunk i, batch entry)``: stage 4 of the module docstring (every gradient of the
    chunk's rows given ``dO``, ``dQ̃`` and the chunk's ``dU``, ``dTr``).  The value side first, then
    the key side in the order that lets each tile die early (a tile read again later is loaded
    again rather than kept: the kernel is bound by its live registers, docs/kernels.md §7.4).
    ``SIDE`` 1 or 2 makes the program one of two launches: everything up to the adjoint of the
    solve ``X = N⁻¹`` (storing ``dY``, ``WG`` in ``hc``, ``dW`` and ``dk``'s terms so far in ``hk``,
    ``dγ``, ``dd`` and ``dγ_end`` in ``hv``, float32), and that adjoint (loading them); 0: one
    program does both."""
    FRONT: tl.constexpr = SIDE != 2
    TAIL: tl.constexpr = SIDE != 1
    i, bh, b0, b1, t, tmask = chunk_rows(B1, T, C, FULL_CHUNKS)
    r = tl.arange(0, C)
    dk = tl.arange(0, BDK)
    row = bh * n_chunks + i
    blk = bh * n_total + i
    beta = tl.load(b_ptr + b0 * sbb0 + b1 * sbb1 + t * sbt, mask=tmask, other=0.0).to(ACC)
    Gam, gamma, d, gamma_end = gates(g_ptr + b0 * sgb0 + b1 * sgb1, t, tmask, sgt, T, C, HAS_G, ACC, EXACT)
    QK_TYPE: tl.constexpr = k_ptr.dtype.element_ty  # q and k held as loaded, widened where used
    if FRONT:
        Q = load_rows(q_ptr, b0, b1 // GRP, t, tmask, sqb0, sqb1, sqt, sqd, dk, DK, QK_TYPE)
        K = load_rows(k_ptr, b0, b1 // GRP, t, tmask, skb0, skb1, skt, skd, dk, DK, QK_TYPE)
        Sq = dot(Q, tl.trans(K), ACC, PREC, NATIVE) * Gam
        Y = matrix_tile(x_ptr, row, r, r, C, C, ACC) * beta[None, :]
        # the value side (P = Sq Y, U = E V with E = (diag(d) K)ᵀ Y): dV, dP, dE and dλ of levels 0..c
        P = tl.dot(Sq, Y, input_precision=PREC, out_dtype=ACC)
        E = tl.dot(tl.trans(d[:, None] * K.to(ACC)), Y, input_precision=PREC, out_dtype=ACC)
        Lam = intra_scales(l_ptr + b0 * slb0 + b1 * slb1 + (i * C).to(tl.int64) * slt, slt, sll, L, tmask, C)
        PL = P * Lam.to(ACC)
        if SPLIT:  # the bfloat16 values and dO as they are: bfloat16 dots, split_dot
            V_TYPE: tl.constexpr = v_ptr.dtype.element_ty
            DO_TYPE: tl.constexpr = do_ptr.dtype.element_ty
        else:  # widened to float32
            V_TYPE: tl.constexpr = ACC
            DO_TYPE: tl.constexpr = ACC
        dPL = tl.zeros((C, C), dtype=ACC)
        dE = tl.zeros((BDK, C), dtype=ACC)
        ublk = _dh_entry(blk, i, 0, top, n_chunks)  # where the chunk's dU is
        for d0 in tl.static_range(0, DV, BDV):
            dv = d0 + tl.arange(0, BDV)
            V = load_rows(v_ptr, b0, b1, t, tmask, svb0, svb1, svt, svd, dv, DV, V_TYPE)
            dO = load_rows(do_ptr, b0, b1, t, tmask, sob0, sob1, sot, sod, dv, DV, DO_TYPE)
            dU = matrix_tile(dh_ptr, ublk, dk, dv, DK, DV, ACC)
            dPL += _held_dot(dO, tl.trans(V), ACC, PREC, NATIVE)
            dE += _held_dot(dU, tl.trans(V), ACC, PREC, NATIVE)
            dV = scale * _held_dot(tl.trans(PL), dO, ACC, PREC, NATIVE) + tl.dot(
                tl.trans(E), dU, input_precision=PREC, out_dtype=ACC)
            tl.store(dv_ptr + b0 * sdvb0 + b1 * sdvb1 + t[:, None] * sdvt + dv[None, :] * sdvd, dV,
                     mask=tmask[:, None] & (dv[None, :] < DV))
        dPL = scale * dPL
        dLam = dPL * P
        col_l = tl.arange(0, BL)
        dl = level_sums(dLam, C, LOG_C, BL)
        tl.store(dl_ptr + b0 * sdlb0 + b1 * sdlb1 + t[:, None] * sdlt + col_l[None, :] * sdll, dl,
                 mask=tmask[:, None] & (col_l[None, :] <= LOG_C) & (col_l[None, :] < L))
        dP = dPL * Lam.to(ACC)
        # the key side: Tr = γ_end I - Kdᵀ W (dTr), U (dE), Q̃ = diag(γ) Q - Sq W (dQ̃), P (dP); Kd = diag(d) K
        Q = load_rows(q_ptr, b0, b1 // GRP, t, tmask, sqb0, sqb1, sqt, sqd, dk, DK, QK_TYPE)  # again: not kept live
        K = load_rows(k_ptr, b0, b1 // GRP, t, tmask, skb0, skb1, skt, skd, dk, DK, QK_TYPE)
        dTr = matrix_tile(dt_ptr, blk, dk, dk, DK, DK, ACC)
        trace = tl.sum(tl.load(dt_ptr + blk * (DK * DK) + dk * (DK + 1), mask=dk < DK, other=0.0), 0)  # dγ_end
        W = matrix_tile(w_ptr, row, r, dk, C, DK, ACC)
        Kd = d[:, None] * K.to(ACC)
        dKd = tl.trans(tl.dot(dE, tl.trans(Y), input_precision=PREC, out_dtype=ACC) - tl.dot(
            dTr, tl.trans(W), input_precision=PREC, out_dtype=ACC))
        dW = -tl.dot(Kd, dTr, input_precision=PREC, out_dtype=ACC)
        dY = tl.dot(Kd, dE, input_precision=PREC, out_dtype=ACC)
        dQt = matrix_tile(dqt_ptr, row, r, dk, C, DK, ACC)
        dW -= tl.dot(tl.trans(Sq), dQt, input_precision=PREC, out_dtype=ACC)
        dgamma = tl.sum(Q.to(ACC) * dQt, 1)
        dQ = gamma[:, None] * dQt
        dSq = tl.dot(dP, tl.trans(Y), input_precision=PREC, out_dtype=ACC) - tl.dot(
            dQt, tl.trans(W), input_precision=PREC, out_dtype=ACC)
        dY += tl.dot(tl.trans(Sq), dP, input_precision=PREC, out_dtype=ACC)
        WG = dSq * Sq  # (dSq ⊙ Q Kᵀ) ⊙ Γ: the share of dΓ ⊙ Γ through Sq
        dSqG = dSq * Gam
        dQ += tl.dot(dSqG, K.to(ACC), input_precision=PREC, out_dtype=ACC)
        kmask = tmask[:, None] & (dk[None, :] < DK)
        tl.store(dq_ptr + b0 * sdqb0 + b1 * sdqb1 + t[:, None] * sdqt + dk[None, :] * sdqd, dQ, mask=kmask)
        dd = tl.sum(K.to(ACC) * dKd, 1) * d  # (for dg)
        dK = tl.dot(tl.trans(dSqG), Q.to(ACC), input_precision=PREC, out_dtype=ACC) + d[:, None] * dKd
        if SIDE == 1:  # hand over to the adjoint of the solve
            hrow = row * 2
            store_matrix_tile(hc_ptr, hrow, dY, r, r, C, C)
            store_matrix_tile(hc_ptr, hrow + 1, WG, r, r, C, C)
            store_matrix_tile(hk_ptr, hrow, dW, r, dk, C, DK)
            store_matrix_tile(hk_ptr, hrow + 1, dK, r, dk, C, DK)
            tl.store(hv_ptr + row * 3 * C + r, dgamma)
            tl.store(hv_ptr + row * 3 * C + C + r, dd)
            tl.store(hv_ptr + row * 3 * C + 2 * C, trace)
    if SIDE == 2:
        hrow = row * 2
        K = load_rows(k_ptr, b0, b1 // GRP, t, tmask, skb0, skb1, skt, skd, dk, DK, QK_TYPE)
        kmask = tmask[:, None] & (dk[None, :] < DK)
        dY = matrix_tile(hc_ptr, hrow, r, r, C, C, ACC)
        WG = matrix_tile(hc_ptr, hrow + 1, r, r, C, C, ACC)
        dW = matrix_tile(hk_ptr, hrow, r, dk, C, DK, ACC)
        dK = matrix_tile(hk_ptr, hrow + 1, r, dk, C, DK, ACC)
        dgamma = tl.load(hv_ptr + row * 3 * C + r)
        dd = tl.load(hv_ptr + row * 3 * C + C + r)
        trace = tl.load(hv_ptr + row * 3 * C + 2 * C)
    if TAIL:
        # Y = X diag(β),  W = X Z with Z = diag(βγ) K
        X = matrix_tile(x_ptr, row, r, r, C, C, ACC)
        dX = dY * beta[None, :] + tl.dot(dW, tl.trans((beta * gamma)[:, None] * K.to(ACC)), input_precision=PREC,
                                         out_dtype=ACC)
        dZ = tl.dot(tl.trans(X), dW, input_precision=PREC, out_dtype=ACC)
        KdZ = tl.sum(K.to(ACC) * dZ, 1)
        dbeta = tl.sum(X * dY, 0) + gamma * KdZ
        dgamma += beta * KdZ
        dK += (beta * gamma)[:, None] * dZ
        # X = N⁻¹, N = I + strictly_lower(diag(β) (K Kᵀ ⊙ Γ))
        Xt = tl.trans(X)
        dN = -tl.dot(tl.dot(Xt, dX, input_precision=PREC, out_dtype=ACC), Xt, input_precision=PREC, out_dtype=ACC)
        dLm = tl.where(r[:, None] > r[None, :], dN, 0.0)
        KK = dot(K, tl.trans(K), ACC, PREC, NATIVE)
        dbeta += tl.sum(dLm * KK * Gam, 1)
        dKK = dLm * beta[:, None] * Gam
        dK += tl.dot(dKK + tl.trans(dKK), K.to(ACC), input_precision=PREC, out_dtype=ACC)
        tl.store(dk_ptr + b0 * sdkb0 + b1 * sdkb1 + t[:, None] * sdkt + dk[None, :] * sdkd, dK, mask=kmask)
        tl.store(db_ptr + b0 * sdbb0 + b1 * sdbb1 + t * sdbt, dbeta, mask=tmask)
        if HAS_G:
            # dg_u sums every term whose decay holds g_u, each term once (no difference of sums, which
            # cancel when a strong decay leaves dg far below its terms): the pairs t >= u > s of Γ,
            # the γ_t with t >= u, the d_s with s < u and γ_end
            WG += dKK * KK  # (dLm β ⊙ K Kᵀ) ⊙ Γ: the share through N
            before = r[None, :] < r[:, None]
            dg = tl.sum(tl.where(before, tl.cumsum(WG, 0, reverse=True), 0.0), 1) + tl.sum(
                tl.where(before, dd[None, :], 0.0), 1) + tl.cumsum(dgamma * gamma, 0, reverse=True) + (
                trace * gamma_end)
            # g of position 0 moves nothing
            tl.store(dg_ptr + b0 * sdgb0 + b1 * sdgb1 + t * sdgt, tl.where(t == 0, 0.0, dg), mask=tmask)


def _gradient_pyramid(ch, offsets, group: int, stored_dh: bool):
    """``dH``, ``dT`` (float32, float64 for float64 inputs; the hierarchy's shapes), zeroed where a
    block's first writer adds to it or nothing writes it.  The reader stores the even blocks of the
    levels below ``log2(group)`` (the group holds all their readers; ``dH`` only where it is one
    value tile, ``stored_dh``) and adds atomically above; the reverse hierarchy stores ``dT`` of
    every odd block that has a parent and adds ``dH`` and ``dT`` to the even ones (an odd block's
    ``dH`` is never stored: it is its parent's, found through ``_dh_entry``).  So the levels from
    ``log2(group)`` up are zeroed whole (one fill), and below them only each level's last block,
    the one block that may have neither a reader nor a parent (the last even block when ``n`` is a
    multiple of its size, the top level's odd block).  ``offsets[h]`` is level ``h``'s first block
    (``offsets[-1] = N``)."""
    work = torch.float64 if ch.X.dtype == torch.float64 else torch.float32
    dH = _layout.scratch(ch.states.shape, work, ch.X.device)
    dT = _layout.scratch(ch.trans.shape, work, ch.X.device)
    owned = min(group.bit_length() - 1, len(offsets) - 2)  # levels below: stored by the group
    for pyramid, whole in ((dH, not stored_dh), (dT, False)):
        pyramid[:, 0 if whole else offsets[owned]:].zero_()
        if not whole:
            for h in range(owned):
                pyramid[:, offsets[h + 1] - 1].zero_()
    return dH, dT


def _check_chunks(chunks, layout, C):
    """Refuse ``chunks`` whose shapes, dtypes, layout, device or chunk are not those the forward of
    this call at chunk ``C`` leaves."""
    if not isinstance(chunks, Chunks):
        raise TypeError(f"chunks must be the Chunks that gated_delta_forward(..., return_chunks=True) returns, "
                        f"got {type(chunks).__name__}")
    v = layout.tensors["v"]
    want = chunk_shapes(layout.B, layout.T, layout.DK, layout.DV, v.dtype, layout.tensors["g"] is not None, C)
    n = want["X"][0][1]  # X is (B, n, C, C)
    if "decays" not in want and chunks.decays is not None:
        raise ValueError("chunks must be the forward's of this call: it has no log_decay, but chunks holds the "
                         "block decays of a forward with one")
    for name, (shape, dtype) in want.items():
        x = getattr(chunks, name)
        if x is None or tuple(x.shape) != shape or x.dtype != dtype or x.device != v.device or not x.is_contiguous():
            got = None if x is None else (tuple(x.shape), x.dtype, x.device, "contiguous" if x.is_contiguous()
                                          else "not contiguous")
            raise ValueError(f"chunks must be the forward's of this call at chunk {C}: {name} should be {shape} "
                             f"{dtype} on {v.device}, contiguous, got {got}")
    if chunks.C != C or chunks.n != n:
        raise ValueError(f"chunks must be the forward's of this call at chunk {C} ({n} chunks), got chunk "
                         f"{chunks.C} ({chunks.n} chunks)")


def gated_delta_backward(q, k, v, beta, level_scales, log_decay, scale, do, *, chunk=None, chunks=None, out=None):
    """Gradients of ``O = gated_delta_forward(q, k, v, beta, level_scales, log_decay, scale)`` for ``dO``.

    Parameters
    ----------
    q, k : torch.Tensor, shape ``(*batch, T, Dk)``
    v, do : torch.Tensor, shape ``(*batch, T, Dv)``
    beta : torch.Tensor, shape ``(*batch, T)``
    level_scales : torch.Tensor, shape ``(*batch, T, L)``
    log_decay : torch.Tensor, shape ``(*batch, T)``, or None
        Leading dims broadcast (views read in place); any strides.
    scale : float
    chunk : int, optional
        Chunk size of the recomputation and the backward kernels, a power of two in
        ``[16, MAX_BACKWARD_CHUNK]`` (the gradients do not depend on it; default
        ``DEFAULT_CHUNK["gated_delta"]``).
    chunks : kernels.gated_delta.Chunks, optional
        The forward's ``X``, ``W`` and hierarchy at the same ``chunk``
        (``gated_delta_forward(..., return_chunks=True)``), read instead of recomputed: the same
        gradients, bit for bit.  None recomputes them.
    out : tuple of (torch.Tensor or None), optional
        ``(dq, dk, dv, dbeta, dlevel_scales, dlog_decay)`` buffers of the broadcast batch shape
        (``(*batch, T, ·)``, any strides), written in place and returned: ``dq``, ``dk``, ``dv``,
        ``dbeta`` in the inputs' dtypes, ``dlevel_scales`` and ``dlog_decay`` in the dtype the
        kernels sum them in (float32, float64 for float64 inputs).  A None entry, or a buffer of
        another dtype, gets a new tensor instead.  A caller that wants the gradients laid out like
        strided inputs (fla's ``(B, T, H, D)`` read as ``(B, H, T, D)``) saves a copy of each.

    Returns
    -------
    (dq, dk, dv, dbeta, dlevel_scales, dlog_decay)
        Of shape ``(*batch, T, ·)`` (the broadcast batch) in the inputs' dtypes (``dlog_decay`` is
        None when ``log_decay`` is None; with ``out``, its buffers where they were used).
        Never-read level scales get exactly 0.
    """
    C = check_chunk(chunk, "gated_delta")
    scale = check_scale(scale)
    if C > MAX_BACKWARD_CHUNK:
        raise ValueError(f"chunk of the Gated DeltaNet backward must be at most {MAX_BACKWARD_CHUNK} (at 64 its "
                         f"chunk kernel asks more shared memory than the H200's 227 KiB; the gradients do not "
                         f"depend on the chunk), got {C}")
    work = torch.float64 if v.dtype == torch.float64 else torch.float32
    stored = (q.dtype, k.dtype, v.dtype, beta.dtype, work, work)  # the dtypes the kernels store (_OUT_NAMES)
    buffers = _out_buffers(out, stored, log_decay is not None)
    layout = gated_delta_layout(q, k, v, beta, level_scales, log_decay, do=do, out=buffers)
    T, DK, DV, L, B = layout.T, layout.DK, layout.DV, layout.L, layout.B
    targets = _targets(layout, buffers, stored)
    v = layout.tensors["v"]
    acc, prec, exact = compute_types(v.dtype)
    dev = v.device
    has_g = layout.tensors["g"] is not None
    if chunks is None:
        ch = chunk_hierarchy(layout, C)
    else:
        _check_chunks(chunks, layout, C)
        ch = chunks
    n, N = ch.n, ch.states.shape[1]
    n_bits = (n - 1).bit_length()
    BDK, BDV, n_dv = tiles(layout)
    BT = min(BDK, 64)  # square blocks of dT
    BL = next_power_of_2(L)
    group = READER_GROUP  # not tied to n: one compiled reader for every length
    log_group = group.bit_length() - 1
    if group < 1 or group & (group - 1):
        raise ValueError(f"READER_GROUP must be a power of two (a group holds every reader of the blocks "
                         f"below its own level), got {group}")
    sizes, offsets = hierarchy_sizes(n), level_offsets(n)  # level h starts at offsets[h]
    reader_tile = block(DV, READER_VALUE_TILE)
    dH, dT = _gradient_pyramid(ch, offsets, group, DV <= reader_tile)
    Qt = _layout.scratch((B, n, C, DK), work, dev)
    high = n_bits > log_group  # levels read from P
    Pt = _layout.scratch((B, n, C, DK) if high else (1,), work, dev)
    dQt = _layout.scratch((B, n, C, DK), work, dev)
    dl = targets["dl"][0]
    g_args = layout.decay_args()
    _reader_kernel[(cdiv(n, group), B)](
        layout.tensors["q"], layout.tensors["k"], layout.tensors["do"], layout.tensors["l"], g_args[0], ch.W,
        ch.states, ch.trans, ch.decay_pointer(), dH, dT, Qt, Pt, dQt, dl[0], T, layout.B1, n, N, n_bits, L,
        DK, DV, scale, layout.group,
        *layout.args("q")[1:], *layout.args("k")[1:], *layout.args("do")[1:], *layout.args("l")[1:], *g_args[1:],
        *dl[1:], C=C, LOG_C=C.bit_length() - 1, BDK=BDK, BDV=reader_tile, BL=BL, GROUP=group,
        LOG_GROUP=log_group, HAS_G=has_g, ACC=acc, PREC=prec, EXACT=exact,
        SPLIT=DK <= SPLIT_READER_SHARE_UP_TO and v.dtype == torch.bfloat16,
        NATIVE=not interpreting(),
        num_warps=NUM_WARPS["gated_delta_reader" if DK <= 64 else "gated_delta_reader_wide"],
        **({"maxnreg": MAX_REGISTERS["gated_delta_reader"]} if DK <= 64 and v.dtype in (torch.float16, torch.bfloat16)
           else {}))
    n_tiles = n_dv + (BDK // BT) ** 2  # the value tiles of dH and the square blocks of dT
    for h in range(len(sizes) - 2, -1, -1):
        _reverse_hierarchy_kernel[(sizes[h + 1] * n_tiles, B)](
            ch.states, ch.trans, ch.decay_pointer(), dH, dT, N, offsets[h], offsets[h + 1], n, h + 1, len(sizes) - 1,
            DK, DV, n_dv, n_tiles,
            BDK=BDK, BDV=BDV, BT=BT, HAS_G=has_g, ACC=acc, PREC=prec, SPLIT=DK > SPLIT_REVERSE_HIERARCHY_ABOVE,
            NATIVE=not interpreting(), num_warps=NUM_WARPS["gated_delta_reverse_hierarchy"])
    # written once each, in the inputs' dtypes (the kernel's store rounds as a later conversion would)
    dq, dk, dv, db = (targets[name][0] for name in ("dq", "dk", "dv", "db"))
    dg = targets["dg"][0] if has_g else db
    # a chunk of 16 halves the row tiles: 4 warps (Triton 3.6 fails to compile it on 8 at Dk = 128)
    setting = "gated_delta_backward_wide" if DK > 64 and C >= 32 else "gated_delta_backward"
    two = SIDE_LAUNCHES["gated_delta_backward_wide" if DK > 64 else "gated_delta_backward"] == 2
    hc = _layout.scratch((B, n, 2, C, C) if two else (1,), work, dev)  # dY, WG
    hk = _layout.scratch((B, n, 2, C, DK) if two else (1,), work, dev)  # dW, dk's terms so far
    hv = _layout.scratch((B, n, 3, C) if two else (1,), work, dev)  # dγ, dd, dγ_end
    for side in (1, 2) if two else (0,):
        _chunk_kernel[(n, B)](
            layout.tensors["q"], layout.tensors["k"], v, layout.tensors["beta"], layout.tensors["do"],
            layout.tensors["l"], g_args[0], ch.X, ch.W, dH, dT, dQt, dq[0], dk[0], dv[0], db[0], dl[0], dg[0], hc,
            hk, hv, T, layout.B1, n, N, len(sizes) - 1, L, DK, DV, scale, layout.group,
            *layout.args("q")[1:], *layout.args("k")[1:], *layout.args("v")[1:], *layout.args("beta")[1:4],
            *layout.args("do")[1:], *layout.args("l")[1:], *g_args[1:],
            *dq[1:], *dk[1:], *dv[1:], *db[1:4], *dl[1:], *dg[1:4],
            C=C, LOG_C=C.bit_length() - 1, FULL_CHUNKS=T % C == 0, BDK=BDK, BDV=BDV, BL=BL, HAS_G=has_g, ACC=acc,
            PREC=prec, EXACT=exact,
            SPLIT=DK > SPLIT_VALUE_SIDE_ABOVE and v.dtype == torch.bfloat16, NATIVE=not interpreting(), SIDE=side,
            num_warps=NUM_WARPS[setting])
    batch = layout.batch

    def shaped(name, like, tail):
        args, given = targets[name]
        return given if given is not None else args[0].reshape(batch + (T,) + tail).to(like.dtype)

    return (shaped("dq", q, (DK,)), shaped("dk", k, (DK,)), shaped("dv", v, (DV,)), shaped("db", beta, ()),
            shaped("dl", level_scales, (L,)), shaped("dg", log_decay, ()) if has_g else None)


_OUT_NAMES = {"dq": "dq", "dk": "dk", "dv": "dv", "db": "dbeta", "dl": "dlevel_scales", "dg": "dlog_decay"}
"""The gradients of :func:`gated_delta_backward`'s ``out``, in its order: the names of the layout
and the kernels, and the names the messages give."""

def _out_buffers(out, dtypes, has_g: bool) -> dict:
    """The buffers of ``out`` that the kernels may write in place, by name (:data:`_OUT_NAMES`): the
    tensors of the dtype the kernels store that gradient in; the rest (None, another dtype,
    ``dlog_decay`` without a log-decay) are left to new tensors."""
    if out is None:
        return {}
    if not isinstance(out, (tuple, list)) or len(out) != len(_OUT_NAMES):
        raise TypeError(f"out must be a tuple of {len(_OUT_NAMES)} tensors or None "
                        f"({', '.join(_OUT_NAMES.values())}), got {type(out).__name__}"
                        + (f" of {len(out)}" if isinstance(out, (tuple, list)) else ""))
    buffers = {}
    for (name, what), x, dtype in zip(_OUT_NAMES.items(), out, dtypes):
        if x is None or (name == "dg" and not has_g):
            continue
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"out's {what} must be a tensor or None, got {type(x).__name__}")
        if x.dtype == dtype:
            buffers[name] = x
    return buffers


def _targets(layout, buffers: dict, dtypes) -> dict:
    """``{name: (where, given)}`` for each gradient: ``where`` the ``(pointer, s_b0, s_b1, s_row,
    s_col)`` it is stored at, ``given`` its ``out`` buffer when that is written in place (it must
    have the call's broadcast batch shape; it is used where the layout folded it without a copy),
    else None and ``where`` a new contiguous ``(B, T, width)`` buffer."""
    B, B1, T = layout.B, layout.B1, layout.T
    widths = {"dq": layout.DK, "dk": layout.DK, "dv": layout.DV, "db": 1, "dl": layout.L, "dg": 1}
    targets = {}
    for name, dtype in zip(_OUT_NAMES, dtypes):
        if name == "dg" and layout.tensors["g"] is None:
            continue
        width = widths[name]
        x = buffers.get(name)  # (its shape checked by the layout)
        if x is not None and layout.reads_in_place(name, x):
            targets[name] = (layout.args(name), x)
            continue
        scratch = _layout.scratch((B, T, width), dtype, layout.tensors["v"].device)
        targets[name] = ((scratch, B1 * T * width, T * width, width, 1), None)
    return targets
