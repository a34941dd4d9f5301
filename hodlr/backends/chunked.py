"""Chunked backend: the algorithm of the Triton kernels, in plain PyTorch.

With chunk size ``C = 2^c`` (docs/mathematics.md §8), levels ``0..c`` live inside a chunk
and are computed densely (a masked ``C x C`` block per chunk); levels ``> c`` come from the
chunk states ``S_j = K_jᵀ diag(exp(G_end - G)) V_j`` (matmul: ``Σ_s exp(G_end - G_s) x_s``),
combined into aligned block states, level ``h`` holding blocks of ``2^h`` chunks:

``H_{h+1}[m] = exp(A_h[2m+1]) H_h[2m] + H_h[2m+1]``,  ``A_{h+1}[m] = A_h[2m] + A_h[2m+1]``

(``A`` = the sum of ``g`` over a block).  Chunk ``i`` reads, for each set bit ``h`` of ``i``,
the block ``(i >> h) - 1`` of level ``h`` -- its Fenwick bucket at mask level ``c + h + 1`` --
scaled per row by ``λ[t, c+h+1] exp(gap + G_t)``, where ``gap`` sums ``A`` over the blocks of
the lower set bits.  This is exactly what :mod:`kernels` computes (same layout, same order),
so an error can be placed either in the algorithm or in the Triton code.

Precision: every exponent is a sum of its own terms -- a segment sum inside one chunk
(masked reverse cumulative sums), a chunk-local prefix sum, or a sum of chunk sums; no
difference of two prefix sums is ever exponentiated, so long sequences with strong decay
lose nothing.

Runs on torch tensors (any device, autograd included); numpy inputs are converted to
torch CPU tensors and the result back to numpy.  float16 / bfloat16 operands are computed
in the mask's dtype and cast back.  Any ``T``: the sequence is zero-padded to whole chunks.
"""

from __future__ import annotations

import numpy as np

from hodlr import fenwick
from hodlr.fenwick.arrays import is_torch
from hodlr.mask import decay_matrix

DESCRIPTION = "chunked form (dense C x C blocks + Fenwick scan over chunk states), the Triton kernels' algorithm; torch (numpy converted), autograd"

DEFAULT_CHUNK = 64
"""Chunk size ``C`` when none is given."""


def unavailable_reason(library, device):
    try:
        import torch  # noqa: F401
    except ImportError:
        return "needs torch (numpy inputs are converted to torch CPU tensors)"
    return None


def _check_chunk(chunk) -> int:
    if isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)):
        raise TypeError(f"chunk must be a power-of-two int, got {type(chunk).__name__}")
    chunk = int(chunk)
    if chunk < 1 or chunk & (chunk - 1):
        raise ValueError(f"chunk must be a power of two >= 1, got {chunk}")
    return chunk


def _to_torch(*arrays):
    """numpy arrays -> torch CPU tensors (tensors and None pass through); and whether any
    input was numpy."""
    import torch

    was_numpy = any(a is not None and not is_torch(a) for a in arrays)
    out = tuple(None if a is None or is_torch(a) else torch.from_numpy(np.require(a, requirements="W")) for a in arrays)
    return tuple(o if o is not None else a for o, a in zip(out, arrays)), was_numpy


