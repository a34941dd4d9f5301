"""The Fenwick scan: log-linear attention as a recurrence with ``O(log T)`` states.

For query ``t`` the past ``[0, t)`` splits into one Fenwick bucket per set bit of ``t``
(:func:`fenwick.index.buckets`); the level-``l`` bucket holds exactly the ``s`` with
``level(t, s) = l``.  Keeping one state per bucket,

``S_l = sum_{s in bucket_l(t)} exp(G[t] - G[s]) k_s v_s^T``  (``Dk x Dv``),

the output is ``o_t = scale * (lambda[t, 0] (q_t . k_t) v_t + sum_l lambda[t, l] q_t^T S_l)``.
Going from ``t`` to ``t + 1`` is a binary increment: ``{t}`` and the buckets of the
trailing one-bits of ``t`` (levels ``1 .. j``) merge into one bucket of level ``j + 1``,
the other buckets stay, and every state decays by ``exp(g[t + 1])``.  The live states form
a stack ordered by level (highest first): the increment pops the ``j`` lowest and pushes
their sum, exactly like the carry of a binary counter.

Implementation notes
--------------------
* The stack is one buffer ``(B, Dk, capacity, Dv)`` (slot ``i`` = the ``i``-th live state,
  highest level first) plus one scalar per slot and batch row, ``c``, so that
  ``S_i = c_i * buf_i``.  The per-step decay multiplies only ``c`` (``O(log T)`` scalars,
  applied multiplicatively step by step, so a decay of ``-50`` per step stays accurate and
  simply underflows to 0); a merge folds ``c`` into the new slot, whose scalar restarts at 1.
* A step reads only the live slots: one batched ``q^T [S_1 .. S_n]`` product and one
  weighted sum, so its cost is ``O(popcount(t) Dk Dv)`` with a constant number of array
  operations (no Python loop over levels).
* ``capacity`` is the largest number of live states seen so far, which is at most
  ``num_levels(position + 1) - 1``; at position ``2**20`` it is 20.
* Torch tensors are used when passed in (any device); when autograd is recording through
  the inputs or the state, every update is out of place, so gradients flow through
  :meth:`FenwickState.step`, :meth:`FenwickState.prefill` and the full-sequence functions.

Matmul ``Y = M X`` is attention with ``Dk = 1`` and ``q = k = 1``; :func:`matmul` runs that
case with vector states (no key dimension, no multiplication by one).

Examples
--------
>>> import numpy as np
>>> from hodlr.fenwick.scan import FenwickState, attention
>>> rng = np.random.default_rng(0)
>>> T, Dk, Dv = 6, 3, 2
>>> q, k, v = rng.standard_normal((T, Dk)), rng.standard_normal((T, Dk)), rng.standard_normal((T, Dv))
>>> lam = rng.uniform(0.5, 1.0, (T, 4))
>>> g = -rng.uniform(0.0, 1.0, T)
>>> full = attention(q, k, v, lam, g)
>>> state = FenwickState((), Dk, Dv)
>>> first = state.prefill(q[:4], k[:4], v[:4], lam[:4], g[:4])
>>> rest = [state.step(q[t], k[t], v[t], lam[t], g[t]) for t in (4, 5)]
>>> bool(np.allclose(np.concatenate([first, np.stack(rest)]), full))
True
>>> state.position, state.num_states, sorted(state.states())
(6, 2, [2, 3])
"""

from __future__ import annotations

import sys

import numpy as np

from .arrays import as_like, check_int, check_scale, describe, is_torch, namespace, reverse_cumsum, zeros
from .index import buckets, level, num_levels

__all__ = ["FenwickState", "attention", "live_levels", "matmul"]


