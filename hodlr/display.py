"""Text and HTML summaries of masks and trees (cheap: nothing large is materialised).

A mask's summary comes from closed forms over the levels (``O(log T)`` work), so the
summary of a ``T = 2**20`` mask costs microseconds.  A tree's summary walks its nodes
once (reading shapes only); the tree holds those nodes anyway.

Examples
--------
>>> import numpy as np, hodlr
>>> M = hodlr.LogLinearMask(np.ones((8, 4)))
>>> print(repr(M))                                          # doctest: +NORMALIZE_WHITESPACE
LogLinearMask(T=8, levels=4, batch_shape=(), dtype=float64, device=cpu, decay=no)
  stored: 32 numbers per matrix (level scales 32) vs T^2 = 64 dense: 2x compression
  HODLR form: 8 diagonal entries + 7 rank-1 blocks, factors 32 numbers
  level  blocks  block size
      1       4       1 x 1
      2       2       2 x 2
      3       1       4 x 4
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field

import numpy as np

from hodlr import _checks, fenwick
from hodlr.fenwick.arrays import check_int, namespace, to_numpy

__all__ = [
    "RankProfile",
    "Structure",
    "factor_rank",
    "is_mask",
    "is_tree",
    "level_table",
    "mask_repr",
    "mask_repr_html",
    "rank_profile",
    "structure",
    "tree_repr",
    "tree_repr_html",
]


@dataclass(frozen=True)
class LevelRow:
    """One level of the off-diagonal blocks: how many, their nominal size, and the
    rows / columns they cover in total (clipped to ``[0, T)``)."""

    level: int
    blocks: int
    size: int
    rows: int
    cols: int
    max_rank: int | None = None

    @property
    def last_rows(self) -> int:
        """Rows of the level's last block: only it can be clipped by ``T`` (every other
        block is ``size x size``)."""
        return self.rows - (self.blocks - 1) * self.size

    def block_size(self, times: str = " x ") -> str:
        """The blocks' size as printed: ``"4 x 4"``, ``"1 x 4"`` for one clipped block,
        ``"4 x 4, last 1 x 4"`` when the last of several is clipped."""
        full = f"{self.size:,}{times}{self.size:,}"
        last = f"{self.last_rows:,}{times}{self.size:,}"
        if self.last_rows == self.size:
            return full
        return last if self.blocks == 1 else f"{full}, last {last}"


def level_table(T: int, first_level: int = 1) -> list[LevelRow]:
    """Off-diagonal blocks per level, ``first_level .. num_levels(T) - 1``, in closed form.

    ``first_level`` is 1 for the pure tree (size-1 leaves) and ``c + 1`` for leaves of size
    ``2**c``.  Block ``j`` of level ``l`` has ``2**(l-1)`` columns (never clipped) and
    ``min(2**(l-1), T - (2j + 1) 2**(l-1))`` rows.

    Examples
    --------
    >>> [(r.level, r.blocks, r.rows, r.cols) for r in level_table(5)]
    [(1, 2, 2, 2), (2, 1, 2, 2), (3, 1, 1, 4)]
    """
    first_level = check_int("first_level", first_level, 1)
    rows = []
    for lev in range(first_level, fenwick.num_levels(T)):
        n = fenwick.num_blocks(T, lev)
        half = 1 << (lev - 1)
        if n == 0:
            continue
        last_rows = min(half, T - (2 * (n - 1) + 1) * half)
        rows.append(LevelRow(lev, n, half, (n - 1) * half + last_rows, n * half))
    return rows


@dataclass(frozen=True)
class Structure:
    """What a summary shows; built by :func:`structure` without touching large data."""

    kind: str
    T: int
    levels: int
    leaf_size: int
    batch_shape: tuple
    dtype: str
    device: str
    decay: bool | None
    table: list = field(default_factory=list)
    stored: int = 0
    stored_parts: tuple = ()
    factor_numbers: int = 0

    @property
    def dense(self) -> int:
        """``T**2``, the numbers a dense matrix stores."""
        return self.T * self.T

    @property
    def compression(self) -> float:
        """``T**2 / stored``."""
        return self.dense / max(self.stored, 1)

    @property
    def num_offdiag_blocks(self) -> int:
        return sum(r.blocks for r in self.table)


def _fmt_dtype(dtype) -> str:
    return str(dtype).replace("torch.", "")


def _mask_structure(mask) -> Structure:
    T = mask.T
    L = int(mask.level_scales.shape[-1])
    parts = [("level scales", T * L)]
    if mask.log_decay is not None:
        parts.append(("log-decay", T))
    table = level_table(T)
    return Structure(
        kind="LogLinearMask",
        T=T,
        levels=mask.num_levels,
        leaf_size=1,
        batch_shape=tuple(mask.batch_shape),
        dtype=_fmt_dtype(mask.dtype),
        device=str(mask.device),
        decay=mask.log_decay is not None,
        table=table,
        stored=sum(n for _, n in parts),
        stored_parts=tuple(parts),
        factor_numbers=T + sum(r.rows + r.cols for r in table),
    )


def _tree_levels(tree) -> dict:
    """``{level: [(index, rows, cols, U, V), ...]}`` from one walk over the tree's blocks."""
    out = {}
    for blk in tree.blocks():
        out.setdefault(int(blk.level), []).append(blk)
    return dict(sorted(out.items()))


