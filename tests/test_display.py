"""Reprs and rank profiles: right numbers, cheap for long sequences."""

import time

import numpy as np
import pytest

from hodlr import fenwick
import hodlr
from hodlr.display import factor_rank, level_table, rank_profile, structure

LENGTHS = [1, 2, 3, 8, 63, 65, 1000, 4097]


def _mask(T, batch=(), decay=True, seed=0):
    rng = np.random.default_rng(seed)
    lam = rng.uniform(0.5, 1.5, batch + (T, fenwick.num_levels(T)))
    g = np.log(rng.uniform(0.8, 1.0, batch + (T,))) if decay else None
    return hodlr.LogLinearMask(lam, g)


@pytest.mark.parametrize("T", LENGTHS)
def test_level_table_matches_block_enumeration(T):
    table = {r.level: r for r in level_table(T)}
    seen = {}
    for b in fenwick.offdiag_blocks(T):
        n, rows, cols = seen.get(b.level, (0, 0, 0))
        seen[b.level] = (n + 1, rows + b.row_stop - b.row_start, cols + b.col_stop - b.col_start)
    assert {lev: (r.blocks, r.rows, r.cols) for lev, r in table.items()} == seen


@pytest.mark.parametrize("T", LENGTHS)
def test_factor_numbers_count_every_entry_once(T):
    s = structure(_mask(T))
    # diagonal + every off-diagonal block's u and v; the blocks tile the strict lower triangle
    assert sum(r.rows * r.size for r in s.table) == T * (T - 1) // 2
    assert s.factor_numbers == T + sum(r.rows + r.cols for r in s.table)


def test_mask_repr_contents():
    M = _mask(1000, batch=(2, 3))
    text = repr(M)
    assert text.startswith("LogLinearMask(T=1000, levels=11, batch_shape=(2, 3), dtype=float64")
    assert "decay=yes" in text
    assert "11,000 + log-decay 1,000" in text
    assert "1,000,000 dense" in text
    for r in level_table(1000):
        assert r.block_size() in text
    assert "256 x 256, last 232 x 256" in text and "488 x 512" in text  # clipped last blocks
    html = M._repr_html_()
    assert "<table" in html and "1,000,000" in html and "(2, 3)" in html


def test_mask_repr_torch():
    torch = pytest.importorskip("torch")
    M = hodlr.LogLinearMask(torch.ones(5, 4, dtype=torch.float32))
    assert "dtype=float32, device=cpu, decay=no" in repr(M)


@pytest.mark.parametrize("maker", ["numpy", "torch_meta"])
def test_reprs_cheap_for_long_sequences(maker):
    T = 2**20
    if maker == "numpy":
        lam = np.broadcast_to(np.ones(1), (T, fenwick.num_levels(T)))
        M = hodlr.LogLinearMask(lam, validate=False)
    else:
        torch = pytest.importorskip("torch")
        M = hodlr.LogLinearMask(torch.empty(4, T, 21, device="meta"), torch.empty(4, T, device="meta"),
                                validate=False)
    repr(M)
    M._repr_html_()
    start = time.perf_counter()
    for _ in range(5):
        text = repr(M)
        M._repr_html_()
    per_call = (time.perf_counter() - start) / 5
    assert per_call < 0.05, per_call
    assert "1,048,575 rank-1 blocks" in text


@pytest.mark.parametrize("T,leaf", [(1, 1), (8, 1), (63, 1), (100, 4), (65, 3)])
def test_tree_repr_counts(T, leaf):
    from hodlr.tree import HODLRMatrix

    H = HODLRMatrix.from_mask(_mask(T), leaf_size=leaf)
    text, html = repr(H), H._repr_html_()
    s = structure(H)
    assert s.stored == H.num_stored
    assert {r.level: r.blocks for r in s.table} == {
        lev: sum(1 for b in H.blocks() if b.level == lev) for lev in H.levels
    }
    assert all(r.max_rank == 1 for r in s.table)
    assert f"HODLRMatrix(T={T}, levels={fenwick.num_levels(T)}, leaf_size={H.leaf_size}" in text
    assert f"{H.num_stored:,} numbers" in text and "<table" in html and ("max rank" in html or T == 1)


