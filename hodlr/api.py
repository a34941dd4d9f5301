"""The public operations: ``matmul(M, X)``, ``attention(q, k, v, M)`` and
``gated_delta_attention(q, k, v, beta, M)`` on any backend."""

from __future__ import annotations

import math

from hodlr.fenwick.arrays import cast, zeros
from hodlr import _checks, _deferred, backends as registry
from hodlr.mask import LogLinearMask

__all__ = ["attention", "gated_delta_attention", "gated_delta_matrix", "matmul"]


def _check_mask(M):
    if not isinstance(M, LogLinearMask):
        raise TypeError(f"M must be a hodlr.LogLinearMask, got {type(M).__name__}")


def _check_operand_dtypes(M, named: dict):
    dtypes = {name: x.dtype for name, x in named.items()}
    first = next(iter(named))
    for name, dtype in dtypes.items():
        if dtype != dtypes[first]:
            raise TypeError(f"{name} has dtype {dtype} but {first} has {dtypes[first]}; they must match")
    if not _checks.operand_dtype_ok(M.dtype, dtypes[first]):
        raise TypeError(
            f"the mask has dtype {M.dtype} but {first} has {dtypes[first]}; they must match "
            "(a float32 mask may also serve float16 / bfloat16 operands)"
        )


def _check_length(M, named: dict):
    for name, x in named.items():
        if x.shape[-2] != M.T:
            raise ValueError(
                f"{name} must have shape (..., T, D) with T={M.T} (the mask's length), got shape {tuple(x.shape)}"
            )


def _empty(batch) -> bool:
    return any(n == 0 for n in batch)


def _resolve(backend, M, batch, op: str, key_width: int = 0, dtype=None):
    """The backend module that runs ``op`` for the mask ``M`` over the broadcast ``batch`` on keys
    ``key_width`` wide and operands of ``dtype``."""
    if backend == "auto":
        backend = registry.auto_backend(M.library, M.device, M.T, op=op, key_width=key_width,
                                        masks=math.prod(batch), dtype=dtype)
    return registry.get(backend, M.library, M.device, op=op)


def _run(module, op: str, M, *args):
    """``module.op(*args)``; a CUDA mask not yet validated is checked by the backend's own kernels
    where it can (``CHECKS_MASK``), else by the mask's check kernel queued first.  The caller has
    reported the deferred checks (:func:`hodlr._deferred.report`, once per public call)."""
    if not getattr(module, "CHECKS_MASK", False):
        M._queue_check(report=False)
        return getattr(module, op)(*args)
    flag = M._check_flag()
    result = getattr(module, op)(*args, check=flag)
    M._checked(flag)
    return result


def _mask_args(M, batch, module=None):
    """The mask's generators broadcast to ``batch``; for ``module`` (a backend, which computes in
    its generators' dtype unless it ``READS_16_BIT_MASKS``) 16-bit generators cast to float32, so that a
    float16 / bfloat16 mask is computed as a float32 one serving 16-bit operands is."""
    lam, g = M.level_scales, M.log_decay
    if module is not None and M.dtype.itemsize == 2 and not getattr(module, "READS_16_BIT_MASKS", False):
        lam, g = (None if a is None else a.float() for a in (lam, g))  # (before the broadcast: no copy of it)
    lam = _checks.broadcast_to(lam, batch + tuple(lam.shape[-2:]))
    if g is not None:
        g = _checks.broadcast_to(g, batch + (M.T,))
    return lam, g


def _no_terms(shape, like, *inputs):
    """The zeros of ``shape`` (``like``'s library, dtype and device) that an operation with no term
    returns (an empty batch, or empty dot products), inside autograd's graph for torch inputs that
    want a gradient: each such input adds an empty sum (0, exactly), whose backward gives it zeros
    of its shape, as a torch operation on empty tensors does, so that a training step through such
    a call runs."""
    out = zeros(shape, like)
    for x in (like,) + inputs:
        if _checks.is_torch(x) and x.requires_grad:
            out = out + x.reshape(-1)[:0].sum()
    return out


