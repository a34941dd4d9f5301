"""The formulas of the log-linear mask, as functions of its generators.

Everything that several modules compute from the generators ``level_scales (..., T, L)``
and ``log_decay (..., T)`` (or ``None``) is defined here, once: the decay matrix, the
anchored rank-1 factors of the off-diagonal blocks, the dense assembly and the memory it
needs, and the conversion of generators to numpy.  Every function takes numpy arrays or
torch tensors (any device; autograd passes through) and returns the library, dtype and
device of its input; batch dimensions broadcast.

This module sits below :mod:`hodlr.mask`, :mod:`hodlr.sparse`, :mod:`hodlr.tree`,
:mod:`hodlr.display` and the backends: it imports only :mod:`hodlr.fenwick`,
:mod:`hodlr.errors` and :mod:`hodlr.options`, so those modules share the formulas without
importing one another.  It does not validate: :class:`hodlr.LogLinearMask` and the public
functions check their inputs before anything here runs.
"""

from __future__ import annotations

import numpy as np

from hodlr import fenwick
from hodlr.errors import DenseTooLargeError
from hodlr.fenwick.arrays import as_like, is_torch, namespace, reverse_cumsum, to_numpy, zeros
from hodlr.options import options

__all__ = [
    "as_numpy",
    "batch_shape",
    "block_col_factors",
    "block_row_factors",
    "check_dense_budget",
    "decay_matrix",
    "dense_bytes",
    "dense_mask",
    "itemsize",
    "numpy_dtype",
    "tie_decay",
]

STEP_BYTES = 16 * 2**20
"""The dense assembly works on slabs of rows whose temporaries stay under the larger of
this and a quarter of the result (and under the budget)."""

INDEX_BYTES_PER_ENTRY = 64
"""Bytes per entry of a slab for its level and gather indices (int64, with the temporaries
of :func:`hodlr.fenwick.level`), independent of the batch."""

VALUE_ARRAYS_PER_ENTRY = 4
"""Slab-sized value arrays alive at once while a slab is assembled (gathered scales, the
masked decay terms and their cumulative sum, its exponential, the product)."""


def batch_shape(level_scales, log_decay) -> tuple:
    """The broadcast batch shape of ``level_scales (..., T, L)`` and ``log_decay (..., T)``."""
    shapes = [tuple(level_scales.shape[:-2])]
    if log_decay is not None:
        shapes.append(tuple(log_decay.shape[:-1]))
    return tuple(np.broadcast_shapes(*shapes))


def itemsize(x) -> int:
    """Bytes per element of the numpy array or torch tensor ``x``."""
    return x.element_size() if is_torch(x) else x.dtype.itemsize


def decay_matrix(log_decay, T: int):
    """``(..., T, T)`` matrix with ``exp(sum(log_decay[s+1 .. t]))`` for ``s <= t``, 0 above.

    Each entry is summed from its own terms (a masked cumulative sum), not as a difference
    of two prefix sums, so it is accurate to rounding in the exponent even when ``G``
    itself is huge.  ``log_decay`` of ``None`` gives the lower-triangular ones matrix
    (a float64 numpy ``(T, T)`` array).

    Parameters
    ----------
    log_decay : array, shape ``(..., T)``, or None
        numpy or torch; the result has its library, dtype and device.
    T : int

    Examples
    --------
    >>> decay_matrix(np.log([1.0, 0.5, 0.5]), 3)
    array([[1.  , 0.  , 0.  ],
           [0.5 , 1.  , 0.  ],
           [0.25, 0.5 , 1.  ]])
    """
    if log_decay is None:
        return np.tril(np.ones((T, T)))
    if log_decay.shape[-1] != T:
        raise ValueError(f"log_decay must have shape (..., T) with T={T}, got shape {tuple(log_decay.shape)}")
    idx = np.arange(T)
    xp = namespace(log_decay)
    causal = as_like(idx[:, None] >= idx[None, :], log_decay)
    exponent = _decay_exponents(log_decay, idx, None)[0]
    return xp.where(causal, xp.exp(exponent), zeros((), log_decay))


def _decay_exponents(log_decay, rows, carry):
    """``(exponent, last row)``: ``exponent[..., i, s] = carry[..., s] + sum(log_decay[s+1 .. t])``
    for ``t = rows[i]`` (0 where ``s >= t``), summed term by term down each column from the
    carried row ``carry (..., T)`` (``None``: zeros), so a slab continues the sums of the rows
    before it in the same order."""
    xp = namespace(log_decay)
    T = log_decay.shape[-1]
    below = as_like(rows[:, None] > np.arange(T)[None, :], log_decay)
    terms = xp.where(below, log_decay[..., rows, None], zeros((), log_decay))
    if carry is not None:
        terms = xp.concatenate([carry[..., None, :], terms], -2)
    exponent = xp.cumsum(terms, -2)
    del terms
    if carry is not None:
        exponent = exponent[..., 1:, :]
    last = exponent[..., -1, :]
    return exponent, last.clone() if is_torch(last) else last.copy()


