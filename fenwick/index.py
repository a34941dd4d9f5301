"""Index algebra of the log-linear mask: levels, Fenwick buckets and HODLR blocks.

This module is the single definition of the level function used everywhere in the
project's host code (``hodlr`` and ``kernels`` import it; the Triton kernels compute the same bit
length on the device, ``kernels._device.bit_length``).

Positions ``t, s`` run over ``0 .. T-1``.  For ``s < t`` the level of the pair is the
index of the highest bit in which ``t`` and ``s`` differ, plus one; ``level(t, t) = 0``
and pairs with ``s > t`` have no level (the mask is causal).  The ``s`` with
``level(t, s) = b + 1`` form the Fenwick bucket ``[p, p + 2**b)`` with
``p = (t >> (b + 1)) << (b + 1)``, which is non-empty exactly when bit ``b`` of ``t``
is set.
"""

from __future__ import annotations

from typing import Iterator, NamedTuple

import numpy as np

from .arrays import check_int

__all__ = [
    "Block",
    "aligned",
    "blocks_at_level",
    "bucket",
    "buckets",
    "level",
    "level_matrix",
    "num_blocks",
    "num_levels",
    "num_slots",
    "offdiag_blocks",
    "read_levels",
]

NO_LEVEL = -1
"""Level reported for pairs above the diagonal (``s > t``), which the mask sets to zero."""


def _bit_length(x: np.ndarray) -> np.ndarray:
    """Elementwise ``int.bit_length`` of a non-negative integer array below 2**53."""
    _, exponent = np.frexp(x.astype(np.float64))
    return exponent.astype(np.int64)


def num_levels(T: int) -> int:
    """Number of level scales a length-``T`` sequence reads: ``(T - 1).bit_length() + 1``.

    Examples
    --------
    >>> num_levels(1), num_levels(2), num_levels(1024), num_levels(1025)
    (1, 2, 11, 12)
    """
    return (check_int("T", T, 1) - 1).bit_length() + 1


def num_slots(position: int) -> int:
    """Slots of a recurrent state at ``position`` (after ``position`` tokens):
    ``position.bit_length()``, one per level ``1 .. bit_length``.  The bucket of level ``l`` is
    non-empty exactly when bit ``l - 1`` of ``position`` is set, so the state needs no slot above
    its highest set bit.

    Examples
    --------
    >>> num_slots(0), num_slots(1), num_slots(7), num_slots(8)
    (0, 1, 3, 4)
    """
    return check_int("position", position, 0).bit_length()


def aligned(position: int, T: int) -> bool:
    """Whether ``T`` consecutive positions from ``position`` form an aligned stretch:
    ``position`` is a multiple of a power of two ``>= T``.  Then ``position + t`` and
    ``position + s`` (``t, s < T``) differ in the bits of ``t ^ s`` only, so every pair inside
    the stretch has the level of ``(t, s)``, and each bucket of a position of the stretch lies
    either inside it or wholly before ``position`` (a bucket of ``position`` itself).

    Examples
    --------
    >>> aligned(8, 8), aligned(8, 9), aligned(12, 4), aligned(12, 5), aligned(5, 1), aligned(3, 0)
    (True, False, True, False, True, True)
    """
    position, T = check_int("position", position, 0), check_int("T", T, 0)
    return position % (1 << max(T - 1, 0).bit_length()) == 0


def level(t, s):
    """Level of the pair ``(t, s)``: 0 on the diagonal, ``(t ^ s).bit_length()`` below it.

    Works on Python integers (returns an ``int``) and on integer arrays, which
    broadcast (returns an ``int64`` array).  Pairs with ``s > t`` get ``-1``: the mask
    is zero there.

    Examples
    --------
    >>> level(5, 5), level(5, 4), level(5, 3), level(5, 0), level(2, 3)
    (0, 1, 3, 3, -1)
    >>> level(np.arange(4)[:, None], np.arange(4)[None, :])
    array([[ 0, -1, -1, -1],
           [ 1,  0, -1, -1],
           [ 2,  2,  0, -1],
           [ 2,  2,  1,  0]])
    """
    if isinstance(t, (int, np.integer)) and isinstance(s, (int, np.integer)):
        t, s = int(t), int(s)
        if t < 0 or s < 0:
            raise ValueError(f"positions must be >= 0, got t={t}, s={s}")
        return NO_LEVEL if s > t else (t ^ s).bit_length()
    t = np.asarray(t)
    s = np.asarray(s)
    for name, a in (("t", t), ("s", s)):
        if a.dtype.kind not in "iu":
            raise TypeError(f"{name} must hold integers, got dtype {a.dtype}")
        if a.size and a.min() < 0:
            raise ValueError(f"positions must be >= 0, got {name}.min()={a.min()}")
        if a.size and a.max() >= 2**53:
            raise ValueError(f"positions must be < 2**53 in the array form, got {name}.max()={a.max()}")
    t64, s64 = np.broadcast_arrays(t.astype(np.int64), s.astype(np.int64))
    out = _bit_length(np.bitwise_xor(t64, s64))
    return np.where(s64 > t64, NO_LEVEL, out)


