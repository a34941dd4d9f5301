"""Numerical range (issue 7 item 5): strongly negative log-decays (down to -50 per step),
level scales spanning 1e-30 .. 1e30, and lengths where a naive ``exp(cumsum(g))`` would
overflow (``g = -50``, ``T = 4097``: ``G[T-1] ~ -2e5``, ``exp(-G)`` is inf beyond 14 steps).

Every CPU backend that can run here must stay finite and agree with the dense float64
reference, which sums each decay segment from its own terms (so it is accurate). Each
output element is checked against the error bound of a sum, ``tol * (|M ⊙ S| |V|)``, not
only in the Frobenius norm, so tiny rows next to huge ones are checked too.
"""

import numpy as np
import pytest

from hodlr import fenwick
import hodlr
from hodlr import backends as registry

torch = pytest.importorskip("torch")

TOL = {np.float64: 1e-12, np.float32: 1e-5}
ELEMENT_FACTOR = 100
"""Elementwise slack over the Frobenius tolerance: a decay exponent ``x`` carries a rounding
error ``~|x| eps`` and ``exp`` turns it into a relative error ``|x| eps``; entries with
``|x|`` up to ~745 (float64 underflow) survive when multiplied by scales up to 1e30, so an
element may be off by ~1e3 eps of its bound while the Frobenius error stays ~eps."""

INTERPRETER_MAX_T = 257
"""The Triton interpreter runs Python per program: it is checked at this length only."""


def runnable(T):
    out = []
    for library in ("numpy", "torch"):
        for name in registry.NAMES:
            if registry.load(name).unavailable_reason(library, "cpu") is not None:
                continue
            if name == "triton" and T > INTERPRETER_MAX_T:
                continue
            out.append((name, library))
    return out


def wide_scales(rng, shape):
    """Signed level scales whose magnitudes are spread over 1e-30 .. 1e30."""
    return 10.0 ** rng.uniform(-30, 30, shape) * rng.choice([-1.0, 1.0], shape)


def strong_decay(rng, shape, kind):
    if kind == "-50":
        return np.full(shape, -50.0)
    if kind == "mixed":  # -50 .. 0, half of the steps nearly free, so some long ranges survive
        return np.where(rng.random(shape) < 0.5, -rng.uniform(0, 1e-3, shape), -rng.uniform(0, 50, shape))
    return -rng.uniform(0, 50, shape)


def convert(a, library, dtype):
    a = None if a is None else a.astype(dtype)
    return a if library == "numpy" or a is None else torch.as_tensor(a)


def check(got, want, bound, floor, tol, what):
    """Frobenius relative error <= ``tol``; every element within ``ELEMENT_FACTOR * tol *
    bound + floor`` (``bound = |M ⊙ S| |V|``; ``floor`` covers entries that underflow)."""
    got = np.asarray(got.numpy() if isinstance(got, torch.Tensor) else got, dtype=np.float64)
    assert np.isfinite(got).all(), f"{what}: non-finite output"
    err = np.abs(got - want) - floor
    worst = float(np.max(err / np.maximum(bound, np.finfo(float).tiny)))
    assert worst <= ELEMENT_FACTOR * tol, f"{what}: error {worst:.2e} x the elementwise bound"
    rel = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert rel <= tol, f"{what}: relative error {rel:.2e} > {tol:.0e}"


def run_all(T, decay, dtype=np.float64, D=4, seed=0):
    rng = np.random.default_rng(seed)
    L = fenwick.num_levels(T)
    lam = wide_scales(rng, (T, L))
    g = strong_decay(rng, (T,), decay)
    x, q, k, v = (rng.standard_normal((T, D)) for _ in range(4))
    lam, g, x, q, k, v = (a.astype(dtype).astype(np.float64) for a in (lam, g, x, q, k, v))
    if T >= 64 and decay != "mixed":
        assert np.abs(np.cumsum(g)).max() > 709  # exp of the naive prefix sum overflows: the point
    M = hodlr.LogLinearMask(lam, g)
    dense = M.to_dense()
    assert np.isfinite(dense).all()
    want_mm = dense @ x
    bound_mm = np.abs(dense) @ np.abs(x)
    scores = dense * (q @ k.T)
    want_at = scores @ v
    bound_at = np.abs(scores) @ np.abs(v)
    # A decay factor below the working dtype's smallest normal number underflows before the
    # scale multiplies it (exp(-150) is 0 in float32 though 1e30 * exp(-150) is not): entry
    # (t, s) may be off by |level_scales[t, level(t, s)]| * tiny.
    tiny = float(np.finfo(dtype).tiny)
    scales_only = hodlr.LogLinearMask(np.abs(lam)).to_dense()
    floor_mm = tiny * (scales_only @ np.abs(x))
    floor_at = tiny * ((scales_only * np.abs(q @ k.T)) @ np.abs(v))
    names = runnable(T)
    assert ("dense", "numpy") in names
    for name, library in names:
        Mb = hodlr.LogLinearMask(convert(lam, library, dtype), convert(g, library, dtype))
        what = f"{name}/{library}/{np.dtype(dtype).name} T={T} decay={decay}"
        Y = hodlr.matmul(Mb, convert(x, library, dtype), backend=name)
        check(Y, want_mm, bound_mm, floor_mm, TOL[dtype], what + " matmul")
        O = hodlr.attention(*(convert(a, library, dtype) for a in (q, k, v)), Mb, backend=name)
        check(O, want_at, bound_at, floor_at, TOL[dtype], what + " attention")


@pytest.mark.parametrize("decay", ["-50", "uniform", "mixed"])
def test_long_sequence_strong_decay_wide_scales(decay):
    run_all(4097, decay)


@pytest.mark.parametrize("decay", ["-50", "mixed"])
@pytest.mark.parametrize("T", [1, 2, 3, 63, 65, 257])
def test_short_sequences_every_backend(T, decay):
    """Includes the Triton interpreter when it is available; the naive cumsum overflows
    from T = 16 on with g = -50."""
    if T < 16 and decay == "-50":
        run_all(T, "uniform")
    else:
        run_all(T, decay)


@pytest.mark.parametrize("decay", ["-50", "mixed"])
def test_float32_range(decay):
    """float32 inputs: scales 1e-30..1e30 (inside float32's range), decay to -50."""
    run_all(257, decay, dtype=np.float32)


def test_dense_reference_is_accurate_under_overflowing_cumsum():
    """The reference itself: entries from per-entry segment sums equal the closed form
    ``exp(-50 (t - s))`` even where ``G[t] - G[s]`` of prefix sums would be inf - inf."""
    T = 4097
    M = hodlr.LogLinearMask(np.ones((T, fenwick.num_levels(T))), np.full(T, -50.0))
    rows = np.array([1, 2, 14, 15, 4096])
    dense = M.to_dense()
    for t in rows:
        s = np.arange(max(0, t - 14), t + 1)
        np.testing.assert_allclose(dense[t, s], np.exp(-50.0 * (t - s)), rtol=1e-13, atol=0)
