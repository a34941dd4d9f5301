"""Triton backend: the chunked GPU kernels of :mod:`kernels` (forward).

Available for torch tensors on a CUDA device, and for CPU tensors when Triton's
interpreter is on (``TRITON_INTERPRET=1`` in the environment *before* ``triton`` is first
imported; that is how the CPU test-suite proves the kernels equal to the other backends).
float64 runs only under the interpreter; on the GPU, float32 uses IEEE dots and
float16 / bfloat16 accumulate in float32.  Chunk size: ``kernels.DEFAULT_CHUNK``.
When a gradient is wanted (grad mode on and an input that requires it) the call goes
through :mod:`kernels.autograd` (Triton backward kernels); otherwise straight to the
forward launchers.
"""

from __future__ import annotations

import importlib.util
import os

DESCRIPTION = "chunked Triton kernels (dense C x C blocks + Fenwick scan over chunk states), forward and backward; CUDA, or CPU under TRITON_INTERPRET=1"


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unavailable_reason(library, device):
    if library != "torch":
        return "needs torch tensors"
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    kind = getattr(device, "type", str(device))
    if kind == "cuda":
        return None
    if kind == "cpu" and _interpret():
        return None
    return "needs a CUDA device (or CPU tensors with TRITON_INTERPRET=1 set before triton is imported)"


def _wants_grad(*tensors) -> bool:
    import torch

    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def matmul(level_scales, log_decay, x):
    from hodlr import kernels

    if _wants_grad(level_scales, log_decay, x):
        return kernels.matmul(level_scales, log_decay, x)
    return kernels.matmul_forward(level_scales, log_decay, x)


def attention(q, k, v, level_scales, log_decay, scale):
    from hodlr import kernels

    if _wants_grad(q, k, v, level_scales, log_decay):
        return kernels.attention(q, k, v, level_scales, log_decay, scale)
    return kernels.attention_forward(q, k, v, level_scales, log_decay, scale)


def attention_state(q, k, v, level_scales, log_decay, scale, initial_state, initial_positions, cu_seqlens,
                    output_final_state):
    """The state-aware attention of the backend contract: ``hodlr.kernels.attention`` with its
    state and packed-sequence keywords (differentiable, same layout)."""
    from hodlr import kernels

    return kernels.attention(q, k, v, level_scales, log_decay, scale, initial_state=initial_state,
                             initial_positions=initial_positions, cu_seqlens=cu_seqlens,
                             output_final_state=output_final_state)
