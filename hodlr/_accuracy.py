"""Error metrics and the bounds hodlr proves its backends to, with no dependency beyond
numpy (the command line uses them; :mod:`hodlr.testing` re-exports them beside its
hypothesis strategies)."""

from __future__ import annotations

import math

import numpy as np

from hodlr.fenwick.arrays import is_torch, to_numpy

__all__ = ["DECAYS", "TOLERANCES", "assert_close", "relative_error", "scaled_error"]

TOLERANCES = {
    "cpu_float64": 1e-12,
    "cpu_float32": 1e-5,
    "interpreter_float64": 1e-12,
    "interpreter_float32": 1e-5,
    "gpu_float32": 1e-5,
    "gpu_bfloat16": 1e-2,
    "grad_float64": 1e-10,
}
"""Relative-error bounds ``‖a - b‖_F / ‖b‖_F`` against a float64 reference (the table in
``docs/architecture.md``, "How the parts are kept honest")."""

DECAYS = ("none", "mild", "strong", "zero")
"""Kinds of log-decay: ``none`` (no decay array), ``mild`` (``g ~ U(-1, 0)``), ``strong``
(``g ~ U(-50, 0)`` with some steps near 0), ``zero`` (an explicit array of zeros)."""


def _float64(x) -> np.ndarray:
    """``x`` (numpy or torch, any float dtype, 16-bit included) as a float64 numpy array."""
    return np.asarray(to_numpy(x.float() if is_torch(x) and x.dtype.itemsize < 4 else x), dtype=np.float64)


def relative_error(actual, expected) -> float:
    """``‖actual - expected‖_F / ‖expected‖_F`` in float64 (``inf`` if the shapes differ or
    anything is NaN; the absolute error if ``expected`` is all zero)."""
    return scaled_error(actual, expected, expected)


def scaled_error(actual, expected, magnitude) -> float:
    """``‖actual - expected‖_F / ‖magnitude‖_F``: the error against the size of the computation
    rather than of its result.

    ``magnitude`` is the same operation on the absolute values of its inputs, e.g.
    ``(|M| ⊙ |q| |k|ᵀ) |v|`` for attention: rounding errors of sums and dot products scale with it,
    not with the result (Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed., §3.1).
    Where terms cancel, ``‖expected‖`` can be far smaller, and a correct float32 evaluation then
    misses a fixed :func:`relative_error` bound: one score ``q·k`` of two standard-normal
    256-vectors summed in float32 is more than 1e-5 off (relatively) in about 1% of draws.
    Never larger than :func:`relative_error` (``|expected| <= magnitude`` elementwise), equal
    to it when nothing cancels; ``inf`` if anything is NaN or the shapes differ (the absolute
    error if ``magnitude`` is all zero).
    """
    a, b, m = _float64(actual), _float64(expected), _float64(magnitude)
    if a.shape != b.shape or a.shape != m.shape or not all(np.isfinite(z).all() for z in (a, b, m)):
        return math.inf
    denom = np.linalg.norm(m)
    diff = np.linalg.norm(a - b)
    return float(diff / denom) if denom > 0 else float(diff)


def assert_close(actual, expected, tol: float, what: str = "result") -> None:
    """Assert ``relative_error(actual, expected) <= tol`` with a readable message."""
    err = relative_error(actual, expected)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e} (shapes {tuple(actual.shape)} / {tuple(expected.shape)})"
