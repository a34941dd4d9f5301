"""Triton backend: the chunked GPU kernels of :mod:`hodlr.kernels` (forward and backward).

Available for torch tensors on a CUDA device, and for CPU tensors when the kernels are
Triton interpreter functions (:func:`hodlr.kernels.interpreting`): ``TRITON_INTERPRET=1``
must be in the environment when ``hodlr.kernels`` is first imported, since ``@triton.jit``
reads it when a kernel is defined.  That is how the CPU test-suite proves the kernels equal
to the other backends.  float64 runs only under the interpreter; on the GPU, float32 uses
IEEE dots and float16 / bfloat16 accumulate in float32.  Chunk size:
``hodlr.kernels.DEFAULT_CHUNK``.  When a gradient is wanted (grad mode on and an input that
requires it) the call goes through the differentiable :func:`hodlr.kernels.matmul` /
:func:`hodlr.kernels.attention` / :func:`hodlr.kernels.gated_delta`; otherwise straight to the forward launchers.
"""

from __future__ import annotations

import functools
import importlib.util

from hodlr._checks import wants_grad

CHECKS_MASK = True
"""``matmul``, ``attention`` and ``gated_delta_attention`` take ``check``: the forward's output kernel
validates the mask's read scales and log-decays (``hodlr.kernels.attention_forward``)."""

READS_16_BIT_MASKS = True
"""The kernels read float16 / bfloat16 level scales and log-decays as they are (float32 accumulation)."""

USES_KERNELS = True
"""Its computations are :mod:`hodlr.kernels`' (work beside a call, e.g. :mod:`hodlr.distributed`'s bucket states, uses them too)."""

PACKED_AS_ONE_STREAM = True
"""Its ``gated_delta_attention`` costs about linearly in ``T``: :func:`hodlr.log_linear_gated_delta_rule`
runs packed sequences without state as one call over an aligned stream (``hodlr.ops.stream_layout``)."""

DESCRIPTION = "chunked Triton kernels (dense C x C blocks + Fenwick scan over chunk states), forward and backward; CUDA, or CPU under TRITON_INTERPRET=1"


@functools.lru_cache(maxsize=None)
def _triton_installed() -> bool:
    """Whether triton can be imported (looked up once: the answer is asked on every call)."""
    return importlib.util.find_spec("triton") is not None


def unavailable_reason(library, device):
    if library != "torch":
        return "needs torch tensors"
    if not _triton_installed():
        return "triton is not installed (pip install triton)"
    kind = getattr(device, "type", str(device))
    if kind not in ("cuda", "cpu"):
        return f"needs CUDA tensors (or CPU tensors under Triton's interpreter), got device {device}"
    import triton

    from hodlr import kernels

    if kernels.interpreting() and not triton.knobs.runtime.interpret:
        return ("TRITON_INTERPRET was unset after hodlr.kernels was imported: its kernels were defined for "
                "Triton's interpreter, which runs them only while TRITON_INTERPRET=1; set it again")
    if not kernels.interpreting() and triton.knobs.runtime.interpret:
        return ("TRITON_INTERPRET=1 was set after hodlr.kernels was imported, so its kernels were compiled for "
                "the GPU; set TRITON_INTERPRET=1 before importing hodlr.kernels (before the first use of the "
                "triton backend) to run them on the CPU")
    if kind == "cpu" and not kernels.interpreting():
        return "needs a CUDA device (or CPU tensors with TRITON_INTERPRET=1 set before hodlr.kernels is imported)"
    return None


def matmul(level_scales, log_decay, x, *, check=None):
    from hodlr import kernels

    if wants_grad(level_scales, log_decay, x):
        return kernels.matmul(level_scales, log_decay, x, check=check)
    return kernels.matmul_forward(level_scales, log_decay, x, check=check)


def attention(q, k, v, level_scales, log_decay, scale, *, check=None):
    from hodlr import kernels
    from hodlr.options import flag

    if wants_grad(q, k, v, level_scales, log_decay):
        return kernels.attention(q, k, v, level_scales, log_decay, scale, check=check,
                                 save_states=flag("attention_save_states"))
    return kernels.attention_forward(q, k, v, level_scales, log_decay, scale, check=check)


