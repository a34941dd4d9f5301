"""The few helpers that let one formula run on numpy arrays and on torch tensors.

Code written against :func:`namespace` calls ``xp.exp``, ``xp.cumsum(x, -1)``,
``xp.where``, ``xp.einsum``, ``xp.flip(x, (-1,))`` and friends, which numpy and torch
spell alike when given positional arguments.  Creation functions differ (torch needs a
device), so they live here.  torch is never imported unless a tensor is passed in.  The checks of
integer and real-number arguments, :func:`check_int` and :func:`check_scale`, live here too: every
layer (``fenwick``, ``kernels``, ``hodlr``) may import them.
"""

from __future__ import annotations

import sys

import numpy as np

__all__ = ["is_torch", "namespace", "zeros", "as_like", "cast", "to_numpy", "describe", "check_bool", "check_int",
           "check_scale", "reverse_cumsum"]


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
    """A numpy view or copy of ``x`` (tensors are detached and moved to the CPU; bfloat16, which
    numpy lacks, becomes float32)."""
    if is_torch(x):
        x = x.detach()
        return (x.float() if x.dtype is namespace(x).bfloat16 else x).cpu().numpy()
    return np.asarray(x)


def cast(x, dtype):
    """``x`` converted to ``dtype`` (no copy when it already has it)."""
    return x.to(dtype) if is_torch(x) else x.astype(dtype, copy=False)


def reverse_cumsum(x, axis: int = -1):
    """``y[..., i] = Σ_{j >= i} x[..., j]`` along ``axis`` (numpy or torch): the suffix sums, each
    summed from its own terms.

    >>> reverse_cumsum(np.array([1.0, 2.0, 3.0]))
    array([6., 5., 3.])
    """
    xp = namespace(x)
    return xp.flip(xp.cumsum(xp.flip(x, (axis,)), axis), (axis,))


def describe(x) -> str:
    """Short text for error messages: library, shape, dtype and device (or the type name)."""
    if is_torch(x):
        return f"torch.Tensor(shape={tuple(x.shape)}, dtype={x.dtype}, device={x.device})"
    if isinstance(x, np.ndarray):
        return f"numpy.ndarray(shape={x.shape}, dtype={x.dtype})"
    return type(x).__name__


def check_bool(name: str, value) -> bool:
    """``value`` if it is a bool (Python or numpy), else a ``TypeError`` naming ``name``: a switch
    is not a truthy string, number or ``None``.

    >>> check_bool("validate", None)
    Traceback (most recent call last):
        ...
    TypeError: validate must be a bool, got NoneType
    """
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return bool(value)


def check_int(name: str, value, low: int | None = None) -> int:
    """``value`` as an ``int``: a Python or numpy integer (not a bool), ``>= low`` when ``low``
    is given.  A ``TypeError`` for anything else, a ``ValueError`` below ``low``; both name ``name``.

    Examples
    --------
    >>> check_int("T", np.int64(5), 1)
    5
    >>> check_int("T", 2.5)
    Traceback (most recent call last):
        ...
    TypeError: T must be an integer, got float
    >>> check_int("T", 0, 1)
    Traceback (most recent call last):
        ...
    ValueError: T must be an integer >= 1, got 0
    """
    wanted = "an integer" if low is None else f"an integer >= {low}"
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be {wanted}, got {type(value).__name__}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be {wanted}, got {value}")
    return int(value)


def check_scale(scale):
    """``None`` -> 1.0; a finite real number (Python, numpy scalar or 0-d array/tensor of a
    real dtype) -> ``float``; anything else raises.  (Under ``torch.compile`` a number traced from
    shapes, such as ``Dk ** -0.5`` with a dynamic ``Dk``, passes as a Python float does.)"""
    if scale is None:
        return 1.0
    if isinstance(scale, (bool, np.bool_)):
        raise TypeError(f"scale must be a real number or None, got {type(scale).__name__}")
    if not isinstance(scale, (int, float, np.floating, np.integer)):
        if getattr(scale, "ndim", None) != 0 or isinstance(scale, np.generic):
            raise TypeError(f"scale must be a real number or None, got {type(scale).__name__}")
        dtype = scale.dtype
        if is_torch(scale):  # a meta tensor has no value to read
            real = not dtype.is_complex and dtype != sys.modules["torch"].bool and scale.device.type != "meta"
        else:
            real = dtype.kind in "fiu"
        if not real:
            raise TypeError(f"scale must be a real number or None, got a 0-d array of dtype {dtype}")
        _check_scale_grad(scale)
        scale = scale.item()
    try:
        scale = float(scale)
    except OverflowError:
        raise ValueError(f"scale must be finite, got an integer of {int(scale).bit_length()} bits "
                         "(beyond float64)") from None
    if not scale - scale == 0:  # NaN and +-inf (a test torch.compile can trace on a symbolic float)
        raise ValueError(f"scale must be finite, got {scale}")
    return scale


def _check_scale_grad(scale) -> None:
    """A 0-d tensor ``scale`` that requires grad would lose its gradient in ``.item()``."""
    if is_torch(scale) and scale.requires_grad and sys.modules["torch"].is_grad_enabled():
        raise TypeError(
                "scale is a tensor that requires grad, but it is used as a Python float and would get no "
                "gradient; pass scale.detach() (or a float), or multiply q by the tensor instead"
            )
