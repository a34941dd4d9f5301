"""Pictures of the HODLR structure (matplotlib, imported only when drawing).

Nothing here changes matplotlib's global settings.  Every function draws on the axes it
is given (or on a new figure's axes) and returns them.  The artists carry a ``gid`` so
that programs and tests can find them:

* ``"offdiag-L<l>"``: an off-diagonal block of level ``l`` (a ``Rectangle``);
* ``"rank-L<l>"``: the rank written inside such a block (a ``Text``);
* ``"leaf"``: a lower-triangular diagonal leaf (a ``Polygon``);
* ``"grid-L<l>"``: a block outline over a heat map;
* ``"bucket-L<l>"``: a Fenwick bucket of level ``l`` (``"query"`` for level 0);
* ``"sent-L<l>"`` / ``"composed-L<l>"``: in :func:`plot_context_parallel`, a bucket a rank sends
  (of its end, over its own tokens) / a bucket of its start that it composes from earlier ranks.

Geometry comes from :func:`fenwick.blocks_at_level` (never a ``T x T`` loop); for long
sequences only blocks of at least ``min_block`` columns are drawn and the finer levels
are shown as shaded diagonal leaves of that size.
"""

from __future__ import annotations

import numpy as np

from hodlr import display, fenwick
from hodlr.fenwick.arrays import check_int, to_numpy

__all__ = ["default_min_block", "heatmap", "plot_buckets", "plot_context_parallel", "save_structure_png", "spy"]

MAX_BLOCKS_PER_LEVEL = 256
"""Default drawing budget: the finest level drawn has at most about this many blocks."""

LEAF_COLOR = "0.55"


def _need_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ModuleNotFoundError as err:  # pragma: no cover - exercised only without matplotlib
        raise ModuleNotFoundError(
            "hodlr's pictures need matplotlib; install it with `pip install matplotlib` "
            "(in a checkout of hodlr: `pip install -e '.[plot]'`)"
        ) from err


def _new_axes(ax, size=(5.0, 5.0)):
    if ax is not None:
        return ax
    import matplotlib.pyplot as plt

    _, ax = plt.subplots(figsize=size)
    return ax


def default_min_block(T: int, leaf_size: int = 1) -> int:
    """The smallest block size :func:`spy` draws by default: the least power of two
    ``>= leaf_size`` whose level has at most ``MAX_BLOCKS_PER_LEVEL`` blocks.

    >>> default_min_block(64), default_min_block(4096), default_min_block(2**20)
    (1, 8, 2048)
    """
    size = 1 << (max(1, int(leaf_size)) - 1).bit_length()
    while T / (2 * size) > MAX_BLOCKS_PER_LEVEL:
        size *= 2
    return size


def _describe(obj):
    """``(T, leaf_size, kind, ranks_fn)`` for an int, a mask or a tree."""
    if isinstance(obj, (int, np.integer)) and not isinstance(obj, (bool, np.bool_)):
        return check_int("T", obj, 1), 1, "structure", None
    if display.is_mask(obj):
        if 0 in obj.batch_shape:
            raise ValueError(f"M has an empty batch (batch_shape {obj.batch_shape}): nothing to draw")
        return obj.T, 1, "LogLinearMask", obj
    if display.is_tree(obj) and hasattr(obj, "leaf_size"):
        return int(obj.T), int(obj.leaf_size), type(obj).__name__, obj
    raise TypeError(
        f"M must be an int T, a hodlr.LogLinearMask or a hodlr.HODLRMatrix, got {type(obj).__name__}"
    )


def _min_block(min_block, T: int, leaf: int) -> int:
    """The smallest block drawn: a power of two >= 1 (default :func:`default_min_block`), at least
    the tree's leaf size."""
    if min_block is None:
        return default_min_block(T, leaf)
    min_block = check_int("min_block", min_block)
    if min_block < 1 or min_block & (min_block - 1):
        raise ValueError(f"min_block must be a power of two >= 1, got {min_block}")
    return max(min_block, leaf)


def _level_colors(n_levels: int, cmap):
    import matplotlib

    if isinstance(cmap, str) and cmap not in matplotlib.colormaps:
        raise ValueError(f"cmap must be a matplotlib colormap or the name of one, got {cmap!r}")
    cm = matplotlib.colormaps[cmap] if isinstance(cmap, str) else cmap
    if n_levels <= 1:
        return [cm(0.5)]
    return [cm(0.15 + 0.7 * i / (n_levels - 1)) for i in range(n_levels)]


