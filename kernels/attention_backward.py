"""Triton backward kernels of chunked log-linear attention (derivation: ``docs/backward.md``).

For ``O = (M ⊙ scale·Q Kᵀ) V`` with ``M[t, s] = λ[t, level(t, s)] exp(G[t] - G[s])`` and a
cotangent ``dO`` the gradients are

* ``dQ = scale (M ⊙ dP) K``, ``dK = scale (M ⊙ dP)ᵀ Q``, ``dV = (M ⊙ A)ᵀ dO`` with
  ``dP = dO Vᵀ``, ``A = scale Q Kᵀ``;
* ``dλ[t, l] = Σ_{s: level(t, s) = l} dP[t, s] A[t, s] exp(G[t] - G[s])`` (zero where row
  ``t`` does not read level ``l``);
* ``dg[u] = Σ_{t >= u} dG[t]`` for ``u >= 1`` and ``dg[0] = 0`` (``g[0]`` never enters the
  mask), with ``dG[t]`` the off-diagonal row sum minus column sum of ``dP ⊙ P``: the row sum
  is ``Σ_{l >= 1} λ[t, l] dλ[t, l]``, the column sum is accumulated by the kernels (leaving
  the diagonal out of both avoids the cancellation of ``q·dq − k·dk`` under strong decay).

Nothing is ``O(T²)``.  With chunk size ``C = 2^c`` and ``n = ceil(T / C)`` chunks:

* ``_intra_kernel`` (one program per chunk) does the dense ``C x C`` diagonal blocks (levels
  ``0..c``): ``dq, dk, dv``, ``dλ[:, 0..c]`` and the in-chunk column sums.
* Across chunks, ``dq`` and ``dλ[:, c+1+h]`` read the key-side Fenwick states over chunks
  (``S_h``: the ``2^h`` chunks of the bucket at chunk level ``h + 1``, ``Dk x Dv``), and
  ``dk, dv`` read, for every chunk level ``h``, the query-side sum
  ``R_h = Σ_t λ[t, c+1+h] exp(G[t] − G[a]) q_t dO_tᵀ`` over the odd (right) block of that
  level, anchored at the last position ``a`` of its even (left) sibling.
  ``method="parallel"`` (default): ``_prep_kernel`` writes per-chunk states (level 0 of
  :mod:`kernels.states`' hierarchy, completed by ``build_hierarchy``) and adds the ``R_h``
  with atomics, then ``_intra_kernel`` also does the across-chunk terms of its chunk.
  ``method="scan"`` (heads whose state tile exceeds :data:`PARALLEL_MAX_STATE`):
  ``_scan_kernel`` runs a forward scan (the ``S_h`` as a binary counter) and a reverse scan
  (the ``R_h``) concurrently, split over feature blocks.

Cross-chunk decays are ``exp`` of differences of the chunk-boundary prefix ``Gc`` (float64
on a GPU) plus in-chunk local cumulative sums ``b``; every exponent is ``<= 0`` when
``g <= 0``.  Extra memory beyond the inputs: ``dq, dk, dv, dλ`` accumulators (float32, or
float64 for float64 inputs), ``b`` and the column sums (``T``), ``Gc`` (``n + 1``) and chunk
states (``≈ 3n`` for the parallel method, ``2 log2 n`` for the scans) of ``Dk x Dv`` per
batch entry: ``O(T (Dk + Dv + L))`` per head plus chunk states.
"""

import torch
import triton
import triton.language as tl

from hodlr import fenwick
from . import states as _states
from ._layout import cdiv, hierarchy_sizes, next_power_of_2

DEFAULT_CHUNK = 64
"""Chunk size of the backward when the caller passes ``chunk=None``."""

MIN_BLOCK = 16


