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

from . import states as _states
from ._device import chunk_decays, chunk_rows, dot, intra_mask, next_decay
from ._layout import (NUM_WARPS, block, broadcast_shape, cdiv, check_chunk, check_levels, chunk_count,
                      collapse_batch, compute_types, interpreting, output_buffer, state_dtypes)


@triton.jit(do_not_specialize=["T", "B1", "n_total", "N_DV_TILES", "sgb0", "sgb1"])
def _state_kernel(k_ptr, v_ptr, g_ptr, h_ptr, a_ptr,
                  T, B1, n_total, DK: tl.constexpr, DV: tl.constexpr, N_DV_TILES,
                  skb0, skb1, skt, skd, svb0, svb1, svt, svd, sgb0, sgb1, sgt,
                  C: tl.constexpr, BDK: tl.constexpr, BDV: tl.constexpr, HAS_G: tl.constexpr,
                  ACC: tl.constexpr, PREC: tl.constexpr, LOWP: tl.constexpr, NATIVE: tl.constexpr):
    j, bh, b0, b1, t, tmask = chunk_rows(B1, T, C)
    tile = tl.program_id(2)
    dk = (tile // N_DV_TILES) * BDK + tl.arange(0, BDK)
    dv = (tile % N_DV_TILES) * BDV + tl.arange(0, BDV)
    if HAS_G:
        g_row = g_ptr + b0 * sgb0 + b1 * sgb1
        g_end = tl.sum(tl.load(g_row + t * sgt, mask=tmask, other=0.0).to(ACC), 0)
        w = tl.exp(tl.cumsum(next_decay(g_row, t, sgt, T, C, ACC), 0, reverse=True))
    else:
        g_end = tl.zeros((), dtype=ACC)
        w = tl.full((C,), 1.0, dtype=ACC)
    kb = tl.load(k_ptr + b0 * skb0 + b1 * skb1 + t[:, None] * skt + dk[None, :] * skd,
                 mask=tmask[:, None] & (dk[None, :] < DK), other=0.0)
    vb = tl.load(v_ptr + b0 * svb0 + b1 * svb1 + t[:, None] * svt + dv[None, :] * svd,
                 mask=tmask[:, None] & (dv[None, :] < DV), other=0.0)
    kw = kb.to(ACC) * w[:, None]
    if LOWP and NATIVE:  # bfloat16 on a GPU: decayed keys rounded to bfloat16 for a native dot
        kw = kw.to(kb.dtype)
    S = dot(tl.trans(kw), vb, ACC, PREC, NATIVE)
    row = bh * n_total + j
    tl.store(h_ptr + row * DK * DV + dk[:, None] * DV + dv[None, :], S,
             mask=(dk[:, None] < DK) & (dv[None, :] < DV))
    if tile == 0:
        tl.store(a_ptr + row, g_end)


@triton.jit(do_not_specialize=["T", "B1", "n_chunks", "n_total", "n_bits", "L", "slb0", "slb1", "slt", "sgb0",
                            "sgb1"])
def _output_kernel(q_ptr, k_ptr, v_ptr, l_ptr, g_ptr, h_ptr, a_ptr, o_ptr,
                   T, B1, n_chunks, n_total, n_bits, L, DK: tl.constexpr, DV: tl.constexpr, scale,
                   sqb0, sqb1, sqt, sqd, skb0, skb1, skt, skd, svb0, svb1, svt, svd,
                   slb0, slb1, slt, sll, sgb0, sgb1, sgt, sob0, sob1, sot, sod,
                   C: tl.constexpr, LOG_C: tl.constexpr, BDK: tl.constexpr, BDV: tl.constexpr,
                   HAS_G: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr, EXACT: tl.constexpr,
                   LOWP: tl.constexpr, NATIVE: tl.constexpr):
    i, bh, b0, b1, t, tmask = chunk_rows(B1, T, C)
    dv = tl.program_id(2) * BDV + tl.arange(0, BDV)
    dvmask = dv < DV
    q_base = q_ptr + b0 * sqb0 + b1 * sqb1 + t[:, None] * sqt
    k_base = k_ptr + b0 * skb0 + b1 * skb1 + t[:, None] * skt
    l_base = l_ptr + b0 * slb0 + b1 * slb1 + t * slt
    G, g_next = chunk_decays(g_ptr + b0 * sgb0 + b1 * sgb1, t, tmask, sgt, T, C, HAS_G, ACC)

    # levels 0..c: dense and masked inside the chunk
    scores = tl.zeros((C, C), dtype=ACC)
    for d0 in tl.static_range(0, DK, BDK):
        dk = d0 + tl.arange(0, BDK)
        m2 = tmask[:, None] & (dk[None, :] < DK)
        qb = tl.load(q_base + dk[None, :] * sqd, mask=m2, other=0.0)
        kb = tl.load(k_base + dk[None, :] * skd, mask=m2, other=0.0)
        scores += dot(qb, tl.trans(kb), ACC, PREC, NATIVE)
    l_chunk = l_ptr + b0 * slb0 + b1 * slb1 + (i * C).to(tl.int64) * slt
    P = intra_mask(l_chunk, slt, sll, L, G, g_next, tmask, C, HAS_G, EXACT) * scores
    vb = tl.load(v_ptr + b0 * svb0 + b1 * svb1 + t[:, None] * svt + dv[None, :] * svd,
                 mask=tmask[:, None] & dvmask[None, :], other=0.0)
    if LOWP and NATIVE:  # bfloat16 on a GPU: masked scores rounded to bfloat16 for a native dot with v
        P = P.to(vb.dtype)
    acc = dot(P, vb, ACC, PREC, NATIVE)

    # levels > c: one aligned block state per set bit of the chunk index
    gap = tl.zeros((), dtype=ACC)
    off = 0
    nh = n_chunks
    h = 0
    while h < n_bits:  # a while loop: the interpreter cannot range() over a computed bound
        if ((i >> h) & 1) == 1:
            blk = bh * n_total + off + (i >> h) - 1
            lam = tl.load(l_base + (LOG_C + 1 + h) * sll, mask=tmask, other=0.0).to(ACC)
            part = tl.zeros((C, BDV), dtype=ACC)
            for d0 in tl.static_range(0, DK, BDK):
                dk = d0 + tl.arange(0, BDK)
                qb = tl.load(q_base + dk[None, :] * sqd, mask=tmask[:, None] & (dk[None, :] < DK), other=0.0)
                sb = tl.load(h_ptr + blk * DK * DV + dk[:, None] * DV + dv[None, :],
                             mask=(dk[:, None] < DK) & dvmask[None, :], other=0.0)
                if LOWP and NATIVE:  # bfloat16 on a GPU: the float32 state rounded once, for a native dot
                    sb = sb.to(qb.dtype)
                part += dot(qb, sb, ACC, PREC, NATIVE)
            acc += (lam * tl.exp(gap + G))[:, None] * part
            gap += tl.load(a_ptr + blk)
        off += nh
        nh = nh // 2
        h += 1
    tl.store(o_ptr + b0 * sob0 + b1 * sob1 + t[:, None] * sot + dv[None, :] * sod, acc * scale,
             mask=tmask[:, None] & dvmask[None, :])


class Layout(NamedTuple):
    """One call's tensors as the kernels index them: every operand broadcast to the common batch
    shape (views) and folded into two batch indices ``(b0, b1)`` with per-tensor strides
    (:func:`kernels._layout.collapse_batch`)."""

    batch: tuple
    B0: int
    B1: int
    T: int
    DK: int
    DV: int
    L: int
    tensors: dict
    strides: dict

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


def attention_layout(q, k, v, level_scales, log_decay, **others) -> Layout:
    """Check the shapes of one attention call and fold its batch dims (views, no copies).

    ``others`` are further ``(*batch, T, width)`` tensors of the call (cotangents, output
    buffers) that share the batch; they are broadcast and folded with the rest."""
    batch = tuple(broadcast_shape(q.shape[:-2], k.shape[:-2], v.shape[:-2], level_scales.shape[:-2],
                                  () if log_decay is None else log_decay.shape[:-1],
                                  *(x.shape[:-2] for x in others.values())))
    T, DK, DV, L = q.shape[-2], q.shape[-1], v.shape[-1], level_scales.shape[-1]
    if k.shape[-2:] != (T, DK) or v.shape[-2] != T or level_scales.shape[-2] != T or (
            log_decay is not None and log_decay.shape[-1] != T):
        raise ValueError(f"shapes disagree: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, "
                         f"level_scales {tuple(level_scales.shape)}, "
                         f"log_decay {None if log_decay is None else tuple(log_decay.shape)}")
    check_levels(T, L)
    named = {"q": q, "k": k, "v": v, "l": level_scales, **others}
    named = {name: x.expand(batch + tuple(x.shape[-2:])) for name, x in named.items()}
    named["g"] = None if log_decay is None else log_decay.expand(batch + (T,))
    B0, B1, strides, folded = collapse_batch(batch, list(named.values()))
    return Layout(batch, B0, B1, T, DK, DV, L, dict(zip(named, folded)), dict(zip(named, strides)))


def chunk_states(layout: Layout, C: int, state_dtype, logdec_dtype):
    """The chunk-state hierarchy of :mod:`kernels.states` for the keys and values of ``layout``
    with chunk size ``C``: ``(states (B, N, Dk*Dv), logdec (B, N))``.  Shared by the forward and
    the backward (which recomputes it rather than keeping it)."""
    k, v, g = (layout.tensors[name] for name in ("k", "v", "g"))
    DK, DV = layout.DK, layout.DV
    acc, prec, _ = compute_types(v.dtype)
    n = chunk_count(layout.T, C)
    states, logdec = _states.allocate(layout.B, n, DK * DV, v.device, state_dtype, logdec_dtype)
    BDK, BDV = block(DK, 64), block(DV, 64)
    n_dv = cdiv(DV, BDV)
    _state_kernel[(n, layout.B, cdiv(DK, BDK) * n_dv)](
        k, v, layout.decay_args()[0], states, logdec, layout.T, layout.B1, states.shape[1], DK, DV, n_dv,
        *layout.args("k")[1:], *layout.args("v")[1:], *layout.decay_args()[1:],
        C=C, BDK=BDK, BDV=BDV, HAS_G=g is not None, ACC=acc, PREC=prec, LOWP=v.dtype == torch.bfloat16,
        NATIVE=not interpreting(), num_warps=NUM_WARPS["attention_state"])
    _states.build_hierarchy(states, logdec, n)
    return states, logdec


def attention_forward(q, k, v, level_scales, log_decay=None, scale: float = 1.0, *, chunk=None, out=None,
                      return_states: bool = False):
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
        (dtypes: :func:`kernels._layout.state_dtypes`).

    Returns
    -------
    torch.Tensor ``(*batch, T, Dv)`` (and the states when asked).
    """
    C = check_chunk(chunk, "attention")
    layout = attention_layout(q, k, v, level_scales, log_decay)
    T, DK, DV, L = layout.T, layout.DK, layout.DV, layout.L
    v = layout.tensors["v"]
    acc, prec, exact = compute_types(v.dtype)
    out = output_buffer(out, layout.batch + (T, DV), v)
    o_flat = out.reshape((layout.B0, layout.B1, T, DV))
    states, logdec = chunk_states(layout, C, *state_dtypes(v.dtype))
    n = chunk_count(T, C)
    BDK, BDV = block(DK, 64), block(DV, 64)
    n_dv = cdiv(DV, BDV)
    _output_kernel[(n, layout.B, n_dv)](
        layout.tensors["q"], layout.tensors["k"], v, layout.tensors["l"], layout.decay_args()[0], states, logdec,
        o_flat, T, layout.B1, n, states.shape[1], (n - 1).bit_length(), L, DK, DV, float(scale),
        *layout.args("q")[1:], *layout.args("k")[1:], *layout.args("v")[1:], *layout.args("l")[1:],
        *layout.decay_args()[1:], o_flat.stride(0), o_flat.stride(1), o_flat.stride(2), o_flat.stride(3),
        C=C, LOG_C=C.bit_length() - 1, BDK=BDK, BDV=BDV, HAS_G=layout.tensors["g"] is not None, ACC=acc,
        PREC=prec, EXACT=exact, LOWP=v.dtype == torch.bfloat16, NATIVE=not interpreting(),
        num_warps=NUM_WARPS["attention_output"])
    return (out, (states, logdec)) if return_states else out
