"""``LogLinearState``: the recurrent state of log-linear attention, handed from one call to the next.

After a sequence has consumed positions ``[0, p)``, what its future outputs need of the past is
one ``Dk x Dv`` matrix per non-empty Fenwick bucket of ``p`` (docs/models.md):

``states[n, h, l - 1] = sum_{s in bucket_l(p)} exp(G[p - 1] - G[s]) k_s v_s^T``

with ``bucket_l(p) = [start, start + 2**(l - 1))``, ``start = (p >> l) << l``, non-empty iff bit
``l - 1`` of ``p`` is set (:func:`hodlr.fenwick.index.bucket`), ``G`` the inclusive cumulative sum of
the log-decay.  Every decay up to the last consumed token ``p - 1`` is applied; the next token's
own decay is applied when it is consumed.  Slots of empty buckets hold 0.  Nothing else is needed:
the carried states are only ever multiplied by ``exp`` of later decays.

One object holds a batch of sequences, each at its own position.  :func:`combine` composes the
state at ``a`` with the state of the tokens ``[a, b)`` alone into the state at ``b``.
"""

from __future__ import annotations

import numpy as np

from hodlr import fenwick
from hodlr._transfer import to_device
from hodlr.fenwick.arrays import check_bool, check_int, describe

__all__ = ["LogLinearState", "combine"]


def _slots_needed(positions) -> int:
    """Slots a state at the largest entry of an int64 tensor of positions needs (one host read)."""
    return fenwick.num_slots(int(positions.max())) if positions.numel() else 0