def attention_keeping_states(q, k, v, level_scales, log_decay, scale):
    """The forward of :func:`attention_state_vjp`'s common path (no state, no packed sequences) on
    its layout (``q, k (N, Hqk, T, Dk)``, ``v (N, H, T, Dv)``), also returning the chunk states that
    the vjp takes (``saved=``) instead of recomputing them: ``(o (N, H, T, Dv), states, logdec)``,
    the states shaped as :func:`kept_state_shapes` says (the entries past the hierarchy, which
    nothing writes nor reads, zeroed: they are outputs of the operator, the same every call)."""
    from hodlr import kernels
    from hodlr.backends import grouped_heads
    from hodlr.kernels import DEFAULT_CHUNK
    from hodlr.kernels._layout import chunk_count, level_offsets

    o, (states, logdec) = kernels.attention_forward(*grouped_heads(q, k, v, level_scales, log_decay), scale,
                                                    return_states=True)
    used = level_offsets(chunk_count(q.shape[2], DEFAULT_CHUNK["attention"]))[-1]
    states[:, used:].zero_()
    logdec[:, used:].zero_()
    return o.flatten(1, 2), states, logdec


def kept_state_shapes(q, v):
    """``((shape, dtype) of the states, (shape, dtype) of the log-decays)`` that
    :func:`attention_keeping_states` returns for ``q (N, Hqk, T, Dk)``, ``v (N, H, T, Dv)`` (shapes
    only: what a fake tensor needs)."""
    from hodlr.kernels.attention import state_shapes

    N, H, T, Dv = v.shape
    return state_shapes(N * H, T, q.shape[-1], Dv, v.dtype)


def takes_dtype(dtype) -> bool:
    """float16, bfloat16 and float32 inputs; float64 only under Triton's interpreter."""
    import torch

    from hodlr import kernels

    return dtype != torch.float64 or kernels.interpreting()


def max_key_width(op):
    """The widest key head the kernels of ``op`` take: ``Dk <= 128`` for Gated DeltaNet
    (``kernels.gated_delta.MAX_DK``), any for the others."""
    if op != "gated_delta_attention":
        return None
    from hodlr.kernels.gated_delta import MAX_DK

    return MAX_DK


def gated_delta_attention(q, k, v, beta, level_scales, log_decay, scale, *, check=None):
    from hodlr import kernels
    from hodlr.options import flag

    if wants_grad(q, k, v, beta, level_scales, log_decay):
        return kernels.gated_delta(q, k, v, beta, level_scales, log_decay, scale, check=check,
                                   save_states=flag("gated_delta_save_states"))
    return kernels.gated_delta_forward(q, k, v, beta, level_scales, log_decay, scale, check=check)


SPLIT_LONG_PADDING = True
"""Whether :func:`gated_delta_with_state` runs a call whose stream's padding is a chunk or more and
over half its tokens as two calls (a continuation from position ``T - 1`` pads ``T - 1`` tokens:
two calls over ``T`` tokens instead of one over ``2T - 1``)."""