# ---------------------------------------------------------------------------------------
# index helpers (all level logic goes through fenwick.index)
# ---------------------------------------------------------------------------------------
def live_levels(positions) -> np.ndarray:
    """Levels of the live Fenwick states at each position, highest first.

    The level-``l`` state of position ``p`` (the one query ``p`` reads with
    ``level_scales[p, l]``) is live iff its bucket is non-empty, i.e. iff some ``s < p`` has
    ``level(p, s) == l``; the candidate is ``s = p XOR 2**(l-1)``.

    Parameters
    ----------
    positions : int or 1-d integer array, values ``>= 0``

    Returns
    -------
    levels : int64 array, shape ``(N, W)``
        Row ``i`` lists the live levels of ``positions[i]`` in decreasing order, padded
        with 0; ``W`` is the largest count (0 columns if no position has a live state).

    Examples
    --------
    >>> live_levels([0, 1, 6, 7])
    array([[0, 0, 0],
           [1, 0, 0],
           [3, 2, 0],
           [3, 2, 1]])
    """
    given = np.atleast_1d(np.asarray(positions))
    if given.size and (given.dtype == bool or not np.issubdtype(given.dtype, np.integer)):
        raise TypeError(f"positions must be integers, got {given.dtype}")
    p = given.astype(np.int64)
    if p.size and p.min() < 0:
        raise ValueError(f"positions must be >= 0, got {int(p.min())}")
    width = max(int(p.max(initial=0)).bit_length(), 1)
    flips = np.left_shift(1, np.arange(width, dtype=np.int64))
    lev = level(p[:, None], np.bitwise_xor(p[:, None], flips[None, :]))
    own = np.arange(1, width + 1)[None, :]
    levels = np.where(lev == own, own, 0)
    levels = -np.sort(-levels, axis=1)
    count = int((levels > 0).sum(axis=1).max(initial=0))
    return levels[:, :count]


def _torch_dtype(dtype) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(dtype, torch.dtype)


def _unbind(x, axis: int):
    """The slices of ``x`` along ``axis`` as a sequence of views."""
    if is_torch(x):
        return x.unbind(axis)
    return list(np.moveaxis(x, axis, 0))


def _bmm(a, b):
    """Batched ``(B, m, k) @ (B, k, n)``; ``torch.bmm`` is much faster than ``torch.matmul``
    on the strided views the state hands it."""
    return a.bmm(b) if is_torch(a) else np.matmul(a, b)


