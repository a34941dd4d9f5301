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

Log-linear Gated DeltaNet (:func:`gated_delta_attention`) follows the same plan with the
delta rule's transitions: the UT form inside each chunk, block states *and* block transitions
in the hierarchy, and each chunk's queries moved to its start once and across every block
they pass (docs/mathematics.md, "Log-linear Gated DeltaNet"); it continues from bucket states
at any absolute position and returns the final ones.

Runs on torch tensors (any device, autograd included); numpy inputs are converted to
torch CPU tensors and the result back to numpy.  float16 / bfloat16 operands are computed
in the mask's dtype and cast back.  Any ``T``: the sequence is zero-padded to whole chunks.
"""

from __future__ import annotations

import numpy as np

from hodlr import fenwick
from hodlr.fenwick.arrays import check_int, is_torch, reverse_cumsum
from hodlr._formulas import decay_matrix
from hodlr._transfer import to_device

GATED_DELTA_STATE = True
"""``gated_delta_attention`` takes ``state``, ``position`` and ``final_state`` (:mod:`hodlr.backends`)."""

PACKED_AS_ONE_STREAM = True
"""Its ``gated_delta_attention`` costs about linearly in ``T``: :func:`hodlr.log_linear_gated_delta_rule`
runs packed sequences without state as one call over an aligned stream (``hodlr.ops.stream_layout``)."""

DESCRIPTION = "chunked form (dense C x C blocks + Fenwick scan over chunk states), the Triton kernels' algorithm; torch (numpy converted), autograd"

DEFAULT_CHUNK = 64
"""Chunk size ``C`` when none is given."""


def unavailable_reason(library, device):
    try:
        import torch  # noqa: F401
    except ImportError:
        return "torch is not installed (pip install torch; numpy inputs are converted to torch CPU tensors)"
    return None


def _check_chunk(chunk) -> int:
    chunk = check_int("chunk", chunk)
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
        self.read = to_device(read.reshape(self.n, C, width), level_scales.device)

    def intra(self):
        """``(..., n, C, C)``: the mask restricted to each chunk (levels ``0..c``)."""
        import torch

        C = self.C
        r = np.arange(C)
        lev = fenwick.level(r[:, None], r[None, :])  # -1 above the diagonal
        dev = self.lam.device
        causal = to_device(lev >= 0, dev)
        lam = torch.where(self.read, self.lam, torch.zeros((), dtype=self.lam.dtype, device=dev))
        gathered = lam[..., to_device(r[:, None], dev), to_device(np.maximum(lev, 0), dev)]
        if self.G is not None:
            gathered = gathered * decay_matrix(self.g, C)  # exp(sum_{k=s+1..t} g_k), 0 above the diagonal
        return torch.where(causal, gathered, torch.zeros((), dtype=gathered.dtype, device=dev))

    def end_weights(self):
        """``(..., n, C)``: ``exp(Σ_{k=s+1..end} g_k)``, the decay of each position to its
        chunk's end (a reverse cumulative sum of the terms, no difference of sums)."""
        import torch

        if self.G is None:
            return None
        return torch.exp(reverse_cumsum(self.g_next))


def _take(x, idx, first, tail=0):
    """``x`` at blocks ``idx`` of dim ``-1 - tail``: one index for all rows, or per row (``first``)."""
    if first is None:
        return x[(Ellipsis, idx) + (slice(None),) * tail]
    return _pick(x, np.arange(first.size), idx, -1 - tail)


