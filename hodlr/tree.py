"""An explicit HODLR matrix: a binary tree of lower-triangular dense leaves and low-rank
off-diagonal blocks (in the style of hm-toolbox).

One node class, :class:`HODLRMatrix`, holds a square lower-triangular matrix of size
``n``.  A node is either

* a **leaf**: a dense lower-triangular ``(n, n)`` array, or
* an **internal node** with children ``A11`` (size ``n1``) and ``A22`` (size ``n - n1``)
  and the factors ``U (n - n1, r)``, ``V (n1, r)`` of its lower-left block::

      [ A11     0  ]
      [ U V^T  A22 ]

  (the upper-right block is zero).

**Split rule.**  A node of size ``n`` splits at ``n1 = 2^(k-1)`` with
``k = (n - 1).bit_length()``, the largest power of two below ``n``.  This is the tree of
the log-linear mask (docs/mathematics.md §4, the tree padded to a power of two and
clipped to ``T``): the lower-left block of the node that starts at ``a`` has rows
``[a + n1, a + n)``, columns ``[a, a + n1)`` and holds exactly the entries of **level**
``k``; its **index** is ``a >> k``, as in :func:`fenwick.blocks_at_level`.  Every block is
addressed by ``(level, index)`` in every tree, whether built from a mask or from a dense
matrix.

Arrays are numpy (float32 or float64), one matrix per tree (no batch dimensions).
"""

from __future__ import annotations

from typing import Iterator, NamedTuple

import numpy as np

from hodlr import _checks, _formulas, display, fenwick
from hodlr.errors import RankExceededError
from hodlr.fenwick.arrays import check_int, is_torch, to_numpy

__all__ = ["HODLRBlock", "HODLRMatrix", "numerical_rank"]


class HODLRBlock(NamedTuple):
    """One off-diagonal block: ``A[rows, cols] = U @ V.T``."""

    level: int
    index: int
    rows: range
    cols: range
    U: np.ndarray
    V: np.ndarray


def _split(n: int) -> int:
    """Size of the first child of a node of size ``n >= 2``."""
    return 1 << ((n - 1).bit_length() - 1)


def _default_tol(dtype) -> float:
    return 1e-10 if np.dtype(dtype) == np.float64 else 1e-5


def truncated_svd(B: np.ndarray, tol: float):
    """``(P, s, Qt, r)``: the thin SVD of ``B`` and its numerical rank ``r``, the number of
    singular values above ``tol * sigma_max(B)`` and above the smallest normal number of their
    dtype (0 for a zero or empty block): below it a number carries an absolute rounding, not a
    relative one (the entries a steep decay underflows), so no rank is read there."""
    P, s, Qt = np.linalg.svd(B, full_matrices=False)
    r = int(np.count_nonzero(s > max(tol * s[0], np.finfo(s.dtype).tiny))) if s.size else 0
    return P, s, Qt, r


def numerical_rank(B, tol: float | None = None) -> int:
    """Numerical rank of ``B`` as :meth:`HODLRMatrix.from_dense` counts it (``tol``
    defaults as there)."""
    B = np.asarray(B)
    return truncated_svd(B, _default_tol(B.dtype) if tol is None else tol)[3]


