"""Backward of the HODLR matmul ``Y = M @ X`` through the attention backward kernels.

``M @ X`` is exactly log-linear attention with ``q = k = 1`` (``Dk = 1``, ``scale = 1``):
``(M ⊙ 1 1ᵀ) X = M X``.  So ``dX = dV``, ``dλ`` and ``dg`` of that attention are the
matmul's gradients, exactly (``dG[t] = dq_t − dk_t`` with unit ``q, k``); the unit
``q, k`` gradients are discarded.  No separate kernel, no dense fallback.
"""

from __future__ import annotations

import torch

from ._layout import check_tensor
from .attention_backward import attention_backward


def matmul_backward(level_scales, log_decay, x, dy, *, chunk=None):
    """Gradients of ``Y = M @ X`` for the cotangent ``dy``.

    Parameters
    ----------
    level_scales : torch.Tensor, shape ``(*batch, T, L)``
    log_decay : torch.Tensor, shape ``(*batch, T)``, or None
    x, dy : torch.Tensor, shape ``(*batch, T, D)``
        Leading dims broadcast (``dy``'s to the inputs' broadcast batch).
    chunk : int, optional
        Power of two in ``[16, 256]``; default ``DEFAULT_CHUNK["attention"]`` (64: the backward runs
        the attention's kernels), not the matmul forward's.

    Returns
    -------
    (dx, dlevel_scales, dlog_decay)
        Of shape ``(*batch, T, ·)`` with the inputs' broadcast batch (a broadcast input's gradient is
        not summed back to its own shape), in the inputs' dtypes (``dlog_decay`` None without decay).
    """
    check_tensor("x", x, "T, D")
    check_tensor("dy", dy, "T, D")
    if tuple(dy.shape[-2:]) != tuple(x.shape[-2:]):
        raise ValueError(f"dy must have shape (*batch, T, D) with (T, D) = {tuple(x.shape[-2:])} (those of x), "
                         f"got {tuple(dy.shape)}")
    ones = torch.ones((1,) * (x.dim() - 2) + (x.shape[-2], 1), dtype=x.dtype, device=x.device)
    ones = ones.expand(tuple(x.shape[:-1]) + (1,))
    _, _, dx, dlam, dg = attention_backward(ones, ones, x, level_scales, log_decay, 1.0, dy, chunk=chunk)
    return dx, dlam, dg
