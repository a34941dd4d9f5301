"""``@triton.jit`` helpers shared by the attention and matmul kernels."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def intra_mask(l_base, sll, G, tmask, C: tl.constexpr, HAS_G: tl.constexpr):
    """The ``(C, C)`` block of the mask inside one chunk (levels ``0..c``).

    ``l_base`` points at ``level_scales[t, 0]`` of the chunk's rows, ``G`` is the chunk-local
    inclusive cumulative log-decay.  For ``s <= t`` in one aligned chunk the level is the bit
    length of ``t ^ s`` (``fenwick.index.level``), read here off the float32 exponent of
    ``t ^ s``; the scale is gathered straight from memory (only entries that are read by
    definition are touched), times ``exp(G_t - G_s)`` from the local sums.
    """
    r = tl.arange(0, C)
    xor = r[:, None] ^ r[None, :]
    causal = (r[:, None] >= r[None, :]) & tmask[:, None]
    expo = xor.to(tl.float32).to(tl.int32, bitcast=True) >> 23
    lvl = tl.where(xor == 0, 0, expo - 126)
    M = tl.load(l_base[:, None] + lvl * sll, mask=causal, other=0.0).to(G.dtype)
    if HAS_G:
        M = M * tl.exp(tl.where(causal, G[:, None] - G[None, :], 0.0))
    return M
