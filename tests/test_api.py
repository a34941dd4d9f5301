"""The public API's contract: types kept, broadcasting, the registry, the auto rule, and
identities that hold on every backend that can run here."""

import numpy as np
import pytest

from hodlr import fenwick
import hodlr
from hodlr import backends as registry
from hodlr.testing import TOLERANCES, assert_close

torch = pytest.importorskip("torch")


def runnable(library):
    return [n for n in registry.NAMES if registry.load(n).unavailable_reason(library, "cpu") is None]


def problem(T=21, batch=(), seed=0):
    rng = np.random.default_rng(seed)
    lam = rng.uniform(0.5, 1.5, batch + (T, fenwick.num_levels(T)))
    g = -rng.uniform(0, 1, batch + (T,))
    return rng, lam, g


@pytest.mark.parametrize("library, dtype", [("numpy", "float64"), ("numpy", "float32"),
                                            ("torch", "float64"), ("torch", "float32")])
def test_result_keeps_library_dtype_and_shape(library, dtype):
    rng, lam, g = problem(batch=(2, 1))
    conv = (lambda a: a.astype(dtype)) if library == "numpy" else (lambda a: torch.as_tensor(a).to(getattr(torch, dtype)))
    M = hodlr.LogLinearMask(conv(lam), conv(g))
    X = conv(rng.standard_normal((3, 21, 4)))
    q, k, v = conv(rng.standard_normal((1, 21, 2))), conv(rng.standard_normal((21, 2))), conv(rng.standard_normal((3, 21, 5)))
    for name in runnable(library):
        Y = hodlr.matmul(M, X, backend=name)
        O = hodlr.attention(q, k, v, M, backend=name)
        for out, shape in ((Y, (2, 3, 21, 4)), (O, (2, 3, 21, 5))):
            assert type(out) is type(X), name
            assert out.dtype == X.dtype, name
            assert tuple(out.shape) == shape, name


def test_backend_info_is_the_registry_function():
    assert hodlr.backend_info is registry.info
    info = hodlr.backend_info()
    assert list(info) == list(registry.NAMES)
    for name, entry in info.items():
        assert set(entry) == {"description", "ops"} and isinstance(entry["description"], str)
        assert set(entry["ops"]) == {op for op in registry.OPS if registry.offers(registry.load(name), op)}
        for where in entry["ops"].values():
            assert set(where) == set(registry.WHERE)
            assert all(v is True or isinstance(v, str) for v in where.values())
    assert info["dense"]["ops"]["matmul"]["numpy"] is True
    assert not callable(hodlr.backends)  # a plain package


def test_auto_rule():
    for op in ("matmul", "attention"):
        assert registry.auto_backend("numpy", "cpu", 256, op=op) == "dense"
        assert registry.auto_backend("numpy", "cpu", 257, op=op) == "recursive"
        assert registry.auto_backend("torch", torch.device("cpu"), 257, op=op) == "chunked"
    # Gated DeltaNet, which recursive lacks, on numpy: fenwick (O(T log T)), never the quadratic dense
    assert registry.auto_backend("numpy", "cpu", 257, op="gated_delta_attention") == "fenwick"
    # a large batch of short masks is not a small problem: dense only up to 2**22 entries in all
    for op in ("matmul", "attention", "gated_delta_attention"):
        assert registry.auto_backend("numpy", "cpu", 256, op=op, masks=64) == "dense"
        assert registry.auto_backend("numpy", "cpu", 256, op=op, masks=65) != "dense"
        assert registry.auto_backend("torch", torch.device("cpu"), 256, op=op, masks=65) == "chunked"
    assert registry.auto_backend("torch", torch.device("cpu"), 16, op="attention", masks=16384) == "dense"


def test_auto_counts_the_whole_batch():
    """The public calls hand ``auto`` their broadcast batch: 65 masks of 256 tokens are past the
    dense rule (at 256 sequences of 16 heads the dense path needed 3 GiB, over the default budget),
    and the result equals a few rows computed densely."""
    T, H, D = 256, 5, 4
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(13, H, T, D, generator=gen) for _ in range(3))
    M = hodlr.LogLinearMask(0.5 + torch.rand(13, H, T, hodlr.num_levels(T), generator=gen),
                            -0.1 * torch.rand(13, H, T, generator=gen))
    ran = []
    real = hodlr.backends.chunked.attention
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(hodlr.backends.chunked, "attention", lambda *a, **kw: ran.append(1) or real(*a, **kw))
        out = hodlr.attention(q, k, v, M)
    assert ran
    few = hodlr.attention(q[:2], k[:2], v[:2], hodlr.LogLinearMask(M.level_scales[:2], M.log_decay[:2]),
                          backend="dense")
    assert torch.allclose(out[:2], few, rtol=1e-5, atol=1e-5)
    fla = hodlr.log_linear_attn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                M.log_decay.transpose(1, 2), M.level_scales.transpose(1, 2))[0]
    assert torch.allclose(fla.transpose(1, 2), out, rtol=1e-5, atol=1e-5)


