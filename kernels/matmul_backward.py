"""Backward of the HODLR matmul ``Y = M @ X`` through the attention backward kernels.

``M @ X`` is exactly log-linear attention with ``q = k = 1`` (``Dk = 1``, ``scale = 1``):
``(M ⊙ 1 1ᵀ) X = M X``.  So ``dX = dV``, ``dλ`` and ``dg`` of that attention are the
matmul's gradients, exactly (``dG[t] = dq_t − dk_t`` with unit ``q, k``); the unit
``q, k`` gradients are discarded.  No separate kernel, no dense fallback.
"""

from __future__ import annotations

import torch

from .attention_backward import attention_backward


def matmul_backward(level_scales, log_decay, x, dy, *, chunk=None):
    """Gradients of ``Y = M @ X`` for the cotangent ``dy``.

    Parameters
    ----------
    level_scales : torch.Tensor, shape ``(*batch, T, L)``
    log_decay : torch.Tensor, shape ``(*batch, T)``, or None
    x, dy : torch.Tensor, shape ``(*batch, T, D)``
    chunk : int, optional

    Returns
    -------
    (dx, dlevel_scales, dlog_decay) shaped like the inputs (``dlog_decay`` None without decay).
    """
    ones = torch.ones((1,) * (x.dim() - 2) + (x.shape[-2], 1), dtype=x.dtype, device=x.device)
    ones = ones.expand(tuple(x.shape[:-1]) + (1,))
    _, _, dx, dlam, dg = attention_backward(ones, ones, x, level_scales, log_decay, 1.0, dy, chunk=chunk)
    return dx, dlam, dg