@_checks.without_autocast
def matmul(M, X, *, backend: str = "auto"):
    """``Y = M @ X`` for a log-linear mask ``M``.

    Parameters
    ----------
    M : LogLinearMask
        The mask, batch shape ``batch_M``, length ``T``.
    X : array, shape ``(..., T, D)``
        numpy array or torch tensor, in the mask's library and on its device, with the
        mask's dtype (a float32 mask also serves float16 / bfloat16 operands).
    backend : str, default ``"auto"``
        One of ``hodlr.backends.NAMES`` (:func:`hodlr.backend_info` says where each can
        run); ``"auto"`` picks by the rule in :mod:`hodlr.backends`.

    Returns
    -------
    Y : array, shape ``(*broadcast(batch_M, X.shape[:-2]), T, D)``
        Same library, dtype and device as ``X``.  An empty batch (a dim of size 0) or
        ``D = 0`` is not an error: the result is empty, of this shape, and no backend runs.

    Raises
    ------
    ValueError, TypeError
        ``X`` of another length, library, device or dtype than the mask; an unknown backend.
    BackendUnavailableError
        A backend that cannot run on these arrays here.

    Examples
    --------
    >>> import numpy as np, hodlr
    >>> T = 5
    >>> M = hodlr.LogLinearMask(np.ones((T, hodlr.num_levels(T))))
    >>> X = np.arange(T, dtype=float)[:, None]
    >>> hodlr.matmul(M, X, backend="dense").ravel()          # running sums: no decay
    array([ 0.,  1.,  3.,  6., 10.])
    """
    _deferred.report()
    _check_mask(M)
    X = _checks.as_array("X", X, 2, "(..., T, D)")
    _checks.check_same_home({"M.level_scales": M.level_scales, "X": X})
    _check_operand_dtypes(M, {"X": X})
    _check_length(M, {"X": X})
    batch = _checks.broadcast_batch({"M": M.batch_shape, "X": tuple(X.shape[:-2])})
    module = _resolve(backend, M, batch, "matmul", dtype=X.dtype)
    if _empty(batch) or X.shape[-1] == 0:
        return _no_terms(batch + tuple(X.shape[-2:]), X, M.level_scales, M.log_decay)
    lam, g = _mask_args(M, batch, module)
    X = _checks.broadcast_to(X, batch + tuple(X.shape[-2:]))
    return _run(module, "matmul", M, lam, g, X)


@_checks.without_autocast
def attention(q, k, v, M, *, scale=None, backend: str = "auto"):
    """Log-linear attention ``O = (M ⊙ (scale · q kᵀ)) v`` (no softmax).

    Parameters
    ----------
    q, k : array, shape ``(..., T, Dk)``
    v : array, shape ``(..., T, Dv)``
        One library, device and dtype (a float32 mask also serves float16 / bfloat16
        operands).  Leading dims broadcast against each other and the mask's batch shape (so
        ``q: (B, 1, T, Dk)`` serves ``v: (B, H, T, Dv)``).  From the ``(B, T, H, D)`` layout of
        flash-linear-attention use ``q.transpose(1, 2)`` (or :func:`hodlr.log_linear_attn`).
    M : LogLinearMask
        Length ``T``; its batch shape broadcasts with the operands'.
    scale : float or None, default None
        Multiplies ``q kᵀ``; None is 1 (unlike :func:`hodlr.log_linear_attn` and the Gated
        DeltaNet calls, where None is ``Dk ** -0.5``).
    backend : str, default ``"auto"``
        One of ``hodlr.backends.NAMES`` (every backend offers attention;
        :func:`hodlr.backend_info` says where each can run); ``"auto"`` picks by the rule in
        :mod:`hodlr.backends`: ``triton`` for CUDA tensors, ``dense`` on the CPU up to ``T = 256``
        and ``2^22`` mask entries over the batch, then ``chunked`` for torch tensors and
        ``recursive`` for numpy arrays.

    Returns
    -------
    O : array, shape ``(*batch, T, Dv)``, the library, dtype and device of ``v``.  An empty
        batch, ``Dv = 0`` or ``Dk = 0`` (empty dot products: all zeros) is not an error; no
        backend runs.

    Raises
    ------
    ValueError, TypeError
        Operands that do not fit the mask or each other (the message names the argument), or an
        unknown backend; a ``BackendUnavailableError`` for a backend that cannot run here.

    Examples
    --------
    >>> import numpy as np, hodlr
    >>> T = 4
    >>> M = hodlr.LogLinearMask(np.ones((T, hodlr.num_levels(T))))
    >>> ones = np.ones((T, 1))
    >>> hodlr.attention(ones, ones, np.arange(T, dtype=float)[:, None], M).ravel()
    array([0., 1., 3., 6.])
    """
    _deferred.report()
    _check_mask(M)
    q = _checks.as_array("q", q, 2, "(..., T, Dk)")
    k = _checks.as_array("k", k, 2, "(..., T, Dk)")
    v = _checks.as_array("v", v, 2, "(..., T, Dv)")
    _checks.check_same_home({"M.level_scales": M.level_scales, "q": q, "k": k, "v": v})
    _check_operand_dtypes(M, {"q": q, "k": k, "v": v})
    _check_length(M, {"q": q, "k": k, "v": v})
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"q and k must share their last dim Dk: q has shape {tuple(q.shape)}, k has shape {tuple(k.shape)}"
        )
    scale = _checks.check_scale(scale)
    batch = _checks.broadcast_batch(
        {"M": M.batch_shape, "q": tuple(q.shape[:-2]), "k": tuple(k.shape[:-2]), "v": tuple(v.shape[:-2])}
    )
    module = _resolve(backend, M, batch, "attention", dtype=v.dtype)
    if _empty(batch) or q.shape[-1] == 0 or v.shape[-1] == 0:
        return _no_terms(batch + tuple(v.shape[-2:]), v, q, k, M.level_scales, M.log_decay)
    lam, g = _mask_args(M, batch, module)
    q, k, v = (_checks.broadcast_to(a, batch + tuple(a.shape[-2:])) for a in (q, k, v))
    return _run(module, "attention", M, q, k, v, lam, g, scale)