def _tree_structure(tree) -> Structure:
    T = int(tree.T)
    by_level = _tree_levels(tree)
    table = [
        LevelRow(lev, len(blks), 1 << (lev - 1), sum(len(b.rows) for b in blks), sum(len(b.cols) for b in blks),
                 max(int(b.U.shape[1]) for b in blks))
        for lev, blks in by_level.items()
    ]
    leaves = [int(node.T) for node in tree.leaves()]
    leaf_numbers = sum(n * n for n in leaves)
    factors = sum(int(b.U.size) + int(b.V.size) for blks in by_level.values() for b in blks)
    return Structure(
        kind=type(tree).__name__,
        T=T,
        levels=fenwick.num_levels(T),
        leaf_size=max(leaves),
        batch_shape=tuple(getattr(tree, "batch_shape", ())),
        dtype=_fmt_dtype(tree.dtype),
        device=str(getattr(tree, "device", "cpu")),
        decay=None,
        table=table,
        stored=leaf_numbers + factors,
        stored_parts=(("dense leaves", leaf_numbers), ("factors U, V", factors)),
        factor_numbers=leaf_numbers + factors,
    )


def is_mask(obj) -> bool:
    """Does ``obj`` present a mask's generators (a :class:`hodlr.LogLinearMask`, or anything
    with its ``T``, ``level_scales``, ``log_decay`` and ``block_factors``)?"""
    return all(hasattr(obj, name) for name in ("T", "level_scales", "log_decay", "block_factors"))


def is_tree(obj) -> bool:
    """Does ``obj`` present a tree's nodes (a :class:`hodlr.HODLRMatrix`, or anything with
    its ``T``, ``blocks`` and ``leaves``)?"""
    return all(hasattr(obj, name) for name in ("T", "blocks", "leaves"))


def structure(obj) -> Structure:
    """The :class:`Structure` of a :class:`hodlr.LogLinearMask` or :class:`hodlr.HODLRMatrix`."""
    if is_mask(obj):
        return _mask_structure(obj)
    if is_tree(obj):
        return _tree_structure(obj)
    raise TypeError(f"obj must be a hodlr.LogLinearMask or hodlr.HODLRMatrix, got {type(obj).__name__}")


def _table_lines(table) -> list[str]:
    if not table:
        return ["  (no off-diagonal blocks)"]
    ranked = table[0].max_rank is not None
    heads = ("level", "blocks", "block size") + (("max rank",) if ranked else ())
    cells = [
        (str(r.level), f"{r.blocks:,}", r.block_size()) + ((str(r.max_rank),) if ranked else ())
        for r in table
    ]
    widths = [max(len(heads[k]), *(len(c[k]) for c in cells)) for k in range(len(heads))]
    return ["  " + "  ".join(c[k].rjust(widths[k]) for k in range(len(heads))) for c in [heads, *cells]]