def gated_delta_with_state(q, k, v, beta, level_scales, log_decay, scale, state=None, position: int = 0,
                           final_state: bool = True):
    """:func:`gated_delta_attention` continuing from the Fenwick bucket states ``state``
    (``(*batch, S, Dk, Dv)``, slot ``l - 1`` = level ``l``; None: none) of absolute position
    ``position``, returning ``(o, states)`` (``states`` None without ``final_state``): the bucket
    states after the last token,
    ``(*batch, max(S, bit_length(position + T)), Dk, Dv)`` in the accumulator dtype (float32,
    float64 for float64 inputs), as the ``chunked`` backend's ``final_state``.  No gradient (the
    kernels' backward takes no state).

    The call runs as one forward over a *stream*: ``P = position mod 2^m`` zero tokens, then the
    call's, ``m`` the least exponent for which the call (its end included) crosses at most one
    multiple of ``2^m`` (where the padding is a chunk or more and over half the call's tokens, the
    call is two: its tokens before that multiple, then the rest from it, with no padding).  Inside
    the stream every level is the absolute one but for the pairs across that multiple, stream level
    ``m + 1`` and absolute ``m + 1 + t`` (``t`` the trailing one-bits of ``position >> m``): the rows
    past it read that column there.  The carried buckets of
    levels up to ``m`` lie in the padding: one of whole chunks enters as its last chunk's state,
    those inside the call's first chunk enter its state moved across it and are read by its rows
    (``chunked.carried_small_reads``); those of higher levels lie before the stream and are read
    by every row with its queries moved to the stream's start (:class:`hodlr.kernels.gated_delta.
    Carried`).  The final buckets are read off the forward's chunk hierarchy
    (:func:`hodlr.fenwick.delta.buckets_from_blocks`; those inside the last, partial chunk are
    ``E (1_bucket ⊙ V)``, ``E = (diag(d) K)ᵀ X diag(β)`` from its stored ``X``), the carried ones of
    higher levels moved across the whole stream (docs/kernels.md §7.6).  For a bfloat16 call the
    blocks come from the bfloat16 hierarchy that its outputs read (``BF16_HIERARCHY``)."""
    import numpy as np
    import torch

    from hodlr import backends as registry, fenwick, kernels
    from hodlr.backends import chunked
    from hodlr._transfer import to_device
    from hodlr.kernels.gated_delta import Carried

    a, T = int(position), v.shape[-2]
    e = a + T
    Dk, Dv = q.shape[-1], v.shape[-1]
    dev = v.device
    work = torch.float64 if v.dtype == torch.float64 else torch.float32
    batch = _call_batch(q, k, v, beta, level_scales, log_decay)
    c = kernels.DEFAULT_CHUNK["gated_delta"].bit_length() - 1
    C = 1 << c
    m = 0
    while (e >> m) - (a >> m) > 1:
        m += 1
    P, u0 = a & ((1 << m) - 1), a >> m
    a0 = a - P
    w = a0 + (1 << m)  # the multiple of 2^m after the position
    if SPLIT_LONG_PADDING and P >= C and 2 * P > T and w < e:
        # padding that outweighs the call: its tokens before the multiple first (their own, shorter
        # stream), then the rest from the multiple, which needs none
        def part(lo, n):  # tokens lo .. lo + n of every input (beta and log_decay have no feature dim)
            return [None if x is None else x.narrow(x.dim() - 1 - tail, lo, n)
                    for x, tail in ((q, 1), (k, 1), (v, 1), (beta, 0), (level_scales, 1), (log_decay, 0))]

        o_head, mid = gated_delta_with_state(*part(0, w - a), scale, state=state, position=a, final_state=True)
        o_rest, final = gated_delta_with_state(*part(w - a, e - w), scale, state=mid, position=w,
                                               final_state=final_state)
        return torch.cat([o_head, o_rest], -2), final
    crossed = P + T >= 1 << m  # the stream's end lies past the multiple of 2^m
    cross_level = m + 1 + ((u0 ^ (u0 + 1)).bit_length() - 1)
    live = [] if state is None else [lev for lev in range(1, state.shape[-3] + 1) if (a >> (lev - 1)) & 1]
    S_of = {lev: state[..., lev - 1, :, :].to(work) for lev in live}

    def front(x, tail):  # P zero tokens before the call's, in the input's memory order
        return x if x is None else registry.pad_rows(x, x.dim() - 1 - tail, P)

    qs, ks, vs, bs, gs, lam = front(q, 1), front(k, 1), front(v, 1), front(beta, 0), front(log_decay, 0), \
        front(level_scales, 1)
    if P + T > 1 << m and cross_level > m + 1:  # the rows past the multiple read stream level m + 1
        lam = lam.clone() if P == 0 else lam  # (padded, it is already the call's own copy)
        lam[..., 1 << m:, m + 1] = lam[..., 1 << m:, cross_level]
    far = [lev for lev in live if lev > m]
    small = [(lev, (a >> lev) << lev, S_of[lev]) for lev in live if lev <= min(m, c)]
    first = min(T, C - (P & (C - 1)))  # the call's tokens in its first chunk
    Tr0 = None
    carried = None
    if live:
        index, added = [], []
        for lev in live:
            if c < lev <= m:  # whole chunks of the padding: the state of the bucket's last chunk
                index.append(((((a >> lev) << lev) - a0 + (1 << (lev - 1))) >> c) - 1)
                added.append(S_of[lev])
        if small:  # the first call chunk's queries moved to its start, and its transition (chunked's)
            head = [None if x is None else x[..., :first, :].to(work) for x in (q, k, v, level_scales)]
            tail = [None if x is None else x[..., :first].to(work) for x in (beta, log_decay)]
            ch0 = chunked._DeltaChunks(head[0], head[1], head[2], tail[0], head[3], tail[1], C, P)
            r = P & (C - 1)
            q_moved, Tr0 = ch0.q_start[..., 0, r:r + first, :], ch0.trans[..., 0, :, :]
            index.append(P >> c)
            added.append(Tr0 @ sum(S for _, _, S in small))

        def stack(xs):
            if not xs:
                return torch.zeros(batch + (0, Dk, Dv), dtype=work, device=dev)
            return torch.stack([x.expand(batch + (Dk, Dv)) for x in xs], -3)

        carried = Carried(to_device(index, dev, torch.int64), stack(added),
                          stack([S_of[lev] for lev in far]), to_device(far, dev, torch.int32),
                          1 << m, cross_level)
    o, ch = kernels.gated_delta_forward(qs, ks, vs, bs, lam, gs, scale, return_chunks=True, carried=carried)
    o = o[..., P:, :]
    if small:  # the first chunk's rows read the carried buckets inside it
        reads = chunked.carried_small_reads(q_moved, level_scales[..., :first, :].to(work), np.arange(first) + a,
                                            small)
        o = torch.cat([o[..., :first, :] + (scale * reads).to(o.dtype), o[..., first:, :]], -2)
    if not final_state:
        return o, None
    slots = max(0 if state is None else state.shape[-3], fenwick.num_slots(e))
    far_states = [(lev, S_of[lev]) for lev in far]
    return o, _final_buckets(ch, ks, vs, bs, gs, batch, P + T, slots, all_transitions=carried is not None, P=P,
                             a0=a0, m=m, crossed=crossed, cross_level=cross_level, small=small, Tr0=Tr0,
                             far_states=far_states)


