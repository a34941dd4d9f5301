"""The chunk-state hierarchy shared by the attention and matmul kernels (forward, and the
layout a backward kernel reads).

Layout
------
For one batch entry ``b`` (``0 .. B-1``, the collapsed batch) and ``n`` chunks of size
``C``, level ``h`` holds ``n_h = n >> h`` *aligned block states*: block ``m`` of level ``h``
covers chunks ``[m 2^h, (m + 1) 2^h)`` and holds

``H_h[m] = sum_{s in those chunks} exp(G[e] - G[s]) k_s v_s^T``  (attention, ``F = Dk*Dv``,
row-major ``(Dk, Dv)``) or ``exp(G[e] - G[s]) x_s`` (matmul, ``F = D``),

decayed to its last position ``e``, together with its log-decay
``A_h[m] = sum of g over the block`` (a sum of local chunk sums, never a difference of
prefix sums).  Everything lives in two buffers::

    states : (B, N, F)   float32; float64 for float64 inputs; bfloat16 for the attention
                         and matmul forwards on bfloat16 inputs (``kernels._layout.state_dtypes``)
    logdec : (B, N)      float32 (float64 for float64 inputs)
    N = n_0 + n_1 + ... + n_top,  level h starts at offset n_0 + ... + n_{h-1}

Level 0 is written by the per-chunk state kernels (levels 0 .. 2 by the matmul's, which
computes them straight from ``x``); :func:`build_hierarchy` fills the rest with
``H_{h+1}[m] = exp(A_h[2m+1]) H_h[2m] + H_h[2m+1]`` and ``A_{h+1}[m] = A_h[2m] + A_h[2m+1]``.

Chunk ``i`` reads, for each set bit ``h`` of ``i``, the level-``h`` block ``(i >> h) - 1``:
it covers exactly the chunks at chunk-level ``h + 1`` from ``i`` (the Fenwick bucket of
``fenwick.index.bucket`` over chunk indices), i.e. mask level ``c + h + 1`` with
``C = 2^c``.  Its decay to the start of chunk ``i`` is ``exp`` of the sum of ``A`` over the
blocks of the lower set bits, accumulated from the lowest bit up.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._device import level_size, sequence_row
from ._layout import NUM_WARPS, cdiv, hierarchy_sizes, level_offsets, next_power_of_2


@triton.jit
def _combine(h_ptr, a_ptr, even, odd, dst, im, om, f, F, fmask):
    """``H[dst] = exp(A[odd]) H[even] + H[odd]``, ``A[dst] = A[even] + A[odd]`` for the entries
    selected by ``im`` (the odd child only where ``om``: a missing right child is empty)."""
    a_even = tl.load(a_ptr + even, mask=im, other=0.0)
    a_odd = tl.load(a_ptr + odd, mask=om, other=0.0)
    h_even = tl.load(h_ptr + even[:, None] * F + f[None, :], mask=im[:, None] & fmask[None, :],
                     other=0.0).to(a_odd.dtype)
    h_odd = tl.load(h_ptr + odd[:, None] * F + f[None, :], mask=om[:, None] & fmask[None, :], other=0.0).to(a_odd.dtype)
    tl.store(h_ptr + dst[:, None] * F + f[None, :], tl.exp(a_odd)[:, None] * h_even + h_odd,
             mask=im[:, None] & fmask[None, :])
    tl.store(a_ptr + dst, a_even + a_odd, mask=im)


@triton.jit(do_not_specialize=["n_base", "off_base", "n_total", "sub_size", "n_build", "S_IN"])
def _hierarchy_kernel(h_ptr, a_ptr, s_ptr, tab_ptr, n_base, off_base, n_total, F, sub_size, n_build, S_IN,
                      BN: tl.constexpr, BF: tl.constexpr, LOG_C: tl.constexpr, VARLEN: tl.constexpr):
    """Program ``(b, f-tile, subtree)``: from the ``sub_size`` entries of level ``base``
    (``n_base`` entries at offset ``off_base``) that its subtree covers, build ``n_build``
    levels above, level by level with a barrier in between (a program reads only what it wrote).

    With ``VARLEN`` program ``(sequence, head, f-tile)`` builds the ``n_build`` levels of the
    sequence's region of :mod:`kernels._sequences`: entry 0 of level ``h`` is the carried bucket of
    level ``c + 1 + h`` (slot ``c + h`` of the state ``s (N, H, S_IN, F)`` where bit ``h`` of
    ``I0`` is set; log-decay 0: it is already decayed to the position before the call), the
    others the blocks of the call (level 0 written by the chunk-state kernel)."""
    if VARLEN:
        f = tl.program_id(2) * BF + tl.arange(0, BF)
        fmask = f < F
        n = tl.program_id(0).to(tl.int64)
        hd = tl.program_id(1).to(tl.int64)
        b0, row0, length, a, hbase, span = sequence_row(tab_ptr, n)
        base = hd * n_total + hbase
        I0 = a >> LOG_C
        I1 = (a + length - 1) >> LOG_C
        first = (n * tl.num_programs(1) + hd) * S_IN
        off = base
        lv = 0
        while lv < n_build:
            bit = (I0 >> lv) & 1
            live = (bit == 1) & (LOG_C + lv < S_IN)
            # tl.where, not fmask & live: Triton 3.9's interpreter refuses a mask made of a block and a scalar
            carried = tl.load(s_ptr + (first + LOG_C + lv) * F + f, mask=tl.where(live, fmask, False), other=0.0)
            tl.store(h_ptr + off * F + f, carried, mask=fmask)
            tl.store(a_ptr + off, 0.0)  # by every program: each reads only what it wrote
            tl.debug_barrier()
            size = level_size(lv, 0, span, True)
            if (length > 0) & (lv + 1 < n_build):
                count = (I1 >> lv) - (I0 >> lv) + 2
                up = (I1 >> (lv + 1)) - (I0 >> (lv + 1)) + 2
                nb = 1
                while nb < up:
                    j = nb + tl.arange(0, BN)
                    im = j < up
                    even = 2 * j - 1 - bit
                    _combine(h_ptr, a_ptr, off + even, off + even + 1, off + size + j, im, im & (even + 1 < count),
                             f, F, fmask)
                    nb += BN
                tl.debug_barrier()
            off += size
            lv += 1
    else:
        f = tl.program_id(1) * BF + tl.arange(0, BF)
        fmask = f < F
        bh = tl.program_id(0).to(tl.int64)
        base = bh * n_total
        off = off_base
        nh = n_base
        width = sub_size
        lv = 0
        while lv < n_build:  # while loops: the interpreter cannot index a range with a computed bound
            nn = nh // 2
            width = width // 2
            first = tl.program_id(2) * width
            nb = 0
            while nb < width:
                local = nb + tl.arange(0, BN)
                idx = first + local
                im = (local < width) & (idx < nn)
                even = base + off + 2 * idx
                _combine(h_ptr, a_ptr, even, even + 1, base + off + nh + idx, im, im, f, F, fmask)
                nb += BN
            tl.debug_barrier()
            off += nh
            nh = nn
            lv += 1


SUBTREE_LEVELS = 6
"""Levels one launch of the hierarchy kernel builds: each program owns a subtree of
``2**SUBTREE_LEVELS`` entries of its base level, so a launch has ``n / 64`` times more
programs than one that walks a whole batch entry, and ``ceil(top / 6)`` launches build it all."""


def shapes(B: int, n_chunks: int, F: int):
    """``((B, N, F), (B, N))``: the shapes of the states and log-decays of the hierarchy of
    ``n_chunks`` chunks, as :func:`allocate` makes them: ``N = 2 n_chunks`` entries a batch entry,
    a bound of the ``level_offsets(n_chunks)[-1] <= 2 n_chunks - 1`` over all levels (the kernels
    take ``N`` as the batch stride), so that the shapes are linear in the chunk count (a traced
    call with a symbolic length does not pin it)."""
    N = 2 * n_chunks
    return (B, N, F), (B, N)


def allocate(B: int, n_chunks: int, F: int, device, dtype: torch.dtype, logdec_dtype: torch.dtype = None):
    """Empty ``(states (B, N, F), logdec (B, N))`` buffers for ``n_chunks`` chunks (``logdec``
    in ``logdec_dtype``, default ``dtype``; the level sums are always formed in ``logdec``'s dtype
    and rounded to ``dtype`` on store)."""
    state_shape, logdec_shape = shapes(B, n_chunks, F)
    return (torch.empty(state_shape, dtype=dtype, device=device),
            torch.empty(logdec_shape, dtype=logdec_dtype or dtype, device=device))


def build_hierarchy(states: torch.Tensor, logdec: torch.Tensor, n_chunks: int, first_level: int = 0) -> None:
    """Fill levels ``first_level + 1 .. top`` of ``states`` / ``logdec`` (levels
    ``0 .. first_level`` already written), in place.

    ``ceil(top / SUBTREE_LEVELS)`` launches; in each, program ``(b, f-tile, subtree)`` builds
    up to :data:`SUBTREE_LEVELS` levels of its own subtree (see ``_hierarchy_kernel``).
    """
    sizes, offsets = hierarchy_sizes(n_chunks), level_offsets(n_chunks)
    top = len(sizes) - 1
    if top == 0:
        return
    B, N, F = states.shape
    BF = min(256, next_power_of_2(F))
    BN = max(1, min(64, 4096 // BF))
    level = min(first_level, top)
    while level < top:
        steps = min(SUBTREE_LEVELS, top - level)
        sub_size = 1 << steps
        grid = (B, cdiv(F, BF), cdiv(sizes[level], sub_size))
        _hierarchy_kernel[grid](states, logdec, states, logdec, sizes[level], offsets[level], N, F, sub_size, steps,
                                0, BN=BN, BF=BF, LOG_C=0, VARLEN=False, num_warps=NUM_WARPS["hierarchy"])
        level += steps


def build_sequence_hierarchy(states: torch.Tensor, logdec: torch.Tensor, initial, seqs, C: int) -> None:
    """Fill the hierarchy of a call over sequences (``states (H, n_entries, F)``, ``logdec (H,
    n_entries)``, level 0 written), in place: the carried buckets of ``initial (N, H, S, F)`` (or
    None) as entry 0 of each level, the blocks of the call above level 0; one program per
    sequence, head and feature tile (grid axis 0: the sequences)."""
    H, _, F = states.shape
    if seqs.count == 0 or H == 0:
        return
    BF = min(256, next_power_of_2(F))
    BN = max(1, min(64, 4096 // BF))
    S_in = 0 if initial is None else initial.shape[2]
    _hierarchy_kernel[(seqs.count, H, cdiv(F, BF))](
        states, logdec, states if initial is None else initial, seqs.table, 0, 0, seqs.n_entries, F, 0, seqs.levels,
        S_in, BN=BN, BF=BF, LOG_C=C.bit_length() - 1, VARLEN=True, num_warps=NUM_WARPS["hierarchy"])