def _text_color(rgba) -> str:
    """Black on light fills, white on dark ones."""
    r, g, b = rgba[:3]
    return "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"


def _reduce_ranks(ranks: np.ndarray) -> np.ndarray:
    """Over a batch, the largest rank of each block (what the picture writes)."""
    return ranks.reshape(-1, ranks.shape[-1]).max(0) if ranks.ndim > 1 else ranks


def _spy_geometry(T, min_block, source, ranks):
    """``({level: (row_start, row_stop, col_start, col_stop, rank or None)}, [(a, b) leaves])``
    for the blocks of at least ``min_block`` columns."""
    first = min_block.bit_length()  # levels whose blocks have 2**(l-1) >= min_block columns
    if source is None or display.is_mask(source):
        levels = [lev for lev in range(first, fenwick.num_levels(T)) if fenwick.num_blocks(T, lev)]
        indices = {lev: np.arange(fenwick.num_blocks(T, lev)) for lev in levels}
        tree_leaves = None
    else:
        present = sorted({int(b.level) for b in source.blocks()})
        levels = [lev for lev in present if lev >= first]
        tree_leaves = [(node.start, node.start + node.T) for node in source.leaves()] if levels == present else None
        indices = None
    rank_of = {}
    if ranks and levels:
        if source is None:
            rank_of = {lev: np.ones(fenwick.num_blocks(T, lev), dtype=np.int64) for lev in levels}
        else:
            prof = display.rank_profile(source, levels=levels)
            rank_of = {lev: _reduce_ranks(r) for lev, r in prof.ranks.items()}
            indices = prof.indices
    if indices is None:
        indices = {lev: np.array([b.index for b in source.blocks() if b.level == lev]) for lev in levels}
    geometry = {}
    for lev in levels:
        rs, re, cs, ce = (a[indices[lev]] for a in fenwick.blocks_at_level(T, lev))
        geometry[lev] = (rs, re, cs, ce, rank_of.get(lev))
    if tree_leaves is None:
        tree_leaves = [(a, min(a + min_block, T)) for a in range(0, T, min_block)]
    return geometry, tree_leaves


def spy(M, ax=None, *, min_block=None, ranks=True, cmap="viridis", legend=None, fontsize=None):
    """Draw the block partition of a HODLR matrix.

    Off-diagonal blocks are filled with one colour per level and carry their rank
    (written where the block is large enough to hold it); diagonal leaves are shaded
    lower triangles; the upper triangle stays empty.

    Parameters
    ----------
    M : int, LogLinearMask or HODLRMatrix
        An int ``T`` draws the structure of length ``T`` (all blocks rank 1).
    ax : matplotlib Axes, optional
        Drawn on if given, else a new figure is made.
    min_block : int, optional
        Draw only levels whose blocks have at least this many columns; finer structure is
        drawn as shaded leaves of this size.  Default :func:`default_min_block`.
    ranks : bool, default True
        Write each block's rank (from :func:`hodlr.rank_profile`; for a batched
        mask, the largest over the batch).
    cmap : str or Colormap, default ``"viridis"``
        Colours of the levels.
    legend : bool, optional
        Show a legend of the levels (default: when at most 12 levels are drawn).
    fontsize : float, optional
        Size of the rank labels (default 9).

    Returns
    -------
    matplotlib.axes.Axes

    Examples
    --------
    >>> from matplotlib.figure import Figure
    >>> ax = spy(8, ax=Figure().add_subplot())
    >>> sum(p.get_gid() == "offdiag-L1" for p in ax.patches)
    4
    """
    _need_matplotlib()
    from matplotlib.patches import Patch, Polygon, Rectangle

    T, leaf, kind, source = _describe(M)
    min_block = _min_block(min_block, T, leaf)
    geometry, leaves = _spy_geometry(T, min_block, source, ranks)
    levels = list(geometry)

    colors = dict(zip(levels, _level_colors(len(levels), cmap)))  # (a bad cmap refused before a figure is made)
    ax = _new_axes(ax)
    if fontsize is None:
        fontsize = 9
    for a, b in leaves:
        ax.add_patch(Polygon([(a, a), (a, b), (b, b)], closed=True, facecolor=LEAF_COLOR, edgecolor="none", gid="leaf"))
    handles = []
    for lev, (rs, re, cs, ce, rank) in geometry.items():
        color = colors[lev]
        for j in range(rs.size):
            ax.add_patch(
                Rectangle((cs[j], rs[j]), ce[j] - cs[j], re[j] - rs[j], facecolor=color, edgecolor="white",
                          linewidth=0.6 if rs.size < 64 else 0.2, gid=f"offdiag-L{lev}")
            )
        half = 1 << (lev - 1)
        if rank is not None and half * 24 >= T:
            for j in range(rs.size):
                ax.text((cs[j] + ce[j]) / 2, (rs[j] + re[j]) / 2, str(int(rank[j])), ha="center", va="center",
                        fontsize=fontsize, color=_text_color(color), gid=f"rank-L{lev}")
        clipped = bool(np.any(re - rs < half) or np.any(ce - cs < half))
        handles.append(Patch(facecolor=color, label=f"level {lev} ({half}x{half}{', clipped at T' if clipped else ''})"))
    ax.set_xlim(0, T)
    ax.set_ylim(T, 0)
    ax.set_aspect("equal")
    ax.set_xlabel("key position s")
    ax.set_ylabel("query position t")
    note = f", blocks >= {min_block}" if min_block > leaf else ""
    ax.set_title(f"{kind}: T={T}, leaves {leaf}x{leaf}{note}", fontsize=10)
    if legend is None:
        legend = 0 < len(levels) <= 12
    if legend:
        label = "diagonal leaves" if min_block == 1 else f"leaves (<= {min_block}x{min_block})"
        handles.append(Patch(facecolor=LEAF_COLOR, label=label))
        ax.legend(handles=handles, loc="upper right", fontsize=7, frameon=True)
    return ax


