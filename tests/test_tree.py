"""The explicit HODLR tree: from a mask (rank-1 blocks), from a dense matrix (SVD), access."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, strategies as st

from hodlr import fenwick
import hodlr
from hodlr.errors import RankExceededError
from hodlr.testing import TOLERANCES, assert_close, masks, operands, st_lengths
from hodlr.display import factor_rank
from hodlr.tree import HODLRMatrix, numerical_rank

TOL64 = TOLERANCES["cpu_float64"]


@given(M=masks(T=st_lengths(1, 200)), data=st.data())
def test_from_mask_reassembles_and_multiplies(M, data):
    H = M.to_hodlr()
    assert isinstance(H, HODLRMatrix) and H.T == M.T and H.leaf_size == 1
    dense = M.to_dense()
    assert_close(H.to_dense(), dense, TOL64, "to_dense")
    X = data.draw(operands(M, broadcast=False))
    assert_close(H.matmul(X), dense @ X, TOL64, "matmul")
    assert_close(H @ X[:, 0], dense @ X[:, 0], TOL64, "matvec")


@given(M=masks(T=st_lengths(2, 150)))
def test_every_block_has_rank_exactly_one(M):
    """The blocks are the index algebra's blocks, the dense mask restricted to each has
    numerical rank exactly 1 (0 where a steep decay underflows the whole block to zeros), and it
    equals the stored ``U V^T``."""
    H = M.to_hodlr()
    dense = M.to_dense()
    blocks = list(H.blocks())
    want = [(b.level, b.index, range(b.row_start, b.row_stop), range(b.col_start, b.col_stop))
            for b in fenwick.offdiag_blocks(M.T)]
    assert [(b.level, b.index, b.rows, b.cols) for b in blocks] == want

    for b in blocks:
        sub = dense[b.rows.start : b.rows.stop, b.cols.start : b.cols.stop]
        assert b.U.shape == (len(b.rows), 1) and b.V.shape == (len(b.cols), 1)
        rank = 1 if np.any(np.abs(sub) >= np.finfo(sub.dtype).tiny) else 0  # subnormals: no rank
        assert numerical_rank(sub) == rank
        assert numerical_rank(b.U @ b.V.T) == rank
        assert_close(b.U @ b.V.T, sub, TOL64, f"block {b.level, b.index}")
    assert H.rank == 1 and H.levels == list(range(1, M.num_levels))


def test_subnormal_singular_values_have_no_rank(rng):
    """A singular value below the smallest normal number carries an absolute rounding, not a relative
    one: a rank-1 block whose entries underflow to subnormals (a steep decay's) has rank 0, not the
    rank its roundings would give, and subnormal bits beside a normal rank-1 block add none; the
    same from the factors (``rank_profile`` of a tree)."""
    u, v = rng.uniform(0.5, 1, (8, 1)), rng.uniform(0.5, 1, (8, 1))
    tiny = (u * 1e-160) @ (v * 1e-160).T  # entries ~1e-320
    assert 0 < np.abs(tiny).max() < np.finfo(np.float64).tiny
    assert numerical_rank(tiny) == 0 and numerical_rank(tiny.astype(np.float32)) == 0
    mixed = u @ v.T
    mixed[:4, :4] += 3 * tiny[:4, :4]
    assert numerical_rank(mixed) == 1
    assert factor_rank(u * 1e-160, v * 1e-160) == 0
    assert factor_rank(np.hstack([u, 1e-200 * u[::-1]]), np.hstack([v, 1e-120 * v[::-1]])) == 1
    assert factor_rank(np.hstack([u, u[::-1]]), np.hstack([v, v[::-1]])) == 2


@pytest.mark.parametrize("T", [1, 2, 3, 63, 65, 1000, 1025])
def test_awkward_lengths(T, rng):
    M = hodlr.LogLinearMask(rng.uniform(0.2, 1.5, (T, fenwick.num_levels(T) + 1)), -rng.uniform(0, 1, T))
    H = M.to_hodlr()
    assert_close(H.to_dense(), M.to_dense(), TOL64)
    X = rng.standard_normal((T, 2))
    assert_close(H.matmul(X), hodlr.matmul(M, X, backend="dense"), TOL64)
    assert H.depth == fenwick.num_levels(T) - 1
    assert H.num_stored == T + sum(len(b.rows) + len(b.cols) for b in H.blocks())


def test_block_lookup(rng):
    T = 13
    M = hodlr.LogLinearMask(rng.uniform(0.2, 1.5, (T, 5)), -rng.uniform(0, 1, T))
    H = M.to_hodlr()
    for want in fenwick.offdiag_blocks(T):
        got = H.block(want.level, want.index)
        assert (got.rows, got.cols) == (range(want.row_start, want.row_stop), range(want.col_start, want.col_stop))
        u, v = M.block_factors(want.level)
        np.testing.assert_array_equal(got.U[:, 0], u[want.index, : len(got.rows)])
        np.testing.assert_array_equal(got.V[:, 0], v[want.index])
    for level, index in [(1, 6), (4, 1), (5, 0), (0, 0)]:
        with pytest.raises(KeyError, match=f"level={level}, index={index}"):
            H.block(level, index)


def test_leaf_size_collapses_low_levels(rng):
    T = 37
    M = hodlr.LogLinearMask(rng.uniform(0.2, 1.5, (T, 7)), -rng.uniform(0, 1, T))
    H = HODLRMatrix.from_mask(M, leaf_size=4)
    assert H.leaf_size == 4 and min(H.levels) == 3
    assert_close(H.to_dense(), M.to_dense(), TOL64)
    with pytest.raises(KeyError, match="dense leaf"):
        H.block(1, 0)
    with pytest.raises(ValueError, match="leaf_size"):
        HODLRMatrix.from_mask(M, leaf_size=0)


def test_strong_decay_factors_are_bounded(rng):
    T = 4097
    g = -rng.uniform(0, 50, T)
    H = hodlr.LogLinearMask(np.ones((T, fenwick.num_levels(T))), g).to_hodlr()
    for b in H.blocks():
        assert np.isfinite(b.U).all() and np.isfinite(b.V).all()
        assert np.abs(b.U).max() <= 1 and np.abs(b.V).max() <= 1


def test_batched_mask_is_refused():
    M = hodlr.LogLinearMask(np.ones((2, 5, 4)))
    with pytest.raises(ValueError, match=r"batch_shape \(2,\)"):
        M.to_hodlr()


def test_torch_mask_becomes_numpy():
    torch = pytest.importorskip("torch")
    T = 20
    lam = torch.rand(T, 6, dtype=torch.float64) + 0.2
    M = hodlr.LogLinearMask(lam, -torch.rand(T, dtype=torch.float64))
    H = M.to_hodlr()
    assert isinstance(H.to_dense(), np.ndarray) and H.dtype == np.float64
    np.testing.assert_allclose(H.to_dense(), M.to_dense().numpy(), rtol=0, atol=1e-14)  # the decay came along
    M32 = hodlr.LogLinearMask(lam.float())
    H32 = M32.to_hodlr()
    assert H32.dtype == np.float32
    np.testing.assert_allclose(H32.to_dense(), M32.to_dense().numpy(), rtol=1e-6, atol=1e-6)


# -- from_dense ---------------------------------------------------------------------------
def _rank_two_hodlr(T, rng):
    """A dense lower-triangular matrix whose off-diagonal blocks have rank exactly 2."""
    parts = [hodlr.LogLinearMask(rng.uniform(0.2, 1.5, (T, fenwick.num_levels(T))), -rng.uniform(0, 1, T))
             for _ in range(2)]
    return parts[0].to_dense() + parts[1].to_dense()


@given(M=masks(T=st_lengths(1, 120), poison=False), leaf_size=st.integers(1, 9))
def test_from_dense_round_trip_of_a_mask(M, leaf_size):
    A = M.to_dense()
    H = HODLRMatrix.from_dense(A, leaf_size=leaf_size, rank=1)
    assert H.rank <= 1 and H.leaf_size <= leaf_size
    assert_close(H.to_dense(), A, TOL64)
    assert all((node.T <= leaf_size) == node.is_leaf for node in H.nodes())


@pytest.mark.parametrize("T", [5, 16, 65, 100])
def test_from_dense_rank_two(T, rng):
    A = _rank_two_hodlr(T, rng)
    H = HODLRMatrix.from_dense(A, rank=2)
    assert H.rank == 2
    assert_close(H.to_dense(), A, TOL64)
    X = rng.standard_normal((T, 3))
    assert_close(H.matmul(X), A @ X, TOL64)
    assert_close(HODLRMatrix.from_dense(A).to_dense(), A, TOL64)


def test_rank_exceeded_names_the_block(rng):
    T = 16
    A = _rank_two_hodlr(T, rng)
    with pytest.raises(RankExceededError) as info:
        HODLRMatrix.from_dense(A, rank=1)
    text = str(info.value)
    assert "level=4, index=0" in text and "rows [8, 16)" in text and "columns [0, 8)" in text
    assert "numerical rank 2" in text and "rank=1" in text
    assert isinstance(info.value, ValueError)


def test_from_dense_bad_inputs():
    A = np.tril(np.ones((6, 6)))
    with pytest.raises(ValueError, match="square"):
        HODLRMatrix.from_dense(np.ones((3, 4)))
    with pytest.raises(ValueError, match="square"):
        HODLRMatrix.from_dense(np.ones(4))
    B = A.copy()
    B[1, 4] = 2.0
    with pytest.raises(ValueError, match=r"lower triangular.*A\[1, 4\]"):
        HODLRMatrix.from_dense(B)
    with pytest.raises(TypeError, match="float32 or float64"):
        HODLRMatrix.from_dense(np.tril(np.ones((4, 4), dtype=int)))
    for bad, error in ((0, ValueError), (-1, ValueError), (1.5, TypeError), (True, TypeError)):
        with pytest.raises(error, match="leaf_size must be an integer >= 1"):
            HODLRMatrix.from_dense(A, leaf_size=bad)
    with pytest.raises(ValueError, match="rank"):
        HODLRMatrix.from_dense(A, rank=-1)
    with pytest.raises(ValueError, match="tol"):
        HODLRMatrix.from_dense(A, tol=0.0)
    C = A.copy()
    C[3, 1] = np.nan
    with pytest.raises(ValueError, match="finite"):
        HODLRMatrix.from_dense(C)


def test_matmul_checks_shape():
    H = HODLRMatrix.from_dense(np.tril(np.ones((5, 5))))
    with pytest.raises(ValueError, match="T=5"):
        H.matmul(np.ones(4))


def test_matmul_takes_leading_dims_as_the_sparse_form_does():
    M = hodlr.LogLinearMask(np.random.default_rng(0).uniform(0.5, 1.5, (37, 7)), -np.linspace(0, 1, 37))
    X = np.random.default_rng(1).standard_normal((2, 3, 37, 4))
    H, S = M.to_hodlr(), M.to_sparse()
    assert_close(H.matmul(X), M.to_dense() @ X, TOL64)
    assert_close(H @ X, S @ X, TOL64)


def test_repr_delegates_to_display():
    from hodlr import display

    H = hodlr.LogLinearMask(np.ones((9, 5))).to_hodlr()
    assert repr(H) == display.tree_repr(H)
    assert H._repr_html_() == display.tree_repr_html(H)


def test_tree_rank_profile_matches_mask_and_export():
    rng = np.random.default_rng(7)
    T = 77
    M = hodlr.LogLinearMask(rng.uniform(0.5, 1.5, (T, hodlr.num_levels(T))), -rng.random(T))
    tree_profile = M.to_hodlr().rank_profile()
    mask_profile = hodlr.rank_profile(M)
    assert tree_profile.max_rank == mask_profile.max_rank == 1
    assert tree_profile.counts() == mask_profile.counts()


def test_internal_node_children_must_be_trees():
    # A11 / A22 that are not HODLRMatrix nodes raised AttributeError ('.T')
    leaf = HODLRMatrix(leaf=np.ones((1, 1)))
    with pytest.raises(TypeError, match=r"A11 must be a HODLRMatrix, got ndarray"):
        HODLRMatrix(A11=np.ones((1, 1)), A22=leaf, U=np.ones((1, 1)), V=np.ones((1, 1)))
    with pytest.raises(TypeError, match=r"A22 must be a HODLRMatrix, got int"):
        HODLRMatrix(A11=leaf, A22=1, U=np.ones((1, 1)), V=np.ones((1, 1)))