def _hierarchy(S0, A0, bits, first=None):
    """``(states, A)`` of levels ``h < bits`` (module docstring) from chunk states ``S0 (..., n, *F)``
    and log-decay sums ``A0 (..., n)``.  ``first`` None: chunk ``j`` is absolute chunk ``j``, level
    ``h`` holds blocks ``0 .. n // 2^h - 1`` (strided views).  ``first`` int64 ``(R,)``: dim 0 is the
    row, its chunk ``j`` absolute chunk ``first[r] + j``; level ``h`` holds blocks ``m >= first[r] >> h``
    at ``m - (first[r] >> h)`` (per-row gathers; a block begun before the row holds the row's part)."""
    import torch

    tail = S0.dim() - A0.dim()
    states, A = [S0], [A0]
    for h in range(1, bits):
        S, a = states[-1], A[-1]
        if first is None:
            m = a.shape[-1] // 2
            even, odd = slice(0, 2 * m, 2), slice(1, 2 * m, 2)
        else:  # an empty block (zero state and log-decay) at each end stands for a missing half
            size = a.shape[-1]
            S, a = torch.nn.functional.pad(S, (0, 0) * tail + (1, 1)), torch.nn.functional.pad(a, (1, 1))
            b = (first >> (h - 1)) & 1
            even = np.minimum(2 * np.arange((size + 2) // 2)[None, :] + 1 - b[:, None], size + 1)
            odd = np.minimum(even + 1, size + 1)
        a_odd = _take(a, odd, first)
        decay = torch.exp(a_odd).reshape(a_odd.shape + (1,) * tail)
        states.append(decay * _take(S, even, first, tail) + _take(S, odd, first, tail))
        A.append(_take(a, even, first) + a_odd)
    return states, A


def _block_reads(A, lam, G, c, bits, first=None):
    """Per level ``h < bits``: ``(h, idx, rowf)``, ``idx`` the block each chunk reads (0 where none:
    bit ``h`` of its absolute index clear, or the block wholly before the row) and ``rowf (..., n, C)``
    ``= λ[t, c+h+1] exp(gap + G_t)`` (0 where none); ``lam (..., n, C, width)``, ``G`` chunk-local
    (None: no decay), ``first`` as in :func:`_hierarchy`; the gap grows from the lowest set bit up."""
    import torch

    dev, n = lam.device, A[0].shape[-1]
    zero = torch.zeros((), dtype=lam.dtype, device=dev)
    G = G if G is not None else torch.zeros(lam.shape[:-1], dtype=lam.dtype, device=dev)
    I, base = (np.arange(n), 0) if first is None else (first[:, None] + np.arange(n), first[:, None])
    gap = torch.zeros(A[0].shape, dtype=lam.dtype, device=dev)
    for h in range(bits):
        block = (I >> h) - 1 - (base >> h)
        use_np = (((I >> h) & 1) == 1) & (block >= 0)
        idx = to_device(np.where(use_np, block, 0), dev)
        use = to_device(use_np, dev)
        if first is not None:  # (R, n) -> (R, 1, ..., 1, n)
            use = use.reshape(use.shape[:1] + (1,) * (A[0].dim() - 2) + use.shape[1:])
        read = use[..., None]  # λ zeroed before the product (an unread NaN scale), the product after (exp overflowing)
        yield h, idx, torch.where(read, torch.where(read, lam[..., c + 1 + h], zero) * torch.exp(gap[..., None] + G), zero)
        gap = gap + torch.where(use, _take(A[h], idx, first), zero)


def _chunk(x, n, C):
    import torch

    T = x.shape[-2]
    x = torch.nn.functional.pad(x, (0, 0, 0, n * C - T))
    return x.reshape(x.shape[:-2] + (n, C, x.shape[-1]))


def _from_position_zero(log_decay):
    """``log_decay`` of a call that starts at absolute position 0 with its first entry set to 0:
    that entry multiplies no pair (``M[t, s]`` holds ``g[s+1..t]``), and a large one would
    overflow the chunk-local cumulative sums (``inf - inf``)."""
    import torch

    if log_decay is None or log_decay.shape[-1] == 0:
        return log_decay
    return torch.cat([torch.zeros_like(log_decay[..., :1]), log_decay[..., 1:]], -1)


def matmul(level_scales, log_decay, x, *, chunk: int = DEFAULT_CHUNK):
    """``M @ x`` by the chunked algorithm (see the module docstring); ``chunk`` is ``C``."""
    C = _check_chunk(chunk)
    (level_scales, log_decay, x), was_numpy = _to_torch(level_scales, log_decay, x)
    out_dtype = x.dtype
    x = x.to(level_scales.dtype)
    T, D = x.shape[-2:]
    ch = _Chunks(level_scales, _from_position_zero(log_decay), C)
    xc = _chunk(x, ch.n, C)  # (..., n, C, D)
    y = ch.intra() @ xc
    if ch.bits:
        w = ch.end_weights()
        S0 = (xc if w is None else xc * w[..., None]).sum(-2)  # (..., n, D)
        states, A = _hierarchy(S0, ch.A, ch.bits)
        for h, idx, rowf in _block_reads(A, ch.lam, ch.G, ch.c, ch.bits):
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
    ch = _Chunks(level_scales, _from_position_zero(log_decay), C)
    qc, kc, vc = (_chunk(a, ch.n, C) for a in (q, k, v))
    o = (ch.intra() * (qc @ kc.transpose(-1, -2))) @ vc
    if ch.bits:
        w = ch.end_weights()
        kw = kc if w is None else kc * w[..., None]
        S0 = kw.transpose(-1, -2) @ vc  # (..., n, Dk, Dv)
        states, A = _hierarchy(S0, ch.A, ch.bits)
        for h, idx, rowf in _block_reads(A, ch.lam, ch.G, ch.c, ch.bits):
            o = o + rowf[..., None] * (qc @ states[h][..., idx, :, :])
    o = (o * scale).reshape(o.shape[:-3] + (ch.n * C, Dv))[..., :T, :].to(out_dtype)
    return o.numpy() if was_numpy else o


# ---------------------------------------------------------------------------------------
# state hand-off and packed sequences
# ---------------------------------------------------------------------------------------
def _rows(x, src):
    """``x (N, Hx, T, *tail)`` gathered into rows: ``(R, Hx, W, *tail)`` with entry ``[r, :, j]`` =
    ``x`` at flat token ``src[r, j]`` (flat over ``(N, T)``; ``N * T`` selects zeros)."""
    import torch

    N, Hx, T = x.shape[:3]
    flat = x.movedim(2, 1).reshape((N * T, Hx) + tuple(x.shape[3:]))
    flat = torch.cat([flat, flat.new_zeros((1,) + tuple(flat.shape[1:]))])
    return flat[to_device(src, x.device)].movedim(1, 2)


def _pick(x, rows, index, dim=3):
    """``x[r, ..., index[r, i], ...]`` along ``dim`` of ``x (R, ..., n, ...)`` -> ``(R, ..., m, ...)``."""
    dev = x.device
    r = to_device(rows, dev)[:, None]
    return x.movedim(dim, 1)[r, to_device(index, dev)].movedim(1, dim)


def _read_state(q, level_scales, G, states, start, positions, valid):
    """What tokens read of the buckets their sequences carry in (unscaled): for the token at
    absolute position ``t`` of a row that starts at ``a`` with the bucket states ``states``,

    ``sum_l [bit l - 1 of a] · λ[t, max(l, level(t, a))] · exp(G[t]) · q_tᵀ states[l - 1]``

    (a bucket of ``a`` at level ``l`` lies at level ``max(l, level(t, a))`` from every ``t >= a``,
    docs/models.md), ``G`` the log-decay summed from the row's first token to ``t``, inclusive.

    Parameters
    ----------
    q : torch.Tensor, shape ``(R, Hqk, 1 or grp, W, Dk)``
    level_scales : torch.Tensor, shape ``(R, Hqk, grp, W, width)``
        Only the entries read are touched (unread ones may be NaN).
    G : torch.Tensor, shape ``(R, Hqk, grp, W)``, or None (no decay)
    states : torch.Tensor, shape ``(R, Hqk, grp, S, Dk, Dv)``
    start : numpy int64 array ``(R,)``: ``a``
    positions : numpy int64 array ``(R, W)``: the absolute position of each token (``>= a`` where valid)
    valid : numpy bool array ``(R, W)``: which entries are tokens

    Returns
    -------
    torch.Tensor, shape ``(R, Hqk, grp, W, Dv)``, or None when no row carries a live bucket.
    """
    import torch

    dev = level_scales.device
    R, Hqk, grp, W = level_scales.shape[:4]
    zero = torch.zeros((), dtype=level_scales.dtype, device=dev)
    D = fenwick.level(np.maximum(positions, start[:, None]), start[:, None])
    decay = None if G is None else torch.exp(G)
    out = None
    for l in range(1, states.shape[3] + 1):
        live = ((start >> (l - 1)) & 1) == 1
        if not live.any():
            continue
        read = valid & live[:, None]
        col = np.where(read, np.maximum(l, D), 0)
        pick = to_device(col, dev)[:, None, None, :, None].expand(R, Hqk, grp, W, 1)
        wt = torch.gather(level_scales, -1, pick)[..., 0]
        wt = torch.where(to_device(read, dev)[:, None, None], wt, zero)
        if decay is not None:
            wt = wt * decay
        term = wt[..., None] * (q @ states[:, :, :, l - 1])
        out = term if out is None else out + term
    return out


def attention_state(q, k, v, level_scales, log_decay, scale, initial_state, initial_positions, cu_seqlens,
                    output_final_state, *, chunk: int = DEFAULT_CHUNK):
    """Log-linear attention that continues from a state and/or runs packed sequences.

    The layout of ``hodlr.kernels.attention`` (docs/models.md): ``q, k (N, Hqk, T, Dk)``,
    ``v (N, H, T, Dv)`` (head ``h`` reads head ``h // (H // Hqk)`` of ``q``, ``k``),
    ``level_scales (N, H, T, L)``, ``log_decay (N, H, T)`` or None, ``initial_state
    (Nseq, H, S, Dk, Dv)`` with ``initial_positions (Nseq,)`` (int64) or both None,
    ``cu_seqlens (Nseq + 1,)`` or None (then ``Nseq = N``).  Token ``i`` of sequence ``n`` is
    at absolute position ``initial_positions[n] + i``; row ``i`` of the level scales belongs to
    that position.  Inputs are validated by :func:`hodlr.log_linear_attn`.

    Returns ``o (N, H, T, Dv)``, and with ``output_final_state`` also ``(states (Nseq, H, S', Dk, Dv),
    positions (Nseq,))``, ``S' = max(S, bit_length(largest end position))``.

    The chunked algorithm with absolute positions, every sequence in one batched computation
    (no loop over sequences): each sequence is laid out from the start of the aligned chunk
    holding its first token (zeros before it, and after its end), so that a chunk's levels
    ``0..c`` are those of absolute positions; the aligned block states of the chunk hierarchy
    are those of absolute chunk indices, level ``h`` holding blocks ``m >= I0 >> h``
    (``I0`` the first chunk), each summed over the sequence's own tokens.  The initial bucket
    states are read by every token ``t``: the level-``l`` bucket of the start ``a`` lies at level
    ``max(l, bit_length(t XOR a))`` from ``t``.  The final buckets at the end ``e`` are sums of
    the chunk states (whole chunks before ``e``'s chunk), of the tokens of ``e``'s chunk and of the
    initial buckets, each at its level from ``e``.
    """
    import torch

    from hodlr.state import segments

    N, Hqk, T, Dk = q.shape
    H, Dv, L = v.shape[1], v.shape[-1], level_scales.shape[-1]
    grp = H // Hqk
    batch, offset, length, a = segments(N, T, cu_seqlens, initial_positions)
    # no chunk longer than the longest sequence needs (many short packed sequences stay cheap)
    C = min(_check_chunk(chunk), 1 << (int(length.max(initial=1)) - 1).bit_length() if length.size else 1)
    c = C.bit_length() - 1
    out_dtype = v.dtype
    work = level_scales.dtype
    dev = v.device
    R = a.size
    e = a + length
    r = a % C
    I0 = a >> c
    n = max(1, int((-(-(r + length) // C)).max(initial=1)))
    W = n * C
    j = np.arange(W)
    tok = j[None, :] - r[:, None]
    valid = (tok >= 0) & (tok < length[:, None])
    src = np.where(valid, batch[:, None] * T + offset[:, None] + tok, N * T)
    P = (a - r)[:, None] + j[None, :]  # absolute positions of the row layout
    I1 = np.where(length > 0, (e - 1) >> c, I0)
    bits = int(fenwick.level(I1, np.minimum(I0, I1)).max(initial=0))
    width = max(L, c + 1 + bits)

    # rows (R, Hqk, grp, W, ...): q and k broadcast over the group
    qr = _rows(q.to(work), src)[:, :, None]
    kr = _rows(k.to(work), src)[:, :, None]
    vr = _rows(v.to(work), src).unflatten(1, (Hqk, grp))
    lam = _rows(level_scales, src).unflatten(1, (Hqk, grp))
    lam = torch.nn.functional.pad(lam, (0, width - L))
    read = valid[:, :, None] & fenwick.reads(P, width)
    lam = torch.where(to_device(read[:, None, None], dev), lam, torch.zeros((), dtype=work, device=dev))
    g = None if log_decay is None else _rows(log_decay, src).unflatten(1, (Hqk, grp))
    first = P == 0  # the log-decay of absolute position 0 multiplies no pair
    if g is not None and first.any():
        zero = torch.zeros((), dtype=g.dtype, device=dev)
        g = torch.where(to_device(first, dev)[:, None, None], zero, g)

    # levels 0..c: dense inside each aligned chunk; levels > c: the hierarchy of chunk states
    ch = _Chunks(lam, g, C)
    qc, kc, vc = (_chunk(x, n, C) for x in (qr, kr, vr))
    o = (ch.intra() * (qc @ kc.transpose(-1, -2))) @ vc  # (R, Hqk, grp, n, C, Dv)
    w = ch.end_weights()
    kw = kc if w is None else kc * w[..., None]
    S0 = kw.transpose(-1, -2) @ vc  # (R, Hqk, grp, n, Dk, Dv)
    rows = np.arange(R)
    first_chunk = I0 if I0.any() else None  # every row from chunk 0: the aligned views
    states, A = _hierarchy(S0, ch.A, bits, first_chunk)
    for h, idx, rowf in _block_reads(A, ch.lam, ch.G, c, bits, first_chunk):
        o = o + rowf[..., None] * (qc @ _take(states[h], idx, first_chunk, 2))
    I = I0[:, None] + np.arange(n)[None, :]
    o = o.flatten(3, 4)  # (R, Hqk, grp, W, Dv)

    # the initial buckets, read by every token at level max(l, bit_length(t XOR a))
    S_in = 0 if initial_state is None else initial_state.shape[2]
    init = None
    if S_in:
        init = initial_state.to(work).unflatten(1, (Hqk, grp))  # (R, Hqk, grp, S, Dk, Dv)
        # empty slots (bit l - 1 of a clear) are never read, whatever they hold (NaN included): the
        # products below that skip them multiply by 0, so they are selected away first
        full = to_device(((a[:, None] >> np.arange(S_in)) & 1) == 1, dev)
        init = torch.where(full[:, None, None, :, None, None], init, torch.zeros((), dtype=work, device=dev))
        G = None if g is None else torch.cumsum(g, -1)
        carried = _read_state(qr, ch.lam.flatten(3, 4), G, init, a, P, valid)
        if carried is not None:
            o = o + carried
    o = (o * scale).flatten(1, 2)  # (R, H, W, Dv)

    # back to the input layout
    if cu_seqlens is None:
        out_row = np.repeat(np.arange(N)[:, None], T, 1)
        out_col = r[:, None] + np.arange(T)[None, :]
    else:
        t = np.arange(T)
        out_row = (np.searchsorted(offset + length, t, side="right"))[None, :]
        out_col = (r[out_row] + t[None, :] - offset[out_row])
    o = o.movedim(2, 1)[to_device(out_row, dev), to_device(out_col, dev)]
    o = o.movedim(1, 2).to(out_dtype)
    if not output_final_state:
        return o

    # final buckets at the end e of each sequence
    S_out = max(S_in, int(fenwick.level(e.max(initial=0), 0)))
    final = S0.new_zeros((R, Hqk, grp, S_out, Dk, Dv))
    De = fenwick.level(e, a)
    if S_in:
        move = np.zeros((R, S_in, S_out))
        for l in range(1, S_in + 1):
            live = ((a >> (l - 1)) & 1) == 1
            move[rows[live], l - 1, np.maximum(l, De[live]) - 1] = 1.0
        total = torch.exp(ch.A.sum(-1)) if g is not None else torch.ones_like(ch.A[..., 0])
        moved = torch.einsum("rij,rhgikv->rhgjkv", to_device(move, dev, work), init)
        final = final + total[..., None, None, None] * moved
    E = e >> c
    whole = I < E[:, None]  # chunks wholly before e's chunk: all their tokens at one level from e
    if whole.any():
        target = c + fenwick.level(np.maximum(E[:, None], I), np.minimum(E[:, None], I))
        onehot = np.zeros((R, n, S_out))
        rr, jj = np.nonzero(whole)
        onehot[rr, jj, target[rr, jj] - 1] = 1.0
        if g is None:
            after = torch.ones_like(ch.A)
        else:  # exp of the decay of the later chunks: a reverse cumulative sum of their own terms
            later = reverse_cumsum(ch.A[..., 1:])
            after = torch.exp(torch.nn.functional.pad(later, (0, 1)))
        final = final + torch.einsum("rjl,rhgj,rhgjkv->rhglkv", to_device(onehot, dev, work),
                                     after, S0)
    part = (e % C != 0) & (length > 0)
    if part.any():  # the tokens of e's chunk, at levels 1..c from e
        JE = np.where(part, E - I0, 0)
        Pe = (a - r)[:, None] + JE[:, None] * C + np.arange(C)[None, :]
        inside = part[:, None] & (Pe < e[:, None]) & (Pe >= a[:, None])
        target = np.where(inside, fenwick.level(np.maximum(e[:, None], Pe), np.minimum(e[:, None], Pe)), 0)
        onehot = np.zeros((R, C, S_out))
        rr, tt = np.nonzero(inside)
        onehot[rr, tt, target[rr, tt] - 1] = 1.0
        kE = _pick(kw, rows, JE[:, None])[:, :, :, 0]  # (R, Hqk, grp or 1, C, Dk)
        vE = _pick(vc, rows, JE[:, None])[:, :, :, 0]
        kE = kE.expand(vE.shape[:3] + kE.shape[3:])
        final = final + torch.einsum("rcl,rhgck,rhgcv->rhglkv", to_device(onehot, dev, work),
                                     kE, vE)
    positions = to_device(e, dev, torch.int64)
    return o, (final.flatten(1, 2), positions)


# ---------------------------------------------------------------------------------------
# log-linear Gated DeltaNet
# ---------------------------------------------------------------------------------------
def _solve_unit_lower(N, B, left=True):
    """``N^{-1} B`` (``left``) or ``B N^{-1}`` for unit lower-triangular ``N``."""
    import torch

    return torch.linalg.solve_triangular(N, B, upper=False, left=left, unitriangular=True)


class _DeltaChunks:
    """One call of the chunked log-linear Gated DeltaNet, cut into aligned chunks.

    The call's first token is absolute position ``a``; its chunk starts at ``a0 = a - a % C``
    and the ``a % C`` rows before ``a`` are padding (zero key, query, value and beta, zero
    log-decay: the identity transition), as are the rows after the last token.  Chunk ``i``
    of the call is absolute chunk ``I0 + i``.  Per chunk (``Γ[t, s] = exp(g_{s+1} + ... + g_t)``
    from its own terms, ``γ_t = exp(g_start + ... + g_t)``, ``N = I + strictly_lower(diag(β)
    (K Kᵀ ⊙ Γ))``):

    * ``P = (Q Kᵀ ⊙ Γ) N⁻¹ diag(β)``, the in-chunk pairs (times scale and the in-chunk λ-mask);
    * ``W = N⁻¹ diag(βγ) K``: the chunk's transitions in WY form, ``A_t ⋯ A_start = γ_t I -
      Σ_{s<=t} Γ[t, s] k_s w_sᵀ``; from it the queries transported to the chunk's start,
      ``Q̃ = diag(γ) Q - (Q Kᵀ ⊙ Γ) W`` (row ``t`` is ``(A_t ⋯ A_start)ᵀ q_t``), and the chunk's
      transition ``T = γ_end I - (K ⊙ Γ[end])ᵀ W``;
    * ``E = (K ⊙ Γ[end])ᵀ N⁻¹ diag(β)``: column ``s`` is ``(A_end ⋯ A_{s+1}) β_s k_s``, so the
      chunk's state contribution is ``U = E V`` and the state of any set of its tokens is
      ``E (1_set ⊙ V)``.
    """

    def __init__(self, q, k, v, beta, level_scales, log_decay, C, a):
        import torch

        self.C, self.c, self.a = C, C.bit_length() - 1, a
        T = v.shape[-2]
        self.r = a % C
        self.I0 = a // C
        self.n = -(-(self.r + T) // C)
        self.I_last = self.I0 + self.n - 1
        self.p = a + T
        self.J = self.p >> self.c  # the chunk of the next token
        self.bits = max(self.I_last, self.J).bit_length()
        pad = (self.r, self.n * C - self.r - T)
        width = max(level_scales.shape[-1], self.c + 1 + self.bits)
        lam = torch.nn.functional.pad(level_scales, (0, width - level_scales.shape[-1]) + pad)
        rows = lambda x: _chunk(torch.nn.functional.pad(x, (0, 0) + pad), self.n, C)  # noqa: E731
        qc, kc, vc = rows(q), rows(k), rows(v)
        self.qc, self.vc = qc, vc
        self.lam = lam.reshape(lam.shape[:-2] + (self.n, C, width))
        self.lam_intra = _Chunks(lam, None, C).intra()  # levels 0..c of the padded, aligned rows
        bc = torch.nn.functional.pad(beta, pad).reshape(beta.shape[:-1] + (self.n, C))
        if log_decay is None:
            Gam = torch.ones((C, C), dtype=v.dtype, device=v.device).tril()
            gamma = torch.ones((self.n, C), dtype=v.dtype, device=v.device)
        else:
            gc = torch.nn.functional.pad(log_decay, pad).reshape(log_decay.shape[:-1] + (self.n, C))
            Gam = decay_matrix(gc, C)
            gamma = torch.exp(torch.cumsum(gc, -1))
        strict = torch.ones((C, C), dtype=torch.bool, device=v.device).tril(-1)
        kk = kc @ kc.transpose(-1, -2)
        zero = torch.zeros((), dtype=v.dtype, device=v.device)
        N = torch.eye(C, dtype=v.dtype, device=v.device) + torch.where(strict, bc[..., :, None] * kk * Gam, zero)
        qk = (qc @ kc.transpose(-1, -2)) * Gam  # Γ is 0 above the diagonal
        self.P = _solve_unit_lower(N, qk, left=False) * bc[..., None, :]
        W = _solve_unit_lower(N, (bc * gamma)[..., None] * kc)
        self.q_start = gamma[..., None] * qc - qk @ W
        k_end = kc * Gam[..., -1, :, None]  # (A_end ... A_{s+1}) acts on k_s through Γ[end, s]
        Dk = kc.shape[-1]
        eye = torch.eye(Dk, dtype=v.dtype, device=v.device)
        self.trans = gamma[..., -1, None, None] * eye - k_end.transpose(-1, -2) @ W
        self.E = _solve_unit_lower(N, k_end.transpose(-1, -2), left=False) * bc[..., None, :]
        self.U = self.E @ vc

    def hierarchy(self, U, carried):
        """Aligned block states and transitions of every level ``h`` (blocks of ``2^h``
        chunks) from the chunk contributions ``U (..., n, Dk, Dv)``, over the absolute block
        indices the call touches.  Returns ``(states, trans, offsets)``: ``states[h]
        (..., m_h, Dk, Dv)`` and ``trans[h] (..., m_h, Dk, Dk)`` hold block ``offsets[h] + j`` at
        ``j``.  ``carried`` maps a level ``h`` to the carried Fenwick bucket of mask level
        ``c + 1 + h`` (the block ``(I0 >> h) - 1``, already moved to ``a - 1``: its transition is
        the identity)."""
        import torch

        H, Tr, off = U, self.trans, self.I0
        head = tuple(H.shape[:-3])
        Dk, Dv = H.shape[-2:]

        def grow(H, Tr, front, back):
            """``front`` / ``back`` empty blocks (zero state, identity transition) around the level."""
            zH = torch.zeros(head + (1, Dk, Dv), dtype=H.dtype, device=H.device)
            eT = torch.eye(Dk, dtype=H.dtype, device=H.device).expand(head + (1, Dk, Dk))
            parts_H = [zH] * front + [H] + [zH] * back
            parts_T = [eT] * front + [Tr] + [eT] * back
            return torch.cat(parts_H, -3), torch.cat(parts_T, -3)

        states, trans, offsets = [], [], []
        for h in range(self.bits):
            if h in carried:
                idx = (self.I0 >> h) - 1
                if idx < off:
                    H, Tr = grow(H, Tr, off - idx, 0)
                    off = idx
                j = idx - off
                with_carried = (H[..., j, :, :] + carried[h])[..., None, :, :]
                H = torch.cat([H[..., :j, :, :], with_carried, H[..., j + 1 :, :, :]], -3)
            states.append(H)
            trans.append(Tr)
            offsets.append(off)
            if h == self.bits - 1:
                break
            front, back = off % 2, (off + H.shape[-3]) % 2
            if front or back:
                H, Tr = grow(H, Tr, front, back)
                off -= front
            He, Ho = H[..., 0::2, :, :], H[..., 1::2, :, :]
            Te, To = Tr[..., 0::2, :, :], Tr[..., 1::2, :, :]
            H, Tr, off = To @ He + Ho, To @ Te, off // 2
        return states, trans, offsets


def carried_small_reads(q_moved, lam_rows, rows, small):
    """``Σ_b λ[t, level(t, start_b)] q̂_tᵀ S_b`` over the carried in-chunk buckets ``small``
    (:func:`_carried_small`) for the rows at absolute positions ``rows`` (numpy) with their queries
    moved to the chunk's start ``q_moved (..., R, Dk)`` and level scales ``lam_rows (..., R, width)``:
    ``(..., R, Dv)``.  Each bucket is one level for every row (its keys share the bits from the
    bucket's level up)."""
    import torch

    lev = np.stack([np.maximum(fenwick.level(rows, start), 0) for _, start, _ in small], -1)  # (R, m)
    w = torch.gather(lam_rows, -1, to_device(lev, lam_rows.device).expand(
        lam_rows.shape[:-1] + (len(small),)))
    S_small = torch.stack([S for _, _, S in small], -3)  # (..., m, Dk, Dv)
    reads = torch.einsum("...cd,...mdv->...cmv", q_moved, S_small)
    return (w[..., None] * reads).sum(-2)


def _carried_small(state, a, c):
    """The carried Fenwick buckets of position ``a`` inside its chunk (levels ``1..c``):
    ``[(level, start, S)]``."""
    return [(lev, (a >> lev) << lev, state[..., lev - 1, :, :]) for lev in range(1, c + 1) if (a >> (lev - 1)) & 1]


def gated_delta_attention(q, k, v, beta, level_scales, log_decay, scale, *, chunk: int = DEFAULT_CHUNK,
                          state=None, position: int = 0, final_state: bool = False):
    """Log-linear Gated DeltaNet by the chunked algorithm (``chunk`` is ``C``).

    Inside a chunk the pairs come from the UT form (see :class:`_DeltaChunks`); across chunks
    each chunk's contribution ``U_i`` and transition ``T_i`` enter the aligned block hierarchy

    ``H_{h+1}[m] = T_h[2m+1] H_h[2m] + H_h[2m+1]``,  ``T_{h+1}[m] = T_h[2m+1] T_h[2m]``,

    and chunk ``i`` reads it with its queries moved to its start once (``Q̃``), walking the set
    bits ``h`` of ``i`` from low to high: it adds ``scale λ[t, c+1+h] q̂_tᵀ H_h[(i >> h) - 1]``,
    then moves ``q̂_t <- T_h[(i >> h) - 1]ᵀ q̂_t`` across that block before the next bit (the
    lower blocks are exactly the gap between a higher block and the chunk).

    ``state (*batch, S, Dk, Dv)`` holds the Fenwick bucket states of absolute position
    ``position``, where the first token sits (slot ``l - 1`` = level ``l``; ``None``: zeros);
    chunks are aligned to absolute positions, the carried buckets of levels ``> c`` are blocks
    of the hierarchy and those of levels ``<= c`` are read by the first chunk's queries and
    enter its contribution.  With ``final_state`` returns ``(o, states)``, the bucket states of
    ``position + T`` in ``max(S, (position + T).bit_length())`` slots.
    """
    import torch

    C = _check_chunk(chunk)
    arrays, was_numpy = _to_torch(q, k, v, beta, level_scales, log_decay, state)
    q, k, v, beta, level_scales, log_decay, state = arrays
    out_dtype = v.dtype
    work = level_scales.dtype
    if work in (torch.float16, torch.bfloat16):  # a 16-bit mask: the triangular solves run in float32
        work = torch.float32
        level_scales = level_scales.to(work)
        log_decay = None if log_decay is None else log_decay.to(work)
    q, k, v, beta = (x.to(work) for x in (q, k, v, beta))
    head = tuple(v.shape[:-2])
    T, Dk, Dv = v.shape[-2], q.shape[-1], v.shape[-1]
    a = int(position)
    p = a + T
    if a == 0:
        log_decay = _from_position_zero(log_decay)
    if state is None:
        state = torch.zeros(head + (fenwick.num_slots(a), Dk, Dv), dtype=work, device=v.device)
    state = state.to(work)
    slots = max(state.shape[-3], fenwick.num_slots(p))
    if T == 0:
        o = v.to(out_dtype)
        new = torch.nn.functional.pad(state, (0, 0, 0, 0, 0, slots - state.shape[-3]))
    else:
        ch = _DeltaChunks(q, k, v, beta, level_scales, log_decay, C, a)
        o, new = _delta_forward(ch, state, scale, slots, final_state)
        o = o.reshape(head + (ch.n * C, Dv))[..., ch.r : ch.r + T, :].to(out_dtype)
    if was_numpy:
        o = o.numpy()
        new = new.numpy() if final_state else None
    return (o, new) if final_state else o


def _delta_forward(ch, state, scale, slots, final_state):
    import torch

    C, c, a = ch.C, ch.c, ch.a
    o = (ch.P * ch.lam_intra) @ ch.vc
    small = _carried_small(state, a, c)
    U = ch.U
    if small:  # the first chunk's queries read the carried in-chunk buckets
        rows = np.arange(C) + (a - ch.r)
        o0 = o[..., 0, :, :] + carried_small_reads(ch.q_start[..., 0, :, :], ch.lam[..., 0, :, :], rows, small)
        o = torch.cat([o0[..., None, :, :], o[..., 1:, :, :]], -3)
        U0 = U[..., 0, :, :] + ch.trans[..., 0, :, :] @ sum(S for _, _, S in small)  # moved to the chunk's end
        U = torch.cat([U0[..., None, :, :], U[..., 1:, :, :]], -3)
    carried = {h: state[..., c + h, :, :] for h in range(ch.bits) if (ch.I0 >> h) & 1}
    states, trans, offsets = ch.hierarchy(U, carried)
    chunks = ch.I0 + np.arange(ch.n)
    dev = ch.lam.device
    zero = torch.zeros((), dtype=o.dtype, device=dev)
    qh = ch.q_start
    for h in range(ch.bits):
        on_np = ((chunks >> h) & 1).astype(bool)
        if not on_np.any():
            continue
        on = to_device(on_np, dev)
        idx = to_device(np.where(on_np, (chunks >> h) - 1 - offsets[h], 0), dev)
        lam = torch.where(on[:, None], ch.lam[..., c + 1 + h], zero)
        o = o + lam[..., None] * (qh @ states[h][..., idx, :, :])
        if h + 1 < ch.bits:
            qh = torch.where(on[:, None, None], qh @ trans[h][..., idx, :, :], qh)
    o = o * scale
    if not final_state:
        return o, None
    return o, _final_states(ch, small, states, trans, offsets, slots)


def _final_states(ch, small, states, trans, offsets, slots):
    """The bucket states of ``p = a + T`` (see :func:`gated_delta_attention`)."""
    import torch

    C, c, p = ch.C, ch.c, ch.p
    head = tuple(ch.U.shape[:-3])
    Dk, Dv = ch.U.shape[-2:]
    partial = None
    if p % C != 0:  # buckets of levels <= c lie in the last, partial chunk
        E, vl = ch.E[..., -1, :, :], ch.vc[..., -1, :, :]
        rows = np.arange(C) + ch.J * C

        def bucket(level, start):
            inside = (rows >= start) & (rows < start + (1 << (level - 1)))
            S = E @ (to_device(inside, vl.device, vl.dtype)[:, None] * vl)
            if ch.n == 1:
                for _, s0, S0 in small:
                    if start <= s0 < start + (1 << (level - 1)):
                        S = S + ch.trans[..., 0, :, :] @ S0
            return S

        partial = (bucket, ch.trans[..., -1, :, :])
    out = fenwick.delta.buckets_from_blocks(p, c, slots, lambda h, m: states[h][..., m - offsets[h], :, :],
                                            lambda h, m: trans[h][..., m - offsets[h], :, :], partial)
    zero = torch.zeros(head + (Dk, Dv), dtype=ch.U.dtype, device=ch.U.device)
    return torch.stack([zero if s is None else s for s in out], -3)