def _call_batch(q, k, v, beta, level_scales, log_decay) -> tuple:
    """The broadcast batch shape of a Gated DeltaNet call's operands (``(*batch, T, ·)``)."""
    import torch

    return tuple(torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2], beta.shape[:-1],
                                        level_scales.shape[:-2], () if log_decay is None else log_decay.shape[:-1]))


def gated_delta_packed_prefill(q, k, v, beta, level_scales, log_decay, scale, starts, lengths, slots):
    """One forward over the aligned stream of packed sequences (laid out by
    ``hodlr.ops.stream_layout``: sequence ``n`` from stream row ``starts[n]``, a multiple of ``2^K``
    at least its length, its first log-decay -inf and its scales above level ``K`` zero) and each
    sequence's final bucket states read off the forward's hierarchy, the buckets relative to the
    sequence's start (its blocks are the stream's, and the zero transition at its start keeps
    whatever lies before out of them), for all sequences at once (:func:`_packed_final_buckets`).
    Returns ``(o, finals)``, ``finals`` of shape ``(N, *batch, slots, Dk, Dv)`` in the accumulator
    dtype (``slots`` at least the largest ``bit_length(lengths[n])``; zeros for an empty sequence
    and the empty buckets).  No gradient."""
    from hodlr import kernels

    batch = _call_batch(q, k, v, beta, level_scales, log_decay)
    o, ch = kernels.gated_delta_forward(q, k, v, beta, level_scales, log_decay, scale, return_chunks=True)
    return o, _packed_final_buckets(ch, k, v, beta, log_decay, batch, starts, lengths, slots)


def _hierarchy_blocks(ch, all_transitions=False):
    """``(block_state, block_transition)`` of the hierarchy ``ch`` of a Gated DeltaNet forward:
    ``block_state(h, idx)`` the states of blocks ``idx`` (a device index tensor ``(N,)``, or one
    block's index, ``N = 1``) of level ``h``, ``block_transition(h, idx)`` their whole transitions
    ``γ I + R``, both ``(B, N, Dk, ·)`` in the work dtype; a level the forward did not store (above
    its top, or the top level's transitions unless ``all_transitions``) is formed from the level
    below."""
    import torch

    from hodlr.kernels._layout import level_offsets

    B, Dk, Dv = ch.X.shape[0], ch.W.shape[-1], ch.states.shape[-1] // ch.W.shape[-1]
    work = ch.X.dtype
    offsets = level_offsets(ch.n)
    top = len(offsets) - 2  # the highest stored level
    eye = torch.eye(Dk, dtype=work, device=ch.X.device)

    def block_transition(h, idx):
        if h == 0 or h < top or (h == top and all_transitions):
            R = ch.trans[:, offsets[h] + idx].reshape(B, -1, Dk, Dk).to(work)
            gamma = 1.0 if ch.decays is None else ch.decays[:, offsets[h] + idx].reshape(B, -1, 1, 1)
            return R + gamma * eye
        return block_transition(h - 1, 2 * idx + 1) @ block_transition(h - 1, 2 * idx)

    def block_state(h, idx):
        if h <= top:
            return ch.states[:, offsets[h] + idx].reshape(B, -1, Dk, Dv).to(work)
        return block_transition(h - 1, 2 * idx + 1) @ block_state(h - 1, 2 * idx) + block_state(h - 1, 2 * idx + 1)

    return block_state, block_transition