def _nodes(x, T: int, lev: int):
    """``x (..., T)`` zero-padded to whole level-``lev`` nodes and viewed as
    ``(..., n, 2, 2**(lev-1))``: ``[..., j, 0, :]`` the columns of node ``j``'s block,
    ``[..., j, 1, :]`` its rows."""
    size = 1 << lev
    n = -(-T // size)
    pad = n * size - T
    if pad:
        x = namespace(x).concatenate([x, zeros(x.shape[:-1] + (pad,), x)], -1)
    return x.reshape(x.shape[:-1] + (n, 2, size // 2))


def block_row_factors(level_scales, log_decay, lev: int):
    """``u`` of the level-``lev`` blocks, shape ``(*batch, n, 2**(lev-1))``:
    ``u[t] = level_scales[t, lev] * exp(G[t] - G[m-1])`` on the rows ``m + i`` of node ``j``
    (``m = j 2**lev + 2**(lev-1)``; 0 on padding past ``T``).  The exponent is summed inside
    the block.  ``batch`` is that of ``level_scales`` broadcast with ``log_decay``'s."""
    T = level_scales.shape[-2]
    lam_rows = _nodes(level_scales[..., lev], T, lev)[..., 1, :]
    if log_decay is None:
        return lam_rows
    xp = namespace(log_decay)
    return lam_rows * xp.exp(xp.cumsum(_nodes(log_decay, T, lev)[..., 1, :], -1))


def block_col_factors(level_scales, log_decay, lev: int):
    """``v`` of the level-``lev`` blocks, shape ``(*batch_g, n, 2**(lev-1))``:
    ``v[s] = exp(G[m-1] - G[s])`` on the columns ``j 2**lev + i`` of node ``j`` (0 on padding
    past ``T``).  ``batch_g`` is ``log_decay``'s batch; without decay ``v`` is 1 on every real
    column and has no batch dimensions.  The dtype and device are ``level_scales``'."""
    T = level_scales.shape[-2]
    size = 1 << lev
    n = -(-T // size)
    # 1 on real columns, 0 on padding ones (the left half of a last node lying past T)
    cols_in = as_like((np.arange(n * size) < T).reshape(n, 2, size // 2)[:, 0, :], level_scales,
                      dtype=level_scales.dtype)
    if log_decay is None:
        return cols_in
    xp = namespace(log_decay)
    left = _nodes(log_decay, T, lev)[..., 0, :]
    col_exp = xp.concatenate(
        [reverse_cumsum(left[..., 1:]), zeros(left.shape[:-1] + (1,), left)],
        -1,
    )
    return xp.exp(col_exp) * cols_in if n * size > T else xp.exp(col_exp)


def tie_decay(out, log_decay):
    """``out``, tied with weight zero to a ``log_decay`` that no formula read: at ``T = 1``
    (``log_decay[..., 0]`` never enters the mask) a torch ``log_decay`` that requires grad then
    gets a zero gradient, as from the backends whose formulas touch it, not ``None``.  ``out``
    has ``log_decay``'s dtype; anything else is returned as it is."""
    if log_decay is None or log_decay.shape[-1] != 1 or not is_torch(log_decay) or not log_decay.requires_grad:
        return out
    return out + 0 * log_decay[..., None]


def _slab_bytes(rows: int, T: int, batch_size: int, nbytes: int) -> int:
    """Temporaries of assembling ``rows`` rows of a dense mask."""
    return rows * T * (INDEX_BYTES_PER_ENTRY + VALUE_ARRAYS_PER_ENTRY * batch_size * nbytes)


def _fixed_bytes(T: int, L: int, batch_size: int, nbytes: int) -> int:
    """What the assembly holds besides the slabs: the level scales with a zero column, the
    carried decay row and a few length-``T`` index arrays."""
    return batch_size * T * (L + 5) * nbytes + INDEX_BYTES_PER_ENTRY * T


def _plan(batch, T: int, L: int, nbytes: int, arrays: int) -> tuple[int, int]:
    """``(rows per slab, bytes needed at the peak)`` of a dense assembly whose caller holds
    ``arrays`` dense ``(*batch, T, T)`` arrays at once (the mask included): the largest slab
    whose temporaries stay under ``max(STEP_BYTES, result / 4)`` and the budget."""
    batch_size = int(np.prod(batch, dtype=np.int64))
    result = batch_size * T * T * nbytes
    fixed = arrays * result + _fixed_bytes(T, L, batch_size, nbytes)
    per_row = _slab_bytes(1, T, batch_size, nbytes)
    room = min(max(STEP_BYTES, result // 4), options.dense_max_bytes - fixed)
    rows = int(min(T, max(1, room // per_row)))
    return rows, fixed + rows * per_row


def dense_bytes(batch, T: int, itemsize: int, arrays: int = 1, L: int | None = None) -> int:
    """Bytes the dense path allocates at its peak for a ``(*batch, T, T)`` mask of
    ``itemsize``-byte elements, from ``L`` level scales per row (default ``num_levels(T)``),
    when its caller holds ``arrays`` such arrays at once: the arrays themselves plus the
    temporaries of assembling the mask a slab of rows at a time."""
    L = fenwick.num_levels(T) if L is None else int(L)
    return _plan(tuple(batch), int(T), L, int(itemsize), int(arrays))[1]


DENSE_INSTEAD = "'recursive', 'sparse', 'fenwick' or 'chunked'"
"""The backends a refused dense path suggests (those of every operation of the mask)."""


def check_dense_budget(batch, T: int, itemsize: int, what: str, arrays: int = 1, L: int | None = None,
                       instead: str = DENSE_INSTEAD) -> int:
    """Refuse, before allocating, a dense path over ``options.dense_max_bytes`` (see
    :func:`dense_bytes`), suggesting the backends ``instead`` (None: a call that takes no backend,
    for which the message suggests a smaller size); return the rows per slab of the assembly."""
    L = fenwick.num_levels(T) if L is None else int(L)
    rows, need = _plan(tuple(batch), int(T), L, int(itemsize), int(arrays))
    if need > options.dense_max_bytes:
        raise DenseTooLargeError(
            f"{what}: a dense mask of shape {tuple(batch) + (T, T)} needs about {need / 2**30:.2f} GiB, "
            f"over hodlr.options.dense_max_bytes = {options.dense_max_bytes / 2**30:.2f} GiB; "
            + (f"use backend={instead} instead, or raise the budget" if instead else
               "make it for a smaller T or batch, or raise the budget")
        )
    return rows


def dense_mask(level_scales, log_decay, what: str, arrays: int = 1, instead: str = DENSE_INSTEAD):
    """The mask as a dense ``(*batch, T, T)`` array (the library, dtype and device of
    ``level_scales``; ``batch`` broadcast from both generators).

    Checked against the budget first (:func:`check_dense_budget`; ``arrays`` counts the
    dense arrays the caller will hold at once, this one included; ``instead`` names the backends
    a refusal suggests), then assembled a slab of
    rows at a time: entry ``(t, s)`` is ``level_scales[t, level(t, s)]`` times the decay
    ``exp(sum(log_decay[s+1 .. t]))`` summed down its column from its own terms, and 0 above
    the diagonal.
    """
    T, L = level_scales.shape[-2:]
    batch = batch_shape(level_scales, log_decay)
    step = check_dense_budget(batch, T, itemsize(level_scales), what, arrays, L, instead)
    xp = namespace(level_scales)
    # one zero column after the scales: entries above the diagonal gather it
    padded = xp.concatenate([level_scales, zeros(tuple(level_scales.shape[:-1]) + (1,), level_scales)], -1)
    flat = padded.reshape(tuple(padded.shape[:-2]) + (T * (L + 1),))
    if is_torch(level_scales):
        out = xp.empty(batch + (T, T), dtype=level_scales.dtype, device=level_scales.device)
    else:
        out = np.empty(batch + (T, T), dtype=level_scales.dtype)
    idx = np.arange(T)
    carry = None
    for start in range(0, T, step):
        rows = idx[start : start + step]
        lev = fenwick.level(rows[:, None], idx[None, :])
        index = rows[:, None] * (L + 1) + np.where(lev < 0, L, lev)
        del lev
        values = flat[..., as_like(index, level_scales)]
        del index
        if log_decay is not None:
            exponent, carry = _decay_exponents(log_decay, rows, carry)
            values = values * xp.exp(exponent)
            del exponent
        out[..., start : start + rows.size, :] = values
        del values
    return out


def numpy_dtype(dtype) -> np.dtype:
    """The numpy dtype numpy-side code computes in for ``dtype`` (float64 stays float64;
    float32 and the 16-bit torch dtypes become float32)."""
    if isinstance(dtype, np.dtype) or dtype in (np.float32, np.float64):
        return np.dtype(dtype)
    import torch

    return np.dtype(np.float64) if dtype == torch.float64 else np.dtype(np.float32)


def as_numpy(x, dtype):
    """``x`` (numpy or torch, any device) as a numpy array of ``dtype``; ``None`` stays
    ``None``."""
    if x is None:
        return None
    if is_torch(x) and x.dtype.itemsize < 4:
        x = x.float()
    return np.asarray(to_numpy(x), dtype=dtype)
