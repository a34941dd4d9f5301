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
    with pytest.raises(hodlr.DenseTooLargeError, match="make it for a smaller T or batch"):
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

    from hodlr.testing import batch_shapes, gated_delta_inputs

    M = hodlr.LogLinearMask(np.ones((4, 3)))
    for strategy in (masks(T=4, extra_levels=-1), masks(T=4, batch_shape=(-1,)), masks(T=4, batch_shape=3),
                     operands(M, D=-1), operands(np.ones((4, 3))), operands(M, broadcast="yes"),
                     attention_inputs(M, Dk=-2), attention_inputs(M, Dv=1.5), gated_delta_inputs(M, beta_max=3.0),
                     gated_delta_inputs(M, Dk=0), masks(T=4, dtype=np.int64), masks(T=4, dtype=np.float16)):
        @given(strategy)
        def draw(value):
            pass

        with pytest.raises(InvalidArgument):
            draw()
    for bounds_as_strategies in (lambda: st_lengths(max_value=st.integers(1, 9)), lambda: batch_shapes(max_side=st.just(2))):
        with pytest.raises(InvalidArgument, match=r"must be an integer"):  # (refused when the strategy is made)
            bounds_as_strategies()


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


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_operands_broadcast_beyond_the_mask(data):
    """With ``broadcast`` the operands' batch shapes broadcast with the mask's and each other's,
    and sometimes exceed the mask's (a mask shared by the operands' batch); without it they are the
    mask's.  Gated DeltaNet keys are of unit norm and ``beta`` within ``[0, beta_max]``."""
    from hodlr.testing import attention_inputs, batch_shapes, gated_delta_inputs, operands

    M = data.draw(masks(T=st_lengths(max_value=9), batch_shape=batch_shapes(2, 2)))
    X = data.draw(operands(M))
    q, k, v, beta = data.draw(gated_delta_inputs(M, beta_max=st.just(0.5)))
    np.broadcast_shapes(M.batch_shape, X.shape[:-2])  # (raises where they do not broadcast)
    np.broadcast_shapes(M.batch_shape, q.shape[:-2], k.shape[:-2], v.shape[:-2], beta.shape[:-1])
    np.testing.assert_allclose(np.linalg.norm(k, axis=-1), 1.0, rtol=1e-12)
    assert beta.min() >= 0 and beta.max() <= 0.5 and beta.shape[-1] == M.T
    assert all(x.shape[:-2] == M.batch_shape for x in data.draw(attention_inputs(M, broadcast=st.just(False))))


def test_operands_sometimes_have_more_batch_than_the_mask():
    from hodlr.testing import attention_inputs

    wider = []

    @settings(max_examples=150, deadline=None, database=None)
    @given(data=st.data())
    def draw(data):
        M = data.draw(masks(T=3, batch_shape=st.sampled_from([(), (1,), (2, 1)])))
        q, k, v = data.draw(attention_inputs(M))
        full = np.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
        wider.append(np.broadcast_shapes(M.batch_shape, full) != tuple(M.batch_shape))

    draw()
    assert any(wider) and not all(wider)  # both, in proportions hypothesis's phases move (0.06 … 0.53 seen)


def test_a_failing_property_says_what_it_drew():
    """A failure prints each strategy's note (length, levels, decay, batch shapes, seed) and
    assert_close's diagnosis of a NaN read from a poisoned scale."""
    from hodlr.testing import assert_close, operands

    @settings(max_examples=30, deadline=None, database=None)
    @given(data=st.data())
    def prop(data):
        M = data.draw(masks(T=st.integers(2, 9), decay="none"))
        X = data.draw(operands(M, D=1, broadcast=False))
        wrong = hodlr.LogLinearMask(M.level_scales[..., ::-1].copy(), validate=False)  # the levels reversed
        assert_close(hodlr.matmul(wrong, X, backend="dense"), hodlr.matmul(M, X, backend="dense"), 1e-12, "kernel")

    with pytest.raises(AssertionError) as err:
        prop()
    text = str(err.value) + "\n".join(getattr(err.value, "__notes__", []))
    assert "kernel: " in text and "NaN / infinite entries where the expected ones are finite" in text, text
    assert "masks: T=" in text and "decay='none'" in text and "seed=" in text and "operands: X batch" in text, text


