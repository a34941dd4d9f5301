"""Chunked HODLR matmul forward: ``Y = M @ X`` for the log-linear mask ``M``.

The attention kernels with ``q kᵀ`` replaced by ones: a chunk state is the decayed sum
``S_j = Σ_s exp(G_end - G_s) x_s`` (a ``D``-vector, ``F = D``; the state kernel writes the
levels inside its :data:`STATE_ROWS` rows of the hierarchy of :mod:`kernels.states` at once),
and the output kernel adds, per set bit ``h`` of the chunk index, the rank-1 term
``λ[t, c+h+1] exp(gap + G_t) H_h[(i >> h) - 1]``: all levels at once, as one
``(C x HB) @ (HB x D)`` product of the decayed row factors and the block states (``HB`` >=
the number of chunk levels), so no load waits on another.  On Hopper GPUs the ``x`` and ``y``
tiles move through the tensor memory accelerator (:func:`kernels._layout.tma_descriptor`)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import states as _states
from ._device import (chunk_decays, chunk_rows, dot, intra_mask, load_tile, next_decay, store_tile,
                      validate_rows)
from hodlr.fenwick.arrays import check_bool

from ._layout import (MAX_REGISTERS, NUM_WARPS, block, broadcast_shape, cdiv, check_block, check_chunk,
                      check_flag, check_levels, check_tensor, chunk_count, collapse_batch, compute_types, hierarchy_sizes,
                      next_power_of_2, output_buffer, interpreting, state_dtypes, tma_descriptor)


@triton.jit(do_not_specialize=["T", "B", "B1", "n_chunks", "n_total", "top", "sgb0", "sgb1"])
def _state_kernel(x, g_ptr, h_ptr, a_ptr, T, B, B1, n_chunks, n_total, top, D,
                  sxb0, sxb1, sxt, sxd, sgb0, sgb1, sgt,
                  C: tl.constexpr, P: tl.constexpr, LEVELS: tl.constexpr, BD: tl.constexpr, HAS_G: tl.constexpr,
                  ACC: tl.constexpr, PREC: tl.constexpr, LOWP: tl.constexpr, NATIVE: tl.constexpr, TMA: tl.constexpr):
    """Program ``(tile, batch entry B - 1 - axis 1, D-tile)``: the ``R = P C`` rows of ``P``
    consecutive chunks -> the block states of levels ``0 .. LEVELS-1`` inside them (at most 16
    blocks), as one ``(16 x R) @ (R x D)`` product of decay weights and ``x``.  The weight of
    row ``s`` in a block is ``w_s tail[c]``: ``w_s = exp(Σ_{k=s+1..end of its chunk c} g_k)``
    and ``tail[c]`` the exponential of the chunk sums ``A`` after ``c`` in the block (every
    exponent a sum of its own terms).  Levels above ``top`` and blocks past the last full one
    are not stored.  ``x``: a tensor descriptor with ``TMA``, else a pointer (``load_tile``)."""
    R: tl.constexpr = P * C
    tile = tl.program_id(0)
    bh = B - 1 - tl.program_id(1)  # last entry first, so the output kernel's first entries are still in L2
    b0 = (bh // B1).to(tl.int64)
    b1 = (bh % B1).to(tl.int64)
    s = tl.arange(0, R)
    t = tile * R + s
    tmask = t < T
    d = tl.program_id(2) * BD + tl.arange(0, BD)
    xb = load_tile(x, b0, b1, tile * R, tl.program_id(2) * BD, sxb0, sxb1, sxt, sxd, T, D, R, BD, TMA)
    # block row j: level h (the P >> h blocks of level h follow those of level h - 1), chunks
    # [first, last] of the tile, start of level h in the hierarchy
    j = tl.arange(0, 16)
    h = tl.zeros((16,), tl.int32)
    b = tl.zeros((16,), tl.int32)
    level_start = tl.zeros((16,), tl.int32)
    rows = 0
    offset = 0
    for lv in tl.static_range(LEVELS):
        here = (j >= rows) & (j < rows + (P >> lv))
        h = tl.where(here, lv, h)
        b = tl.where(here, j - rows, b)
        level_start = tl.where(here, offset, level_start)
        rows += P >> lv
        offset += n_chunks >> lv
    first = b << h
    last = first + (1 << h) - 1
    block = (tile * P >> h) + b
    stored = (j < rows) & (h <= top) & (block < (n_chunks >> h))
    chunk = s // C
    inside = (chunk[None, :] >= first[:, None]) & (chunk[None, :] <= last[:, None])
    if HAS_G:
        g_row = g_ptr + b0 * sgb0 + b1 * sgb1
        g = tl.reshape(tl.load(g_row + t * sgt, mask=tmask, other=0.0).to(ACC), (P, C))
        w = tl.reshape(tl.exp(tl.cumsum(tl.reshape(next_decay(g_row, t, sgt, T, C, ACC), (P, C)), 1, reverse=True)),
                       (R,))
        c = tl.arange(0, P)
        A = tl.sum(g, 1)
        in_block = (c[None, :] >= first[:, None]) & (c[None, :] <= last[:, None])
        A_next = tl.sum(tl.where(c[None, :] == c[:, None] + 1, A[None, :], 0.0), 1)
        tail = tl.exp(tl.cumsum(tl.where(in_block & (c[None, :] < last[:, None]), A_next[None, :], 0.0), 1,
                                reverse=True))
        tail = tl.reshape(tl.broadcast_to(tail[:, :, None], (16, P, C)), (16, R))
        W = tl.where(inside, w[None, :] * tail, 0.0)
        A_block = tl.sum(tl.where(in_block, A[None, :], 0.0), 1)
    else:
        W = tl.where(inside, 1.0, 0.0).to(ACC)
        A_block = tl.zeros((16,), dtype=ACC)
    if LOWP and NATIVE:  # bfloat16 on a GPU: the decay weights rounded to bfloat16 for a native dot
        W = W.to(xb.dtype)
    S = dot(W, xb, ACC, PREC, NATIVE)
    row = bh.to(tl.int64) * n_total + level_start + block
    tl.store(h_ptr + row[:, None] * D + d[None, :], S, mask=stored[:, None] & (d[None, :] < D))
    if tl.program_id(2) == 0:
        tl.store(a_ptr + row, A_block, mask=stored)


@triton.jit(do_not_specialize=["T", "B1", "n_chunks", "n_total", "n_bits", "L", "slb0", "slb1", "slt", "sgb0",
                            "sgb1"])
def _output_kernel(x, l_ptr, g_ptr, h_ptr, a_ptr, y, flag_ptr,
                   T, B1, n_chunks, n_total, n_bits, D, L,
                   sxb0, sxb1, sxt, sxd, slb0, slb1, slt, sll, sgb0, sgb1, sgt, syb0, syb1, syt, syd,
                   C: tl.constexpr, LOG_C: tl.constexpr, FULL_CHUNKS: tl.constexpr, BD: tl.constexpr, HB: tl.constexpr,
                   HAS_G: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr, EXACT: tl.constexpr,
                   LOWP: tl.constexpr, NATIVE: tl.constexpr, TMA: tl.constexpr, BL: tl.constexpr):
    """Program ``(chunk i, batch entry, D-tile)``: ``y`` of the chunk's rows, levels ``0..c``
    densely (``intra_mask``) plus the levels above from the block states.  ``x`` and ``y``:
    tensor descriptors with ``TMA``, else pointers (``load_tile`` / ``store_tile``).  With a
    ``flag_ptr`` (not None) the program also validates the level scales and log-decays its rows
    read (:func:`validate_rows`)."""
    i, bh, b0, b1, t, tmask = chunk_rows(B1, T, C, FULL_CHUNKS)
    validate_rows(flag_ptr, l_ptr + b0 * slb0 + b1 * slb1, slt, sll, L, g_ptr + b0 * sgb0 + b1 * sgb1, sgt, t, tmask,
                  BL, HAS_G)  # the mask's validation, with a flag
    d = tl.program_id(2) * BD + tl.arange(0, BD)
    dmask = d < D
    l_chunk = l_ptr + b0 * slb0 + b1 * slb1 + (i * C).to(tl.int64) * slt
    # every load first: the kernel waits on memory more than it computes, so all loads are in
    # flight together (no load depends on another).  Levels > c: bit h of the chunk index set
    # -> the level-h block (i >> h) - 1, decayed by the blocks of the lower set bits.
    G, g_next = chunk_decays(g_ptr + b0 * sgb0 + b1 * sgb1, t, tmask, sgt, T, C, HAS_G, ACC)
    hs = tl.arange(0, HB)
    read = (((i >> hs) & 1) == 1) & (hs < n_bits)
    sizes = n_chunks >> hs
    blk = tl.cumsum(sizes, 0) - sizes + (i >> hs) - 1  # in this batch entry's hierarchy
    A = tl.load(a_ptr + bh * n_total + blk, mask=read, other=0.0)
    S = tl.load(h_ptr + bh * n_total * D + (blk[:, None] * D + d[None, :]), mask=read[:, None] & dmask[None, :],
                other=0.0)
    r = tl.arange(0, C)
    lam = tl.load(l_chunk + (r[:, None] * slt + (LOG_C + 1 + hs)[None, :] * sll),
                  mask=tmask[:, None] & read[None, :], other=0.0)
    xb = load_tile(x, b0, b1, i * C, tl.program_id(2) * BD, sxb0, sxb1, sxt, sxd, T, D, C, BD, TMA)
    # levels 0..c inside the chunk, then the levels above as one (C x HB) @ (HB x D) product
    M = intra_mask(l_chunk, slt, sll, L, G, g_next, tmask, C, HAS_G, EXACT)
    if LOWP and NATIVE:  # bfloat16 on a GPU: the mask rounded to bfloat16 for a native dot with x
        M = M.to(xb.dtype)
    acc = dot(M, xb, ACC, PREC, NATIVE)
    gap = tl.cumsum(A, 0) - A
    rows = lam.to(ACC) * tl.exp(G)[:, None] * tl.exp(gap)[None, :]
    if LOWP and NATIVE:  # and the level rows, for a native dot with the bfloat16 block states
        rows = rows.to(S.dtype)
    acc += dot(rows, S, ACC, PREC, NATIVE)
    store_tile(y, acc, b0, b1, i * C, tl.program_id(2) * BD, syb0, syb1, syt, syd, T, D, C, BD, TMA)


STATE_ROWS = 128
"""Rows per program of the state kernel: ``P = STATE_ROWS // C`` chunks (at least 1, at most
8), whose hierarchy levels ``0 .. log2 P`` (``2P - 1`` block states) it writes straight from
``x``; :func:`kernels.states.build_hierarchy` adds the rest."""


def matmul_forward(level_scales, log_decay, x, *, chunk=None, out=None, return_states: bool = False, check=None):
    """``Y = M @ X`` on the GPU (or the Triton interpreter).

    Parameters
    ----------
    level_scales : torch.Tensor, shape ``(*batch, T, L)``
    log_decay : torch.Tensor, shape ``(*batch, T)``, or None
    x : torch.Tensor, shape ``(*batch, T, D)``
        Leading dims broadcast; any strides; float16 / bfloat16 / float32 (float64 under the
        interpreter), accumulation in float32 (float64).
    chunk : int, optional
        Chunk size, a power of two in ``[16, 256]`` (default ``DEFAULT_CHUNK["matmul"]``).
    out : torch.Tensor, optional
        Contiguous ``(*batch, T, D)`` buffer with ``x``'s dtype.
    return_states : bool, default False
        Also return the chunk-state hierarchy ``(states, logdec)`` of :mod:`kernels.states`
        (dtypes: :func:`kernels._layout.state_dtypes` with ``compact=True``).
    check : torch.Tensor, optional
        A one-element int32 tensor holding 0 on ``x``'s device: the output kernel sets it to 1 if a
        level scale that is read or a log-decay is NaN or infinite (as
        :func:`hodlr.kernels.attention_forward`'s ``check``).

    Returns
    -------
    torch.Tensor ``(*batch, T, D)`` (the broadcast batch) in ``x``'s dtype: ``out`` when given; with
    ``return_states``, ``(y, (states, logdec))``.
    """
    C = check_chunk(chunk, "matmul")
    check_tensor("x", x, "T, D")
    check_tensor("level_scales", level_scales, "T, L")
    check_tensor("log_decay", log_decay, "T", optional=True)
    check_bool("return_states", return_states)
    check_flag(check, x.device)
    batch = broadcast_shape(x.shape[:-2], level_scales.shape[:-2], () if log_decay is None else log_decay.shape[:-1])
    T, D, L = x.shape[-2], x.shape[-1], level_scales.shape[-1]
    if level_scales.shape[-2] != T or (log_decay is not None and log_decay.shape[-1] != T):
        raise ValueError(f"shapes disagree: x {tuple(x.shape)}, level_scales {tuple(level_scales.shape)}, "
                         f"log_decay {None if log_decay is None else tuple(log_decay.shape)}")
    check_levels(T, L)
    acc, prec, exact = compute_types(x.dtype)
    lowp, native = x.dtype == torch.bfloat16, not interpreting()
    x = x.expand(batch + x.shape[-2:])
    lam = level_scales.expand(batch + level_scales.shape[-2:])
    g = None if log_decay is None else log_decay.expand(batch + (T,))
    out = output_buffer(out, batch + (T, D), x, {"x": x, "level_scales": level_scales, "log_decay": log_decay})
    B0, B1, strides, (x, lam, g, out) = collapse_batch(batch, [x, lam, g, out])
    B = B0 * B1
    sx, sl, sg, sy = strides
    n = chunk_count(T, C)
    sizes = hierarchy_sizes(n)
    top = len(sizes) - 1
    states, logdec = _states.allocate(B, n, D, x.device, *state_dtypes(x.dtype, compact=True))
    n_total = states.shape[1]  # the rows a batch entry (the kernels' batch stride)
    BD = block(D, 128)
    g_arg = lam if g is None else g
    gst = (0, 0, 0) if g is None else (sg[0], sg[1], g.stride(-1))
    P = max(1, STATE_ROWS // C)
    levels = P.bit_length()
    if P > 8 or P & (P - 1):
        raise ValueError(f"STATE_ROWS // chunk = {STATE_ROWS} // {C} must be a power of two <= 8")
    x_states = tma_descriptor(x, B0, B1, sx, P * C, BD)  # None: the kernels take pointers
    x_rows = tma_descriptor(x, B0, B1, sx, C, BD)
    y_rows = tma_descriptor(out, B0, B1, sy, C, BD)
    _state_kernel[(cdiv(n, P), B, cdiv(D, BD))](
        x if x_states is None else x_states, g_arg, states, logdec, T, B, B1, n, n_total, top, D,
        sx[0], sx[1], x.stride(-2), x.stride(-1), *gst,
        C=C, P=P, LEVELS=levels, BD=BD, HAS_G=g is not None, ACC=acc, PREC=prec, LOWP=lowp, NATIVE=native,
        TMA=x_states is not None, num_warps=NUM_WARPS["matmul_state"])
    _states.build_hierarchy(states, logdec, n, first_level=levels - 1)
    use_tma = x_rows is not None and y_rows is not None
    _output_kernel[(n, B, cdiv(D, BD))](
        x_rows if use_tma else x, lam, g_arg, states, logdec, y_rows if use_tma else out, check, T, B1, n, n_total,
        (n - 1).bit_length(), D, L, sx[0], sx[1], x.stride(-2), x.stride(-1), sl[0], sl[1], lam.stride(-2),
        lam.stride(-1), *gst, sy[0], sy[1], out.stride(-2), out.stride(-1),
        C=C, LOG_C=C.bit_length() - 1, FULL_CHUNKS=T % C == 0, BD=BD,
        HB=max(16, next_power_of_2((n - 1).bit_length())),
        HAS_G=g is not None, ACC=acc, PREC=prec, EXACT=exact, LOWP=lowp, NATIVE=native, TMA=use_tma,
        BL=check_block(T, check), num_warps=NUM_WARPS["matmul_output"],
        **({"maxnreg": MAX_REGISTERS["matmul_output"]} if BD <= 64 and lowp else {}))
    result = out.reshape(batch + (T, D))
    return (result, (states, logdec)) if return_states else result
