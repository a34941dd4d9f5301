"""The few helpers that let one formula run on numpy arrays and on torch tensors.

Code written against :func:`namespace` calls ``xp.exp``, ``xp.cumsum(x, -1)``,
``xp.where``, ``xp.einsum``, ``xp.flip(x, (-1,))`` and friends, which numpy and torch
spell alike when given positional arguments.  Creation functions differ (torch needs a
device), so they live here.  torch is never imported unless a tensor is passed in.
"""

from __future__ import annotations

import sys

import numpy as np

__all__ = ["is_torch", "namespace", "zeros", "as_like", "cast", "to_numpy", "describe"]


def is_torch(x) -> bool:
    """True iff ``x`` is a ``torch.Tensor`` (without importing torch)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def namespace(x):
    """The module that computes on ``x``: ``torch`` for tensors, ``numpy`` otherwise."""
    return sys.modules["torch"] if is_torch(x) else np


def zeros(shape, like):
    """Zeros of ``shape`` with the library, dtype and device of ``like``."""
    if is_torch(like):
        return namespace(like).zeros(tuple(shape), dtype=like.dtype, device=like.device)
    return np.zeros(tuple(shape), dtype=like.dtype)


def as_like(a, like, dtype=None):
    """Convert the numpy array ``a`` to the library and device of ``like``.

    ``dtype`` defaults to ``a``'s own dtype (so index arrays stay integers).
    """
    if is_torch(like):
        torch = namespace(like)
        out = torch.as_tensor(np.ascontiguousarray(a), device=like.device)
        return out if dtype is None else out.to(dtype)
    return np.asarray(a) if dtype is None else np.asarray(a, dtype=dtype)


def to_numpy(x) -> np.ndarray:
    """A numpy view or copy of ``x`` (tensors are detached and moved to the CPU)."""
    if is_torch(x):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def cast(x, dtype):
    """``x`` converted to ``dtype`` (no copy when it already has it)."""
    return x.to(dtype) if is_torch(x) else x.astype(dtype, copy=False)


def describe(x) -> str:
    """Short text for error messages: library, shape, dtype and device (or the type name)."""
    if is_torch(x):
        return f"torch.Tensor(shape={tuple(x.shape)}, dtype={x.dtype}, device={x.device})"
    if isinstance(x, np.ndarray):
        return f"numpy.ndarray(shape={x.shape}, dtype={x.dtype})"
    return type(x).__name__
