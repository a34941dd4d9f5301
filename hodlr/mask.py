"""The log-linear mask: level scales plus an optional scalar log-decay.

``M[t, s] = level_scales[t, level(t, s)] * exp(G[t] - G[s])`` for ``s <= t`` (0 above),
with ``G = cumsum(log_decay)``.  See ``docs/mathematics.md``.
"""

from __future__ import annotations

import math

import numpy as np

from hodlr import _checks, _deferred, _formulas, display, fenwick, sparse, tree
from hodlr._formulas import decay_matrix
from hodlr.errors import LevelsExceededError
from hodlr.fenwick.arrays import as_like, check_bool, check_int, is_torch, namespace, to_numpy

__all__ = ["LogLinearMask", "decay_matrix"]


class LogLinearMask:
    """The ``T x T`` log-linear attention mask, held as its compact generators.

    Parameters
    ----------
    level_scales : array, shape ``(..., T, L)``
        ``level_scales[..., t, l]`` weighs the Fenwick bucket of level ``l`` of query ``t``
        (level 0 is the query itself).  ``L >= num_levels(T)``; extra columns are allowed
        and never read.  Row ``t`` reads column ``l >= 1`` only if bit ``l - 1`` of ``t``
        is set; the other entries have no effect on any result.
    log_decay : array, shape ``(..., T)``, optional
        Per-step log-decay ``g`` (``g = a * dt`` gives log-linear Mamba-2).  Default: no
        decay (log-linear linear attention).  ``log_decay[..., 0]`` never enters the mask.
    validate : bool, default True
        Check that every level scale that is read, and the log-decay, are finite.  numpy
        arrays and CPU tensors are checked here, before the constructor returns (a
        ``ValueError`` naming the first bad entry).  CUDA tensors are checked on the device by
        the first hodlr computation with the mask, with no host synchronisation and nothing of
        size ``T`` built on the host: :func:`hodlr.attention`, :func:`hodlr.matmul` and
        :func:`hodlr.gated_delta_attention` on the ``triton`` backend check inside their
        forward's output kernel, which reads every scale it checks; any other computation
        (another backend, :meth:`to_dense`, :meth:`block_factors`, :meth:`to_sparse`,
        :meth:`to_hodlr`, :meth:`check`) queues one check kernel first.  The verdict is
        reported as the same ``ValueError`` by the first hodlr call that finds it in (at the
        latest :meth:`check`, which waits for it).  Meanwhile a non-finite read scale cannot
        give a finite wrong result: it turns the rows that read it non-finite.  Nothing is
        checked while a CUDA graph is captured or ``torch.compile`` traces (the mask is then
        checked by its first computation outside them).

    numpy arrays or torch tensors (any device) are accepted, float32 or float64 (torch
    also float16 / bfloat16: the operations compute with such a mask in float32, as with a
    float32 mask serving 16-bit operands); both arguments must share library, device and dtype.
    Leading batch dimensions broadcast.

    Examples
    --------
    >>> import numpy as np, hodlr
    >>> T = 6
    >>> lam = np.ones((T, hodlr.num_levels(T)))
    >>> M = hodlr.LogLinearMask(lam, log_decay=np.full(T, np.log(0.5)))
    >>> M.T, M.num_levels, M.batch_shape
    (6, 4, ())
    >>> print(M.to_dense()[3])
    [0.125 0.25  0.5   1.    0.    0.   ]
    """

    def __init__(self, level_scales, log_decay=None, *, validate: bool = True):
        validate = check_bool("validate", validate)
        level_scales = _checks.as_array("level_scales", level_scales, 2, "(..., T, L)")
        T, L = level_scales.shape[-2], level_scales.shape[-1]
        if T < 1:
            raise ValueError(f"level_scales must have T >= 1 rows (shape (..., T, L)), got shape {tuple(level_scales.shape)}")
        need = fenwick.num_levels(T)
        if L < need:
            raise LevelsExceededError(
                f"level_scales has L={L} columns but T={T} needs at least num_levels(T)={need} "
                f"(shape (..., {T}, {need}) or wider), got shape {tuple(level_scales.shape)}",
                end=T, need=need, levels=L)
        shapes = {"level_scales": level_scales.shape[:-2]}
        if log_decay is not None:
            log_decay = _checks.as_array("log_decay", log_decay, 1, "(..., T)")
            _checks.check_same_home({"level_scales": level_scales, "log_decay": log_decay})
            if log_decay.dtype != level_scales.dtype:
                raise TypeError(
                    f"log_decay has dtype {log_decay.dtype} but level_scales has {level_scales.dtype}; "
                    "they must match"
                )
            if log_decay.shape[-1] != T:
                raise ValueError(
                    f"log_decay must have shape (..., T) with T={T} (from level_scales), "
                    f"got shape {tuple(log_decay.shape)}"
                )
            shapes["log_decay"] = log_decay.shape[:-1]
        self._batch_shape = _checks.broadcast_batch(shapes)
        self._level_scales = level_scales
        self._log_decay = log_decay
        self._check = None  # the queued device check (a _deferred.Check) of a CUDA mask
        self._unchecked = False  # a CUDA mask whose device check is still to be queued
        _deferred.report()
        if validate and is_torch(level_scales) and level_scales.device.type == "cuda":
            self._unchecked = math.prod(self._batch_shape) > 0  # T, L >= 1; an empty batch holds nothing
        elif validate and not _checks.is_meta(level_scales):
            read = as_like(fenwick.read_levels(T, L), level_scales)
            xp = namespace(level_scales)
            bad = ~xp.isfinite(level_scales) & read
            if bool(bad.any()):
                where = np.argwhere(to_numpy(bad))[0]
                raise ValueError(
                    f"level_scales must be finite where they are read; entry {tuple(int(i) for i in where)} "
                    "is NaN or inf"
                )
            if log_decay is not None:
                _checks.check_finite("log_decay", log_decay)

    # -- properties ---------------------------------------------------------------------
    @property
    def level_scales(self):
        """The level scales, shape ``(..., T, L)``."""
        return self._level_scales

    @property
    def log_decay(self):
        """The per-step log-decay, shape ``(..., T)``, or ``None`` (no decay)."""
        return self._log_decay

    @property
    def T(self) -> int:
        """Sequence length."""
        return int(self._level_scales.shape[-2])

    @property
    def shape(self) -> tuple:
        """``batch_shape + (T, T)``, the shape of :meth:`to_dense`."""
        return self._batch_shape + (self.T, self.T)

    @property
    def num_levels(self) -> int:
        """Number of levels the mask reads, ``fenwick.num_levels(T)``."""
        return fenwick.num_levels(self.T)

    @property
    def batch_shape(self) -> tuple:
        """Broadcast leading dims of ``level_scales`` and ``log_decay``."""
        return self._batch_shape

    @property
    def dtype(self):
        return self._level_scales.dtype

    @property
    def library(self) -> str:
        """``"numpy"`` or ``"torch"``."""
        return _checks.library_of(self._level_scales)

    @property
    def device(self):
        """The torch device, or ``"cpu"`` for numpy arrays."""
        return self._level_scales.device if is_torch(self._level_scales) else "cpu"

    def check(self) -> None:
        """Wait for the device-side validation of a CUDA mask (queuing it if no computation has)
        and raise its ``ValueError`` if a scale that is read, or a log-decay, is NaN or infinite.
        (Masks on the CPU are checked when they are built; this then does nothing.)"""
        self._queue_check()
        if self._check is not None:
            _deferred.report(self._check)
            _deferred.report()
            self._check.finish()  # again if the queue reported it: a failed check raises every time

    def _raise_if_failed(self) -> None:
        """Raise the ``ValueError`` of this mask's device check if it has failed (reported
        before or not): a mask found bad is refused at every later use."""
        if self._check is not None and self._check.done:
            self._check.finish()

    def _queue_check(self, *, report: bool = True) -> None:
        """Queue the check kernel of a CUDA mask not yet checked (:func:`_device_check`); first
        report the checks whose verdict is in (unless ``report`` is False: the public operations of
        :mod:`hodlr.api` have reported them already), and refuse a mask whose check failed."""
        if report:
            _deferred.report()
        self._raise_if_failed()
        if self._unchecked and not _tracing():
            self._check = _device_check(self._level_scales, self._log_decay)
            self._unchecked = False  # only once queued: a launch that raises leaves the mask unchecked

    def _check_flag(self):
        """For a computation whose kernels validate the mask as they read it: a zeroed int32 flag
        on the mask's device while the mask is not yet checked (else None), to be handed to
        :meth:`_checked` once those kernels are queued."""
        self._raise_if_failed()
        if not self._unchecked or _tracing():
            return None
        import torch

        return torch.zeros(1, dtype=torch.int32, device=self._level_scales.device)

    def _checked(self, flag) -> None:
        """Record that the kernels setting ``flag`` (from :meth:`_check_flag`) are queued."""
        if flag is not None:
            self._check = _deferred.submit(flag, _failure_message(self._level_scales.shape, _shape(self._log_decay)))
            self._unchecked = False

    # -- values -------------------------------------------------------------------------
    def diagonal(self):
        """``level_scales[..., :, 0]``, the diagonal of the mask, shape ``(..., T)``."""
        return self._level_scales[..., 0]

    def block_factors(self, lev: int):
        """Rank-1 factors of every off-diagonal block of level ``lev >= 1``.

        Returns ``(u, v)`` of shape ``(*batch, n, 2**(lev-1))`` with ``n = ceil(T / 2**lev)``
        tree nodes.  Node ``j`` covers ``[a, a + 2**lev)``, ``a = j 2**lev``, and splits at
        ``m = a + 2**(lev-1)``; its block is ``u[j][:, None] * v[j][None, :]`` on rows
        ``m + i`` and columns ``a + i`` (positions ``>= T`` are padding and hold 0):

        ``u[t] = level_scales[t, lev] * exp(G[t] - G[m-1])``, ``v[s] = exp(G[m-1] - G[s])``.

        The exponents are summed inside the block (anchored at ``m - 1``), so both factors
        are ``<= 1`` when the decay is ``<= 0`` and long sequences never overflow.
        :meth:`block_row_factors` and :meth:`block_col_factors` compute one of the two.
        """
        self._queue_check()
        lev = self._check_lev(lev)
        return self._factors(_formulas.block_row_factors, lev), self._factors(_formulas.block_col_factors, lev)

    def block_row_factors(self, lev: int):
        """``u`` of :meth:`block_factors`, shape ``(*batch, n, 2**(lev-1))``."""
        self._queue_check()
        return self._factors(_formulas.block_row_factors, self._check_lev(lev))

    def block_col_factors(self, lev: int):
        """``v`` of :meth:`block_factors`, shape ``(*batch, n, 2**(lev-1))``."""
        self._queue_check()
        return self._factors(_formulas.block_col_factors, self._check_lev(lev))

    def _factors(self, formula, lev: int):
        """One factor of :meth:`block_factors` (``formula`` of :mod:`hodlr._formulas`) for a
        checked ``lev``, broadcast to the mask's batch shape."""
        return _broadcast_batch(formula(self._level_scales, self._log_decay, lev), self._batch_shape, 2)

    def _check_lev(self, lev) -> int:
        lev = check_int("lev", lev)
        if self.T == 1:
            raise ValueError(f"lev: a mask of T=1 has no off-diagonal blocks (levels 1..num_levels(T) - 1 are "
                             f"empty), got {lev}")
        if not 1 <= lev < fenwick.num_levels(self.T):
            raise ValueError(f"lev must be in 1..{fenwick.num_levels(self.T) - 1} for T={self.T}, got {lev}")
        return lev

    def to_dense(self):
        """The mask as a dense ``(*batch, T, T)`` array (same library, dtype and device).

        Raises :class:`hodlr.errors.DenseTooLargeError` before allocating if the
        intermediates exceed ``hodlr.options.dense_max_bytes``.
        """
        self._queue_check()
        dense = _formulas.dense_mask(self._level_scales, self._log_decay, "LogLinearMask.to_dense", instead=None)
        return _broadcast_batch(dense, self._batch_shape, 2)

    def to_sparse(self):
        """The mask as ``diag(level_scales[:, 0]) + U V^T`` with scipy sparse ``U, V``.

        See :func:`hodlr.sparse.mask_to_sparse`."""
        return sparse.mask_to_sparse(self)

    def aslinearoperator(self):
        """The mask as a ``scipy.sparse.linalg.LinearOperator`` of shape ``(T, T)`` (a mask without
        batch dimensions), applied through its sparse form (:meth:`to_sparse`): products with the
        mask and with its transpose (``rmatvec``, ``.T``, ``.adjoint()``) in ``O(T log T)`` a
        column, in numpy.  (``M.T`` is the length, as everywhere in hodlr; the transpose is the
        operator's ``.T``.)

        >>> import numpy as np, hodlr
        >>> A = hodlr.LogLinearMask(np.ones((4, 3))).aslinearoperator()
        >>> A.shape, A.T @ np.ones(4)
        ((4, 4), array([4., 3., 2., 1.]))
        """
        if self.batch_shape != ():
            raise ValueError(f"aslinearoperator needs a mask without batch dimensions, got batch_shape "
                             f"{self.batch_shape}; build one per element")
        return self.to_sparse().aslinearoperator()

    def to_hodlr(self):
        """The mask as an explicit :class:`hodlr.HODLRMatrix` tree (rank-1 off-diagonal
        blocks, size-1 leaves).  See :meth:`hodlr.HODLRMatrix.from_mask`."""
        return tree.HODLRMatrix.from_mask(self)

    def __repr__(self) -> str:
        return display.mask_repr(self)

    def _repr_html_(self) -> str:
        return display.mask_repr_html(self)

    def rank_profile(self, levels=None):
        """Rank of every off-diagonal block (1, or 0 where a factor is all zero).

        See :func:`hodlr.rank_profile`."""
        return display.rank_profile(self, levels)