def level_matrix(T: int) -> np.ndarray:
    """The ``(T, T)`` matrix of levels, ``-1`` above the diagonal.  For inspection only:
    no computation path builds it."""
    idx = np.arange(check_int("T", T, 1))
    return level(idx[:, None], idx[None, :])


def bucket(t: int, lev: int) -> tuple[int, int]:
    """The half-open range ``[start, stop)`` of positions ``s`` with ``level(t, s) == lev``.

    Level 0 is ``(t, t + 1)``.  The range is empty (``start == stop``) when bit
    ``lev - 1`` of ``t`` is 0.
    """
    t, lev = check_int("t", t, 0), check_int("lev", lev, 0)
    if lev == 0:
        return t, t + 1
    b = lev - 1
    if not (t >> b) & 1:
        return t, t
    start = (t >> lev) << lev
    return start, start + (1 << b)


def buckets(t: int) -> list[tuple[int, int, int]]:
    """The Fenwick partition of ``[0, t]`` seen from query ``t``.

    Returns ``(level, start, stop)`` for level 0 (``{t}``) and for every set bit of
    ``t``, ordered by level.  The bucket sizes are 1 and the powers of two in ``t``.

    Examples
    --------
    >>> buckets(6)
    [(0, 6, 7), (2, 4, 6), (3, 0, 4)]
    """
    t = check_int("t", t, 0)
    out = [(0, t, t + 1)]
    for lev in range(1, t.bit_length() + 1):
        start, stop = bucket(t, lev)
        if stop > start:
            out.append((lev, start, stop))
    return out


def read_levels(T: int, L: int | None = None) -> np.ndarray:
    """Boolean ``(T, L)`` array: entry ``[t, l]`` is True iff row ``t`` reads scale ``l``
    (:func:`reads` of the positions ``0 .. T - 1``).

    Level 0 is always read; level ``l >= 1`` only if bit ``l - 1`` of ``t`` is set.
    ``L`` defaults to ``num_levels(T)``; more columns are allowed (never read).
    """
    T = check_int("T", T, 1)
    L = num_levels(T) if L is None else check_int("L", L, 0)
    return reads(np.arange(T), L)


def reads(positions, L: int) -> np.ndarray:
    """Boolean ``(*positions.shape, L)`` array: entry ``[..., l]`` is True iff the query at that
    absolute position reads level ``l``: always level 0, level ``l >= 1`` iff bit ``l - 1`` of the
    position is set (the one definition of which level scales are read).

    >>> reads(np.array([0, 5]), 4)
    array([[ True, False, False, False],
           [ True,  True, False,  True]])
    """
    t = np.asarray(positions, dtype=np.int64)[..., None]
    lev = np.arange(check_int("L", L, 0))
    return (lev == 0) | (((t >> np.maximum(lev - 1, 0)) & 1) == 1)


class Block(NamedTuple):
    """One off-diagonal block of the HODLR form, clipped to ``[0, T)``.

    Rows ``[row_start, row_stop)`` and columns ``[col_start, col_stop)``; it holds
    exactly the mask entries of ``level``.  ``anchor = col_stop - 1`` is the position
    ``m - 1`` at which the rank-1 factors anchor the decay.
    """

    level: int
    index: int
    row_start: int
    row_stop: int
    col_start: int
    col_stop: int

    @property
    def anchor(self) -> int:
        return self.col_stop - 1


def num_blocks(T: int, lev: int) -> int:
    """Number of non-empty off-diagonal blocks at level ``lev >= 1`` for length ``T``."""
    T, lev = check_int("T", T, 1), check_int("lev", lev, 1)
    half = 1 << (lev - 1)
    return max(0, -(-(T - half) // (2 * half)))


def blocks_at_level(T: int, lev: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Vectorised block enumeration of one level.

    Returns four ``int64`` arrays ``(row_start, row_stop, col_start, col_stop)`` of length
    ``num_blocks(T, lev)``.  Block ``j`` is the lower-left block of the tree node
    ``[j 2^lev, (j + 1) 2^lev)``; its columns are never clipped, its rows may be.
    """
    n = num_blocks(T, lev)
    half = 1 << (lev - 1)
    col_start = np.arange(n, dtype=np.int64) * (2 * half)
    col_stop = col_start + half
    row_stop = np.minimum(col_stop + half, T)
    return col_stop.copy(), row_stop, col_start, col_stop


def offdiag_blocks(T: int) -> Iterator[Block]:
    """Every non-empty off-diagonal block of a length-``T`` sequence, level by level.

    The count is ``sum(num_blocks(T, l) for l in 1..num_levels(T)-1)``, which is ``T - 1``: one
    block for each boundary ``m`` in ``1..T-1`` between its columns and its rows (``col_stop``).

    Examples
    --------
    >>> [tuple(b) for b in offdiag_blocks(3)]
    [(1, 0, 1, 2, 0, 1), (2, 0, 2, 3, 0, 2)]
    """
    T = check_int("T", T, 1)
    for lev in range(1, num_levels(T)):
        rs, re, cs, ce = blocks_at_level(T, lev)
        for j in range(rs.size):
            yield Block(lev, j, int(rs[j]), int(re[j]), int(cs[j]), int(ce[j]))
