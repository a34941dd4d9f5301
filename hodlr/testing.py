"""Hypothesis strategies and error metrics for proving an implementation equal to the
reference.  Shipped so users can test their own kernels the way hodlr tests its own.

The arguments of :func:`masks`, :func:`operands`, :func:`attention_inputs` and
:func:`gated_delta_inputs` each accept a value or a strategy (as in ``hypothesis.extra.numpy``);
:func:`st_lengths` and :func:`batch_shapes` take values (their bounds); :func:`scales` draws a
``scale`` argument.  Misuse raises
``hypothesis.errors.InvalidArgument``.  Values are drawn constructively: hypothesis draws
shapes, kinds and a seed, numpy's generator fills the arrays (shrinking then works on shapes and
seeds), and each strategy records what it drew with ``hypothesis.note`` (length, levels, batch
shapes, decay kind, dtype, seed), which a failing test prints beside its falsifying example.

What a test should do besides drawing (as hodlr's own tests do): compare in float64 against a
reference (:func:`reference`: the dense result from float64 copies, and the magnitude that a
float32 or bfloat16 result is measured against with :func:`scaled_error`), keep the never-read
level scales poisoned with NaN (:func:`masks` does by default; a correct kernel never reads them,
so a NaN in its result points at a wrong bucket level), and hand a kernel that writes into a
buffer one filled with NaN (:func:`nan_like`), so that an entry it never writes fails the
comparison.  :func:`assert_close` says which of these failed.
Draw what the kernel could get wrong: lengths past twice its chunk or tile (``st_lengths``'
``max_value``: a kernel of 64-token chunks meets a partial second chunk only from ``T = 65``),
a mask batch (``batch_shape=batch_shapes()``: with ``()`` every head shares one mask, so reading
the wrong head's mask, or grouping heads wrongly, passes) and a scale (:func:`scales`).

Examples
--------
>>> from hypothesis import given, strategies as st
>>> import hodlr
>>> from hodlr.testing import assert_close, batch_shapes, masks, operands, st_lengths, TOLERANCES
>>> @st.composite
... def matmul_cases(draw):
...     M = draw(masks(T=st_lengths(max_value=40), batch_shape=batch_shapes()))
...     return M, draw(operands(M, D=3))
>>> @given(matmul_cases())
... def test_recursive_matches_dense(case):
...     M, X = case
...     assert_close(hodlr.matmul(M, X, backend="recursive"), hodlr.matmul(M, X, backend="dense"),
...                  TOLERANCES["cpu_float64"], "recursive matmul")
>>> test_recursive_matches_dense()  # runs the property: silent when it holds
"""

from __future__ import annotations

import numpy as np
from hypothesis import note, strategies as st
from hypothesis.errors import InvalidArgument

from hodlr import fenwick
from hodlr._accuracy import DECAYS, TOLERANCES, _float64, assert_close, decay_values, relative_error, scaled_error
from hodlr.fenwick.arrays import check_int, is_torch, namespace

__all__ = [
    "AWKWARD_LENGTHS",
    "DECAYS",
    "SCALES",
    "TOLERANCES",
    "assert_close",
    "attention_inputs",
    "batch_shapes",
    "decay_values",
    "gated_delta_inputs",
    "masks",
    "operands",
    "poison_unread",
    "nan_like",
    "reference",
    "relative_error",
    "scaled_error",
    "scales",
    "st_lengths",
]

AWKWARD_LENGTHS = (1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129, 255, 256, 257, 511,
                   512, 513, 1000, 1023, 1024, 1025, 2047, 2048, 2049, 4095, 4096, 4097)
"""Sequence lengths where off-by-one errors live: powers of two and their neighbours (a new
level, a full or partial last chunk of every power-of-two chunk size), and 1000.
:func:`st_lengths` draws one of them for about a third to two thirds of its draws (hypothesis's
generation phases move the share)."""


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
    """Sequence lengths in ``[min_value, max_value]`` (values, not strategies): one of
    :data:`AWKWARD_LENGTHS` in that range or a uniform draw, each a choice of ``st.one_of``.

    Examples
    --------
    >>> st_lengths(max_value=70).example() <= 70
    True
    """
    min_value = _count("min_value", min_value, 1)
    max_value = _count("max_value", max_value, min_value)
    awkward = [n for n in AWKWARD_LENGTHS if min_value <= n <= max_value]
    uniform = st.integers(min_value, max_value)
    return st.one_of(st.sampled_from(awkward), uniform) if awkward else uniform


