"""``hodlr.options.dense_max_bytes`` bounds what the dense path really allocates.

The budget check counts the dense arrays an operation holds at once (the mask; for attention
also the scores and their product) plus the temporaries of assembling the mask a slab of
rows at a time (index arrays, gathered scales, decay terms, their cumulative sum and
exponential).  The peak traced by ``tracemalloc`` (numpy registers its buffers there) must stay
under the budget whenever the check lets a call through, even at the tightest budget it
accepts, and a call over the budget is refused before anything large is allocated.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

import hodlr
from hodlr import _formulas
from hodlr.options import options

CASES = [  # T, batch, dtype, decay
    (1200, (), np.float64, True),
    (500, (3,), np.float64, True),
    (700, (2,), np.float32, False),
    (333, (2, 2), np.float32, True),
]
OPS = {
    "to_dense": (1, lambda M, x: M.to_dense()),
    "matmul": (1, lambda M, x: hodlr.matmul(M, x, backend="dense")),
    "attention": (3, lambda M, x: hodlr.attention(x, x, x, M, backend="dense")),
}


def _case(T, batch, dtype, decay, seed=0):
    rng = np.random.default_rng(seed)
    lam = rng.uniform(0.5, 1.5, batch + (T, hodlr.num_levels(T))).astype(dtype)
    g = (-rng.uniform(0.0, 0.1, batch + (T,))).astype(dtype) if decay else None
    return hodlr.LogLinearMask(lam, g), rng.standard_normal(batch + (T, 4)).astype(dtype)


def _peak(fn, refused=False):
    """``(result, peak traced bytes)`` of ``fn()`` (with ``refused``: of the DenseTooLargeError
    it must raise)."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        if refused:
            with pytest.raises(hodlr.DenseTooLargeError, match="dense_max_bytes") as err:
                fn()
            out = err.value
        else:
            out = fn()
        return out, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("T, batch, dtype, decay", CASES, ids=lambda v: str(getattr(v, "__name__", v)))
@pytest.mark.parametrize("op", list(OPS))
def test_peak_stays_under_the_budget(monkeypatch, T, batch, dtype, decay, op):
    """At the budget the default plan needs and at one that allows slabs of 8 rows only, the
    traced peak stays under it; one byte below the smallest accepted budget (slabs of one row)
    is refused before allocating."""
    arrays, call = OPS[op]
    M, x = _case(T, batch, dtype, decay)
    itemsize = np.dtype(dtype).itemsize
    result = int(np.prod(batch, dtype=np.int64)) * T * T * itemsize
    B, L = int(np.prod(batch, dtype=np.int64)), hodlr.num_levels(T)
    smallest = arrays * result + _formulas._fixed_bytes(T, L, B, itemsize) + _formulas._slab_bytes(1, T, B, itemsize)
    want = None
    for budget in (_formulas.dense_bytes(batch, T, itemsize, arrays), smallest + _formulas._slab_bytes(7, T, B, itemsize)):
        monkeypatch.setattr(options, "dense_max_bytes", budget)
        out, peak = _peak(lambda: call(M, x))
        assert peak <= budget, f"{op}: traced peak {peak / 2**20:.2f} MiB over the budget {budget / 2**20:.2f} MiB"
        if want is None:
            want = out
        else:
            np.testing.assert_array_equal(out, want)  # the slabs change nothing
    monkeypatch.setattr(options, "dense_max_bytes", smallest - 1)
    err, peak = _peak(lambda: call(M, x), refused=True)
    assert peak < result / 4 and f"{(smallest) / 2**30:.2f} GiB" in str(err)


def test_float64_matmul_at_2000_fits_100_mib(monkeypatch):
    """The case of the report: float64 matmul at T = 2000 with a 100 MiB budget peaked at 191 MiB."""
    monkeypatch.setattr(options, "dense_max_bytes", 100 * 2**20)
    M, x = _case(2000, (), np.float64, True)
    _, peak = _peak(lambda: hodlr.matmul(M, x, backend="dense"))
    assert peak <= 100 * 2**20, peak / 2**20


def test_slabs_give_the_same_mask_bit_for_bit(monkeypatch):
    """A tight budget cuts the assembly into many slabs; the decay sums continue down each
    column in the same order, so the mask is the same to the last bit."""
    M, _ = _case(300, (2,), np.float64, True, seed=3)
    whole = M.to_dense()
    monkeypatch.setattr(_formulas, "STEP_BYTES", 2**14)
    rows, _ = _formulas._plan((2,), 300, hodlr.num_levels(300), 8, 1)
    assert rows < 300
    assert np.array_equal(M.to_dense(), whole)
