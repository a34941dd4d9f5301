"""The mask object and its dense form against the per-entry definition."""

import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from hodlr import fenwick
import hodlr
from hodlr.testing import masks, st_lengths


def entry(lam, g, t, s):
    """docs/mathematics.md §3 verbatim: lam[t, level(t, s)] * prod_{k=s+1..t} exp(g[k])."""
    if s > t:
        return 0.0
    decay = 1.0 if g is None else math.exp(math.fsum(g[s + 1 : t + 1]))
    return lam[t, fenwick.level(t, s)] * decay


@given(masks(T=st_lengths(max_value=40), batch_shape=st.sampled_from([(), (2,)])))
def test_to_dense_matches_definition(M):
    dense = M.to_dense()
    lam = np.broadcast_to(M.level_scales, M.batch_shape + M.level_scales.shape[-2:])
    g = None if M.log_decay is None else np.broadcast_to(M.log_decay, M.batch_shape + (M.T,))
    for b in np.ndindex(*M.batch_shape):
        for t in range(M.T):
            for s in range(M.T):
                want = entry(lam[b], None if g is None else g[b], t, s)
                assert abs(dense[b][t, s] - want) <= 1e-13 * max(1.0, abs(want))


@pytest.mark.parametrize("T", [1, 2, 3, 63, 65, 1000])
def test_shape_and_levels(T):
    M = hodlr.LogLinearMask(np.ones((T, fenwick.num_levels(T))))
    assert M.shape == (T, T) and M.num_levels == fenwick.num_levels(T)


def test_torch_dense_matches_numpy():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    T = 37
    lam, g = rng.standard_normal((3, T, 7)), -rng.random((T,))
    want = hodlr.LogLinearMask(lam, g).to_dense()
    got = hodlr.LogLinearMask(torch.tensor(lam), torch.tensor(g)).to_dense()
    assert isinstance(got, torch.Tensor)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-14, atol=0)


def test_dense_refuses_over_budget(monkeypatch):
    monkeypatch.setattr(hodlr.options, "dense_max_bytes", 1000)
    M = hodlr.LogLinearMask(np.ones((64, 7)))
    with pytest.raises(hodlr.DenseTooLargeError, match="recursive"):
        M.to_dense()


@pytest.mark.parametrize("dtype", [np.float64, np.float32, "float32"])
def test_masks_strategy_torch_with_numpy_dtype(dtype):
    # masks(library="torch") with its default dtype (numpy.float64) or any numpy dtype
    # must draw torch masks of the matching torch dtype, not fail inside torch's .to().
    torch = pytest.importorskip("torch")
    seen = []

    @given(masks(T=st_lengths(max_value=9), library="torch", dtype=dtype))
    def draw(M):
        seen.append(M)

    draw()
    assert seen
    assert all(M.library == "torch" and M.dtype == torch.from_numpy(np.zeros(0, dtype)).dtype for M in seen)


@pytest.mark.parametrize("decay", [None, "mild"])
@pytest.mark.parametrize("T", [5, 9, 65])
def test_block_factors_padding_holds_zero(T, decay):
    # block_factors documents that positions >= T are padding and hold 0, in u and in v;
    # for T = 5, level 2 has a node [4, 8) whose columns 4, 5 include the padding column 5.
    rng = np.random.default_rng(T)
    lam = rng.uniform(0.5, 1.0, (T, fenwick.num_levels(T)))
    g = None if decay is None else -rng.uniform(0.0, 1.0, T)
    M = hodlr.LogLinearMask(lam, g)
    dense = M.to_dense()
    for lev in range(1, M.num_levels):
        u, v = M.block_factors(lev)
        n, half = u.shape
        rows = (np.arange(n)[:, None] * 2 + 1) * half + np.arange(half)
        cols = rows - half
        assert np.all(u[rows >= T] == 0) and np.all(v[cols >= T] == 0), f"level {lev}"
        for j in range(n):
            r, c = rows[j][rows[j] < T], cols[j][cols[j] < T]
            np.testing.assert_allclose(np.outer(u[j][: r.size], v[j][: c.size]), dense[np.ix_(r, c)], rtol=1e-12)


def test_decay_matrix_checks_its_length():
    from hodlr.mask import decay_matrix

    g = -np.linspace(0.1, 0.5, 4)
    with pytest.raises(ValueError, match=r"log_decay must have shape \(\.\.\., T\) with T=5, got shape \(4,\)"):
        decay_matrix(g, 5)
    np.testing.assert_allclose(decay_matrix(g, 4)[3, 1], np.exp(g[2] + g[3]), rtol=1e-15)


def test_strategies_report_misuse_as_invalid_argument():
    # the module promises InvalidArgument for misuse; these leaked ValueErrors from numpy or
    # LogLinearMask from inside the draw
    from hypothesis.errors import InvalidArgument

    from hodlr.testing import attention_inputs, operands

    M = hodlr.LogLinearMask(np.ones((4, 3)))
    for strategy in (masks(T=4, extra_levels=-1), masks(T=4, batch_shape=(-1,)), operands(M, D=-1),
                     attention_inputs(M, Dk=-2), attention_inputs(M, Dv=1.5)):
        @given(strategy)
        def draw(value):
            pass

        with pytest.raises(InvalidArgument):
            draw()


@settings(max_examples=5)
@given(M=masks(T=np.int64(9), poison=st.just(False), library=st.just("torch"), dtype=st.just(np.float32),
               device=st.just("cpu")))
def test_mask_strategy_takes_a_strategy_for_every_parameter(M):
    """Each parameter of ``masks`` is a value or a strategy (a strategy of False does not poison)."""
    torch = pytest.importorskip("torch")
    assert isinstance(M.level_scales, torch.Tensor) and M.level_scales.dtype == torch.float32 and M.T == 9
    assert not torch.isnan(M.level_scales).any()


def test_level_refuses_positions_beyond_exact_float_range():
    with pytest.raises(ValueError, match="2\\*\\*53"):
        fenwick.level(np.array([2**53]), np.array([0]))
