"""The mask in sparse form: ``M = diag(level_scales[:, 0]) + U V^T`` with scipy sparse ``U, V``.

Column ``b`` of ``U`` and ``V`` belongs to one off-diagonal block of the HODLR tree
(DESIGN.md "Sparse form"): the columns run level by level (``1 .. num_levels(T) - 1``)
and, within a level, by block index, as :func:`fenwick.blocks_at_level` enumerates them.
Column ``b`` of ``U`` holds the anchored row factor ``u`` on the block's rows and column
``b`` of ``V`` the column factor ``v`` on its columns, so the block is ``U[:, b] V[:, b]^T``.

Counts (exact, structural: an entry is stored even if its value happens to be 0):

* ``K = sum(num_blocks(T, l) for l in 1 .. num_levels(T) - 1)`` columns (``T - 1`` when
  ``T`` is a power of two);
* ``U.nnz = sum(popcount(t) for t < T)``: row ``t`` lies in one block per set bit of ``t``;
* ``V.nnz = sum(num_blocks(T, l) * 2**(l - 1))``: block columns are never clipped.

Both are ``O(T log T)``.  Nothing of size ``T x T`` is built.
"""

from __future__ import annotations

import functools

import numpy as np
import scipy.sparse

import fenwick
from fenwick.arrays import is_torch, to_numpy

__all__ = ["SparseMask", "mask_to_sparse", "sparse_structure"]


class SparseMask:
    """``diag(diagonal) + U V^T``: one (batch-free) log-linear mask in sparse form.

    Attributes
    ----------
    diagonal : numpy.ndarray, shape ``(T,)``
        ``level_scales[:, 0]``.
    U : scipy.sparse.csr_array, shape ``(T, K)``
        Row factors, one column per off-diagonal block.
    V : scipy.sparse.csc_array, shape ``(T, K)``
        Column factors (CSC, so ``V.T`` is CSR and ``V.T @ X`` is fast).
    levels : numpy.ndarray of int64, shape ``(K,)``
        The level of each column's block.

    Examples
    --------
    >>> import numpy as np, hodlr
    >>> T = 8
    >>> S = hodlr.LogLinearMask(np.ones((T, hodlr.num_levels(T)))).to_sparse()
    >>> S.T, S.K, S.U.nnz, S.V.nnz
    (8, 7, 12, 12)
    >>> S.levels
    array([1, 1, 1, 1, 2, 2, 3])
    >>> X = np.arange(T, dtype=float)[:, None]
    >>> S.matmul(X).ravel()                   # running sums (no decay, all scales 1)
    array([ 0.,  1.,  3.,  6., 10., 15., 21., 28.])
    """

    def __init__(self, diagonal, U, V, levels):
        self.diagonal = diagonal
        self.U = U
        self.V = V
        self.levels = levels

    @property
    def T(self) -> int:
        """Sequence length."""
        return int(self.diagonal.shape[0])

    @property
    def K(self) -> int:
        """Number of off-diagonal blocks (columns of ``U`` and ``V``)."""
        return int(self.levels.shape[0])

    @property
    def shape(self) -> tuple:
        """``(T, T)``."""
        return (self.T, self.T)

    @property
    def dtype(self):
        return self.diagonal.dtype

    @property
    def nnz(self) -> int:
        """Stored numbers: ``T`` (diagonal) ``+ U.nnz + V.nnz``."""
        return self.T + int(self.U.nnz) + int(self.V.nnz)

    def toarray(self) -> np.ndarray:
        """The dense ``(T, T)`` matrix ``diag(diagonal) + U V^T`` (for inspection)."""
        return np.diag(self.diagonal) + (self.U @ self.V.T).toarray()

    def matmul(self, X) -> np.ndarray:
        """``diag(diagonal) X + U (V^T X)`` for a numpy ``X`` of shape ``(T,)``, ``(T, D)``
        or ``(..., T, D)``; returns the same shape."""
        X = np.asarray(X)
        if X.ndim == 0 or X.shape[-1 if X.ndim == 1 else -2] != self.T:
            raise ValueError(f"X must have shape (T,), (T, D) or (..., T, D) with T={self.T}, got shape {X.shape}")
        if X.ndim == 1:
            return self.matmul(X[:, None])[:, 0]
        lead, D = X.shape[:-2], X.shape[-1]
        flat = np.moveaxis(X, -2, 0).reshape(self.T, -1)
        out = self.diagonal[:, None] * flat + self.U @ (self.V.T @ flat)
        return np.moveaxis(out.reshape((self.T,) + lead + (D,)), 0, -2)

    __matmul__ = matmul

    def __repr__(self) -> str:
        return (
            f"SparseMask(T={self.T}, K={self.K}, nnz(U)={self.U.nnz}, nnz(V)={self.V.nnz}, "
            f"dtype={self.dtype})"
        )