def test_tree_rank_profile_matches_dense_ranks(rng):
    from hodlr.tree import HODLRMatrix

    T = 40
    A = np.tril(rng.standard_normal((T, T)))
    A[32:, :32] = 0.0  # the level-6 block is zero
    A[24:32, 16:24] = rng.standard_normal((8, 3)) @ rng.standard_normal((3, 8))  # a rank-3 level-4 block
    H = HODLRMatrix.from_dense(A, leaf_size=2)
    prof = rank_profile(H)
    for lev, ranks in prof.ranks.items():
        for j, r in zip(prof.indices[lev], ranks):
            blk = H.block(lev, int(j))
            assert r == np.linalg.matrix_rank(A[blk.rows.start:blk.rows.stop, blk.cols.start:blk.cols.stop])
    assert prof.ranks[6].tolist() == [0]
    assert 3 in prof.ranks[4].tolist()
    assert prof.max_rank == 16


@pytest.mark.parametrize("T", LENGTHS)
def test_rank_profile_of_masks_is_all_ones(T):
    prof = rank_profile(_mask(T, batch=(2,)))
    assert sorted(prof.ranks) == [r.level for r in level_table(T)]
    for lev, r in prof.ranks.items():
        assert r.shape == (2, fenwick.num_blocks(T, lev))
        assert (r == 1).all()
    assert prof.max_rank == (1 if T > 1 else 0)
    assert "RankProfile" in repr(prof) and "<table" in prof._repr_html_()


def test_rank_profile_zero_scales_give_rank_zero():
    T = 16
    lam = np.ones((T, 5))
    lam[:, 3] = 0.0
    prof = hodlr.LogLinearMask(lam).rank_profile()
    assert (prof.ranks[3] == 0).all()
    assert prof.counts()[3] == {0: 2}
    assert (prof.ranks[2] == 1).all() and prof.min_rank == 0


def test_rank_profile_torch_matches_numpy():
    torch = pytest.importorskip("torch")
    M = _mask(65)
    Mt = hodlr.LogLinearMask(torch.from_numpy(M.level_scales), torch.from_numpy(M.log_decay))
    a, b = rank_profile(M), rank_profile(Mt)
    assert all((a.ranks[k] == b.ranks[k]).all() for k in a.ranks)


def test_rank_profile_levels_argument():
    M = _mask(64)
    assert list(rank_profile(M, levels=[6, 2]).ranks) == [6, 2]
    with pytest.raises(ValueError, match="levels must be among"):
        rank_profile(M, levels=[7])


def test_factor_rank_against_dense_svd(rng):
    for r in range(0, 4):
        u = rng.standard_normal((3, 9, 3))
        v = rng.standard_normal((3, 7, 3))
        u[..., r:] = 0.0
        expect = [np.linalg.matrix_rank(a @ b.T) for a, b in zip(u, v)]
        assert factor_rank(u, v).tolist() == expect


def test_structure_rejects_other_objects():
    with pytest.raises(TypeError, match="LogLinearMask or hodlr.HODLRMatrix"):
        structure(np.eye(3))


def test_rank_profile_levels_must_be_integers():
    # levels=[1.5] silently became level 1 and levels="a" raised int()'s message
    M = _mask(64)
    with pytest.raises(TypeError, match=r"levels\[1\] must be an integer, got float"):
        rank_profile(M, levels=[2, 1.5])
    with pytest.raises(TypeError, match=r"levels\[0\] must be an integer, got str"):
        rank_profile(M, levels="a")
    with pytest.raises(TypeError, match=r"levels must be an iterable of integers, got 3 \(int\)"):
        rank_profile(M, levels=3)
    assert list(rank_profile(M, levels=(np.int64(2),)).ranks) == [2]


@pytest.mark.parametrize("rtol", [float("nan"), -1.0, float("inf"), "a", True])
def test_factor_rank_refuses_a_bad_rtol(rtol):
    with pytest.raises(ValueError, match="rtol must be a finite number >= 0 or None"):
        hodlr.display.factor_rank(np.ones((3, 1)), np.ones((3, 1)), rtol=rtol)