SCALES = (None, 1.0, 0.125, 0.5, -1.25)
"""The scales :func:`scales` draws: ``None`` (the call's default), 1, a head width's
``D ** -0.5``, and values a kernel that drops or squares the scale gets wrong."""


def scales() -> st.SearchStrategy:
    """A ``scale`` argument for the attention calls, one of :data:`SCALES` (a kernel that ignores
    its scale, or applies it twice, fails at the first draw of one that is not 1).

    Examples
    --------
    >>> scales().example() in SCALES
    True
    """
    return st.sampled_from(SCALES)


def batch_shapes(max_dims: int = 2, max_side: int = 3) -> st.SearchStrategy:
    """Leading batch shapes (values, not strategies): ``()`` up to ``max_dims`` dims of size
    1..``max_side``.

    Examples
    --------
    >>> len(batch_shapes(max_dims=2).example()) <= 2
    True
    """
    max_dims, max_side = _count("max_dims", max_dims), _count("max_side", max_side, 1)
    return st.lists(st.integers(1, max_side), max_size=max_dims).map(tuple)


def _int_list(name: str, values) -> list:
    """``values`` (a sequence, a 1-d numpy array or tensor of integers >= 0) as a list of ints."""
    if hasattr(values, "tolist") and getattr(values, "ndim", 1) == 1:
        values = values.tolist()
    if not isinstance(values, (list, tuple)):
        raise TypeError(f"{name} must be a sequence (list, tuple, 1-d array or tensor) of integers >= 0, got "
                        f"{type(values).__name__}")
    return [check_int(f"{name}[{i}]", a, 0) for i, a in enumerate(values)]


def poison_unread(level_scales, starts=None, lengths=None):
    """A copy of ``level_scales (..., T, L)`` (numpy or torch, floating) with every entry that no
    row reads set to NaN: row ``t`` at position ``t``, or, for sequences packed along ``T``
    (``lengths``, summing to ``T``) that start at absolute positions ``starts``, row ``j`` of
    sequence ``n`` at ``starts[n] + j``.  ``L`` must cover every position
    (``num_levels(end)`` columns for the largest end), as the calls that read them require.

    Examples
    --------
    >>> import numpy as np
    >>> poison_unread(np.ones((4, 3)))
    array([[ 1., nan, nan],
           [ 1.,  1., nan],
           [ 1., nan,  1.],
           [ 1.,  1.,  1.]])
    """
    shape = getattr(level_scales, "shape", None)
    if shape is None or len(shape) < 2:
        raise ValueError(f"level_scales must be an array of shape (..., T, L), got "
                         f"{'shape ' + str(tuple(shape)) if shape is not None else type(level_scales).__name__}")
    kind = getattr(level_scales, "dtype", None)
    if not (level_scales.is_floating_point() if is_torch(level_scales) else np.issubdtype(kind, np.floating)):
        raise TypeError(f"level_scales must be floating (NaN marks the unread entries), got {kind}")
    if (starts is None) != (lengths is None):
        raise ValueError("starts and lengths go together (packed sequences), or neither")
    T, L = shape[-2:]
    if starts is None:
        end = T
    else:
        starts, lengths = _int_list("starts", starts), _int_list("lengths", lengths)
        if len(starts) != len(lengths) or sum(lengths) != T:
            raise ValueError(f"lengths must sum to T={T} (the rows of level_scales) with one start each, got "
                             f"starts {starts}, lengths {lengths}")
        end = max([a + n for a, n in zip(starts, lengths) if n], default=1)
    if L < fenwick.num_levels(max(end, 1)):
        from hodlr.errors import LevelsExceededError

        raise LevelsExceededError(f"level_scales has L={L} columns but position {end - 1} needs "
                                  f"num_levels({end})={fenwick.num_levels(end)}", end=end,
                                  need=fenwick.num_levels(end), levels=L)
    if starts is None:
        read = fenwick.read_levels(T, L)
    else:
        read = fenwick.reads(np.concatenate([np.arange(a, a + n) for a, n in zip(starts, lengths)] or [[]]), L)
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
        if not np.issubdtype(np.dtype(dtype), np.floating):
            raise InvalidArgument(f"dtype must be a floating dtype (a mask's level scales), got {np.dtype(dtype)}")
        return a.astype(dtype)
    import torch

    if not torch_dtype:
        dtype = torch.from_numpy(np.zeros(0, dtype=dtype)).dtype
    return torch.as_tensor(a, device=device).to(dtype)


