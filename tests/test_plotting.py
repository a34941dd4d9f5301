"""Pictures: drawn headless, with the expected artists."""

import collections

import numpy as np
import pytest

from hodlr import fenwick
import hodlr

matplotlib = pytest.importorskip("matplotlib")
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from hodlr.plotting import default_min_block, heatmap, plot_buckets, save_structure_png, spy  # noqa: E402


def _axes():
    fig = Figure()
    FigureCanvasAgg(fig)
    return fig.add_subplot()


def _gids(artists):
    return collections.Counter(a.get_gid() for a in artists if a.get_gid())


def _mask(T, batch=()):
    rng = np.random.default_rng(T)
    lam = rng.uniform(0.5, 1.5, batch + (T, fenwick.num_levels(T)))
    return hodlr.LogLinearMask(lam, np.log(rng.uniform(0.7, 1.0, batch + (T,))))


@pytest.mark.parametrize("T", [1, 2, 3, 8, 63, 65, 100, 512])
def test_spy_draws_every_block_once(T):
    ax = spy(T, ax=_axes())
    counts = _gids(ax.patches)
    for lev in range(1, fenwick.num_levels(T)):
        assert counts[f"offdiag-L{lev}"] == fenwick.num_blocks(T, lev)
    assert counts["leaf"] == T
    assert sum(v for k, v in counts.items() if k.startswith("offdiag")) == sum(1 for _ in fenwick.offdiag_blocks(T))
    ax.figure.canvas.draw()