def heatmap(M, ax=None, *, index=None, grid=True, min_block=None, cmap="magma", vmin=None, colorbar=True):
    """The mask's ``|values|`` on a logarithmic colour scale, with the block grid over it.

    Entries of the causal triangle below the colour scale (exact zeros included, e.g. where a level
    scale is 0 or a decay underflows) are drawn light grey; the future (above the diagonal) is left
    blank.  A mask whose entries all have one magnitude is drawn in the middle of a scale around it.

    Parameters
    ----------
    M : LogLinearMask or HODLRMatrix
        Anything with ``T`` and ``to_dense()``; the dense matrix of the drawn batch entry is
        formed, so keep ``T`` moderate (the mask's dense budget applies).
    ax : matplotlib Axes, optional
    index : tuple of int, optional
        Which matrix of a batch to draw (default: the first); the title names it.
    grid : bool, default True
        Outline the off-diagonal blocks (those of at least ``min_block`` columns).
    min_block : int, optional
        The narrowest block outlined (default :func:`default_min_block`).
    cmap : str or Colormap, default ``"magma"``
    vmin : float > 0, optional
        Lower end of the colour scale (default: the smallest non-zero ``|value|``).
    colorbar : bool, default True

    Returns
    -------
    matplotlib.axes.Axes

    Examples
    --------
    >>> import numpy as np, hodlr
    >>> from matplotlib.figure import Figure
    >>> ax = heatmap(hodlr.LogLinearMask(np.ones((2, 8, 4))), ax=Figure().add_subplot(), index=(1,))
    >>> ax.get_title()
    '|M| (log scale), T=8, batch entry (1,)'
    """
    _need_matplotlib()
    import matplotlib
    from matplotlib.colors import LogNorm
    from matplotlib.patches import Rectangle

    if not hasattr(M, "to_dense") or not hasattr(M, "T"):
        raise TypeError(f"M must be a hodlr.LogLinearMask or hodlr.HODLRMatrix, got {type(M).__name__}")
    if vmin is not None:
        if isinstance(vmin, bool) or not isinstance(vmin, (int, float, np.integer, np.floating)) or not (
                0 < float(vmin) < np.inf):
            raise ValueError(f"vmin must be a finite number > 0 (the colour scale is logarithmic), got {vmin!r}")
        vmin = float(vmin)
    if isinstance(cmap, str) and cmap not in matplotlib.colormaps:
        raise ValueError(f"cmap must be a matplotlib colormap or the name of one, got {cmap!r}")
    palette = (matplotlib.colormaps[cmap] if isinstance(cmap, str) else cmap).with_extremes(under="0.85")
    T = int(M.T)
    leaf = int(getattr(M, "leaf_size", 1))
    if grid:
        min_block = _min_block(min_block, T, leaf)
    batch = tuple(M.batch_shape) if display.is_mask(M) else None
    if batch:  # one matrix of the batch: only it is made dense
        index = _batch_index(index, batch)
        dense = to_numpy(_batch_entry(M, index).to_dense())
    else:
        dense = to_numpy(M.to_dense())
        if dense.ndim > 2:
            batch = dense.shape[:-2]
            index = _batch_index(index, batch)
            dense = dense[index]
        elif index not in (None, ()):
            raise ValueError(f"index must be None for an unbatched matrix, got {index}")
        else:
            index = None
    mag = np.abs(dense.astype(np.float64))
    nonzero = mag[mag > 0]
    if vmin is None:
        vmin = float(nonzero.min()) if nonzero.size else 1.0
    vmax = float(nonzero.max()) if nonzero.size else vmin
    if vmax <= vmin:  # one magnitude (or none): a decade around it, so it shows mid-scale
        vmin, vmax = vmin / np.sqrt(10.0), vmin * np.sqrt(10.0)
    lower = np.tril(np.ones((T, T), dtype=bool))
    shown = np.ma.masked_where(~lower, np.where(lower & (mag < vmin), vmin / 10.0, mag))
    ax = _new_axes(ax, (5.6, 5.0))
    image = ax.imshow(shown, cmap=palette, norm=LogNorm(vmin=vmin, vmax=vmax), extent=(0, T, T, 0),
                      interpolation="nearest")
    if grid:
        geometry, _ = _spy_geometry(T, min_block, M, ranks=False)
        for lev, (rs, re, cs, ce, _) in geometry.items():
            for j in range(rs.size):
                ax.add_patch(Rectangle((cs[j], rs[j]), ce[j] - cs[j], re[j] - rs[j], fill=False,
                                       edgecolor="cyan", linewidth=0.5, gid=f"grid-L{lev}"))
    if colorbar:
        extend = "min" if bool(np.any(lower & (mag < vmin))) else "neither"
        ax.figure.colorbar(image, ax=ax, label="|M[t, s]|", shrink=0.85, extend=extend)
    ax.set_xlabel("key position s")
    ax.set_ylabel("query position t")
    ax.set_title(f"|M| (log scale), T={T}" + (f", batch entry {index}" if index else ""), fontsize=10)
    return ax


