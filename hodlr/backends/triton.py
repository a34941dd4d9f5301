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


def gated_delta_prefill(q, k, v, beta, level_scales, log_decay, scale):
    """:func:`gated_delta_attention` from position 0 (no initial state, no gradient) that also
    returns the Fenwick bucket states after its last token: ``(o, states)``, ``states
    (*batch, bit_length(T), Dk, Dv)`` in the accumulator dtype (float32, float64 for float64
    inputs), slot ``l - 1`` holding level ``l`` (the ``state`` of the ``chunked`` backend's
    ``final_state``).  The forward's chunk hierarchy holds them: the buckets of levels above the
    chunk are its blocks moved across the later ones (:func:`hodlr.fenwick.delta.buckets_from_blocks`),
    those inside the last, partial chunk ``E (1_bucket ⊙ V)`` from that chunk's ``X``
    (``E = (diag(d) K)ᵀ X diag(β)``, docs/mathematics.md §13).  For a bfloat16 call the blocks
    come from the bfloat16 hierarchy that its outputs read (:data:`kernels.gated_delta.BF16_HIERARCHY`)."""
    import torch

    from hodlr import fenwick, kernels
    from hodlr.kernels._layout import level_offsets

    o, ch = kernels.gated_delta_forward(q, k, v, beta, level_scales, log_decay, scale, return_chunks=True)
    T, Dk, Dv = v.shape[-2], q.shape[-1], v.shape[-1]
    batch = tuple(o.shape[:-2])
    B = ch.X.shape[0]
    work = ch.X.dtype
    C, c = ch.C, ch.C.bit_length() - 1
    offsets = level_offsets(ch.n)
    top = len(offsets) - 2  # the highest stored level; its transitions are not formed (but level 0's are)
    eye = torch.eye(Dk, dtype=work, device=o.device)

    def state(h, m):
        if h <= top:
            return ch.states[:, offsets[h] + m].reshape(B, Dk, Dv).to(work)
        return transition(h - 1, 2 * m + 1) @ state(h - 1, 2 * m) + state(h - 1, 2 * m + 1)

    def transition(h, m):
        if h == 0 or h < top:
            R = ch.trans[:, offsets[h] + m].reshape(B, Dk, Dk).to(work)
            gamma = 1.0 if ch.decays is None else ch.decays[:, offsets[h] + m, None, None]
            return R + gamma * eye
        return transition(h - 1, 2 * m + 1) @ transition(h - 1, 2 * m)

    J = T >> c
    partial = None
    if T % C:  # the last chunk holds r = T - J C tokens: E = (diag(d) K)ᵀ X diag(β) over them
        r = T - J * C
        def last(x, tail):
            """Rows ``J C ..`` of ``x (*b, T, *tail)`` over the call's batch: ``(B, r, *tail)`` in ``work``."""
            x = x.narrow(x.dim() - 1 - tail, J * C, r)
            return x.expand(batch + x.shape[x.dim() - 1 - tail:]).reshape((B,) + x.shape[x.dim() - 1 - tail:]).to(work)

        K, V, b = last(k, 1), last(v, 1), last(beta, 0)
        d = torch.ones((B, r), dtype=work, device=o.device)
        if log_decay is not None:  # d_t = exp(g_{t+1} + ... + g_{r-1}), a sum of its own terms
            g = last(log_decay, 0)
            d = torch.exp(torch.nn.functional.pad(g[:, 1:].flip(1).cumsum(1).flip(1), (0, 1)))
        E = (d[..., None] * K).transpose(1, 2) @ ch.X[:, ch.n - 1, :r, :r] * b[:, None, :]  # (B, Dk, r)
        inside = torch.arange(r, device=o.device) + J * C

        def bucket(level, start):
            cols = ((inside >= start) & (inside < start + (1 << (level - 1)))).to(work)
            return E @ (cols[:, None] * V)

        partial = (bucket, transition(0, ch.n - 1))
    out = fenwick.delta.buckets_from_blocks(T, c, fenwick.num_slots(T), state, transition, partial)
    zero = torch.zeros((B, Dk, Dv), dtype=work, device=o.device)
    final = torch.stack([zero if S is None else S for S in out], 1)
    return o, final.reshape(batch + final.shape[1:])


def gated_delta_keeping_chunks(q, k, v, beta, level_scales, log_decay, scale):
    """The forward of :func:`gated_delta_vjp` on its layout (``q, k (N, Hqk, T, Dk)``,
    ``v (N, H, T, Dv)``, ``beta, log_decay (N, H, T)``, ``level_scales (N, H, T, L)``), also returning
    the forward's ``X``, ``W`` and hierarchy, which the vjp takes (``saved=``) instead of recomputing
    them: ``(o (N, H, T, Dv), X, W, states, trans, decays)``, shaped as :func:`kept_chunk_shapes`
    says (``decays`` None without ``log_decay``); the operator keeps them when :func:`keeps_chunks` is
    true.  What nothing writes nor reads (the entries past the hierarchy, the top level's transitions
    and decays) is zeroed: they are outputs of the operator, the same every call."""
    from hodlr import kernels
    from hodlr.backends import grouped_heads
    from hodlr.kernels._layout import level_offsets

    Hqk, grp = q.shape[1], v.shape[1] // q.shape[1]
    q5, k5, v5, lam5, g5 = grouped_heads(q, k, v, level_scales, log_decay)
    o, ch = kernels.gated_delta_forward(q5, k5, v5, beta.unflatten(1, (Hqk, grp)), lam5, g5, scale,
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
    from hodlr.backends import grouped_heads
    from hodlr.kernels import DEFAULT_CHUNK
    from hodlr.kernels.gated_delta import Chunks
    from hodlr.kernels.gated_delta_backward import MAX_BACKWARD_CHUNK

    Hqk, grp = q.shape[1], v.shape[1] // q.shape[1]
    q5, k5, v5, lam5, g5 = grouped_heads(q, k, v, level_scales, log_decay)
    if saved is None:  # any chunk gives the same gradients: the forward's where the backward runs at it
        chunks, chunk = None, min(DEFAULT_CHUNK["gated_delta"], MAX_BACKWARD_CHUNK)
    else:  # X is (batch, n, C, C)
        chunk = saved[0].shape[2]
        chunks = Chunks(*saved, chunk, saved[0].shape[1])
    out = _grouped_buffers(Hqk, grp, q, k, v, beta, level_scales, log_decay)
    dq, dk, dv, dbeta, dlam, dg = kernels.gated_delta_backward(q5, k5, v5, beta.unflatten(1, (Hqk, grp)), lam5, g5,
                                                               scale, do.unflatten(1, (Hqk, grp)), chunk=chunk,
                                                               chunks=chunks, out=out)
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
