"""Error metrics and the bounds hodlr proves its backends to, with no dependency beyond
numpy (the command line uses them; :mod:`hodlr.testing` re-exports them beside its
hypothesis strategies)."""

from __future__ import annotations

import math

import numpy as np

from hodlr.fenwick.arrays import is_torch, to_numpy

__all__ = ["DECAYS", "TOLERANCES", "assert_close", "decay_values", "relative_error", "scaled_error"]

TOLERANCES = {
    "cpu_float64": 1e-12,
    "cpu_float32": 1e-5,
    "interpreter_float64": 1e-12,
    "interpreter_float32": 1e-5,
    "gpu_float32": 1e-5,
    "gpu_bfloat16": 1e-2,
    "grad_float64": 1e-10,
}
"""Relative-error bounds ``‖a - b‖_F / ‖b‖_F`` against a float64 reference, by where the
computation runs and its dtype (``docs/mathematics.md`` §11 gives each key with what it covers):
CPU backends in float64 / float32, Triton under the interpreter, Triton on a GPU in float32 and
bfloat16 (values and gradients), and float64 gradients."""

DECAYS = ("none", "mild", "strong", "steep", "zero")
"""Kinds of log-decay (:func:`decay_values`): ``none`` (no decay array), ``mild``
(``g ~ U(-1, 0)``), ``strong`` (half the steps ``U(-50, 0)``, half within ``1e-3`` of 0),
``steep`` (the same with ``U(-1e4, 0)``), ``zero`` (an explicit array of zeros)."""


def decay_values(rng, kind: str, shape):
    """A log-decay of kind ``kind`` (one of :data:`DECAYS`) and ``shape`` from the numpy generator
    ``rng``; None for ``"none"``.

    ``strong`` and ``steep`` put steps that underflow a decay beside steps near 0, so pairs a few
    positions apart keep weights near 1 while the cumulative log-decay ``G`` runs far below 0.
    ``steep`` makes ``|G|`` large enough (about ``2500 T``) that a decay taken as the difference of
    two prefix sums, ``exp(G[t] - G[s])``, loses more than ``1e-12`` relatively in float64, where
    summing each exponent from its own terms loses nothing: it tells the two apart.

    Examples
    --------
    >>> import numpy as np
    >>> g = decay_values(np.random.default_rng(0), "steep", (1000,))
    >>> bool(g.max() <= 0), bool(g.min() >= -1e4), bool(np.mean(g > -1e-3) > 0.4)
    (True, True, True)
    """
    if kind == "none":
        return None
    if kind == "zero":
        return np.zeros(shape)
    if kind == "mild":
        return -rng.uniform(0.0, 1.0, shape)
    if kind in ("strong", "steep"):
        g = -rng.uniform(0.0, 50.0 if kind == "strong" else 1e4, shape)
        near_zero = rng.random(shape) < 0.5
        return np.where(near_zero, -rng.uniform(0.0, 1e-3, shape), g)
    raise ValueError(f"decay must be one of {DECAYS}, got {kind!r}")


def _float64(x) -> np.ndarray:
    """``x`` (numpy or torch, any float dtype, 16-bit included, or a nested list of numbers) as a
    float64 numpy array."""
    if is_torch(x):
        if x.is_complex():
            raise TypeError(f"the compared arrays must be real, got a {x.dtype} tensor")
        x = to_numpy(x.detach().float() if x.dtype.itemsize < 4 else x.detach())
    x = np.asarray(x)
    if np.iscomplexobj(x):
        raise TypeError(f"the compared arrays must be real, got {x.dtype}")
    return x.astype(np.float64)


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
    """Assert ``relative_error(actual, expected) <= tol``, saying what failed: shapes that
    differ, NaN or infinite entries where the expected ones are finite (with the first index: in
    hodlr's tests a NaN means a never-read, NaN-poisoned level scale was read, or an output entry
    was never written into its NaN-filled buffer), or the error with the index of the largest
    difference and the two values there.

    Examples
    --------
    >>> import numpy as np
    >>> assert_close(np.array([1.0, 2.0]), np.array([1.0, 2.0 + 1e-15]), 1e-12)
    >>> assert_close(np.array([[1.0, np.nan]]), np.array([[1.0, 2.0]]), 1e-12, "my kernel")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
        ...
    AssertionError: my kernel: 1 NaN / infinite entries where the expected ones are finite, the first at index (0, 1) ...
    """
    if isinstance(tol, bool) or not isinstance(tol, (int, float, np.floating)) or not tol >= 0:
        raise TypeError(f"tol must be a number >= 0, got {tol!r}")
    a, b = _float64(actual), _float64(expected)
    if a.shape != b.shape:
        raise AssertionError(f"{what}: shapes differ: {a.shape} (actual) against {b.shape} (expected)")
    finite = np.isfinite(b)
    if not finite.all():
        first = tuple(int(i) for i in np.argwhere(~finite)[0])
        raise AssertionError(f"{what}: the expected values hold {int((~finite).sum())} NaN / infinite entries, the "
                             f"first at index {first}: compare against a finite reference")
    wrong = ~np.isfinite(a)
    if wrong.any():
        first = tuple(int(i) for i in np.argwhere(wrong)[0])
        raise AssertionError(f"{what}: {int(wrong.sum())} NaN / infinite entries where the expected ones are finite, "
                             f"the first at index {first} (a NaN: a never-read (NaN-poisoned) level scale was read, "
                             f"or an output entry was never written)")
    err = relative_error(a, b)
    if not err <= tol:
        at = np.unravel_index(int(np.argmax(np.abs(a - b))), a.shape) if a.size else ()
        at = tuple(int(i) for i in at)
        raise AssertionError(f"{what}: relative error {err:.3e} > {tol:.1e}; the largest difference at index {at}: "
                             f"actual {a[at]:.17g}, expected {b[at]:.17g}")
