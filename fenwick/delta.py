"""Log-linear Gated DeltaNet as a recurrence with one state per Fenwick bucket.

Gated DeltaNet moves its state ``S`` (``Dk x Dv``) by the transition
``A_t = exp(g_t) (I - beta_t k_t k_t^T)`` and writes ``beta_t k_t v_t^T``:
``S_t = A_t S_{t-1} + beta_t k_t v_t^T``.  Unrolled, token ``s`` reaches query ``t >= s``
through ``P[t, s] = scale * beta_s * q_t^T A_t A_{t-1} ... A_{s+1} k_s``.  The log-linear
version weighs each pair by the level scale of its Fenwick bucket,
``o_t = sum_{s <= t} lambda[t, level(t, s)] P[t, s] v_s``, so it keeps one state per bucket:

``S_l = sum_{s in bucket_l(p)} (A_{p-1} ... A_{s+1}) beta_s k_s v_s^T``

for the position ``p`` of the next token (every transition up to the last consumed token
``p - 1`` applied).  Consuming token ``t = p``:

1. every live bucket state is moved by ``A_t`` (``A_t S = exp(g_t) (S - beta_t k_t (k_t^T S))``,
   ``O(Dk Dv)`` per state);
2. the output reads level 0 (the token itself, ``beta_t k_t v_t^T``) and the moved buckets:
   ``o_t = scale * (lambda[t, 0] beta_t (q_t . k_t) v_t + sum_l lambda[t, l] (A_t S_l)^T q_t)``;
3. the token and the buckets of the trailing one-bits of ``t`` merge into one bucket of level
   ``j + 1``, exactly as in :mod:`.scan` (a binary increment).

The transitions are symmetric, so ``(A_t S)^T q = S^T (A_t q)``.  With ``lambda = 1`` at every
level the buckets sum to the Gated DeltaNet state and the outputs are Gated DeltaNet's.

Work ``O(T log T Dk Dv)``, state memory ``O(log T Dk Dv)``; numpy or torch (any device);
autograd works (every update is out of place).

Examples
--------
>>> import numpy as np
>>> from hodlr.fenwick.delta import GatedDeltaState, gated_delta
>>> rng = np.random.default_rng(0)
>>> T, Dk, Dv = 6, 3, 2
>>> q, k, v = rng.standard_normal((T, Dk)), rng.standard_normal((T, Dk)), rng.standard_normal((T, Dv))
>>> k /= np.linalg.norm(k, axis=-1, keepdims=True)
>>> beta, g = rng.uniform(0.1, 1.0, T), -rng.uniform(0.0, 1.0, T)
>>> lam = rng.uniform(0.5, 1.0, (T, 4))
>>> full = gated_delta(q, k, v, beta, lam, g)
>>> state = GatedDeltaState((), Dk, Dv)
>>> first = state.prefill(q[:4], k[:4], v[:4], beta[:4], lam[:4], g[:4])
>>> rest = [state.step(q[t], k[t], v[t], beta[t], lam[t], g[t]) for t in (4, 5)]
>>> bool(np.allclose(np.concatenate([first, np.stack(rest)]), full))
True
>>> state.position, sorted(state.states())
(6, [2, 3])
"""

from __future__ import annotations

import numpy as np

from .arrays import as_like, check_int, check_scale, describe, is_torch, namespace, zeros
from .index import num_slots
from .scan import _broadcast, _check_full, _device, _StreamingState, _unbind, live_levels

__all__ = ["GatedDeltaState", "gated_delta", "apply_transition", "buckets_from_blocks"]


def apply_transition(X, k, beta, alpha=None):
    """Every state ``S`` of ``X (..., n, Dk, Dv)`` moved by one token's transition,
    ``A S = alpha (S - beta k (k^T S))`` (``k (..., Dk)``; ``beta``, ``alpha (...)``; ``beta`` None:
    no correction, log-linear attention's ``A = alpha``; ``alpha`` None: no decay).  numpy or torch."""
    if beta is not None:
        kX = namespace(X).einsum("...d,...ndv->...nv", k, X)
        X = X - (beta[..., None] * k)[..., None, :, None] * kX[..., None, :]
    return X if alpha is None else X * alpha[..., None, None, None]