def _dtype_name(dtype) -> str:
    """``float64`` for ``numpy.float64`` and ``torch.float64`` alike."""
    return str(dtype).replace("torch.", "") if type(dtype).__module__.startswith("torch") else np.dtype(dtype).name


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

    Level scales ``|λ| ~ U(0.2, 1.5)``, negative with probability 0.2 (a kernel that takes
    ``log λ`` must handle the sign).  The mask's batch shape is ``batch_shape``; its two arrays
    broadcast to it: the log-decay, if any, may have some dims 1 and lack leading dims, or carry
    leading dims the level scales lack (scales shared across heads, a decay per head).

    Parameters (each a value or a strategy)
    ----------
    T : int, default ``st_lengths()`` (1 … 300, often an awkward length)
    batch_shape : tuple of int, default ``()``
        The mask's batch shape.  Pass :func:`batch_shapes` to prove a kernel over batches and
        heads: with the default ``()`` every operand shares one mask, and a kernel that reads one
        head's mask for all (or groups heads wrongly) passes.
    decay : str, one of :data:`DECAYS`, default any of them
        ``"none"`` (no decay array), ``"mild"`` (``g ~ U(-1, 0)``), ``"strong"`` (half the steps
        ``U(-50, 0)``, half within ``1e-3`` of 0: decays that underflow beside ones near 1),
        ``"steep"`` (the same with ``U(-1e4, 0)``: a cumulative log-decay so far below 0 that a
        decay formed as a difference of prefix sums fails a float64 comparison;
        :func:`decay_values`), ``"zero"`` (an explicit array of zeros).
    extra_levels : int, default 0 … 2
        Columns beyond ``num_levels(T)`` (never read).
    poison : bool, default True
        Set every never-read level scale to NaN (:func:`poison_unread`).
    dtype : numpy or torch dtype, default float64
        For ``library="torch"`` a numpy dtype means the matching torch dtype.
    library : ``"numpy"`` or ``"torch"``, default numpy
    device : torch device (ignored for numpy), default cpu

    Examples
    --------
    >>> M = masks(T=5, decay="mild").example()
    >>> M.T, M.level_scales.shape[-1] >= 4, M.log_decay is not None
    (5, True, True)
    """
    from hodlr.mask import LogLinearMask

    T = draw(_strategy(st_lengths() if T is None else T))
    shape = draw(_strategy(batch_shape))
    if not isinstance(shape, (tuple, list)):
        raise InvalidArgument(f"batch_shape must be a tuple of ints (or a strategy of them), got "
                              f"{type(shape).__name__}")
    batch = tuple(_count(f"batch_shape[{i}]", n) for i, n in enumerate(shape))
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
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    L = fenwick.num_levels(T) + extra
    lam_batch, decay_batch = batch, None
    if kind != "none":
        decay_batch = tuple(1 if draw(st.booleans()) else n for n in batch)
        cut = draw(st.integers(0, len(batch)))  # leading dims one of the two arrays lacks
        if cut and draw(st.booleans()):  # the scales, the decay carrying them whole
            lam_batch, decay_batch = batch[cut:], batch[:cut] + decay_batch[cut:]
        else:
            decay_batch = decay_batch[cut:]
    lam = rng.uniform(0.2, 1.5, lam_batch + (T, L)) * rng.choice([-1.0, 1.0], lam_batch + (T, L), p=[0.2, 0.8])
    if poison:
        lam = poison_unread(lam)
    g = None if decay_batch is None else decay_values(rng, kind, decay_batch + (T,))
    note(f"masks: T={T}, L={L}, batch_shape={batch}, decay={kind!r}"
         + ("" if decay_batch is None else f" (level_scales batch {lam_batch}, log_decay batch {decay_batch})")
         + f", poison={bool(poison)}, {library} {_dtype_name(dtype)}, seed={seed}")
    try:
        lam = _to_library(lam, library, dtype, device)
        g = None if g is None else _to_library(g, library, dtype, device)
        return LogLinearMask(lam, g)
    except (TypeError, RuntimeError, AssertionError) as err:  # a dtype the mask refuses, a device not here
        raise InvalidArgument(f"masks cannot make a {library} mask of dtype {_dtype_name(dtype)} on {device!r}: "
                              f"{err}") from err


def reference(op: str, M, *operands, scale=None):
    """``(result, magnitude)`` in float64 on the CPU for ``hodlr.<op>(*operands, M)``: the result
    by the ``dense`` backend from float64 copies of the mask and operands (whatever their dtype
    and device: a 16-bit mask is not its own reference), and the magnitude to measure a
    low-precision result against with :func:`scaled_error`: the same operation on absolute values
    (``|M| |X|``; ``(|M| ⊙ |scale| |q| |k|ᵀ) |v|``), None for ``gated_delta_attention``, whose
    inverse has no such bound (compare with :func:`relative_error`).

    Parameters
    ----------
    op : ``"matmul"``, ``"attention"`` or ``"gated_delta_attention"``
    M : hodlr.LogLinearMask
    operands : ``X`` (matmul), ``q, k, v`` (attention), ``q, k, v, beta`` (gated_delta_attention)
    scale : float, optional
        As the call's (its default where None).

    Examples
    --------
    >>> import numpy as np, hodlr
    >>> M = hodlr.LogLinearMask(np.ones((3, 3)))
    >>> reference("matmul", M, -np.ones((3, 1)))[1].ravel()
    array([1., 2., 3.])
    """
    from hodlr import api
    from hodlr.mask import LogLinearMask

    _check_mask(M)
    arity = {"matmul": 1, "attention": 3, "gated_delta_attention": 4}
    if op not in arity:
        raise InvalidArgument(f"op must be one of {', '.join(map(repr, arity))}, got {op!r}")
    if len(operands) != arity[op]:
        raise InvalidArgument(f"{op} takes {arity[op]} operands, got {len(operands)}")
    to64 = lambda a: None if a is None else _float64(a)  # noqa: E731
    lam, g = to64(M.level_scales), to64(M.log_decay)
    ops = [to64(a) for a in operands]
    M64 = LogLinearMask(lam, g, validate=False)
    absM = LogLinearMask(np.abs(lam), g, validate=False)
    if op == "matmul":
        return api.matmul(M64, ops[0], backend="dense"), api.matmul(absM, np.abs(ops[0]), backend="dense")
    if op == "attention":
        s = None if scale is None else abs(float(scale))
        return (api.attention(*ops, M64, scale=scale, backend="dense"),
                api.attention(*(np.abs(a) for a in ops), absM, scale=s, backend="dense"))
    q, k, v, beta = ops
    return api.gated_delta_attention(q, k, v, beta, M64, scale=scale, backend="dense"), None


def nan_like(x, shape=None):
    """An array of NaN with ``x``'s library, dtype and device (and its shape, or ``shape``): the
    output buffer to hand a kernel, so that an entry it never writes fails the comparison."""
    shape = tuple(x.shape) if shape is None else tuple(shape)
    if is_torch(x):
        return namespace(x).full(shape, float("nan"), dtype=x.dtype, device=x.device)
    return np.full(shape, np.nan, dtype=x.dtype)


def _check_mask(M):
    from hodlr.mask import LogLinearMask

    if not isinstance(M, LogLinearMask):
        raise InvalidArgument(f"M must be a hodlr.LogLinearMask (draw one with masks()), got {type(M).__name__}")


def _operand_batches(draw, batch, count: int, broadcast) -> list:
    """``count`` batch shapes that broadcast with the mask's ``batch`` and with each other.  With
    ``broadcast``: a common shape is drawn first (the mask's, its size-1 dims sometimes widened and
    sometimes a leading dim added: operands with more batch than the mask, which is then shared
    across them), and each operand takes it with some dims replaced by 1 and some leading dims
    dropped.  Without: the mask's shape for each."""
    broadcast = draw(_strategy(broadcast))
    if not isinstance(broadcast, (bool, np.bool_)):
        raise InvalidArgument(f"broadcast must be a bool, got {broadcast!r}")
    if not broadcast:
        return [tuple(batch)] * count
    full = tuple(draw(st.integers(2, 3)) if n == 1 and draw(st.booleans()) else n for n in batch)
    if draw(st.booleans()) and draw(st.booleans()):
        full = (draw(st.integers(1, 3)),) + full
    out = []
    for _ in range(count):
        shape = tuple(1 if draw(st.booleans()) else n for n in full)
        out.append(shape[draw(st.integers(0, len(shape))):])
    return out


