"""Every backend agrees with the dense reference, for matmul and attention.

The backends are found in the registry: each name of ``hodlr.backends.NAMES`` (except
``triton``, proven under the interpreter in its own test files) must have its module and run
on numpy and torch CPU arrays; a missing module or a refusal is a failure, never a skip.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, strategies as st

import hodlr
from hodlr import backends as registry
from hodlr.errors import BackendUnavailableError
from hodlr.testing import (
    TOLERANCES,
    assert_close,
    attention_inputs,
    batch_shapes,
    masks,
    operands,
    poison_unread,
    scaled_error,
    st_lengths,
)

TOL64 = TOLERANCES["cpu_float64"]
TOL32 = 1e-5
BACKENDS = [name for name in registry.NAMES if name not in ("dense", "triton")]


def _available(name: str, library: str = "numpy"):
    """``name``, which must run on ``library`` CPU arrays: a missing backend module or a
    refusal is a failure, never a skip."""
    reason = registry.load(name).unavailable_reason(library, "cpu")
    assert reason is None, f"backend {name!r} cannot run on {library} CPU arrays: {reason}"
    return name


def _torch():
    return pytest.importorskip("torch")


def test_every_cpu_backend_is_present():
    """Every registered backend but ``triton`` (tested in its own files) has its module, offers
    matmul and attention, and runs on numpy and torch CPU arrays."""
    _torch()
    for name in BACKENDS:
        module = registry.load(name)
        assert registry.offers(module, "matmul") and registry.offers(module, "attention"), name
        for library in ("numpy", "torch"):
            assert module.unavailable_reason(library, "cpu") is None, f"{name} cannot run on {library} CPU arrays"


def _mask_and(strategy_of_operands, **mask_kwargs):
    """Draw ``(M, operands)``; the mask has any decay kind, extra levels, poisoned scales."""
    mask_kwargs.setdefault("batch_shape", batch_shapes(2, 3))
    return masks(**mask_kwargs).flatmap(lambda M: strategy_of_operands(M).map(lambda ops: (M, ops)))


def _as_float64(M):
    """The same mask in numpy float64 (the reference's inputs)."""
    to64 = lambda a: None if a is None else np.asarray(a.detach().cpu().double().numpy() if hasattr(a, "detach") else a, dtype=np.float64)
    return hodlr.LogLinearMask(to64(M.level_scales), to64(M.log_decay), validate=False)


def _np64(x):
    return np.asarray(x.detach().cpu().double().numpy() if hasattr(x, "detach") else x, dtype=np.float64)


# -- numpy float64 against dense ----------------------------------------------------------
@pytest.mark.parametrize("name", BACKENDS)
@given(pair=_mask_and(operands))
def test_matmul_matches_dense(name, pair):
    _available(name)
    M, X = pair
    got = hodlr.matmul(M, X, backend=name)
    assert isinstance(got, np.ndarray) and got.dtype == np.float64
    assert np.isfinite(got).all()
    assert_close(got, hodlr.matmul(M, X, backend="dense"), TOL64, f"{name} matmul")


@pytest.mark.parametrize("name", BACKENDS)
@given(pair=_mask_and(attention_inputs), scale=st.sampled_from([None, 0.5, -2.0]))
def test_attention_matches_dense(name, pair, scale):
    _available(name)
    M, (q, k, v) = pair
    got = hodlr.attention(q, k, v, M, scale=scale, backend=name)
    assert isinstance(got, np.ndarray) and got.dtype == np.float64
    assert np.isfinite(got).all()
    assert_close(got, hodlr.attention(q, k, v, M, scale=scale, backend="dense"), TOL64, f"{name} attention")


@pytest.mark.parametrize("name", BACKENDS)
@given(pair=_mask_and(operands, poison=False), data=st.data())
def test_unread_scales_have_no_effect(name, pair, data):
    """Poisoning every never-read scale with NaN leaves the outputs finite and unchanged."""
    _available(name)
    M, X = pair
    poisoned = hodlr.LogLinearMask(poison_unread(M.level_scales), M.log_decay)
    assert np.array_equal(hodlr.matmul(poisoned, X, backend=name), hodlr.matmul(M, X, backend=name))
    q, k, v = data.draw(attention_inputs(M))
    got = hodlr.attention(q, k, v, poisoned, backend=name)
    assert np.isfinite(got).all()
    assert np.array_equal(got, hodlr.attention(q, k, v, M, backend=name))


@pytest.mark.parametrize("name", BACKENDS)
@given(M=masks(batch_shape=batch_shapes(1, 2)), data=st.data())
def test_attention_with_unit_keys_is_matmul(name, M, data):
    """``Dk = 1`` and ``q = k = 1``: ``(M ⊙ 1 1^T) v = M v``."""
    _available(name)
    v = data.draw(operands(M))
    ones = np.ones(M.batch_shape + (M.T, 1))
    assert_close(hodlr.attention(ones, ones, v, M, backend=name), hodlr.matmul(M, v, backend=name), TOL64)


@pytest.mark.parametrize("name", BACKENDS)
@given(M=masks(batch_shape=batch_shapes(1, 2)), data=st.data(), a=st.floats(-3, 3), b=st.floats(0.5, 3))
def test_linear_in_x_and_v(name, M, data, a, b):
    _available(name)
    X = data.draw(operands(M, broadcast=False))
    Y = data.draw(operands(M, D=X.shape[-1], broadcast=False))
    q, k, _ = data.draw(attention_inputs(M, Dv=X.shape[-1], broadcast=False))
    for what, f in (("matmul", lambda Z: hodlr.matmul(M, Z, backend=name)),
                    ("attention", lambda Z: hodlr.attention(q, k, Z, M, backend=name))):
        # against the size of the two terms (where they cancel the sum is far smaller)
        terms = np.abs(a * f(X)) + np.abs(b * f(Y))
        err = scaled_error(f(a * X + b * Y), a * f(X) + b * f(Y), terms)
        assert err <= TOL64, f"{what} linearity: scaled error {err:.3e} > {TOL64:.1e}"


@pytest.mark.parametrize("name", BACKENDS)
@given(pair=_mask_and(operands, dtype=np.float32, batch_shape=batch_shapes(1, 2)))
def test_numpy_float32(name, pair):
    _available(name)
    M, X = pair
    got = hodlr.matmul(M, X, backend=name)
    assert got.dtype == np.float32
    assert_close(got, hodlr.matmul(_as_float64(M), X.astype(np.float64), backend="dense"), TOL32)


# -- awkward lengths ----------------------------------------------------------------------
@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("T", [1, 2, 3, 63, 65, 1000])
def test_awkward_lengths(name, T, rng):
    _available(name)
    L = hodlr.num_levels(T) + 1
    lam = poison_unread(rng.uniform(-1.5, 1.5, (2, T, L)))
    M = hodlr.LogLinearMask(lam, -rng.uniform(0, 1, (1, T)))
    X = rng.standard_normal((T, 3))
    assert_close(hodlr.matmul(M, X, backend=name), hodlr.matmul(M, X, backend="dense"), TOL64)
    q, k, v = rng.standard_normal((3, 2, T, 2))
    assert_close(hodlr.attention(q, k, v, M, backend=name), hodlr.attention(q, k, v, M, backend="dense"), TOL64)


@pytest.mark.parametrize("name", BACKENDS)
def test_length_4097_strong_decay(name, rng):
    """One power of two plus one, long enough for the strong decay to underflow without
    anchoring: the result must stay finite and match dense (a 4097^2 mask, ~130 MB)."""
    _available(name)
    T = 4097
    lam = poison_unread(rng.uniform(0.2, 1.5, (T, hodlr.num_levels(T))))
    g = np.where(rng.random(T) < 0.5, -rng.uniform(0, 1e-3, T), -rng.uniform(0, 50, T))
    M = hodlr.LogLinearMask(lam, g)
    X = rng.standard_normal((T, 2))
    got = hodlr.matmul(M, X, backend=name)
    assert np.isfinite(got).all()
    assert_close(got, hodlr.matmul(M, X, backend="dense"), TOL64)


# -- torch --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", BACKENDS)
@given(data=st.data(), dtype_name=st.sampled_from(["float64", "float32"]))
def test_torch_in_torch_out(name, data, dtype_name):
    torch = _torch()
    _available(name, "torch")
    dtype = getattr(torch, dtype_name)
    M = data.draw(masks(T=st_lengths(1, 200), batch_shape=batch_shapes(2, 2), library="torch", dtype=dtype))
    X = data.draw(operands(M))
    q, k, v = data.draw(attention_inputs(M))
    tol = TOL64 if dtype == torch.float64 else TOL32
    ref = _as_float64(M)
    y = hodlr.matmul(M, X, backend=name)
    assert isinstance(y, torch.Tensor) and y.dtype == dtype and y.device == X.device
    assert_close(y, hodlr.matmul(ref, _np64(X), backend="dense"), tol, f"{name} torch {dtype_name} matmul")
    o = hodlr.attention(q, k, v, M, scale=0.7, backend=name)
    assert isinstance(o, torch.Tensor) and o.dtype == dtype
    want = hodlr.attention(_np64(q), _np64(k), _np64(v), ref, scale=0.7, backend="dense")
    assert_close(o, want, tol, f"{name} torch {dtype_name} attention")


def test_recursive_gradients_match_dense():
    torch = _torch()
    gen = torch.Generator().manual_seed(0)
    T = 45
    lam0 = torch.rand(2, T, hodlr.num_levels(T), generator=gen, dtype=torch.float64) + 0.2
    g0 = -torch.rand(T, generator=gen, dtype=torch.float64)
    q0, k0, v0 = (torch.randn(2, T, 3, generator=gen, dtype=torch.float64) for _ in range(3))

    def grads(backend):
        lam, g, q, k, v = (a.clone().requires_grad_(True) for a in (lam0, g0, q0, k0, v0))
        M = hodlr.LogLinearMask(lam, g)
        out = hodlr.attention(q, k, v, M, backend=backend) + hodlr.matmul(M, v, backend=backend)
        return torch.autograd.grad((out * torch.sin(out)).sum(), (lam, g, q, k, v))

    for got, want in zip(grads("recursive"), grads("dense")):
        assert_close(got, want, TOLERANCES["grad_float64"], "gradient")


def test_sparse_refuses_gradients_but_runs_without():
    torch = _torch()
    _available("sparse", "torch")
    T = 9
    lam = torch.rand(T, hodlr.num_levels(T), dtype=torch.float64, requires_grad=True)
    M = hodlr.LogLinearMask(lam)
    X = torch.randn(T, 2, dtype=torch.float64)
    with pytest.raises(BackendUnavailableError, match="gradients.*recursive"):
        hodlr.matmul(M, X, backend="sparse")
    with pytest.raises(BackendUnavailableError, match="gradients"):
        hodlr.attention(X, X, X, M, backend="sparse")
    with torch.no_grad():
        assert_close(hodlr.matmul(M, X, backend="sparse"), hodlr.matmul(M, X, backend="dense"), TOL64)


def test_sparse_half_precision_goes_through_float32():
    torch = _torch()
    T = 33
    M = hodlr.LogLinearMask(torch.rand(T, hodlr.num_levels(T)) + 0.2, -torch.rand(T))
    X = torch.randn(T, 4).to(torch.bfloat16)
    for name in ("sparse", "recursive"):
        y = hodlr.matmul(M, X, backend=name)
        assert y.dtype == torch.bfloat16
        assert_close(y, hodlr.matmul(M, X.float(), backend="dense"), 1e-2)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("T", [8, 37])
def test_non_contiguous_operands(name, T, rng):
    """Fortran-ordered, transposed and strided operands give the same results."""
    _available(name)
    M = hodlr.LogLinearMask(rng.uniform(0.2, 1.5, (T, hodlr.num_levels(T))), -rng.uniform(0, 1, T))
    X = rng.standard_normal((T, 6))
    want = hodlr.matmul(M, X[:, ::2], backend="dense")
    for operand in (np.asfortranarray(X)[:, ::2], np.ascontiguousarray(X[:, ::2].T).T):
        assert_close(hodlr.matmul(M, operand, backend=name), want, TOL64)
    q, k, v = (np.asfortranarray(rng.standard_normal((T, 3))) for _ in range(3))
    want = hodlr.attention(q, k, v, M, backend="dense")
    assert_close(hodlr.attention(q, k, v, M, backend=name), want, TOL64)


@pytest.mark.gpu
@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("T", [1, 65, 4097])
def test_cuda_tensors_stay_on_cuda(name, T):
    torch = _torch()
    if registry.load(name).unavailable_reason("torch", torch.device("cuda")) is not None:
        pytest.skip(f"backend {name!r} does not run on CUDA tensors")
    gen = torch.Generator().manual_seed(T)
    for dtype, tol in ((torch.float64, TOL64), (torch.float32, TOL32)):
        lam = torch.rand(2, T, hodlr.num_levels(T) + 1, generator=gen, dtype=torch.float64) + 0.2
        g = -torch.rand(1, T, generator=gen, dtype=torch.float64)
        X, q, k, v = (torch.randn(2, T, 4, generator=gen, dtype=torch.float64) for _ in range(4))
        ref = hodlr.LogLinearMask(lam, g)
        M = hodlr.LogLinearMask(lam.to("cuda", dtype), g.to("cuda", dtype))
        y = hodlr.matmul(M, X.to("cuda", dtype), backend=name)
        o = hodlr.attention(*(a.to("cuda", dtype) for a in (q, k, v)), M, backend=name)
        assert y.device.type == "cuda" and y.dtype == dtype and o.device.type == "cuda" and o.dtype == dtype
        assert_close(y.cpu(), hodlr.matmul(ref, X, backend="dense"), tol)
        assert_close(o.cpu(), hodlr.attention(q, k, v, ref, backend="dense"), tol)