def _chunk_tails(ch, ks, vs, bs, gs, batch, J, r):
    """For ``N`` rows ``J C .. J C + r - 1`` of the stream (each in one chunk ``J``; ``J``, ``r``
    int64 tensors ``(N,)`` on the hierarchy's device): ``(E, moved, V)``, with ``E = (diag(d) K)ᵀ X diag(β)`` over those
    rows (``(B, N, Dk, C)``, columns past ``r`` zero; ``X`` the chunk's, whose leading ``r × r``
    block is the inverse over those rows), ``moved = γ_{r-1} I - E diag(γ) K`` the transition over
    those rows alone (``(B, N, Dk, Dk)``; the identity where ``r = 0``; the chunk's stored one runs
    to its end) and the rows' values ``V`` (``(B, N, C, Dv)``, 0 past ``r``).  ``d_t`` decays from
    row ``t`` to the last, ``γ_t`` from the first row to ``t``, each a sum of its own terms."""
    import torch

    from hodlr.fenwick.arrays import reverse_cumsum

    B, C, dev, work = ch.X.shape[0], ch.C, ch.X.device, ch.X.dtype
    N = J.numel()
    J = J.clamp(max=ch.n - 1)  # rows of none (r = 0) may name the chunk past the stream's last
    col = torch.arange(C, device=dev)
    valid = col < r[:, None]
    rows = (J[:, None] * C + torch.minimum(col, (r[:, None] - 1).clamp(min=0))).flatten()
    zero = torch.zeros((), dtype=work, device=dev)

    def chunk_rows(x, tail):
        d = x.dim() - 1 - tail
        y = x.index_select(d, rows)
        y = y.expand(batch + y.shape[d:]).reshape((B, N, C) + y.shape[d + 1:]).to(work)
        return torch.where(valid.reshape((1, N, C) + (1,) * tail), y, zero)

    K, V, b = chunk_rows(ks, 1), chunk_rows(vs, 1), chunk_rows(bs, 0)
    d = gam = torch.ones((B, N, C), dtype=work, device=dev)
    if gs is not None:
        g = chunk_rows(gs, 0)
        d = torch.exp(torch.nn.functional.pad(reverse_cumsum(g[..., 1:], 2), (0, 1)))
        gam = torch.exp(torch.cumsum(g, 2))
    X = ch.X.index_select(1, J)
    E = ((d[..., None] * K).transpose(-1, -2) @ X) * b[..., None, :]
    moved = gam[..., -1, None, None] * torch.eye(K.shape[-1], dtype=work, device=dev) - E @ (gam[..., None] * K)
    return E, moved, V


def _packed_final_buckets(ch, ks, vs, bs, gs, batch, starts, lengths, slots):
    """The final bucket states ``(N, *batch, slots, Dk, Dv)`` of the packed sequences of
    :func:`gated_delta_packed_prefill` (sequence ``n``: stream rows ``starts[n] ..`` of
    ``lengths[n]``), off the stream's hierarchy ``ch`` (``ks, vs, bs, gs`` its inputs): the
    assembly of :func:`hodlr.fenwick.delta.buckets_from_blocks` carried out for every sequence at
    once, one batched product a level.  A sequence of ``n`` tokens has the buckets of levels
    ``l <= c`` inside its last, partial chunk (:func:`_chunk_tails` over that chunk's rows up to the
    sequence's end, applied to each bucket's rows of ``V``), and for each set bit ``h`` of
    ``n >> c`` the stream's block ``(n >> (c + h)) - 1`` of level ``h`` counted from the sequence's
    start, moved to the end across the partial chunk and the blocks of the lower set bits."""
    import numpy as np
    import torch

    from hodlr._transfer import to_device

    B, Dk, Dv = ch.X.shape[0], ch.W.shape[-1], vs.shape[-1]
    dev, work = ch.X.device, ch.X.dtype
    C = ch.C
    c = C.bit_length() - 1
    s, n = np.asarray(starts, np.int64), np.asarray(lengths, np.int64)
    N = n.size
    # each sequence's last chunk and its rows up to the sequence's end (a sequence shorter than a
    # chunk may start inside one: its rows are the chunk's from its start)
    J = (s + n - n % C) >> c
    E, moved, V = _chunk_tails(ch, ks, vs, bs, gs, batch, *to_device(np.stack([J, s + n - J * C]), dev))
    # levels 1..c: the bucket of level l (bit l - 1 of n set) holds the sequence's rows
    # [start, start + 2^(l-1)), start = (n >> l) << l
    rel = J[:, None] * C + np.arange(C)[None, :] - s[:, None]  # each chunk row's position in its sequence
    lev = np.arange(1, c + 1)[None, :, None]
    start = (n[:, None, None] >> lev) << lev
    inside = ((n[:, None, None] >> (lev - 1)) & 1).astype(bool) & (rel[:, None, :] >= start) & (
        rel[:, None, :] < start + (1 << (lev - 1)))  # (N, c, C)
    small = E[:, :, None] @ (to_device(inside, dev, work)[None, ..., None] * V[:, :, None])  # (B, N, c, Dk, Dv)
    out = [small[:, :, level] for level in range(c)]
    block_state, block_transition = _hierarchy_blocks(ch)
    chunks = n >> c  # each sequence's whole chunks
    bits = np.arange(int(chunks.max()).bit_length())[:, None]  # the levels of the whole blocks
    read = ((chunks >> bits) & 1).astype(bool)  # (levels, N)
    crosses = read & (chunks >> (bits + 1) > 0)  # something earlier is still to come: it crosses the block
    block = (chunks >> bits) - 1 + (s >> (c + bits))
    # where a sequence reads no block of a level, the index of one that does (a block that exists)
    block = np.where(read, block, block[np.arange(bits.size), read.argmax(1)][:, None])
    table = to_device(np.stack([block, read, crosses]).astype(np.int64), dev)  # one copy for every level
    zero = torch.zeros((), dtype=work, device=dev)
    for h in range(read.shape[0]):
        if not read[h].any():
            out.append(torch.zeros((B, N, Dk, Dv), dtype=work, device=dev))
            continue
        out.append(torch.where(table[1, h, None, :, None, None] > 0, moved @ block_state(h, table[0, h]), zero))
        if crosses[h].any():
            moved = torch.where(table[2, h, None, :, None, None] > 0, moved @ block_transition(h, table[0, h]), moved)
    out = out[:slots] + [torch.zeros((B, N, Dk, Dv), dtype=work, device=dev)] * (slots - len(out))
    final = torch.stack(out, 2).transpose(0, 1)  # (N, B, slots, Dk, Dv)
    return final.reshape((N,) + batch + final.shape[2:])


