"""The mask in sparse form: ``M = diag(level_scales[:, 0]) + U V^T`` with scipy sparse ``U, V``.

Column ``b`` of ``U`` and ``V`` belongs to one off-diagonal block of the HODLR tree
(docs/mathematics.md §5): the columns run level by level (``1 .. num_levels(T) - 1``)
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

import collections
import threading

import numpy as np

from hodlr import _checks, _formulas, fenwick

__all__ = ["CACHE_BYTES", "SparseMask", "clear_cache", "mask_to_sparse", "sparse_structure"]


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
        """The dense ``(T, T)`` matrix ``diag(diagonal) + U V^T`` (for inspection); refused
        (``DenseTooLargeError``), before allocating, over ``hodlr.options.dense_max_bytes`` (the
        product ``U V^T`` is formed sparse first: two arrays' worth)."""
        _formulas.check_dense_budget((), self.T, self.dtype.itemsize, "SparseMask.toarray", arrays=2, instead=None)
        out = (self.U @ self.V.T).toarray()
        out[np.diag_indices(self.T)] += self.diagonal
        return out

    def matmul(self, X) -> np.ndarray:
        """``diag(diagonal) X + U (V^T X)`` for a numpy ``X`` of shape ``(T,)``, ``(T, D)``
        or ``(..., T, D)``; returns the same shape."""
        return self._apply(X, "X", lambda flat: self.U @ (self.V.T @ flat))

    def rmatmul(self, Y) -> np.ndarray:
        """The transpose's product ``diag(diagonal) Y + V (U^T Y)`` (``O(T log T)`` per column) for a
        numpy ``Y`` of shape ``(T,)``, ``(T, D)`` or ``(..., T, D)``; returns the same shape.

        >>> import numpy as np, hodlr
        >>> S = hodlr.LogLinearMask(np.ones((4, 3))).to_sparse()
        >>> S.rmatmul(np.ones(4))                # column sums of the all-ones lower triangle
        array([4., 3., 2., 1.])
        """
        return self._apply(Y, "Y", lambda flat: self.V @ (self.U.T @ flat))

    def _apply(self, X, name: str, low_rank):
        """``diag(diagonal) X + low_rank(X)`` over the columns of ``X`` (any leading dims)."""
        X = _checks.numpy_operand(name, X, "SparseMask")
        return _checks.over_columns(name, X, self.T, lambda flat: self.diagonal[:, None] * flat + low_rank(flat))

    __matmul__ = matmul
    __array_ufunc__ = None  # (numpy arrays defer ``Y @ S`` to :meth:`__rmatmul__`)

    def __rmatmul__(self, Y):
        """``Y @ S`` for ``Y`` of shape ``(T,)`` or ``(..., D, T)``: ``(Sᵀ Yᵀ)ᵀ``."""
        Y = _checks.numpy_operand("Y", Y, "SparseMask", "(T,) or (..., D, T)")
        if Y.ndim == 1:
            return self.rmatmul(Y)
        return np.swapaxes(self.rmatmul(np.swapaxes(Y, -1, -2)), -1, -2)

    def aslinearoperator(self):
        """A ``scipy.sparse.linalg.LinearOperator`` of shape ``(T, T)``: ``matvec`` / ``matmat``
        by :meth:`matmul`, ``rmatvec`` / ``rmatmat`` (and so ``.T``, ``.H``, ``.adjoint()``) by
        :meth:`rmatmul`, each ``O(T log T)`` a column, for scipy's iterative solvers and
        ``scipy.sparse.linalg.aslinearoperator`` users.

        >>> import numpy as np, hodlr
        >>> A = hodlr.LogLinearMask(np.ones((4, 3))).to_sparse().aslinearoperator()
        >>> A @ np.ones(4), A.T @ np.ones(4)
        (array([1., 2., 3., 4.]), array([4., 3., 2., 1.]))
        """
        from scipy.sparse.linalg import LinearOperator

        return LinearOperator(self.shape, matvec=self.matmul, matmat=self.matmul, rmatvec=self.rmatmul,
                              rmatmat=self.rmatmul, dtype=self.dtype)

    def __repr__(self) -> str:
        return (
            f"SparseMask(T={self.T}, K={self.K}, nnz(U)={self.U.nnz}, nnz(V)={self.V.nnz}, "
            f"dtype={self.dtype})"
        )


class SparseStructure:
    """Index arrays shared by every mask of length ``T`` (see :func:`sparse_structure`).

    Attributes
    ----------
    levels : ``(K,)`` int64, the level of each column.
    U_indptr : ``(T + 1,)``, U_cols : ``(nnz_U,)``
        ``U`` in CSR layout (row ``t`` holds one entry per set bit of ``t``, by level).
    V_indptr : ``(K + 1,)``, V_rows : ``(nnz_V,)``
        ``V`` in CSC layout (column ``b`` holds its block's columns, in order).
    U_positions : list of ``(count,)`` int64 arrays, one per level
        Where the level's ``count`` kept entries of the flattened row factors
        ``u (nodes, half)`` go in ``U``'s CSR data.
    V_ranges : list of ``(start, stop)``, one per level
        The slice of ``V``'s CSC data that holds the level's flattened column factors.
    """

    def __init__(self, T: int):
        self.T = T
        L = fenwick.num_levels(T)
        t = np.arange(T, dtype=np.int64)
        popcount = np.zeros(T, dtype=np.int64)
        for b in range(L - 1):
            popcount += (t >> b) & 1
        self.U_indptr = np.concatenate([[0], np.cumsum(popcount)]).astype(np.int64)
        self.U_cols = np.empty(int(self.U_indptr[-1]), dtype=np.int64)
        filled = np.zeros(T, dtype=np.int64)
        levels, v_rows, v_counts, self.U_positions, self.V_ranges = [], [], [], [], []
        K = v_start = 0
        for lev in range(1, L):
            row_start, row_stop, col_start, _ = fenwick.blocks_at_level(T, lev)
            nb, half = row_start.size, 1 << (lev - 1)
            offsets = np.arange(half, dtype=np.int64)
            rows = (row_start[:, None] + offsets).ravel()[: int((row_stop - row_start).sum())]
            positions = self.U_indptr[rows] + filled[rows]
            filled[rows] += 1
            self.U_cols[positions] = K + rows // (2 * half)
            self.U_positions.append(positions)
            v_rows.append((col_start[:, None] + offsets).ravel())
            v_counts.append(np.full(nb, half, dtype=np.int64))
            self.V_ranges.append((v_start, v_start + nb * half))
            levels.append(np.full(nb, lev, dtype=np.int64))
            K += nb
            v_start += nb * half
        self.levels = _concat(levels)
        self.V_rows = _concat(v_rows)
        self.V_indptr = np.concatenate([[0], np.cumsum(_concat(v_counts))]).astype(np.int64)
        for a in (self.levels, self.U_indptr, self.U_cols, self.V_rows, self.V_indptr, *self.U_positions):
            a.flags.writeable = False

    @property
    def K(self) -> int:
        return int(self.levels.size)

    @property
    def nbytes(self) -> int:
        """Bytes of the index arrays."""
        return sum(a.nbytes for a in (self.levels, self.U_indptr, self.U_cols, self.V_rows, self.V_indptr,
                                      *self.U_positions))


def _concat(parts):
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


CACHE_BYTES = 384 * 2**20
"""What the structures :func:`sparse_structure` keeps may hold together (the most recently used
first): 14 MiB at ``T = 2^16``, 60 MiB at ``2^18``, about 260 MiB at ``2^20``.  A structure takes
0.1 s to build at ``2^18`` (a fifth of a matmul there)."""

_CACHE: collections.OrderedDict = collections.OrderedDict()
_CACHE_LOCK = threading.Lock()


def sparse_structure(T: int) -> SparseStructure:
    """The index arrays of the sparse form of a length-``T`` mask (read-only; the most recently
    used lengths are kept, up to :data:`CACHE_BYTES` together, the latest always, even if larger;
    :func:`clear_cache` drops them; safe to call from several threads)."""
    T = int(T)
    with _CACHE_LOCK:
        if T in _CACHE:
            _CACHE.move_to_end(T)
            return _CACHE[T]
    structure = SparseStructure(T)
    with _CACHE_LOCK:
        _CACHE[T] = structure
        while sum(s.nbytes for s in _CACHE.values()) > CACHE_BYTES and len(_CACHE) > 1:
            _CACHE.popitem(last=False)
    return structure


def clear_cache() -> None:
    """Drop the structures :func:`sparse_structure` keeps."""
    with _CACHE_LOCK:
        _CACHE.clear()


def sparse_data(level_scales, log_decay):
    """Values of the sparse form, batched.

    Parameters
    ----------
    level_scales : array, shape ``(*batch, T, L)``; log_decay : array ``(*batch, T)`` or None
        numpy or torch (converted to numpy: float64 stays float64, other dtypes become
        float32).

    Returns
    -------
    diagonal : ``(*batch, T)``, U_data : ``(*batch, nnz_U)``, V_data : ``(*batch, nnz_V)``
        numpy arrays: ``U``'s data in CSR order and ``V``'s in CSC order, as
        :func:`sparse_structure` lays them out.
    """
    dtype = _formulas.numpy_dtype(level_scales.dtype)
    lam = _formulas.as_numpy(level_scales, dtype)
    g = _formulas.as_numpy(log_decay, dtype)
    T = lam.shape[-2]
    structure = sparse_structure(T)
    batch = _formulas.batch_shape(lam, g)
    U_data = np.empty(batch + (structure.U_cols.size,), dtype=dtype)
    V_data = np.empty(batch + (structure.V_rows.size,), dtype=dtype)
    for lev, (positions, (start, stop)) in enumerate(zip(structure.U_positions, structure.V_ranges), start=1):
        u = _formulas.block_row_factors(lam, g, lev)
        v = _formulas.block_col_factors(lam, g, lev)
        U_data[..., positions] = u.reshape(u.shape[:-2] + (u.shape[-2] * u.shape[-1],))[..., : positions.size]
        V_data[..., start:stop] = v.reshape(v.shape[:-2] + (v.shape[-2] * v.shape[-1],))[..., : stop - start]
    diagonal = np.broadcast_to(lam[..., 0], batch + (T,))
    return diagonal, U_data, V_data


def block_diagonal(kind: str, indptr, indices, data, shape):
    """The ``B`` sparse matrices of one shared structure, on the diagonal of one.

    ``kind`` is ``"csr"`` or ``"csc"``; ``indptr, indices`` describe one ``shape`` matrix
    in that layout and ``data (B, nnz)`` holds each matrix's values.  Returns a
    ``scipy.sparse`` array of shape ``(B shape[0], B shape[1])``.
    """
    import scipy.sparse

    B, nnz = data.shape
    if B == 1:
        big_indices, big_indptr = indices, indptr
    else:
        shift = np.arange(B, dtype=np.int64)[:, None]
        inner = shape[1] if kind == "csr" else shape[0]
        big_indices = (indices[None, :] + inner * shift).ravel()
        big_indptr = np.concatenate([(indptr[None, :-1] + nnz * shift).ravel(), [B * nnz]])
    cls = scipy.sparse.csr_array if kind == "csr" else scipy.sparse.csc_array
    return cls((data.ravel(), big_indices, big_indptr), shape=(B * shape[0], B * shape[1]))


def mask_to_sparse(M):
    """The mask ``M`` as ``diag(level_scales[:, 0]) + U V^T`` (see the module docstring).

    Parameters
    ----------
    M : hodlr.LogLinearMask
        numpy or torch; torch masks are converted to numpy (float16 / bfloat16 to float32).
        Anything with the mask's ``T``, ``batch_shape``, ``level_scales`` and ``log_decay``
        serves.

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
    import scipy.sparse

    _checks.needs_values("mask_to_sparse", M.level_scales)
    M._queue_check()  # a CUDA mask not yet validated
    if 0 in M.batch_shape:  # an empty batch: no element to convert
        return np.empty(M.batch_shape, dtype=object)
    structure = sparse_structure(M.T)
    diagonal, U_data, V_data = sparse_data(M.level_scales, M.log_decay)
    batch = M.batch_shape

    def one(index):
        U = scipy.sparse.csr_array((U_data[index], structure.U_cols, structure.U_indptr), shape=(M.T, structure.K))
        V = scipy.sparse.csc_array((V_data[index], structure.V_rows, structure.V_indptr), shape=(M.T, structure.K))
        return SparseMask(np.ascontiguousarray(diagonal[index]), U, V, structure.levels)

    if batch == ():
        return one(())
    out = np.empty(batch, dtype=object)
    for index in np.ndindex(*batch):
        out[index] = one(index)
    return out