class HODLRMatrix:
    """A lower-triangular HODLR matrix (a tree node; see the module docstring).

    Build one with :meth:`from_mask` or :meth:`from_dense`; the constructor takes the
    parts of one node: either ``leaf`` or all of ``A11, A22, U, V``.

    Parameters
    ----------
    leaf : numpy.ndarray, shape ``(n, n)``, optional
        Dense lower-triangular block of a leaf.
    A11, A22 : HODLRMatrix, optional
        Children; ``A11.T`` must be the split size of ``n = A11.T + A22.T``.
    U : numpy.ndarray, shape ``(A22.T, r)``; V : numpy.ndarray, shape ``(A11.T, r)``
        Factors of the lower-left block ``U V^T``.
    start : int
        Position of the node's first row in the whole matrix (0 for the root).

    Examples
    --------
    >>> import numpy as np, hodlr
    >>> T = 6
    >>> M = hodlr.LogLinearMask(np.ones((T, hodlr.num_levels(T))), log_decay=np.full(T, np.log(0.5)))
    >>> H = M.to_hodlr()
    >>> H.T, H.depth, H.rank, H.leaf_size
    (6, 3, 1, 1)
    >>> blk = H.block(2, 0)
    >>> blk.rows, blk.cols
    (range(2, 4), range(0, 2))
    >>> np.allclose(H.to_dense(), M.to_dense()), np.allclose(H.matmul(np.ones(T)), M.to_dense() @ np.ones(T))
    (True, True)
    """

    def __init__(self, *, leaf=None, A11=None, A22=None, U=None, V=None, start: int = 0):
        self.start = int(start)
        if leaf is not None:
            if any(p is not None for p in (A11, A22, U, V)):
                raise ValueError("a HODLRMatrix node is either a leaf or has A11, A22, U, V, not both")
            leaf = np.asarray(leaf)
            if leaf.ndim != 2 or leaf.shape[0] != leaf.shape[1] or leaf.shape[0] < 1:
                raise ValueError(f"leaf must be a non-empty square (n, n) array, got shape {leaf.shape}")
            above = np.argwhere(np.triu(leaf, 1) != 0)
            if above.size:
                i, j = above[0]
                raise ValueError(f"leaf must be lower triangular, but leaf[{i}, {j}] = {float(leaf[i, j])!r} lies "
                                 f"above the diagonal")
            self.leaf, self.A11, self.A22, self.U, self.V = leaf, None, None, None, None
            self._n = leaf.shape[0]
            return
        if any(p is None for p in (A11, A22, U, V)):
            raise ValueError("an internal HODLRMatrix node needs all of A11, A22, U, V")
        for name, child in (("A11", A11), ("A22", A22)):
            if not isinstance(child, HODLRMatrix):
                raise TypeError(f"{name} must be a HODLRMatrix, got {type(child).__name__}")
        n1, n2 = A11.T, A22.T
        if n1 != _split(n1 + n2):
            raise ValueError(
                f"A11 must have size {_split(n1 + n2)} (the largest power of two below n={n1 + n2}), got {n1}"
            )
        U, V = np.asarray(U), np.asarray(V)
        if U.ndim != 2 or V.ndim != 2 or U.shape != (n2, U.shape[1]) or V.shape != (n1, U.shape[1]):
            raise ValueError(
                f"U must have shape (A22.T, r) = ({n2}, r) and V shape (A11.T, r) = ({n1}, r), "
                f"got U {U.shape} and V {V.shape}"
            )
        if A11.start != self.start or A22.start != self.start + n1:
            raise ValueError(
                f"children must start at {self.start} and {self.start + n1}, got {A11.start} and {A22.start}"
            )
        self.leaf, self.A11, self.A22, self.U, self.V = None, A11, A22, U, V
        self._n = n1 + n2

    # -- construction -------------------------------------------------------------------
    @classmethod
    def from_mask(cls, M, leaf_size: int = 1) -> "HODLRMatrix":
        """The log-linear mask ``M`` as a tree with its anchored rank-1 factors.

        Parameters
        ----------
        M : hodlr.LogLinearMask
            With ``batch_shape == ()``.  torch masks are converted to numpy (float64 stays
            float64, other dtypes become float32).  Anything with the mask's
            ``batch_shape``, ``dtype``, ``level_scales`` and ``log_decay`` serves.
        leaf_size : int, default 1
            Nodes of at most this size become dense leaves (assembled from their own
            factors); 1 gives the pure tree with size-1 leaves ``level_scales[t, 0]``.

        Raises
        ------
        ValueError
            If ``M`` has batch dimensions (select one matrix first, e.g.
            ``LogLinearMask(M.level_scales[0], None if M.log_decay is None else M.log_decay[0])``), or
            ``leaf_size < 1``.
        TypeError
            If ``leaf_size`` is not an integer.
        """
        if not display.is_mask(M):
            raise TypeError(f"M must be a hodlr.LogLinearMask (HODLRMatrix.from_dense takes an array), got "
                            f"{type(M).__name__}")
        if M.batch_shape != ():
            raise ValueError(
                f"HODLRMatrix.from_mask needs a mask without batch dimensions, got batch_shape {M.batch_shape}; "
                "build one matrix per element, e.g. LogLinearMask(M.level_scales[0], "
                + ("None)" if M.log_decay is None else "M.log_decay[0])")
            )
        leaf_size = check_int("leaf_size", leaf_size, 1)
        _checks.needs_values("HODLRMatrix.from_mask", M.level_scales)
        M._queue_check()  # a CUDA mask not yet validated
        dtype = _formulas.numpy_dtype(M.dtype)
        lam = _formulas.as_numpy(M.level_scales, dtype)
        g = _formulas.as_numpy(M.log_decay, dtype)
        T = lam.shape[-2]
        factors = {
            lev: (_formulas.block_row_factors(lam, g, lev), _formulas.block_col_factors(lam, g, lev))
            for lev in range(1, fenwick.num_levels(T))
        }
        diagonal = lam[:, 0]

        def build(a: int, n: int) -> HODLRMatrix:
            if n == 1:
                return cls(leaf=diagonal[a : a + 1, None].copy(), start=a)
            n1 = _split(n)
            lev = fenwick.num_levels(n) - 1
            u, v = factors[lev]
            j = a >> lev
            node = cls(A11=build(a, n1), A22=build(a + n1, n - n1),
                       U=u[j, : n - n1, None].copy(), V=v[j, :, None].copy(), start=a)
            return cls(leaf=node.to_dense(), start=a) if n <= leaf_size else node

        return build(0, T)

    @classmethod
    def from_dense(cls, A, leaf_size: int = 1, rank: int | None = None, tol: float | None = None) -> "HODLRMatrix":
        """Compress a dense lower-triangular matrix by truncated SVD of each off-diagonal block.

        Parameters
        ----------
        A : array, shape ``(T, T)``
            Lower triangular (every entry above the diagonal exactly 0); numpy float32 /
            float64 (a torch tensor is converted to numpy).
        leaf_size : int, default 1
            Nodes of at most this size are stored dense.
        rank : int, optional
            Largest allowed rank of an off-diagonal block.  Default: no limit.
        tol : float, optional
            Numerical rank: singular values above ``tol * sigma_max(block)`` count.
            Default ``1e-10`` for float64, ``1e-5`` for float32.

        Each block is stored with its numerical rank (``<= rank``), as ``U = P_r diag(s_r)``,
        ``V = Q_r`` from its SVD.

        Raises
        ------
        hodlr.errors.RankExceededError
            When a block's numerical rank exceeds ``rank`` (names the block's level, index,
            rows and columns, its numerical rank and ``rank``).
        ValueError, TypeError
            Non-square, non-lower-triangular, non-float ``A``; bad ``leaf_size``, ``rank``
            or ``tol``.

        Examples
        --------
        >>> import numpy as np
        >>> A = np.tril(np.ones((5, 5)))
        >>> H = HODLRMatrix.from_dense(A, leaf_size=2, rank=1)
        >>> H.rank, np.allclose(H.to_dense(), A, rtol=0, atol=1e-14)
        (1, True)
        """
        if is_torch(A):
            A = to_numpy(A.float() if A.dtype.itemsize < 4 else A)
        A = np.asarray(A)
        if A.dtype not in (np.float32, np.float64):
            raise TypeError(f"A must have dtype float32 or float64, got {A.dtype}")
        if A.ndim != 2 or A.shape[0] != A.shape[1] or A.shape[0] < 1:
            raise ValueError(f"A must be a square (T, T) matrix with T >= 1, got shape {A.shape}")
        upper = np.argwhere(np.triu(A, 1) != 0)
        if upper.size:
            i, j = upper[0]
            raise ValueError(
                f"A must be lower triangular, but A[{i}, {j}] = {float(A[i, j])!r} lies above the diagonal "
                f"({len(upper)} such nonzeros)"
            )
        if not np.isfinite(A).all():
            raise ValueError("A must be finite; it holds NaN or inf")
        leaf_size = check_int("leaf_size", leaf_size, 1)
        if rank is not None:
            rank = check_int("rank", rank, 0)
        if tol is None:
            tol = _default_tol(A.dtype)
        if isinstance(tol, bool) or not isinstance(tol, (int, float, np.floating, np.integer)):
            raise TypeError(f"tol must be a float in (0, 1), got {type(tol).__name__} {tol!r}")
        if not 0 < tol < 1:
            raise ValueError(f"tol must be a float in (0, 1), got {tol!r}")

        def build(a: int, n: int) -> HODLRMatrix:
            if n <= leaf_size:
                return cls(leaf=A[a : a + n, a : a + n].copy(), start=a)
            n1 = _split(n)
            lev = fenwick.num_levels(n) - 1
            block = A[a + n1 : a + n, a : a + n1]
            P, s, Qt, r = truncated_svd(block, tol)
            if rank is not None and r > rank:
                raise RankExceededError(
                    f"block (level={lev}, index={a >> lev}) on rows [{a + n1}, {a + n}) and columns "
                    f"[{a}, {a + n1}) has numerical rank {r} (singular values > {tol:g} * sigma_max), "
                    f"more than the requested rank={rank}"
                )
            U = (P[:, :r] * s[:r]).astype(A.dtype)
            V = Qt[:r].T.astype(A.dtype)
            return cls(A11=build(a, n1), A22=build(a + n1, n - n1), U=U, V=V, start=a)

        return build(0, A.shape[0])

    # -- properties ---------------------------------------------------------------------
    @property
    def T(self) -> int:
        """Size of this node's (square) matrix."""
        return self._n

    @property
    def shape(self) -> tuple:
        return (self._n, self._n)

    @property
    def is_leaf(self) -> bool:
        return self.leaf is not None

    @property
    def dtype(self):
        return self.leaf.dtype if self.is_leaf else self.U.dtype

    @property
    def level(self) -> int | None:
        """Level of this node's off-diagonal block, ``(T - 1).bit_length()``; ``None`` for a leaf."""
        return None if self.is_leaf else fenwick.num_levels(self._n) - 1

    @property
    def index(self) -> int | None:
        """Index of this node's block within its level, ``start >> level``; ``None`` for a leaf."""
        return None if self.is_leaf else self.start >> self.level

    @property
    def depth(self) -> int:
        """Number of node generations below this one: 0 for a leaf."""
        return 0 if self.is_leaf else 1 + max(self.A11.depth, self.A22.depth)

    @property
    def levels(self) -> list:
        """Sorted levels that have at least one off-diagonal block."""
        return sorted({b.level for b in self.blocks()})

    @property
    def leaf_size(self) -> int:
        """Size of the largest leaf."""
        return max(node._n for node in self.leaves())

    @property
    def rank(self) -> int:
        """Largest rank of an off-diagonal block (0 if there is none)."""
        return max((b.U.shape[1] for b in self.blocks()), default=0)

    @property
    def num_stored(self) -> int:
        """Numbers stored: every leaf's ``n x n`` array plus every ``U`` and ``V``."""
        return sum(node.leaf.size for node in self.leaves()) + sum(b.U.size + b.V.size for b in self.blocks())

    # -- traversal ----------------------------------------------------------------------
    def nodes(self) -> Iterator["HODLRMatrix"]:
        """Every node, depth first (this one, then ``A11``'s subtree, then ``A22``'s)."""
        stack = [self]
        while stack:
            node = stack.pop()
            yield node
            if not node.is_leaf:
                stack.extend((node.A22, node.A11))

    def leaves(self) -> Iterator["HODLRMatrix"]:
        """The leaves, left to right."""
        return (node for node in self.nodes() if node.is_leaf)

    def _block_of(self, node: "HODLRMatrix") -> HODLRBlock:
        m = node.start + node.A11.T
        return HODLRBlock(node.level, node.index, range(m, node.start + node.T), range(node.start, m), node.U, node.V)

    def blocks(self) -> Iterator[HODLRBlock]:
        """Every off-diagonal block, by level then index (the order of
        :func:`fenwick.offdiag_blocks`).  Rows and columns are absolute positions (a
        child node's blocks keep the positions they have in the whole matrix)."""
        internal = sorted((n for n in self.nodes() if not n.is_leaf), key=lambda n: (n.level, n.start))
        return (self._block_of(node) for node in internal)

    def block(self, level: int, index: int) -> HODLRBlock:
        """The off-diagonal block ``(level, index)``: ``(level, index, rows, cols, U, V)``.

        Raises ``KeyError`` if there is no such block (outside the matrix or inside a
        dense leaf)."""
        node = self
        target = (int(level), int(index))
        while not node.is_leaf:
            if (node.level, node.index) == target:
                return self._block_of(node)
            start = target[1] << target[0]
            node = node.A22 if start >= node.start + node.A11.T else node.A11
        raise KeyError(
            f"no off-diagonal block (level={level}, index={index}) in this HODLRMatrix (T={self.T}, "
            f"levels {self.levels}); it is outside the matrix or inside a dense leaf"
        )

    # -- values -------------------------------------------------------------------------
    def to_dense(self) -> np.ndarray:
        """The ``(T, T)`` dense matrix; refused (``DenseTooLargeError``), before allocating, over
        ``hodlr.options.dense_max_bytes``."""
        _formulas.check_dense_budget((), self._n, np.dtype(self.dtype).itemsize, "HODLRMatrix.to_dense",
                                     instead=None)
        out = np.zeros((self._n, self._n), dtype=self.dtype)
        self._fill_dense(out)
        return out

    def _fill_dense(self, out) -> None:
        """Write the matrix into ``out`` (a ``(T, T)`` view)."""
        if self.is_leaf:
            out[...] = self.leaf
            return
        n1 = self.A11.T
        self.A11._fill_dense(out[:n1, :n1])
        self.A22._fill_dense(out[n1:, n1:])
        out[n1:, :n1] = self.U @ self.V.T

    def matmul(self, X) -> np.ndarray:
        """``A @ X`` by the recursion ``y1 = A11 x1``, ``y2 = A22 x2 + U (V^T x1)``.

        ``X`` of shape ``(T,)``, ``(T, D)`` or ``(..., T, D)`` (numpy); returns the same shape."""
        X = _checks.numpy_operand("X", X, "HODLRMatrix")
        return _checks.over_columns("X", X, self._n, self._product)

    def _product(self, X: np.ndarray) -> np.ndarray:
        """:meth:`matmul` of a checked ``(T, C)`` array, node by node."""
        if self.is_leaf:
            return self.leaf @ X
        n1 = self.A11.T
        x1, x2 = X[:n1], X[n1:]
        return np.concatenate([self.A11._product(x1), self.A22._product(x2) + self.U @ (self.V.T @ x1)])

    __matmul__ = matmul

    def rank_profile(self, levels=None, rtol=None):
        """Numerical rank of every off-diagonal block, from its factors (no block is formed).

        See :func:`hodlr.rank_profile`."""
        return display.rank_profile(self, levels, rtol)

    def __repr__(self) -> str:
        return display.tree_repr(self)

    def _repr_html_(self) -> str:
        return display.tree_repr_html(self)