class _Chunks:
    """The mask of one call cut into chunks: padded level scales, local cumulative decays,
    the dense intra-chunk blocks and the per-level row scales of the inter-chunk part."""

    def __init__(self, level_scales, log_decay, C: int):
        import torch

        T, L = level_scales.shape[-2:]
        self.T, self.C = T, C
        self.c = C.bit_length() - 1
        self.n = -(-T // C)
        self.bits = (self.n - 1).bit_length()
        pad_t = self.n * C - T
        width = max(L, self.c + 1 + self.bits)
        lam = torch.nn.functional.pad(level_scales, (0, width - L, 0, pad_t))
        self.lam = lam.reshape(lam.shape[:-2] + (self.n, C, width))  # (..., n, C, width)
        dtype = level_scales.dtype
        if log_decay is None:
            self.G = None
            self.A = torch.zeros(level_scales.shape[:-2] + (self.n,), dtype=dtype, device=level_scales.device)
        else:
            g = torch.nn.functional.pad(log_decay, (0, pad_t)).reshape(log_decay.shape[:-1] + (self.n, C))
            self.g = g
            self.G = torch.cumsum(g, -1)  # chunk-local, inclusive
            self.A = g.sum(-1)
            # g[s + 1] inside the chunk (0 at its end): the terms of the segment sums
            self.g_next = torch.nn.functional.pad(g[..., 1:], (0, 1))
        # read mask of the padded scales (padding rows read nothing)
        read = fenwick.read_levels(self.n * C, width) & (np.arange(self.n * C) < T)[:, None]
        self.read = torch.as_tensor(read.reshape(self.n, C, width), device=level_scales.device)

    def intra(self):
        """``(..., n, C, C)``: the mask restricted to each chunk (levels ``0..c``)."""
        import torch

        C = self.C
        r = np.arange(C)
        lev = fenwick.level(r[:, None], r[None, :])  # -1 above the diagonal
        dev = self.lam.device
        causal = torch.as_tensor(lev >= 0, device=dev)
        lam = torch.where(self.read, self.lam, torch.zeros((), dtype=self.lam.dtype, device=dev))
        gathered = lam[..., torch.as_tensor(r[:, None], device=dev), torch.as_tensor(np.maximum(lev, 0), device=dev)]
        if self.G is not None:
            gathered = gathered * decay_matrix(self.g, C)  # exp(sum_{k=s+1..t} g_k), 0 above the diagonal
        return torch.where(causal, gathered, torch.zeros((), dtype=gathered.dtype, device=dev))

    def hierarchy(self, S0):
        """Aligned block states of every level a chunk reads, from the chunk states
        ``S0 (..., n, *F)``: returns ``(states, A)``, one entry per level ``h``."""
        import torch

        tail = (slice(None),) * (S0.dim() - self.A.dim())
        states, A = [S0], [self.A]
        for _ in range(1, self.bits):
            S, a = states[-1], A[-1]
            m = a.shape[-1] // 2
            even, odd = (Ellipsis, slice(0, 2 * m, 2)), (Ellipsis, slice(1, 2 * m, 2))
            decay = torch.exp(a[odd]).reshape(a[odd].shape + (1,) * len(tail))
            states.append(decay * S[even + tail] + S[odd + tail])
            A.append(a[even] + a[odd])
        return states, A

    def levels(self, A):
        """For each chunk level ``h`` (bit ``h`` of the chunk index): ``(h, idx, rowf)`` with
        ``idx (n,)`` the block each chunk reads at level ``h`` (0 where the bit is clear) and
        ``rowf (..., n, C)`` the row scales ``λ[t, c+h+1] exp(gap + G_t)`` (0 where the bit is
        clear); the gap is accumulated from the lowest set bit up."""
        import torch

        dev = self.lam.device
        i = np.arange(self.n)
        zero = torch.zeros((), dtype=self.lam.dtype, device=dev)
        G = self.G if self.G is not None else torch.zeros(self.lam.shape[:-1], dtype=self.lam.dtype, device=dev)
        gap = torch.zeros(self.A.shape, dtype=self.lam.dtype, device=dev)
        for h in range(self.bits):
            on_np = ((i >> h) & 1).astype(bool)
            on = torch.as_tensor(on_np, device=dev)
            idx = torch.as_tensor(np.where(on_np, (i >> h) - 1, 0), device=dev)
            col = self.c + 1 + h
            lam = torch.where(self.read[..., col] & on[:, None], self.lam[..., col], zero)
            yield h, idx, lam * torch.exp(gap[..., None] + G)
            gap = gap + torch.where(on, A[h][..., idx], zero)

    def end_weights(self):
        """``(..., n, C)``: ``exp(Σ_{k=s+1..end} g_k)``, the decay of each position to its
        chunk's end (a reverse cumulative sum of the terms, no difference of sums)."""
        import torch

        if self.G is None:
            return None
        return torch.exp(torch.flip(torch.cumsum(torch.flip(self.g_next, (-1,)), -1), (-1,)))


def _chunk(x, n, C):
    import torch

    T = x.shape[-2]
    x = torch.nn.functional.pad(x, (0, 0, 0, n * C - T))
    return x.reshape(x.shape[:-2] + (n, C, x.shape[-1]))


def matmul(level_scales, log_decay, x, *, chunk: int = DEFAULT_CHUNK):
    """``M @ x`` by the chunked algorithm (see the module docstring); ``chunk`` is ``C``."""
    C = _check_chunk(chunk)
    (level_scales, log_decay, x), was_numpy = _to_torch(level_scales, log_decay, x)
    out_dtype = x.dtype
    x = x.to(level_scales.dtype)
    T, D = x.shape[-2:]
    ch = _Chunks(level_scales, log_decay, C)
    xc = _chunk(x, ch.n, C)  # (..., n, C, D)
    y = ch.intra() @ xc
    if ch.bits:
        w = ch.end_weights()
        S0 = (xc if w is None else xc * w[..., None]).sum(-2)  # (..., n, D)
        states, A = ch.hierarchy(S0)
        for h, idx, rowf in ch.levels(A):
            y = y + rowf[..., None] * states[h][..., idx, :][..., None, :]
    y = y.reshape(y.shape[:-3] + (ch.n * C, D))[..., :T, :].to(out_dtype)
    return y.numpy() if was_numpy else y


def attention(q, k, v, level_scales, log_decay, scale, *, chunk: int = DEFAULT_CHUNK):
    """``(M ⊙ scale · q kᵀ) v`` by the chunked algorithm; ``chunk`` is ``C``."""
    C = _check_chunk(chunk)
    (q, k, v, level_scales, log_decay), was_numpy = _to_torch(q, k, v, level_scales, log_decay)
    out_dtype = v.dtype
    q, k, v = (a.to(level_scales.dtype) for a in (q, k, v))
    T, Dv = v.shape[-2:]
    ch = _Chunks(level_scales, log_decay, C)
    qc, kc, vc = (_chunk(a, ch.n, C) for a in (q, k, v))
    o = (ch.intra() * (qc @ kc.transpose(-1, -2))) @ vc
    if ch.bits:
        w = ch.end_weights()
        kw = kc if w is None else kc * w[..., None]
        S0 = kw.transpose(-1, -2) @ vc  # (..., n, Dk, Dv)
        states, A = ch.hierarchy(S0)
        for h, idx, rowf in ch.levels(A):
            o = o + rowf[..., None] * (qc @ states[h][..., idx, :, :])
    o = (o * scale).reshape(o.shape[:-3] + (ch.n * C, Dv))[..., :T, :].to(out_dtype)
    return o.numpy() if was_numpy else o
