"""Triton backward of chunked log-linear attention (derivation: ``docs/backward.md``).

For ``O = (M ⊙ scale·Q Kᵀ) V`` with ``M[t, s] = λ[t, level(t, s)] exp(G[t] - G[s])`` and a
cotangent ``dO``, with ``dP = dO Vᵀ``, ``S = Q Kᵀ`` and ``W = scale·M ⊙ dP ⊙ S``:

* ``dQ = scale (M ⊙ dP) K``, ``dK = scale (M ⊙ dP)ᵀ Q``, ``dV = scale (M ⊙ S)ᵀ dO``;
* ``dλ[t, l] = Σ_{s: level(t, s) = l} W[t, s] / λ[t, l]`` (zero where row ``t`` does not read
  level ``l``);
* ``dg[u] = Σ_{t >= u > s} W[t, s]`` (the pairs whose decay contains ``g[u]``), ``dg[0] = 0``.

The structure mirrors the forward (:mod:`kernels.attention`), chunk size ``C = 2^c``:

1. The forward's key-side hierarchy ``H``: handed over by the forward (``states=``), or recomputed
   by :func:`kernels.attention.chunk_states`.
2. ``_query_block_kernel`` builds the query-side block sums, the adjoint of ``H``:
   ``R_h[b] = Σ_{t in block b} scale λ[t, c+1+h] exp(G[t] - G[a_b]) q_t dO_tᵀ`` for every block
   ``b`` of ``2^h`` chunks that reads a level-``h`` state (odd ``b``; ``a_b`` the last position
   before it), over aligned groups of :data:`TILE_CHUNKS` chunks (one atomic add per group of a
   larger block; no other atomics).
3. ``_span_kernel`` (one program per pair of chunks, or per chunk slot over sequences, and
   feature tile of at most :data:`SPAN_KEY_ROWS` key rows) walks the clear bits of each chunk index from the top level
   down: there the chunk lies in a block read by the block after it, and the decayed sum of
   those readers' block sums, ``D``, is the adjoint of the chunk's keys through every later
   chunk; with a decay it also forms, once per read block, the Frobenius product of the state
   the block reads with the readers above it, from which ``_span_weight_kernel`` forms the
   weight of the pairs that span each chunk (for ``dg``).
4. ``_chunk_kernel`` (one program per chunk; for feature tiles wider than 64 two launches, a query
   side and a key side: :data:`SIDE_LAUNCHES`) computes every gradient of the chunk's rows: the
   dense in-chunk part, one walk over the set bits of the chunk index, each reading the
   level-``h`` state (``dq``, ``dλ``), and the later readers through ``D``
   (``dk_s = w_s D v_s``, ``dv_s = w_s Dᵀ k_s``).
5. ``dg`` is assembled from chunk-local sums plus, per chunk, the pairs that span it
   (``_span_kernel``, ``_span_weight_kernel``, ``_gap_kernel``): each pair's weight is added once, never as a difference
   of sums (which cancel where a strong decay leaves ``dg[u]`` far below the pairs around it),
   and no sum runs along the whole sequence, so its rounding does not grow with ``T``
   (``docs/backward.md``).

Every exponent is a sum of its own terms (chunk-local cumulative sums, sums of block
log-decays), never a difference of prefix sums.  Heads wider than :data:`MAX_TILE` are split
into ``(Dk-tile, Dv-tile)`` programs whose partial results are added.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from hodlr.fenwick.arrays import check_scale

from . import _sequences
from ._device import (bit_length, block_entry, causal_decay, chunk_decays, chunk_rows, dot, intra_scales, level_size,
                      level_start, level_sums, matrix_tile, next_level, read_entry, reads_level, sequence_chunk,
                      sequence_chunks, sequence_row, sequence_slots)
from ._layout import (NUM_WARPS, block, cdiv, check_chunk, check_tensor, chunk_count, compute_types, interpreting,
                      next_power_of_2, scratch, state_dtypes)
from .attention import (attention_layout, check_initial_state, chunk_states, sequence_layout, sequence_states,
                        state_shapes)

MAX_TILE = 128
"""Widest feature tile of one backward program; wider heads are split into tiles whose shares of
``dq``, ``dk``, ``dv`` are added in a fixed order over launches (no atomics; ``_add_share``)."""

SIDE_LAUNCHES = {"attention_backward": 1, "attention_backward_wide": 2}
"""Launches of the chunk kernel for feature tiles of up to 64 columns and wider ones: one, whose
programs form every gradient of their chunk, or two, a query side and a key side (each forms
the in-chunk products it needs again, and holds half the accumulators).  Calls over sequences
take one."""

BLOCK_SUM_STAGES = {"attention_backward": 2, "attention_backward_wide": 3}
"""Software-pipelining stages of the block sums' loop over chunks (``_block_sum``), for feature
tiles of up to 64 columns and wider ones: the next chunks' queries and output gradients load
into shared memory while this chunk's product runs."""

SPAN_KEY_ROWS = 64
"""Key rows of one ``_span_kernel`` program's feature tile (wider key tiles are split): the
program holds one float32 accumulator of that tile (the later readers' block sums) and, at one
level, a state tile."""

SPAN_WEIGHT_CHUNKS = 128
"""Chunks of one ``_span_weight_kernel`` program (a power of two)."""

SPAN_WEIGHT_WARPS = 4
"""Warps of a ``_span_weight_kernel`` program that also writes the decay gradient of its chunks'
positions (calls without sequences; one warp where it writes the chunks' weights alone)."""

TILE_CHUNKS = 16
"""Chunks summed by one program of ``_query_block_kernel`` (a power of two): blocks of at most
this many chunks are summed whole and stored, larger ones tile by tile with one atomic add each."""


@triton.jit
def _reader_blocks(n_chunks, h):
    """The reader blocks (the odd blocks of ``2^h`` chunks) at level ``h``, ``ceil(n / 2^h) // 2``:
    the block sums hold one entry each, level after level (``r_counts`` on the host)."""
    return ((n_chunks + (1 << h) - 1) >> h) >> 1


@triton.jit
def _reader_start(n_chunks, h):
    """Where level ``h`` starts in the block sums of a call without sequences."""
    roff = 0
    lv = 0
    while lv < h:
        roff += _reader_blocks(n_chunks, lv)
        lv += 1
    return roff


@triton.jit
def _levels_offsets(n_chunks, h):
    """``(start of level h in the hierarchy, start of level h in the block sums, reader blocks at
    level h)``."""
    return level_start(n_chunks, h), _reader_start(n_chunks, h), _reader_blocks(n_chunks, h)


@triton.jit
def _block_sum_entry(b, h, off, roff, I0, VARLEN: tl.constexpr):
    """The entry of the block sum (and of ``ψ``) of reader block ``b`` of level ``h``: with
    ``VARLEN`` the block sums take the hierarchy's layout, that of the block ``b - 1`` it reads
    (level ``h`` at entry ``off``, :func:`kernels._device.block_entry`); without, their own compact
    one (level ``h`` at entry ``roff``, one entry an odd block)."""
    if VARLEN:
        entry = block_entry(off, b - 1, h, I0, VARLEN)
    else:
        entry = roff + (b >> 1)
    return entry


@triton.jit
def _reader_block(b, h, n_chunks, I1, E_end, VARLEN: tl.constexpr):
    """``(has_readers, whole)`` of reader block ``b`` of level ``h``: whether it holds readers
    (chunks, or with ``VARLEN`` the end's chunk ``E_end``) and whether it is whole, ending at or
    before the last chunk (so that it has a log-decay)."""
    if VARLEN:
        return b <= (E_end >> h), b <= (I1 >> h)
    else:
        return (b << h) < n_chunks, ((b + 1) << h) <= n_chunks


@triton.jit
def _rounded(x, like, LOWP: tl.constexpr, NATIVE: tl.constexpr):
    """``x`` rounded to ``like``'s 16-bit dtype for a native dot (bfloat16 on a GPU), else as is."""
    if LOWP and NATIVE:
        return x.to(like.dtype)
    else:
        return x