class LogLinearState:
    """Per sequence and head, the live Fenwick bucket states and the position.

    Parameters
    ----------
    states : torch.Tensor, shape ``(N, H, S, Dk, Dv)``
        float32 (float64 for float64 computations).  Slot ``l - 1`` holds the level-``l`` bucket
        of ``positions[n]`` (see the module docstring); ``S >= bit_length(max(positions))``.
    positions : torch.Tensor, shape ``(N,)``, int64, on the device of ``states``
        Tokens consumed by each sequence: the absolute position of its next token.
    validate : bool, default True
        Check that every position is ``>= 0`` and fits in ``S`` slots (one host read of
        ``positions``).  Shapes, dtypes and devices are always checked.

    Attributes
    ----------
    batch_size, num_heads, num_slots, Dk, Dv, dtype, device, nbytes

    Notes
    -----
    Supports ``.to(...)``, ``.detach()``, ``.clone()``, batch selection and reordering
    (``state[idx]``, :meth:`index_select`: what a generation cache needs for beam search) and
    conversion to and from :class:`hodlr.fenwick.FenwickState` (:meth:`to_fenwick`,
    :meth:`from_fenwick`).  Gradients flow through ``states`` (it may require grad).

    Examples
    --------
    >>> import torch, hodlr
    >>> s = hodlr.LogLinearState.zeros(2, 4, Dk=8, Dv=8, max_position=1000)
    >>> s.num_slots, tuple(s.states.shape), s.positions.tolist()
    (10, (2, 4, 10, 8, 8), [0, 0])
    """

    __slots__ = ("states", "positions")

    def __init__(self, states, positions, *, validate: bool = True):
        import torch

        validate = check_bool("validate", validate)
        if not isinstance(states, torch.Tensor):
            raise TypeError(f"states must be a torch.Tensor of shape (N, H, S, Dk, Dv), got {describe(states)}")
        if states.dim() != 5:
            raise ValueError(f"states must have shape (N, H, S, Dk, Dv), got shape {tuple(states.shape)}")
        if states.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"states must be float32 (float64 for float64 computations), got {states.dtype}")
        if not isinstance(positions, torch.Tensor):
            raise TypeError(f"positions must be an int64 torch.Tensor of shape (N,), got {describe(positions)}")
        if positions.dtype != torch.int64:
            raise TypeError(f"positions must have dtype torch.int64, got {positions.dtype}")
        if positions.dim() != 1 or positions.shape[0] != states.shape[0]:
            raise ValueError(f"positions must have shape (N,) = ({states.shape[0]},) (N from states of shape "
                             f"{tuple(states.shape)}), got shape {tuple(positions.shape)}")
        if positions.device != states.device:
            raise ValueError(f"positions is on device {positions.device} but states is on {states.device}")
        if validate and positions.numel() and positions.device.type != "meta":
            low = int(positions.min())
            if low < 0:
                raise ValueError(f"positions must be >= 0, got {low}")
            need = _slots_needed(positions)
            if need > states.shape[2]:
                raise ValueError(f"states has S={states.shape[2]} slots but position {int(positions.max())} "
                                 f"needs bit_length = {need}")
        self.states = states
        self.positions = positions

    # -- constructors ------------------------------------------------------------------
    @classmethod
    def zeros(cls, batch_size: int, num_heads: int, Dk: int, Dv: int, *, max_position=None, slots=None,
              dtype=None, device=None) -> "LogLinearState":
        """A state at position 0 (all slots empty) for a preallocated decoding cache.

        Parameters
        ----------
        batch_size, num_heads, Dk, Dv : int
        max_position : int, optional
            The largest position the cache will reach: ``slots = bit_length(max_position)``.
        slots : int, optional
            The slot count ``S`` itself (exactly one of ``max_position`` / ``slots``).
        dtype : torch dtype, default float32
        device : torch device, default CPU
        """
        import torch

        sizes = {"batch_size": batch_size, "num_heads": num_heads, "Dk": Dk, "Dv": Dv}
        batch_size, num_heads, Dk, Dv = (check_int(name, value, 0) for name, value in sizes.items())
        if (max_position is None) == (slots is None):
            raise TypeError("pass exactly one of max_position and slots")
        if slots is None:
            slots = fenwick.num_slots(check_int("max_position", max_position, 0))
        else:
            slots = check_int("slots", slots, 0)
        dtype = torch.float32 if dtype is None else dtype
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"dtype must be torch.float32 or torch.float64 (a state's precision; float32 serves "
                            f"16-bit inputs), got {dtype!r}")
        try:
            device = torch.device("cpu" if device is None else device)
        except (RuntimeError, TypeError) as err:
            raise ValueError(f"device must be a torch device or its name, got {device!r} ({err})") from None
        states = torch.zeros((batch_size, num_heads, slots, Dk, Dv), dtype=dtype, device=device)
        return cls(states, torch.zeros(batch_size, dtype=torch.int64, device=states.device), validate=False)

    @classmethod
    def from_fenwick(cls, fenwick_states, *, slots: int | None = None) -> "LogLinearState":
        """From a :class:`hodlr.fenwick.FenwickState` of batch shape ``(N, H)`` (one shared
        position), or a list of them (one per group of sequences, each ``(N_i, H)``,
        concatenated along the batch).  The decay factors ``c`` of the Fenwick state are folded
        into the state values; numpy states become CPU tensors.  ``slots``: the result's number of
        slots (default: the fewest its positions need; pass ``state.num_slots`` to get a
        preallocated cache's shape back).  Lossless in values: see :meth:`to_fenwick`."""
        import torch

        from hodlr.fenwick import FenwickState

        if isinstance(fenwick_states, (list, tuple)):
            if not fenwick_states:
                raise ValueError("fenwick_states must not be an empty list")
            return cls.cat([cls.from_fenwick(f, slots=slots) for f in fenwick_states])
        if not isinstance(fenwick_states, FenwickState):
            raise TypeError(f"fenwick_states must be a hodlr.fenwick.FenwickState or a list of them, "
                            f"got {type(fenwick_states).__name__}")
        f = fenwick_states
        if len(f.batch_shape) != 2:
            raise ValueError(f"the FenwickState must have batch shape (N, H), got {f.batch_shape}")
        N, H = f.batch_shape
        fewest = fenwick.num_slots(int(f.position))
        if slots is not None and check_int("slots", slots, 0) < fewest:
            raise ValueError(f"slots must be an integer >= {fewest} (the slots of position {int(f.position)}), got "
                             f"{slots}")
        slots = fewest if slots is None else int(slots)
        states = {lev: torch.as_tensor(s) for lev, s in f.states().items()}
        torch_state = isinstance(f.dtype, torch.dtype)
        dtype = f.dtype if torch_state else torch.from_numpy(np.zeros(0, dtype=f.dtype)).dtype
        device = f.device if torch_state else None
        out = torch.zeros((N, H, slots, f.Dk, f.Dv), dtype=dtype, device=device)
        if states:
            levels = sorted(states)
            out = out.index_copy(2, to_device([lev - 1 for lev in levels], out.device, torch.int64),
                                 torch.stack([states[lev] for lev in levels], 2))
        return cls(out, torch.full((N,), int(f.position), dtype=torch.int64, device=out.device), validate=False)

    def to_fenwick(self):
        """This state as a :class:`hodlr.fenwick.FenwickState` of batch shape ``(N, H)`` (its decay
        factors ``c`` set to 1), when every sequence is at one position; otherwise a list of
        FenwickStates, one per sequence (batch shape ``(1, H)``), in batch order.  ``states()``
        round-trips exactly and the FenwickState continues exactly as this state does."""
        from hodlr.fenwick import FenwickState

        pos = self.positions.tolist()
        if len(set(pos)) > 1:
            return [self[n].to_fenwick() for n in range(self.batch_size)]
        position = pos[0] if pos else 0
        levels = [lev for lev in range(1, self.num_slots + 1) if (position >> (lev - 1)) & 1]
        return FenwickState.from_states(position, {lev: self.states[:, :, lev - 1] for lev in levels},
                                        (self.batch_size, self.num_heads), self.Dk, self.Dv, self.dtype, self.device)

    # -- read-only facts ---------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return int(self.states.shape[0])

    @property
    def num_heads(self) -> int:
        return int(self.states.shape[1])

    @property
    def num_slots(self) -> int:
        """``S``: positions up to ``2**S - 1`` fit."""
        return int(self.states.shape[2])

    @property
    def Dk(self) -> int:
        return int(self.states.shape[3])

    @property
    def Dv(self) -> int:
        return int(self.states.shape[4])

    @property
    def dtype(self):
        return self.states.dtype

    @property
    def device(self):
        return self.states.device

    @property
    def nbytes(self) -> int:
        return self.states.numel() * self.states.element_size() + self.positions.numel() * 8

    def __len__(self) -> int:
        return self.batch_size

    def __repr__(self) -> str:
        return (f"LogLinearState(N={self.batch_size}, H={self.num_heads}, S={self.num_slots}, Dk={self.Dk}, "
                f"Dv={self.Dv}, dtype={self.dtype}, device={self.device})")

    # -- copies and moves --------------------------------------------------------------
    def to(self, *args, **kwargs) -> "LogLinearState":
        """``states.to(*args, **kwargs)``; ``positions`` follow to the new device (they stay int64).
        Where ``states`` is a new tensor so are the positions (a step on the result, which updates
        both in place, leaves this state as it was); where nothing changes, the state itself."""
        states = self.states.to(*args, **kwargs)
        if states is self.states:
            return self
        return LogLinearState(states, self.positions.to(states.device, copy=True), validate=False)

    def detach(self) -> "LogLinearState":
        """The same tensors (shared, as ``Tensor.detach`` shares them), cut from the autograd graph."""
        return LogLinearState(self.states.detach(), self.positions, validate=False)

    def clone(self) -> "LogLinearState":
        """A copy of both tensors."""
        return LogLinearState(self.states.clone(), self.positions.clone(), validate=False)

    def index_select(self, indices, *, validate: bool = True) -> "LogLinearState":
        """The sequences ``indices`` (an int tensor or sequence, repeats allowed), in that order, in
        new tensors (a step on the result leaves this state as it was: copy the stepped rows back
        with ``states.index_copy_`` / ``positions.index_copy_`` to keep them).  ``validate``: check
        the indices' range on the host (a read of the indices); pass False, with the indices a
        tensor on the state's device, for a reorder without host synchronisation (beam search in
        a CUDA graph).  Unchecked, an out-of-range index fails inside torch's ``index_select``: an
        ``IndexError`` on the CPU, a device-side assert on CUDA (which leaves the CUDA context
        unusable)."""
        import torch

        idx = to_device(indices, self.states.device)
        if idx.dim() == 1 and idx.numel() == 0:  # no sequences (an empty list is float to torch)
            idx = idx.to(torch.int64)
        if idx.dtype not in (torch.int32, torch.int64) or idx.dim() != 1:
            raise TypeError(f"indices must be a 1-d integer tensor or sequence, got {describe(idx)}")
        if check_bool("validate", validate) and idx.numel() and not (0 <= int(idx.min())
                                                                    and int(idx.max()) < self.batch_size):
            bad = int(idx.min()) if int(idx.min()) < 0 else int(idx.max())
            raise ValueError(f"indices must lie in [0, {self.batch_size}) (the state's sequences), got {bad}")
        return LogLinearState(self.states.index_select(0, idx), self.positions.index_select(0, idx), validate=False)

    def __getitem__(self, index) -> "LogLinearState":
        """Batch selection: an int or 0-d integer tensor (the batch dim is kept: ``N = 1``), a slice,
        a boolean mask or integer indices (one dim: the sequences).  As for tensors, an int or a
        slice gives views (a decoding step on the result updates this state), a mask or indices
        copies (a step on the result does not)."""
        index = batch_index(index, self.batch_size)
        return LogLinearState(self.states[index], self.positions[index], validate=False)

    def with_slots(self, slots: int) -> "LogLinearState":
        """The same state with ``slots`` slots, in new tensors (states and positions: a step on the
        result leaves this state as it was): empty slots appended, or trailing ones dropped (they
        must be empty: every position ``< 2**slots``)."""
        import torch

        slots = check_int("slots", slots, 0)
        S = self.num_slots
        if slots >= S:
            pad = self.states.new_zeros(self.states.shape[:2] + (slots - S,) + self.states.shape[3:])
            return LogLinearState(torch.cat([self.states, pad], 2), self.positions.clone(), validate=False)
        need = _slots_needed(self.positions)
        if need > slots:
            raise ValueError(f"slots={slots} cannot hold position {int(self.positions.max())} (needs {need})")
        return LogLinearState(self.states[:, :, :slots].clone(), self.positions.clone(), validate=False)

    @classmethod
    def cat(cls, states) -> "LogLinearState":
        """The sequences of ``states`` (a non-empty sequence of states of one head count, widths,
        dtype and device) one after another, in new tensors, at the largest slot count among them
        (each widened with :meth:`with_slots`): prompts prefilled apart, decoded as one batch.

        >>> import hodlr
        >>> a = hodlr.LogLinearState.zeros(2, 1, 4, 4, slots=3)
        >>> hodlr.LogLinearState.cat([a, hodlr.LogLinearState.zeros(1, 1, 4, 4, slots=5)]).states.shape
        torch.Size([3, 1, 5, 4, 4])
        """
        import torch

        states = list(states) if isinstance(states, (list, tuple)) else states
        if not isinstance(states, list) or not states or not all(isinstance(x, cls) for x in states):
            raise TypeError(f"states must be a non-empty list or tuple of hodlr.LogLinearState, got "
                            f"{type(states).__name__}"
                            + (f" holding {', '.join(sorted({type(x).__name__ for x in states}))}"
                               if isinstance(states, list) and states else ""))
        first = states[0]
        for i, x in enumerate(states[1:], 1):
            if ((x.num_heads, x.Dk, x.Dv, x.dtype, x.device)
                    != (first.num_heads, first.Dk, first.Dv, first.dtype, first.device)):
                raise ValueError(f"states[{i}] has (heads, Dk, Dv, dtype, device) = "
                                 f"{(x.num_heads, x.Dk, x.Dv, x.dtype, str(x.device))} but states[0] has "
                                 f"{(first.num_heads, first.Dk, first.Dv, first.dtype, str(first.device))}")
        S = max(x.num_slots for x in states)
        wide = [x if x.num_slots == S else x.with_slots(S) for x in states]
        return cls(torch.cat([x.states for x in wide]), torch.cat([x.positions for x in wide]), validate=False)