def _final_buckets(ch, ks, vs, bs, gs, batch, ps, slots, *, all_transitions=False, P=0, a0=0, m=None, crossed=False,
                   cross_level=None, small=(), Tr0=None, far_states=()):
    """The final bucket states of :func:`gated_delta_with_state` (``(*batch, slots, Dk, Dv)``): the
    stream's, read off its hierarchy ``ch`` (``ks, vs, bs, gs`` its inputs, ``ps`` its length, the
    call's first token at row ``P``, row 0 at absolute position ``a0``; ``all_transitions``: the
    forward formed the transitions of its top level), placed at their absolute levels (the
    crossing's, level ``m + 1`` in the stream, at ``cross_level``; None: no crossing), with the
    carried ``far_states`` ``[(level, S)]`` moved across the whole stream; ``small`` and ``Tr0``: the
    carried in-chunk buckets and the first call chunk's transition."""
    import torch

    from hodlr import fenwick

    B = ch.X.shape[0]
    Dk, Dv = ch.W.shape[-1], vs.shape[-1]
    dev, work = ch.X.device, ch.X.dtype
    C = ch.C
    c = C.bit_length() - 1
    block_state, block_transition = _hierarchy_blocks(ch, all_transitions)
    J = ps >> c  # the chunk of the rows after the last whole chunk
    partial = None
    if ps % C:  # that chunk's r = ps - J C rows
        # (fills, not copies from the host: a copy would wait for the GPU or pin a buffer)
        J_t, r_t = (torch.full((1,), x, dtype=torch.int64, device=dev) for x in (J, ps - J * C))
        E, moved_rows, V = (x[:, 0] for x in _chunk_tails(ch, ks, vs, bs, gs, batch, J_t, r_t))
        inside = torch.arange(C, device=dev) + J * C
        in_first = small and (P >> c) == J  # the carried in-chunk buckets lie in this chunk too

        def bucket(level, start):
            S = E @ (((inside >= start) & (inside < start + (1 << (level - 1)))).to(work)[:, None] * V)
            if in_first:
                for _, s0, S0 in small:
                    if start <= s0 - a0 < start + (1 << (level - 1)):
                        S = S + (Tr0 @ S0).expand(batch + (Dk, Dv)).reshape(B, Dk, Dv)
            return S

        partial = (bucket, moved_rows)
    stream = fenwick.delta.buckets_from_blocks(ps, c, ps.bit_length(), lambda h, j: block_state(h, j)[:, 0],
                                               lambda h, j: block_transition(h, j)[:, 0], partial,
                                               through=bool(far_states))
    stream, through = stream if far_states else (stream, None)
    out = [None] * slots

    def put(level, S):
        out[level - 1] = S if out[level - 1] is None else out[level - 1] + S

    for level, S in enumerate(stream, 1):
        if S is not None:
            put(level if m is None or level <= m else cross_level, S)
    for lev, S in far_states:  # moved across the whole stream; merged into the crossing's bucket below it
        put(cross_level if crossed and lev < cross_level else lev,
            through @ S.expand(batch + (Dk, Dv)).reshape(B, Dk, Dv))
    zero = torch.zeros((B, Dk, Dv), dtype=work, device=dev)
    final = torch.stack([zero if S is None else S for S in out], 1)
    return final.reshape(batch + final.shape[1:])