def test_lists_and_scalar_kinds_are_accepted():
    _, lam, g = problem(T=6)
    M = hodlr.LogLinearMask(lam.tolist(), g.tolist())
    want = hodlr.matmul(M, np.ones((6, 1)), backend="dense")
    np.testing.assert_array_equal(hodlr.matmul(M, [[1.0]] * 6, backend="dense"), want)
    q = np.ones((6, 1))
    base = hodlr.attention(q, q, q, M, scale=0.5, backend="dense")
    for scale in (np.float32(0.5), np.float64(0.5), np.array(0.5), torch.tensor(0.5)):
        np.testing.assert_array_equal(hodlr.attention(q, q, q, M, scale=scale, backend="dense"), base)


def test_half_operands_with_float32_mask():
    rng, lam, g = problem(T=17)
    M = hodlr.LogLinearMask(torch.as_tensor(lam, dtype=torch.float32), torch.as_tensor(g, dtype=torch.float32))
    X = torch.as_tensor(rng.standard_normal((17, 3)))
    for half in (torch.float16, torch.bfloat16):
        Y = hodlr.matmul(M, X.to(half), backend="dense")
        assert Y.dtype == half
        assert_close(Y.float(), hodlr.matmul(hodlr.LogLinearMask(lam, g), X.numpy(), backend="dense"), 1e-2)


@pytest.mark.parametrize("library", ["numpy", "torch"])
def test_attention_with_unit_keys_is_matmul_and_linear(library):
    """Dk = 1, q = k = 1: attention equals matmul; both are linear in X / v."""
    rng, lam, g = problem(T=45, batch=(2,))
    conv = (lambda a: a) if library == "numpy" else torch.as_tensor
    M = hodlr.LogLinearMask(conv(lam), conv(g))
    X1, X2 = conv(rng.standard_normal((2, 45, 3))), conv(rng.standard_normal((2, 45, 3)))
    ones = conv(np.ones((45, 1)))
    tol = TOLERANCES["cpu_float64"]
    for name in runnable(library):
        Y1 = hodlr.matmul(M, X1, backend=name)
        assert_close(hodlr.attention(ones, ones, X1, M, backend=name), Y1, tol, f"{name} attention = matmul")
        assert_close(hodlr.matmul(M, 2.0 * X1 - 3.0 * X2, backend=name),
                     2.0 * Y1 - 3.0 * hodlr.matmul(M, X2, backend=name), tol, f"{name} linear")


def test_scale_multiplies_scores():
    rng, lam, g = problem(T=30)
    M = hodlr.LogLinearMask(lam, g)
    q, k, v = (rng.standard_normal((30, 2)) for _ in range(3))
    for name in runnable("numpy"):
        assert_close(hodlr.attention(q, k, v, M, scale=0.25, backend=name),
                     0.25 * hodlr.attention(q, k, v, M, backend=name), TOLERANCES["cpu_float64"], name)


def test_dense_half_operands_are_computed_in_the_mask_dtype():
    # q . k = 64 * 40 * 40 = 102400 overflows float16 (max 65504) although scale * q . k = 102.4
    # does not: dense computed the scores in float16 and returned NaN; every other backend
    # computes half operands in the mask's float32 and casts back.
    T, Dk = 8, 64
    M = hodlr.LogLinearMask(torch.ones(T, hodlr.num_levels(T)))
    q = torch.full((T, Dk), 40.0, dtype=torch.float16)
    v = torch.ones(T, 2, dtype=torch.float16)
    want = hodlr.attention(q.double(), q.double(), v.double(), hodlr.LogLinearMask(M.level_scales.double()),
                           scale=1e-3, backend="dense")
    got = hodlr.attention(q, q, v, M, scale=1e-3, backend="dense")
    assert got.dtype == torch.float16
    assert_close(got, want, 1e-3)