@triton.jit(do_not_specialize=["n_chunks", "n_total", "n_r", "n_bits", "n_psi"])
def _span_kernel(h_ptr, a_ptr, r_ptr, psi_ptr, later_ptr, tab_ptr, cs_ptr, n_chunks, n_total, n_r, n_bits, n_psi,
                 DK: tl.constexpr, DV: tl.constexpr, N_DV_TILES, BDK: tl.constexpr, BDV: tl.constexpr,
                 HAS_G: tl.constexpr, ACC: tl.constexpr, C: tl.constexpr, LOG_C: tl.constexpr, VARLEN: tl.constexpr):
    """Program ``(pair of chunks, batch entry, feature tile)``, with ``VARLEN`` ``(chunk slot,
    head, feature tile)``: one walk over the bits ``h`` of the chunk index ``i`` from the top level
    down (feature tiles of at most :data:`SPAN_KEY_ROWS` key rows by ``BDV`` value columns).

    At a clear bit ``i`` lies in the level-``h`` block that the block after it reads; ``R_h`` is
    the readers' block sum (this tile's part) and ``A`` the log-decay of the reader block.  The
    walk keeps ``E_h``, the later readers at level ``h`` and above, decayed to the end of ``i``'s
    level-``h`` block (the same for every chunk of that block): ``E_h = exp(A) E_{h+1} + R_h`` at a
    clear bit, ``E_h = E_{h+1}`` at a set one, and writes ``later[i] = E_0``, the adjoint of the
    chunk's own keys through every later reader (``_chunk_kernel`` forms ``dk``, ``dv`` from it),
    in ``later``'s dtype.  Without ``VARLEN`` the chunks ``2p`` and ``2p + 1`` share every level
    above 0: one program walks both.

    With ``HAS_G``, at a set bit ``h`` where ``i`` is the block's first chunk of the call or
    sequence (its lowest set bit, or the sequence's first chunk ``I0``) it writes the Frobenius
    product ``ψ_h[b] = <H_h[b − 1], E_h>`` of the state that block ``b = i >> h`` reads with the
    readers above it, beside the block sum ``R_h[b]`` (``psi`` has the layout of the block sums,
    one slice of ``n_psi`` entries per feature tile): :func:`_span_weight_kernel` forms from these
    the weight of the pairs that span each chunk.  ``later`` has the layout ``(batch entry or
    head, chunk or chunk slot, Dk · Dv)``."""
    if VARLEN:
        dead, n, b0, shift, a, e, i, I0, I1, base, span_c, t, tmask = sequence_chunk(tab_ptr, cs_ptr, C, LOG_C)
        if dead:
            return
        gi = tl.program_id(0)
        bh = tl.program_id(1).to(tl.int64)
        base += bh * n_total  # where the sequence's region of the hierarchy and the block sums starts
        E_end = e >> LOG_C  # the chunk of the end: the final state reads there
        lowest = 0
        off = level_start(n_chunks, n_bits - 1, span_c, VARLEN)  # where level h starts
        roff = 0  # (the block sums share the hierarchy's layout)
    else:
        i = 2 * tl.program_id(0)  # the pair's even chunk
        bh = tl.program_id(1).to(tl.int64)
        gi = i
        base = bh * n_total  # where the hierarchy of this batch entry starts
        lowest = 1  # the levels the pair shares
        off = level_start(n_chunks, n_bits - 1)  # where level h starts
        roff = bh * n_r + _reader_start(n_chunks, n_bits - 1)  # and in the block sums
        I0, I1, E_end = 0, 0, 0  # (no sequence)
    tile_f = tl.program_id(2)
    dk = (tile_f // N_DV_TILES) * BDK + tl.arange(0, BDK)
    dv = (tile_f % N_DV_TILES) * BDV + tl.arange(0, BDV)
    fmask = (dk[:, None] < DK) & (dv[None, :] < DV)
    tile = dk[:, None] * DV + dv[None, :]
    psi_ptr += tile_f.to(tl.int64) * n_psi
    later = tl.zeros((BDK, BDV), dtype=ACC)
    h = n_bits - 1
    while h >= lowest:
        b = i >> h
        if (b & 1) == 0:
            has_readers, whole = _reader_block(b + 1, h, n_chunks, I1, E_end, VARLEN)
            if has_readers:
                R = tl.load(r_ptr + _block_sum_entry(b + 1, h, base + off, roff, I0, VARLEN) * DK * DV + tile,
                            mask=fmask, other=0.0)
                if HAS_G:
                    if whole:  # (else nothing lies after the reader block: E is 0)
                        a_at = block_entry(base + off, b + 1, h, I0, VARLEN)
                        later = tl.exp(tl.load(a_ptr + a_at).to(ACC)) * later
                later += R
        elif HAS_G:
            if VARLEN:
                first = tl.maximum(b << h, I0) == i
            else:
                first = (i & ((1 << h) - 1)) == 0
            if first:
                H = tl.load(h_ptr + read_entry(base + off, i, h, I0, VARLEN) * DK * DV + tile,
                            mask=fmask, other=0.0).to(ACC)
                psi_at = _block_sum_entry(b, h, base + off, roff, I0, VARLEN)
                tl.store(psi_ptr + psi_at, tl.sum(tl.sum(H * later, 1), 0))
        h -= 1
        if h >= 0:
            off -= level_size(h, n_chunks, span_c if VARLEN else 0, VARLEN)
            if not VARLEN:
                roff -= _reader_blocks(n_chunks, h)
    if not VARLEN:
        if i + 1 < n_chunks:  # level 0 (at entry 0 of both): the odd chunk reads the even one's state
            r_at = _block_sum_entry(i + 1, 0, base, bh * n_r, I0, VARLEN)
            if HAS_G:
                H = tl.load(h_ptr + read_entry(base, i + 1, 0, I0, VARLEN) * DK * DV + tile, mask=fmask,
                            other=0.0).to(ACC)
                tl.store(psi_ptr + r_at, tl.sum(tl.sum(H * later, 1), 0))
            tl.store(later_ptr + (bh * n_chunks + i + 1) * DK * DV + tile, later.to(later_ptr.dtype.element_ty),
                     mask=fmask)
            R = tl.load(r_ptr + r_at * DK * DV + tile, mask=fmask, other=0.0)
            if HAS_G:
                later = tl.exp(tl.load(a_ptr + block_entry(base, i + 1, 0, I0, VARLEN)).to(ACC)) * later
            later += R
    tl.store(later_ptr + (bh * n_chunks + gi) * DK * DV + tile, later.to(later_ptr.dtype.element_ty), mask=fmask)


@triton.jit(do_not_specialize=["n_chunks", "n_total", "n_r", "n_bits", "n_psi", "n_tiles", "n_levels", "T", "n_parts",
                               "part_stride"])
def _span_weight_kernel(psi_ptr, a_ptr, out_ptr, tab_ptr, cs_ptr, gap_ptr, dgl_ptr, n_chunks, n_total, n_r, n_bits,
                        n_psi, n_tiles, n_levels, T, n_parts, part_stride, TILE: tl.constexpr, LOG_C: tl.constexpr,
                        ACC: tl.constexpr, VARLEN: tl.constexpr, ASSEMBLE: tl.constexpr):
    """Programs ``(group of TILE chunks or chunk slots, batch entry or head)``: the weight of the
    pairs that span chunk ``i`` inside one level block,
    ``Σ_h exp(A_i + ζ_h + γ_h) ψ_h[i >> h]`` over the set bits ``h`` of ``i``, from the Frobenius
    products ``ψ`` of :func:`_span_kernel` (summed over its ``n_tiles`` feature tiles): ``A_i``
    the chunk's log-decay, ``ζ_h`` that of the right siblings at the clear bits below ``h`` (from
    the chunk's end to its level-``h`` block's end), ``γ_h`` that of the blocks read at the set
    bits below ``h`` (from the end of the state read at ``h`` to the chunk's start).  Writes
    ``(batch entry or head, chunk or chunk slot)``.

    With ``ASSEMBLE`` (calls without sequences) it writes the decay gradient ``dg (batch entry, T)``
    itself instead: each position's chunk-local part (``dgl (n_parts, batch entry, n_chunks C)``,
    summed over its ``n_parts`` slices ``part_stride`` apart) plus its chunk's weight and its
    chunk's gap sums (``gap (batch entry, n_levels, n_chunks)`` of :func:`_gap_kernel`, summed over
    the levels), 0 at position 0, in ``out``'s dtype."""
    lane = tl.program_id(0) * TILE + tl.arange(0, TILE)
    bh = tl.program_id(1).to(tl.int64)
    if VARLEN:  # each lane's sequence (lanes past the slots read sequence 0's row)
        n = tl.load(cs_ptr + lane, mask=lane < n_chunks, other=0)
        _, _, length, a, base, span_c = sequence_row(tab_ptr, n)
        base += bh * n_total
        e, I0, I1 = sequence_chunks(a, length, LOG_C)
        E_end = e >> LOG_C
        first, _ = sequence_slots(tab_ptr, n)
        i = I0 + lane - first
        live = (lane < n_chunks) & (length > 0) & (i <= I1)
        A_i = tl.load(a_ptr + base + i - I0 + 1, mask=live, other=0.0).to(ACC)
        off = tl.zeros((TILE,), dtype=tl.int32)
        roff = 0  # (the block sums share the hierarchy's layout)
    else:
        i = lane
        live = i < n_chunks
        base = bh * n_total
        A_i = tl.load(a_ptr + base + i, mask=live, other=0.0).to(ACC)
        off = 0
        roff = bh * n_r
        I0, I1, E_end = 0, 0, 0  # (no sequence)
    gap = tl.zeros((TILE,), dtype=ACC)
    zeta = tl.zeros((TILE,), dtype=ACC)
    span = tl.zeros((TILE,), dtype=ACC)
    h = 0
    while h < n_bits:
        b = i >> h
        read = live & ((b & 1) == 1)
        holds, whole = _reader_block(b + 1, h, n_chunks, I1, E_end, VARLEN)
        after = live & ((b & 1) == 0) & holds & whole  # a whole reader block after i's
        psi = tl.zeros((TILE,), dtype=ACC)
        tile_ptr = psi_ptr + _block_sum_entry(b, h, base + off, roff, I0, VARLEN)  # n_psi entries a feature tile
        for f in range(n_tiles):
            psi += tl.load(tile_ptr, mask=read, other=0.0)
            tile_ptr += n_psi
        span += tl.where(read, tl.exp(A_i + zeta + gap) * psi, 0.0)
        gap += tl.load(a_ptr + read_entry(base + off, i, h, I0, VARLEN), mask=read, other=0.0).to(ACC)
        zeta += tl.load(a_ptr + block_entry(base + off, b + 1, h, I0, VARLEN), mask=after, other=0.0).to(ACC)
        off = next_level(off, h, n_chunks, span_c if VARLEN else 0, VARLEN)
        if not VARLEN:
            roff += _reader_blocks(n_chunks, h)
        h += 1
    if ASSEMBLE:
        C: tl.constexpr = 1 << LOG_C
        CB: tl.constexpr = 16  # positions of a chunk a step (C >= 16)
        gaps = tl.zeros((TILE,), dtype=ACC)
        for lv in range(n_levels):
            gaps += tl.load(gap_ptr + (bh * n_levels + lv) * n_chunks + lane, mask=live, other=0.0)
        weight = span + gaps
        for c0 in tl.static_range(0, C, CB):
            pos = lane[:, None] * C + c0 + tl.arange(0, CB)[None, :]
            inside = live[:, None] & (pos < T)
            local = tl.zeros((TILE, CB), dtype=ACC)
            part_ptr = dgl_ptr + bh * n_chunks * C + pos
            for _ in range(n_parts):
                local += tl.load(part_ptr, mask=inside, other=0.0)
                part_ptr += part_stride
            dg = tl.where(pos == 0, 0.0, local + weight[:, None])
            tl.store(out_ptr + bh * T + pos, dg.to(out_ptr.dtype.element_ty), mask=inside)
    else:
        tl.store(out_ptr + bh * n_chunks + lane, span, mask=lane < n_chunks)


@triton.jit(do_not_specialize=["n_total", "n_bits", "S_IN", "S_OUT"])
def _sequence_kernel(h_ptr, a_ptr, r_ptr, s_ptr, df_ptr, di_ptr, rc_ptr, le_ptr, tab_ptr, n_total, n_bits, S_IN,
                     S_OUT, DK: tl.constexpr, DV: tl.constexpr, N_DV_TILES, NB: tl.constexpr, C: tl.constexpr,
                     LOG_C: tl.constexpr, BDK: tl.constexpr, BDV: tl.constexpr, ACC: tl.constexpr,
                     FINAL: tl.constexpr):
    """Program ``(sequence, head, feature tile)`` of a call over sequences, after the block sums:

    1. with ``FINAL``, the final state's cotangent ``dF (N, H, S_OUT, Dk, Dv)`` enters as one more
       reader at the end ``e``: its levels ``> c`` are added to the block sums of the blocks that
       hold ``E = e >> c`` (as a chunk at ``E`` reads the hierarchy), and its row sums per level go
       to ``dg`` (``le``, ``rc``: the reads of the final state, and, when the call stays in the chunk
       of its start, the carried buckets of levels ``1..c`` it holds);
    2. ``d(initial state)`` (``di (N, H, S_IN, Dk, Dv)``): levels ``1..c`` get what the final state
       reads of them (the chunk kernel adds the rest), levels ``> c`` the adjoint of their entry of
       the hierarchy: its readers' block sum plus, through the blocks above it, the block sums of
       the readers of those, a Horner walk from the top level down."""
    n = tl.program_id(0).to(tl.int64)
    hd = tl.program_id(1).to(tl.int64)
    tile_f = tl.program_id(2)
    dk = (tile_f // N_DV_TILES) * BDK + tl.arange(0, BDK)
    dv = (tile_f % N_DV_TILES) * BDV + tl.arange(0, BDV)
    fmask = (dk[:, None] < DK) & (dv[None, :] < DV)
    tile = dk[:, None] * DV + dv[None, :]
    b0, row0, length, a, base, span = sequence_row(tab_ptr, n)
    base += hd * n_total
    e, I0, I1 = sequence_chunks(a, length, LOG_C)
    E = e >> LOG_C
    nonempty = length > 0
    first = (n * tl.num_programs(1) + hd) * S_IN
    levels = tl.arange(0, NB)
    A_part = tl.zeros((), dtype=ACC)
    if nonempty & ((e & (C - 1)) != 0):  # decay of the tokens of e's chunk
        A_part = tl.load(a_ptr + base + E - I0 + 1).to(ACC)
    if FINAL:
        out = (n * tl.num_programs(1) + hd) * S_OUT
        reads = tl.zeros((NB,), dtype=ACC)
        const = tl.zeros((), dtype=ACC)
        gap = A_part
        off = base
        h = 0
        while h < n_bits:
            if (((E >> h) & 1) == 1) & (LOG_C + h < S_OUT):
                blk = read_entry(off, E, h, I0, True)  # read by the final state (the block sums share this layout)
                dF = matrix_tile(df_ptr, out + LOG_C + h, dk, dv, DK, DV, ACC)
                wgt = tl.exp(gap)
                dst = r_ptr + blk * DK * DV + tile
                tl.store(dst, tl.load(dst, mask=fmask, other=0.0) + wgt * dF, mask=fmask)
                read = wgt * tl.sum(tl.sum(dF * matrix_tile(h_ptr, blk, dk, dv, DK, DV, ACC), 1), 0)
                reads = tl.where(levels == h, read, reads)
                const += read
                gap += tl.load(a_ptr + blk)
            off = next_level(off, h, 0, span, True)
            h += 1
        far = bit_length((a ^ e) & (C - 1))
        for l in tl.static_range(1, LOG_C + 1):
            if l <= S_IN:
                d_init = tl.zeros((BDK, BDV), dtype=ACC)
                if (E == I0) & reads_level(a, l):  # the carried bucket l is in the final state
                    dF = matrix_tile(df_ptr, out + tl.maximum(far, l) - 1, dk, dv, DK, DV, ACC)
                    d_init = tl.exp(A_part) * dF
                    const += tl.sum(tl.sum(d_init * matrix_tile(s_ptr, first + l - 1, dk, dv, DK, DV, ACC), 1), 0)
                tl.store(di_ptr + (first + l - 1) * DK * DV + tile, d_init, mask=fmask)
        tl.store(le_ptr + ((n * tl.num_programs(1) + hd) * tl.num_programs(2) + tile_f) * NB + levels, reads)
        tl.store(rc_ptr + (n * tl.num_programs(1) + hd) * tl.num_programs(2) + tile_f, const)
    else:
        for l in tl.static_range(1, LOG_C + 1):
            if l <= S_IN:
                tl.store(di_ptr + (first + l - 1) * DK * DV + tile, tl.zeros((BDK, BDV), dtype=ACC), mask=fmask)
    tl.debug_barrier()  # the block sums this program completed are read below
    top = base + level_start(0, n_bits, span, True)
    walk = tl.zeros((BDK, BDV), dtype=ACC)  # Σ over the readers of the blocks above, decayed to level h's block
    h = n_bits - 1
    while h >= 0:
        top -= level_size(h, 0, span, True)
        if ((I0 >> h) & 1) == 1:
            if LOG_C + h < S_IN:
                A_h = tl.zeros((), dtype=ACC)
                if nonempty:
                    A_h = tl.load(a_ptr + top + 1).to(ACC)
                d_init = matrix_tile(r_ptr, top, dk, dv, DK, DV, ACC) + tl.exp(A_h) * walk
                tl.store(di_ptr + (first + LOG_C + h) * DK * DV + tile, d_init, mask=fmask)
        else:
            A_r = tl.zeros((), dtype=ACC)
            if nonempty & (((I0 >> h) + 1) <= (I1 >> h)):
                A_r = tl.load(a_ptr + top + 2).to(ACC)
            walk = matrix_tile(r_ptr, top + 1, dk, dv, DK, DV, ACC) + tl.exp(A_r) * walk
            if LOG_C + h < S_IN:
                tl.store(di_ptr + (first + LOG_C + h) * DK * DV + tile, tl.zeros((BDK, BDV), dtype=ACC), mask=fmask)
        h -= 1
    h = LOG_C + n_bits
    while h < S_IN:
        tl.store(di_ptr + (first + h) * DK * DV + tile, tl.zeros((BDK, BDV), dtype=ACC), mask=fmask)
        h += 1


@triton.jit
def _block_sum(q_row, o_row, l_col, g_row, first, count, T, scale, sqt, sqd, sot, sod, slt, sgt, dk, dv,
               DK: tl.constexpr, DV: tl.constexpr, C: tl.constexpr, BDK: tl.constexpr, BDV: tl.constexpr,
               HAS_G: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr, LOWP: tl.constexpr,
               NATIVE: tl.constexpr, STAGES: tl.constexpr, lo=None):
    """``Σ_t scale λ_t exp(G_t - G_a) dO_t q_tᵀ`` (``(BDV, BDK)``, the transposed block sum) over
    the ``count`` chunks from chunk ``first``, ``a`` the last position before them; ``l_col``
    points at the level-scale column the rows read.  With ``lo`` (a sequence: rows ``t`` are
    absolute positions, the row pointers shifted to them) only the positions ``[lo, T)`` count."""
    r = tl.arange(0, C)
    acc = tl.zeros((BDV, BDK), dtype=ACC)
    gap = tl.zeros((), dtype=ACC)
    for j in tl.range(0, count, num_stages=STAGES):  # the next chunks' rows load while this one's product runs
        t = (first + j) * C + r
        if lo is None:
            tmask = t < T
        else:
            tmask = (t >= lo) & (t < T)
        G, g_next = chunk_decays(g_row, t, tmask, sgt, T, C, HAS_G, ACC, lo)
        lam = tl.load(l_col + t * slt, mask=tmask, other=0.0).to(ACC)
        qb = tl.load(q_row + t[:, None] * sqt + dk[None, :] * sqd, mask=tmask[:, None] & (dk[None, :] < DK),
                     other=0.0)
        ob = tl.load(o_row + t[:, None] * sot + dv[None, :] * sod, mask=tmask[:, None] & (dv[None, :] < DV),
                     other=0.0)
        qw = _rounded(qb.to(ACC) * (scale * lam * tl.exp(gap + G))[:, None], qb, LOWP, NATIVE)
        acc += dot(tl.trans(ob), qw, ACC, PREC, NATIVE)
        if HAS_G:
            gap += tl.sum(tl.load(g_row + t * sgt, mask=tmask, other=0.0).to(ACC), 0)
    return acc


@triton.jit(do_not_specialize=["T", "B1", "n_chunks", "n_total", "n_r", "n_bits", "slb0", "slb1", "slt",
                               "sgb0", "sgb1", "GRP"])
def _query_block_kernel(q_ptr, do_ptr, l_ptr, g_ptr, a_ptr, r_ptr, tab_ptr, gs_ptr,
                        T, B1, n_chunks, n_total, n_r, n_bits, DK: tl.constexpr, DV: tl.constexpr, N_DV_TILES,
                        scale, sqb0, sqb1, sqt, sqd, sob0, sob1, sot, sod, slb0, slb1, slt, sll, sgb0, sgb1, sgt, GRP,
                        C: tl.constexpr, LOG_C: tl.constexpr, P_LOG: tl.constexpr, BDK: tl.constexpr,
                        BDV: tl.constexpr, HAS_G: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
                        LOWP: tl.constexpr, NATIVE: tl.constexpr, VARLEN: tl.constexpr, STAGES: tl.constexpr):
    """Program ``(group * n_bits + level, batch entry, feature tile)`` over aligned groups of
    ``2^P_LOG`` chunks, the level varying fastest (the programs of one group read the same rows,
    from L2): a level below ``P_LOG`` sums the reader blocks inside the group and stores them;
    a higher level adds the group's share of the reader block that holds it (if any) atomically,
    decayed to the block's start by the groups before it.

    With ``VARLEN`` axis 0 runs over the global group slots (``group * n_bits + level``), axis 1
    over the heads; the groups are aligned to absolute chunk indices, only the chunks of the
    sequence count, and the block sums (zeroed before) take the layout of the hierarchy (entry
    ``b - (I0 >> h)`` for reader block ``b``: the first is the reader of the carried bucket)."""
    p = tl.program_id(0)
    h = p % n_bits
    if VARLEN:
        tile_f = tl.program_id(2)
        dk = (tile_f // N_DV_TILES) * BDK + tl.arange(0, BDK)
        dv = (tile_f % N_DV_TILES) * BDV + tl.arange(0, BDV)
        fmask = (dk[None, :] < DK) & (dv[:, None] < DV)
        r_tile = dk[None, :] * DV + dv[:, None]
        gslot = p // n_bits
        n = tl.load(gs_ptr + gslot).to(tl.int64)
        b0, row0, length, a, base, span = sequence_row(tab_ptr, n)
        e, I0, I1 = sequence_chunks(a, length, LOG_C)
        _, first_group = sequence_slots(tab_ptr, n)
        first = ((I0 >> P_LOG) + gslot - first_group) << P_LOG
        if (length == 0) | (first > I1):
            return
        hd = tl.program_id(1).to(tl.int64)
        base += hd * n_total
        off = base + level_start(0, h, span, True)
        shift = row0 - a
        q_row = q_ptr + b0 * sqb0 + (hd // GRP) * sqb1 + shift * sqt
        o_row = do_ptr + b0 * sob0 + hd * sob1 + shift * sot
        g_row = g_ptr + b0 * sgb0 + hd * sgb1 + shift * sgt
        l_col = l_ptr + b0 * slb0 + hd * slb1 + shift * slt + (LOG_C + 1 + h) * sll
        if h < P_LOG:
            nb = 0
            while nb < (1 << (P_LOG - h - 1)):
                b = (first >> h) + 2 * nb + 1
                lo_c = tl.maximum(b << h, I0)
                count = tl.minimum(((b + 1) << h) - 1, I1) - lo_c + 1
                if count > 0:
                    acc = _block_sum(q_row, o_row, l_col, g_row, lo_c, count, e, scale, sqt, sqd, sot, sod, slt, sgt,
                                     dk, dv, DK, DV, C, BDK, BDV, HAS_G, ACC, PREC, LOWP, NATIVE, STAGES, a)
                    tl.store(r_ptr + (off + b - (I0 >> h)) * DK * DV + r_tile, acc, mask=fmask)
                nb += 1
        else:
            b = first >> h
            lo_c = tl.maximum(first, I0)
            count = tl.minimum(first + (1 << P_LOG) - 1, I1) - lo_c + 1
            if (b & 1) == 1:
                acc = _block_sum(q_row, o_row, l_col, g_row, lo_c, count, e, scale, sqt, sqd, sot, sod, slt, sgt,
                                 dk, dv, DK, DV, C, BDK, BDV, HAS_G, ACC, PREC, LOWP, NATIVE, STAGES, a)
                dst = r_ptr + (off + b - (I0 >> h)) * DK * DV + r_tile
                if h == P_LOG:  # the group is the whole block
                    tl.store(dst, acc, mask=fmask)
                else:
                    before = tl.zeros((), dtype=ACC)
                    if HAS_G:  # the groups of the block before this one (from the sequence's first), level P_LOG
                        p_off = base + level_start(0, P_LOG, span, True)
                        k = tl.maximum(b << (h - P_LOG), I0 >> P_LOG)
                        while k < (first >> P_LOG):
                            before += tl.load(a_ptr + p_off + k - (I0 >> P_LOG) + 1)
                            k += 1
                    tl.atomic_add(dst, acc * tl.exp(before), mask=fmask, sem="relaxed")
    else:
        first = (p // n_bits) << P_LOG
        bh = tl.program_id(1).to(tl.int64)
        b0 = bh // B1
        b1 = bh % B1
        tile_f = tl.program_id(2)
        dk = (tile_f // N_DV_TILES) * BDK + tl.arange(0, BDK)
        dv = (tile_f % N_DV_TILES) * BDV + tl.arange(0, BDV)
        off, roff, n_readers = _levels_offsets(n_chunks, h)
        q_row = q_ptr + b0 * sqb0 + (b1 // GRP) * sqb1
        o_row = do_ptr + b0 * sob0 + b1 * sob1
        g_row = g_ptr + b0 * sgb0 + b1 * sgb1
        l_col = l_ptr + b0 * slb0 + b1 * slb1 + (LOG_C + 1 + h) * sll
        fmask = (dk[None, :] < DK) & (dv[:, None] < DV)
        r_tile = dk[None, :] * DV + dv[:, None]
        if h < P_LOG:
            nb = 0
            while nb < (1 << (P_LOG - h - 1)):
                b = (first >> h) + 2 * nb + 1
                count = tl.minimum(1 << h, n_chunks - (b << h))
                if count > 0:
                    acc = _block_sum(q_row, o_row, l_col, g_row, b << h, count, T, scale, sqt, sqd, sot, sod, slt,
                                     sgt, dk, dv, DK, DV, C, BDK, BDV, HAS_G, ACC, PREC, LOWP, NATIVE, STAGES)
                    tl.store(r_ptr + (bh * n_r + roff + (b >> 1)) * DK * DV + r_tile, acc, mask=fmask)
                nb += 1
        else:
            b = first >> h
            count = tl.minimum(1 << P_LOG, n_chunks - first)
            if ((b & 1) == 1) & (count > 0):
                acc = _block_sum(q_row, o_row, l_col, g_row, first, count, T, scale, sqt, sqd, sot, sod, slt, sgt,
                                 dk, dv, DK, DV, C, BDK, BDV, HAS_G, ACC, PREC, LOWP, NATIVE, STAGES)
                dst = r_ptr + (bh * n_r + roff + (b >> 1)) * DK * DV + r_tile
                if h == P_LOG:  # the group is the whole block
                    tl.store(dst, acc, mask=fmask)
                else:
                    before = tl.zeros((), dtype=ACC)
                    if HAS_G:
                        p_off, p_roff, p_readers = _levels_offsets(n_chunks, P_LOG)
                        entry = bh * n_total + p_off + ((b << h) >> P_LOG)
                        k = 0
                        while k < ((first - (b << h)) >> P_LOG):
                            before += tl.load(a_ptr + entry + k)
                            k += 1
                    tl.atomic_add(dst, acc * tl.exp(before), mask=fmask, sem="relaxed")


@triton.jit
def _shares(tile, diagonal, SIGN: tl.constexpr, N: tl.constexpr, OTHER: tl.constexpr):
    """``(n_before, n_after)``: how many shares of a gradient's feature tile ``tile`` the launches
    before and after launch ``diagonal`` add.  In launch ``j`` the tile meets the other side's
    tile ``(tile + SIGN·j) mod N``, a share where that is below ``OTHER`` (the other side's tile
    count; ``N`` is the larger of the two counts)."""
    n_before = 0
    n_after = 0
    for j in tl.static_range(N):
        has = ((tile + SIGN * j + N) % N) < OTHER
        n_before += tl.where(has & (j < diagonal), 1, 0)
        n_after += tl.where(has & (j > diagonal), 1, 0)
    return n_before, n_after


@triton.jit
def _add_share(dst, running, x, mask, n_before, n_after):
    """Add one feature tile's share ``x`` of a gradient: the running sum waits in ``running``
    (float32 / float64) between launches and the last share stores the total at ``dst`` (in its
    dtype).  Each launch adds at most one share of every element: no atomics, a fixed order."""
    total = x
    if n_before > 0:
        total += tl.load(running, mask=mask, other=0.0)
    if n_after > 0:
        tl.store(running, total, mask=mask)
    else:
        tl.store(dst, total, mask=mask)


@triton.jit(do_not_specialize=["T", "B1", "n_chunks", "n_total", "n_bits", "L", "slb0", "slb1", "slt",
                               "sgb0", "sgb1", "GRP", "S_IN", "S_OUT", "NBH", "diagonal"])
def _chunk_kernel(q_ptr, k_ptr, v_ptr, do_ptr, l_ptr, g_ptr, h_ptr, a_ptr, later_ptr, dq_ptr, dk_ptr, dv_ptr, dl_ptr,
                  dgl_ptr, lvl_ptr, s_ptr, di_ptr, df_ptr, rc_ptr, tab_ptr, cs_ptr, rq_ptr, rk_ptr, rv_ptr,
                  T, B1, n_chunks, n_total, n_bits, L, DK: tl.constexpr,
                  DV: tl.constexpr, diagonal, scale, GRP, S_IN, S_OUT, NBH,
                  sqb0, sqb1, sqt, sqd, skb0, skb1, skt, skd, svb0, svb1, svt, svd,
                  sob0, sob1, sot, sod, slb0, slb1, slt, sll, sgb0, sgb1, sgt,
                  sdqb0, sdqb1, sdqt, sdvb0, sdvb1, sdvt, sdlb0, sdlb1, sdlt,
                  C: tl.constexpr, LOG_C: tl.constexpr, FULL_CHUNKS: tl.constexpr,
                  BDK: tl.constexpr, BDV: tl.constexpr, BL: tl.constexpr,
                  NB: tl.constexpr, HAS_G: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr, EXACT: tl.constexpr,
                  LOWP: tl.constexpr, NATIVE: tl.constexpr, VARLEN: tl.constexpr,
                  FINAL: tl.constexpr, SIDE: tl.constexpr = 0):
    """Program ``(chunk i, batch entry, feature tile)``: every gradient of the chunk's rows.

    Writes ``dq``, ``dk``, ``dv``, ``dλ`` and, for ``dg`` (see :func:`attention_backward`), the
    chunk-local part of each row and the chunk's row sums per level (``lvl``, level-major).
    The later readers of the chunk's keys come in one ``Dk × Dv`` sum a chunk, ``later``
    (gathered by ``_span_kernel``; its dtype is that of the dots, float32 / float64 with
    ``VARLEN``).
    Heads split into feature tiles (``N_DK × N_DV`` of them) run as ``N = max(N_DK, N_DV)``
    launches, ``diagonal = 0 .. N − 1``: program ``a`` of axis 2 takes the key tile ``a`` and the
    value tile ``(a + diagonal) mod N`` (none where either is out of range), so that every tile of
    ``dq``, ``dk`` (summed over the value tiles) and ``dv`` (over the key tiles) gets at most one
    share a launch, added in launch order through the running sums ``rq``, ``rk``, ``rv``
    (``_add_share``); the other outputs are this tile's partial sums, in a slice of their own per
    tile.  Without
    ``VARLEN``, ``dq`` and ``dk`` (which share their strides), ``dv`` and ``dλ`` are written at
    the batch and row strides ``sdq*``, ``sdv*``, ``sdl*`` (unit feature stride; ``dλ``'s tile
    slices lie ``T · L`` apart per batch entry).

    With ``VARLEN`` (a call over sequences) axis 0 is the global chunk slot and axis 1 the head;
    ``dq, dk`` are per head of ``v`` (the caller sums each group).  The first chunk of a sequence
    also reads its carried buckets of levels ``1..c`` and adds their gradients (the direct reads
    and, through the chunk's state, the later readers) to ``d(initial state)``; with ``FINAL``
    the chunk of the end ``e`` (when it holds tokens) adds the gradients of the final state's
    levels ``1..c``.

    ``SIDE`` 1 or 2 (calls without sequences) makes the program one of two launches: the query
    side (``dq``, ``dλ``, the level row sums and the in-chunk and set-bit part of ``dg``) or the
    key side (``dk``, ``dv`` and the part of ``dg`` from the later readers), each forming the
    in-chunk products it needs; ``dg``'s parts go to a slice per side.  0: one program does both."""
    QUERIES: tl.constexpr = SIDE != 2
    KEYS: tl.constexpr = SIDE != 1
    if VARLEN:
        dead, n, b0, shift, a, e, i, I0, I1, base, span, t, tmask = sequence_chunk(tab_ptr, cs_ptr, C, LOG_C)
        if dead:
            return
        gi = tl.program_id(0)  # the chunk slot
        b1 = tl.program_id(1).to(tl.int64)
        base += b1 * n_total
        obh = b0 * tl.num_programs(1) + b1
        tr = t + shift
        gbh = b1
    else:
        i, bh, b0, b1, t, tmask = chunk_rows(B1, T, C, FULL_CHUNKS)
        tr = t
        gbh = bh
        gi = i
    bq1 = b1 // GRP  # the query and key head of a grouped head
    N_DK: tl.constexpr = (DK + BDK - 1) // BDK
    N_DV: tl.constexpr = (DV + BDV - 1) // BDV
    N: tl.constexpr = N_DK if N_DK > N_DV else N_DV
    TILED: tl.constexpr = N_DK * N_DV > 1
    tile_k = tl.program_id(2)
    if TILED:
        tile_v = (tile_k + diagonal) % N
        if (tile_k >= N_DK) | (tile_v >= N_DV):
            return
    else:
        tile_v = 0
    tile_f = tile_k * N_DV + tile_v
    dk = tile_k * BDK + tl.arange(0, BDK)
    dv = tile_v * BDV + tl.arange(0, BDV)
    kmask = tmask[:, None] & (dk[None, :] < DK)
    vmask = tmask[:, None] & (dv[None, :] < DV)
    fmask = (dk[:, None] < DK) & (dv[None, :] < DV)
    qb = tl.load(q_ptr + b0 * sqb0 + bq1 * sqb1 + tr[:, None] * sqt + dk[None, :] * sqd, mask=kmask, other=0.0)
    kb = tl.load(k_ptr + b0 * skb0 + bq1 * skb1 + tr[:, None] * skt + dk[None, :] * skd, mask=kmask, other=0.0)
    S = dot(qb, tl.trans(kb), ACC, PREC, NATIVE)
    vb = tl.load(v_ptr + b0 * svb0 + b1 * svb1 + tr[:, None] * svt + dv[None, :] * svd, mask=vmask, other=0.0)
    ob = tl.load(do_ptr + b0 * sob0 + b1 * sob1 + tr[:, None] * sot + dv[None, :] * sod, mask=vmask, other=0.0)
    dP = dot(ob, tl.trans(vb), ACC, PREC, NATIVE)
    if VARLEN:
        g_row = g_ptr + b0 * sgb0 + b1 * sgb1 + shift * sgt
        l_base = l_ptr + b0 * slb0 + b1 * slb1 + shift * slt
        G, g_next = chunk_decays(g_row, t, tmask, sgt, e, C, HAS_G, ACC, a)
        lam = intra_scales(l_base + (i * C) * slt, slt, sll, L, tmask, C)
    else:
        g_row = g_ptr + b0 * sgb0 + b1 * sgb1
        l_base = l_ptr + b0 * slb0 + b1 * slb1
        G, g_next = chunk_decays(g_row, t, tmask, sgt, T, C, HAS_G, ACC)
        lam = intra_scales(l_base + (i * C).to(tl.int64) * slt, slt, sll, L, tmask, C)
    Dec = causal_decay(G, g_next, tmask, C, HAS_G, EXACT) * scale
    Wd = dP * S * Dec
    col_l = tl.arange(0, BL)
    dl = tl.zeros((C, BL), dtype=ACC)
    M = lam.to(ACC) * Dec
    r = tl.arange(0, C)
    dS = M * dP
    if LOWP and NATIVE:
        dS = dS.to(kb.dtype)
    before = r[None, :] < r[:, None]  # [u, s]: s before u
    row = tl.zeros((C,), dtype=ACC)  # each row's pairs with keys before the chunk
    pairs = row  # dg_u of the pairs t >= u > s inside the chunk
    if QUERIES:
        dl = level_sums(Wd, C, LOG_C, BL)
        if HAS_G:  # each pair once, summed down its column from row u (its lower entries only)
            pairs = tl.sum(tl.where(before, tl.cumsum(M * dP * S, 0, reverse=True), 0.0), 1)
        dq = dot(dS, kb, ACC, PREC, NATIVE)
    if KEYS:
        Pm = M * S
        if LOWP and NATIVE:
            Pm = Pm.to(ob.dtype)
        dk_acc = dot(tl.trans(dS), qb, ACC, PREC, NATIVE)
        dv_acc = dot(tl.trans(Pm), ob, ACC, PREC, NATIVE)
    # levels > c, one walk over the set bits h of the chunk index, low to high: the chunk reads the
    # level-h state (i >> h) - 1 (dq, dλ)
    levels = tl.arange(0, NB)
    lvl_rows = tl.zeros((NB,), dtype=ACC)
    if QUERIES:
        gap = tl.zeros((), dtype=ACC)
        hbase = base if VARLEN else bh * n_total  # where the hierarchy of this batch entry or sequence starts
        off = 0  # where its level h starts
        h = 0
        while h < n_bits:
            if ((i >> h) & 1) == 1:
                blk = read_entry(hbase + off, i, h, I0 if VARLEN else 0, VARLEN)
                sb = tl.load(h_ptr + blk * DK * DV + dk[:, None] * DV + dv[None, :], mask=fmask, other=0.0)
                X = dot(ob, tl.trans(_rounded(sb, ob, LOWP, NATIVE)), ACC, PREC, NATIVE)
                e_t = scale * tl.exp(gap + G)
                if VARLEN:  # (L is checked on the host only for calls without sequences)
                    lam_h = tl.load(l_base + t * slt + (LOG_C + 1 + h) * sll,
                                    mask=tl.where(LOG_C + 1 + h < L, tmask, False), other=0.0).to(ACC)
                else:
                    lam_h = tl.load(l_base + t * slt + (LOG_C + 1 + h) * sll, mask=tmask, other=0.0).to(ACC)
                dq += (lam_h * e_t)[:, None] * X
                dl_h = e_t * tl.sum(qb.to(ACC) * X, 1)
                dl = tl.where(col_l[None, :] == LOG_C + 1 + h, dl_h[:, None], dl)
                row_h = lam_h * dl_h
                row += row_h
                lvl_rows = tl.where(levels == h, tl.sum(row_h, 0), lvl_rows)
                gap += tl.load(a_ptr + blk)
            off = next_level(off, h, n_chunks, span if VARLEN else 0, VARLEN)
            h += 1
    # the clear bits: the chunk's keys through every later reader, D = Σ_h exp(ζ_h) R_h, gathered
    # by _span_kernel (dk, dv; in the dots' dtype, or in ACC with VARLEN, where the initial state's
    # gradient below reads it too)
    if KEYS:
        D = tl.load(later_ptr + (gbh * n_chunks + gi) * DK * DV + dk[:, None] * DV + dv[None, :], mask=fmask,
                    other=0.0)
    if HAS_G:
        w = tl.exp(tl.cumsum(g_next, 0, reverse=True))
    else:
        w = tl.full((C,), 1.0, dtype=ACC)
    if VARLEN:
        local = tl.zeros((C,), dtype=ACC)  # terms of dg from the carried and the final state
        if i == I0:  # the carried buckets of levels 1..c: read by the chunk's rows, and through its state
            far = bit_length((t ^ a) & (C - 1))
            first = (n * tl.num_programs(1) + b1) * S_IN
            e_t = scale * tl.exp(G)
            A_i = tl.load(a_ptr + base + i - I0 + 1).to(ACC)
            for l in tl.static_range(1, LOG_C + 1):
                if (l <= S_IN) & reads_level(a, l):
                    sb = matrix_tile(s_ptr, first + l - 1, dk, dv, DK, DV, ACC)
                    X = dot(ob, tl.trans(_rounded(sb, ob, LOWP, NATIVE)), ACC, PREC, NATIVE)
                    lev = tl.maximum(far, l)
                    lam_l = tl.load(l_base + t * slt + lev * sll, mask=tmask, other=0.0).to(ACC)
                    dq += (lam_l * e_t)[:, None] * X
                    dl_l = e_t * tl.sum(qb.to(ACC) * X, 1)
                    dl = tl.where(col_l[None, :] == lev[:, None], dl + dl_l[:, None], dl)
                    row += lam_l * dl_l
                    qw = qb.to(ACC) * (lam_l * e_t)[:, None]
                    d_init = dot(tl.trans(qw), ob, ACC, PREC, NATIVE) + tl.exp(A_i) * D
                    dst = di_ptr + (first + l - 1) * DK * DV + dk[:, None] * DV + dv[None, :]
                    tl.store(dst, tl.load(dst, mask=fmask, other=0.0) + d_init, mask=fmask)
                    local += tl.exp(A_i) * tl.sum(tl.sum(D * sb, 1), 0)  # pairs of a later row and a carried key
        if FINAL:
            if (i == I1) & ((e & (C - 1)) != 0):  # the final state's levels 1..c hold this chunk's keys
                lev_e = bit_length((t ^ e) & (C - 1))
                col_e = tl.zeros((C,), dtype=ACC)
                out = (n * tl.num_programs(1) + b1) * S_OUT
                for l in tl.static_range(1, LOG_C + 1):
                    if l <= S_OUT:
                        dF = matrix_tile(df_ptr, out + l - 1, dk, dv, DK, DV, ACC)
                        w_l = tl.where((lev_e == l) & tmask, w, 0.0)
                        Y = dot(vb, tl.trans(_rounded(dF, vb, LOWP, NATIVE)), ACC, PREC, NATIVE)
                        dk_acc += w_l[:, None] * Y
                        dv_acc += w_l[:, None] * dot(kb, _rounded(dF, kb, LOWP, NATIVE), ACC, PREC, NATIVE)
                        col_e += w_l * tl.sum(kb.to(ACC) * Y, 1)
                # pairs of the final state and a key before u: in the chunk (col_e), and (rc) before it
                local += tl.sum(tl.where(before, col_e[None, :], 0.0), 1) + tl.load(
                    rc_ptr + (n * tl.num_programs(1) + b1) * (N_DK * N_DV) + tile_f)
    col_later = tl.zeros((C,), dtype=ACC)
    if KEYS:
        D = _rounded(D, kb, LOWP, NATIVE)
        dk_inter = w[:, None] * dot(vb, tl.trans(D), ACC, PREC, NATIVE)
        dv_acc += w[:, None] * dot(kb, D, ACC, PREC, NATIVE)
        dk_acc += dk_inter
        col_later = tl.sum(kb.to(ACC) * dk_inter, 1)  # pairs with a later chunk
    # the chunk-local part of dg_u: the pairs t >= u > s with at least one end in this chunk, each
    # added once (a difference of row and column sums cancels when a strong decay leaves dg_u far
    # below its terms)
    dgl = pairs + tl.cumsum(tl.where(tmask, row, 0.0), 0, reverse=True)
    if KEYS:
        dgl += tl.sum(tl.where(before, col_later[None, :], 0.0), 1)
    if VARLEN:
        dgl += local
        dq_dst = dq_ptr + (obh * T + tr[:, None]) * DK + dk[None, :]
        dk_dst = dk_ptr + (obh * T + tr[:, None]) * DK + dk[None, :]
        dv_dst = dv_ptr + (obh * T + tr[:, None]) * DV + dv[None, :]
        dl_dst = dl_ptr + ((tile_f.to(tl.int64) * NBH + obh) * T + tr[:, None]) * L + col_l[None, :]
        part = tile_f.to(tl.int64) * tl.num_programs(1)
        rows = obh * T + tr  # of the running sums
    else:
        dq_dst = dq_ptr + b0 * sdqb0 + b1 * sdqb1 + t[:, None] * sdqt + dk[None, :]
        dk_dst = dk_ptr + b0 * sdqb0 + b1 * sdqb1 + t[:, None] * sdqt + dk[None, :]
        dv_dst = dv_ptr + b0 * sdvb0 + b1 * sdvb1 + t[:, None] * sdvt + dv[None, :]
        part = tile_f.to(tl.int64) * tl.num_programs(1) if TILED else 0
        dl_dst = dl_ptr + part * T * L + b0 * sdlb0 + b1 * sdlb1 + t[:, None] * sdlt + col_l[None, :]
        rows = bh * T + t
    if TILED:  # the shares of this key tile (dq, dk) before and after this launch
        k_before, k_after = _shares(tile_k, diagonal, 1, N, N_DV)
    if QUERIES:
        if TILED:
            _add_share(dq_dst, rq_ptr + rows[:, None] * DK + dk[None, :], dq, kmask, k_before, k_after)
        else:
            tl.store(dq_dst, dq, mask=kmask)
        tl.store(dl_dst, dl, mask=tmask[:, None] & (col_l[None, :] < L))
        tl.store(lvl_ptr + ((part + gbh) * NB + levels) * n_chunks + gi, lvl_rows)
    if KEYS:
        if TILED:
            _add_share(dk_dst, rk_ptr + rows[:, None] * DK + dk[None, :], dk_acc, kmask, k_before, k_after)
            v_before, v_after = _shares(tile_v, diagonal, -1, N, N_DK)
            _add_share(dv_dst, rv_ptr + rows[:, None] * DV + dv[None, :], dv_acc, vmask, v_before, v_after)
        else:
            tl.store(dk_dst, dk_acc, mask=kmask)
            tl.store(dv_dst, dv_acc, mask=vmask)
    if SIDE != 0:  # dg's parts: a slice per side after those of the feature tiles
        part += (SIDE - 1) * (N_DK * N_DV) * tl.num_programs(1)
    tl.store(dgl_ptr + ((part + gbh) * n_chunks + gi) * C + r, dgl)


@triton.jit
def _segment_sum(start_a, sum_a, start_b, sum_b):
    """Combine of a segmented inclusive scan: a sum restarts where a segment starts."""
    return start_a | start_b, tl.where(start_b != 0, sum_b, sum_a + sum_b)


@triton.jit(do_not_specialize=["n"])
def _gap_kernel(rows_ptr, out_ptr, idx_ptr, own_ptr, n, TILE: tl.constexpr, VARLEN: tl.constexpr):
    """Program ``(row b, level h)`` of ``rows (B, levels, n)``, each chunk's row sums per level:
    ``out[b, h, p] = Σ rows[b, h, j]`` over the later chunks ``j`` of ``p``'s own level-``h``
    block where bit ``h`` of ``p``'s chunk index is set (the pairs that span ``p`` with ``p`` in
    the gap between the state ``j`` reads at level ``h`` and ``j``), else 0.  With ``VARLEN`` the
    slots ``p`` hold chunk ``idx[p]`` of sequence ``own[p]`` (-1: no live chunk), and blocks stop
    at their sequence's last live chunk.  Each sum is a segmented scan down the block from its
    end, tile by tile with a carry: every term is added once, never as a difference of prefix
    sums (which cancel when a strong decay leaves the result far below the earlier terms)."""
    h = tl.program_id(1)
    base = (tl.program_id(0).to(tl.int64) * tl.num_programs(1) + h) * n
    k = tl.arange(0, TILE)
    carry = tl.zeros((), dtype=out_ptr.dtype.element_ty)
    n_tiles = tl.cdiv(n, TILE)
    for step in range(0, n_tiles):
        p = (n_tiles - 1 - step) * TILE + (TILE - 1) - k  # the tile's positions, last first
        valid = p < n
        if VARLEN:
            chunk = tl.load(idx_ptr + p, mask=valid, other=0)
            owner = tl.load(own_ptr + p, mask=valid, other=-1)
            later = tl.load(idx_ptr + p + 1, mask=p + 1 < n, other=0)
            joined = (tl.load(own_ptr + p + 1, mask=p + 1 < n, other=-1) == owner) & (owner >= 0) & (
                (later >> h) == (chunk >> h))
            bit = (((chunk >> h) & 1) == 1) & (owner >= 0)
        else:
            joined = (p + 1 < n) & (((p + 1) >> h) == (p >> h))
            bit = ((p >> h) & 1) == 1
        x = tl.load(rows_ptr + base + p + 1, mask=joined & valid, other=0.0)
        started, total = tl.associative_scan(((~joined).to(tl.int32), x), 0, _segment_sum)
        total += tl.where(started == 0, carry, 0.0)  # a block that continues into the next tile
        carry = tl.sum(tl.where(k == TILE - 1, total, 0.0), 0)
        tl.store(out_ptr + base + p, tl.where(bit & valid, total, 0.0), mask=valid)


def _gap_sums(level_rows, chunk_index=None, owner=None):
    """Per chunk (slot) and level ``h``: the summed weights of the pairs that span it with it in the
    gap between the state a later chunk reads at level ``h`` and that chunk -- the later chunks of
    its own level-``h`` block when bit ``h`` of its index is set.  ``level_rows (B, levels, n)``
    holds each chunk's row sums per level; ``chunk_index``, ``owner (n,)`` give each slot's chunk
    and sequence in calls over sequences (:func:`_gap_kernel`).  Returns ``(B, levels, n)``."""
    B, levels, n = level_rows.shape
    level_rows = level_rows.contiguous()
    out = torch.empty_like(level_rows)
    varlen = chunk_index is not None
    _gap_kernel[(B, levels, 1)](level_rows, out, chunk_index if varlen else level_rows,
                             owner if varlen else level_rows, n, TILE=128, VARLEN=varlen, num_warps=4)
    return out


def _feature_tiles(DK: int, DV: int):
    """``(BDK, BDV, value tiles, tiles, launches)`` of a head: feature tiles of at most
    :data:`MAX_TILE` columns, and the launches a side of the chunk kernel, one diagonal of
    (key tile, value tile) programs each (the larger of the two tile counts; ``_chunk_kernel``)."""
    BDK, BDV = block(DK, MAX_TILE), block(DV, MAX_TILE)
    n_dk, n_dv = cdiv(DK, BDK), cdiv(DV, BDV)
    return BDK, BDV, n_dv, n_dk * n_dv, max(n_dk, n_dv)


def _width_key(BDK: int, BDV: int) -> str:
    """The key of :data:`SIDE_LAUNCHES` and :data:`BLOCK_SUM_STAGES` for feature tiles ``BDK × BDV``."""
    return "attention_backward" if max(BDK, BDV) <= 64 else "attention_backward_wide"


def _span_tiles(DK: int, BDK: int, n_dv: int):
    """``(key rows, tiles)`` of the ``_span_kernel`` programs of a chunk: the chunk kernel's key
    tiles split into tiles of at most :data:`SPAN_KEY_ROWS` rows, times its value tiles."""
    rows = min(BDK, SPAN_KEY_ROWS)
    return rows, cdiv(DK, rows) * n_dv


def attention_backward(q, k, v, level_scales, log_decay, scale, do, *, chunk=None, out=None, states=None):
    """Gradients of ``O = attention(q, k, v, level_scales, log_decay, scale)`` for ``dO``.

    Parameters
    ----------
    q, k : torch.Tensor, shape ``(*batch, T, Dk)``
    v, do : torch.Tensor, shape ``(*batch, T, Dv)``
    level_scales : torch.Tensor, shape ``(*batch, T, L)``
    log_decay : torch.Tensor, shape ``(*batch, T)``, or None
        Leading dims broadcast (views are read in place, never copied); any strides.
    scale : float
    chunk : int, optional
        Power of two in ``[16, 256]``; default the forward's, ``DEFAULT_CHUNK["attention"]``.
    out : tuple of torch.Tensor or None, optional
        ``(dq, dk, dv, dlevel_scales)`` buffers (each may be None) of exactly the inputs' broadcast
        batch and widths (``(*batch, T, Dk)`` …; checked, as is that they share no memory with an
        input or each other), in the inputs' dtypes with a unit feature stride (any other layout):
        written in place, and returned, when the batch folds them as views; ``dq`` and ``dk`` only together and with equal
        strides, ``dlevel_scales`` only when the head fits one feature tile (``Dk, Dv <=
        MAX_TILE``).  The other gradients come in new tensors.  A caller that wants the gradients
        laid out like strided inputs saves a copy.
    states : tuple of torch.Tensor, optional
        ``(states, logdec)`` of the forward (:func:`kernels.attention_forward` with
        ``return_states=True``, the same inputs and chunk): read instead of recomputed.

    Returns
    -------
    (dq, dk, dv, dlevel_scales, dlog_decay)
        Of shape ``(*batch, T, ·)`` (the broadcast batch) in the inputs' dtypes (``dlog_decay`` is
        None when ``log_decay`` is None).  Never-read level scales get exactly 0.
    """
    if out is not None and (not isinstance(out, (tuple, list)) or len(out) != 4):
        raise TypeError(f"out must be a tuple of 4 tensors or None (dq, dk, dv, dlevel_scales), got "
                        f"{type(out).__name__}" + (f" of {len(out)}" if isinstance(out, (tuple, list)) else ""))
    buffers = {} if out is None else {name: x for name, x in zip(("dq", "dk", "dv", "dl"), out) if x is not None}
    scale = check_scale(scale)
    layout = attention_layout(q, k, v, level_scales, log_decay, do=do, out=buffers)
    T, DK, DV, L, B = layout.T, layout.DK, layout.DV, layout.L, layout.B
    C = check_chunk(chunk, "attention")
    v = layout.tensors["v"]
    dev = v.device
    acc, prec, exact = compute_types(v.dtype)
    acc_torch = torch.float64 if v.dtype == torch.float64 else torch.float32
    lowp, native = v.dtype == torch.bfloat16, not interpreting()
    n = chunk_count(T, C)
    n_bits = (n - 1).bit_length()
    if states is None:
        states, logdec = chunk_states(layout, C, *state_dtypes(v.dtype))
    else:
        states, logdec = _saved_states(states, layout, C, v.dtype)
    BDK, BDV, n_dv, tiles, diagonals = _feature_tiles(DK, DV)
    tiled = tiles > 1
    has_g = layout.tensors["g"] is not None
    warps = NUM_WARPS["attention_backward"]
    meta = dict(HAS_G=has_g, ACC=acc, PREC=prec, LOWP=lowp, NATIVE=native, num_warps=warps)
    strides = (*layout.args("q")[1:], *layout.args("k")[1:], *layout.args("v")[1:], *layout.args("do")[1:],
               *layout.args("l")[1:], *layout.decay_args()[1:])
    ptrs = (layout.tensors["q"], layout.tensors["k"], v, layout.tensors["do"], layout.tensors["l"],
            layout.decay_args()[0])
    # query-side block sums
    r_counts = [(((n + (1 << h) - 1) >> h) >> 1) for h in range(n_bits)]
    n_r = max(1, sum(r_counts))
    p_log = TILE_CHUNKS.bit_length() - 1
    rsum = scratch((B, n_r, DK * DV), acc_torch, dev)
    summed = sum(r_counts[p_log + 1:])  # levels of blocks larger than a tile: summed atomically
    if summed:
        rsum[:, n_r - summed:].zero_()
    if n_bits:
        _query_block_kernel[(cdiv(n, TILE_CHUNKS) * n_bits, B, tiles)](
            layout.tensors["q"], layout.tensors["do"], layout.tensors["l"], layout.decay_args()[0], logdec, rsum,
            logdec, logdec, T, layout.B1, n, states.shape[1], n_r, n_bits, DK, DV, n_dv, scale,
            *layout.args("q")[1:], *layout.args("do")[1:], *layout.args("l")[1:], *layout.decay_args()[1:],
            layout.group, C=C, LOG_C=C.bit_length() - 1, P_LOG=p_log, BDK=BDK, BDV=BDV, VARLEN=False,
            STAGES=BLOCK_SUM_STAGES[_width_key(BDK, BDV)], **meta)
    # the later readers of each chunk's keys (and, with a decay, the Frobenius products behind the
    # weight of the pairs spanning each chunk, beside the block sums, a slice per feature tile)
    later = scratch((B, n, DK * DV), v.dtype if lowp and native else acc_torch, dev)
    span_rows, span_tiles = _span_tiles(DK, BDK, n_dv)
    psi = scratch((span_tiles, B, n_r), acc_torch, dev) if has_g else logdec
    _span_kernel[(cdiv(n, 2), B, span_tiles)](states, logdec, rsum, psi, later, logdec, logdec, n, states.shape[1],
                                              n_r, n_bits, B * n_r, DK, DV, n_dv, BDK=span_rows, BDV=BDV,
                                              HAS_G=has_g, ACC=acc, C=C, LOG_C=C.bit_length() - 1, VARLEN=False,
                                              num_warps=NUM_WARPS["attention_span"])
    del rsum  # read by nothing after the span kernel: the gradients below may take its memory
    # dq, dk, dv straight in the inputs' dtypes (feature tiles keep their running sums in
    # float32 / float64 between launches); dλ a slice per feature tile, summed below
    batch = layout.batch
    NB = next_power_of_2(max(n_bits, 1))
    in_place = {
        name for name, like in zip(("dq", "dk", "dv", "dl"), (q, k, v, level_scales))
        if name in buffers and buffers[name].shape[:-2] == batch and buffers[name].stride(-1) == 1
        and buffers[name].dtype == like.dtype and layout.reads_in_place(name, buffers[name])
        and not (tiled and name == "dl")}
    if not ({"dq", "dk"} <= in_place and layout.args("dq")[1:] == layout.args("dk")[1:]):
        in_place -= {"dq", "dk"}  # the chunk kernel stores dq and dk through one set of strides
    B1 = layout.B1
    if "dq" in in_place:
        dq, dk, dq_strides = layout.tensors["dq"], layout.tensors["dk"], layout.args("dq")[1:4]
    else:
        dq, dk = (torch.empty((B, T, DK), dtype=x.dtype, device=dev) for x in (q, k))
        dq_strides = (B1 * T * DK, T * DK, DK)
    if "dv" in in_place:
        dv, dv_strides = layout.tensors["dv"], layout.args("dv")[1:4]
    else:
        dv, dv_strides = torch.empty((B, T, DV), dtype=v.dtype, device=dev), (B1 * T * DV, T * DV, DV)
    if "dl" in in_place:
        dl, dl_strides = layout.tensors["dl"], layout.args("dl")[1:4]
    else:
        dl = torch.empty((tiles * B, T, L), dtype=acc_torch if tiled else level_scales.dtype, device=dev)
        dl_strides = (B1 * T * L, T * L, L)
    out_strides = (*dq_strides, *dv_strides, *dl_strides)
    running = [scratch((B, T, D), acc_torch, dev) if tiled else logdec for D in (DK, DK, DV)]
    sides = SIDE_LAUNCHES[_width_key(BDK, BDV)]
    dgl = scratch((tiles * sides * B, n * C), acc_torch, dev)
    lvl_rows = scratch((tiles * B, NB, n), acc_torch, dev)
    for side in ((0,) if sides == 1 else (1, 2)):
        for diagonal in range(diagonals):
            _chunk_kernel[(n, B, diagonals)](
                *ptrs, states, logdec, later, dq, dk, dv, dl, dgl, lvl_rows, logdec, logdec, logdec, logdec, logdec,
                logdec, *running, T, layout.B1, n, states.shape[1], n_bits, L, DK, DV, diagonal, scale,
                layout.group, 0, 0, 0, *strides, *out_strides, C=C, LOG_C=C.bit_length() - 1,
                FULL_CHUNKS=T % C == 0, BDK=BDK, BDV=BDV, BL=next_power_of_2(L), NB=NB, EXACT=exact, VARLEN=False,
                FINAL=False, SIDE=side, **meta)
    dg = None
    if has_g:  # the span weights' launch adds the chunk-local parts and the gap sums and writes dg
        if tiled:
            lvl_rows = lvl_rows.view((tiles, -1) + lvl_rows.shape[1:]).sum(0)
        gaps = _gap_sums(lvl_rows)
        dg = torch.empty((B, T), dtype=log_decay.dtype, device=dev)
        _span_weight_kernel[(cdiv(n, SPAN_WEIGHT_CHUNKS), B, 1)](
            psi, logdec, dg, logdec, logdec, gaps, dgl, n, states.shape[1], n_r, n_bits, B * n_r, span_tiles,
            gaps.shape[1], T, tiles * sides, B * n * C, TILE=SPAN_WEIGHT_CHUNKS, LOG_C=C.bit_length() - 1, ACC=acc,
            VARLEN=False, ASSEMBLE=True, num_warps=SPAN_WEIGHT_WARPS)
        dg = dg.reshape(batch + (T,))
    if tiled:
        dl = dl.view((tiles, -1) + dl.shape[1:]).sum(0)
    made = {"dq": (dq, q), "dk": (dk, k), "dv": (dv, v), "dl": (dl, level_scales)}
    return tuple(buffers[name] if name in in_place else x.reshape(batch + x.shape[-2:]).to(like.dtype)
                 for name, (x, like) in made.items()) + (dg,)


def _saved_states(saved, layout, C: int, dtype):
    """``(states, logdec)`` handed to :func:`attention_backward` by the forward, checked against
    the call: a tuple of two tensors on the inputs' device with the shapes and dtypes of
    :func:`kernels.attention.state_shapes` at chunk ``C`` (another chunk size gives another
    number of entries)."""
    if not (isinstance(saved, (tuple, list)) and len(saved) == 2 and all(isinstance(x, torch.Tensor) for x in saved)):
        what = type(saved).__name__
        if isinstance(saved, (tuple, list)):
            what += f" of {len(saved)}: " + ", ".join(type(x).__name__ for x in saved)
        raise TypeError(f"states must be the (states, logdec) tensors of attention_forward(..., return_states=True), "
                        f"got {what}")
    states, logdec = saved
    (shape, state_dtype), (log_shape, logdec_dtype) = state_shapes(layout.B, layout.T, layout.DK, layout.DV, dtype, C)
    want = (shape, state_dtype, log_shape, logdec_dtype)
    got = (tuple(states.shape), states.dtype, tuple(logdec.shape), logdec.dtype)
    device = layout.tensors["v"].device
    if got != want or states.device != device or logdec.device != device:
        raise ValueError(f"states must be the forward's (states, logdec) for these inputs and chunk size: "
                         f"{want[0]} {want[1]} and {want[2]} {want[3]} on {device}, got {got[0]} {got[1]} on "
                         f"{states.device} and {got[2]} {got[3]} on {logdec.device}")
    return states.contiguous(), logdec.contiguous()


def _sequence_dg(seqs, C: int, dgl, span, level_rows, final_reads, N: int, T: int, acc_dtype):
    """``dg (N, H, T)`` of a call over sequences from the per-chunk-slot parts (``dgl (H, slots *
    C)``, ``span (H, slots)``, ``level_rows (H, NB, slots)``, ``final_reads (count, H, NB)`` or
    None): the chunk-local sums, the pairs spanning each chunk (the span kernel's, and those with
    the later chunks of its own level block (:func:`_gap_sums`) and the final state as
    readers), gathered to the tokens; exactly 0 at absolute position 0."""
    dev = dgl.device
    H, levels = level_rows.shape[:2]
    c = C.bit_length() - 1
    slot = torch.arange(seqs.n_slots, device=dev)
    seq = seqs.chunk_seq.long()
    tab = seqs.table[seq]
    a, length, first = tab[:, 3], tab[:, 2], tab[:, 6]
    I0, e = a >> c, a + length
    I, I1, E = I0 + slot - first, (e - 1) >> c, e >> c
    live = (length > 0) & (I <= I1)
    across = _gap_sums(level_rows, I, torch.where(live, seq, -1)).sum(1)
    if final_reads is not None:
        h = torch.arange(levels, device=dev)[:, None]
        later = (((I >> h) & 1) == 1) & live & ((E >> h) == (I >> h)) & (E > I)
        across = across + torch.where(later, final_reads[seq].permute(1, 2, 0).to(acc_dtype), 0).sum(1)
    per_slot = dgl.view(H, seqs.n_slots, C) + (span + across)[..., None]
    # the tokens: sequence n's token j is position a_n + j, in row row0_n + j of batch row b0_n
    owner = np.repeat(np.arange(seqs.count), seqs.lengths)
    j = np.arange(owner.size) - np.repeat(np.cumsum(seqs.lengths) - seqs.lengths, seqs.lengths)
    owner_t = torch.as_tensor(owner, device=dev)
    p = seqs.table[owner_t, 3] + torch.as_tensor(j, device=dev)
    src = (seqs.table[owner_t, 6] + (p >> c) - (seqs.table[owner_t, 3] >> c)) * C + (p & (C - 1))
    dst = seqs.table[owner_t, 0] * T + seqs.table[owner_t, 1] + torch.as_tensor(j, device=dev)
    dg = per_slot.new_empty((H, N * T))
    dg[:, dst] = torch.where(p == 0, 0, per_slot.reshape(H, -1)[:, src])
    return dg.view(H, N, T).transpose(0, 1)


def attention_state_backward(q, k, v, level_scales, log_decay, scale, do, dfinal=None, *, chunk=None,
                             initial_state=None, initial_positions=None, cu_seqlens=None):
    """Gradients of :func:`hodlr.kernels.attention_state_forward` (same arguments) for the
    cotangents ``do (N, H, T, Dv)`` and ``dfinal`` (that of the final state, ``(Nseq, H, S, Dk,
    Dv)``; None when the final state was not asked for or got none).  ``S`` may differ from the
    forward's slot count ``S'``: slots past ``S'`` hold constant zeros (a caller's padding) and
    are ignored, slots missing from ``dfinal`` get a zero cotangent.

    Returns
    -------
    (dq, dk, dv, dlevel_scales, dlog_decay, dinitial_state)
        ``dq, dk`` of the shape of ``q`` (each head summed over the heads of ``v`` that read it),
        the others of their inputs' shapes, in the inputs' dtypes (``dlog_decay`` None without a
        log-decay, ``dinitial_state`` None without a state).  Never-read level scales get exactly 0.
    """
    scale = check_scale(scale)
    layout = sequence_layout(q, k, v, level_scales, log_decay, do=do)
    N, Hqk, H, T, DK, DV, L = layout.N, layout.Hqk, layout.H, layout.T, layout.DK, layout.DV, layout.L
    if dfinal is not None:
        check_tensor("dfinal", dfinal, "S, Dk, Dv")
    C = check_chunk(chunk, "attention")
    c = C.bit_length() - 1
    dev = v.device
    acc, prec, exact = compute_types(v.dtype)
    acc_torch = torch.float64 if v.dtype == torch.float64 else torch.float32
    state_dtype, logdec_dtype = state_dtypes(v.dtype)
    count = N if cu_seqlens is None else cu_seqlens.shape[0] - 1
    initial, positions = check_initial_state(initial_state, initial_positions, count, layout, state_dtype)
    S_in = 0 if initial is None else initial.shape[2]
    p_log = TILE_CHUNKS.bit_length() - 1
    seqs = _sequences.plan(N, T, C, cu_seqlens, positions, S_in, dev, group_log=p_log)
    final = dfinal is not None
    if final and (dfinal.dim() != 5 or tuple(dfinal.shape[:2]) + tuple(dfinal.shape[3:]) != (count, H, DK, DV)):
        raise ValueError(f"dfinal must have the final state's shape {(count, H, seqs.final_slots, DK, DV)} "
                         f"(any number of slots), got {tuple(dfinal.shape)}")
    if final:  # slots past the forward's final state are constant zeros: their cotangent is dropped
        S_given = dfinal.shape[2]
        dfinal = dfinal[:, :, :seqs.final_slots] if S_given >= seqs.final_slots else \
            torch.nn.functional.pad(dfinal, (0, 0, 0, 0, 0, seqs.final_slots - S_given))
        dfinal = dfinal.to(state_dtype).contiguous()
    states, logdec = sequence_states(layout, seqs, C, initial, state_dtype, logdec_dtype)
    NH = seqs.levels
    BDK, BDV, n_dv, tiles, diagonals = _feature_tiles(DK, DV)
    tiled = tiles > 1
    has_g = log_decay is not None
    warps = NUM_WARPS["attention_backward"]
    meta = dict(HAS_G=has_g, ACC=acc, PREC=prec, LOWP=v.dtype == torch.bfloat16, NATIVE=not interpreting(),
                num_warps=warps)
    grp = H // Hqk
    dummy = logdec
    # block sums, in the layout of the hierarchy (zeroed: larger blocks are summed atomically)
    rsum = torch.zeros((H, seqs.n_entries, DK * DV), dtype=acc_torch, device=dev)
    if seqs.n_groups and H:
        _query_block_kernel[(seqs.n_groups * NH, H, tiles)](
            q, do, level_scales, layout.decay_args()[0], logdec, rsum, seqs.table, seqs.group_seq, T, 1, 0,
            seqs.n_entries, 0, NH, DK, DV, n_dv, scale, *layout.args("q")[1:], *layout.args("do")[1:],
            *layout.args("l")[1:], *layout.decay_args()[1:], grp, C=C, LOG_C=c, P_LOG=p_log, BDK=BDK, BDV=BDV,
            VARLEN=True, STAGES=BLOCK_SUM_STAGES[_width_key(BDK, BDV)], **meta)
    NB = next_power_of_2(NH)
    dinit = None if initial is None else scratch(initial.shape, initial.dtype, dev)
    rc = scratch((count, H, tiles), acc_torch, dev)
    reads = scratch((count, H, tiles, NB), acc_torch, dev)
    if (final or initial is not None) and count and H:
        _sequence_kernel[(count, H, tiles)](
            states, logdec, rsum, dummy if initial is None else initial, dummy if dfinal is None else dfinal,
            dummy if dinit is None else dinit, rc, reads, seqs.table, seqs.n_entries, NH, S_in, seqs.final_slots,
            DK, DV, n_dv, NB=NB, C=C, LOG_C=c, BDK=BDK, BDV=BDV, ACC=acc, FINAL=final, num_warps=warps)
    later = scratch((H, seqs.n_slots, DK * DV), acc_torch, dev)
    span_rows, span_tiles = _span_tiles(DK, BDK, n_dv)
    psi = scratch((span_tiles, H, seqs.n_entries), acc_torch, dev) if has_g else dummy
    if seqs.n_slots and H:
        _span_kernel[(seqs.n_slots, H, span_tiles)](states, logdec, rsum, psi, later, seqs.table, seqs.chunk_seq,
                                                    seqs.n_slots, seqs.n_entries, 0, NH, H * seqs.n_entries, DK, DV,
                                                    n_dv, BDK=span_rows, BDV=BDV, HAS_G=has_g, ACC=acc, C=C,
                                                    LOG_C=c, VARLEN=True, num_warps=NUM_WARPS["attention_span"])
    del rsum  # read by nothing after the span kernel
    # every gradient of the chunks' rows; dq and dk per head of v (summed over each group below)
    # (dq and dk are their own running sums over feature tiles; dv has one apart when tiled)
    dq, dk = scratch((N * H, T, DK), acc_torch, dev), scratch((N * H, T, DK), acc_torch, dev)
    dv = scratch((N * H, T, DV), v.dtype, dev)
    dv_running = scratch((N * H, T, DV), acc_torch, dev) if tiled else dummy
    dl = scratch((tiles * N * H, T, L), acc_torch if tiled else level_scales.dtype, dev)
    dgl = scratch((tiles * H, seqs.n_slots * C), acc_torch, dev)
    lvl_rows = scratch((tiles * H, NB, seqs.n_slots), acc_torch, dev)
    for diagonal in range(diagonals if seqs.n_slots and H else 0):
        _chunk_kernel[(seqs.n_slots, H, diagonals)](
            q, k, v, do, level_scales, layout.decay_args()[0], states, logdec, later, dq, dk, dv, dl, dgl, lvl_rows,
            dummy if initial is None else initial, dummy if dinit is None else dinit,
            dummy if dfinal is None else dfinal, rc, seqs.table, seqs.chunk_seq, dq, dk, dv_running, T, 1,
            seqs.n_slots, seqs.n_entries, NH, L, DK, DV, diagonal, scale, grp, S_in, seqs.final_slots,
            N * H, *layout.args("q")[1:], *layout.args("k")[1:], *layout.args("v")[1:], *layout.args("do")[1:],
            *layout.args("l")[1:], *layout.decay_args()[1:], *(0,) * 9, C=C, LOG_C=c, FULL_CHUNKS=False, BDK=BDK,
            BDV=BDV, BL=next_power_of_2(L), NB=NB, EXACT=exact, VARLEN=True, FINAL=final, **meta)
    dg = None
    if has_g:
        span = scratch((H, seqs.n_slots), acc_torch, dev)
        if seqs.n_slots and H:
            _span_weight_kernel[(cdiv(seqs.n_slots, SPAN_WEIGHT_CHUNKS), H, 1)](
                psi, logdec, span, seqs.table, seqs.chunk_seq, logdec, logdec, seqs.n_slots, seqs.n_entries, 0, NH,
                H * seqs.n_entries, span_tiles, 0, 0, 0, 0, TILE=SPAN_WEIGHT_CHUNKS, LOG_C=c, ACC=acc, VARLEN=True,
                ASSEMBLE=False, num_warps=1)
        if tiled:
            dgl, lvl_rows = (x.view((tiles, -1) + x.shape[1:]).sum(0) for x in (dgl, lvl_rows))
        dg = _sequence_dg(seqs, C, dgl, span, lvl_rows, reads.sum(2) if final else None, N, T, acc_torch)
        dg = dg.to(log_decay.dtype)
    if tiled:
        dl = dl.view((tiles, -1) + dl.shape[1:]).sum(0)
    dq = dq.view(N, Hqk, grp, T, DK).sum(2).to(q.dtype)
    dk = dk.view(N, Hqk, grp, T, DK).sum(2).to(k.dtype)
    return (dq, dk, dv.view(N, H, T, DV), dl.view(N, H, T, L).to(level_scales.dtype), dg,
            None if dinit is None else dinit.to(initial_state.dtype))