def batch_index(index, batch_size: int):
    """``index`` of a selection along ``batch_size`` sequences (a state's, a cache's), with an int or
    a 0-d integer tensor made the slice of that one sequence (the batch dim is kept); the other
    indices (a slice, a boolean mask, integer indices) as given."""
    import torch

    if isinstance(index, torch.Tensor) and index.dim() == 0 and not index.dtype.is_floating_point \
            and index.dtype != torch.bool:
        index = int(index)
    if index is None or isinstance(index, (bool, tuple)):
        raise TypeError(f"a LogLinearState is indexed along its sequences by an int, a slice, a boolean mask "
                        f"or integer indices, got {type(index).__name__}")
    if isinstance(index, (int, np.integer)) and not isinstance(index, bool):
        n = int(index)
        if not -batch_size <= n < batch_size:
            raise IndexError(f"sequence {n} out of range for a state of {batch_size} sequences")
        n %= batch_size
        index = slice(n, n + 1)
    return index


def combine(first: LogLinearState, second: LogLinearState, log_decay=None, *, validate: bool = True) -> LogLinearState:
    """The state at ``b`` from the state at ``a`` and the state of the tokens ``[a, b)`` alone.

    ``first`` is the state of each sequence at position ``a`` (every token before ``a``);
    ``second`` the state at ``b >= a`` of a call that started at ``a`` from an all-zero state
    (its buckets hold the tokens ``[a, b)`` only); ``log_decay`` the sum of the log-decays of those
    tokens.  With ``d = bit_length(a XOR b)`` (the level of ``a`` seen from ``b``), the bucket of
    level ``l`` of ``b``

    * for ``l > d`` is the bucket ``l`` of ``a`` (``a`` and ``b`` agree on the bits ``>= l - 1``),
      decayed by ``exp(log_decay)``;
    * for ``l = d`` is ``[start, a) ∪ [a, start + 2^(d-1))``: the buckets ``1 .. d - 1`` of ``a``
      (which tile ``[start, a)``), decayed, plus bucket ``d`` of ``second``;
    * for ``l < d`` lies inside ``[a, b)``: bucket ``l`` of ``second``.

    For log-linear attention states (:func:`hodlr.log_linear_attn`): a log-linear Gated DeltaNet
    state (:func:`hodlr.log_linear_gated_delta_rule`, the same class) is moved from ``a`` to ``b``
    by the product of the transitions ``A_t``, matrices, not by a decay, so ``combine`` does not
    apply to it (its result would be wrong; nothing here can tell the two apart).

    ``a == b`` gives ``first`` (every ``l > d = 0``; ``second`` is empty).  Pure (new tensors, the
    positions included) and differentiable in both states and ``log_decay``; no host read unless
    ``validate``.  Only the live slots of ``first`` are read (bit ``l - 1`` of ``a`` set), as the
    operations read a state: what an empty slot holds does not matter.

    Parameters
    ----------
    first, second : LogLinearState
        The same ``(N, H, ·, Dk, Dv)``, dtype and device; slot counts may differ.
    log_decay : torch.Tensor, shape ``(N, H)``, or None
        ``sum(g[a:b])`` per sequence and head, in the states' dtype (``None``: no decay).
    validate : bool, default True
        Check ``first.positions <= second.positions`` (one host read).

    Returns
    -------
    LogLinearState
        At ``second.positions``, with ``max(first.num_slots, second.num_slots)`` slots.

    Examples
    --------
    >>> import torch, hodlr
    >>> from hodlr.state import combine
    >>> q, k, v = (torch.randn(1, 11, 1, 2, dtype=torch.float64) for _ in range(3))
    >>> lam = torch.rand(1, 11, 1, 5, dtype=torch.float64)
    >>> _, whole = hodlr.log_linear_attn(q, k, v, None, lam, output_final_state=True)
    >>> _, head = hodlr.log_linear_attn(q[:, :6], k[:, :6], v[:, :6], None, lam[:, :6], output_final_state=True)
    >>> zero = hodlr.LogLinearState(torch.zeros(1, 1, 3, 2, 2, dtype=torch.float64), torch.tensor([6]))
    >>> _, tail = hodlr.log_linear_attn(q[:, 6:], k[:, 6:], v[:, 6:], None, lam[:, 6:], initial_state=zero,
    ...                                 output_final_state=True)
    >>> bool(torch.allclose(combine(head, tail).states, whole.states))
    True
    """
    import torch

    validate = check_bool("validate", validate)
    for name, s in (("first", first), ("second", second)):
        if not isinstance(s, LogLinearState):
            raise TypeError(f"{name} must be a hodlr.LogLinearState, got {type(s).__name__}")
    want = (first.batch_size, first.num_heads, first.Dk, first.Dv)
    got = (second.batch_size, second.num_heads, second.Dk, second.Dv)
    if got != want:
        raise ValueError(f"second must have the (N, H, Dk, Dv) of first, {want}, got {got}")
    if second.dtype != first.dtype or second.device != first.device:
        raise ValueError(f"second is {second.dtype} on {second.device} but first is {first.dtype} on {first.device}")
    if log_decay is not None:
        if not isinstance(log_decay, torch.Tensor) or tuple(log_decay.shape) != want[:2]:
            raise ValueError(f"log_decay must be a tensor of shape (N, H) = {want[:2]}, got {describe(log_decay)}")
    if validate and first.batch_size:
        behind = (second.positions < first.positions).nonzero()
        if behind.numel():
            n = int(behind[0, 0])
            raise ValueError(f"second must be at or after first: sequence {n} has first.positions = "
                             f"{int(first.positions[n])} > second.positions = {int(second.positions[n])}")
    S = max(first.num_slots, second.num_slots)
    Y = first.with_slots(S).states
    X = second.with_slots(S).states
    a, b = first.positions[:, None], second.positions[:, None]
    below = torch.arange(S, device=Y.device)  # l - 1
    above = (a >> below) == (b >> below)  # l > d
    at = ~above & ((a >> (below + 1)) == (b >> (below + 1)))  # l == d
    live = ((a >> below) & 1) == 1  # the slots of first that hold a bucket
    Y = torch.where(live[:, None, :, None, None], Y, torch.zeros((), dtype=Y.dtype, device=Y.device))
    if log_decay is not None:
        decay = torch.exp(log_decay.to(Y.dtype))[:, :, None, None, None]
        Y = decay * Y
    # the buckets 1 .. l - 1 of a, per l (a cumulative sum over the slots, no subtraction)
    lower = torch.cat([torch.zeros_like(Y[:, :, :1]), torch.cumsum(Y[:, :, :-1], 2)], 2)
    above, at = above[:, None, :, None, None], at[:, None, :, None, None]
    states = torch.where(above, Y, torch.where(at, lower + X, X))
    return LogLinearState(states, second.positions.clone(), validate=False)