def _gated_delta_operands(M, scale, q, k, beta, v=None):
    """Validate the operands of :func:`gated_delta_attention` (``v`` may be left out); return
    ``(q, k, beta, v, batch, scale)`` with the broadcast batch shape and the resolved scale
    (``None`` when ``Dk = 0``)."""
    _deferred.report()
    _check_mask(M)
    q = _checks.as_array("q", q, 2, "(..., T, Dk)")
    k = _checks.as_array("k", k, 2, "(..., T, Dk)")
    beta = _checks.as_array("beta", beta, 1, "(..., T)")
    matrices = {"q": q, "k": k}
    if v is not None:
        matrices["v"] = v = _checks.as_array("v", v, 2, "(..., T, Dv)")
    _checks.check_same_home({"M.level_scales": M.level_scales, **matrices, "beta": beta})
    _check_operand_dtypes(M, {**matrices, "beta": beta})
    _check_length(M, matrices)
    if beta.shape[-1] != M.T:
        raise ValueError(
            f"beta must have shape (..., T) with T={M.T} (the mask's length), got shape {tuple(beta.shape)}"
        )
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"q and k must share their last dim Dk: q has shape {tuple(q.shape)}, k has shape {tuple(k.shape)}"
        )
    Dk = int(q.shape[-1])
    scale = _checks.check_scale(scale) if scale is not None else (Dk**-0.5 if Dk else None)
    shapes = {"M": M.batch_shape, **{name: tuple(x.shape[:-2]) for name, x in matrices.items()},
              "beta": tuple(beta.shape[:-1])}
    return q, k, beta, v, _checks.broadcast_batch(shapes), scale


@_checks.without_autocast
def gated_delta_attention(q, k, v, beta, M, *, scale=None, backend: str = "auto"):
    """Log-linear Gated DeltaNet ``O = (P ⊙ Mλ) V``.

    Per sequence, with ``A_t = exp(g_t) (I - beta_t k_t k_tᵀ)`` (``g`` the mask's log-decay, 0
    without one): ``P[t, s] = scale · beta_s · q_tᵀ A_t A_{t-1} ⋯ A_{s+1} k_s`` for ``s <= t``,
    the matrix of Gated DeltaNet (``S_t = A_t S_{t-1} + beta_t k_t v_tᵀ``, ``o_t = scale · S_tᵀ q_t``),
    and ``Mλ[t, s] = λ[t, level(t, s)]`` the level scales of the mask (the decay is inside ``P``).
    With every level scale 1 this is Gated DeltaNet.  The delta rule is meant for keys of unit
    norm and ``0 <= beta <= 2`` (each ``I - beta k kᵀ`` is then a contraction); other inputs are
    computed as given.

    Parameters
    ----------
    q, k : array, shape ``(..., T, Dk)``
    v : array, shape ``(..., T, Dv)``
    beta : array, shape ``(..., T)``
        The delta rule's write strengths.
    M : LogLinearMask
        The level scales ``λ`` and the log-decay ``g``, length ``T``.  Leading dims of every
        argument broadcast; one library, device and dtype (a float32 mask also serves
        float16 / bfloat16 operands).  From the ``(B, T, H, D)`` layout of
        flash-linear-attention use ``q.transpose(1, 2)`` (or :func:`hodlr.log_linear_gated_delta_rule`).
    scale : float, optional
        Multiplies ``P``; default ``Dk ** -0.5`` (as flash-linear-attention's Gated DeltaNet;
        note that :func:`attention` defaults to 1).
    backend : str, default ``"auto"``
        ``"dense"``, ``"fenwick"``, ``"chunked"`` or ``"triton"`` (the backends that offer it);
        ``"auto"`` picks by the rule in :mod:`hodlr.backends`: ``triton`` for CUDA tensors,
        ``chunked`` for other torch tensors, ``fenwick`` for numpy arrays (``dense`` on the CPU up
        to ``T = 256`` and ``2^22`` mask entries over the batch).
        Keys wider than 128 (``Dk > 128``), which the Triton kernels do not take, run
        ``chunked`` on a GPU under ``"auto"``.
        A log-decay above 0 (a gate that grows) is outside the chunk-wise backends' accuracy
        (``chunked``, ``triton``: docs/mathematics.md §13, growth gates); ``fenwick`` and
        ``dense`` stay exact to rounding.

    Returns
    -------
    O : array, shape ``(*batch, T, Dv)``, the library, dtype and device of ``v``.  An empty
        batch, ``Dv = 0`` or ``Dk = 0`` (``P = 0``) is not an error; no backend runs.

    Raises
    ------
    ValueError, TypeError
        Operands (``beta`` included) that do not fit the mask or each other, keys wider than 128
        on ``backend="triton"``, or an unknown backend; a ``BackendUnavailableError`` for a backend
        that does not offer it (``sparse``, ``recursive``) or cannot run here.

    Examples
    --------
    >>> import numpy as np, hodlr
    >>> T = 4
    >>> M = hodlr.LogLinearMask(np.ones((T, hodlr.num_levels(T))))
    >>> k = np.ones((T, 1))
    >>> hodlr.gated_delta_attention(k, k, np.arange(T, dtype=float)[:, None], np.ones(T), M).ravel()
    array([0., 1., 2., 3.])
    """
    v = _checks.as_array("v", v, 2, "(..., T, Dv)")
    q, k, beta, v, batch, scale = _gated_delta_operands(M, scale, q, k, beta, v)
    module = _resolve(backend, M, batch, "gated_delta_attention", q.shape[-1], v.dtype)
    if _empty(batch) or q.shape[-1] == 0 or v.shape[-1] == 0:
        return _no_terms(batch + tuple(v.shape[-2:]), v, q, k, beta, M.level_scales, M.log_decay)
    lam, g = _mask_args(M, batch, module)
    q, k, v = (_checks.broadcast_to(a, batch + tuple(a.shape[-2:])) for a in (q, k, v))
    beta = _checks.broadcast_to(beta, batch + (M.T,))
    return _run(module, "gated_delta_attention", M, q, k, v, beta, lam, g, scale)