# ---------------------------------------------------------------------------------------
# the streaming state
# ---------------------------------------------------------------------------------------
class _StreamingState:
    """What every streaming Fenwick state shares: the batch shape, the key and value widths,
    the library, dtype and device, the position and its live levels, and the validation of
    operands (every public method validates all its inputs before it changes anything)."""

    def _init_common(self, batch_shape, Dk, Dv, dtype, device):
        """Validate and set what every state has; returns an empty array of the state's
        library, dtype and device."""
        try:
            batch_shape = tuple(int(n) for n in batch_shape)
        except TypeError:
            raise TypeError(f"batch_shape must be a tuple of ints, got {batch_shape!r}") from None
        if any(n < 0 for n in batch_shape):
            raise ValueError(f"batch_shape must hold sizes >= 0, got {batch_shape}")
        Dk, Dv = check_int("Dk", Dk, 0), check_int("Dv", Dv, 0)
        if _torch_dtype(dtype):
            torch = sys.modules["torch"]
            if not dtype.is_floating_point:
                raise TypeError(f"dtype must be a floating dtype, got {dtype}")
            like = torch.empty(0, dtype=dtype, device=device)
        else:
            if device is not None and str(device) != "cpu":
                raise ValueError(f"device must be None for a numpy state (dtype {dtype}), got {device!r}")
            try:
                np_dtype = np.dtype(dtype)
            except TypeError:
                raise TypeError(f"dtype must be a numpy or torch floating dtype, got {dtype!r}") from None
            if np_dtype.kind != "f":
                raise TypeError(f"dtype must be a floating dtype, got {np_dtype}")
            like = np.empty(0, dtype=np_dtype)
        self._like = like
        self._batch = batch_shape
        self._B = int(np.prod(batch_shape, dtype=np.int64))
        self._Dk, self._Dv = Dk, Dv
        self._pos = 0
        self._levels: list[int] = []
        return like

    # -- read-only views ---------------------------------------------------------------
    @property
    def batch_shape(self) -> tuple:
        return self._batch

    @property
    def Dk(self) -> int:
        return self._Dk

    @property
    def Dv(self) -> int:
        return self._Dv

    @property
    def dtype(self):
        return self._like.dtype

    @property
    def device(self):
        """The torch device, or ``"cpu"`` for a numpy state."""
        return self._like.device if is_torch(self._like) else "cpu"

    @property
    def position(self) -> int:
        return self._pos

    @property
    def num_states(self) -> int:
        return len(self._levels)

    @property
    def levels(self) -> tuple:
        """Levels of the live states, highest first (the set bits of ``position``)."""
        return tuple(self._levels)

    # -- validation --------------------------------------------------------------------
    def _operand(self, name, x, tail, layout):
        """``x`` checked to be in the state's library, dtype, device and of shape
        ``batch_shape + tail`` (a last entry ``None`` takes any width); returned reshaped to
        ``(B, *tail)``."""
        if is_torch(self._like):
            if not is_torch(x):
                raise TypeError(f"{name} must be a torch.Tensor of shape {layout} (the state is torch), got {describe(x)}")
            if x.device != self._like.device:
                raise ValueError(f"{name} is on device {x.device} but the state is on {self._like.device}")
        else:
            if is_torch(x):
                raise TypeError(f"{name} must be a numpy array of shape {layout} (the state is numpy), got {describe(x)}")
            if isinstance(x, (list, tuple, float, int, np.number)):  # numpy scalars too: g[t] of a float32 g
                x = np.asarray(x, dtype=self._like.dtype)
            if not isinstance(x, np.ndarray):
                raise TypeError(f"{name} must be a numpy array of shape {layout}, got {describe(x)}")
        if x.dtype != self._like.dtype:
            raise TypeError(f"{name} has dtype {x.dtype} but the state has dtype {self._like.dtype}; they must match")
        if tail and tail[-1] is None and x.ndim == len(self._batch) + len(tail):
            tail = tuple(tail[:-1]) + (int(x.shape[-1]),)
        want = self._batch + tuple(tail)
        if tuple(x.shape) != want:
            shown = "(" + ", ".join("L" if n is None else str(n) for n in want) + ("," if len(want) == 1 else "") + ")"
            raise ValueError(f"{name} must have shape {layout} = {shown}, got shape {tuple(x.shape)}")
        return x.reshape((self._B,) + tuple(tail))

    def _log_decay(self, log_decay, lead, layout):
        """``log_decay`` checked as an operand of shape ``batch_shape + lead`` (None passes), with the
        entry of absolute position 0 set to 0: the state is empty there, so that log-decay
        multiplies nothing (whatever its value, NaN or inf included) and gets a zero gradient."""
        if log_decay is None:
            return None
        g = self._operand("log_decay", log_decay, lead, layout)
        if self._pos:
            return g
        first = as_like(np.arange(lead[0]) == 0 if lead else np.array(True), g)
        return namespace(g).where(first, zeros((), g), g)

    def _check_levels(self, L, last):
        need = num_levels(last + 1)
        if L < need:
            raise ValueError(
                f"level_scales has L={L} levels but position {last} needs at least num_levels({last + 1})={need}"
            )

    @staticmethod
    def _check_finite(name, x, where):
        if x is not None and not bool(namespace(x).isfinite(x).all()):
            what = "where they are read " if name == "level_scales" else ""
            raise ValueError(f"{name} must be finite {what}({where}); got NaN or inf")

    def _recording(self, *arrays) -> bool:
        """Is autograd recording through any of ``arrays`` (``None`` entries allowed)?"""
        if not is_torch(self._like):
            return False
        torch = sys.modules["torch"]
        if not torch.is_grad_enabled():
            return False
        return any(a is not None and a.requires_grad for a in arrays)

    def _length(self, v) -> int:
        shape = getattr(v, "shape", None)
        if shape is None or len(shape) != len(self._batch) + 2:
            raise ValueError(
                f"v must have shape (*batch, T, Dv) with batch {self._batch}, got "
                f"{'no shape' if shape is None else 'shape ' + str(tuple(shape))}"
            )
        return int(shape[-2])