def _batch_index(index, batch) -> tuple:
    """``index`` (default the first entry) checked against the batch shape ``batch``."""
    if 0 in batch:
        raise ValueError(f"M has an empty batch (shape {batch}): nothing to draw")
    if index is None:
        return tuple(0 for _ in batch)
    if not isinstance(index, (tuple, list)):
        raise TypeError(f"index must be a tuple of {len(batch)} integers for batch shape {batch}, got {index!r}")
    index = tuple(check_int(f"index[{i}]", x) for i, x in enumerate(index))
    if len(index) != len(batch) or not all(-n <= i < n for i, n in zip(index, batch)):
        raise ValueError(f"index must have {len(batch)} entries within batch shape {batch}, got {index}")
    return tuple(i % n for i, n in zip(index, batch))


def _batch_entry(M, index):
    """The mask of batch entry ``index`` of ``M`` (each generator indexed where it is batched), of
    ``M``'s own class (this module imports no mask)."""

    def pick(a, inner):
        if a is None:
            return None
        own = tuple(a.shape[: a.ndim - inner])
        at = index[len(index) - len(own):]
        return a[tuple(i if n > 1 else 0 for i, n in zip(at, own))]

    return type(M)(pick(M.level_scales, 2), pick(M.log_decay, 1), validate=False)


