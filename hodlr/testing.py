"""Hypothesis strategies and error metrics for proving an implementation equal to the
reference.  Shipped so users can test their own kernels the way hodlr tests its own.

Every strategy argument accepts a value or a strategy (as in ``hypothesis.extra.numpy``);
misuse raises ``hypothesis.errors.InvalidArgument``.  Values are drawn constructively:
hypothesis draws shapes, kinds and a seed, numpy's generator fills the arrays (shrinking
then works on shapes and seeds).

Examples
--------
>>> from hypothesis import given
>>> import hodlr
>>> from hodlr.testing import masks, operands, relative_error, st_lengths, TOLERANCES
>>> @given(masks(T=st_lengths(max_value=40)).flatmap(lambda M: operands(M, D=3).map(lambda X: (M, X))))
... def test_recursive_matches_dense(pair):
...     M, X = pair
...     err = relative_error(hodlr.matmul(M, X, backend="recursive"), hodlr.matmul(M, X, backend="dense"))
...     assert err <= TOLERANCES["cpu_float64"]
>>> test_recursive_matches_dense()  # runs the property: silent when it holds
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

from hodlr import fenwick
from hodlr._accuracy import DECAYS, TOLERANCES, assert_close, relative_error, scaled_error
from hodlr.fenwick.arrays import check_int, is_torch, namespace

__all__ = [
    "AWKWARD_LENGTHS",
    "DECAYS",
    "TOLERANCES",
    "assert_close",
    "attention_inputs",
    "batch_shapes",
    "masks",
    "operands",
    "poison_unread",
    "relative_error",
    "scaled_error",
    "st_lengths",
]

AWKWARD_LENGTHS = (1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129, 255, 256, 257, 1000,
                   4095, 4096, 4097)

def _strategy(value):
    """``value`` itself if it is a strategy, else the strategy that always draws it."""
    if isinstance(value, st.SearchStrategy):
        return value
    return st.just(value)


def _count(name: str, value, low: int = 0) -> int:
    """A size: an int ``>= low``, else ``InvalidArgument`` (with :func:`check_int`'s message)."""
    try:
        return check_int(name, value, low)
    except (TypeError, ValueError) as err:
        raise InvalidArgument(str(err)) from None


def st_lengths(min_value: int = 1, max_value: int = 300) -> st.SearchStrategy:
    """Sequence lengths in ``[min_value, max_value]``, often powers of two and their
    neighbours (where off-by-one errors live)."""
    min_value = _count("min_value", min_value, 1)
    max_value = _count("max_value", max_value, min_value)
    awkward = [n for n in AWKWARD_LENGTHS if min_value <= n <= max_value]
    uniform = st.integers(min_value, max_value)
    return st.one_of(st.sampled_from(awkward), uniform) if awkward else uniform


def batch_shapes(max_dims: int = 2, max_side: int = 3) -> st.SearchStrategy:
    """Leading batch shapes: ``()`` up to ``max_dims`` dims of size 1..``max_side``."""
    if max_dims < 0 or max_side < 1:
        raise InvalidArgument(f"need max_dims >= 0 and max_side >= 1, got {max_dims}, {max_side}")
    return st.lists(st.integers(1, max_side), max_size=max_dims).map(tuple)


def poison_unread(level_scales, starts=None, lengths=None):
    """A copy of ``level_scales (..., T, L)`` with every entry that no row reads set to NaN: row
    ``t`` at position ``t``, or, for sequences packed along ``T`` (``lengths``, summing to ``T``)
    that start at absolute positions ``starts``, row ``j`` of sequence ``n`` at ``starts[n] + j``."""
    T, L = level_scales.shape[-2:]
    if starts is None:
        read = fenwick.read_levels(T, L)
    else:
        read = np.concatenate([fenwick.read_levels(a + n, L)[a:] for a, n in zip(starts, lengths) if n]
                              or [np.zeros((0, L), dtype=bool)])
        if read.shape[0] != T:
            raise ValueError(f"lengths must sum to T={T} (the rows of level_scales), got {list(lengths)}")
    if is_torch(level_scales):
        read = namespace(level_scales).as_tensor(read, device=level_scales.device)
        return level_scales.masked_fill(~read, float("nan"))
    out = np.array(level_scales, copy=True)
    out[..., ~read] = np.nan
    return out


def _to_library(a: np.ndarray, library: str, dtype, device):
    """``a`` as a ``library`` array of ``dtype``; a numpy dtype (the default ``numpy.float64``)
    serves torch as the matching torch dtype."""
    torch_dtype = type(dtype).__module__.startswith("torch")
    if library == "numpy":
        if torch_dtype:
            raise InvalidArgument(f"dtype must be a numpy dtype for library='numpy', got {dtype}")
        return a.astype(dtype)
    import torch

    if not torch_dtype:
        dtype = torch.from_numpy(np.zeros(0, dtype=dtype)).dtype
    return torch.as_tensor(a, device=device).to(dtype)


def _decay_values(rng, kind: str, shape):
    if kind == "mild":
        return -rng.uniform(0.0, 1.0, shape)
    if kind == "strong":
        g = -rng.uniform(0.0, 50.0, shape)
        near_zero = rng.random(shape) < 0.5
        return np.where(near_zero, -rng.uniform(0.0, 1e-3, shape), g)
    if kind == "zero":
        return np.zeros(shape)
    raise InvalidArgument(f"decay must be one of {DECAYS}, got {kind!r}")


@st.composite
def masks(
    draw,
    T=None,
    batch_shape=(),
    decay=st.sampled_from(DECAYS),
    extra_levels=st.integers(0, 2),
    poison: bool = True,
    dtype=np.float64,
    library: str = "numpy",
    device="cpu",
):
    """Draw a :class:`hodlr.LogLinearMask`.

    Parameters (each a value or a strategy)
    ----------
    T : int, default ``st_lengths()``
    batch_shape : tuple, default ``()``
        Batch shape of ``level_scales``; the decay, if any, gets a broadcastable one.
    decay : str, one of :data:`DECAYS`
    extra_levels : int
        Columns beyond ``num_levels(T)``.
    poison : bool
        Set every never-read level scale to NaN.
    dtype : numpy or torch dtype
        For ``library="torch"`` a numpy dtype means the matching torch dtype.
    library : ``"numpy"`` or ``"torch"``
    device : torch device (ignored for numpy)
    """
    from hodlr.mask import LogLinearMask

    T = draw(_strategy(st_lengths() if T is None else T))
    batch = tuple(_count(f"batch_shape[{i}]", n) for i, n in enumerate(draw(_strategy(batch_shape))))
    kind = draw(_strategy(decay))
    extra = _count("extra_levels", draw(_strategy(extra_levels)))
    poison, dtype, library, device = (draw(_strategy(x)) for x in (poison, dtype, library, device))
    if not isinstance(poison, (bool, np.bool_)):
        raise InvalidArgument(f"poison must be a bool, got {poison!r}")
    T = _count("T", T, 1)
    if kind not in DECAYS:
        raise InvalidArgument(f"decay must be one of {DECAYS}, got {kind!r}")
    if library not in ("numpy", "torch"):
        raise InvalidArgument(f"library must be 'numpy' or 'torch', got {library!r}")
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    L = fenwick.num_levels(T) + extra
    lam = rng.uniform(0.2, 1.5, batch + (T, L)) * rng.choice([-1.0, 1.0], batch + (T, L), p=[0.2, 0.8])
    if poison:
        lam = poison_unread(lam)
    g = None
    if kind != "none":
        decay_batch = tuple(1 if draw(st.booleans()) else n for n in batch)
        g = _decay_values(rng, kind, decay_batch + (T,))
    lam = _to_library(lam, library, dtype, device)
    g = None if g is None else _to_library(g, library, dtype, device)
    return LogLinearMask(lam, g)


def _operand_batch(draw, batch):
    """A batch shape that broadcasts to ``batch``: some dims replaced by 1, some leading
    dims dropped."""
    shape = tuple(1 if draw(st.booleans()) else n for n in batch)
    drop = draw(st.integers(0, len(shape)))
    return shape[drop:]


@st.composite
def operands(draw, M, D=st.integers(1, 5), broadcast: bool = True):
    """Draw ``X (..., T, D)`` for the mask ``M``: its library, dtype and device, a batch shape
    that broadcasts with ``M``'s (when ``broadcast``), entries from a standard normal."""
    D = _count("D", draw(_strategy(D)))
    batch = _operand_batch(draw, M.batch_shape) if broadcast else M.batch_shape
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = rng.standard_normal(tuple(batch) + (M.T, D))
    return _like_mask(x, M)


def _like_mask(x: np.ndarray, M):
    if M.library == "numpy":
        return x.astype(M.dtype)
    import torch

    return torch.as_tensor(x, device=M.device).to(M.dtype)


@st.composite
def attention_inputs(draw, M, Dk=st.integers(1, 5), Dv=st.integers(1, 5), broadcast: bool = True):
    """Draw ``(q, k, v)`` for the mask ``M``; with ``broadcast``, q and k may carry size-1
    batch dims (grouped heads) and each operand its own broadcastable batch shape."""
    Dk = _count("Dk", draw(_strategy(Dk)))
    Dv = _count("Dv", draw(_strategy(Dv)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    out = []
    for width in (Dk, Dk, Dv):
        batch = _operand_batch(draw, M.batch_shape) if broadcast else M.batch_shape
        out.append(_like_mask(rng.standard_normal(tuple(batch) + (M.T, width)), M))
    return tuple(out)