def _broadcast_batch(x, batch_shape, inner_ndim: int):
    """Broadcast the leading dims of ``x`` (all but its last ``inner_ndim``) to
    ``batch_shape`` (a view, no copy)."""
    target = tuple(batch_shape) + tuple(x.shape[x.ndim - inner_ndim :])
    if tuple(x.shape) == target:
        return x
    return _checks.broadcast_to(x, target)


def _tracing() -> bool:
    """Whether a CUDA graph is being captured or ``torch.compile`` traces (no check is queued then)."""
    import torch

    return _deferred.capturing() or torch.compiler.is_compiling()


def _failure_message(scales_shape, decay_shape):
    """A callable making the error of a failed device check, formatted only then (it holds shapes,
    not the tensors, which may carry an autograd graph)."""
    return lambda: (
        f"level_scales must be finite where they are read and log_decay finite; the CUDA mask with "
        f"level_scales of shape {tuple(scales_shape)}"
        + ("" if decay_shape is None else f" and log_decay of shape {tuple(decay_shape)}")
        + " holds NaN or inf there (found on the device by the first computation with the mask)")


def _device_check(level_scales, log_decay):
    """Queue the finiteness check of a CUDA mask's read scales and its log-decay on the device
    (:func:`hodlr.kernels.checks.nonfinite_flag`, no host synchronisation); reported by
    :mod:`hodlr._deferred`."""
    from hodlr.kernels.checks import nonfinite_flag

    return _deferred.submit(nonfinite_flag(level_scales, log_decay),
                            _failure_message(level_scales.shape, _shape(log_decay)))


def _shape(x):
    return None if x is None else x.shape
