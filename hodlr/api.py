"""The public operations: ``matmul(M, X)`` and ``attention(q, k, v, M)`` on any backend."""

from __future__ import annotations

from hodlr.fenwick.arrays import zeros
from hodlr import _checks, _deferred, backends as registry
from hodlr.mask import LogLinearMask

__all__ = ["attention", "matmul"]


def _check_mask(M):
    if not isinstance(M, LogLinearMask):
        raise TypeError(f"M must be a hodlr.LogLinearMask, got {type(M).__name__}")


def _check_operand_dtypes(M, named: dict):
    dtypes = {name: x.dtype for name, x in named.items()}
    first = next(iter(named))
    for name, dtype in dtypes.items():
        if dtype != dtypes[first]:
            raise TypeError(f"{name} has dtype {dtype} but {first} has {dtypes[first]}; they must match")
    if not _checks.operand_dtype_ok(M.dtype, dtypes[first]):
        raise TypeError(
            f"the mask has dtype {M.dtype} but {first} has {dtypes[first]}; they must match "
            "(a float32 mask may also serve float16 / bfloat16 operands)"
        )


def _check_length(M, named: dict):
    for name, x in named.items():
        if x.shape[-2] != M.T:
            raise ValueError(
                f"{name} must have shape (..., T, D) with T={M.T} (the mask's length), got shape {tuple(x.shape)}"
            )


def _empty(batch) -> bool:
    return any(n == 0 for n in batch)


def _resolve(backend, M, T, op: str):
    """The backend module that runs ``op`` for the mask ``M``."""
    if backend == "auto":
        backend = registry.auto_backend(M.library, M.device, T, op=op)
    return registry.get(backend, M.library, M.device, op=op)


def _mask_args(M, batch):
    lam = _checks.broadcast_to(M.level_scales, batch + tuple(M.level_scales.shape[-2:]))
    g = M.log_decay
    if g is not None:
        g = _checks.broadcast_to(g, batch + (M.T,))
    return lam, g


def matmul(M, X, *, backend: str = "auto"):
    """``Y = M @ X`` for a log-linear mask ``M``.

    Parameters
    ----------
    M : LogLinearMask
        The mask, batch shape ``batch_M``, length ``T``.
    X : array, shape ``(..., T, D)``
        numpy array or torch tensor, in the mask's library and on its device, with the
        mask's dtype (a float32 mask also serves float16 / bfloat16 operands).
    backend : str, default ``"auto"``
        One of ``hodlr.backends.NAMES`` (:func:`hodlr.backend_info` says where each can
        run); ``"auto"`` picks by the rule in :mod:`hodlr.backends`.

    Returns
    -------
    Y : array, shape ``(*broadcast(batch_M, X.shape[:-2]), T, D)``
        Same library, dtype and device as ``X``.  An empty batch (a dim of size 0) or
        ``D = 0`` is not an error: the result is empty, of this shape, and no backend runs.

    Examples
    --------
    >>> import numpy as np, hodlr
    >>> T = 5
    >>> M = hodlr.LogLinearMask(np.ones((T, hodlr.num_levels(T))))
    >>> X = np.arange(T, dtype=float)[:, None]
    >>> hodlr.matmul(M, X, backend="dense").ravel()          # running sums: no decay
    array([ 0.,  1.,  3.,  6., 10.])
    """
    _deferred.report()
    _check_mask(M)
    X = _checks.as_array("X", X, 2, "(..., T, D)")
    _checks.check_same_home({"M.level_scales": M.level_scales, "X": X})
    _check_operand_dtypes(M, {"X": X})
    _check_length(M, {"X": X})
    batch = _checks.broadcast_batch({"M": M.batch_shape, "X": tuple(X.shape[:-2])})
    module = _resolve(backend, M, M.T, "matmul")
    if _empty(batch) or X.shape[-1] == 0:
        return zeros(batch + tuple(X.shape[-2:]), X)
    lam, g = _mask_args(M, batch)
    X = _checks.broadcast_to(X, batch + tuple(X.shape[-2:]))
    return module.matmul(lam, g, X)


def attention(q, k, v, M, *, scale=None, backend: str = "auto"):
    """Log-linear attention ``O = (M ⊙ (scale · q kᵀ)) v`` (no softmax).

    Parameters
    ----------
    q, k : array, shape ``(..., T, Dk)``
    v : array, shape ``(..., T, Dv)``
        One library, device and dtype.  Leading dims broadcast against each other and the
        mask's batch shape (so ``q: (B, 1, T, Dk)`` serves ``v: (B, H, T, Dv)``).  From the
        ``(B, T, H, D)`` layout of flash-linear-attention use ``q.transpose(1, 2)``.
    M : LogLinearMask
        Length ``T``; its batch shape broadcasts with the operands'.
    scale : float, optional
        Multiplies ``q kᵀ``; default 1.
    backend : str, default ``"auto"``

    Returns
    -------
    O : array, shape ``(*batch, T, Dv)``, the library, dtype and device of ``v``.  An empty
        batch, ``Dv = 0`` or ``Dk = 0`` (empty dot products: all zeros) is not an error; no
        backend runs.

    Examples
    --------
    >>> import numpy as np, hodlr
    >>> T = 4
    >>> M = hodlr.LogLinearMask(np.ones((T, hodlr.num_levels(T))))
    >>> ones = np.ones((T, 1))
    >>> hodlr.attention(ones, ones, np.arange(T, dtype=float)[:, None], M).ravel()
    array([0., 1., 3., 6.])
    """
    _deferred.report()
    _check_mask(M)
    q = _checks.as_array("q", q, 2, "(..., T, Dk)")
    k = _checks.as_array("k", k, 2, "(..., T, Dk)")
    v = _checks.as_array("v", v, 2, "(..., T, Dv)")
    _checks.check_same_home({"M.level_scales": M.level_scales, "q": q, "k": k, "v": v})
    _check_operand_dtypes(M, {"q": q, "k": k, "v": v})
    _check_length(M, {"q": q, "k": k, "v": v})
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"q and k must share their last dim Dk: q has shape {tuple(q.shape)}, k has shape {tuple(k.shape)}"
        )
    scale = _checks.check_scale(scale)
    batch = _checks.broadcast_batch(
        {"M": M.batch_shape, "q": tuple(q.shape[:-2]), "k": tuple(k.shape[:-2]), "v": tuple(v.shape[:-2])}
    )
    module = _resolve(backend, M, M.T, "attention")
    if _empty(batch) or q.shape[-1] == 0 or v.shape[-1] == 0:
        return zeros(batch + tuple(v.shape[-2:]), v)
    lam, g = _mask_args(M, batch)
    q, k, v = (_checks.broadcast_to(a, batch + tuple(a.shape[-2:])) for a in (q, k, v))
    return module.attention(q, k, v, lam, g, scale)