def _header(s: Structure) -> str:
    fields = [f"T={s.T}", f"levels={s.levels}"]
    if s.leaf_size != 1 or s.kind != "LogLinearMask":
        fields.append(f"leaf_size={s.leaf_size}")
    fields += [f"batch_shape={s.batch_shape}", f"dtype={s.dtype}", f"device={s.device}"]
    if s.decay is not None:
        fields.append(f"decay={'yes' if s.decay else 'no'}")
    return f"{s.kind}({', '.join(fields)})"


def _ratio(x: float) -> str:
    return f"{x:,.0f}x" if x >= 10 or float(x).is_integer() else f"{x:.2f}x"


def _text(s: Structure) -> str:
    parts = " + ".join(f"{name} {n:,}" for name, n in s.stored_parts)
    lines = [
        _header(s),
        f"  stored: {s.stored:,} numbers per matrix ({parts}) vs T^2 = {s.dense:,} dense: "
        f"{_ratio(s.compression)} compression",
    ]
    if s.kind == "LogLinearMask":
        lines.append(
            f"  HODLR form: {s.T:,} diagonal entries + {s.num_offdiag_blocks:,} rank-1 blocks, "
            f"factors {s.factor_numbers:,} numbers"
        )
    else:
        lines.append(
            f"  dense diagonal leaves of size <= {s.leaf_size} + {s.num_offdiag_blocks:,} low-rank off-diagonal blocks"
        )
    lines += _table_lines(s.table)
    return "\n".join(lines)


def _html(s: Structure) -> str:
    esc = html.escape
    parts = " + ".join(f"{esc(name)} {n:,}" for name, n in s.stored_parts)
    ranked = bool(s.table) and s.table[0].max_rank is not None
    rows = "".join(
        f"<tr><td>{r.level}</td><td>{r.blocks:,}</td><td>{r.block_size('&times;')}</td>"
        + (f"<td>{r.max_rank}</td>" if ranked else "") + "</tr>"
        for r in s.table
    )
    rank_head = "<th>max rank</th>" if ranked else ""
    batch = esc(str(s.batch_shape))
    decay = "" if s.decay is None else f"<tr><th>decay</th><td>{'yes' if s.decay else 'no'}</td></tr>"
    return (
        f"<div class='hodlr-repr'><b>{esc(s.kind)}</b>"
        "<table style='border-collapse:collapse'>"
        f"<tr><th>T</th><td>{s.T:,}</td></tr>"
        f"<tr><th>levels</th><td>{s.levels}</td></tr>"
        f"<tr><th>leaf size</th><td>{s.leaf_size}</td></tr>"
        f"<tr><th>batch shape</th><td>{batch}</td></tr>"
        f"<tr><th>dtype / device</th><td>{esc(s.dtype)} / {esc(s.device)}</td></tr>"
        f"{decay}"
        f"<tr><th>stored per matrix</th><td>{s.stored:,} ({parts})</td></tr>"
        f"<tr><th>dense T&sup2;</th><td>{s.dense:,}</td></tr>"
        f"<tr><th>compression</th><td>{esc(_ratio(s.compression))}</td></tr>"
        "</table>"
        f"<table style='border-collapse:collapse'><tr><th>level</th><th>blocks</th><th>block size</th>{rank_head}</tr>"
        f"{rows}</table></div>"
    )


def mask_repr(mask) -> str:
    """Multi-line text summary of a :class:`hodlr.LogLinearMask` (``O(log T)`` work)."""
    return _text(_mask_structure(mask))


def mask_repr_html(mask) -> str:
    """HTML summary of a :class:`hodlr.LogLinearMask` for notebooks."""
    return _html(_mask_structure(mask))


def tree_repr(tree) -> str:
    """Multi-line text summary of a :class:`hodlr.HODLRMatrix` (``O(log T)`` work)."""
    return _text(_tree_structure(tree))


def tree_repr_html(tree) -> str:
    """HTML summary of a :class:`hodlr.HODLRMatrix` for notebooks."""
    return _html(_tree_structure(tree))


