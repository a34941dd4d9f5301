"""Input validation shared by the public API.  Every message names the argument, what
it got and what was expected."""

from __future__ import annotations

import contextlib
import functools
import sys

import numpy as np

from hodlr.fenwick.arrays import check_scale, describe, is_torch, namespace

__all__ = [
    "as_array",
    "check_scale",
    "broadcast_batch",
    "check_float_dtype",
    "check_same_home",
    "describe",
    "library_of",
    "numpy_operand",
    "over_columns",
    "operand_dtype_ok",
    "without_autocast",
]

NUMPY_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


def without_autocast(fn):
    """``fn`` run with ``torch.autocast`` turned off where the caller turned it on (CPU, CUDA): every
    public operation computes in its inputs' dtypes with its own float32 accumulation, as its
    kernels do.  Under autocast the torch backends' products would otherwise run in the autocast
    dtype (a float32 call then carries bfloat16's error, 4e-3 instead of 1e-7) and their states in a
    dtype the state refuses.  A ``backward()`` called inside the autocast block runs the backward of
    torch operations in the autocast dtype (PyTorch's own rule): call it outside, as PyTorch
    recommends."""

    @functools.wraps(fn)
    def call(*args, **kwargs):
        torch = sys.modules.get("torch")  # (not imported: no autocast can be on)
        if torch is None:
            return fn(*args, **kwargs)
        cpu, cuda = torch.is_autocast_enabled("cpu"), torch.is_autocast_enabled("cuda")
        if not (cpu or cuda):
            return fn(*args, **kwargs)
        with torch.autocast("cpu", enabled=False) if cpu else contextlib.nullcontext():
            with torch.autocast("cuda", enabled=False) if cuda else contextlib.nullcontext():
                return fn(*args, **kwargs)

    return call


def numpy_operand(name: str, x, owner: str, layout: str = "(T,), (T, D) or (..., T, D)"):
    """``x`` as a plain numpy array for ``owner`` (a class that computes with numpy): lists and
    numbers converted, torch tensors and masked arrays refused (one would come back as numpy, the
    other's masked entries read as whatever they hold)."""
    _refuse_masked(name, x, f"a plain numpy array of shape {layout}")
    if not isinstance(x, (np.ndarray, list, tuple, int, float)):
        raise TypeError(f"{name} must be a numpy array of shape {layout} (a {owner} computes with numpy), got "
                        f"{describe(x)}")
    return np.asarray(x)


def over_columns(name: str, X: np.ndarray, T: int, product):
    """``product`` (a map of ``(T, C)`` numpy arrays to ``(T, C)``) applied to ``X`` of shape ``(T,)``,
    ``(T, D)`` or ``(..., T, D)``, the leading dims taken as more columns; the result in ``X``'s
    shape.  ``name`` names ``X`` in the refusal of another length."""
    if X.ndim == 0 or X.shape[-1 if X.ndim == 1 else -2] != T:
        raise ValueError(f"{name} must have shape (T,), (T, D) or (..., T, D) with T={T}, got shape {X.shape}")
    if X.ndim == 1:
        return product(X[:, None])[:, 0]
    lead, D = X.shape[:-2], X.shape[-1]
    out = product(np.moveaxis(X, -2, 0).reshape(T, -1))
    return np.moveaxis(out.reshape((T,) + lead + (D,)), 0, -2)


def _refuse_masked(name: str, x, wanted: str) -> None:
    """Refuse a numpy masked array (its masked entries would be read as whatever they hold)."""
    if isinstance(x, np.ma.MaskedArray):
        raise TypeError(f"{name} must be {wanted}, got a numpy masked array; fill it first (x.filled(value))")


def library_of(x) -> str:
    return "torch" if is_torch(x) else "numpy"