@pytest.mark.parametrize("T", [4097, 2**20])
def test_spy_long_sequences_draw_coarse_levels_only(T):
    ax = spy(T, ax=_axes())
    size = default_min_block(T)
    counts = _gids(ax.patches)
    first = size.bit_length()
    assert first > 1
    for lev in range(1, fenwick.num_levels(T)):
        expect = fenwick.num_blocks(T, lev) if lev >= first else 0
        assert counts[f"offdiag-L{lev}"] == expect
        assert expect <= hodlr.plotting.MAX_BLOCKS_PER_LEVEL + 1
    assert counts["leaf"] == -(-T // size)


def test_spy_writes_ranks_of_the_mask():
    T = 16
    lam = np.ones((T, 5))
    lam[:, 4] = 0.0  # level 4's block becomes rank 0
    ax = spy(hodlr.LogLinearMask(lam), ax=_axes())
    texts = collections.defaultdict(list)
    for text in ax.texts:
        texts[text.get_gid()].append(text.get_text())
    assert texts["rank-L4"] == ["0"]
    assert texts["rank-L1"] == ["1"] * 8
    assert texts["rank-L3"] == ["1"] * 2


def test_spy_min_block_and_batched_mask():
    ax = spy(_mask(64, batch=(2,)), ax=_axes(), min_block=4)
    counts = _gids(ax.patches)
    assert counts["offdiag-L1"] == counts["offdiag-L2"] == 0
    assert counts["offdiag-L3"] == 8 and counts["offdiag-L6"] == 1
    assert counts["leaf"] == 16
    with pytest.raises(ValueError, match="min_block must be a power of two"):
        spy(64, ax=_axes(), min_block=3)
    with pytest.raises(TypeError, match="M must be"):
        spy("64", ax=_axes())


@pytest.mark.parametrize("T,leaf", [(1, 1), (8, 1), (48, 4), (65, 3)])
def test_spy_tree_draws_its_own_blocks_and_leaves(T, leaf):
    H = hodlr.HODLRMatrix.from_mask(_mask(T), leaf_size=leaf)
    ax = spy(H, ax=_axes(), min_block=1)
    counts = _gids(ax.patches)
    assert counts["leaf"] == sum(1 for _ in H.leaves())
    for lev in H.levels:
        assert counts[f"offdiag-L{lev}"] == sum(1 for b in H.blocks() if b.level == lev)
    assert sum(v for k, v in counts.items() if k.startswith("offdiag")) == sum(1 for _ in H.blocks())


def test_spy_tree_writes_numerical_ranks(rng):
    A = np.tril(rng.standard_normal((16, 16)))
    H = hodlr.HODLRMatrix.from_dense(A, leaf_size=2)
    ax = spy(H, ax=_axes())
    texts = collections.defaultdict(list)
    for text in ax.texts:
        texts[text.get_gid()].append(text.get_text())
    assert texts["rank-L4"] == ["8"] and texts["rank-L3"] == ["4", "4"]


@pytest.mark.parametrize("T", [1, 5, 64])
def test_heatmap_has_grid_and_log_colours(T):
    M = _mask(T, batch=(3,))
    ax = heatmap(M, ax=_axes(), index=(1,))
    image = ax.images[0]
    assert isinstance(image.norm, matplotlib.colors.LogNorm)
    dense = M.to_dense()[1]
    shown = image.get_array()
    assert np.ma.count_masked(shown) == T * (T - 1) // 2
    np.testing.assert_allclose(shown.compressed(), np.abs(dense)[np.tril_indices(T)])
    counts = _gids(ax.patches)
    for lev in range(1, fenwick.num_levels(T)):
        assert counts[f"grid-L{lev}"] == fenwick.num_blocks(T, lev)
    with pytest.raises(ValueError, match="index must have 1 entries"):
        heatmap(M, ax=_axes(), index=(0, 0))


def test_heatmap_of_a_bfloat16_mask():
    """A bfloat16 mask (which numpy cannot hold) is drawn from its float32 values."""
    torch = pytest.importorskip("torch")
    M = _mask(9)
    M16 = hodlr.LogLinearMask(torch.as_tensor(M.level_scales).bfloat16(), torch.as_tensor(M.log_decay).bfloat16())
    shown = heatmap(M16, ax=_axes()).images[0].get_array()
    want = np.abs(M16.to_dense().float().numpy())[np.tril_indices(9)]
    np.testing.assert_allclose(shown.compressed(), want, rtol=1e-6)


def test_heatmap_of_a_tree_outlines_its_blocks():
    H = hodlr.HODLRMatrix.from_mask(_mask(65), leaf_size=3)
    ax = heatmap(H, ax=_axes(), min_block=1)
    counts = _gids(ax.patches)
    for lev in H.levels:
        assert counts[f"grid-L{lev}"] == sum(1 for b in H.blocks() if b.level == lev)
    assert sum(counts.values()) == sum(1 for _ in H.blocks())


@pytest.mark.parametrize("t,T", [(0, 1), (6, 8), (13, 16), (1000, 4097)])
def test_plot_buckets_one_bar_per_set_bit(t, T):
    ax = plot_buckets(t, T, ax=_axes())
    counts = _gids(ax.patches)
    assert counts["query"] == 1
    bits = [b for b in range(t.bit_length()) if t >> b & 1]
    assert sorted(k for k in counts if k.startswith("bucket")) == sorted(f"bucket-L{b + 1}" for b in bits)
    widths = sorted(p.get_width() for p in ax.patches if p.get_gid().startswith("bucket"))
    assert widths == sorted(1 << b for b in bits)
    assert counts["future"] == (1 if t + 1 < T else 0)
    with pytest.raises(ValueError, match="0 <= t < T"):
        plot_buckets(T, T, ax=_axes())


def test_save_structure_png(tmp_path):
    path = tmp_path / "s.png"
    assert save_structure_png(100, path) == str(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pyplot_axes_and_no_global_changes():
    import matplotlib.pyplot as plt

    before = dict(matplotlib.rcParams)
    backend = matplotlib.get_backend()
    ax = spy(8)
    heatmap(_mask(8))
    plot_buckets(5, 8)
    assert matplotlib.get_backend() == backend
    assert dict(matplotlib.rcParams) == before
    plt.close("all")
    assert ax is not None


def test_default_min_block_is_a_power_of_two_and_spy_draws_odd_leaf_trees():
    # default_min_block documents "the least power of two >= leaf_size"; with leaf_size 3 it
    # returned 3, which spy then refused ("min_block must be a power of two") for a tree
    # whose largest leaf has size 3.
    assert default_min_block(64, 3) == 4
    assert default_min_block(64, 5) == 8
    assert default_min_block(4096, 3) == default_min_block(4096) == 8
    H = hodlr.HODLRMatrix.from_dense(np.tril(np.ones((7, 7))), leaf_size=3)
    assert H.leaf_size == 3
    ax = spy(H, ax=_axes())
    assert _gids(ax.patches)["offdiag-L3"] == 1
    ax.figure.canvas.draw()


@pytest.mark.parametrize("call, error, message", [
    (lambda ax: spy(5, ax=ax, min_block=1.5), TypeError, "min_block must be an integer, got float"),
    (lambda ax: heatmap(_mask(5, (3,)), ax=ax, min_block=3), ValueError, "min_block must be a power of two >= 1, got 3"),
    (lambda ax: heatmap(_mask(5, (3,)), ax=ax, min_block=0), ValueError, "min_block must be a power of two >= 1, got 0"),
    (lambda ax: heatmap(_mask(5, (3,)), ax=ax, index=(5,)), ValueError,
     r"index must have 1 entries within batch shape \(3,\), got \(5,\)"),
    (lambda ax: heatmap(_mask(5, (3,)), ax=ax, index=(0.5,)), TypeError, r"index\[0\] must be an integer, got float"),
    (lambda ax: heatmap(_mask(5, (3,)), ax=ax, index=0), TypeError, "index must be a tuple of 1 integers"),
    (lambda ax: heatmap(_mask(5, (0,)), ax=ax), ValueError, r"M has an empty batch \(shape \(0,\)\)"),
    (lambda ax: spy(_mask(5, (0,)), ax=ax), ValueError, r"M has an empty batch \(batch_shape \(0,\)\)"),
    (lambda ax: plot_buckets(1, 2.5, ax=ax), TypeError, "T must be an integer, got float"),
    (lambda ax: hodlr.plotting.plot_context_parallel([0, 2.7, 5]), TypeError, r"offsets\[1\] must be an integer, got float"),
    (lambda ax: spy(5, ax=ax, cmap="nope"), ValueError, "cmap must be a matplotlib colormap or the name of one"),
    (lambda ax: heatmap(_mask(5), ax=ax, cmap="nope"), ValueError, "cmap must be a matplotlib colormap"),
    (lambda ax: heatmap(_mask(5), ax=ax, vmin=0), ValueError,
     r"vmin must be a finite number > 0 \(the colour scale is logarithmic\), got 0"),
])
def test_bad_drawing_arguments_are_named(call, error, message):
    """Nothing is silently cut (a min_block of 1.5 is not drawn as 1) and every refusal names its argument."""
    with pytest.raises(error, match=message):
        call(_axes())


def test_empty_batch_converts_to_an_empty_array():
    assert hodlr.LogLinearMask(np.ones((0, 5, 4))).to_sparse().shape == (0,)


def test_heatmap_draws_one_batch_entry_and_edge_cases(monkeypatch):
    """Only the drawn entry of a batch is made dense (a batch over the budget draws), the title
    names it; one magnitude is drawn mid-scale; zeros inside the causal triangle are below the
    scale (light grey), the future is blank; a refused argument leaves no figure behind."""
    import matplotlib.pyplot as plt

    monkeypatch.setattr(hodlr.options, "dense_max_bytes", 4 * 256 * 256 * 8)
    wide = hodlr.LogLinearMask(np.ones((256, 9)), -0.01 * np.ones((64, 256)))  # batched by its decay alone
    ax = heatmap(wide, ax=_axes(), index=(-1,), grid=False)
    assert ax.get_title() == "|M| (log scale), T=256, batch entry (63,)"
    norm = heatmap(hodlr.LogLinearMask(np.ones((3, 3))), ax=_axes()).images[0].norm
    assert norm.vmin < 1 < norm.vmax and np.isclose(norm.vmin * norm.vmax, 1.0)
    lam = np.ones((8, 4))
    lam[:, 3] = 0.0  # the level-3 block: zeros inside the triangle
    image = heatmap(hodlr.LogLinearMask(lam), ax=_axes()).images[0]
    shown = image.get_array()
    assert shown[7, 0] < image.norm.vmin and not np.ma.getmaskarray(shown)[7, 0]
    assert np.ma.getmaskarray(shown)[0, 7]
    before = plt.get_fignums()
    for kw in (dict(cmap="nope"), dict(vmin=-1.0)):
        with pytest.raises(ValueError):
            heatmap(_mask(5), **kw)
    with pytest.raises(ValueError):
        spy(8, cmap="nope")
    assert plt.get_fignums() == before


def test_spy_legend_says_where_blocks_are_clipped():
    labels = [t.get_text() for t in spy(100, ax=_axes()).get_legend().get_texts()]
    assert "level 5 (16x16)" in labels and "level 7 (64x64, clipped at T)" in labels
