"""The sparse form ``diag(lam0) + U V^T``: exact counts, exact block layout, values."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse
from hypothesis import given, strategies as st

from hodlr import fenwick
import hodlr
from hodlr.sparse import SparseMask, mask_to_sparse
from hodlr.testing import TOLERANCES, assert_close, masks, operands, st_lengths

TOL64 = TOLERANCES["cpu_float64"]


def predicted_counts(T: int):
    """``(K, nnz(U), nnz(V))`` from the index algebra alone."""
    levels = range(1, fenwick.num_levels(T))
    K = sum(fenwick.num_blocks(T, lev) for lev in levels)
    nnz_u = sum(bin(t).count("1") for t in range(T))
    nnz_v = sum(fenwick.num_blocks(T, lev) << (lev - 1) for lev in levels)
    return K, nnz_u, nnz_v


@given(T=st.one_of(st_lengths(1, 3000), st.sampled_from([4096, 4097, 8191])))
def test_counts_are_exact(T):
    S = hodlr.LogLinearMask(np.ones((T, fenwick.num_levels(T))), -np.ones(T)).to_sparse()
    K, nnz_u, nnz_v = predicted_counts(T)
    assert (S.K, S.U.shape, S.V.shape) == (K, (T, K), (T, K))
    assert (S.U.nnz, S.V.nnz, S.nnz) == (nnz_u, nnz_v, T + nnz_u + nnz_v)
    if T & (T - 1) == 0:
        assert K == T - 1
    assert np.array_equal(np.bincount(S.levels, minlength=fenwick.num_levels(T))[1:],
                          [fenwick.num_blocks(T, lev) for lev in range(1, fenwick.num_levels(T))])


@pytest.mark.parametrize("T", [1, 2, 3, 5, 8, 63, 65, 100])
def test_columns_are_the_blocks(T):
    """Column ``b`` of U is supported exactly on block ``b``'s rows, of V on its columns,
    in the order of :func:`fenwick.offdiag_blocks`."""
    S = hodlr.LogLinearMask(np.ones((T, fenwick.num_levels(T)))).to_sparse()
    U, V = S.U.tocsc(), S.V.tocsc()
    blocks = list(fenwick.offdiag_blocks(T))
    assert len(blocks) == S.K
    for b, blk in enumerate(blocks):
        assert S.levels[b] == blk.level
        assert list(U.indices[U.indptr[b] : U.indptr[b + 1]]) == list(range(blk.row_start, blk.row_stop))
        assert list(V.indices[V.indptr[b] : V.indptr[b + 1]]) == list(range(blk.col_start, blk.col_stop))


@given(M=masks(), data=st.data())
def test_values_match_dense(M, data):
    S = M.to_sparse()
    assert isinstance(S, SparseMask)
    assert isinstance(S.U, scipy.sparse.csr_array) and isinstance(S.V, scipy.sparse.csc_array)
    dense = M.to_dense()
    assert_close(S.toarray(), dense, TOL64, "toarray")
    X = data.draw(operands(M, broadcast=False))
    assert_close(S.matmul(X), dense @ X, TOL64, "matmul")
    assert_close(S @ X[:, 0], dense @ X[:, 0], TOL64, "matvec")


def test_batched_gives_an_object_array_of_masks(rng):
    T = 21
    lam = rng.uniform(0.2, 1.5, (2, 3, T, fenwick.num_levels(T)))
    M = hodlr.LogLinearMask(lam, -rng.uniform(0, 1, (3, T)))
    S = M.to_sparse()
    assert S.dtype == object and S.shape == (2, 3)
    dense = M.to_dense()
    for index in np.ndindex(2, 3):
        assert_close(S[index].toarray(), dense[index], TOL64)


def test_matmul_with_leading_dims(rng):
    T = 17
    M = hodlr.LogLinearMask(rng.uniform(0.2, 1.5, (T, fenwick.num_levels(T))))
    X = rng.standard_normal((4, 2, T, 3))
    assert_close(M.to_sparse().matmul(X), M.to_dense() @ X, TOL64)
    with pytest.raises(ValueError, match="T=17"):
        M.to_sparse().matmul(np.ones((T + 1, 2)))


def test_torch_and_float32_masks():
    torch = pytest.importorskip("torch")
    T = 30
    lam = torch.rand(T, fenwick.num_levels(T), dtype=torch.float32) + 0.2
    M = hodlr.LogLinearMask(lam, -torch.rand(T))
    S = mask_to_sparse(M)
    assert S.dtype == np.float32 and S.U.dtype == np.float32 and isinstance(S.diagonal, np.ndarray)
    np.testing.assert_allclose(S.toarray(), M.to_dense().numpy(), rtol=1e-5, atol=1e-6)
    S64 = hodlr.LogLinearMask(lam.double()).to_sparse()
    assert S64.dtype == np.float64
    assert_close(S64.toarray(), hodlr.LogLinearMask(lam.double()).to_dense().numpy(), TOL64)


def test_strong_decay_long_sequence_stays_finite(rng):
    T = 1 << 14
    g = -rng.uniform(0, 50, T)
    S = hodlr.LogLinearMask(np.ones((T, fenwick.num_levels(T))), g).to_sparse()
    assert np.isfinite(S.U.data).all() and np.isfinite(S.V.data).all()
    assert np.abs(S.U.data).max() <= 1 and np.abs(S.V.data).max() <= 1


@pytest.mark.parametrize("width", [1, 2, 7])
def test_sparse_attention_in_column_groups(monkeypatch, width, rng):
    """The sparse backend forms the block states a few columns of v at a time."""
    import hodlr.backends.sparse as backend

    monkeypatch.setattr(backend, "STATE_WIDTH", width)
    T = 50
    M = hodlr.LogLinearMask(rng.uniform(0.2, 1.5, (2, T, fenwick.num_levels(T))), -rng.uniform(0, 1, T))
    q, k = rng.standard_normal((2, 2, T, 3))
    v = rng.standard_normal((2, T, 5))
    want = hodlr.attention(q, k, v, M, scale=0.3, backend="dense")
    assert_close(hodlr.attention(q, k, v, M, scale=0.3, backend="sparse"), want, TOL64)


def test_structure_cache_is_bounded_by_bytes(monkeypatch):
    """The index arrays kept for reuse stay within ``CACHE_BYTES`` (the latest length always kept)."""
    from hodlr import sparse

    sparse.clear_cache()
    first = sparse.sparse_structure(1000)
    assert sparse.sparse_structure(1000) is first
    monkeypatch.setattr(sparse, "CACHE_BYTES", 1)
    last = sparse.sparse_structure(1001)
    assert list(sparse._CACHE) == [1001] and sparse.sparse_structure(1001) is last
    sparse.clear_cache()
    assert not sparse._CACHE


@pytest.mark.parametrize("T", [1, 2, 3, 63, 65, 1000])
def test_linear_operator_and_transpose_equal_dense(T):
    """``M.aslinearoperator()``: products with the mask and with its transpose (vectors, matrices,
    ``@`` from both sides) equal the dense mask's, float64, with a decay."""
    from scipy.sparse.linalg import LinearOperator, aslinearoperator

    rng = np.random.default_rng(T)
    M = hodlr.LogLinearMask(rng.uniform(0.5, 1.5, (T, hodlr.num_levels(T))), -rng.uniform(0, 1, T))
    A, dense = M.aslinearoperator(), M.to_dense()
    assert isinstance(A, LinearOperator) and A.shape == (T, T) and A.dtype == np.float64
    x, X = rng.standard_normal(T), rng.standard_normal((T, 3))
    for got, want in ((A @ x, dense @ x), (A @ X, dense @ X), (A.T @ x, dense.T @ x), (A.H @ X, dense.T @ X),
                      (A.rmatvec(x), dense.T @ x), (aslinearoperator(A).matmat(X), dense @ X)):
        np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-13)
    S = M.to_sparse()
    np.testing.assert_allclose(x @ S, x @ dense, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(X.T @ S, X.T @ dense, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(S.rmatmul(np.stack([X, X])), np.stack([dense.T @ X] * 2), rtol=1e-13, atol=1e-13)


def test_linear_operator_refusals():
    M = hodlr.LogLinearMask(np.ones((2, 5, 4)))
    with pytest.raises(ValueError, match=r"aslinearoperator needs a mask without batch dimensions, got batch_shape \(2,\)"):
        M.aslinearoperator()
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match=r"X must be a numpy array of shape \(T,\), \(T, D\) or \(\.\.\., T, D\) \(a "
                                        r"SparseMask computes with numpy\), got"):
        M.to_sparse()[0].matmul(torch.ones(5, 1))


def test_numpy_classes_refuse_torch_and_masked_operands():
    """``SparseMask`` and ``HODLRMatrix`` compute with numpy: a torch operand (from either side of
    ``@``) and a masked array are refused by name, not converted."""
    torch = pytest.importorskip("torch")
    M = hodlr.LogLinearMask(np.ones((5, 4)))
    S, H = M.to_sparse(), M.to_hodlr()
    for call, message in ((lambda: torch.ones(2, 5) @ S, r"Y must be a numpy array of shape \(T,\) or \(\.\.\., D, T\) "
                                                         r"\(a SparseMask computes with numpy\), got torch.Tensor"),
                          (lambda: S @ torch.ones(5), r"X must be a numpy array .* \(a SparseMask computes with numpy\)"),
                          (lambda: H @ torch.ones(5), r"X must be a numpy array .* \(a HODLRMatrix computes with numpy\)"),
                          (lambda: S @ np.ma.masked_array(np.ones(5)), r"X must be a plain numpy array .*masked array"),
                          (lambda: H.matmul(np.ma.masked_array(np.ones(5))), r"X must be a plain numpy array")):
        with pytest.raises(TypeError, match=message):
            call()