def plot_buckets(t: int, T: int | None = None, ax=None, *, cmap="viridis"):
    """The Fenwick buckets seen from query position ``t``.

    The positions ``0 .. T-1`` form a row; ``[0, t)`` splits into one bucket per set
    bit of ``t`` (level ``b + 1`` for bit ``b``), coloured as :func:`spy` colours the levels
    when it draws every level (``min_block=1``);
    ``t`` itself is level 0; positions after ``t`` are future (masked).

    Parameters
    ----------
    t : int
        The query position, ``0 <= t < T``.
    T : int, optional
        Sequence length (default ``t + 1``).
    ax : matplotlib Axes, optional
    cmap : str or Colormap, default ``"viridis"``
        Colours of the levels (as :func:`spy`'s).

    Returns
    -------
    matplotlib.axes.Axes
    """
    _need_matplotlib()
    import matplotlib.colors
    from matplotlib.patches import Rectangle

    t = check_int("t", t)
    T = t + 1 if T is None else check_int("T", T)
    if not 0 <= t < T:
        raise ValueError(f"t must satisfy 0 <= t < T, got t={t}, T={T}")
    colors = _level_colors(max(fenwick.num_levels(T) - 1, 1), cmap)
    ax = _new_axes(ax, (min(12.0, 2.0 + 0.25 * T), 1.9))
    for lev, start, stop in fenwick.buckets(t):
        color = "crimson" if lev == 0 else colors[lev - 1]
        ax.add_patch(Rectangle((start, 0), stop - start, 1, facecolor=color, edgecolor="white", linewidth=1.0,
                               gid="query" if lev == 0 else f"bucket-L{lev}"))
        label = "t" if lev == 0 else f"L{lev}\n{stop - start}"
        ax.text((start + stop) / 2, 0.5, label, ha="center", va="center", fontsize=8,
                color=_text_color(matplotlib.colors.to_rgba(color)), gid="bucket-label")
    if t + 1 < T:
        ax.add_patch(Rectangle((t + 1, 0), T - t - 1, 1, facecolor="0.9", edgecolor="none", gid="future"))
    if T <= 64:
        ax.set_xticks(np.arange(T) + 0.5)
        ax.set_xticklabels([str(i) for i in range(T)], fontsize=6)
    ax.set_xlim(0, T)
    ax.set_ylim(0, 1)
    ax.set_yticks([])
    ax.set_xlabel("key position s")
    ax.set_title(f"Fenwick buckets of t = {t} = 0b{t:b}", fontsize=10)
    return ax