def segments(N: int, T: int, cu_seqlens=None, initial_positions=None):
    """Host-side description of the sequences of one call, for the backends.

    ``q, k, v`` of shape ``(N, H, T, D)`` hold either ``N`` sequences of length ``T`` or, with
    ``cu_seqlens``, ``N == 1`` and ``len(cu_seqlens) - 1`` packed sequences.  Returns int64 numpy
    arrays ``(batch, offset, length, start)``, one entry per sequence: its batch row and first token
    along ``T``, its length, and the absolute position of its first token (``initial_positions``, or 0).
    One host read of ``cu_seqlens`` (none where the caller passes its values, a list) and of
    ``initial_positions``.
    """
    if cu_seqlens is None:
        count = N
        batch = np.arange(N, dtype=np.int64)
        offset = np.zeros(N, dtype=np.int64)
        length = np.full(N, T, dtype=np.int64)
    else:
        cu = np.asarray(cu_seqlens.tolist() if hasattr(cu_seqlens, "tolist") else cu_seqlens, dtype=np.int64)
        count = cu.size - 1
        batch = np.zeros(count, dtype=np.int64)
        offset = cu[:-1]
        length = np.diff(cu)
    if initial_positions is None:
        start = np.zeros(count, dtype=np.int64)
    else:
        start = np.asarray(initial_positions.tolist(), dtype=np.int64).reshape(count)
    return batch, offset, length, start