class FenwickState(_StreamingState):
    """Streaming log-linear attention state for a batch of sequences.

    Parameters
    ----------
    batch_shape : tuple of int
        Leading dims of every operand (``()`` for one sequence).
    Dk, Dv : int
        Key and value widths; each state is ``Dk x Dv`` per sequence.
    dtype : numpy or torch dtype, default ``numpy.float64``
        A torch dtype makes a torch state (operands must then be tensors).
    device : torch device, optional
        Where a torch state lives (default CPU); must be ``None`` for numpy.

    Attributes
    ----------
    position : int
        Number of tokens consumed; the next :meth:`step` is the query at this position.
    num_states : int
        Number of live states: the number of set bits of ``position``, at most
        ``num_levels(position + 1) - 1``.
    nbytes : int
        Memory held by the states: ``capacity * B * (Dk * Dv + 1) * itemsize`` (the
        ``+ 1`` is each state's decay factor), ``B = prod(batch_shape)``.

    Notes
    -----
    Every method validates its inputs before it changes anything (shapes, dtypes, library and
    device of all; the values of the level scales it reads and of the log-decay, which must be
    finite): a call that raises leaves the state exactly as it was.  ``q``, ``k``, ``v`` values are
    not scanned.  A copy that steps on its own (beam search): :meth:`copy`.  Matmul streams with ``Dk = 1`` and
    ``q = k = 1`` (ones of shape ``(*batch, 1)``).

    Examples
    --------
    >>> import numpy as np
    >>> s = FenwickState((2,), Dk=1, Dv=1)
    >>> one = np.ones((2, 1))
    >>> for t in range(3):
    ...     out = s.step(one, one, np.full((2, 1), float(t)), np.ones((2, 3)))
    >>> out.ravel(), s.position, s.num_states, s.nbytes
    (array([3., 3.]), 3, 2, 64)
    """

    def __init__(self, batch_shape=(), Dk: int = 1, Dv: int = 1, dtype=np.float64, device=None):
        self._init(batch_shape, Dk, Dv, dtype, device, keyless=False)

    @classmethod
    def _vector(cls, batch_shape, D, dtype, device):
        """A state for matmul: vector states ``(D,)``, no keys (``q = k = 1`` implied)."""
        self = cls.__new__(cls)
        self._init(batch_shape, 1, D, dtype, device, keyless=True)
        return self

    def _init(self, batch_shape, Dk, Dv, dtype, device, keyless):
        like = self._init_common(batch_shape, Dk, Dv, dtype, device)
        self._keyless = keyless
        self._buf = zeros((self._B, self._Dk, 0, self._Dv), like)
        self._c = zeros((self._B, 0), like)

    @classmethod
    def from_states(cls, position: int, states: dict, batch_shape=(), Dk: int = 1, Dv: int = 1,
                    dtype=np.float64, device=None):
        """The state at ``position`` whose live buckets hold ``states``: the inverse of
        :meth:`states` (``FenwickState.from_states(s.position, s.states(), ...)`` continues
        exactly like ``s``).

        Parameters
        ----------
        position : int, ``>= 0``
        states : dict ``{level: S}``
            One entry per live level of ``position`` (its set bits, :func:`live_levels`),
            ``S`` of shape ``(*batch_shape, Dk, Dv)`` with the state's library, dtype and
            device.  Gradients flow from the new state to these arrays.
        batch_shape, Dk, Dv, dtype, device
            As for the constructor.
        """
        self = cls(batch_shape, Dk, Dv, dtype, device)
        position = check_int("position", position, 0)
        if not isinstance(states, dict):
            raise TypeError(f"states must be a dict {{level: array}}, got {type(states).__name__}")
        levels = [int(x) for x in live_levels(position)[0] if x > 0]
        if sorted(states) != sorted(levels):
            raise ValueError(f"states must hold exactly the live levels {sorted(levels)} of position {position}, "
                             f"got levels {sorted(states)}")
        slots = [self._operand(f"states[{lev}]", states[lev], (self._Dk, self._Dv), "(*batch, Dk, Dv)")
                 for lev in levels]
        if slots:
            xp = namespace(self._like)
            self._buf = xp.stack(slots, 2)
            self._c = xp.ones_like(self._buf[:, 0, :, 0])
        self._pos = position
        self._levels = levels
        return self

    def copy(self) -> "FenwickState":
        """An independent state at the same position with the same buckets (new arrays; with torch,
        gradients flow to this state's arrays): it steps on its own, for beam search."""
        return FenwickState.from_states(self._pos, self.states(), self._batch, self._Dk, self._Dv, self.dtype,
                                        _device(self._like))

    @property
    def capacity(self) -> int:
        """Number of state slots allocated (the most live states held so far)."""
        return int(self._buf.shape[2])

    @property
    def nbytes(self) -> int:
        return sum(int(a.numel()) * a.element_size() if is_torch(a) else int(a.nbytes) for a in (self._buf, self._c))

    def states(self) -> dict:
        """Each live state as a new array: ``{level: S}``, ``S`` of shape ``(*batch, Dk, Dv)``.

        With ``p = position``, ``S = sum_{s in bucket(p, level)} exp(G[p-1] - G[s]) k_s v_s^T``:
        the decays up to the last consumed token are applied; ``exp(g[p])`` is applied by the
        next step.  For a matmul state (``Dk = 1``) ``k_s = 1``.
        """
        out = {}
        for i, lev in enumerate(self._levels):
            s = self._c[:, i, None, None] * self._buf[:, :, i, :]
            out[lev] = s.reshape(self._batch + (self._Dk, self._Dv))
        return out

    def __repr__(self) -> str:
        return (
            f"FenwickState(batch_shape={self._batch}, Dk={self._Dk}, Dv={self._Dv}, dtype={self.dtype}, "
            f"position={self._pos}, levels={list(self._levels)}, nbytes={self.nbytes})"
        )

    def _inplace(self, *arrays) -> bool:
        """May the buffers be updated in place?  Not while autograd records through them."""
        return not self._recording(*arrays, self._buf, self._c)

    # -- validation ----------------------------------------------------------------------
    def _inputs(self, q, k, v, level_scales, log_decay, T=None):
        """Validate one position (``T is None``) or ``T`` positions; return them as
        ``(B, [T,] width)`` arrays."""
        lead = () if T is None else (T,)
        lay = "(*batch, " + ("" if T is None else f"T={T} as in v, ")  # (T is v's length)
        v = self._operand("v", v, lead + (self._Dv,), lay.replace(" as in v", "") + "Dv)")
        if self._keyless:
            q = k = None
        else:
            q = self._operand("q", q, lead + (self._Dk,), lay + "Dk)")
            k = self._operand("k", k, lead + (self._Dk,), lay + "Dk)")
        lam = self._operand("level_scales", level_scales, lead + (None,), lay + "L)")
        L = int(lam.shape[-1])
        g = self._log_decay(log_decay, lead, "(*batch" + ("" if T is None else f", T={T} as in v") + ")")
        return q, k, v, lam, g, L

    # -- the recurrence ------------------------------------------------------------------
    def _reserve(self, n: int):
        """Grow the buffers to ``n`` slots (exact growth: capacity is the peak live count)."""
        cap = self.capacity
        if n <= cap:
            return
        xp = namespace(self._like)
        self._buf = xp.concatenate([self._buf, zeros((self._B, self._Dk, n - cap, self._Dv), self._like)], 2)
        self._c = xp.concatenate([self._c, zeros((self._B, n - cap), self._like)], 1)

    def _advance(self, q, k, v, w, e, n, j, inplace):
        """Consume one token at the current position with ``n`` live states of which the
        last ``j`` merge.  ``q, k (B, Dk)`` (``None`` for matmul), ``v (B, Dv)``,
        ``w (B, n)`` the scaled level scales of the live slots, ``e (B, 1)`` the decay
        factor ``exp(g)`` or ``None``.  Returns the levels >= 1 part of the output ``(B, Dv)``
        or ``None`` when there is no live state."""
        xp = namespace(v)
        buf, c = self._buf, self._c
        live_c = c[:, :n] if e is None else c[:, :n] * e
        out = None
        if n:
            if self._keyless:
                read = buf[:, 0, :n, :]
            else:
                read = _bmm(q[:, None, :], buf[:, :, :n, :].reshape(self._B, self._Dk, n * self._Dv))
                read = read.reshape(self._B, n, self._Dv)
            out = _bmm((w * live_c)[:, None, :], read)[:, 0, :]
        new = v[:, None, :] if self._keyless else k[:, :, None] * v[:, None, :]
        for i in range(n - j, n):  # j merges per step on average <= 1
            new = new + live_c[:, i, None, None] * buf[:, :, i, :]
        slot = n - j
        if inplace:
            if e is not None:
                c[:, :n] = live_c
            c[:, slot] = 1
            buf[:, :, slot, :] = new
        else:
            one = xp.ones_like(c[:, :1])
            self._c = xp.concatenate([live_c[:, :slot], one, c[:, slot + 1 :]], 1)
            self._buf = buf.slice_scatter(new[:, :, None, :], 2, slot, slot + 1)
        return out

    # -- public operations -----------------------------------------------------------------
    def step(self, q, k, v, level_scales, log_decay=None, scale=1.0):
        """Consume the token at :attr:`position` and return its output.

        Parameters
        ----------
        q, k : array, shape ``(*batch, Dk)``
        v : array, shape ``(*batch, Dv)``
        level_scales : array, shape ``(*batch, L)``
            This position's row of the level scales; ``L >= num_levels(position + 1)``.
            Only level 0 and the live levels are read (others may hold anything, NaN too).
        log_decay : array, shape ``batch_shape``, optional
            This position's ``g``; every state decays by ``exp(g)`` before it is read.
        scale : float
            Multiplies ``q . k``.

        Returns
        -------
        o : array, shape ``(*batch, Dv)``
        """
        scale = check_scale(scale)
        q, k, v, lam, g, L = self._inputs(q, k, v, level_scales, log_decay)
        t = self._pos
        self._check_levels(L, t)
        lam_read = lam[:, [0] + self._levels]
        self._check_finite("level_scales", lam_read, f"position {t}")
        self._check_finite("log_decay", g, f"position {t}")
        return self._step_checked(q, k, v, lam_read, g, scale).reshape(self._batch + (self._Dv,))

    def _step_checked(self, q, k, v, lam_read, g, scale):
        xp = namespace(v)
        n = len(self._levels)
        j = 0
        while j < n and self._levels[n - 1 - j] == j + 1:
            j += 1
        self._reserve(n - j + 1)
        e = None if g is None else xp.exp(g)[:, None]
        inplace = self._inplace(q, k, v, lam_read, g)
        diag = lam_read[:, :1] * scale
        if not self._keyless:
            diag = diag * (q * k).sum(-1, keepdims=True)
        out = self._advance(q, k, v, lam_read[:, 1:] * scale, e, n, j, inplace)
        res = diag * v if out is None else diag * v + out
        self._levels = self._levels[: n - j] + [j + 1]
        self._pos += 1
        return res

    def prefill(self, q, k, v, level_scales, log_decay=None, scale=1.0):
        """Consume ``T`` tokens (a prompt) and return their outputs; :meth:`step` continues.

        Same outputs as ``T`` calls of :meth:`step`, with everything that does not depend on
        the recurrence (level-0 terms, decay factors, which scales each position reads)
        computed for all ``T`` positions at once; the loop over positions does a constant
        number of array operations each.

        Parameters
        ----------
        q, k : array, shape ``(*batch, T, Dk)``
        v : array, shape ``(*batch, T, Dv)``
        level_scales : array, shape ``(*batch, T, L)``, ``L >= num_levels(position + T)``
            Row ``i`` belongs to position ``position + i``.
        log_decay : array, shape ``(*batch, T)``, optional
        scale : float

        Returns
        -------
        o : array, shape ``(*batch, T, Dv)``
        """
        scale = check_scale(scale)
        T = self._length(v)
        q, k, v, lam, g, L = self._inputs(q, k, v, level_scales, log_decay, T)
        if T == 0:
            return v.reshape(self._batch + (0, self._Dv))
        start = self._pos
        self._check_levels(L, start + T - 1)
        lev = live_levels(np.arange(start, start + T + 1))
        read_cols = np.concatenate([np.zeros((T, 1), np.int64), lev[:T]], 1)
        rows = np.arange(T)[:, None]
        lam_read = lam[:, as_like(rows, lam), as_like(read_cols, lam)]
        where = f"positions {start}..{start + T - 1}"
        self._check_finite("level_scales", lam_read, where)
        self._check_finite("log_decay", g, where)
        # -- validated: from here on the state changes --
        xp = namespace(v)
        counts = (lev > 0).sum(1)
        n_list = counts[:T].tolist()
        j_list = (counts[:T] + 1 - counts[1:]).tolist()
        self._reserve(int(counts[1:].max()))
        inplace = self._inplace(q, k, v, lam, g)
        live = as_like(read_cols[:, 1:] > 0, lam)
        weights = _unbind(lam_read[:, :, 1:] * live * scale, 1)
        diag = lam_read[:, :, :1] * scale
        if not self._keyless:
            diag = diag * (q * k).sum(-1, keepdims=True)
        e = [None] * T if g is None else _unbind(xp.exp(g)[:, :, None], 1)
        qs = [None] * T if self._keyless else _unbind(q, 1)
        ks = [None] * T if self._keyless else _unbind(k, 1)
        vs = _unbind(v, 1)
        reads = []
        zero = None
        for i in range(T):
            n = n_list[i]
            out = self._advance(qs[i], ks[i], vs[i], weights[i][:, :n], e[i], n, j_list[i], inplace)
            if out is None:
                zero = zeros((self._B, self._Dv), v) if zero is None else zero
                out = zero
            reads.append(out)
        self._pos = start + T
        self._levels = [int(x) for x in lev[T] if x > 0]
        res = diag * v + xp.stack(reads, 1)
        return res.reshape(self._batch + (T, self._Dv))

    def extend(self, k, v, log_decay=None):
        """Consume ``T`` tokens without computing their outputs (fast-forward).

        The state after ``extend`` is the state after ``T`` steps (up to rounding), but the
        work is ``O(T Dk Dv)`` in ``O(log(position + T))`` array operations: each new bucket
        is summed at once with decay weights ``exp(sum g[s+1 ..])`` from a reverse cumulative
        sum, and the old states below the highest bit that changes merge into the bucket
        that covers them.  Level scales are not needed (states do not depend on them).

        Parameters
        ----------
        k : array, shape ``(*batch, T, Dk)`` (ignored for a matmul state)
        v : array, shape ``(*batch, T, Dv)``
        log_decay : array, shape ``(*batch, T)``, optional
        """
        T = self._length(v)
        if self._keyless:
            k = None
        else:
            k = self._operand("k", k, (T, self._Dk), "(*batch, T, Dk)")
        v = self._operand("v", v, (T, self._Dv), "(*batch, T, Dv)")
        g = self._log_decay(log_decay, (T,), "(*batch, T)")
        self._check_finite("log_decay", g, "extend")
        if T == 0:
            return
        # -- validated --
        xp = namespace(v)
        p0, p1 = self._pos, self._pos + T
        if g is None:
            weight = None
            total = None
        else:
            rev = reverse_cumsum(g)
            after = xp.concatenate([rev[:, 1:], zeros((self._B, 1), g)], 1)
            weight = xp.exp(after)
            total = xp.exp(rev[:, :1])
        changed = (p0 ^ p1).bit_length()
        keep = sum(1 for lev in self._levels if lev > changed)
        old_c = self._c[:, : len(self._levels)]
        if total is not None:
            old_c = old_c * total
        slots, scales = [], []
        for lev, a, b in buckets(p1)[:0:-1]:
            if b <= p0:
                continue
            lo = max(a, p0) - p0
            hi = b - p0
            vv = v[:, lo:hi, :]
            if weight is not None:
                vv = vv * weight[:, lo:hi, None]
            s = vv.sum(1)[:, None, :] if self._keyless else xp.matmul(xp.swapaxes(k[:, lo:hi, :], 1, 2), vv)
            if a < p0 and len(self._levels) > keep:
                n0 = len(self._levels)
                s = s + xp.matmul(old_c[:, None, None, keep:n0], self._buf[:, :, keep:n0, :])[:, :, 0, :]
            slots.append(s)
            scales.append(zeros((self._B, 1), v) + 1)  # (a decay factor a slot, whatever Dv: 0 too)
        n1 = keep + len(slots)
        cap = max(self.capacity, n1)
        pad = cap - n1
        parts_buf = [self._buf[:, :, :keep, :], xp.stack(slots, 2)]
        parts_c = [old_c[:, :keep]] + scales
        if pad:
            parts_buf.append(zeros((self._B, self._Dk, pad, self._Dv), self._like))
            parts_c.append(zeros((self._B, pad), self._like))
        self._buf = xp.concatenate(parts_buf, 2)
        self._c = xp.concatenate(parts_c, 1)
        self._pos = p1
        self._levels = [int(x) for x in live_levels(p1)[0] if x > 0]