def gated_delta_keeping_chunks(q, k, v, beta, level_scales, log_decay, scale):
    """The forward of :func:`gated_delta_vjp` on its layout (``q, k (N, Hqk, T, Dk)``,
    ``v (N, H, T, Dv)``, ``beta, log_decay (N, H, T)``, ``level_scales (N, H, T, L)``), also returning
    the forward's ``X``, ``W`` and hierarchy, which the vjp takes (``saved=``) instead of recomputing
    them: ``(o (N, H, T, Dv), X, W, states, trans, decays)``, shaped as :func:`kept_chunk_shapes`
    says (``decays`` None without ``log_decay``); the operator keeps them when :func:`keeps_chunks` is
    true.  What nothing writes nor reads (the entries past the hierarchy, the top level's transitions
    and decays) is zeroed: they are outputs of the operator, the same every call."""
    from hodlr import kernels
    from hodlr.backends import grouped_delta_heads
    from hodlr.kernels._layout import level_offsets

    o, ch = kernels.gated_delta_forward(*grouped_delta_heads(q, k, v, beta, level_scales, log_decay), scale,
                                        return_chunks=True)
    offsets = level_offsets(ch.n)
    used = offsets[-1]  # the entries past it (chunk_shapes' bound) are never written
    unwritten = offsets[-2] if len(offsets) > 2 else used  # a top level the hierarchy kernel built (no transitions)
    ch.states[:, used:].zero_()
    ch.trans[:, unwritten:].zero_()
    if ch.decays is not None:
        ch.decays[:, unwritten:].zero_()
    return o.flatten(1, 2), ch.X, ch.W, ch.states, ch.trans, ch.decays


def keeps_chunks() -> bool:
    """Whether :func:`gated_delta_keeping_chunks` serves the backward: the forward's default chunk is
    one the backward runs at (``hodlr.kernels.gated_delta_backward.MAX_BACKWARD_CHUNK``)."""
    from hodlr.kernels import DEFAULT_CHUNK
    from hodlr.kernels.gated_delta_backward import MAX_BACKWARD_CHUNK

    return DEFAULT_CHUNK["gated_delta"] <= MAX_BACKWARD_CHUNK


def kept_chunk_shapes(q, v, has_decay: bool) -> dict:
    """``{name: (shape, dtype)}`` of the tensors :func:`gated_delta_keeping_chunks` keeps for
    ``q (N, Hqk, T, Dk)``, ``v (N, H, T, Dv)`` (``decays`` only with a log-decay; shapes only: what a
    fake tensor needs)."""
    from hodlr.kernels import DEFAULT_CHUNK
    from hodlr.kernels.gated_delta import chunk_shapes

    N, H, T, Dv = v.shape
    return chunk_shapes(N * H, T, q.shape[-1], Dv, v.dtype, has_decay, DEFAULT_CHUNK["gated_delta"])


def _grouped_buffers(Hqk: int, grp: int, queries, keys, *others):
    """The backward kernels' ``out=`` on :func:`hodlr.backends.grouped_heads` views: for each input a
    buffer laid out like it, seen as ``(N, Hqk, grp, T, ·)``, so the gradients need no copy; None for
    an absent input, and for the queries' and keys' where ``grp > 1`` (their gradients come per value
    head, for :func:`_sum_groups`)."""
    import torch

    like = (queries, keys) if grp == 1 else (None, None)
    return tuple(None if x is None else torch.empty_like(x).unflatten(1, (Hqk, grp)) for x in (*like, *others))


def _sum_groups(x):
    """The gradient ``(N, Hqk, grp, T, D)`` of a query/key head summed over the value heads of its group
    (one value head a group: a view, no copy)."""
    return x.squeeze(2) if x.shape[2] == 1 else x.sum(2)


