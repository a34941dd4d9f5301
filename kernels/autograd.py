"""Differentiable Triton log-linear attention, matmul and Gated DeltaNet (``torch.autograd.Function``).

The forward passes are the launchers :func:`attention_forward`, :func:`matmul_forward` and
:func:`gated_delta_forward`; the backward passes are :func:`attention_backward`,
:func:`matmul_backward` and :func:`gated_delta_backward` (Triton kernels, no dense fallback).
Inputs are broadcast to one batch shape (views) before the Function sees them, so that
autograd sums the gradients of broadcast operands (grouped heads) back to their shapes.
"""

from __future__ import annotations

import torch

from ._layout import broadcast_shape
from .attention import attention_forward
from .matmul import matmul_forward
from .attention_backward import attention_backward
from .gated_delta import gated_delta_forward
from .gated_delta_backward import gated_delta_backward
from .matmul_backward import matmul_backward

__all__ = ["attention", "gated_delta", "matmul"]


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, level_scales, log_decay, scale, chunk):
        ctx.save_for_backward(q, k, v, level_scales, log_decay)
        ctx.scale, ctx.chunk = scale, chunk
        return attention_forward(q, k, v, level_scales, log_decay, scale, chunk=chunk)

    @staticmethod
    def backward(ctx, do):
        q, k, v, level_scales, log_decay = ctx.saved_tensors
        dq, dk, dv, dlam, dg = attention_backward(q, k, v, level_scales, log_decay, ctx.scale,
                                                  do, chunk=ctx.chunk)
        return dq, dk, dv, dlam, dg, None, None


class _Matmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, level_scales, log_decay, x, chunk):
        ctx.save_for_backward(level_scales, log_decay, x)
        ctx.chunk = chunk
        return matmul_forward(level_scales, log_decay, x, chunk=chunk)

    @staticmethod
    def backward(ctx, dy):
        level_scales, log_decay, x = ctx.saved_tensors
        dx, dlam, dg = matmul_backward(level_scales, log_decay, x, dy, chunk=ctx.chunk)
        return dlam, dg, dx, None


def _broadcast(tensors, batch):
    return [None if x is None else x.expand(batch + tuple(x.shape[len(x.shape) - tail:]))
            for x, tail in tensors]


def attention(q, k, v, level_scales, log_decay=None, scale: float = 1.0, *, chunk=None):
    """Differentiable :func:`attention_forward` (same arguments and result).

    Gradients flow to ``q, k, v, level_scales`` and ``log_decay``; never-read level scales
    get exactly 0.
    """
    batch = broadcast_shape(q.shape[:-2], k.shape[:-2], v.shape[:-2], level_scales.shape[:-2],
                            () if log_decay is None else log_decay.shape[:-1])
    q, k, v, level_scales, log_decay = _broadcast(
        [(q, 2), (k, 2), (v, 2), (level_scales, 2), (log_decay, 1)], batch)
    return _Attention.apply(q, k, v, level_scales, log_decay, float(scale), chunk)


def matmul(level_scales, log_decay, x, *, chunk=None):
    """Differentiable :func:`matmul_forward` (same arguments and result)."""
    batch = broadcast_shape(x.shape[:-2], level_scales.shape[:-2], () if log_decay is None else log_decay.shape[:-1])
    level_scales, log_decay, x = _broadcast([(level_scales, 2), (log_decay, 1), (x, 2)], batch)
    return _Matmul.apply(level_scales, log_decay, x, chunk)


class _GatedDelta(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, beta, level_scales, log_decay, scale, chunk):
        ctx.save_for_backward(q, k, v, beta, level_scales, log_decay)
        ctx.scale, ctx.chunk = scale, chunk
        return gated_delta_forward(q, k, v, beta, level_scales, log_decay, scale, chunk=chunk)

    @staticmethod
    def backward(ctx, do):
        q, k, v, beta, level_scales, log_decay = ctx.saved_tensors
        grads = gated_delta_backward(q, k, v, beta, level_scales, log_decay, ctx.scale, do, chunk=ctx.chunk)
        return (*grads, None, None)


def gated_delta(q, k, v, beta, level_scales, log_decay=None, scale: float = 1.0, *, chunk=None):
    """Differentiable :func:`gated_delta_forward` (same arguments and result).

    Gradients flow to ``q, k, v, beta, level_scales`` and ``log_decay`` (the Triton backward,
    :func:`gated_delta_backward`); never-read level scales get exactly 0.
    """
    batch = broadcast_shape(q.shape[:-2], k.shape[:-2], v.shape[:-2], beta.shape[:-1], level_scales.shape[:-2],
                            () if log_decay is None else log_decay.shape[:-1])
    q, k, v, beta, level_scales, log_decay = _broadcast(
        [(q, 2), (k, 2), (v, 2), (beta, 1), (level_scales, 2), (log_decay, 1)], batch)
    return _GatedDelta.apply(q, k, v, beta, level_scales, log_decay, float(scale), chunk)