class SparseStructure:
    """Index arrays shared by every mask of length ``T`` (see :func:`sparse_structure`).

    ``U_indptr (K+1,)``, ``U_rows (nnz_U,)``, ``V_indptr (K+1,)``, ``V_rows (nnz_V,)``
    describe ``U`` and ``V`` in CSC layout; ``levels (K,)``; ``U_counts`` / ``V_counts``
    (one per level) say how many entries of the level's flattened factors to keep.
    """

    def __init__(self, T: int):
        self.T = T
        levels, u_rows, v_rows, u_counts, v_counts, u_cols, v_cols = [], [], [], [], [], [], []
        for lev in range(1, fenwick.num_levels(T)):
            row_start, row_stop, col_start, _ = fenwick.blocks_at_level(T, lev)
            half = 1 << (lev - 1)
            offsets = np.arange(half, dtype=np.int64)
            rows = row_stop - row_start
            levels.append(np.full(row_start.size, lev, dtype=np.int64))
            u_counts.append(int(rows.sum()))
            v_counts.append(row_start.size * half)
            u_rows.append((row_start[:, None] + offsets).ravel()[: u_counts[-1]])
            v_rows.append((col_start[:, None] + offsets).ravel())
            u_cols.append(rows)
            v_cols.append(np.full(row_start.size, half, dtype=np.int64))
        self.levels = _concat(levels)
        self.U_rows, self.V_rows = _concat(u_rows), _concat(v_rows)
        self.U_indptr = np.concatenate([[0], np.cumsum(_concat(u_cols))]).astype(np.int64)
        self.V_indptr = np.concatenate([[0], np.cumsum(_concat(v_cols))]).astype(np.int64)
        self.U_counts, self.V_counts = u_counts, v_counts
        for a in (self.levels, self.U_rows, self.V_rows, self.U_indptr, self.V_indptr):
            a.flags.writeable = False

    @property
    def K(self) -> int:
        return int(self.levels.size)


def _concat(parts):
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


@functools.lru_cache(maxsize=16)
def sparse_structure(T: int) -> SparseStructure:
    """The (cached, read-only) index arrays of the sparse form of a length-``T`` mask."""
    return SparseStructure(int(T))


def numpy_dtype(dtype) -> np.dtype:
    """The numpy dtype sparse code computes in for ``dtype`` (halves -> float32)."""
    if isinstance(dtype, np.dtype) or dtype in (np.float32, np.float64):
        return np.dtype(dtype)
    import torch

    return np.dtype(np.float64) if dtype == torch.float64 else np.dtype(np.float32)


def sparse_data(level_scales, log_decay):
    """Values of the sparse form, batched.

    Parameters
    ----------
    level_scales : array, shape ``(*batch, T, L)``; log_decay : array ``(*batch, T)`` or None
        numpy or torch (converted to numpy: float64 stays float64, other dtypes become
        float32).  The batch shapes must already agree.

    Returns
    -------
    diagonal : ``(*batch, T)``, U_data : ``(*batch, nnz_U)``, V_data : ``(*batch, nnz_V)``
        numpy arrays in the CSC order of :func:`sparse_structure`.
    """
    from hodlr.mask import LogLinearMask

    dtype = numpy_dtype(level_scales.dtype)
    lam = to_numpy(level_scales.float() if is_torch(level_scales) and level_scales.dtype.itemsize < 4 else level_scales)
    lam = lam.astype(dtype, copy=False)
    g = None if log_decay is None else np.asarray(to_numpy(log_decay.float() if is_torch(log_decay) and log_decay.dtype.itemsize < 4 else log_decay), dtype=dtype)
    mask = LogLinearMask(lam, g, validate=False)
    structure = sparse_structure(mask.T)
    batch = mask.batch_shape
    u_parts, v_parts = [], []
    for lev, (nu, nv) in enumerate(zip(structure.U_counts, structure.V_counts), start=1):
        u, v = mask.block_factors(lev)
        u_parts.append(u.reshape(batch + (-1,))[..., :nu])
        v_parts.append(v.reshape(batch + (-1,))[..., :nv])
    empty = np.zeros(batch + (0,), dtype=dtype)
    U_data = np.concatenate(u_parts, -1) if u_parts else empty
    V_data = np.concatenate(v_parts, -1) if v_parts else empty
    diagonal = np.broadcast_to(lam[..., 0], batch + (mask.T,))
    return diagonal, U_data, V_data


def block_diagonal(indptr, rows, data, T: int, K: int):
    """``scipy.sparse.csc_array`` of shape ``(B T, B K)``: the ``B`` matrices given by the
    shared CSC structure ``(indptr, rows)`` and ``data (B, nnz)`` on the diagonal."""
    B, nnz = data.shape
    shift = np.arange(B, dtype=np.int64)[:, None]
    big_rows = (rows[None, :] + T * shift).ravel()
    big_indptr = np.concatenate([(indptr[None, :-1] + nnz * shift).ravel(), [B * nnz]])
    return scipy.sparse.csc_array((data.ravel(), big_rows, big_indptr), shape=(B * T, B * K))


def mask_to_sparse(M):
    """The mask ``M`` as ``diag(level_scales[:, 0]) + U V^T`` (see the module docstring).

    Parameters
    ----------
    M : hodlr.LogLinearMask
        numpy or torch; torch masks are converted to numpy (float16 / bfloat16 to float32).

    Returns
    -------
    SparseMask
        If ``M.batch_shape == ()``.
    numpy.ndarray of object, shape ``M.batch_shape``
        Otherwise: one :class:`SparseMask` per batch element (they share index arrays).

    Examples
    --------
    >>> import numpy as np, hodlr
    >>> M = hodlr.LogLinearMask(np.ones((2, 5, 4)))
    >>> S = M.to_sparse()
    >>> S.shape, S[0].K, S[1].U.nnz
    ((2,), 4, 5)
    """
    structure = sparse_structure(M.T)
    diagonal, U_data, V_data = sparse_data(M.level_scales, M.log_decay)
    batch = M.batch_shape

    def one(index):
        U = scipy.sparse.csc_array((U_data[index], structure.U_rows, structure.U_indptr), shape=(M.T, structure.K))
        V = scipy.sparse.csc_array((V_data[index], structure.V_rows, structure.V_indptr), shape=(M.T, structure.K))
        return SparseMask(np.ascontiguousarray(diagonal[index]), U.tocsr(), V, structure.levels)

    if batch == ():
        return one(())
    out = np.empty(batch, dtype=object)
    for index in np.ndindex(*batch):
        out[index] = one(index)
    return out