# ---------------------------------------------------------------------------------------
# full-sequence functions
# ---------------------------------------------------------------------------------------
def _broadcast(named: dict, inner: dict):
    """Broadcast the batch dims of the arrays in ``named`` (``inner[name]`` trailing dims
    each); return the common batch shape and the broadcast views."""
    shapes = {name: tuple(x.shape[: x.ndim - inner[name]]) for name, x in named.items() if x is not None}
    try:
        batch = tuple(np.broadcast_shapes(*shapes.values()))
    except ValueError:
        listing = ", ".join(f"{n} {s}" for n, s in shapes.items())
        raise ValueError(f"batch dimensions do not broadcast: {listing}") from None
    out = {}
    for name, x in named.items():
        if x is None:
            out[name] = None
            continue
        target = batch + tuple(x.shape[x.ndim - inner[name] :])
        out[name] = x.expand(*target) if is_torch(x) else np.broadcast_to(x, target)
    return batch, out


def _check_full(name, x, ndim, layout):
    if not is_torch(x) and not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a numpy array or torch tensor of shape {layout}, got {describe(x)}")
    if x.ndim < ndim:
        raise ValueError(f"{name} must have shape {layout}, got shape {tuple(x.shape)}")


def attention(q, k, v, level_scales, log_decay=None, scale=1.0):
    """Log-linear attention ``O = (M * scale q k^T) v`` by the Fenwick scan.

    Parameters
    ----------
    q, k : array, shape ``(..., T, Dk)``
    v : array, shape ``(..., T, Dv)``
    level_scales : array, shape ``(..., T, L)``, ``L >= num_levels(T)``
    log_decay : array, shape ``(..., T)``, optional
    scale : float

    All in one library (numpy or torch), dtype and device; batch dims broadcast.

    Returns
    -------
    O : array, shape ``(*batch, T, Dv)``
    """
    for name, x, nd, lay in (("q", q, 2, "(..., T, Dk)"), ("k", k, 2, "(..., T, Dk)"),
                             ("v", v, 2, "(..., T, Dv)"), ("level_scales", level_scales, 2, "(..., T, L)")):
        _check_full(name, x, nd, lay)
    if log_decay is not None:
        _check_full("log_decay", log_decay, 1, "(..., T)")
    named = {"q": q, "k": k, "v": v, "level_scales": level_scales, "log_decay": log_decay}
    batch, b = _broadcast(named, {"q": 2, "k": 2, "v": 2, "level_scales": 2, "log_decay": 1})
    state = FenwickState(batch, int(q.shape[-1]), int(v.shape[-1]), dtype=v.dtype, device=_device(v))
    return state.prefill(b["q"], b["k"], b["v"], b["level_scales"], b["log_decay"], scale)