def test_integer_scale_tensors_are_accepted_like_numpy_ones():
    # a 0-d numpy integer array was accepted as scale, a 0-d torch integer tensor refused
    rng, lam, g = problem(T=6)
    M = hodlr.LogLinearMask(lam, g)
    q = rng.standard_normal((6, 2))
    base = hodlr.attention(q, q, q, M, scale=2.0, backend="dense")
    for scale in (2, np.int64(2), np.array(2), torch.tensor(2), torch.tensor(2, dtype=torch.int32)):
        np.testing.assert_array_equal(hodlr.attention(q, q, q, M, scale=scale, backend="dense"), base)
    for bad in (torch.tensor(True), torch.tensor(1j), np.array(True)):
        with pytest.raises(TypeError, match="scale must be a real number or None"):
            hodlr.attention(q, q, q, M, scale=bad, backend="dense")


def test_scaled_error_measures_against_the_absolute_computation():
    """A float32 score with cancellation: far off relatively, within float32 rounding of the
    computation's size; NaN and shape mismatches never pass."""
    from hodlr.testing import relative_error, scaled_error

    q = np.array([1.0 + 2.0 ** -12, -1.0], dtype=np.float32)
    k = np.array([1.0 + 2.0 ** -12, 1.0 + 2.0 ** -11 + 2.0 ** -23], dtype=np.float32)
    exact = float(np.dot(q.astype(np.float64), k.astype(np.float64)))
    got = np.array([np.float32(q[0] * k[0]) + np.float32(q[1] * k[1])], dtype=np.float32)
    size = np.array([float(np.dot(np.abs(q).astype(np.float64), np.abs(k).astype(np.float64)))])
    assert relative_error(got, np.array([exact])) > 1e-2
    assert scaled_error(got, np.array([exact]), size) < 1e-6
    assert scaled_error(got, np.array([exact]), size) <= relative_error(got, np.array([exact]))
    assert scaled_error(np.array([np.nan]), np.array([exact]), size) == np.inf
    assert scaled_error(got, np.array([exact, 0.0]), np.array([1.0, 1.0])) == np.inf


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_a_16_bit_mask_is_computed_as_a_float32_one(dtype):
    """Every CPU backend computes in its generators' dtype; a float16 / bfloat16 mask is computed in
    float32, as a float32 mask serving 16-bit operands is (bit for bit), so the backends agree."""
    gen = torch.Generator().manual_seed(1)
    T = 300
    lam = torch.rand(T, hodlr.num_levels(T), generator=gen) + 0.5
    g = -torch.rand(T, generator=gen)
    half, wide = hodlr.LogLinearMask(lam.to(dtype), g.to(dtype)), hodlr.LogLinearMask(lam.to(dtype).float(),
                                                                                      g.to(dtype).float())
    x = torch.randn(T, 8, generator=gen).to(dtype)
    for backend in ("dense", "sparse", "recursive", "fenwick", "chunked"):
        for op, args in (("matmul", (x,)), ("attention", (x, x, x))):
            f = getattr(hodlr, op)
            got = f(half, *args, backend=backend) if op == "matmul" else f(*args, half, backend=backend)
            want = f(wide, *args, backend=backend) if op == "matmul" else f(*args, wide, backend=backend)
            assert got.dtype == dtype and torch.equal(got, want), (backend, op)


@pytest.mark.parametrize("backend", ["dense", "chunked"])
def test_calls_without_terms_stay_in_the_autograd_graph(backend):
    """An empty batch or empty dot products (Dk = 0) run no backend, yet the result is part of
    autograd's graph: a backward through it gives every input zeros of its shape."""
    T = 5
    lam = (torch.rand(T, hodlr.num_levels(T), dtype=torch.float64) + 0.5).requires_grad_()
    g = (-torch.rand(T, dtype=torch.float64)).requires_grad_()
    M = hodlr.LogLinearMask(lam, g)
    x = torch.randn(0, T, 3, dtype=torch.float64, requires_grad=True)
    q = torch.randn(2, T, 0, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, T, 4, dtype=torch.float64, requires_grad=True)
    beta = torch.rand(2, T, dtype=torch.float64, requires_grad=True)
    outs = [hodlr.matmul(M, x, backend=backend), hodlr.attention(q, q, v, M, backend=backend),
            hodlr.gated_delta_attention(q, q, v, beta, M, backend=backend)]
    assert [tuple(o.shape) for o in outs] == [(0, T, 3), (2, T, 4), (2, T, 4)]
    grads = torch.autograd.grad(sum(o.sum() for o in outs), (lam, g, x, q, v, beta))
    for given, grad in zip((lam, g, x, q, v, beta), grads):
        assert grad.shape == given.shape and not grad.any()