@st.composite
def operands(draw, M, D=st.integers(1, 5), broadcast: bool = True):
    """Draw ``X (..., T, D)`` for the mask ``M``, in its library, dtype and device, entries from
    a standard normal.

    Parameters (each a value or a strategy)
    ----------
    M : hodlr.LogLinearMask
    D : int, default 1 … 5
    broadcast : bool, default True
        ``X``'s batch shape broadcasts with ``M``'s but may differ from it: dims of 1, dims
        dropped, or more batch than ``M`` (a mask shared by the operand's batch).  False: ``M``'s.

    Examples
    --------
    >>> M = masks(T=6, batch_shape=(2,)).example()
    >>> X = operands(M, D=3, broadcast=False).example()
    >>> X.shape
    (2, 6, 3)
    """
    _check_mask(M)
    D = _count("D", draw(_strategy(D)))
    (batch,) = _operand_batches(draw, M.batch_shape, 1, broadcast)
    seed = draw(st.integers(0, 2**32 - 1))
    note(f"operands: X batch {batch}, D={D}, seed={seed}")
    x = np.random.default_rng(seed).standard_normal(tuple(batch) + (M.T, D))
    return _like_mask(x, M)


def _like_mask(x: np.ndarray, M):
    if M.library == "numpy":
        return x.astype(M.dtype)
    import torch

    return torch.as_tensor(x, device=M.device).to(M.dtype)