def buckets_from_blocks(p: int, c: int, slots: int, block_state, block_transition, partial=None, through=False):
    """The bucket states of position ``p`` (slot ``l - 1`` holds level ``l``) assembled from an
    aligned block hierarchy over chunks of ``2^c`` tokens: a list of ``slots`` states, None for
    the empty buckets.

    The buckets of levels ``l > c`` are whole aligned blocks: for each set bit ``h`` of the chunk
    index ``J = p >> c``, block ``(J >> h) - 1`` of level ``h`` (``2^h`` chunks), whose state
    ``block_state(h, m)`` is taken at the block's end and moved to ``p`` across the later blocks
    (those of the lower set bits, ``block_transition(h, m)``, and the partial chunk).  The buckets
    of levels ``l <= c`` lie inside ``p``'s own chunk, which holds ``p % 2^c`` tokens: ``partial``
    is None when it holds none, else ``(bucket, transition)`` with ``bucket(l, start)`` the state
    at ``p`` of the bucket that starts at ``start`` and ``transition`` that chunk's.  A transition
    is asked for only where something earlier must cross its block; with ``through``, also the
    earliest's, and the result is ``(buckets, transition)``, the latter the product of every
    transition from position 0 to ``p`` (what moves a state held before position 0 to ``p``;
    None for ``p = 0``)."""
    out = [None] * slots
    moved = None  # the product of the transitions of everything after the block in hand
    if partial is not None:
        bucket, moved = partial
        for level in range(1, c + 1):
            if (p >> (level - 1)) & 1:
                out[level - 1] = bucket(level, (p >> level) << level)
    J = p >> c
    for h in range(J.bit_length()):
        if not (J >> h) & 1:
            continue
        m = (J >> h) - 1
        S = block_state(h, m)
        out[c + h] = S if moved is None else moved @ S
        if through or J >> (h + 1):  # something earlier is still to come: it crosses this block
            Tb = block_transition(h, m)
            moved = Tb if moved is None else moved @ Tb
    return (out, moved) if through else out


