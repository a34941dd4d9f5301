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

    states : (B, N, F)   float32 (float64 for float64 inputs)
    logdec : (B, N)      same dtype
    N = n_0 + n_1 + ... + n_top,  level h starts at offset n_0 + ... + n_{h-1}

Level 0 is written by the per-chunk state kernels; :func:`build_hierarchy` fills the rest with
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

from kernels._layout import NUM_WARPS, hierarchy_sizes


@triton.jit(do_not_specialize=["n_chunks", "n_total", "N_BUILD"])
def _hierarchy_kernel(h_ptr, a_ptr, n_chunks, n_total, F, N_BUILD, BN: tl.constexpr, BF: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    f = tl.program_id(1) * BF + tl.arange(0, BF)
    fmask = f < F
    base = bh * n_total
    off = 0
    nh = n_chunks
    lv = 0
    while lv < N_BUILD:  # while loops: the interpreter cannot index a range with a computed bound
        nn = nh // 2
        nb = 0
        while nb < nn:
            idx = nb + tl.arange(0, BN)
            im = idx < nn
            even = base + off + 2 * idx
            odd = even + 1
            dst = base + off + nh + idx
            a_even = tl.load(a_ptr + even, mask=im, other=0.0)
            a_odd = tl.load(a_ptr + odd, mask=im, other=0.0)
            m2 = im[:, None] & fmask[None, :]
            h_even = tl.load(h_ptr + even[:, None] * F + f[None, :], mask=m2, other=0.0)
            h_odd = tl.load(h_ptr + odd[:, None] * F + f[None, :], mask=m2, other=0.0)
            tl.store(h_ptr + dst[:, None] * F + f[None, :], tl.exp(a_odd)[:, None] * h_even + h_odd, mask=m2)
            tl.store(a_ptr + dst, a_even + a_odd, mask=im)
            nb += BN
        tl.debug_barrier()
        off += nh
        nh = nn
        lv += 1


def allocate(B: int, n_chunks: int, F: int, dtype: torch.dtype, device):
    """Empty ``(states (B, N, F), logdec (B, N))`` buffers for ``n_chunks`` chunks."""
    N = sum(hierarchy_sizes(n_chunks))
    return (torch.empty((B, N, F), dtype=dtype, device=device),
            torch.empty((B, N), dtype=dtype, device=device))


def build_hierarchy(states: torch.Tensor, logdec: torch.Tensor, n_chunks: int) -> None:
    """Fill levels ``1..top`` of ``states`` / ``logdec`` (level 0 already written), in place.

    One launch: program ``(b, f-tile)`` walks the levels in order, with a barrier between
    levels (every value a level reads was written by the same program).
    """
    sizes = hierarchy_sizes(n_chunks)
    if len(sizes) < 2:
        return
    B, N, F = states.shape
    BF = min(256, triton.next_power_of_2(F))
    BN = max(1, min(64, 4096 // BF))
    grid = (B, triton.cdiv(F, BF))
    _hierarchy_kernel[grid](states, logdec, n_chunks, N, F, len(sizes) - 1, BN=BN, BF=BF,
                            num_warps=NUM_WARPS["hierarchy"])