def test_assert_close_says_what_failed():
    from hodlr.testing import assert_close

    assert_close([1.0, 2.0], [1.0, 2.0], 0)  # nested lists are arrays
    with pytest.raises(AssertionError, match=r"r: shapes differ: \(2,\) \(actual\) against \(3,\) \(expected\)"):
        assert_close(np.ones(2), np.ones(3), 1e-12, "r")
    with pytest.raises(AssertionError, match=r"r: 2 NaN / infinite entries .* the first at index \(0, 1\)"):
        assert_close(np.array([[1.0, np.nan], [np.inf, 1.0]]), np.ones((2, 2)), 1e-12, "r")
    with pytest.raises(AssertionError, match=r"the expected values hold 1 NaN"):
        assert_close(np.ones(2), np.array([1.0, np.nan]), 1e-12, "r")
    with pytest.raises(AssertionError, match=r"relative error 5.000e-01 > 1.0e-12; the largest difference at index "
                                             r"\(1, 0\): actual 3, expected 2"):
        assert_close(np.array([[0.0], [3.0]]), np.array([[0.0], [2.0]]), 1e-12, "r")
    with pytest.raises(TypeError, match=r"tol must be a number >= 0, got '1e-5'"):
        assert_close(np.ones(2), np.ones(2), "1e-5")


def test_poison_unread_refuses_what_it_cannot_poison():
    from hodlr.errors import LevelsExceededError
    from hodlr.testing import poison_unread

    with pytest.raises(ValueError, match=r"level_scales must be an array of shape \(\.\.\., T, L\), got shape \(3,\)"):
        poison_unread(np.ones(3))
    with pytest.raises(TypeError, match=r"level_scales must be floating"):
        poison_unread(np.ones((4, 3), dtype=np.int64))
    with pytest.raises(ValueError, match=r"starts and lengths go together"):
        poison_unread(np.ones((4, 3)), starts=[0])
    with pytest.raises(LevelsExceededError, match=r"L=2 columns but position 7 needs num_levels\(8\)=4"):
        poison_unread(np.ones((8, 2)))
    with pytest.raises(LevelsExceededError, match=r"position 9 needs"):
        poison_unread(np.ones((4, 4)), starts=[6], lengths=[4])
    with pytest.raises(ValueError, match=r"lengths must sum to T=4"):
        poison_unread(np.ones((4, 3)), starts=[0, 0], lengths=[2, 1])


def test_poison_unread_takes_packed_offsets_as_tensors():
    """Packed ``starts`` / ``lengths`` may be lists, 1-d arrays or tensors (as they come from
    ``cu_seqlens``); anything else is refused by name."""
    torch = pytest.importorskip("torch")
    from hodlr.testing import poison_unread

    lam = np.ones((6, 4))
    want = poison_unread(lam, starts=[3, 0], lengths=[2, 4])
    for starts, lengths in ((np.array([3, 0]), np.array([2, 4])), (torch.tensor([3, 0]), torch.tensor([2, 4]))):
        assert np.array_equal(poison_unread(lam, starts=starts, lengths=lengths), want, equal_nan=True)
    with pytest.raises(TypeError, match=r"starts must be a sequence \(list, tuple, 1-d array or tensor\) of integers "
                                        r">= 0, got int"):
        poison_unread(lam, starts=3, lengths=[6])


def test_strategies_draw_scales_long_lengths_and_decays_of_other_batches():
    """What a kernel could get wrong is drawn: a scale other than 1, lengths around 512 … 2048
    (within ``max_value``), and log-decays that lack the scales' leading dims or carry dims the
    scales lack (a decay per head over shared scales)."""
    from hypothesis import find

    from hodlr.testing import SCALES, batch_shapes, scales

    assert set(SCALES) >= {None, 1.0} and any(s not in (None, 1.0) for s in SCALES)
    assert find(scales(), lambda s: s is not None and s != 1.0) in SCALES
    assert {511, 512, 513, 1023, 1024, 1025, 2047, 2048, 2049} <= set(hodlr.testing.AWKWARD_LENGTHS)
    drawn = masks(T=st_lengths(max_value=8), batch_shape=batch_shapes(2, 3), decay="mild")
    fewer = find(drawn, lambda M: M.log_decay.ndim < M.level_scales.ndim - 1)
    more = find(drawn, lambda M: M.log_decay.ndim > M.level_scales.ndim - 1)
    for M in (fewer, more):  # the mask's batch is still the broadcast of both
        assert M.batch_shape == np.broadcast_shapes(M.level_scales.shape[:-2], M.log_decay.shape[:-1])


def test_error_metrics_refuse_complex_arrays():
    """A complex array is not compared by its real part alone."""
    from hodlr.testing import assert_close, relative_error

    with pytest.raises(TypeError, match="the compared arrays must be real, got complex128"):
        assert_close(np.array([1 + 1j]), np.array([1 + 5j]), 1e-12)
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="the compared arrays must be real, got a torch.complex64 tensor"):
        relative_error(torch.tensor([1 + 1j]), torch.tensor([1 + 5j]))