class GatedDeltaState(_StreamingState):
    """Streaming log-linear Gated DeltaNet state (one ``Dk x Dv`` state per live Fenwick
    bucket) for a batch of sequences.

    Parameters
    ----------
    batch_shape : tuple of int
        Leading dims of every operand (``()`` for one sequence).
    Dk, Dv : int
        Key and value widths.
    dtype : numpy or torch dtype, default ``numpy.float64``
        A torch dtype makes a torch state (operands must then be tensors).
    device : torch device, optional
        Where a torch state lives (default CPU); must be ``None`` for numpy.
    position : int, default 0
        Tokens already consumed: the next token is this absolute position.
    states : array, shape ``(*batch_shape, S, Dk, Dv)``, optional
        The bucket states of ``position`` (slot ``l - 1`` holds level ``l``;
        ``S >= position.bit_length()``); only the slots of non-empty buckets (the set bits
        of ``position``) are read.  Default: zeros (``position`` must then be 0).

    Attributes
    ----------
    position : int
        Number of tokens consumed; the next :meth:`step` is the query at this position.
    levels : tuple of int
        Levels of the live states, highest first (the set bits of ``position``).

    Notes
    -----
    Every method validates its inputs before it changes anything (shapes, dtypes, library and
    device of all; the values of ``beta``, of the level scales it reads and of the log-decay, which
    must be finite), so a call that raises leaves the state as it was; ``q``, ``k``, ``v`` values
    are not scanned (a non-finite one makes the outputs and states that depend on it non-finite).
    A copy that steps on its own (beam search): :meth:`copy`.

    Examples
    --------
    >>> import numpy as np
    >>> s = GatedDeltaState((), Dk=1, Dv=1)
    >>> one = np.ones(1)   # q = k = 1, v_t = t, beta = 0.5, every level scale 1
    >>> [float(s.step(one, one, np.array([t], float), 0.5, np.ones(3))[0]) for t in range(3)]
    [0.0, 0.5, 1.25]
    >>> s.position, s.levels   # three tokens: live buckets of levels 2 and 1
    (3, (2, 1))
    """

    def __init__(self, batch_shape=(), Dk: int = 1, Dv: int = 1, dtype=np.float64, device=None, *,
                 position: int = 0, states=None):
        like = self._init_common(batch_shape, Dk, Dv, dtype, device)
        position = check_int("position", position, 0)
        live = [int(x) for x in live_levels(position)[0] if x > 0]
        if states is None:
            if position:
                raise ValueError(f"states are needed to continue from position {position} (got None)")
            self._stack = zeros((self._B, 0, self._Dk, self._Dv), like)
        else:
            slots = num_slots(position)
            if getattr(states, "ndim", 0) < 3:
                raise ValueError(f"states must have shape (*batch, S, Dk, Dv), got {describe(states)}")
            S = int(states.shape[-3])
            if S < slots:
                raise ValueError(
                    f"states must have shape (*batch, S, Dk, Dv) with S >= {slots} slots for position {position}, "
                    f"got shape {tuple(states.shape)}"
                )
            stack = self._operand("states", states, (S, self._Dk, self._Dv), "(*batch, S, Dk, Dv)")
            self._stack = stack[:, [lev - 1 for lev in live]]
        self._pos = position
        self._levels = live

    # -- read-only views ---------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Memory held by the live states, ``num_states * B * Dk * Dv * itemsize``."""
        a = self._stack
        return int(a.numel()) * a.element_size() if is_torch(a) else int(a.nbytes)

    def states(self) -> dict:
        """Each live state as a new array (not a view of the state): ``{level: S}``, ``S`` of shape
        ``(*batch, Dk, Dv)``:
        ``sum_{s in bucket(position, level)} (A_{p-1} ... A_{s+1}) beta_s k_s v_s^T``,
        ``p = position``."""
        shape = self._batch + (self._Dk, self._Dv)
        copy = (lambda a: a.clone()) if is_torch(self._stack) else (lambda a: a.copy())
        return {lev: copy(self._stack[:, i].reshape(shape)) for i, lev in enumerate(self._levels)}

    def copy(self) -> "GatedDeltaState":
        """An independent state at the same position with the same buckets (new arrays; with torch,
        gradients flow to this state's arrays): it steps on its own, for beam search."""
        return GatedDeltaState(self._batch, self._Dk, self._Dv, self.dtype, _device(self._like), position=self._pos,
                               states=self.stacked())

    def stacked(self, slots: int | None = None):
        """The states as one array ``(*batch, slots, Dk, Dv)``, slot ``l - 1`` holding level ``l``
        and zeros where the bucket is empty; ``slots`` defaults to ``position.bit_length()``."""
        need = num_slots(self._pos)
        slots = need if slots is None else check_int("slots", slots)
        if slots < need:
            raise ValueError(f"slots must be >= {need} for position {self._pos}, got {slots}")
        xp = namespace(self._like)
        out = zeros((self._B, slots, self._Dk, self._Dv), self._like)
        if self._levels:
            index = as_like(np.array([lev - 1 for lev in self._levels]), self._like)
            if is_torch(out):
                out = out.index_copy(1, index, self._stack)
            else:
                out[:, index] = self._stack
        return xp.reshape(out, self._batch + (slots, self._Dk, self._Dv))

    def __repr__(self) -> str:
        return (
            f"GatedDeltaState(batch_shape={self._batch}, Dk={self._Dk}, Dv={self._Dv}, dtype={self.dtype}, "
            f"position={self._pos}, levels={list(self._levels)}, nbytes={self.nbytes})"
        )

    # -- validation --------------------------------------------------------------------
    def _inputs(self, q, k, v, beta, level_scales, log_decay, T=None):
        lead = () if T is None else (T,)
        lay = "(*batch, " + ("" if T is None else f"T={T} as in v, ")  # (T is v's length)
        v = self._operand("v", v, lead + (self._Dv,), lay.replace(" as in v", "") + "Dv)")
        q = self._operand("q", q, lead + (self._Dk,), lay + "Dk)")
        k = self._operand("k", k, lead + (self._Dk,), lay + "Dk)")
        scalar = "(*batch" + ("" if T is None else f", T={T} as in v") + ")"
        beta = self._operand("beta", beta, lead, scalar)
        lam = self._operand("level_scales", level_scales, lead + (None,), lay + "L)")
        g = self._log_decay(log_decay, lead, scalar)
        return q, k, v, beta, lam, g, int(lam.shape[-1])

    # -- the recurrence ----------------------------------------------------------------
    def _advance(self, q, k, v, beta, w, alpha, j):
        """Consume one token: ``q, k (B, Dk)``, ``v (B, Dv)``, ``beta (B,)``, ``w (B, n)`` the
        scaled level scales of the ``n`` live states, ``alpha (B,)`` or ``None``; the last ``j``
        live states merge.  Returns the levels >= 1 part of the output ``(B, Dv)`` or ``None``."""
        xp = namespace(v)
        X = self._stack
        n = X.shape[1]
        out = None
        if n:
            X = apply_transition(X, k, beta, alpha)
            out = xp.einsum("bn,bnv->bv", w, xp.einsum("bd,bndv->bnv", q, X))
        new = (beta[:, None] * k)[:, :, None] * v[:, None, :]
        if j:
            new = new + X[:, n - j :].sum(1)
        self._stack = xp.concatenate([X[:, : n - j], new[:, None]], 1)
        return out

    def _merges(self) -> int:
        """How many live states merge with the next token: the trailing one-bits of position."""
        n = len(self._levels)
        j = 0
        while j < n and self._levels[n - 1 - j] == j + 1:
            j += 1
        return j

    def step(self, q, k, v, beta, level_scales, log_decay=None, scale=1.0):
        """Consume the token at :attr:`position` and return its output.

        Parameters
        ----------
        q, k : array, shape ``(*batch, Dk)``
        v : array, shape ``(*batch, Dv)``
        beta : array, shape ``batch_shape``
        level_scales : array, shape ``(*batch, L)``, ``L >= num_levels(position + 1)``
            Only level 0 and the live levels are read.
        log_decay : array, shape ``batch_shape``, optional
            This position's ``g``: ``A_t = exp(g) (I - beta k k^T)``.
        scale : float, default 1.0
            Multiplies every ``P[t, s]`` (no ``Dk ** -0.5`` here, unlike ``hodlr.gated_delta_attention``).

        Returns
        -------
        o : array, shape ``(*batch, Dv)``
        """
        scale = check_scale(scale)
        q, k, v, beta, lam, g, L = self._inputs(q, k, v, beta, level_scales, log_decay)
        t = self._pos
        self._check_levels(L, t)
        lam_read = lam[:, [0] + self._levels]
        self._check_finite("level_scales", lam_read, f"position {t}")
        self._check_finite("log_decay", g, f"position {t}")
        self._check_finite("beta", beta, f"position {t}")
        xp = namespace(v)
        j = self._merges()
        alpha = None if g is None else xp.exp(g)
        diag = (lam_read[:, 0] * beta * (q * k).sum(-1) * scale)[:, None] * v
        out = self._advance(q, k, v, beta, lam_read[:, 1:] * scale, alpha, j)
        self._levels = self._levels[: len(self._levels) - j] + [j + 1]
        self._pos += 1
        res = diag if out is None else diag + out
        return res.reshape(self._batch + (self._Dv,))

    def prefill(self, q, k, v, beta, level_scales, log_decay=None, scale=1.0):
        """Consume ``T`` tokens and return their outputs (the same as ``T`` calls of
        :meth:`step`; the level-0 terms and the scales each position reads are gathered for
        all positions at once).

        Parameters
        ----------
        q, k : array, shape ``(*batch, T, Dk)``
        v : array, shape ``(*batch, T, Dv)``
        beta : array, shape ``(*batch, T)``
        level_scales : array, shape ``(*batch, T, L)``, ``L >= num_levels(position + T)``
            Row ``i`` belongs to position ``position + i``.
        log_decay : array, shape ``(*batch, T)``, optional
        scale : float, default 1.0
            As in :meth:`step`.

        Returns
        -------
        o : array, shape ``(*batch, T, Dv)``
        """
        scale = check_scale(scale)
        T = self._length(v)
        q, k, v, beta, lam, g, L = self._inputs(q, k, v, beta, level_scales, log_decay, T)
        if T == 0:
            return v.reshape(self._batch + (0, self._Dv))
        start = self._pos
        self._check_levels(L, start + T - 1)
        lev = live_levels(np.arange(start, start + T))
        read_cols = np.concatenate([np.zeros((T, 1), np.int64), lev], 1)
        rows = np.arange(T)[:, None]
        lam_read = lam[:, as_like(rows, lam), as_like(read_cols, lam)]
        where = f"positions {start}..{start + T - 1}"
        self._check_finite("level_scales", lam_read, where)
        self._check_finite("log_decay", g, where)
        self._check_finite("beta", beta, where)
        # -- validated: from here on the state changes --
        xp = namespace(v)
        counts = (lev > 0).sum(1).tolist()
        weights = _unbind(lam_read[:, :, 1:] * scale, 1)
        alphas = [None] * T if g is None else _unbind(xp.exp(g), 1)
        qs, ks, vs, betas = (_unbind(a, 1) for a in (q, k, v, beta))
        reads = []
        zero = None
        for i in range(T):
            j = self._merges()
            out = self._advance(qs[i], ks[i], vs[i], betas[i], weights[i][:, : counts[i]], alphas[i], j)
            if out is None:
                zero = zeros((self._B, self._Dv), v) if zero is None else zero
                out = zero
            reads.append(out)
            self._levels = self._levels[: len(self._levels) - j] + [j + 1]
            self._pos += 1
        diag = (lam_read[:, :, 0] * beta * (q * k).sum(-1) * scale)[:, :, None] * v
        return (diag + xp.stack(reads, 1)).reshape(self._batch + (T, self._Dv))