@_checks.without_autocast
def gated_delta_matrix(q, k, beta, M, *, scale=None):
    """The dense ``T x T`` matrix ``P ⊙ Mλ`` of :func:`gated_delta_attention` (so that
    ``gated_delta_attention(q, k, v, beta, M) == gated_delta_matrix(q, k, beta, M) @ v``), for
    inspecting small ``T``: its off-diagonal HODLR blocks have rank at most ``Dk``
    (``hodlr.rank_profile(hodlr.HODLRMatrix.from_dense(A, rank=Dk))``).

    Parameters are those of :func:`gated_delta_attention` (``v`` is not needed).  Returns an
    array of shape ``(*batch, T, T)`` in the mask's dtype; refuses, before allocating, sizes
    over ``hodlr.options.dense_max_bytes``.

    Examples
    --------
    >>> import numpy as np, hodlr
    >>> T = 3
    >>> M = hodlr.LogLinearMask(np.ones((T, hodlr.num_levels(T))))
    >>> k = np.ones((T, 1))
    >>> hodlr.gated_delta_matrix(k, k, np.full(T, 0.5), M)   # each write halves the older ones
    array([[0.5  , 0.   , 0.   ],
           [0.25 , 0.5  , 0.   ],
           [0.125, 0.25 , 0.5  ]])
    """
    from hodlr.backends import dense

    q, k, beta, _, batch, scale = _gated_delta_operands(M, scale, q, k, beta)
    M._queue_check(report=False)
    lam, g = _mask_args(M, batch, dense)  # (a 16-bit mask computed in float32, as by the operations)
    if scale is None or _empty(batch):
        return zeros(batch + (M.T, M.T), M.level_scales)
    q, k = (cast(_checks.broadcast_to(a, batch + tuple(a.shape[-2:])), lam.dtype) for a in (q, k))
    beta = cast(_checks.broadcast_to(beta, batch + (M.T,)), lam.dtype)
    P = dense.gated_delta_matrix(q, k, beta, lam, g, scale, what="hodlr.gated_delta_matrix", instead=None)
    return cast(P, M.dtype)


backends = registry
"""``hodlr.backends``: the registry module of the backends (``hodlr.backends.NAMES``,
``hodlr.backends.get``, ``hodlr.backends.auto_backend``, ``hodlr.backends.info``).  What each
computes with and whether it can run here: :func:`hodlr.backend_info`
(``{name: {"description", "ops": {op: {"numpy", "torch_cpu", "torch_cuda"}}}}``, each of the last
three ``True`` or the reason why not)."""