@dataclass(frozen=True)
class RankProfile:
    """Numerical rank of every off-diagonal block, level by level.

    ``ranks[l]`` is an ``int64`` array of shape ``(*batch_shape, n_l)``: the ranks of the
    off-diagonal blocks of level ``l`` whose indices are ``indices[l]`` (block ``j`` lies
    below the diagonal of the tree node ``[j 2^l, (j + 1) 2^l)``, see
    :func:`fenwick.blocks_at_level`).  For a mask ``indices[l]`` is every block,
    ``0 .. num_blocks(T, l) - 1``; a tree with dense leaves larger than 1 holds fewer.
    Printing it shows one line per level with the smallest and largest rank.
    """

    T: int
    batch_shape: tuple
    ranks: dict
    indices: dict

    @property
    def max_rank(self) -> int:
        """The largest rank of any block (0 if there are no off-diagonal blocks)."""
        return max((int(r.max()) for r in self.ranks.values() if r.size), default=0)

    @property
    def min_rank(self) -> int:
        """The smallest rank of any block (0 if there are no off-diagonal blocks)."""
        return min((int(r.min()) for r in self.ranks.values() if r.size), default=0)

    def counts(self) -> dict:
        """``{level: {rank: number of blocks}}``."""
        out = {}
        for lev, r in self.ranks.items():
            values, n = np.unique(r, return_counts=True)
            out[lev] = {int(a): int(b) for a, b in zip(values, n)}
        return out

    def _rows(self):
        for lev, r in self.ranks.items():
            hist = ", ".join(f"rank {k}: {n:,}" for k, n in self.counts()[lev].items())
            yield lev, r.shape[-1], int(r.min()), int(r.max()), hist

    def __repr__(self) -> str:
        head = f"RankProfile(T={self.T}, batch_shape={self.batch_shape}, max_rank={self.max_rank})"
        rows = [("level", "blocks", "min", "max", "ranks")]
        rows += [(str(a), f"{b:,}", str(c), str(d), e) for a, b, c, d, e in self._rows()]
        widths = [max(len(r[k]) for r in rows) for k in range(4)]
        lines = [head] + ["  " + "  ".join(r[k].rjust(widths[k]) for k in range(4)) + "  " + r[4] for r in rows]
        return "\n".join(line.rstrip() for line in lines)

    def _repr_html_(self) -> str:
        body = "".join(
            f"<tr><td>{a}</td><td>{b:,}</td><td>{c}</td><td>{d}</td><td>{html.escape(e)}</td></tr>"
            for a, b, c, d, e in self._rows()
        )
        return (
            f"<div><b>RankProfile</b> T={self.T}, batch shape {html.escape(str(self.batch_shape))}, "
            f"max rank {self.max_rank}<table><tr><th>level</th><th>blocks</th><th>min</th><th>max</th>"
            f"<th>ranks</th></tr>{body}</table></div>"
        )


def _mask_ranks(mask, levels) -> dict:
    _checks.needs_values("rank_profile", mask.level_scales)
    out = {}
    for lev in levels:
        u, v = mask.block_factors(lev)
        xp = namespace(u)
        n = fenwick.num_blocks(mask.T, lev)  # block_factors may add a node lying wholly past T
        nonzero = xp.any(u[..., :n, :] != 0, -1) & xp.any(v[..., :n, :] != 0, -1)
        out[lev] = to_numpy(nonzero).astype(np.int64)
    return out