@st.composite
def attention_inputs(draw, M, Dk=st.integers(1, 5), Dv=st.integers(1, 5), broadcast: bool = True):
    """Draw ``(q, k, v)`` for the mask ``M``: ``q, k (..., T, Dk)``, ``v (..., T, Dv)`` in its
    library, dtype and device, entries from a standard normal.

    Parameters (each a value or a strategy)
    ----------
    M : hodlr.LogLinearMask
    Dk, Dv : int, default 1 … 5
    broadcast : bool, default True
        Each operand its own batch shape, broadcasting with ``M``'s and the others' (q and k
        with size-1 dims: grouped heads; more batch than ``M``: a mask shared across heads).
        False: ``M``'s for all three.

    Examples
    --------
    >>> M = masks(T=6).example()
    >>> q, k, v = attention_inputs(M, Dk=2, Dv=3, broadcast=False).example()
    >>> q.shape, v.shape
    ((6, 2), (6, 3))
    """
    _check_mask(M)
    Dk = _count("Dk", draw(_strategy(Dk)))
    Dv = _count("Dv", draw(_strategy(Dv)))
    batches = _operand_batches(draw, M.batch_shape, 3, broadcast)
    seed = draw(st.integers(0, 2**32 - 1))
    note(f"attention_inputs: q, k, v batches {batches[0]}, {batches[1]}, {batches[2]}, Dk={Dk}, Dv={Dv}, seed={seed}")
    rng = np.random.default_rng(seed)
    return tuple(_like_mask(rng.standard_normal(tuple(b) + (M.T, w)), M) for b, w in zip(batches, (Dk, Dk, Dv)))


@st.composite
def gated_delta_inputs(draw, M, Dk=st.integers(1, 4), Dv=st.integers(1, 3), beta_max=st.sampled_from([1.0, 2.0]),
                       broadcast: bool = True):
    """Draw ``(q, k, v, beta)`` for a log-linear Gated DeltaNet with the mask ``M`` (its level
    scales and log-decay): ``q, k (..., T, Dk)`` with ``k`` of unit norm (the delta rule's regime,
    where each ``I - β k kᵀ`` is a contraction for ``0 <= β <= 2``), ``v (..., T, Dv)``,
    ``beta (..., T) ~ U(0, beta_max)``, in ``M``'s library, dtype and device.

    Parameters (each a value or a strategy)
    ----------
    M : hodlr.LogLinearMask
    Dk : int, default 1 … 4
    Dv : int, default 1 … 3
    beta_max : float in (0, 2], default 1 or 2
    broadcast : bool, default True
        As :func:`attention_inputs`, ``beta`` with its own batch shape too.

    Examples
    --------
    >>> import numpy as np
    >>> M = masks(T=6, decay="mild").example()
    >>> q, k, v, beta = gated_delta_inputs(M, Dk=3, Dv=2, broadcast=False).example()
    >>> k.shape, beta.shape, bool(np.allclose(np.linalg.norm(k, axis=-1), 1))
    ((6, 3), (6,), True)
    """
    _check_mask(M)
    Dk = _count("Dk", draw(_strategy(Dk)), 1)
    Dv = _count("Dv", draw(_strategy(Dv)))
    top = draw(_strategy(beta_max))
    if isinstance(top, bool) or not isinstance(top, (int, float, np.floating)) or not 0 < top <= 2:
        raise InvalidArgument(f"beta_max must be a number in (0, 2], got {top!r}")
    batches = _operand_batches(draw, M.batch_shape, 4, broadcast)
    seed = draw(st.integers(0, 2**32 - 1))
    note(f"gated_delta_inputs: q, k, v, beta batches {', '.join(map(str, batches))}, Dk={Dk}, Dv={Dv}, "
         f"beta_max={top}, seed={seed}")
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal(tuple(b) + (M.T, w)) for b, w in zip(batches, (Dk, Dk, Dv)))
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    beta = rng.uniform(0.0, float(top), tuple(batches[3]) + (M.T,))
    return tuple(_like_mask(x, M) for x in (q, k, v, beta))