def gated_delta(q, k, v, beta, level_scales, log_decay=None, scale=1.0):
    """Log-linear Gated DeltaNet ``O = (P * M_lambda) V`` by the bucket recurrence.

    Parameters
    ----------
    q, k : array, shape ``(..., T, Dk)``
    v : array, shape ``(..., T, Dv)``
    beta : array, shape ``(..., T)``
    level_scales : array, shape ``(..., T, L)``, ``L >= num_levels(T)``
    log_decay : array, shape ``(..., T)``, optional
    scale : float, default 1.0
        Multiplies every ``P[t, s]`` (no ``Dk ** -0.5`` here, unlike ``hodlr.gated_delta_attention``).

    All in one library (numpy or torch), dtype and device; batch dims broadcast.

    Returns
    -------
    O : array, shape ``(*batch, T, Dv)``
    """
    for name, x, nd, lay in (("q", q, 2, "(..., T, Dk)"), ("k", k, 2, "(..., T, Dk)"), ("v", v, 2, "(..., T, Dv)"),
                             ("beta", beta, 1, "(..., T)"), ("level_scales", level_scales, 2, "(..., T, L)")):
        _check_full(name, x, nd, lay)
    if log_decay is not None:
        _check_full("log_decay", log_decay, 1, "(..., T)")
    named = {"q": q, "k": k, "v": v, "beta": beta, "level_scales": level_scales, "log_decay": log_decay}
    batch, b = _broadcast(named, {"q": 2, "k": 2, "v": 2, "beta": 1, "level_scales": 2, "log_decay": 1})
    state = GatedDeltaState(batch, int(q.shape[-1]), int(v.shape[-1]), dtype=v.dtype, device=_device(v))
    return state.prefill(b["q"], b["k"], b["v"], b["beta"], b["level_scales"], b["log_decay"], scale)

