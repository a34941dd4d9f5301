"""Differentiable Triton log-linear attention, matmul and Gated DeltaNet (``torch.autograd.Function``).

The forward passes are the launchers :func:`attention_forward` (:func:`attention_state_forward`
for calls with a state, packed sequences or grouped heads), :func:`matmul_forward` and
:func:`gated_delta_forward`; the backward passes are :func:`attention_backward`
(:func:`attention_state_backward`), :func:`matmul_backward` and :func:`gated_delta_backward`
(Triton kernels, no dense fallback).
Inputs are broadcast to one batch shape (views) before the Function sees them, so that
autograd sums the gradients of broadcast operands (grouped heads) back to their shapes.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from hodlr import fenwick
from hodlr.fenwick.arrays import check_int, check_scale

from ._layout import broadcast_shape, check_chunk, integer_tensor
from .attention import attention_forward, attention_state_forward
from .matmul import matmul_forward
from .attention_backward import attention_backward, attention_state_backward
from .bucket_states import bucket_pieces, bucket_states_backward, bucket_states_forward, check_buckets
from .carried_reads import carried_reads_backward, carried_reads_forward
from .gated_delta import Chunks, gated_delta_forward
from .gated_delta_backward import MAX_BACKWARD_CHUNK, gated_delta_backward
from .matmul_backward import matmul_backward

__all__ = ["attention", "bucket_states", "carried_reads", "gated_delta", "matmul"]


def _buffers_like(*inputs):
    """The backward kernels' ``out=``: for each input a buffer laid out like it (a view's gradient then
    has its base's layout: a ``(B, H, T, D)`` view of a ``(B, T, H, D)`` tensor gets a ``(B, T, H, D)``
    gradient, and adding it to ``.grad`` or to another gradient runs on contiguous memory, not strided:
    docs/distributed.md measures both); None for an absent or broadcast input (grouped heads' ``q``, ``k``), whose gradient
    comes per batch entry for autograd to sum."""
    return tuple(None if x is None or 0 in x.stride() else torch.empty_like(x) for x in inputs)


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, level_scales, log_decay, scale, chunk, check, save_states):
        ctx.scale, ctx.chunk = scale, chunk
        if not save_states:
            ctx.save_for_backward(q, k, v, level_scales, log_decay)
            return attention_forward(q, k, v, level_scales, log_decay, scale, chunk=chunk, check=check)
        o, (states, logdec) = attention_forward(q, k, v, level_scales, log_decay, scale, chunk=chunk, check=check,
                                                return_states=True)
        ctx.save_for_backward(q, k, v, level_scales, log_decay, states, logdec)
        return o

    @staticmethod
    @once_differentiable
    def backward(ctx, do):
        q, k, v, level_scales, log_decay, *states = ctx.saved_tensors
        dq, dk, dv, dlam, dg = attention_backward(q, k, v, level_scales, log_decay, ctx.scale, do, chunk=ctx.chunk,
                                                  out=_buffers_like(q, k, v, level_scales), states=states or None)
        return dq, dk, dv, dlam, dg, None, None, None, None


class _AttentionState(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, level_scales, log_decay, initial_state, scale, chunk, initial_positions, cu_seqlens,
                output_final_state):
        ctx.save_for_backward(q, k, v, level_scales, log_decay, initial_state, initial_positions, cu_seqlens)
        ctx.scale, ctx.chunk = scale, chunk
        out = attention_state_forward(q, k, v, level_scales, log_decay, scale, chunk=chunk,
                                      initial_state=initial_state, initial_positions=initial_positions,
                                      cu_seqlens=cu_seqlens, output_final_state=output_final_state)
        if not output_final_state:
            return out
        o, (final, positions) = out
        ctx.mark_non_differentiable(positions)
        return o, final, positions

    @staticmethod
    @once_differentiable
    def backward(ctx, do, dfinal=None, dpositions=None):
        q, k, v, level_scales, log_decay, initial_state, initial_positions, cu_seqlens = ctx.saved_tensors
        grads = attention_state_backward(q, k, v, level_scales, log_decay, ctx.scale, do, dfinal, chunk=ctx.chunk,
                                         initial_state=initial_state, initial_positions=initial_positions,
                                         cu_seqlens=cu_seqlens)
        return (*grads, None, None, None, None, None)


class _Matmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, level_scales, log_decay, x, chunk, check):
        ctx.save_for_backward(level_scales, log_decay, x)
        ctx.chunk = chunk
        return matmul_forward(level_scales, log_decay, x, chunk=chunk, check=check)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        level_scales, log_decay, x = ctx.saved_tensors
        dx, dlam, dg = matmul_backward(level_scales, log_decay, x, dy, chunk=ctx.chunk)
        return dlam, dg, dx, None, None


def _tensors(**named) -> None:
    """The kernels take torch tensors (``None`` where optional): a ``TypeError`` naming any other."""
    for name, x in named.items():
        if x is not None and not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")


def _broadcast(tensors, batch):
    """Each ``(x, tail)`` viewed with the batch shape ``batch`` (its last ``tail`` dims kept); a tensor
    that has that batch already is passed as it is (no view, no node in autograd's graph)."""
    return [x if x is None or tuple(x.shape[:len(x.shape) - tail]) == batch
            else x.expand(batch + tuple(x.shape[len(x.shape) - tail:])) for x, tail in tensors]


def attention(q, k, v, level_scales, log_decay=None, scale: float = 1.0, *, chunk=None, initial_state=None,
              initial_positions=None, cu_seqlens=None, output_final_state: bool = False, check=None,
              save_states: bool = True):
    """Differentiable log-linear attention: :func:`attention_forward` (its arguments and result, without
    ``out`` and ``return_states``),
    or, with a recurrent state, packed sequences, a final state or grouped heads,
    :func:`hodlr.kernels.attention_state_forward`.

    Without the keywords, ``q, k, v, level_scales, log_decay`` are ``(*batch, T, ·)`` and broadcast.
    With them (or with ``q, k (N, Hqk, T, Dk)`` serving ``v (N, H, T, Dv)``, ``1 < Hqk < H``): the
    layout of ``docs/models.md`` -- ``q, k (N, Hqk, T, Dk)``, ``v (N, H, T, Dv)``, ``level_scales
    (N, H, T, L)``, ``log_decay (N, H, T)``, ``initial_state (Nseq, H, S, Dk, Dv)`` float32 (float64
    for float64 inputs) with ``initial_positions (Nseq,)`` int64, ``cu_seqlens (Nseq + 1,)`` (then
    ``N == 1``); returns ``o (N, H, T, Dv)``, or ``(o, (states, positions))`` with
    ``output_final_state``.

    Gradients flow to ``q, k, v, level_scales``, ``log_decay`` and ``initial_state``; never-read
    level scales get exactly 0.  ``check`` (calls without the keywords): the validation flag of
    :func:`attention_forward`.

    ``save_states`` (calls without the keywords and without grouped heads): the forward keeps its
    chunk-state hierarchy for the backward, which then skips recomputing it (``docs/backward.md``
    §6: the float32 states, about ``8 Dk Dv / C`` bytes a token and head, 512 at ``Dk = Dv = 64``,
    beside the saved inputs); False: the backward recomputes the same states.  Calls with the
    keywords or grouped heads always recompute.
    """
    if not isinstance(save_states, bool):
        raise TypeError(f"save_states must be a bool, got {type(save_states).__name__}")
    _tensors(q=q, k=k, v=v, level_scales=level_scales, log_decay=log_decay)
    scale = check_scale(scale)
    grouped = (q.dim() == k.dim() == v.dim() == 4 and q.shape[1] == k.shape[1] and 1 < q.shape[1] < v.shape[1]
               and v.shape[1] % q.shape[1] == 0)
    if initial_state is not None or initial_positions is not None or cu_seqlens is not None or output_final_state \
            or grouped:
        if check is not None:
            raise ValueError("check is taken by calls without a state, packed sequences or grouped heads; "
                             "validate their inputs with kernels.checks.nonfinite_flag")
        out = _AttentionState.apply(q, k, v, level_scales, log_decay, initial_state, scale, chunk,
                                    initial_positions, cu_seqlens, bool(output_final_state))
        return (out[0], tuple(out[1:])) if output_final_state else out
    batch = broadcast_shape(q.shape[:-2], k.shape[:-2], v.shape[:-2], level_scales.shape[:-2],
                            () if log_decay is None else log_decay.shape[:-1])
    q, k, v, level_scales, log_decay = _broadcast(
        [(q, 2), (k, 2), (v, 2), (level_scales, 2), (log_decay, 1)], batch)
    return _Attention.apply(q, k, v, level_scales, log_decay, scale, chunk, check, save_states)


def matmul(level_scales, log_decay, x, *, chunk=None, check=None):
    """Differentiable :func:`matmul_forward` (its arguments and result, without ``out`` and
    ``return_states``)."""
    _tensors(level_scales=level_scales, log_decay=log_decay, x=x)
    batch = broadcast_shape(x.shape[:-2], level_scales.shape[:-2], () if log_decay is None else log_decay.shape[:-1])
    level_scales, log_decay, x = _broadcast([(level_scales, 2), (log_decay, 1), (x, 2)], batch)
    return _Matmul.apply(level_scales, log_decay, x, chunk, check)


class _GatedDelta(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, beta, level_scales, log_decay, scale, chunk, check, save_states):
        ctx.scale = scale
        chunk = check_chunk(chunk, "gated_delta")
        ctx.chunk = min(chunk, MAX_BACKWARD_CHUNK)  # any chunk: the same gradients
        if not save_states or ctx.chunk != chunk:
            ctx.save_for_backward(q, k, v, beta, level_scales, log_decay)
            return gated_delta_forward(q, k, v, beta, level_scales, log_decay, scale, chunk=chunk, check=check)
        o, ch = gated_delta_forward(q, k, v, beta, level_scales, log_decay, scale, chunk=chunk, check=check,
                                    return_chunks=True)
        ctx.save_for_backward(q, k, v, beta, level_scales, log_decay, ch.X, ch.W, ch.states, ch.trans, ch.decays)
        ctx.n = ch.n
        return o

    @staticmethod
    @once_differentiable
    def backward(ctx, do):
        q, k, v, beta, level_scales, log_decay, *kept = ctx.saved_tensors
        chunks = Chunks(*kept, ctx.chunk, ctx.n) if kept else None
        grads = gated_delta_backward(q, k, v, beta, level_scales, log_decay, ctx.scale, do, chunk=ctx.chunk,
                                     chunks=chunks, out=_buffers_like(q, k, v, beta, level_scales, log_decay))
        return (*grads, None, None, None, None)


def gated_delta(q, k, v, beta, level_scales, log_decay=None, scale: float = 1.0, *, chunk=None, check=None,
                save_states: bool = True):
    """Differentiable :func:`gated_delta_forward` (its arguments and result, without ``out`` and
    ``return_chunks``).

    Gradients flow to ``q, k, v, beta, level_scales`` and ``log_decay`` (the Triton backward,
    :func:`gated_delta_backward`, at ``min(chunk, MAX_BACKWARD_CHUNK)``: the gradients do not depend
    on the chunk); never-read level scales get exactly 0.

    ``save_states``: the forward keeps its ``X``, ``W`` and hierarchy (the ``Chunks`` of the module
    ``hodlr.kernels.gated_delta``) for the backward, which then skips recomputing them (when the
    forward's chunk is the backward's, ``chunk <= MAX_BACKWARD_CHUNK``; ``docs/kernels.md`` §7.2):
    ``4 (C + Dk) + 4 Dk (Dk + Dv) / C`` bytes a token and head for bfloat16 inputs (1,408 at
    ``Dk = Dv = 64``, 4,736 at 128, ``C = 32``), ``4 (C + Dk) + 8 Dk (Dk + Dv) / C`` for float16 and
    float32 (a float32 hierarchy), held until the backward runs; False: the backward recomputes
    the same values (the same gradients, bit for bit).  The backward is not itself differentiable.
    """
    if not isinstance(save_states, bool):
        raise TypeError(f"save_states must be a bool, got {type(save_states).__name__}")
    _tensors(q=q, k=k, v=v, beta=beta, level_scales=level_scales, log_decay=log_decay)
    scale = check_scale(scale)
    batch = broadcast_shape(q.shape[:-2], k.shape[:-2], v.shape[:-2], beta.shape[:-1], level_scales.shape[:-2],
                            () if log_decay is None else log_decay.shape[:-1])
    q, k, v, beta, level_scales, log_decay = _broadcast(
        [(q, 2), (k, 2), (v, 2), (beta, 1), (level_scales, 2), (log_decay, 1)], batch)
    return _GatedDelta.apply(q, k, v, beta, level_scales, log_decay, scale, chunk, check, save_states)


def _per_query_head(grad, x):
    """The gradient of ``x (B, T, Hqk, D)`` from ``grad (B, T, H, D)``, which holds one row per value
    head (each group of ``H // Hqk`` rows summed), in ``x``'s dtype."""
    B, T, Hqk, D = x.shape
    if grad.shape[2] != Hqk:
        grad = grad.view(B, T, Hqk, -1, D).sum(3)
    return grad.to(x.dtype)


class _BucketStates(torch.autograd.Function):
    @staticmethod
    def forward(ctx, k, v, log_weight, pieces, count, slots):
        ctx.save_for_backward(k, v, log_weight)
        ctx.pieces = pieces
        return bucket_states_forward(k, v, log_weight, pieces, count, slots)

    @staticmethod
    @once_differentiable
    def backward(ctx, dx):
        k, v, log_weight = ctx.saved_tensors
        dk, dv, da = bucket_states_backward(k, v, log_weight, ctx.pieces, dx)
        return _per_query_head(dk, k), dv, da.to(log_weight.dtype), None, None, None


def bucket_states(k, v, log_weight, buckets, count: int, slots: int):
    """The Fenwick bucket states of stretches of tokens (the module ``hodlr/kernels/bucket_states.py``), differentiable
    in ``k (B, T, Hqk, Dk)``, ``v (B, T, H, Dv)`` and ``log_weight (B, T, H)``.

    ``buckets``: rows ``(b, t0, n, i, j)`` (numpy or nested ints): the ``n`` tokens from ``t0`` of
    batch row ``b`` form slot ``j`` of sequence ``i`` (``0 <= i < count``, ``0 <= j < slots``); no token
    in two buckets (checked).  Returns ``(count, H, slots, Dk, Dv)`` float32 (float64 for float64
    inputs): ``Σ exp(log_weight_t) k_t v_tᵀ`` over each bucket's tokens, zero in slots no bucket fills."""
    count, slots = check_int("count", count, 0), check_int("slots", slots, 0)
    _tensors(k=k, v=v, log_weight=log_weight)
    rows = check_buckets(buckets, *(v.shape[:2] if v.dim() >= 2 else (0, 0)), count, slots)
    return _BucketStates.apply(k, v, log_weight, bucket_pieces(rows, v.device), count, slots)


class _CarriedReads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, o, q, level_scales, log_decay, states, live, scale):
        ctx.save_for_backward(q, level_scales, log_decay, states, live)
        ctx.scale = scale
        return carried_reads_forward(o, q, level_scales, log_decay, states, live, scale)

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        q, level_scales, log_decay, states, live = ctx.saved_tensors
        dq, dl, dg, dx = carried_reads_backward(q, level_scales, log_decay, states, live, ctx.scale, dout)
        return (dout, _per_query_head(dq, q), dl, None if dg is None else dg.to(log_decay.dtype), dx.to(states.dtype), None,
                None)


def carried_reads(o, q, level_scales, log_decay, states, positions, scale: float):
    """``o`` plus the reads of a carried state by a shard at an aligned position
    (the module ``hodlr/kernels/carried_reads.py``), differentiable in ``o, q, level_scales, log_decay, states``.

    ``o (B, T, H, Dv)``: the shard's output from position 0; ``q (B, T, Hqk, Dk)``;
    ``level_scales (B, T, H, L)``; ``log_decay (B, T, H)``: the log-decay summed from the state's
    position through each token (or None); ``states (B, H, S, Dk, Dv)``: the state;
    ``positions``: ``B`` ints, each row's position (a multiple of a power of two ``>= T``; its set
    bits are the live slots).  Returns ``(B, T, H, Dv)``."""
    _tensors(o=o, q=q, level_scales=level_scales, log_decay=log_decay, states=states)
    B, T = q.shape[:2]
    if isinstance(positions, torch.Tensor):
        if not integer_tensor(positions):
            raise TypeError(f"positions must hold integers, got a {positions.dtype} tensor")
        positions = positions.tolist()
    positions = [check_int(f"positions[{n}]", a) for n, a in enumerate(positions)]
    if len(positions) != B or any(a < 0 or not fenwick.aligned(a, T) for a in positions):
        raise ValueError(f"positions must hold {B} positions, each a multiple of a power of two >= T={T}, got "
                         f"{positions}")
    top = max(positions, default=0).bit_length()
    if top > states.shape[2] or top + 1 > level_scales.shape[-1]:
        raise ValueError(f"position {max(positions)} reads slots up to {top - 1} and levels up to {top}: states has "
                         f"{states.shape[2]} slots and level_scales {level_scales.shape[-1]} levels")
    live = torch.as_tensor(positions, dtype=torch.int64)
    live = live.pin_memory().to(q.device, non_blocking=True) if q.is_cuda else live.to(q.device)  # (no stall)
    return _CarriedReads.apply(o, q, level_scales, log_decay, states.contiguous(), live, check_scale(scale))