def as_array(name: str, x, min_ndim: int, layout: str):
    """Return ``x`` as a numpy array or torch tensor with at least ``min_ndim`` dims.

    Lists and scalars become numpy arrays.  ``layout`` is the expected shape in words,
    used in the error message (for example ``"(..., T, D)"``).
    """
    if x is None:
        raise TypeError(f"{name} must be an array of shape {layout}, got None")
    if not is_torch(x) and not isinstance(x, np.ndarray):
        if isinstance(x, (list, tuple, float, int)):
            x = np.asarray(x)
        else:
            raise TypeError(
                f"{name} must be a numpy.ndarray or torch.Tensor of shape {layout}, "
                f"got {type(x).__name__}"
            )
    _refuse_masked(name, x, f"a plain numpy.ndarray or torch.Tensor of shape {layout}")
    if isinstance(x, np.ndarray) and type(x) is not np.ndarray:  # np.matrix and other subclasses
        x = np.asarray(x)
    check_float_dtype(name, x)
    if x.ndim < min_ndim:
        raise ValueError(
            f"{name} must have shape {layout} (at least {min_ndim} dims), got shape {tuple(x.shape)}"
        )
    return x


def check_float_dtype(name: str, x) -> None:
    if is_torch(x):
        if not x.dtype.is_floating_point or x.dtype.itemsize < 2:  # float8 formats: no arithmetic on them
            raise TypeError(
                f"{name} must have a real floating dtype (float16, bfloat16, float32, float64), "
                f"got {x.dtype}"
            )
    elif x.dtype not in NUMPY_FLOATS:
        raise TypeError(f"{name} must have dtype float32 or float64, got {x.dtype}")


def check_same_home(named: dict) -> None:
    """All arrays must live in one library and, for torch, on one device."""
    items = [(k, v) for k, v in named.items() if v is not None]
    first_name, first = items[0]
    for name, x in items[1:]:
        if library_of(x) != library_of(first):
            raise TypeError(
                f"{name} is a {library_of(x)} array but {first_name} is a {library_of(first)} "
                f"array; pass both as numpy arrays or both as torch tensors "
                f"(got {describe(x)} and {describe(first)})"
            )
        if is_torch(x) and x.device != first.device:
            raise ValueError(
                f"{name} is on device {x.device} but {first_name} is on {first.device}; "
                f"move them to one device"
            )


def operand_dtype_ok(mask_dtype, operand_dtype) -> bool:
    """The mask's dtype must equal the operands', or be float32 for half operands."""
    if mask_dtype == operand_dtype:
        return True
    if is_torch_dtype(operand_dtype):
        import torch

        return mask_dtype == torch.float32 and operand_dtype in (torch.float16, torch.bfloat16)
    return False


def is_torch_dtype(dtype) -> bool:
    return type(dtype).__module__.startswith("torch")


def broadcast_batch(named_shapes: dict) -> tuple:
    """Broadcast the batch shapes in ``named_shapes`` (name -> shape tuple) as torch.matmul
    does, or raise a ValueError naming them."""
    try:
        return tuple(np.broadcast_shapes(*[tuple(s) for s in named_shapes.values()]))
    except ValueError:
        listing = ", ".join(f"{k} {tuple(v)}" for k, v in named_shapes.items())
        raise ValueError(f"batch dimensions do not broadcast: {listing}") from None


def broadcast_to(x, shape):
    """A view of ``x`` broadcast to ``shape`` (no copy); a torch tensor that has that shape already
    is returned as it is (no view: no node in autograd's graph, whose backward would only pass the
    gradient on)."""
    if is_torch(x):
        return x if tuple(x.shape) == tuple(shape) else x.expand(*shape)
    return np.broadcast_to(x, shape)


def check_finite(name: str, x, where: str = "") -> None:
    xp = namespace(x)
    ok = bool(xp.isfinite(x).all())
    if not ok:
        raise ValueError(f"{name} must be finite{where}; it holds NaN or inf")


def needs_values(what: str, level_scales) -> None:
    """Refuse ``what`` on a mask whose ``level_scales`` are on the meta device (shapes only): it
    reads the values."""
    if is_meta(level_scales):
        raise ValueError(f"{what} reads the mask's values; a mask on the meta device holds none (only shapes)"
                         + ("; hodlr.spy(M, ranks=False) draws its structure" if what == "rank_profile" else ""))


def wants_grad(*tensors) -> bool:
    """Whether autograd is on and any of the torch tensors (``None`` skipped) requires grad."""
    import torch

    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def is_meta(x) -> bool:
    """True for torch tensors on the ``meta`` device (shapes only: no values to check)."""
    return is_torch(x) and x.device.type == "meta"
