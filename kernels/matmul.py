"""Chunked HODLR matmul forward: ``Y = M @ X`` for the log-linear mask ``M``.

The attention kernels with ``q kᵀ`` replaced by ones: a chunk state is the decayed sum
``S_j = Σ_s exp(G_end - G_s) x_s`` (a ``D``-vector), the hierarchy of
:mod:`kernels.states` has ``F = D``, and the output kernel adds, per set bit ``h`` of the
chunk index, the rank-1 term ``λ[t, c+h+1] exp(gap + G_t) H_h[(i >> h) - 1]``: all levels
at once, as one ``(C x HB) @ (HB x D)`` product of the decayed row factors and the block
states (``HB`` >= the number of chunk levels), so no load waits on another.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import states as _states
from kernels._device import chunk_decays, chunk_rows, intra_mask, next_decay
from kernels._layout import (MAX_REGISTERS, NUM_WARPS, block, broadcast_shape, cdiv, check_chunk, check_levels,
                             chunk_count, collapse_batch, compute_types, hierarchy_sizes, next_power_of_2, output_buffer,
                             state_dtypes)


@triton.jit(do_not_specialize=["T", "B1", "n_total", "sgb0", "sgb1"])
def _state_kernel(x_ptr, g_ptr, h_ptr, a_ptr, T, B1, n_total, D,
                  sxb0, sxb1, sxt, sxd, sgb0, sgb1, sgt,
                  C: tl.constexpr, BD: tl.constexpr, HAS_G: tl.constexpr, ACC: tl.constexpr):
    j, bh, b0, b1, t, tmask = chunk_rows(B1, T, C)
    d = tl.program_id(2) * BD + tl.arange(0, BD)
    xb = tl.load(x_ptr + b0 * sxb0 + b1 * sxb1 + t[:, None] * sxt + d[None, :] * sxd,
                 mask=tmask[:, None] & (d[None, :] < D), other=0.0).to(ACC)
    row = bh * n_total + j
    if HAS_G:
        g_row = g_ptr + b0 * sgb0 + b1 * sgb1
        g_end = tl.sum(tl.load(g_row + t * sgt, mask=tmask, other=0.0).to(ACC), 0)
        w = tl.exp(tl.cumsum(next_decay(g_row, t, sgt, T, C, ACC), 0, reverse=True))
        S = tl.sum(xb * w[:, None], 0)
        if tl.program_id(2) == 0:
            tl.store(a_ptr + row, g_end)
    else:
        S = tl.sum(xb, 0)
        if tl.program_id(2) == 0:
            tl.store(a_ptr + row, tl.zeros((), dtype=ACC))
    tl.store(h_ptr + row * D + d, S, mask=d < D)


@triton.jit(do_not_specialize=["T", "B1", "n_chunks", "n_total", "n_bits", "slb0", "slb1", "slt", "sgb0",
                            "sgb1"])
def _output_kernel(x_ptr, l_ptr, g_ptr, h_ptr, a_ptr, y_ptr,
                   T, B1, n_chunks, n_total, n_bits, D,
                   sxb0, sxb1, sxt, sxd, slb0, slb1, slt, sll, sgb0, sgb1, sgt, syb0, syb1, syt, syd,
                   C: tl.constexpr, LOG_C: tl.constexpr, BD: tl.constexpr, HB: tl.constexpr,
                   HAS_G: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr, EXACT: tl.constexpr):
    i, bh, b0, b1, t, tmask = chunk_rows(B1, T, C)
    d = tl.program_id(2) * BD + tl.arange(0, BD)
    dmask = d < D
    l_chunk = l_ptr + b0 * slb0 + b1 * slb1 + (i * C).to(tl.int64) * slt
    G, g_next = chunk_decays(g_ptr + b0 * sgb0 + b1 * sgb1, t, tmask, sgt, T, C, HAS_G, ACC)
    M = intra_mask(l_chunk, slt, sll, G, g_next, tmask, C, HAS_G, EXACT)
    xb = tl.load(x_ptr + b0 * sxb0 + b1 * sxb1 + t[:, None] * sxt + d[None, :] * sxd,
                 mask=tmask[:, None] & dmask[None, :], other=0.0).to(ACC)
    acc = tl.dot(M, xb, input_precision=PREC, out_dtype=ACC)
    # levels > c, all at once (no dependent loads): bit h of the chunk index set -> the
    # level-h block (i >> h) - 1, decayed by the blocks of the lower set bits
    hs = tl.arange(0, HB)
    read = (((i >> hs) & 1) == 1) & (hs < n_bits)
    sizes = n_chunks >> hs
    blk = bh * n_total + tl.cumsum(sizes, 0) - sizes + (i >> hs) - 1
    A = tl.load(a_ptr + blk, mask=read, other=0.0)
    gap = tl.sum(tl.where(hs[None, :] < hs[:, None], A[None, :], 0.0), 1)
    S = tl.load(h_ptr + blk[:, None] * D + d[None, :], mask=read[:, None] & dmask[None, :], other=0.0)
    r = tl.arange(0, C)
    lam = tl.load(l_chunk + (r[:, None] * slt + (LOG_C + 1 + hs)[None, :] * sll),
                  mask=tmask[:, None] & read[None, :], other=0.0).to(ACC)
    acc += tl.dot(lam * tl.exp(G)[:, None] * tl.exp(gap)[None, :], S, input_precision=PREC, out_dtype=ACC)
    tl.store(y_ptr + b0 * syb0 + b1 * syb1 + t[:, None] * syt + d[None, :] * syd, acc,
             mask=tmask[:, None] & dmask[None, :])


def matmul(level_scales, log_decay, x, *, chunk=None, out=None, return_states: bool = False):
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
    return_states : bool
        Also return the chunk-state hierarchy ``(states, logdec)`` of :mod:`kernels.states`.
    """
    C = check_chunk(chunk, "matmul")
    batch = broadcast_shape(x.shape[:-2], level_scales.shape[:-2], () if log_decay is None else log_decay.shape[:-1])
    T, D, L = x.shape[-2], x.shape[-1], level_scales.shape[-1]
    if level_scales.shape[-2] != T or (log_decay is not None and log_decay.shape[-1] != T):
        raise ValueError(f"shapes disagree: x {tuple(x.shape)}, level_scales {tuple(level_scales.shape)}, "
                         f"log_decay {None if log_decay is None else tuple(log_decay.shape)}")
    check_levels(T, L)
    acc, prec, exact = compute_types(x.dtype)
    x = x.expand(batch + x.shape[-2:])
    lam = level_scales.expand(batch + level_scales.shape[-2:])
    g = None if log_decay is None else log_decay.expand(batch + (T,))
    out = output_buffer(out, batch + (T, D), x)
    B0, B1, strides, (x, lam, g, out) = collapse_batch(batch, [x, lam, g, out])
    B = B0 * B1
    sx, sl, sg, sy = strides
    n = chunk_count(T, C)
    n_total = sum(hierarchy_sizes(n))
    states, logdec = _states.allocate(B, n, D, x.device, *state_dtypes(x.dtype))
    BD = block(D, 128)
    g_arg = lam if g is None else g
    gst = (0, 0, 0) if g is None else (sg[0], sg[1], g.stride(-1))
    _state_kernel[(n, B, cdiv(D, BD))](
        x, g_arg, states, logdec, T, B1, n_total, D, sx[0], sx[1], x.stride(-2), x.stride(-1), *gst,
        C=C, BD=BD, HAS_G=g is not None, ACC=acc, num_warps=NUM_WARPS["matmul_state"])
    _states.build_hierarchy(states, logdec, n)
    _output_kernel[(n, B, cdiv(D, BD))](
        x, lam, g_arg, states, logdec, out, T, B1, n, n_total, (n - 1).bit_length(), D,
        sx[0], sx[1], x.stride(-2), x.stride(-1), sl[0], sl[1], lam.stride(-2), lam.stride(-1), *gst,
        sy[0], sy[1], out.stride(-2), out.stride(-1),
        C=C, LOG_C=C.bit_length() - 1, BD=BD, HB=max(16, next_power_of_2((n - 1).bit_length())), HAS_G=g is not None, ACC=acc, PREC=prec, EXACT=exact,
        num_warps=NUM_WARPS["matmul_output"], **({"maxnreg": MAX_REGISTERS["matmul_output"]} if BD <= 64 else {}))
    result = out.reshape(batch + (T, D))
    return (result, (states, logdec)) if return_states else result