def plot_context_parallel(offsets, axes=None, *, cmap="viridis"):
    """What crosses ranks when a sequence is split into contiguous shards (``hodlr.distributed``).

    Left: the mask, each entry ``(t, s)`` coloured by the rank holding key ``s`` when it lies on an
    earlier rank than query ``t`` (what reaches ``t`` through the exchanged states), grey when both
    lie on one rank (computed there), with the HODLR blocks outlined: the blocks that straddle a
    shard boundary are split between the local pass and the carried states.  Right: for each rank
    ``r`` on ``[a, b) = [offsets[r], offsets[r + 1])``, the buckets it sends (those of ``b`` over
    its own tokens: one ``Dk x Dv`` matrix per level, head and sequence) and the buckets of ``a``
    that it composes from the earlier ranks' states, coloured by level as in :func:`plot_buckets`.

    Parameters
    ----------
    offsets : sequence of int
        ``world + 1`` non-decreasing shard offsets from 0 (``hodlr.distributed.shard_offsets``);
        at most 256 tokens.
    axes : pair of matplotlib Axes, optional
    cmap : str or Colormap, default ``"viridis"``

    Returns
    -------
    (Axes, Axes)

    Examples
    --------
    >>> from matplotlib.figure import Figure
    >>> fig = Figure()
    >>> left, right = plot_context_parallel([0, 5, 12], axes=fig.subplots(1, 2))
    >>> sorted({p.get_gid() for p in right.patches if p.get_gid().startswith("sent")})
    ['sent-L1', 'sent-L3', 'sent-L4']
    """
    _need_matplotlib()
    import matplotlib
    import matplotlib.colors
    from matplotlib.patches import Rectangle

    o = [check_int(f"offsets[{i}]", x) for i, x in enumerate(offsets)]
    if len(o) < 2 or o[0] != 0 or any(b < a for a, b in zip(o, o[1:])):
        raise ValueError(f"offsets must be non-decreasing from 0 with at least two entries, got {list(offsets)}")
    T, world = o[-1], len(o) - 1
    if not 1 <= T <= 256:
        raise ValueError(f"the picture draws 1 to 256 tokens, got offsets ending at {T}")
    if axes is None:
        import matplotlib.pyplot as plt

        _, axes = plt.subplots(1, 2, figsize=(12.0, 5.6), gridspec_kw={"width_ratios": [1, 1.35]})
    left, right = axes
    ranks = np.searchsorted(np.asarray(o[1:]), np.arange(T), side="right")
    palette = matplotlib.colormaps["tab10"]
    image = np.ones((T, T, 4))
    t, s = np.arange(T)[:, None], np.arange(T)[None, :]
    below = s <= t
    image[below & (ranks[s] == ranks[t])] = matplotlib.colors.to_rgba("0.82")
    for j in range(world):
        image[below & (ranks[s] == j) & (ranks[t] > j)] = palette(j % 10)
    left.imshow(image, extent=(0, T, T, 0), interpolation="nearest", gid="mask")
    for lev in range(1, fenwick.num_levels(T)):
        for rs, re, cs, ce in zip(*fenwick.blocks_at_level(T, lev)):
            left.add_patch(Rectangle((cs, rs), ce - cs, re - rs, facecolor="none", edgecolor="black",
                                     linewidth=0.4 + 0.25 * lev, gid=f"offdiag-L{lev}"))
    for x in o[1:-1]:
        left.axvline(x, color="black", linestyle="--", linewidth=0.8, gid="shard-boundary")
        left.axhline(x, color="black", linestyle="--", linewidth=0.8, gid="shard-boundary")
    from matplotlib.patches import Patch

    handles = [Patch(facecolor=palette(j % 10), label=f"key on rank {j}, query later") for j in range(world - 1)]
    handles.append(Patch(facecolor="0.82", label="key and query on one rank"))
    left.legend(handles=handles, loc="upper right", fontsize=7, frameon=True)
    left.set_xlim(0, T)
    left.set_ylim(T, 0)
    left.set_aspect("equal")
    left.set_xlabel("key position s")
    left.set_ylabel("query position t")
    left.set_title("mask entries by the rank of the key", fontsize=10)

    colors = _level_colors(T.bit_length(), cmap)  # the end T has buckets up to level bit_length(T)
    for r in range(world):
        a, b = o[r], o[r + 1]
        y = 2 * r
        right.add_patch(Rectangle((a, y), b - a, 2, facecolor=palette(r % 10), alpha=0.18, edgecolor="none",
                                  gid="shard"))
        rows = ((y + 0.1, "sent", [(lev, max(lo, a), hi) for lev, lo, hi in fenwick.buckets(b)[1:] if hi > a]),
                (y + 1.0, "composed", fenwick.buckets(a)[1:] if a else []))
        for y0, kind, spans in rows:
            for lev, lo, hi in spans:
                color = colors[lev - 1]
                right.add_patch(Rectangle((lo, y0), hi - lo, 0.85, facecolor=color, edgecolor="white",
                                          linewidth=1.0, hatch=None if kind == "sent" else "//", gid=f"{kind}-L{lev}"))
                if hi - lo >= 0.03 * T:
                    right.text((lo + hi) / 2, y0 + 0.43, f"L{lev}", ha="center", va="center", fontsize=7,
                               color=_text_color(matplotlib.colors.to_rgba(color)))
        note = " (final state only)" if r == world - 1 else ""
        right.text(T + 0.5, y + 0.55, f"rank {r} sends (end {b}){note}", va="center", fontsize=8)
        right.text(T + 0.5, y + 1.45, f"rank {r} composes (start {a})", va="center", fontsize=8)
    right.set_xlim(0, T)
    right.set_ylim(2 * world, 0)
    right.set_yticks([])
    right.set_xlabel("key position s")
    right.set_title("bucket states: sent by each rank, composed at each start", fontsize=10)
    return left, right


def save_structure_png(T: int, path, *, min_block=None, dpi: int = 120, size: float = 6.0) -> str:
    """Write :func:`spy` of length ``T`` to a PNG file (for ``hodlr show T --png FILE``).

    Uses a standalone Agg canvas: no pyplot, no display, no global state.

    Parameters
    ----------
    T : int
        Sequence length, ``>= 1``.
    path : str or path-like
        Where to write the PNG.
    min_block : int, optional
        Passed to :func:`spy`.
    dpi : int, default 120
    size : float, default 6.0
        Figure width and height in inches.

    Returns
    -------
    str
        The path written.
    """
    _need_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(size, size))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    spy(int(T) if isinstance(T, (int, np.integer)) else T, ax=ax, min_block=min_block)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi, format="png")
    return str(path)