def factor_rank(u, v, rtol=None) -> np.ndarray:
    """Numerical ranks of the blocks ``u @ v^T`` for stacks ``u (..., m, r)``, ``v (..., n, r)``.

    Computed from the factors, never from the ``m x n`` block: QR of each factor, then the
    singular values of the ``r x r`` core ``R_u R_v^T``; singular values above
    ``rtol * sigma_max`` and above the smallest normal float64 count (``rtol`` defaults to
    ``max(m, n, r) * eps``; a subnormal value carries an absolute rounding, so a block that a
    steep decay underflows has rank 0, as :func:`hodlr.tree.numerical_rank` counts it).

    Examples
    --------
    >>> u = np.array([[1.0, 2.0], [2.0, 4.0], [0.0, 1.0]])
    >>> int(factor_rank(u, np.eye(2)[:2]))
    2
    >>> int(factor_rank(np.ones((4, 1)), np.zeros((3, 1))))
    0
    """
    u = np.asarray(u, dtype=np.float64)
    v = np.asarray(v, dtype=np.float64)
    m, r = u.shape[-2:]
    n = v.shape[-2]
    if rtol is None:
        rtol = max(m, n, r) * np.finfo(np.float64).eps
    elif isinstance(rtol, (bool, np.bool_)) or not isinstance(rtol, (int, float, np.integer, np.floating)) \
            or not 0 <= rtol < np.inf:
        raise ValueError(f"rtol must be a finite number >= 0 or None, got {rtol!r}")
    ru = np.linalg.qr(u, mode="r") if m else np.zeros(u.shape[:-2] + (0, r))
    rv = np.linalg.qr(v, mode="r") if n else np.zeros(v.shape[:-2] + (0, r))
    core = ru @ np.swapaxes(rv, -1, -2)
    if core.shape[-1] == 0 or core.shape[-2] == 0:
        return np.zeros(core.shape[:-2], dtype=np.int64)
    sv = np.linalg.svd(core, compute_uv=False)
    floor = np.maximum(rtol * sv[..., :1], np.finfo(np.float64).tiny)
    return np.sum(sv > floor, axis=-1).astype(np.int64)


def _tree_ranks(tree, levels, rtol) -> tuple[dict, dict]:
    by_level = _tree_levels(tree)
    ranks, indices = {}, {}
    for lev in levels:
        blks = by_level[lev]
        indices[lev] = np.array([int(b.index) for b in blks], dtype=np.int64)
        ranks[lev] = np.array([int(factor_rank(to_numpy(b.U), to_numpy(b.V), rtol)) for b in blks], dtype=np.int64)
    return ranks, indices


def rank_profile(obj, levels=None, rtol=None) -> RankProfile:
    """Numerical rank of every off-diagonal block of a mask or tree.

    Parameters
    ----------
    obj : hodlr.LogLinearMask or hodlr.HODLRMatrix
        For a mask the ranks come from :meth:`~hodlr.LogLinearMask.block_factors`: 1,
        or 0 where a factor is all zero.  For a tree, from the SVD of the small core of
        each block's factors (:func:`factor_rank`); the blocks are never formed.
    levels : iterable of int, optional
        Only these levels (default: every level that has off-diagonal blocks).
    rtol : float >= 0, optional
        For trees: the relative threshold of :func:`factor_rank` (a mask's ranks are exact: checked,
        then unused).

    Returns
    -------
    RankProfile

    Examples
    --------
    >>> import numpy as np, hodlr
    >>> prof = rank_profile(hodlr.LogLinearMask(np.ones((6, 4))))
    >>> prof.ranks[1], prof.max_rank
    (array([1, 1, 1]), 1)
    """
    if rtol is not None and (isinstance(rtol, (bool, np.bool_)) or not isinstance(
            rtol, (int, float, np.integer, np.floating)) or not 0 <= rtol < np.inf):
        raise ValueError(f"rtol must be a finite number >= 0 or None, got {rtol!r}")
    s = structure(obj)
    all_levels = [r.level for r in s.table]
    if levels is None:
        levels = all_levels
    else:
        try:
            given = list(levels)
        except TypeError:
            raise TypeError(f"levels must be an iterable of integers, got {levels!r} ({type(levels).__name__})") from None
        levels = [check_int(f"levels[{i}]", lev) for i, lev in enumerate(given)]
        bad = [lev for lev in levels if lev not in all_levels]
        if bad:
            raise ValueError(f"levels must be among {all_levels} for this {s.kind} (T={s.T}), got {bad}")
    if is_mask(obj):
        ranks = _mask_ranks(obj, levels)
        indices = {lev: np.arange(ranks[lev].shape[-1]) for lev in levels}
    else:
        ranks, indices = _tree_ranks(obj, levels, rtol)
    return RankProfile(T=s.T, batch_shape=s.batch_shape, ranks=ranks, indices=indices)