def gated_delta_vjp(q, k, v, beta, level_scales, log_decay, scale, do, saved=None):
    """Gradients ``(dq, dk, dv, dbeta, dlevel_scales, dlog_decay)`` of :func:`gated_delta_attention` on
    the layout of ``hodlr.log_linear_gated_delta_rule``'s operator (``q, k (N, Hqk, T, Dk)``,
    ``v (N, H, T, Dv)``, ``beta, log_decay (N, H, T)``, ``level_scales (N, H, T, L)``; no state) for
    ``do (N, H, T, Dv)``, straight from the backward kernels: the forward's output is not recomputed,
    and its chunk products and hierarchy only when ``saved`` (the ``X, W, states, trans, decays`` of
    :func:`gated_delta_keeping_chunks`) is None.  ``dlog_decay`` is None without ``log_decay``."""
    from hodlr import kernels
    from hodlr.backends import grouped_delta_heads
    from hodlr.kernels import DEFAULT_CHUNK
    from hodlr.kernels.gated_delta import Chunks
    from hodlr.kernels.gated_delta_backward import MAX_BACKWARD_CHUNK

    Hqk, grp = q.shape[1], v.shape[1] // q.shape[1]
    if saved is None:  # any chunk gives the same gradients: the forward's where the backward runs at it
        chunks, chunk = None, min(DEFAULT_CHUNK["gated_delta"], MAX_BACKWARD_CHUNK)
    else:  # X is (batch, n, C, C)
        chunk = saved[0].shape[2]
        chunks = Chunks(*saved, chunk, saved[0].shape[1])
    out = _grouped_buffers(Hqk, grp, q, k, v, beta, level_scales, log_decay)
    dq, dk, dv, dbeta, dlam, dg = kernels.gated_delta_backward(
        *grouped_delta_heads(q, k, v, beta, level_scales, log_decay), scale, do.unflatten(1, (Hqk, grp)),
        chunk=chunk, chunks=chunks, out=out)
    return (_sum_groups(dq), _sum_groups(dk), dv.flatten(1, 2), dbeta.flatten(1, 2), dlam.flatten(1, 2),
            None if dg is None else dg.flatten(1, 2))


def attention_state(q, k, v, level_scales, log_decay, scale, initial_state, initial_positions, cu_seqlens,
                    output_final_state):
    """The state-aware attention of the backend contract: ``hodlr.kernels.attention`` with its
    state and packed-sequence keywords (differentiable, same layout)."""
    from hodlr import kernels

    return kernels.attention(q, k, v, level_scales, log_decay, scale, initial_state=initial_state,
                             initial_positions=initial_positions, cu_seqlens=cu_seqlens,
                             output_final_state=output_final_state)


def attention_state_vjp(q, k, v, level_scales, log_decay, scale, initial_state, initial_positions, cu_seqlens, do,
                        dfinal, saved=None):
    """Gradients ``(dq, dk, dv, dlevel_scales, dlog_decay, dinitial_state)`` of
    :func:`attention_state` (same layout: ``q, k (N, Hqk, T, Dk)``, ``v (N, H, T, Dv)``) for the
    cotangents ``do (N, H, T, Dv)`` and ``dfinal`` (``(Nseq, H, S, Dk, Dv)`` with any slot count
    ``S``, or None), straight from the backward kernels: the forward is not recomputed.
    ``dlog_decay`` / ``dinitial_state`` are None for an absent ``log_decay`` / state.  ``saved``: the
    ``(states, logdec)`` of :func:`attention_keeping_states` for the common path (else recomputed)."""
    from hodlr import kernels

    if initial_state is None and cu_seqlens is None and dfinal is None:
        # the common path's kernels, on grouped-head views (dq, dk summed over each group)
        from hodlr.backends import grouped_heads

        Hqk, grp = q.shape[1], v.shape[1] // q.shape[1]
        out = _grouped_buffers(Hqk, grp, q, q, v, level_scales)  # dq, dk through one set of strides
        dq, dk, dv, dlam, dg = kernels.attention_backward(*grouped_heads(q, k, v, level_scales, log_decay), scale,
                                                          do.unflatten(1, (Hqk, grp)), out=out, states=saved)
        return (_sum_groups(dq), _sum_groups(dk), dv.flatten(1, 2), dlam.flatten(1, 2),
                None if dg is None else dg.flatten(1, 2), None)
    return kernels.attention_state_backward(q, k, v, level_scales, log_decay, scale, do, dfinal,
                                            initial_state=initial_state, initial_positions=initial_positions,
                                            cu_seqlens=cu_seqlens)
