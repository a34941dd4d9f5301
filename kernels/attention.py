"""Chunked log-linear attention forward: ``O = (M ⊙ scale · Q Kᵀ) V``.

Three launches (see ``docs/kernels.md``):

1. ``_state_kernel``, grid ``(chunk, batch, Dk-tile x Dv-tile)``: the chunk state
   ``S_j = K_jᵀ diag(exp(G_end - G)) V_j`` (local cumulative sums) and the chunk log-decay,
   written as level 0 of the hierarchy of :mod:`kernels.states`;
2. :func:`kernels.states.build_hierarchy`: aligned block states, levels ``1..top``;
3. ``_output_kernel``, grid ``(chunk, batch, Dv-tile)``: levels ``0..c`` densely inside the
   chunk (masked ``Q Kᵀ`` with per-pair level scale and local decay), plus, for each set bit
   ``h`` of the chunk index, ``λ[t, c+h+1] exp(gap + G_t) q_t · H_h[(i >> h) - 1]``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from hodlr.fenwick.arrays import check_bool, check_scale

from . import _sequences, states as _states
from ._device import (bit_length, chunk_decays, chunk_rows, dot, intra_mask, matrix_tile, next_decay, next_level,
                      read_entry, reads_level, sequence_chunk, sequence_row, validate_rows)
from ._layout import (NUM_WARPS, block, broadcast_shape, cdiv, check_block, check_chunk, check_flag,
                      check_disjoint, check_levels, check_same_dtype, check_tensor, chunk_count, collapse_grouped, compute_types,
                      interpreting, output_buffer, scratch, state_dtypes)


OUTPUT_TILE = 64
"""Widest key and value tile of the output kernel: a wider head runs one program per value tile
of its chunk (each forms the chunk's scores again) and reads its key columns tile by tile."""


@triton.jit(do_not_specialize=["T", "B1", "n_total", "N_DV_TILES", "sgb0", "sgb1", "GRP", "S_IN"])
def _state_kernel(k_ptr, v_ptr, g_ptr, h_ptr, a_ptr, s_ptr, tab_ptr, cs_ptr,
                  T, B1, n_total, DK: tl.constexpr, DV: tl.constexpr, N_DV_TILES, GRP, S_IN,
                  skb0, skb1, skt, skd, svb0, svb1, svt, svd, sgb0, sgb1, sgt,
                  C: tl.constexpr, LOG_C: tl.constexpr, FULL_CHUNKS: tl.constexpr,
                  BDK: tl.constexpr, BDV: tl.constexpr, HAS_G: tl.constexpr,
                  ACC: tl.constexpr, PREC: tl.constexpr, LOWP: tl.constexpr, NATIVE: tl.constexpr,
                  VARLEN: tl.constexpr):
    """Program ``(chunk, batch entry, Dk-tile x Dv-tile)``: level 0 of the hierarchy.  With
    ``VARLEN`` axis 0 is the global chunk slot and axis 1 the head of the sequence table's call;
    the first chunk of a sequence also holds its carried buckets of levels ``1..c`` (they lie in
    the chunk, before its first position), decayed to the chunk's end."""
    if VARLEN:
        dead, n, b0, shift, lo, hi, I, I0, I1, hbase, span, t, tmask = sequence_chunk(tab_ptr, cs_ptr, C, LOG_C)
        if dead:
            return
        b1 = tl.program_id(1).to(tl.int64)
        tr = t + shift
    else:
        j, bh, b0, b1, t, tmask = chunk_rows(B1, T, C, FULL_CHUNKS)
        tr = t
    bk1 = b1 // GRP  # the key head of a grouped head
    tile = tl.program_id(2)
    dk = (tile // N_DV_TILES) * BDK + tl.arange(0, BDK)
    dv = (tile % N_DV_TILES) * BDV + tl.arange(0, BDV)
    if HAS_G:
        if VARLEN:
            g_row = g_ptr + b0 * sgb0 + b1 * sgb1 + shift * sgt
            g_end = tl.sum(tl.load(g_row + t * sgt, mask=tmask, other=0.0).to(ACC), 0)
            w = tl.exp(tl.cumsum(next_decay(g_row, t, sgt, hi, C, ACC, lo), 0, reverse=True))
        else:
            g_row = g_ptr + b0 * sgb0 + b1 * sgb1
            g_end = tl.sum(tl.load(g_row + t * sgt, mask=tmask, other=0.0).to(ACC), 0)
            w = tl.exp(tl.cumsum(next_decay(g_row, t, sgt, T, C, ACC), 0, reverse=True))
    else:
        g_end = tl.zeros((), dtype=ACC)
        w = tl.full((C,), 1.0, dtype=ACC)
    kb = tl.load(k_ptr + b0 * skb0 + bk1 * skb1 + tr[:, None] * skt + dk[None, :] * skd,
                 mask=tmask[:, None] & (dk[None, :] < DK), other=0.0)
    vb = tl.load(v_ptr + b0 * svb0 + b1 * svb1 + tr[:, None] * svt + dv[None, :] * svd,
                 mask=tmask[:, None] & (dv[None, :] < DV), other=0.0)
    kw = kb.to(ACC) * w[:, None]
    if LOWP and NATIVE:  # bfloat16 on a GPU: decayed keys rounded to bfloat16 for a native dot
        kw = kw.to(kb.dtype)
    S = dot(tl.trans(kw), vb, ACC, PREC, NATIVE)
    if VARLEN:
        row = b1 * n_total + hbase + (I - I0) + 1
        if I == I0:
            S += tl.exp(g_end) * _carried_low(s_ptr, (n * tl.num_programs(1) + b1) * S_IN, S_IN, lo, dk, dv, DK, DV,
                                              LOG_C, ACC, BDK, BDV)
    else:
        row = bh * n_total + j
    tl.store(h_ptr + row * DK * DV + dk[:, None] * DV + dv[None, :], S,
             mask=(dk[:, None] < DK) & (dv[None, :] < DV))
    if tile == 0:
        tl.store(a_ptr + row, g_end)


@triton.jit
def _carried_low(s_ptr, first, S_IN, a, dk, dv, DK: tl.constexpr, DV: tl.constexpr, LOG_C: tl.constexpr,
                 ACC: tl.constexpr, BDK: tl.constexpr, BDV: tl.constexpr, upto=None):
    """The sum of the carried buckets of levels ``1 .. c`` (the live ones: bit ``l - 1`` of ``a``
    set, ``l <= S_IN``; with ``upto``, only levels ``<= upto``), as a ``(dk, dv)`` tile; ``first``
    is the state's slot 0 of the sequence and head."""
    acc = tl.zeros((BDK, BDV), dtype=ACC)
    for l in tl.static_range(1, LOG_C + 1):
        live = (l <= S_IN) & reads_level(a, l)
        if upto is not None:
            live = live & (l <= upto)
        if live:
            acc += matrix_tile(s_ptr, first + l - 1, dk, dv, DK, DV, ACC)
    return acc


@triton.jit
def _read_state(q_base, sqd, tmask, s_ptr, index, dv, dvmask, DK: tl.constexpr, DV: tl.constexpr, C: tl.constexpr,
                BDK: tl.constexpr, BDV: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr, LOWP: tl.constexpr,
                NATIVE: tl.constexpr):
    """``Q S`` (``(C, BDV)``) of the chunk's queries with ``Dk x Dv`` state ``index`` of ``s_ptr``."""
    part = tl.zeros((C, BDV), dtype=ACC)
    for d0 in tl.static_range(0, DK, BDK):
        dk = d0 + tl.arange(0, BDK)
        qb = tl.load(q_base + dk[None, :] * sqd, mask=tmask[:, None] & (dk[None, :] < DK), other=0.0)
        sb = tl.load(s_ptr + index * DK * DV + dk[:, None] * DV + dv[None, :],
                     mask=(dk[:, None] < DK) & dvmask[None, :], other=0.0)
        if LOWP and NATIVE:  # bfloat16 on a GPU: the float32 state rounded once, for a native dot
            sb = sb.to(qb.dtype)
        part += dot(qb, sb, ACC, PREC, NATIVE)
    return part


@triton.jit
def level_scale(l_base, col, sll, L, tmask, VARLEN: tl.constexpr):
    """``λ[t, col]`` of the chunk's rows (0 outside ``tmask``).  A call over sequences cannot check
    on the host that ``L`` covers the absolute positions (they stay on the device): there a
    column ``>= L`` reads as NaN in the rows that need it, and the output shows it."""
    if VARLEN:
        # tl.where, not tmask & (col < L): Triton 3.9's interpreter refuses a block & scalar mask
        lam = tl.load(l_base + col * sll, mask=tl.where(col < L, tmask, False), other=0.0)
        return tl.where(tmask & (col >= L), float("nan"), lam)
    else:
        return tl.load(l_base + col * sll, mask=tmask, other=0.0)


@triton.jit(do_not_specialize=["T", "B1", "n_chunks", "n_total", "n_bits", "L", "slb0", "slb1", "slt", "sgb0",
                            "sgb1", "GRP", "S_IN"])
def _output_kernel(q_ptr, k_ptr, v_ptr, l_ptr, g_ptr, h_ptr, a_ptr, o_ptr, s_ptr, tab_ptr, cs_ptr, flag_ptr,
                   T, B1, n_chunks, n_total, n_bits, L, DK: tl.constexpr, DV: tl.constexpr, scale, GRP, S_IN,
                   sqb0, sqb1, sqt, sqd, skb0, skb1, skt, skd, svb0, svb1, svt, svd,
                   slb0, slb1, slt, sll, sgb0, sgb1, sgt, sob0, sob1, sot, sod,
                   C: tl.constexpr, LOG_C: tl.constexpr, FULL_CHUNKS: tl.constexpr,
                   BDK: tl.constexpr, BDV: tl.constexpr,
                   HAS_G: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr, EXACT: tl.constexpr,
                   LOWP: tl.constexpr, NATIVE: tl.constexpr, VARLEN: tl.constexpr, BL: tl.constexpr):
    """Program ``(chunk, batch entry, Dv-tile)``: the outputs of the chunk's rows.  With ``VARLEN``
    (a call over sequences, :mod:`kernels._sequences`) axis 0 is the global chunk slot, axis 1 the
    head, positions are absolute, and the first chunk of a sequence also reads its carried
    buckets of levels ``1..c`` (those of levels ``> c`` are entries of the hierarchy).  With a
    ``flag_ptr`` (not None; calls without ``VARLEN``) the program also validates the level scales
    and log-decays its rows read (:func:`validate_rows`, levels below ``BL``)."""
    if VARLEN:
        dead, n, b0, shift, a, e, i, I0, I1, base, span, t, tmask = sequence_chunk(tab_ptr, cs_ptr, C, LOG_C)
        if dead:
            return
        b1 = tl.program_id(1).to(tl.int64)
        base += b1 * n_total
        tr = t + shift
    else:
        i, bh, b0, b1, t, tmask = chunk_rows(B1, T, C, FULL_CHUNKS)
        tr = t
    bq1 = b1 // GRP  # the query and key head of a grouped head
    dv = tl.program_id(2) * BDV + tl.arange(0, BDV)
    dvmask = dv < DV
    q_base = q_ptr + b0 * sqb0 + bq1 * sqb1 + tr[:, None] * sqt
    k_base = k_ptr + b0 * skb0 + bq1 * skb1 + tr[:, None] * skt
    l_base = l_ptr + b0 * slb0 + b1 * slb1 + tr.to(tl.int64) * slt
    if VARLEN:
        G, g_next = chunk_decays(g_ptr + b0 * sgb0 + b1 * sgb1 + shift * sgt, t, tmask, sgt, e, C, HAS_G, ACC, a)
    else:
        G, g_next = chunk_decays(g_ptr + b0 * sgb0 + b1 * sgb1, t, tmask, sgt, T, C, HAS_G, ACC)

    # the mask's validation (with a flag), before the products need the registers
    validate_rows(flag_ptr, l_ptr + b0 * slb0 + b1 * slb1, slt, sll, L, g_ptr + b0 * sgb0 + b1 * sgb1, sgt, t, tmask,
                  BL, HAS_G)

    # levels 0..c: dense and masked inside the chunk
    scores = tl.zeros((C, C), dtype=ACC)
    for d0 in tl.static_range(0, DK, BDK):
        dk = d0 + tl.arange(0, BDK)
        m2 = tmask[:, None] & (dk[None, :] < DK)
        qb = tl.load(q_base + dk[None, :] * sqd, mask=m2, other=0.0)
        kb = tl.load(k_base + dk[None, :] * skd, mask=m2, other=0.0)
        scores += dot(qb, tl.trans(kb), ACC, PREC, NATIVE)
    if VARLEN:
        l_chunk = l_ptr + b0 * slb0 + b1 * slb1 + (i * C + shift) * slt
    else:
        l_chunk = l_ptr + b0 * slb0 + b1 * slb1 + (i * C).to(tl.int64) * slt
    P = intra_mask(l_chunk, slt, sll, L, G, g_next, tmask, C, HAS_G, EXACT) * scores
    vb = tl.load(v_ptr + b0 * svb0 + b1 * svb1 + tr[:, None] * svt + dv[None, :] * svd,
                 mask=tmask[:, None] & dvmask[None, :], other=0.0)
    if LOWP and NATIVE:  # bfloat16 on a GPU: masked scores rounded to bfloat16 for a native dot with v
        P = P.to(vb.dtype)
    acc = dot(P, vb, ACC, PREC, NATIVE)

    # levels > c: one aligned block state per set bit of the chunk index
    gap = tl.zeros((), dtype=ACC)
    hbase = base if VARLEN else bh * n_total  # where the hierarchy of this batch entry or sequence starts
    off = 0  # where its level h starts
    # the blocks of level h, halved level by level (next_level's n_chunks >> h compiles to 14 more
    # registers a thread here without a decay: Triton 3.6, sm_90a, D = 64)
    nh = n_chunks
    h = 0
    while h < n_bits:  # a while loop: the interpreter cannot range() over a computed bound
        if ((i >> h) & 1) == 1:
            blk = read_entry(hbase + off, i, h, I0 if VARLEN else 0, VARLEN)
            lam = level_scale(l_base, LOG_C + 1 + h, sll, L, tmask, VARLEN).to(ACC)
            part = _read_state(q_base, sqd, tmask, h_ptr, blk, dv, dvmask, DK, DV, C, BDK, BDV, ACC, PREC, LOWP,
                               NATIVE)
            acc += (lam * tl.exp(gap + G))[:, None] * part
            gap += tl.load(a_ptr + blk)
        if VARLEN:
            off = next_level(off, h, n_chunks, span, VARLEN)
        else:
            off += nh
            nh = nh // 2
        h += 1
    if VARLEN:
        if i == I0:  # the carried buckets of levels 1..c: bucket l at level max(l, bit_length(t ^ a)) from t
            far = bit_length((t ^ a) & (C - 1))
            first = (n * tl.num_programs(1) + b1) * S_IN
            for l in tl.static_range(1, LOG_C + 1):
                if (l <= S_IN) & reads_level(a, l):
                    part = _read_state(q_base, sqd, tmask, s_ptr, first + l - 1, dv, dvmask, DK, DV, C, BDK, BDV,
                                       ACC, PREC, LOWP, NATIVE)
                    lam = level_scale(l_base, tl.maximum(far, l), sll, L, tmask, VARLEN).to(ACC)
                    acc += (lam * tl.exp(G))[:, None] * part
    tl.store(o_ptr + b0 * sob0 + b1 * sob1 + tr[:, None] * sot + dv[None, :] * sod, acc * scale,
             mask=tmask[:, None] & dvmask[None, :])


@triton.jit(do_not_specialize=["n_total", "n_bits", "S_IN", "S_OUT", "N_DV_TILES", "skn", "skh", "skt", "svn", "svh",
                               "svt", "sgn", "sgh", "sgt", "GRP"])
def _final_state_kernel(k_ptr, v_ptr, g_ptr, h_ptr, a_ptr, s_ptr, f_ptr, tab_ptr, n_total, n_bits, S_IN, S_OUT,
                        DK: tl.constexpr, DV: tl.constexpr, N_DV_TILES, GRP, skn, skh, skt, skd, svn, svh, svt, svd,
                        sgn, sgh, sgt, C: tl.constexpr, LOG_C: tl.constexpr, BDK: tl.constexpr, BDV: tl.constexpr,
                        HAS_G: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr, NATIVE: tl.constexpr):
    """Program ``(sequence, head, Dk-tile x Dv-tile)``: the final state at the end ``e`` of the
    sequence (``f (N, H, S_OUT, Dk, Dv)``).  Levels ``> c`` are read like a reader chunk at ``e``
    reads the hierarchy (bit ``h`` of ``E = e >> c`` set: block ``(E >> h) - 1``, decayed to
    ``e - 1``); levels ``1..c`` are the tokens of ``e``'s chunk at their level from ``e``, and, when
    the call stays inside the chunk of its start ``a``, the carried buckets of levels ``1..c``
    (bucket ``l`` moves to level ``max(l, bit_length(a ^ e))``)."""
    n = tl.program_id(0).to(tl.int64)
    hd = tl.program_id(1).to(tl.int64)
    tile = tl.program_id(2)
    dk = (tile // N_DV_TILES) * BDK + tl.arange(0, BDK)
    dv = (tile % N_DV_TILES) * BDV + tl.arange(0, BDV)
    fmask = (dk[:, None] < DK) & (dv[None, :] < DV)
    b0, row0, length, a, base, span = sequence_row(tab_ptr, n)
    base += hd * n_total
    e = a + length
    I0 = a >> LOG_C
    E = e >> LOG_C
    shift = row0 - a
    partial = (length > 0) & ((e & (C - 1)) != 0)  # e's chunk holds tokens of the call
    A_part = tl.zeros((), dtype=ACC)
    if partial:
        A_part = tl.load(a_ptr + base + E - I0 + 1).to(ACC)
    out = f_ptr + (n * tl.num_programs(1) + hd) * S_OUT * DK * DV + dk[:, None] * DV + dv[None, :]
    # levels 1..c
    t = E * C + tl.arange(0, C)
    tmask = (t >= a) & (t < e)
    kb = tl.load(k_ptr + b0 * skn + (hd // GRP) * skh + (t[:, None] + shift) * skt + dk[None, :] * skd,
                 mask=tmask[:, None] & (dk[None, :] < DK), other=0.0)
    vb = tl.load(v_ptr + b0 * svn + hd * svh + (t[:, None] + shift) * svt + dv[None, :] * svd,
                 mask=tmask[:, None] & (dv[None, :] < DV), other=0.0)
    if HAS_G:
        w = tl.exp(tl.cumsum(next_decay(g_ptr + b0 * sgn + hd * sgh + shift * sgt, t, sgt, e, C, ACC, a), 0,
                             reverse=True))
    else:
        w = tl.full((C,), 1.0, dtype=ACC)
    lev = bit_length((t ^ e) & (C - 1))
    same = E == I0  # the carried buckets of levels 1..c stay below level c + 1 from e
    far = bit_length((a ^ e) & (C - 1))
    first = (n * tl.num_programs(1) + hd) * S_IN
    below = _carried_low(s_ptr, first, S_IN, a, dk, dv, DK, DV, LOG_C, ACC, BDK, BDV, far)
    for l in tl.static_range(1, LOG_C + 1):
        if l <= S_OUT:
            kw = kb.to(ACC) * tl.where(lev == l, w, 0.0)[:, None]
            acc = dot(tl.trans(kw), vb, ACC, PREC, NATIVE)
            if same:
                if (l > far) & (l <= S_IN) & reads_level(a, l):
                    acc += tl.exp(A_part) * matrix_tile(s_ptr, first + l - 1, dk, dv, DK, DV, ACC)
                if l == far:
                    acc += tl.exp(A_part) * below
            tl.store(out + (l - 1) * DK * DV, acc, mask=fmask)
    # levels > c: the reads of a chunk at e
    gap = A_part
    off = base
    h = 0
    while LOG_C + h < S_OUT:
        acc = tl.zeros((BDK, BDV), dtype=ACC)
        if (h < n_bits) & (((E >> h) & 1) == 1):
            blk = read_entry(off, E, h, I0, True)
            acc = tl.exp(gap) * matrix_tile(h_ptr, blk, dk, dv, DK, DV, ACC)
            gap += tl.load(a_ptr + blk)
        tl.store(out + (LOG_C + h) * DK * DV, acc, mask=fmask)
        off = next_level(off, h, 0, span, True)
        h += 1


class Layout(NamedTuple):
    """One call's tensors as the kernels index them: every operand broadcast to the common batch
    shape (views) and folded into two batch indices ``(b0, b1)`` with per-tensor strides
    (:func:`kernels._layout.collapse_grouped`); ``q`` and ``k`` are read at ``(b0, b1 // group)``
    (the kernels' ``GRP``: grouped heads in fla's layout, ``docs/kernels.md`` §6), every other
    tensor at ``(b0, b1)``."""

    batch: tuple
    B0: int
    B1: int
    T: int
    DK: int
    DV: int
    L: int
    tensors: dict
    strides: dict
    group: int

    @property
    def B(self) -> int:
        return self.B0 * self.B1

    def args(self, name: str) -> tuple:
        """``(pointer, s_b0, s_b1, s_row, s_col)`` of the ``(*batch, T, width)`` tensor ``name``."""
        x = self.tensors[name]
        return (x, *self.strides[name], x.stride(-2), x.stride(-1))

    def decay_args(self) -> tuple:
        """``(pointer, s_b0, s_b1, s_t)`` of the log-decay; without one, the level scales' pointer
        (never read: the kernels take ``HAS_G=False``) and zero strides."""
        g = self.tensors["g"]
        if g is None:
            return (self.tensors["l"], 0, 0, 0)
        return (g, *self.strides["g"], g.stride(-1))

    def reads_in_place(self, name: str, x: torch.Tensor) -> bool:
        """Whether the tensor ``name`` lies in ``x``'s own memory: the fold made a view of ``x``, not a
        copy (:func:`kernels._layout.collapse_grouped`), so what the kernels write there lands in ``x``."""
        return self.tensors[name].data_ptr() == x.data_ptr()


OUT_LABELS = {"dq": "dq", "dk": "dk", "dv": "dv", "dl": "dlevel_scales", "db": "dbeta", "dg": "dlog_decay"}
"""The output buffers a layout takes (its names) and the names the messages give them."""


def _check_operands(q, k, v, level_scales, log_decay) -> None:
    """The operands of a call: floating tensors of enough dims, ``q, k, v`` of one dtype."""
    for name, x, dims in (("q", q, "T, Dk"), ("k", k, "T, Dk"), ("v", v, "T, Dv"), ("level_scales", level_scales, "T, L")):
        check_tensor(name, x, dims)
    check_tensor("log_decay", log_decay, "T", optional=True)
    check_same_dtype(q=q, k=k, v=v)


def attention_layout(q, k, v, level_scales, log_decay, *, beta=None, do=None, out=None) -> Layout:
    """Check the shapes of one attention call and fold its batch dims (views; a copy only of tensors
    that :func:`kernels._layout.collapse_grouped` cannot fold).

    The inputs set the batch.  ``beta`` ``(*batch, T)`` is the Gated DeltaNet's (an input, the
    layout's ``(*batch, T, 1)`` tensor ``"beta"``); ``do`` ``(*batch, T, Dv)`` a backward's cotangent,
    whose batch broadcasts to the inputs'; ``out`` ``{name: buffer}`` output buffers (names of
    :data:`OUT_LABELS`) of exactly the inputs' broadcast batch -- ``dq``, ``dk`` ``(*batch, T, Dk)``,
    ``dv`` ``(*batch, T, Dv)``, ``dl`` ``(*batch, T, L)``, ``db``, ``dg`` ``(*batch, T)`` (in the layout
    as ``(*batch, T, 1)`` views) -- sharing no memory with an input or with each other: a kernel writes
    every element of them, so a buffer of any other shape is refused, never written past its end."""
    _check_operands(q, k, v, level_scales, log_decay)
    check_tensor("beta", beta, "T", optional=True)
    batch = tuple(broadcast_shape(q.shape[:-2], k.shape[:-2], v.shape[:-2], level_scales.shape[:-2],
                                  () if log_decay is None else log_decay.shape[:-1],
                                  () if beta is None else beta.shape[:-1]))
    T, DK, DV, L = q.shape[-2], q.shape[-1], v.shape[-1], level_scales.shape[-1]
    if k.shape[-2:] != (T, DK) or v.shape[-2] != T or level_scales.shape[-2] != T or (
            log_decay is not None and log_decay.shape[-1] != T):
        raise ValueError(f"shapes disagree: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, "
                         f"level_scales {tuple(level_scales.shape)}, "
                         f"log_decay {None if log_decay is None else tuple(log_decay.shape)}")
    if beta is not None and beta.shape[-1] != T:
        raise ValueError(f"beta must have shape (*batch, T) with T={T}, got {tuple(beta.shape)}")
    check_levels(T, L)
    named = {"q": q, "k": k, "v": v, "l": level_scales}
    if beta is not None:
        named["beta"] = beta[..., None]
    if do is not None:
        check_tensor("do", do, "T, Dv")
        if tuple(do.shape[-2:]) != (T, DV) or tuple(broadcast_shape(do.shape[:-2], batch)) != batch:
            raise ValueError(f"do must have shape (*batch, T, Dv) = {batch + (T, DV)} (its batch may broadcast to "
                             f"the inputs'), got {tuple(do.shape)}")
        named["do"] = do
    widths = {"dq": (DK,), "dk": (DK,), "dv": (DV,), "dl": (L,), "db": (), "dg": ()}
    out = out or {}
    for name, x in out.items():
        label = f"out's {OUT_LABELS[name]}"
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{label} must be a torch.Tensor or None, got {type(x).__name__}")
        want = batch + (T,) + widths[name]
        if tuple(x.shape) != want:
            raise ValueError(f"{label} must have shape {want} (the inputs' broadcast batch), got {tuple(x.shape)}")
        named[name] = x if widths[name] else x[..., None]
    if out:
        check_disjoint({f"out's {OUT_LABELS[name]}": x for name, x in out.items()},
                       {"q": q, "k": k, "v": v, "level_scales": level_scales, "log_decay": log_decay, "beta": beta,
                        "do": do})
    named = {name: x if x.shape[:-2] == batch else x.expand(batch + tuple(x.shape[-2:])) for name, x in named.items()}
    named["g"] = log_decay if log_decay is None or log_decay.shape[:-1] == batch else log_decay.expand(batch + (T,))
    B0, B1, strides, folded, group = collapse_grouped(batch, list(named.values()), (0, 1))
    return Layout(batch, B0, B1, T, DK, DV, L, dict(zip(named, folded)), dict(zip(named, strides)), group)


def chunk_states(layout: Layout, C: int, state_dtype, logdec_dtype):
    """The chunk-state hierarchy of :mod:`kernels.states` for the keys and values of ``layout``
    with chunk size ``C``: ``(states (B, N, Dk*Dv), logdec (B, N))``.  Shared by the forward and
    the backward (which recomputes it unless the forward kept it)."""
    k, v, g = (layout.tensors[name] for name in ("k", "v", "g"))
    DK, DV = layout.DK, layout.DV
    acc, prec, _ = compute_types(v.dtype)
    n = chunk_count(layout.T, C)
    states, logdec = _states.allocate(layout.B, n, DK * DV, v.device, state_dtype, logdec_dtype)
    BDK, BDV = block(DK, 64), block(DV, 64)
    n_dv = cdiv(DV, BDV)
    _state_kernel[(n, layout.B, cdiv(DK, BDK) * n_dv)](
        k, v, layout.decay_args()[0], states, logdec, states, logdec, logdec, layout.T, layout.B1, states.shape[1],
        DK, DV, n_dv, layout.group, 0, *layout.args("k")[1:], *layout.args("v")[1:], *layout.decay_args()[1:],
        C=C, LOG_C=C.bit_length() - 1, FULL_CHUNKS=layout.T % C == 0, BDK=BDK, BDV=BDV, HAS_G=g is not None,
        ACC=acc, PREC=prec, LOWP=v.dtype == torch.bfloat16, NATIVE=not interpreting(), VARLEN=False,
        num_warps=NUM_WARPS["attention_state"])
    _states.build_hierarchy(states, logdec, n)
    return states, logdec


def state_shapes(B: int, T: int, DK: int, DV: int, dtype, chunk=None):
    """``((shape, dtype) of the states, (shape, dtype) of their log-decays)`` that
    :func:`chunk_states` makes for ``B`` batch entries of length ``T``, ``Dk x Dv`` heads and
    inputs of ``dtype`` at ``chunk`` (default ``DEFAULT_CHUNK["attention"]``)."""
    state_shape, logdec_shape = _states.shapes(B, chunk_count(T, check_chunk(chunk, "attention")), DK * DV)
    state_dtype, logdec_dtype = state_dtypes(dtype)
    return (state_shape, state_dtype), (logdec_shape, logdec_dtype)


def attention_forward(q, k, v, level_scales, log_decay=None, scale: float = 1.0, *, chunk=None, out=None,
                      return_states: bool = False, check=None):
    """Log-linear attention forward on the GPU (or the Triton interpreter).

    Parameters
    ----------
    q, k : torch.Tensor, shape ``(*batch, T, Dk)``
    v : torch.Tensor, shape ``(*batch, T, Dv)``
    level_scales : torch.Tensor, shape ``(*batch, T, L)``, ``L >= fenwick.num_levels(T)``
    log_decay : torch.Tensor, shape ``(*batch, T)``, optional
        All leading dims broadcast (as ``torch.broadcast_shapes``); broadcast operands are read
        through stride-0 views, not copied.  Any strides (transposed, sliced) are accepted.
        float16 / bfloat16 / float32 on CUDA (float64 too under ``TRITON_INTERPRET=1``);
        accumulation in float32 (float64 for float64).  The chunk states are summed and kept in
        float32 (float64 for float64); on a GPU, bfloat16 inputs run every dot on bfloat16
        operands, each state rounded once when it is read (see ``docs/kernels.md``, precision).
    scale : float
        Multiplies ``q kᵀ``.
    chunk : int, optional
        Chunk size ``C``, a power of two in ``[16, 256]`` (default ``DEFAULT_CHUNK["attention"]``).
    out : torch.Tensor, optional
        Contiguous ``(*batch, T, Dv)`` output buffer with ``v``'s dtype (tests pass one
        filled with NaN, so an element the kernel never writes fails).
    return_states : bool
        Also return ``(states, logdec)``, the chunk-state hierarchy of :mod:`kernels.states`
        (dtypes: :func:`kernels._layout.state_dtypes`), which :func:`kernels.attention_backward`
        takes (``states=``) instead of recomputing it.
    check : torch.Tensor, optional
        A one-element int32 tensor holding 0 on the inputs' device: the output kernel sets it to 1
        if a level scale that is read or a log-decay is NaN or infinite (the validation of
        :func:`kernels.checks.nonfinite_flag`, without a launch of its own).

    Returns
    -------
    torch.Tensor ``(*batch, T, Dv)`` (and the states when asked).
    """
    C = check_chunk(chunk, "attention")
    scale = check_scale(scale)
    check_bool("return_states", return_states)
    layout = attention_layout(q, k, v, level_scales, log_decay)
    check_flag(check, q.device)
    T, DK, DV, L = layout.T, layout.DK, layout.DV, layout.L
    v = layout.tensors["v"]
    out = output_buffer(out, layout.batch + (T, DV), v, {"q": q, "k": k, "v": v, "level_scales": level_scales,
                                                         "log_decay": log_decay})
    acc, prec, exact = compute_types(v.dtype)
    o_flat = out.reshape((layout.B0, layout.B1, T, DV))
    states, logdec = chunk_states(layout, C, *state_dtypes(v.dtype))
    n = chunk_count(T, C)
    BDK, BDV = block(DK, OUTPUT_TILE), block(DV, OUTPUT_TILE)
    n_dv = cdiv(DV, BDV)
    _output_kernel[(n, layout.B, n_dv)](
        layout.tensors["q"], layout.tensors["k"], v, layout.tensors["l"], layout.decay_args()[0], states, logdec,
        o_flat, states, logdec, logdec, check, T, layout.B1, n, states.shape[1], (n - 1).bit_length(), L, DK, DV,
        scale, layout.group, 0, *layout.args("q")[1:], *layout.args("k")[1:], *layout.args("v")[1:],
        *layout.args("l")[1:], *layout.decay_args()[1:], o_flat.stride(0), o_flat.stride(1), o_flat.stride(2),
        o_flat.stride(3), C=C, LOG_C=C.bit_length() - 1, FULL_CHUNKS=T % C == 0, BDK=BDK, BDV=BDV,
        HAS_G=layout.tensors["g"] is not None,
        ACC=acc, PREC=prec, EXACT=exact, LOWP=v.dtype == torch.bfloat16, NATIVE=not interpreting(), VARLEN=False,
        BL=check_block(T, check), num_warps=NUM_WARPS["attention_output"])
    return (out, (states, logdec)) if return_states else out


# ---------------------------------------------------------------------------------------
# calls over sequences: recurrent state, packed sequences, final state, grouped heads
# ---------------------------------------------------------------------------------------
class SequenceLayout(NamedTuple):
    """The tensors of a call over sequences (``docs/kernels.md`` §6):
    ``q, k (N, Hqk, T, Dk)``, ``v (N, H, T, Dv)`` and the other ``(N, H, T, ·)`` operands, read in
    place with their own strides; head ``h`` reads head ``h // (H // Hqk)`` of ``q`` and ``k``."""

    N: int
    Hqk: int
    H: int
    T: int
    DK: int
    DV: int
    L: int
    tensors: dict

    def args(self, name: str) -> tuple:
        """``(pointer, s_n, s_h, s_t, s_d)`` of the 4-d tensor ``name``."""
        x = self.tensors[name]
        return (x, *x.stride())

    def decay_args(self) -> tuple:
        """``(pointer, s_n, s_h, s_t)`` of the log-decay; without one, the level scales' pointer
        (never read) and zero strides."""
        g = self.tensors["g"]
        return (self.tensors["l"], 0, 0, 0) if g is None else (g, *g.stride())


def sequence_layout(q, k, v, level_scales, log_decay, **others) -> SequenceLayout:
    """Check the shapes of a call over sequences; ``others`` are further ``(N, H, T, ·)`` tensors
    (cotangents) named as they are indexed."""
    _check_operands(q, k, v, level_scales, log_decay)
    for name, x, ndim in (("q", q, 4), ("k", k, 4), ("v", v, 4), ("level_scales", level_scales, 4)):
        if x.dim() != ndim:
            raise ValueError(f"{name} must have 4 dims (N, heads, T, width) in a call with a state, packed "
                             f"sequences or grouped heads, got shape {tuple(x.shape)}")
    N, Hqk, T, DK = q.shape
    H, DV, L = v.shape[1], v.shape[3], level_scales.shape[3]
    if tuple(k.shape) != (N, Hqk, T, DK) or tuple(v.shape[:3]) != (N, H, T) or Hqk < 1 or H % Hqk:
        raise ValueError(f"shapes disagree: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} "
                         f"(want q, k (N, Hqk, T, Dk) and v (N, H, T, Dv) with Hqk dividing H)")
    if tuple(level_scales.shape[:3]) != (N, H, T) or L < 1:
        raise ValueError(f"level_scales must have shape (N, H, T, L) = ({N}, {H}, {T}, L >= 1), "
                         f"got {tuple(level_scales.shape)}")
    if log_decay is not None and tuple(log_decay.shape) != (N, H, T):
        raise ValueError(f"log_decay must have shape (N, H, T) = ({N}, {H}, {T}), got {tuple(log_decay.shape)}")
    widths = {"do": DV}
    for name, x in others.items():
        check_tensor(name, x, "T, width")
        if tuple(x.shape) != (N, H, T, widths[name]):
            raise ValueError(f"{name} must have shape (N, H, T, Dv) = ({N}, {H}, {T}, {widths[name]}), "
                             f"got {tuple(x.shape)}")
    return SequenceLayout(N, Hqk, H, T, DK, DV, L, {"q": q, "k": k, "v": v, "l": level_scales, "g": log_decay,
                                                     **others})


def check_initial_state(initial_state, initial_positions, count: int, layout: SequenceLayout, state_dtype):
    """The initial state ``(N, H, S, Dk, Dv)`` (contiguous) and positions ``(N,)`` of a call over
    ``count`` sequences, checked (shapes, dtypes, device; the positions are not read)."""
    if (initial_state is None) != (initial_positions is None):
        raise TypeError("initial_state and initial_positions come together (the state's buckets and the absolute "
                        "position of each sequence's next token): pass both or neither")
    if initial_state is None:
        return None, None
    for name, x in (("initial_state", initial_state), ("initial_positions", initial_positions)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    want = (count, layout.H, layout.DK, layout.DV)
    got = tuple(initial_state.shape[:2]) + tuple(initial_state.shape[3:])
    if initial_state.dim() != 5 or got != want:
        raise ValueError(f"initial_state must have shape (N, H, S, Dk, Dv) with (N, H, Dk, Dv) = {want} (one row "
                         f"per sequence), got {tuple(initial_state.shape)}")
    if initial_state.dtype != state_dtype:
        raise TypeError(f"initial_state must be {state_dtype} for {layout.tensors['v'].dtype} inputs, "
                        f"got {initial_state.dtype}")
    if initial_positions.dtype != torch.int64 or tuple(initial_positions.shape) != (count,):
        raise ValueError(f"initial_positions must be an int64 tensor of shape ({count},), "
                         f"got {initial_positions.dtype} {tuple(initial_positions.shape)}")
    device = layout.tensors["v"].device
    if initial_state.device != device or initial_positions.device != device:
        raise ValueError(f"initial_state and initial_positions must be on {device}, got {initial_state.device} and "
                         f"{initial_positions.device}")
    return initial_state.contiguous(), initial_positions


def sequence_states(layout: SequenceLayout, seqs, C: int, initial, state_dtype, logdec_dtype):
    """The hierarchy of a call over sequences (:mod:`kernels._sequences`): ``(states (H,
    n_entries, Dk*Dv), logdec (H, n_entries))``, the carried buckets of ``initial`` included.
    Shared by the forward and the backward."""
    DK, DV, H = layout.DK, layout.DV, layout.H
    v = layout.tensors["v"]
    acc, prec, _ = compute_types(v.dtype)
    states = scratch((H, seqs.n_entries, DK * DV), state_dtype, v.device)
    logdec = scratch((H, seqs.n_entries), logdec_dtype, v.device)
    BDK, BDV = block(DK, 64), block(DV, 64)
    n_dv = cdiv(DV, BDV)
    S_in = 0 if initial is None else initial.shape[2]
    if seqs.n_slots and H:
        _state_kernel[(seqs.n_slots, H, cdiv(DK, BDK) * n_dv)](
            layout.tensors["k"], v, layout.decay_args()[0], states, logdec, states if initial is None else initial,
            seqs.table, seqs.chunk_seq, layout.T, 1, seqs.n_entries, DK, DV, n_dv, H // layout.Hqk, S_in,
            *layout.args("k")[1:], *layout.args("v")[1:], *layout.decay_args()[1:],
            C=C, LOG_C=C.bit_length() - 1, FULL_CHUNKS=False, BDK=BDK, BDV=BDV,
            HAS_G=layout.tensors["g"] is not None, ACC=acc, PREC=prec, LOWP=v.dtype == torch.bfloat16,
            NATIVE=not interpreting(), VARLEN=True,
            num_warps=NUM_WARPS["attention_state"])
    _states.build_sequence_hierarchy(states, logdec, initial, seqs, C)
    return states, logdec


def final_states(layout: SequenceLayout, seqs, C: int, states, logdec, initial):
    """The state after the last token of every sequence, ``(N, H, final_slots, Dk, Dv)`` (the
    hierarchy's dtype)."""
    DK, DV, H = layout.DK, layout.DV, layout.H
    v = layout.tensors["v"]
    acc, prec, _ = compute_types(v.dtype)
    final = scratch((seqs.count, H, seqs.final_slots, DK, DV), states.dtype, v.device)
    BDK, BDV = block(DK, 64), block(DV, 64)
    n_dv = cdiv(DV, BDV)
    if seqs.count and H and seqs.final_slots:
        _final_state_kernel[(seqs.count, H, cdiv(DK, BDK) * n_dv)](
            layout.tensors["k"], v, layout.decay_args()[0], states, logdec, states if initial is None else initial,
            final, seqs.table, seqs.n_entries, seqs.levels, 0 if initial is None else initial.shape[2],
            seqs.final_slots, DK, DV, n_dv, H // layout.Hqk, *layout.args("k")[1:], *layout.args("v")[1:],
            *layout.decay_args()[1:], C=C, LOG_C=C.bit_length() - 1, BDK=BDK, BDV=BDV,
            HAS_G=layout.tensors["g"] is not None, ACC=acc, PREC=prec, NATIVE=not interpreting(),
            num_warps=NUM_WARPS["attention_state"])
    return final


def attention_state_forward(q, k, v, level_scales, log_decay=None, scale: float = 1.0, *, chunk=None,
                            initial_state=None, initial_positions=None, cu_seqlens=None,
                            output_final_state: bool = False, out=None):
    """Log-linear attention over sequences: continuing from a recurrent state, on packed sequences,
    with the final state, with grouped heads (``docs/kernels.md`` §6).

    Parameters
    ----------
    q, k : torch.Tensor, shape ``(N, Hqk, T, Dk)``
    v : torch.Tensor, shape ``(N, H, T, Dv)``
        ``Hqk`` divides ``H``: head ``h`` reads head ``h // (H // Hqk)`` of ``q`` and ``k`` (in place).
    level_scales : torch.Tensor, shape ``(N, H, T, L)``
        Row ``i`` of a sequence belongs to its absolute position ``a + i``; ``L`` must cover
        ``num_levels`` of every end position (not checked here: the positions stay on the device;
        rows that would read past ``L`` give NaN).
    log_decay : torch.Tensor, shape ``(N, H, T)``, optional
    scale : float
    chunk : int, optional
        Chunk size (power of two in ``[16, 256]``).
    initial_state : torch.Tensor, shape ``(Nseq, H, S, Dk, Dv)``, optional
        float32 (float64 for float64 inputs): slot ``l - 1`` the level-``l`` bucket of the
        sequence's position (``hodlr.LogLinearState``'s layout; empty buckets are not read).
    initial_positions : torch.Tensor, shape ``(Nseq,)``, int64, optional
        With ``initial_state``: the absolute position ``a`` of each sequence's first token
        (``0 <= a < 2**S``; not read on the host).
    cu_seqlens : torch.Tensor, shape ``(Nseq + 1,)``, optional
        Packed sequences along ``T`` (``N == 1``); read once on the host (the lengths).
    output_final_state : bool
    out : torch.Tensor, optional
        Contiguous ``(N, H, T, Dv)`` output buffer with ``v``'s dtype.

    Returns
    -------
    ``o (N, H, T, Dv)``, or ``(o, (states (Nseq, H, S', Dk, Dv), positions (Nseq,)))`` with
    ``output_final_state``, ``S' = max(S, bit_length(2**S - 1 + longest length))`` (every end fits).
    """
    C = check_chunk(chunk, "attention")
    scale = check_scale(scale)
    check_bool("output_final_state", output_final_state)
    layout = sequence_layout(q, k, v, level_scales, log_decay)
    if cu_seqlens is not None and layout.N != 1:
        raise ValueError(f"with cu_seqlens the tensors hold one row of packed sequences (N == 1), got N={layout.N}")
    v = layout.tensors["v"]
    state_dtype, logdec_dtype = state_dtypes(v.dtype)
    count = layout.N if cu_seqlens is None else cu_seqlens.shape[0] - 1
    initial, positions = check_initial_state(initial_state, initial_positions, count, layout, state_dtype)
    seqs = _sequences.plan(layout.N, layout.T, C, cu_seqlens, positions, 0 if initial is None else initial.shape[2],
                           v.device)
    out = output_buffer(out, (layout.N, layout.H, layout.T, layout.DV), v,
                        {"q": q, "k": k, "v": v, "level_scales": level_scales, "log_decay": log_decay,
                         "initial_state": initial_state})
    states, logdec = sequence_states(layout, seqs, C, initial, state_dtype, logdec_dtype)
    acc, prec, exact = compute_types(v.dtype)
    BDK, BDV = block(layout.DK, OUTPUT_TILE), block(layout.DV, OUTPUT_TILE)
    if seqs.n_slots and layout.H:
        _output_kernel[(seqs.n_slots, layout.H, cdiv(layout.DV, BDV))](
            q, k, v, level_scales, layout.decay_args()[0], states, logdec, out, states if initial is None else initial,
            seqs.table, seqs.chunk_seq, None, layout.T, 1, 0, seqs.n_entries, seqs.levels, layout.L, layout.DK,
            layout.DV, scale, layout.H // layout.Hqk, 0 if initial is None else initial.shape[2],
            *layout.args("q")[1:], *layout.args("k")[1:], *layout.args("v")[1:], *layout.args("l")[1:],
            *layout.decay_args()[1:], *out.stride(), C=C, LOG_C=C.bit_length() - 1, FULL_CHUNKS=False, BDK=BDK,
            BDV=BDV,
            HAS_G=log_decay is not None, ACC=acc, PREC=prec, EXACT=exact, LOWP=v.dtype == torch.bfloat16,
            NATIVE=not interpreting(), VARLEN=True, BL=1, num_warps=NUM_WARPS["attention_output"])
    if not output_final_state:
        return out
    final = final_states(layout, seqs, C, states, logdec, initial)
    start = positions if positions is not None else torch.zeros(count, dtype=torch.int64, device=v.device)
    ends = start + torch.as_tensor(seqs.lengths, dtype=torch.int64).to(v.device)
    return out, (final, ends)