def matmul(level_scales, log_decay, x):
    """``Y = M @ X`` by the Fenwick scan with vector states (attention with ``Dk = 1``,
    ``q = k = 1``).

    Parameters
    ----------
    level_scales : array, shape ``(..., T, L)``, ``L >= num_levels(T)``
    log_decay : array, shape ``(..., T)`` or ``None``
    x : array, shape ``(..., T, D)``

    Returns
    -------
    Y : array, shape ``(*batch, T, D)``

    Examples
    --------
    >>> import numpy as np
    >>> matmul(np.ones((5, 4)), None, np.arange(5.0)[:, None]).ravel()
    array([ 0.,  1.,  3.,  6., 10.])
    """
    _check_full("level_scales", level_scales, 2, "(..., T, L)")
    _check_full("x", x, 2, "(..., T, D)")
    if log_decay is not None:
        _check_full("log_decay", log_decay, 1, "(..., T)")
    named = {"level_scales": level_scales, "log_decay": log_decay, "x": x}
    batch, b = _broadcast(named, {"level_scales": 2, "log_decay": 1, "x": 2})
    state = FenwickState._vector(batch, int(x.shape[-1]), x.dtype, _device(x))
    return state.prefill(None, None, b["x"], b["level_scales"], b["log_decay"])


def _device(x):
    return x.device if is_torch(x) else None