@triton.jit
def _chunk_tiles(i, bh, T, Dk, Dv, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """Indices of chunk ``i`` of batch entry ``bh`` in the flat ``(B, T, D)`` tensors: local
    rows ``r``, positions ``t`` and their mask ``tm``, feature columns ``kk`` / ``vv``, the
    ``(C, BK)`` / ``(C, BV)`` tile masks ``km`` / ``vm`` and element offsets ``qo`` / ``vo``."""
    r = tl.arange(0, C)
    t = i * C + r
    tm = t < T
    kk = tl.arange(0, BK)
    vv = tl.arange(0, BV)
    km = tm[:, None] & (kk < Dk)[None, :]
    vm = tm[:, None] & (vv < Dv)[None, :]
    qo = bh * T * Dk + t[:, None] * Dk + kk[None, :]
    vo = bh * T * Dv + t[:, None] * Dv + vv[None, :]
    return r, t, tm, kk, vv, km, vm, qo, vo


@triton.jit
def _intra_kernel(q_ptr, k_ptr, v_ptr, do_ptr, l_ptr, b_ptr, dq_ptr, dk_ptr, dv_ptr, dl_ptr, col_ptr,
                  gc_ptr, st_ptr, soff_ptr, r_ptr, roff_ptr,
                  T, L, Dk, Dv, NC, scale, n, LC, NS, NR,
                  C: tl.constexpr, LOGC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                  PREC: tl.constexpr, PREC_S: tl.constexpr, INTER: tl.constexpr):
    i = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    acc = dq_ptr.dtype.element_ty
    r, t, tm, kk, vv, km, vm, qo, vo = _chunk_tiles(i, bh, T, Dk, Dv, C, BK, BV)
    q = tl.load(q_ptr + qo, mask=km, other=0.0).to(acc)
    k = tl.load(k_ptr + qo, mask=km, other=0.0).to(acc)
    v = tl.load(v_ptr + vo, mask=vm, other=0.0).to(acc)
    do = tl.load(do_ptr + vo, mask=vm, other=0.0).to(acc)
    b = tl.load(b_ptr + bh * NC + t).to(acc)

    causal = (r[:, None] >= r[None, :]) & tm[:, None]
    x = r[:, None] ^ r[None, :]
    lev = tl.zeros((C, C), dtype=tl.int32)
    for bit in tl.static_range(LOGC):
        lev = tl.where((x >> bit) != 0, bit + 1, lev)
    lam = tl.load(l_ptr + bh * T * L + t[:, None] * L + lev, mask=causal, other=0.0).to(acc)
    decay = tl.exp(tl.where(causal, b[:, None] - b[None, :], float("-inf")))
    a = tl.dot(q, tl.trans(k), input_precision=PREC, out_dtype=acc) * scale
    dp = tl.dot(do, tl.trans(v), input_precision=PREC, out_dtype=acc)
    m = lam * decay
    ds = m * dp
    dq = tl.dot(ds, k, input_precision=PREC, out_dtype=acc) * scale
    dk = tl.dot(tl.trans(ds), q, input_precision=PREC, out_dtype=acc) * scale
    p = m * a
    dv = tl.dot(tl.trans(p), do, input_precision=PREC, out_dtype=acc)
    col = tl.sum(tl.where(r[:, None] > r[None, :], dp * p, 0.0), 0)
    if INTER:  # across chunks, from the key-side hierarchy and the query-side block sums
        st_base = st_ptr + bh * NS * Dk * Dv
        sm = (kk < Dk)[:, None] & (vv < Dv)[None, :]
        so = kk[:, None] * Dv + vv[None, :]
        gc_base = gc_ptr + bh * (n + 1)
        g_here = tl.load(gc_base + i)
        g_next = tl.load(gc_base + i + 1)
        gamma = tl.load(b_ptr + bh * NC + i * C + C - 1).to(acc)
        total = tl.zeros((BK, BV), dtype=acc)
        h = 0
        while h < LC:
            if ((i >> h) & 1) == 1:  # reads the level-h block just before its own
                state = tl.load(st_base + (tl.load(soff_ptr + h) + (i >> h) - 1) * Dk * Dv + so, mask=sm, other=0.0)
                f = tl.exp(b + (g_here - tl.load(gc_base + ((i >> h) << h))).to(acc)) * scale
                lam_h = tl.load(l_ptr + bh * T * L + t * L + (LOGC + 1 + h), mask=tm, other=0.0).to(acc)
                xs = tl.dot(do, tl.trans(state.to(acc)), input_precision=PREC_S, out_dtype=acc)
                dq += (f * lam_h)[:, None] * xs
                tl.store(dl_ptr + bh * T * L + t * L + (LOGC + 1 + h), f * tl.sum(q * xs, 1), mask=tm)
            else:  # its rows are read by the next level-h block
                start = ((i >> h) + 1) << h
                if start < n:
                    slot = tl.load(roff_ptr + h) + (((i >> h) + 1) >> 1)
                    rsum = tl.load(r_ptr + (bh * NR + slot) * Dk * Dv + so, mask=sm, other=0.0)
                    total += tl.exp((tl.load(gc_base + start) - g_next).to(acc)) * rsum
            h += 1
        e = tl.exp(gamma - b) * scale
        dk_in = e[:, None] * tl.dot(v, tl.trans(total), input_precision=PREC_S, out_dtype=acc)
        dk += dk_in
        dv += e[:, None] * tl.dot(k, total, input_precision=PREC_S, out_dtype=acc)
        col += tl.sum(k * dk_in, 1)
    tl.store(col_ptr + bh * T + t, col, mask=tm)
    tl.store(dq_ptr + qo, dq, mask=km)
    tl.store(dk_ptr + qo, dk, mask=km)
    tl.store(dv_ptr + vo, dv, mask=vm)
    w = dp * a * decay
    for lv in tl.static_range(LOGC + 1):
        dl = tl.sum(tl.where(lev == lv, w, 0.0), 1)
        tl.store(dl_ptr + bh * T * L + t * L + lv, dl, mask=tm & (lv < L))


@triton.jit
def _prep_kernel(q_ptr, k_ptr, v_ptr, do_ptr, l_ptr, b_ptr, gc_ptr, st_ptr, ld_ptr, r_ptr, roff_ptr,
                 T, L, Dk, Dv, NC, n, LC, NS, NR,
                 C: tl.constexpr, LOGC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
    """Per chunk ``i``: its key-side state ``Σ_s exp(γ_i − b_s) k_s v_sᵀ`` (level 0 of the
    hierarchy of :mod:`kernels.states`) and, for each set bit ``h`` of ``i``, its rows'
    contribution ``Σ_t λ[t, c+1+h] exp(G[t] − G[a]) q_t dO_tᵀ`` to the query-side sum of its
    odd level-``h`` block (anchored at the block's start ``a``), added atomically."""
    i = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    acc = st_ptr.dtype.element_ty
    r, t, tm, kk, vv, km, vm, qo, vo = _chunk_tiles(i, bh, T, Dk, Dv, C, BK, BV)
    sm = (kk < Dk)[:, None] & (vv < Dv)[None, :]
    so = kk[:, None] * Dv + vv[None, :]
    b = tl.load(b_ptr + bh * NC + t).to(acc)
    gamma = tl.load(b_ptr + bh * NC + i * C + C - 1).to(acc)
    k = tl.load(k_ptr + qo, mask=km, other=0.0).to(acc)
    v = tl.load(v_ptr + vo, mask=vm, other=0.0).to(acc)
    state = tl.dot(tl.trans(k * tl.exp(gamma - b)[:, None]), v, input_precision=PREC, out_dtype=acc)
    tl.store(st_ptr + (bh * NS + i) * Dk * Dv + so, state, mask=sm)
    tl.store(ld_ptr + bh * NS + i, gamma)
    q = tl.load(q_ptr + qo, mask=km, other=0.0).to(acc)
    do = tl.load(do_ptr + vo, mask=vm, other=0.0).to(acc)
    gc_base = gc_ptr + bh * (n + 1)
    g_here = tl.load(gc_base + i)
    h = 0
    while h < LC:
        if ((i >> h) & 1) == 1:
            lam_h = tl.load(l_ptr + bh * T * L + t * L + (LOGC + 1 + h), mask=tm, other=0.0).to(acc)
            f = lam_h * tl.exp(b + (g_here - tl.load(gc_base + ((i >> h) << h))).to(acc))
            z = tl.dot(tl.trans(q * f[:, None]), do, input_precision=PREC, out_dtype=acc)
            slot = tl.load(roff_ptr + h) + (i >> (h + 1))
            tl.atomic_add(r_ptr + (bh * NR + slot) * Dk * Dv + so, z, mask=sm)
        h += 1


@triton.jit
def _dq_scan(q_ptr, k_ptr, v_ptr, do_ptr, l_ptr, b_ptr, gc_ptr, dq_ptr, dl_ptr, s_ptr, bh, k0,
             T, L, Dk, Dv, NC, scale, n, LC, C: tl.constexpr, LOGC: tl.constexpr,
             BKS: tl.constexpr, SK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
    """Chunks in order; key-side Fenwick states over chunks for the key columns
    ``[k0, k0 + BKS)``: adds the across-chunk ``dq`` and (atomically, a partial sum over
    key columns) ``dλ[:, c+1+h]``."""
    acc = dq_ptr.dtype.element_ty
    r = tl.arange(0, C)
    kk = k0 + tl.arange(0, BKS)
    vv = tl.arange(0, BV)
    s_base = s_ptr + bh * LC * SK * BV + kk[:, None] * BV + vv[None, :]
    gc_base = gc_ptr + bh * (n + 1)
    i = 0
    while i < n:
        t = i * C + r
        tm = t < T
        km = tm[:, None] & (kk < Dk)[None, :]
        vm = tm[:, None] & (vv < Dv)[None, :]
        qo = bh * T * Dk + t[:, None] * Dk + kk[None, :]
        vo = bh * T * Dv + t[:, None] * Dv + vv[None, :]
        q = tl.load(q_ptr + qo, mask=km, other=0.0).to(acc)
        do = tl.load(do_ptr + vo, mask=vm, other=0.0).to(acc)
        b = tl.load(b_ptr + bh * NC + t).to(acc)
        g_here = tl.load(gc_base + i)
        dq = tl.zeros((C, BKS), dtype=acc)
        h = 0
        while h < LC:
            if ((i >> h) & 1) == 1:
                g_end = tl.load(gc_base + ((i >> h) << h))
                state = tl.load(s_base + h * SK * BV)
                f = tl.exp(b + (g_here - g_end).to(acc)) * scale
                lam = tl.load(l_ptr + bh * T * L + t * L + (LOGC + 1 + h), mask=tm, other=0.0).to(acc)
                xs = tl.dot(do, tl.trans(state), input_precision=PREC, out_dtype=acc)
                dq += (f * lam)[:, None] * xs
                tl.atomic_add(dl_ptr + bh * T * L + t * L + (LOGC + 1 + h), f * tl.sum(q * xs, 1), mask=tm)
            h += 1
        old = tl.load(dq_ptr + qo, mask=km, other=0.0)
        tl.store(dq_ptr + qo, old + dq, mask=km)
        if i + 1 < n:
            k = tl.load(k_ptr + qo, mask=km, other=0.0).to(acc)
            v = tl.load(v_ptr + vo, mask=vm, other=0.0).to(acc)
            g_next = tl.load(gc_base + i + 1)
            gamma = tl.load(b_ptr + bh * NC + i * C + C - 1).to(acc)
            ke = k * tl.exp(gamma - b)[:, None]
            new = tl.dot(tl.trans(ke), v, input_precision=PREC, out_dtype=acc)
            tl.debug_barrier()
            h = 0
            while h < LC:
                low = (i + 1) & ((2 << h) - 1)
                if low == 0:  # bit h of i is one of its trailing ones: that bucket merges
                    g_end = tl.load(gc_base + ((i >> h) << h))
                    new += tl.exp((g_next - g_end).to(acc)) * tl.load(s_base + h * SK * BV)
                if low == (1 << h):  # lowest set bit of i + 1: the merged bucket's level
                    tl.store(s_base + h * SK * BV, new)
                h += 1
            tl.debug_barrier()
        i += 1


@triton.jit
def _dkv_scan(q_ptr, k_ptr, v_ptr, do_ptr, l_ptr, b_ptr, gc_ptr, dk_ptr, dv_ptr, col_ptr, r_ptr, bh, v0,
              T, L, Dk, Dv, NC, scale, n, LC, C: tl.constexpr, LOGC: tl.constexpr,
              BK: tl.constexpr, BVS: tl.constexpr, SV: tl.constexpr, PREC: tl.constexpr):
    """Chunks in reverse; query-side block sums ``R_h`` for the value columns
    ``[v0, v0 + BVS)``: adds the across-chunk ``dv`` and (atomically, partial sums over value
    columns) ``dk`` and the column sums ``Σ_k k·dk`` used by ``dg``."""
    acc = dk_ptr.dtype.element_ty
    r = tl.arange(0, C)
    kk = tl.arange(0, BK)
    vv = v0 + tl.arange(0, BVS)
    r_base = r_ptr + bh * LC * BK * SV + kk[:, None] * SV + vv[None, :]
    gc_base = gc_ptr + bh * (n + 1)
    jj = 0
    while jj < n:
        j = n - 1 - jj
        t = j * C + r
        tm = t < T
        km = tm[:, None] & (kk < Dk)[None, :]
        vm = tm[:, None] & (vv < Dv)[None, :]
        qo = bh * T * Dk + t[:, None] * Dk + kk[None, :]
        vo = bh * T * Dv + t[:, None] * Dv + vv[None, :]
        b = tl.load(b_ptr + bh * NC + t).to(acc)
        g_start = tl.load(gc_base + j)
        g_end = tl.load(gc_base + j + 1)
        total = tl.zeros((BK, BVS), dtype=acc)
        h = 0
        while h < LC:
            start = ((j >> h) + 1) << h
            if ((j >> h) & 1) == 0:
                if start < n:
                    g_anchor = tl.load(gc_base + start)
                    total += tl.exp((g_anchor - g_end).to(acc)) * tl.load(r_base + h * BK * SV)
            h += 1
        k = tl.load(k_ptr + qo, mask=km, other=0.0).to(acc)
        v = tl.load(v_ptr + vo, mask=vm, other=0.0).to(acc)
        gamma = tl.load(b_ptr + bh * NC + j * C + C - 1).to(acc)
        e = tl.exp(gamma - b) * scale
        dk = e[:, None] * tl.dot(v, tl.trans(total), input_precision=PREC, out_dtype=acc)
        dv = e[:, None] * tl.dot(k, total, input_precision=PREC, out_dtype=acc)
        tl.atomic_add(dk_ptr + qo, dk, mask=km)
        tl.store(dv_ptr + vo, tl.load(dv_ptr + vo, mask=vm, other=0.0) + dv, mask=vm)
        tl.atomic_add(col_ptr + bh * T + t, tl.sum(k * dk, 1), mask=tm)
        q = tl.load(q_ptr + qo, mask=km, other=0.0).to(acc)
        do = tl.load(do_ptr + vo, mask=vm, other=0.0).to(acc)
        tl.debug_barrier()
        h = 0
        while h < LC:
            if ((j >> h) & 1) == 1:
                start = (j >> h) << h
                g_anchor = tl.load(gc_base + start)
                lam = tl.load(l_ptr + bh * T * L + t * L + (LOGC + 1 + h), mask=tm, other=0.0).to(acc)
                f = lam * tl.exp(b + (g_start - g_anchor).to(acc))
                z = tl.dot(tl.trans(q * f[:, None]), do, input_precision=PREC, out_dtype=acc)
                last = tl.minimum(n, ((j >> h) + 1) << h) - 1
                if j != last:
                    z += tl.load(r_base + h * BK * SV)
                tl.store(r_base + h * BK * SV, z)
            h += 1
        tl.debug_barrier()
        jj += 1


@triton.jit
def _scan_kernel(q_ptr, k_ptr, v_ptr, do_ptr, l_ptr, b_ptr, gc_ptr, dq_ptr, dk_ptr, dv_ptr, dl_ptr, col_ptr,
                 s_ptr, r_ptr, T, L, Dk, Dv, NC, scale, n, LC,
                 C: tl.constexpr, LOGC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                 BKS: tl.constexpr, BVS: tl.constexpr, NKB: tl.constexpr, NVB: tl.constexpr,
                 PREC: tl.constexpr):
    """Both scans in one launch: programs ``0..NKB-1`` of axis 1 run the ``dq`` scan on a
    key-column block each, the next ``NVB`` the ``dk, dv`` scan on a value-column block."""
    bh = tl.program_id(0).to(tl.int64)
    p = tl.program_id(1)
    if p < NKB:
        _dq_scan(q_ptr, k_ptr, v_ptr, do_ptr, l_ptr, b_ptr, gc_ptr, dq_ptr, dl_ptr, s_ptr, bh, p * BKS,
                 T, L, Dk, Dv, NC, scale, n, LC, C, LOGC, BKS, NKB * BKS, BV, PREC)
    else:
        _dkv_scan(q_ptr, k_ptr, v_ptr, do_ptr, l_ptr, b_ptr, gc_ptr, dk_ptr, dv_ptr, col_ptr, r_ptr, bh,
                  (p - NKB) * BVS, T, L, Dk, Dv, NC, scale, n, LC, C, LOGC, BK, BVS, NVB * BVS, PREC)


def _flat(x, T, width):
    return x.reshape(-1, T, width).contiguous()


def _accumulator(dtype: torch.dtype):
    """``(accumulator dtype, precision of the in-chunk dots, precision of the dots with chunk
    states)`` for inputs of ``dtype``.

    For 16-bit inputs the in-chunk products ``q kᵀ`` and ``dO vᵀ`` are exact in tf32 (a bf16 /
    fp16 value is a tf32 value) and the other in-chunk dots only feed ``dq, dk, dv``; the dots
    with float32 states (``dO Sᵀ``, ``v Rᵀ``, ``k R``, the states themselves) feed ``dλ`` and
    the column sums behind ``dlog_decay``, a reverse cumulative sum of differences whose error
    grows with ``T``: those use 3xTF32.  Measured on the H200 (bf16, H = 16, D = 64, against
    the float32 IEEE path): plain tf32 there gave ``dlog_decay`` relative errors of 9.4e-3 at
    T = 65,536 and 1.8e-2 at 131,072; 3xTF32 gave 1.1e-5 and 1.9e-5.
    """
    if dtype == torch.float64:
        return torch.float64, "ieee", "ieee"
    if dtype == torch.float32:
        return torch.float32, "ieee", "ieee"
    if dtype in (torch.float16, torch.bfloat16):
        return torch.float32, "tf32", "tf32x3"
    raise TypeError(f"inputs must be float16, bfloat16, float32 or float64, got {dtype}")


def _check_chunk(chunk, width: int) -> int:
    """The chunk size: ``chunk``, or by default :data:`DEFAULT_CHUNK` for heads up to 64 wide
    and 32 for wider ones (a 64-row tile of a 128- or 256-wide head needs more shared memory
    than a GPU block has)."""
    if chunk is None:
        return DEFAULT_CHUNK if width <= 64 else 32
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < MIN_BLOCK or chunk > 256 or chunk & (chunk - 1):
        raise ValueError(f"chunk must be a power of two in [16, 256], got {chunk!r}")
    return chunk


def _block(width: int) -> int:
    return max(MIN_BLOCK, next_power_of_2(int(width)))


PARALLEL_MAX_STATE = 128 * 128
"""The chunk-parallel method holds one whole ``Dk x Dv`` state tile per program; wider heads
(``BK * BV`` above this) take the scans, which split the states into feature blocks."""

SCAN_PROGRAMS = 128
"""The scans run one program per batch entry and feature block; on a GPU the feature blocks
(at most :data:`SCAN_BLOCK_MAX` columns) shrink down to 16 columns until about this many
programs run."""

SCAN_BLOCK_MAX = 64


def _split(width: int, B: int, cuda: bool) -> int:
    """Feature-block width of a scan: the whole (padded) head on the CPU; on a GPU halved
    while fewer than :data:`SCAN_PROGRAMS` programs would run."""
    full = _block(width)
    if not cuda:
        return full
    split = min(full, SCAN_BLOCK_MAX)
    while split > MIN_BLOCK and B * 2 * (full // split) < SCAN_PROGRAMS:
        split //= 2
    return split


def attention_backward(q, k, v, level_scales, log_decay, scale, do, *, chunk=None, scan_block=None,
                       method=None):
    """Gradients of ``O = attention(q, k, v, level_scales, log_decay, scale)`` for ``dO``.

    Parameters
    ----------
    q, k : torch.Tensor, shape ``(*batch, T, Dk)``
    v, do : torch.Tensor, shape ``(*batch, T, Dv)``
    level_scales : torch.Tensor, shape ``(*batch, T, L)``
    log_decay : torch.Tensor, shape ``(*batch, T)``, or None
    scale : float
    chunk : int, optional
        Power of two in ``[16, 256]`` (default: see :func:`_check_chunk`).
    scan_block : int, optional
        Feature-block width of the scans (a power of two >= 16); default: see :func:`_split`.
    method : {None, "parallel", "scan"}
        How the across-chunk terms are computed: ``"parallel"``, one program per chunk, reading
        the key-side state hierarchy of :mod:`kernels.states` and query-side block sums built
        with atomics; ``"scan"``, two sequential scans over the chunks (one program per batch
        entry and feature block).  Default: ``"parallel"`` unless the ``Dk x Dv`` state tile
        exceeds :data:`PARALLEL_MAX_STATE`.

    All tensors share one batch shape (broadcast views are fine), device and dtype (float16,
    bfloat16 and float32 accumulate in float32; float64 runs under the interpreter).

    Returns
    -------
    (dq, dk, dv, dlevel_scales, dlog_decay)
        Shaped like the inputs (``dlog_decay`` is None when ``log_decay`` is None), in the
        inputs' dtype.  Never-read level scales get exactly 0.
    """
    batch = tuple(v.shape[:-2])
    T, Dk, Dv, L = v.shape[-2], q.shape[-1], v.shape[-1], level_scales.shape[-1]
    C = _check_chunk(chunk, max(Dk, Dv))
    acc, prec, prec_s = _accumulator(v.dtype)
    dev = v.device
    qf, kf = _flat(q, T, Dk), _flat(k, T, Dk)
    vf, dof = _flat(v, T, Dv), _flat(do, T, Dv)
    lf = _flat(level_scales, T, L)
    B = vf.shape[0]
    n = -(-T // C)
    NC = n * C
    LOGC = C.bit_length() - 1
    LC = (n - 1).bit_length()
    b = torch.zeros((B, NC), dtype=acc, device=dev)
    if log_decay is not None:
        b[:, :T] = log_decay.reshape(-1, T).to(acc)
    b = torch.cumsum(b.view(B, n, C), -1)
    gc = torch.zeros((B, n + 1), dtype=torch.float64, device=dev)
    gc[:, 1:] = torch.cumsum(b[:, :, -1].to(torch.float64), -1)
    if acc == torch.float64 or dev.type != "cuda":
        gc = gc.to(acc)
    b = b.reshape(B, NC).contiguous()
    dq = torch.empty((B, T, Dk), dtype=acc, device=dev)
    dk = torch.empty((B, T, Dk), dtype=acc, device=dev)
    dv = torch.empty((B, T, Dv), dtype=acc, device=dev)
    dl = torch.zeros((B, T, L), dtype=acc, device=dev)
    BK, BV = _block(Dk), _block(Dv)
    meta = dict(C=C, LOGC=LOGC, BK=BK, BV=BV, PREC=prec_s)
    col = torch.empty((B, T), dtype=acc, device=dev)
    if method is None:
        method = "parallel" if BK * BV <= PARALLEL_MAX_STATE else "scan"
    if method not in ("scan", "parallel"):
        raise ValueError(f"method must be None, 'scan' or 'parallel', got {method!r}")
    if method == "parallel" and LC > 0:
        st, ld = _states.allocate(B, n, Dk * Dv, dev, acc)
        sizes = hierarchy_sizes(n)
        soff = torch.tensor([sum(sizes[:h]) for h in range(len(sizes))], dtype=torch.int32, device=dev)
        counts = [(((n - 1) >> h) + 1) // 2 for h in range(LC)]
        roff = torch.tensor([sum(counts[:h]) for h in range(LC)], dtype=torch.int32, device=dev)
        NS, NR = st.shape[1], sum(counts)
        rsum = torch.zeros((B, NR, Dk * Dv), dtype=acc, device=dev)
        _prep_kernel[(n, B)](qf, kf, vf, dof, lf, b, gc, st, ld, rsum, roff, T, L, Dk, Dv, NC, n, LC, NS, NR,
                             **meta)
        _states.build_hierarchy(st, ld, n)
        _intra_kernel[(n, B)](qf, kf, vf, dof, lf, b, dq, dk, dv, dl, col, gc, st, soff, rsum, roff,
                              T, L, Dk, Dv, NC, float(scale), n, LC, NS, NR, INTER=True, PREC_S=prec_s,
                              **dict(meta, PREC=prec))
    else:
        _intra_kernel[(n, B)](qf, kf, vf, dof, lf, b, dq, dk, dv, dl, col, gc, b, b, b, b,
                              T, L, Dk, Dv, NC, float(scale), n, LC, 0, 0, INTER=False, PREC_S=prec_s,
                              **dict(meta, PREC=prec))
    if method == "scan" and LC > 0:
        BKS, BVS = ((_split(Dk, B, v.is_cuda), _split(Dv, B, v.is_cuda)) if scan_block is None
                    else (min(scan_block, BK), min(scan_block, BV)))
        NKB, NVB = cdiv(BK, BKS), cdiv(BV, BVS)
        s_scratch = torch.empty((B, LC, NKB * BKS, BV), dtype=acc, device=dev)
        r_scratch = torch.empty((B, LC, BK, NVB * BVS), dtype=acc, device=dev)
        _scan_kernel[(B, NKB + NVB)](qf, kf, vf, dof, lf, b, gc, dq, dk, dv, dl, col, s_scratch, r_scratch,
                                     T, L, Dk, Dv, NC, float(scale), n, LC, BKS=BKS, BVS=BVS,
                                     NKB=NKB, NVB=NVB, **meta)
    dg = None
    if log_decay is not None:
        read = torch.as_tensor(fenwick.read_levels(T, L), device=dev)
        read[:, 0] = False
        rows = torch.where(read, lf.to(acc) * dl, torch.zeros((), dtype=acc, device=dev)).sum(-1)
        dG = rows - col
        dg = torch.flip(torch.cumsum(torch.flip(dG, (-1,)), -1), (-1,))
        dg[:, 0] = 0
        dg = dg.reshape(batch + (T,)).to(log_decay.dtype)
    return (dq.reshape(batch + (T, Dk)).to(q.dtype), dk.reshape(batch + (T, Dk)).to(k.dtype),
            dv.reshape(batch + (T, Dv)).to(v.dtype), dl.reshape(batch + (T, L)).to(level_scales.dtype), dg)
