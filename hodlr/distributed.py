"""Context parallelism for log-linear attention over ``torch.distributed`` (gloo on CPUs, NCCL on GPUs).

The sequence is cut into contiguous shards, one per rank of a process group.  Each rank holds its
shard of ``q, k, v, g, level_scales`` in :func:`hodlr.log_linear_attn`'s ``(B, T, H, D)`` layout
and gets its shard of the output; levels are those of global positions.  What crosses ranks is one
``Dk x Dv`` matrix per Fenwick level, head and sequence (the bucket states of a shard's end) and one
log-decay per head and sequence, never ``q, k, v``.  The algorithm (docs/distributed.md):

1. every rank computes, for the sequences that continue past its shard, the bucket states at its
   end over its own tokens (:func:`segment_state`: a weighted sum of key-value products per
   bucket, no output) and
   the sum of their log-decays;
2. one ``all_gather`` gives every rank those states (differentiable: its backward reduce-scatters
   the state gradients back to the ranks that sent the states);
3. rank ``r`` folds the states of the earlier ranks with :func:`hodlr.distributed.combine` into the state
   at its start, and runs its shard once, from that state (the backend's kernels continue from a
   state at any position).

Also here: :func:`segment_state`, :func:`shard_offsets` (an even split), :func:`payload_bytes` (the
bytes formula) and :func:`record_communication` (what the collectives of this module moved).
"""

from __future__ import annotations

import collections
import contextlib
import zlib
from dataclasses import dataclass, field

import numpy as np
import torch

from hodlr import _checks, backends as registry, fenwick
from hodlr._transfer import to_device
from hodlr.errors import BackendUnavailableError
from hodlr.fenwick.arrays import check_int, describe
from hodlr.state import LogLinearState, combine

__all__ = ["CommRecord", "combine", "log_linear_attn", "payload_bytes", "record_communication", "segment_state",
           "shard_offsets"]


# ---------------------------------------------------------------------------------------
# communication accounting
# ---------------------------------------------------------------------------------------
@dataclass(eq=False)
class CommRecord:
    """The collectives :mod:`hodlr.distributed` ran on this rank while recording.

    ``entries`` holds one dict per collective: ``what`` (``"metadata"``: the shard lengths and
    argument checks; ``"states"``: the bucket states and log-decays), ``direction`` (``"forward"``:
    ``all_gather``; ``"backward"``: the ``reduce_scatter`` of their gradients), ``payload`` (bytes
    this rank contributes: its part of the gathered tensor, or of the reduced gradient), ``sent``
    (bytes this rank sends in a ring, ``(world - 1) * payload``) and, when timed, ``seconds`` (wall
    time of the collective, the device synchronised before and after: waiting for the other ranks
    included).
    """

    entries: list = field(default_factory=list)
    timed: bool = False

    def add(self, what: str, direction: str, payload: int, world: int, seconds=None) -> None:
        entry = {"what": what, "direction": direction, "payload": int(payload), "sent": int(payload) * (world - 1),
                 "world": int(world)}
        if seconds is not None:
            entry["seconds"] = float(seconds)
        self.entries.append(entry)

    def total(self, key: str = "sent", what=None, direction=None):
        """Sum of ``key`` (``"sent"``, ``"payload"`` or ``"seconds"``) over the entries that match."""
        return sum(e.get(key, 0) for e in self.entries
                   if (what is None or e["what"] == what) and (direction is None or e["direction"] == direction))


_RECORDS: list = []


@contextlib.contextmanager
def record_communication(timed: bool = False):
    """Record the collectives that :func:`log_linear_attn` runs on this rank inside the block,
    forward and backward (a ``backward()`` inside the block is recorded too).

    ``timed``: also time each collective (the device is synchronised before and after it).

    >>> with record_communication() as rec:
    ...     pass
    >>> rec.total()
    0
    """
    rec = CommRecord(timed=timed)
    _RECORDS.append(rec)
    try:
        yield rec
    finally:
        _RECORDS.remove(rec)


def payload_bytes(rows: int, heads: int, slots: int, Dk: int, Dv: int, *, decay: bool = True,
                  itemsize: int = 4) -> int:
    """Bytes one rank contributes to the states ``all_gather``: ``rows`` sequences times ``heads``
    times (``slots`` bucket matrices ``Dk x Dv``, plus one log-decay when there is a decay), in
    the state's dtype (``itemsize`` 4 for float32).  In a ring each rank sends ``world - 1``
    times this, forward, and as much again for the gradient in the backward.

    >>> payload_bytes(1, 16, 21, 64, 64)  # one sequence of up to 2**21 tokens, 16 heads of 64
    5505088
    """
    sizes = {"rows": rows, "heads": heads, "slots": slots, "Dk": Dk, "Dv": Dv, "itemsize": itemsize}
    rows, heads, slots, Dk, Dv, itemsize = (check_int(name, value, 0) for name, value in sizes.items())
    return rows * heads * (slots * Dk * Dv + int(bool(decay))) * itemsize


def _collective(what, direction, tensor, world, run):
    """``run()``, recorded (and timed) for every active :class:`CommRecord`."""
    import time

    timed = any(rec.timed for rec in _RECORDS)
    if timed and tensor.is_cuda:
        torch.cuda.synchronize(tensor.device)
    t0 = time.perf_counter()
    run()
    if timed and tensor.is_cuda:
        torch.cuda.synchronize(tensor.device)
    seconds = time.perf_counter() - t0
    for rec in _RECORDS:
        rec.add(what, direction, tensor.numel() * tensor.element_size(), world, seconds if rec.timed else None)


class _Pending:
    """An ``all_gather`` under way: its result buffer, and the handle to wait on (None once done)."""

    def __init__(self, out, work, source=None):
        self.out, self.work, self.source = out, work, source  # (the source stays alive until the wait)

    def wait(self):
        if self.work is not None:
            self.work.wait()  # on NCCL: the current stream waits for the collective; the host does not
            self.work = self.source = None
        return self.out


def _start_all_gather(x, group, world: int, what: str) -> _Pending:
    """Issue the ``all_gather`` of ``x`` (not differentiable; :class:`_Gathered` makes it so) and
    return without waiting, so that work queued after it overlaps the exchange.  When timing, it
    runs to completion here instead (the time of the exchange alone)."""
    import torch.distributed as dist

    x = x.detach().contiguous()
    out = x.new_empty((world * x.numel(),))
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # the name before torch 2.13
    if any(rec.timed for rec in _RECORDS):
        _collective(what, "forward", x, world, lambda: gather(out, x.view(-1), group=group))
        return _Pending(out, None)
    _collective(what, "forward", x, world, lambda: None)
    return _Pending(out, gather(out, x.view(-1), group=group, async_op=True), x)


class _Gathered(torch.autograd.Function):
    """``(world, *x.shape)``: the result of the ``all_gather`` of ``x`` started by
    :func:`_start_all_gather`; the backward reduce-scatters the gradient (each rank gets the sum,
    over the ranks, of the gradients of its own part).  Applied after the work that overlaps the
    exchange, so that the backward reaches the ``reduce_scatter`` before that work's backward.

    With ``returned`` (a :class:`_Pending`), the backward only starts the ``reduce_scatter`` and
    leaves the wait to :class:`_AwaitGradient` (applied to ``x`` before the gather): the work between
    the two overlaps the exchange; without it, the backward waits."""

    @staticmethod
    def forward(ctx, x, pending, group, world, what, returned=None):
        ctx.group, ctx.world, ctx.what, ctx.returned = group, world, what, returned
        return pending.wait().view((world,) + tuple(x.shape))

    @staticmethod
    def backward(ctx, grad):
        _first_order_only()
        return _scatter_back(ctx, grad), None, None, None, None, None


def _first_order_only():
    """Raise, in the backward of every autograd function here before any collective, when it runs
    to build a graph of its own (``create_graph=True``): the collectives have no gradient.  Every
    rank's backward reaches one of them, so every rank raises."""
    if torch.is_grad_enabled():
        raise NotImplementedError("hodlr.distributed.log_linear_attn has no second-order gradients (a backward "
                                  "with create_graph=True): its collectives are not differentiable")


def _scatter_back(ctx, grad):
    """The ``reduce_scatter`` of the gathered states' gradient ``grad (world, ...)``: this rank's
    part, summed over the ranks; started without waiting when ``ctx.returned`` takes the wait."""
    import torch.distributed as dist

    grad = grad.contiguous()
    out = grad.new_empty(grad.shape[1:])
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    if ctx.returned is None or any(rec.timed for rec in _RECORDS):
        _collective(ctx.what, "backward", out, ctx.world,
                    lambda: scatter(out.view(-1), grad.view(-1), op=dist.ReduceOp.SUM, group=ctx.group))
    else:
        _collective(ctx.what, "backward", out, ctx.world, lambda: None)
        ctx.returned.out, ctx.returned.source = out, grad
        ctx.returned.work = scatter(out.view(-1), grad.view(-1), op=dist.ReduceOp.SUM, group=ctx.group,
                                    async_op=True)
    return out


class _Unread(torch.autograd.Function):
    """``x`` (a copy) with the states ``all_gather`` of ``payload`` in its graph, for a rank that
    does not read the gathered states: its backward runs this rank's part of the ``reduce_scatter``
    (a zero gradient for what it gathered), as :class:`_Gathered`'s would, and its forward does not
    wait for the exchange.  Applied to the log-decay, a small input of the local call, where
    :class:`_Depend` on the output would copy all of it."""

    @staticmethod
    def forward(ctx, x, payload, group, world, what, returned):
        ctx.group, ctx.world, ctx.what, ctx.returned = group, world, what, returned
        ctx.like = (payload.numel(), payload.dtype)
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        _first_order_only()
        numel, dtype = ctx.like
        zeros = grad.new_zeros((ctx.world, numel), dtype=dtype)
        return grad, _scatter_back(ctx, zeros), None, None, None, None


class _AwaitGradient(torch.autograd.Function):
    """``x`` itself (a copy); its backward first waits for the ``reduce_scatter`` that
    :class:`_Gathered`'s backward started into ``returned`` (the gradient arriving for ``x``)."""

    @staticmethod
    def forward(ctx, x, returned):
        ctx.returned = returned
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        _first_order_only()
        ctx.returned.wait()
        return grad, None


def _all_gather(x, group, world: int, what: str):
    """``(world, *x.shape)``, the ``x`` of every rank; differentiable when ``x`` requires grad."""
    return _Gathered.apply(x, _start_all_gather(x, group, world, what), group, world, what)


class _Depend(torch.autograd.Function):
    """A copy of ``x`` with ``others`` in its graph (their gradient: zero).  The states
    ``all_gather`` has a collective backward that every rank must run: tied to ``o`` (where ``o``
    does not read the gathered states) and to the rank's inputs (where its payload holds none of
    their states), every rank's backward reaches it, also with ``torch.autograd.grad`` on a subset
    of the inputs.  (A copy, not a view: the caller may modify it in place.)"""

    @staticmethod
    def forward(ctx, x, *others):
        ctx.shapes = len(others)
        return x.clone()

    @staticmethod
    def backward(ctx, grad, *_):
        _first_order_only()
        return (grad,) + (None,) * ctx.shapes


def _reaches(x, node, inputs) -> bool:
    """Whether the autograd graph of ``x`` reaches the node ``node`` (a ``grad_fn``), searched
    breadth first and not past the graphs of ``inputs`` (the tensors ``x`` was computed from: what
    came before them is the caller's model)."""
    seen = {t.grad_fn for t in inputs if t is not None and t.grad_fn is not None}
    todo = collections.deque([x.grad_fn])
    while todo:
        f = todo.popleft()
        if f is None or f in seen:
            continue
        if f is node:
            return True
        seen.add(f)
        todo.extend(n for n, _ in f.next_functions)
    return False


_STREAMS: dict = {}


def _side_stream(device):
    """A second CUDA stream of ``device`` (one per device, kept), after the work queued so far on
    the current one; None off CUDA."""
    if device.type != "cuda":
        return None
    side = _STREAMS.setdefault(device, torch.cuda.Stream(device))
    side.wait_stream(torch.cuda.current_stream(device))
    return side


# ---------------------------------------------------------------------------------------
# shards
# ---------------------------------------------------------------------------------------
def shard_offsets(T: int, world_size: int) -> list:
    """``world_size + 1`` offsets of an even split of ``T`` tokens into contiguous shards (the first
    ``T % world_size`` shards one token longer): rank ``r`` holds ``[offsets[r], offsets[r + 1])``.

    >>> shard_offsets(10, 4)
    [0, 3, 6, 8, 10]
    """
    T, world_size = check_int("T", T, 0), check_int("world_size", world_size, 1)
    base, extra = divmod(T, world_size)
    return [r * base + min(r, extra) for r in range(world_size + 1)]


_META = ("tokens", "B (batch of q)", "heads of q and k", "heads of v", "Dk", "Dv", "g given", "initial_state given",
         "initial_state slots", "cu_seqlens length", "output_final_state", "dtype of q", "gradients wanted",
         "cu_seqlens", "initial_state.positions", "scale", "backend", "levels of level_scales", "autograd on")
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


_BACKENDS = ("auto",) + registry.NAMES
_SEQUENCES = ("cu_seqlens", "initial_state.positions")  # compared by checksum, then entry by entry


def _crc(values) -> int:
    return zlib.crc32(np.asarray(values, dtype=np.int64).tobytes())


def _exchange_metadata(q, v, level_scales, g, initial_state, cu_seqlens, output_final_state, wants_grad, scale,
                       backend, group, rank, world, refused):
    """Every rank's shard length (the offsets), whether any rank wants gradients and every rank's
    number of level scales ``L``, after checking
    that the ranks agree on everything that must be replicated; every rank raises otherwise (the
    same ValueError, or ``refused``, this rank's own error, on the rank that refused its arguments)."""
    import torch.distributed as dist

    if refused is None:
        cu = [] if cu_seqlens is None else cu_seqlens.tolist()
        pos = [] if initial_state is None else initial_state.positions.tolist()
        mine = [q.shape[1], q.shape[0], q.shape[2], v.shape[2], q.shape[3], v.shape[3], g is not None,
                initial_state is not None, 0 if initial_state is None else initial_state.num_slots,
                len(cu), output_final_state, _DTYPES.index(q.dtype) if q.dtype in _DTYPES else -1, wants_grad,
                _crc(cu), _crc(pos), int(np.float64(scale).view(np.int64)),
                _BACKENDS.index(backend) if backend in _BACKENDS else -1, level_scales.shape[-1],
                torch.is_grad_enabled(), 0]
        device = q.device
    else:
        mine = [-1] * len(_META) + [1]
        device = q.device if isinstance(q, torch.Tensor) else (
            torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else "cpu")
    meta = torch.tensor([int(x) for x in mine], dtype=torch.int64, device=device)
    rows = _all_gather(meta, group, world, "metadata").tolist()
    if refused is not None:
        raise refused
    bad = [j for j in range(world) if rows[j][-1]]
    if bad:
        raise ValueError(f"rank {bad[0]} of the group refused its arguments (its own error says why); "
                         f"rank {rank} stops too")
    for i, name in enumerate(_META):
        if name in ("tokens", "gradients wanted", "levels of level_scales", "autograd on"):
            continue
        values = [row[i] for row in rows]
        if len(set(values)) > 1:
            j = next(j for j in range(world) if values[j] != values[0])
            if name in _SEQUENCES:  # (every rank takes this branch: the rows are the same on every rank)
                seq = cu_seqlens if name == "cu_seqlens" else None if initial_state is None else initial_state.positions
                raise ValueError(_first_difference(name, seq, j, group, world, device))
            raise ValueError(f"every rank of the group must pass the same {name}: rank 0 has "
                             f"{_show(name, rows[0][i])}, rank {j} has {_show(name, rows[j][i])}")
    wanting = [j for j in range(world) if rows[j][_META.index("gradients wanted")]]
    off = [j for j in range(world) if not rows[j][_META.index("autograd on")]]
    if wanting and off:  # (that rank's output would have no backward, and the backward is a collective)
        raise ValueError(f"rank {wanting[0]} of the group wants gradients but rank {off[0]} calls with autograd off "
                         f"(torch.no_grad or torch.inference_mode): call under the same grad mode on every rank")
    offsets = [0] + np.cumsum([row[0] for row in rows]).tolist()
    return (offsets, bool(wanting),
            [row[_META.index("levels of level_scales")] for row in rows])


def _early_call(q, g, level_scales, initial_state, cu_seqlens, output_final_state, wants_grad, rank,
                world) -> bool:
    """Whether this rank computes its local output before the metadata exchange: one batch of
    sequences from position 0 (no ``cu_seqlens``, no initial state), a non-empty shard, level scales
    for the whole of an even split, and a shard that an even split makes aligned and whose call takes
    ``g`` as it is (step 3): a later rank (its shard reads the earlier ranks' states, added in step
    5), or the first rank of a call without gradients (or without decay, or with the final state),
    whose local call is its whole output."""
    T = q.shape[1]
    if cu_seqlens is not None or initial_state is not None or T == 0:
        return False
    if level_scales.shape[-1] < fenwick.num_levels(world * T) or not fenwick.aligned(rank * T, T):
        return False
    return rank > 0 or not wants_grad or g is None or output_final_state


def _early_call_holds(offsets, rank, T, g, output_final_state, wants_grad) -> bool:
    """Whether the early local call is the one step 3 makes with the exchanged ``offsets`` and
    ``wants_grad`` (any rank's): the shard aligned at its offset, and either earlier ranks hold
    tokens (the shard reads their states) or the shard is first and no rank's backward needs the
    exchange tied to its ``g``."""
    if not fenwick.aligned(int(offsets[rank]), T):
        return False
    if offsets[rank] > 0:
        return True
    return not wants_grad or g is None or output_final_state


def _first_difference(name, seq, j, group, world, device) -> str:
    """The message for ranks 0 and ``j`` passing different ``name`` (a sequence of the same length on
    every rank, as the checks before it ensured): a second ``all_gather``, of the sequences
    themselves, finds the first entry where they differ."""
    mine = torch.as_tensor([] if seq is None else seq.tolist(), dtype=torch.int64, device=device)
    rows = _all_gather(mine, group, world, "metadata").tolist()
    at = next(n for n in range(len(rows[0])) if rows[j][n] != rows[0][n])
    return (f"every rank of the group must pass the same {name}: rank 0 has {name}[{at}]={rows[0][at]}, rank {j} "
            f"has {name}[{at}]={rows[j][at]}")


def _show(name, value):
    if name == "dtype of q":
        return str(_DTYPES[value]) if 0 <= value < len(_DTYPES) else "another dtype"
    if name == "scale":
        return repr(float(np.int64(value).view(np.float64)))
    if name == "backend":
        return repr(_BACKENDS[value]) if 0 <= value < len(_BACKENDS) else "another backend"
    return str(value)


@dataclass
class _Plan:
    """Host-side layout of one call: per rank ``j`` and sequence ``n`` the global token range
    ``[lo, hi)`` of ``n`` inside shard ``j`` and its absolute positions ``[a, a + hi - lo)``."""

    offsets: list
    lo: np.ndarray  # (world, N)
    hi: np.ndarray
    a: np.ndarray
    first: np.ndarray  # (N,): the rank of each sequence's first token (where it starts from its initial state)
    start: np.ndarray  # (N,): initial positions
    end: np.ndarray  # (N,): final positions
    rows: list  # per rank: the sequences whose states that rank sends

    @property
    def length(self):
        return self.hi - self.lo


def _plan(offsets, Nseq, cu, start, output_final_state) -> _Plan:
    world = len(offsets) - 1
    o = np.asarray(offsets, dtype=np.int64)
    if cu is None:  # every batch row is one sequence over all the shards
        s0, s1 = np.zeros(Nseq, dtype=np.int64), np.full(Nseq, o[-1], dtype=np.int64)
    else:
        cu = np.asarray(cu, dtype=np.int64)
        s0, s1 = cu[:-1], cu[1:]
    lo = np.clip(s0[None, :], o[:-1, None], o[1:, None])
    hi = np.clip(s1[None, :], o[:-1, None], o[1:, None])
    a = start[None, :] + lo - s0[None, :]
    first = np.searchsorted(o[:world], s0, side="right") - 1
    crosses = (hi == o[1:, None]) & (s1[None, :] > o[1:, None])
    send = (hi > lo) & (crosses | bool(output_final_state))
    rows = [np.nonzero(send[j])[0] for j in range(world)]
    return _Plan(list(offsets), lo, hi, a, first, start, start + s1 - s0, rows)


# ---------------------------------------------------------------------------------------
# the op
# ---------------------------------------------------------------------------------------
def _segments_decay(g, plan, rank, local, cu_local):
    """``(len(local), H)``: the log-decay summed over each local sequence's tokens on this rank."""
    if cu_local is None:
        return g.sum(1)
    lengths = to_device(plan.length[rank, local], g.device)
    seg = torch.repeat_interleave(torch.arange(len(local), device=g.device), lengths)
    return g.new_zeros((len(local), g.shape[2])).index_add(0, seg, g[0])


def _live_buckets(states, rows, positions):
    """``states[rows]`` with the buckets that ``positions`` leave empty set to 0 (no value there,
    and no gradient reaches them)."""
    live = (np.asarray(positions)[:, None] >> np.arange(states.shape[2])[None, :]) & 1 == 1
    picked = states[to_device(rows, states.device)]
    return torch.where(to_device(live, states.device)[:, None, :, None, None], picked, 0.0)


def _cumsum(x: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """Inclusive prefix sums along the last dim, in blocks of ``block``: a scan along one long
    row runs on one thread block on CUDA (docs/distributed.md measures it), so the rows are cut into
    blocks scanned side by side, then each block adds the sum of the blocks before it.
    Differentiable."""
    T = x.shape[-1]
    if T <= block:
        return torch.cumsum(x, -1)
    pad = -T % block
    inner = torch.nn.functional.pad(x, (0, pad)).reshape(*x.shape[:-1], -1, block).cumsum(-1)
    before = _cumsum(inner[..., -1], block) - inner[..., -1]  # the sum of the earlier blocks
    return (inner + before[..., None]).flatten(-2)[..., :T]


def _log_weights(g, rows, begin, length):
    """``(B, T, H)``: for each token of the segments (``length[i]`` tokens from ``begin[i]`` of
    batch row ``rows[i]``), the log-decay summed over the tokens after it up to its segment's end;
    0 elsewhere, in ``g``'s dtype.

    Where every row is one segment, a scan from each row's end (suffix sums: a token's value is
    summed from the small terms near the end, so its rounding stays relative to its own size);
    otherwise a difference of float64 prefix sums (rounding ``2**-52`` times the sum's magnitude).
    Both scans run along the innermost dim (a scan along T of a ``(B, T, H)`` tensor gets only H
    threads per batch row on CUDA: docs/distributed.md), in blocks (:func:`_cumsum`)."""
    B, T = g.shape[:2]
    if len(rows) == B and (begin == 0).all() and (length == T).all() and (np.sort(rows) == np.arange(B)).all():
        gt = g.transpose(1, 2).contiguous().flip(-1)  # (B, H, T), last token first
        after = _cumsum(gt) - gt  # the sum over the tokens after each one
        return after.flip(-1).transpose(1, 2)
    total = _cumsum(g.to(torch.float64).transpose(1, 2).contiguous()).transpose(1, 2)
    last = np.full((B, T), -1, dtype=np.int64)
    tokens = np.repeat(begin - np.cumsum(length) + length, length) + np.arange(length.sum())
    last[np.repeat(rows, length), tokens] = np.repeat(begin + length - 1, length)
    last = to_device(last, g.device)
    ends = total.gather(1, last.clamp(min=0)[..., None].expand(-1, -1, g.shape[2]))
    return torch.where((last >= 0)[..., None], ends - total, 0.0).to(g.dtype)


def _buckets(rows, begin, a, length, S):
    """``(n, 5)`` int64 rows ``(b, t0, n, i, j)``: the ``n`` tokens from ``t0`` of batch row ``b``
    that sequence ``i`` (``length[i]`` tokens from ``begin[i]`` of row ``rows[i]``, absolute
    positions from ``a[i]``) holds in slot ``j`` of its state at ``a[i] + length[i]``: token ``s``
    lies in the bucket of level ``bit_length(e XOR s)`` of the end ``e``, and a level's tokens are
    contiguous (slot ``j``: the level-``j + 1`` bucket ``[base, base + 2**j)``, cut at ``a``)."""
    e = (a + length)[:, None]
    j = np.arange(S)[None, :]
    base = (e >> (j + 1)) << (j + 1)
    lo = np.maximum(base, a[:, None])
    hi = base + (1 << j)
    i, j = np.nonzero((((e >> j) & 1) == 1) & (hi > lo))  # (the bucket of slot j of sequence i)
    order = np.lexsort((i, j))  # slot by slot
    i, j = i[order], j[order]
    lo, hi = lo[i, j], hi[i, j]
    return np.stack([rows[i], begin[i] + lo - a[i], hi - lo, i, j], 1).astype(np.int64).reshape(-1, 5)


def _segment_states(k, v, g, rows, begin, a, length, S, work, kernel=False):
    """``(len(rows), H, S, Dk, Dv)``: for each ``i``, the bucket states at ``a[i] + length[i]`` of
    the tokens ``begin[i] .. begin[i] + length[i] - 1`` of batch row ``rows[i]`` of ``k, v, g``
    (absolute positions from ``a[i]``) from an all-zero state at ``a[i]``.

    Each bucket is a sum of decayed key-value products over a contiguous stretch (:func:`_buckets`;
    weights from :func:`_log_weights`): with ``kernel``, ``hodlr.kernels.bucket_states`` (long
    buckets cut into pieces summed in parallel); otherwise one ``einsum`` per bucket length and
    slot.  Differentiable in ``k, v, g``."""
    rows, begin, a, length = (np.asarray(x, dtype=np.int64) for x in (rows, begin, a, length))
    n, H, Hqk = len(rows), v.shape[2], k.shape[2]
    Dk, Dv, dev = k.shape[3], v.shape[3], k.device
    if n == 0 or S == 0:
        return torch.zeros((n, H, S, Dk, Dv), dtype=work, device=dev)
    buckets = _buckets(rows, begin, a, length, S)
    logw = None if g is None else _log_weights(g.to(work), rows, begin, length)
    if kernel:
        from hodlr import kernels

        if logw is None:
            logw = v.new_zeros(v.shape[:3], dtype=work)
        return kernels.bucket_states(k, v, logw, buckets, n, S)
    X = torch.zeros((n, H, S, Dk, Dv), dtype=work, device=dev)
    kw = k.to(work).repeat_interleave(H // Hqk, 2)  # (B, T, H, Dk)
    if logw is not None:
        kw = kw * torch.exp(logw)[..., None]
    vw = v.to(work)
    for j in range(S):
        mine = buckets[buckets[:, 4] == j]
        for size in np.unique(mine[:, 2]):
            pick = mine[mine[:, 2] == size]
            at = to_device(pick[:, 1:2] + np.arange(size)[None, :], dev)
            rb = to_device(pick[:, 0], dev)[:, None]
            X[to_device(pick[:, 3], dev), :, j] = torch.einsum("nthd,nthe->nhde", kw[rb, at], vw[rb, at])
    return X


def _carried_reads(o, q, g, level_scales, states, a: int, scale, kernel=False):
    """``o`` (the output of the call from position 0 of a shard at the aligned position ``a``) plus
    the reads of the state ``states (B, H, S, Dk, Dv)`` at ``a``: each token ``t`` adds
    ``scale · exp(G_t) · Σ_j λ[t, j + 1] · X_jᵀ q_t`` over the set bits ``j`` of ``a``, with ``G_t``
    the log-decay summed over the shard's tokens up to ``t``.  With ``kernel``,
    ``hodlr.kernels.carried_reads``; otherwise one ``einsum`` per live slot.  Differentiable."""
    B, T, Hqk, Dk = q.shape
    H, Dv = o.shape[2], o.shape[3]
    G = None if g is None else _cumsum(g.to(states.dtype).transpose(1, 2).contiguous()).transpose(1, 2)
    if kernel:
        from hodlr import kernels

        return kernels.carried_reads(o, q, level_scales, G, states, [a] * B, scale)
    e = torch.full((B, T, H), float(scale), dtype=states.dtype, device=q.device) if G is None else scale * torch.exp(G)
    acc = torch.zeros((B, T, H, Dv), dtype=states.dtype, device=q.device)
    for j in range(states.shape[2]):
        if (a >> j) & 1:
            X = states[:, :, j].reshape(B, Hqk, H // Hqk, Dk, Dv)
            reads = torch.einsum("btkd,bkgde->btkge", q.to(states.dtype), X).flatten(2, 3)
            acc = acc + reads * (e * level_scales[..., j + 1].to(states.dtype))[..., None]
    return (o.to(states.dtype) + acc).to(o.dtype)


@_checks.without_autocast
def segment_state(k, v, g, positions, *, cu_seqlens=None, num_slots=None):
    """The state after the tokens of a call that starts from an all-zero state.

    Equals ``hodlr.log_linear_attn(q, k, v, g, level_scales, initial_state=<zeros at positions>,
    output_final_state=True)[1]`` (which needs no ``q`` or ``level_scales``: the state holds keys
    and values only), without computing an output: a weighted sum of key-value products per Fenwick
    bucket of each sequence's end (``hodlr.kernels.bucket_states`` on CUDA, ``torch.einsum`` on
    the CPU).  What :func:`log_linear_attn` sends across ranks.  Differentiable in ``k, v, g``.

    Parameters
    ----------
    k : torch.Tensor, shape ``(B, T, Hqk, Dk)``
    v : torch.Tensor, shape ``(B, T, H, Dv)``
    g : torch.Tensor, shape ``(B, T, H)``, or None
    positions : torch.Tensor or sequence of int, shape ``(N,)``
        Each sequence's absolute start position (``N = B``, or the sequences of ``cu_seqlens``).
    cu_seqlens : torch.Tensor, shape ``(N + 1,)``, optional
        Packed sequences (``B = 1``), as in :func:`hodlr.log_linear_attn`.
    num_slots : int, optional
        Slots of the state (default: ``bit_length`` of the largest end position).

    Returns
    -------
    hodlr.LogLinearState
        ``(N, H, S, Dk, Dv)`` in float32 (float64 for float64 inputs), at the end positions.

    Examples
    --------
    >>> import torch, hodlr
    >>> from hodlr.distributed import segment_state
    >>> q, k, v = (torch.randn(1, 5, 1, 2, dtype=torch.float64) for _ in range(3))
    >>> lam = torch.rand(1, 5, 1, 4, dtype=torch.float64)
    >>> zero = hodlr.LogLinearState(torch.zeros(1, 1, 3, 2, 2, dtype=torch.float64), torch.tensor([3]))
    >>> _, want = hodlr.log_linear_attn(q, k, v, None, lam, initial_state=zero, output_final_state=True)
    >>> got = segment_state(k, v, None, [3])
    >>> bool(torch.allclose(got.states, want.states)), got.positions.tolist()
    (True, [8])
    """
    from hodlr import ops

    for name, x in (("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.dtype.is_floating_point:
            raise TypeError(f"{name} must be a 4-d floating torch.Tensor (B, T, heads, D), got {describe(x)}")
    B, T, Hqk = k.shape[:3]
    if Hqk < 1 or v.shape[:2] != (B, T) or v.shape[2] % Hqk:
        raise ValueError(f"v must be (B, T, H, Dv) with the B, T of k and H a multiple of k's {Hqk} heads; got k "
                         f"{tuple(k.shape)}, v {tuple(v.shape)}")
    if g is not None and not isinstance(g, torch.Tensor):
        raise TypeError(f"g must be None or a torch.Tensor of shape (B, T, H) = {tuple(v.shape[:3])}, got {describe(g)}")
    if g is not None and tuple(g.shape) != tuple(v.shape[:3]):
        raise ValueError(f"g must be None or a tensor of shape (B, T, H) = {tuple(v.shape[:3])}, got {describe(g)}")
    if v.dtype != k.dtype:
        raise TypeError(f"v has dtype {v.dtype} but k has {k.dtype}; they must match")
    if g is not None and not g.dtype.is_floating_point:
        raise TypeError(f"g must be a floating tensor (a log-decay), got {g.dtype}")
    _checks.check_same_home({"k": k, "v": v, "g": g})
    if cu_seqlens is not None and (not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1
                                   or cu_seqlens.dtype not in (torch.int32, torch.int64)):
        raise TypeError(f"cu_seqlens must be a 1-d int32 or int64 torch.Tensor, got {describe(cu_seqlens)}")
    if cu_seqlens is not None and (B != 1 or len(cu_seqlens) < 2 or int(cu_seqlens[0]) != 0
                                   or int(cu_seqlens[-1]) != T or bool((cu_seqlens[1:] < cu_seqlens[:-1]).any())):
        raise ValueError(f"cu_seqlens must rise from 0 to T={T} over one packed row (B = 1), got "
                         f"{cu_seqlens.tolist()} with B={B}")
    a = np.asarray(positions.tolist() if isinstance(positions, torch.Tensor) else positions)
    if a.dtype.kind not in "iu" and not (a.size == 0 and a.dtype.kind == "f"):
        raise TypeError(f"positions must hold integers (one start position per sequence), got {describe(positions)}")
    a = a.astype(np.int64)
    if cu_seqlens is None:
        rows, begin, length = np.arange(B), np.zeros(B, dtype=np.int64), np.full(B, T, dtype=np.int64)
    else:
        cu = np.asarray(cu_seqlens.tolist(), dtype=np.int64)
        rows, begin, length = np.zeros(len(cu) - 1, dtype=np.int64), cu[:-1], np.diff(cu)
    if a.shape != rows.shape or (a < 0).any():
        raise ValueError(f"positions must hold {len(rows)} start positions >= 0 (one per sequence), got "
                         f"{a.tolist()}")
    end = a + length
    need = fenwick.num_slots(int(end.max(initial=0)))
    S = need if num_slots is None else check_int("num_slots", num_slots)
    if S < need:
        raise ValueError(f"num_slots must be an integer >= {need} (the slots of the largest end position "
                         f"{int(end.max(initial=0))}), got {num_slots!r}")
    X = _segment_states(k, v, g, rows, begin, a, length, S, ops.work_dtype(v.dtype), k.is_cuda)
    return LogLinearState(X, to_device(end, k.device), validate=False)


_COMPILED_OUT = []


@_checks.without_autocast
def log_linear_attn(q, k, v, g, level_scales, initial_state=None, output_final_state=False, cu_seqlens=None,
                    scale=1.0, *, group=None, backend: str = "auto"):
    """:func:`hodlr.log_linear_attn` with the sequence split across the ranks of a process group.

    Call it on every rank of ``group`` with that rank's shard: contiguous, in rank order, any
    lengths (uneven shards and empty ones allowed; the shard lengths are exchanged, see
    :func:`shard_offsets` for an even split).  Rank ``r``'s first token is at global token
    ``offsets[r]`` and levels are those of global positions, so the shards of the output, the
    gradients and the final state equal one call on the whole sequence.

    Parameters
    ----------
    q, k : torch.Tensor, shape ``(B, T_r, Hqk, Dk)``
    v : torch.Tensor, shape ``(B, T_r, H, Dv)``
    g : torch.Tensor, shape ``(B, T_r, H)``, or None
    level_scales : torch.Tensor, shape ``(B, T_r, H, L)``
        This rank's shard (``T_r`` tokens) of :func:`hodlr.log_linear_attn`'s arguments;
        ``L >= num_levels`` of the largest global end position.
    initial_state : hodlr.LogLinearState, optional
        The same on every rank (one row per sequence).  Sequence ``n`` starts from row ``n`` on the
        rank holding its first token (rank 0 without ``cu_seqlens``); the other ranks read its
        positions (and, for the final state, the rows of sequences without tokens).  Its gradient
        accumulates on the ranks that use it: summed over the ranks it is the gradient of the sum of
        every rank's loss (all-reduce it where one copy is kept).
    output_final_state : bool
        Also return the state after every sequence's last token, the same on every rank.  Its
        gradient, like every other, is that of the sum of all ranks' losses: a loss that
        counts it once reads it on one rank.
    cu_seqlens : torch.Tensor, shape ``(N + 1,)``, int32 or int64, optional
        Packed sequences over the *whole* (global) sequence, the same on every rank: ``B = 1``,
        ``cu_seqlens[-1]`` the total length.  A sequence that continues on the next rank carries
        its state there; one that starts on a rank starts from zero (or its initial state).
    scale : float or None, default 1.0
        As :func:`hodlr.log_linear_attn` (same on every rank).
    group : torch.distributed.ProcessGroup, optional
        The ranks that share the sequence, in shard order of their group ranks (default: the
        world).
    backend : str, default ``"auto"``
        The backend of every local call (one with state: ``chunked``, ``fenwick``, ``triton``);
        ``auto`` is :func:`hodlr.log_linear_attn`'s choice for a call with state: ``triton`` on a
        GPU (the Triton kernels start from a state at any position), ``chunked`` on the CPU.  The
        states sent across ranks (:func:`segment_state`) come from ``hodlr.kernels.bucket_states``
        where the local calls run on ``triton``, from ``torch.einsum`` otherwise.

    Returns
    -------
    o : torch.Tensor, shape ``(B, T_r, H, Dv)``
        This rank's shard of the output.
    final_state : hodlr.LogLinearState or None
        With ``max(S, bit_length(largest end position))`` slots.

    Notes
    -----
    Collective: every rank of the group must make the call, in the same order as the other
    collectives, and, when gradients are wanted, run the backward through ``o`` or the final
    state (its backward is a collective too).  Host reads: ``cu_seqlens``, the positions and one
    small ``all_gather`` of the shard lengths and argument checks.  Under ``torch.compile`` the
    call is a graph break (it runs through ``torch.compiler.disable``): the model around it compiles.
    Communication per call: :func:`payload_bytes` per rank (``record_communication`` measures it).
    """
    if torch.compiler.is_compiling():  # leave the call out of the graph (torch._dynamo is loaded by now)
        if not _COMPILED_OUT:
            _COMPILED_OUT.append(torch.compiler.disable(_log_linear_attn))
        return _COMPILED_OUT[0](q, k, v, g, level_scales, initial_state, output_final_state, cu_seqlens, scale,
                                group=group, backend=backend)
    return _log_linear_attn(q, k, v, g, level_scales, initial_state, output_final_state, cu_seqlens, scale,
                            group=group, backend=backend)


def _log_linear_attn(q, k, v, g, level_scales, initial_state, output_final_state, cu_seqlens, scale, *, group,
                     backend):
    """:func:`log_linear_attn` (eager)."""
    import torch.distributed as dist

    from hodlr import ops

    # refused on this rank alone, before any collective: without a process group no other rank can be told
    if dist.is_available() and group is dist.GroupMember.NON_GROUP_MEMBER:
        raise ValueError(f"group: this process (global rank {dist.get_rank()}) is not a member of the group; "
                         f"only the group's ranks may call hodlr.distributed.log_linear_attn with it")
    if group is not None and dist.is_available() and not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed.ProcessGroup or None, got {type(group).__name__}")
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("group: torch.distributed is not initialised; hodlr.distributed.log_linear_attn runs on "
                         "the ranks of a process group (torch.distributed.init_process_group, e.g. under torchrun)")
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    refused = None
    try:  # a rank that refuses its arguments tells the others (no rank waits for it in a collective)
        if not isinstance(backend, str):
            raise TypeError(f"backend must be a string, got {type(backend).__name__}")
        scale, Nseq, output_final_state = ops._check_static(q, k, v, g, level_scales, initial_state,
                                                            output_final_state, cu_seqlens, scale)
        if world > 1 and not registry.has_state(ops._resolve(backend, q.device, q.shape[1], True, dtype=v.dtype)):
            raise BackendUnavailableError(
                f"backend {backend!r} has no recurrent state, which context parallelism needs; use one of "
                f"{', '.join(registry.stateful('attention'))}")
    except (TypeError, ValueError) as err:
        if world == 1:
            raise
        refused = err
    init = None if initial_state is None or refused else initial_state.states
    wants_grad = not refused and _checks.wants_grad(q, k, v, g, level_scales, init)
    if world == 1:
        return ops.log_linear_attn(q, k, v, g, level_scales, initial_state, output_final_state, cu_seqlens, scale,
                                   backend=backend)
    # 0. an aligned shard's local output from position 0 needs nothing from the other ranks: where the
    #    rank can tell before the metadata exchange that its shard will be aligned (_early_call), it is
    #    queued first, and the exchange runs on a side stream (its host read waits for the exchange
    #    alone, not for the local call).  Dropped where the exchange shows otherwise (_early_call_holds).
    early_o = side = None
    if refused is None and _early_call(q, g, level_scales, initial_state, cu_seqlens, output_final_state, wants_grad,
                                       rank, world):
        side = _side_stream(q.device)  # (it follows the work queued before the call, not the local call)
        try:
            early_o = ops.log_linear_attn(q, k, v, g, level_scales, None, False, None, scale, backend=backend)[0]
        except Exception:  # noqa: BLE001 -- no rank may stop before the exchange: the others would wait in it
            early_o = None  # (the regular path makes the same call after the exchange and raises there)
    with contextlib.nullcontext() if side is None else torch.cuda.stream(side):
        offsets, wants_grad, levels = _exchange_metadata(q, v, level_scales, g, initial_state, cu_seqlens,
                                                         output_final_state, wants_grad, scale, backend, group, rank,
                                                         world, refused)
    if not _early_call_holds(offsets, rank, q.shape[1], g, output_final_state, wants_grad):
        early_o = None
    B, T, Hqk, Dk = q.shape
    H, Dv = v.shape[2], v.shape[3]
    work = ops.work_dtype(v.dtype)
    dev = q.device
    S_in = 0 if initial_state is None else initial_state.num_slots
    pos = None if initial_state is None else initial_state.positions
    # (checked with every rank's L, so that every rank raises where one rank's level scales are short:
    # none may go on into the states' all_gather)
    end = ops._check_values(B, offsets[-1], max(levels), cu_seqlens, pos, None if initial_state is None else S_in)
    short = [j for j in range(world) if end >= 1 and levels[j] < fenwick.num_levels(end)]
    if short:
        raise ValueError(f"level_scales must have L >= num_levels({end})={fenwick.num_levels(end)} on every rank (the "
                         f"largest global end position is {end - 1}): rank {short[0]} has L={levels[short[0]]}")
    S = max(S_in, fenwick.num_slots(end))
    start = np.zeros(Nseq, dtype=np.int64) if pos is None else np.asarray(pos.tolist(), dtype=np.int64)
    plan = _plan(offsets, Nseq, None if cu_seqlens is None else cu_seqlens.tolist(), start, output_final_state)
    init_full = None if initial_state is None else initial_state.with_slots(S).states

    # 1. the bucket states at this shard's end of the sequences it sends (its own tokens, plus the
    #    initial state of a sequence that begins here), and their log-decays: no output computed
    local = np.nonzero(plan.length[rank] > 0)[0]
    cu_local = None
    if cu_seqlens is not None:
        cu_local = to_device(np.concatenate([[0], np.cumsum(plan.length[rank, local])]), dev)
    carried = local[plan.first[local] < rank]  # sequences that began on an earlier rank
    send = plan.rows[rank]
    begin = plan.lo[rank, send] - offsets[rank] if cu_seqlens is not None else np.zeros(len(send), dtype=np.int64)
    kernel = getattr(ops._resolve(backend, dev, T, True, dtype=v.dtype), "USES_KERNELS", False)
    aligned = cu_seqlens is None and initial_state is None and fenwick.aligned(int(offsets[rank]), T)
    if early_o is None:
        side = _side_stream(dev) if aligned and len(local) and len(send) else None
    # (with the early call kept, the exchange stays on the side stream even where this rank sends
    # nothing: queued there, the wait for the gradients' reduce-scatter does not hold back the early
    # call's backward on the current stream)
    with contextlib.nullcontext() if side is None else torch.cuda.stream(side):
        # (on a GPU an aligned shard computes the states it sends on a second stream, beside its
        # local call: neither kernel fills the device alone)
        X = _segment_states(k, v, g, np.zeros(len(send), dtype=np.int64) if cu_seqlens is not None else send, begin,
                            plan.a[rank, send], plan.length[rank, send], S, work, kernel)
        A = None
        if g is not None and len(send):
            A = _segments_decay(g.to(work), plan, rank, local, cu_local)[to_device(np.searchsorted(local, send), dev)]
        if init_full is not None and len(send):
            fresh = plan.first[send] == rank
            if fresh.any():  # continue the initial state through this shard's tokens
                start_state = LogLinearState(_live_buckets(init_full, send, plan.a[rank, send]),
                                             to_device(plan.a[rank, send], dev), validate=False)
                end_state = LogLinearState(X, to_device(plan.a[rank, send] + plan.length[rank, send], dev),
                                           validate=False)
                X = torch.where(to_device(fresh, dev)[:, None, None, None, None],
                                combine(start_state, end_state, A, validate=False).states, X)

        # 2. the states every rank needs: one all_gather, started here and waited for after the local
        #    work that does not need them
        K = max(len(r) for r in plan.rows)
        width = H * S * Dk * Dv
        gathered = pending = None
        if K:
            payload = torch.zeros((K, width + (H if g is not None else 0)), dtype=work, device=dev)
            if len(send):
                mine = X.flatten(1) if g is None else torch.cat([X.flatten(1), A], 1)
                payload = torch.cat([mine, payload[len(send):]])
            returned = None
            if wants_grad:
                if not payload.requires_grad:
                    payload.requires_grad_(True)
                payload = _Depend.apply(payload, *[x for x in (q, k, v, g, level_scales, init)
                                                    if x is not None and x.requires_grad])
                returned = _Pending(None, None)
                payload = _AwaitGradient.apply(payload, returned)
            payload = payload.flatten()
            pending = _start_all_gather(payload, group, world, "states")

    # 3. the local call, where it needs no gathered state, runs while the states travel: an aligned
    #    shard (its start a multiple of a power of two covering it) from position 0 (it adds the
    #    reads of the state at its start in step 5: hodlr.kernels.carried_reads), a shard that
    #    continues no earlier rank's sequence from its initial state or zeros.  A rank that reads no
    #    gathered state and has tokens ties the exchange to its log-decay (its backward must run the
    #    collective) and waits for it only after its local call.
    reads = bool(len(carried)) or output_final_state
    unread = pending is not None and wants_grad and not reads and g is not None and len(local) > 0
    g_local = _Unread.apply(g, payload, group, world, "states", returned) if unread else g

    def local_call(carried_state):
        """This shard's output from the state at its start (the folded state of a carried
        sequence, the initial state of one that begins here, zeros otherwise)."""
        state = None
        if init is not None or plan.a[rank, local].any():
            states = torch.zeros((len(local), H, S, Dk, Dv), dtype=work, device=dev)
            begins = plan.first[local] == rank
            if init_full is not None and begins.any():
                mask = to_device(begins, dev)[:, None, None, None, None]
                states = torch.where(mask, init_full[to_device(local, dev)], states)
            if len(carried):
                states = states.index_copy(0, to_device(np.searchsorted(local, carried), dev), carried_state)
            state = LogLinearState(states, to_device(plan.a[rank, local], dev), validate=False)
        return ops.log_linear_attn(q, k, v, g_local, level_scales, state, False, cu_local, scale,
                                   backend=backend)[0]

    early = aligned or not reads
    o = v.new_zeros((B, T, H, Dv))  # (no sequence here: an empty shard, or B = 0)
    if early_o is not None:
        o = early_o
    elif aligned and len(local):
        o, _ = ops.log_linear_attn(q, k, v, g_local, level_scales, None, False, None, scale, backend=backend)
    elif early and len(local):
        o = local_call(None)
    if unread and not _reaches(o, g_local.grad_fn, (q, k, v, level_scales, init)):  # (a backend whose graph skips a log-decay it never reads)
        unread = False  # tie the exchange to the output instead (step 5)
    if side is not None:
        torch.cuda.current_stream(dev).wait_stream(side)
    if pending is not None:
        if reads or (wants_grad and not unread):
            gathered = _Gathered.apply(payload, pending, group, world, "states", returned)
        else:
            pending.wait()

    def piece(j, rows):
        """States and log-decays that rank ``j`` sent for the sequences ``rows`` (all in its list)."""
        at = to_device(np.searchsorted(plan.rows[j], rows), dev)
        block = gathered[j].view(K, -1)[at]
        st = block[:, :width].view(len(rows), H, S, Dk, Dv)
        return st, (None if g is None else block[:, width:])

    # 4. fold the earlier ranks' states into each carried sequence's state at this rank's start
    #    (and, for the final state, every rank's into every sequence's end)
    need = np.arange(Nseq) if output_final_state else carried
    Z = torch.zeros((len(need), H, S, Dk, Dv), dtype=work, device=dev)
    if init_full is not None:  # what a sequence without tokens passes through: its initial state's live buckets
        Z = _live_buckets(init_full, need, plan.start[need])
    Zpos = plan.start[need].copy()
    carried_state = None
    for j in range(world if output_final_state else rank):
        if j == rank and len(carried):
            carried_state = Z[to_device(np.searchsorted(need, carried), dev)]
        rows = np.intersect1d(need, plan.rows[j])
        if not len(rows):
            continue
        at = np.searchsorted(need, rows)
        st, dec = piece(j, rows)
        fresh = plan.first[rows] == j  # (a sequence that begins on rank j: its state is rank j's alone)
        new = st
        if not fresh.all():
            prev = LogLinearState(Z[to_device(at, dev)], to_device(Zpos[at], dev), validate=False)
            new = combine(prev, LogLinearState(st, to_device(plan.a[j, rows] + plan.length[j, rows], dev),
                                               validate=False), dec, validate=False).states
            new = torch.where(to_device(fresh, dev)[:, None, None, None, None], st, new)
        Z = Z.index_copy(0, to_device(at, dev), new)
        Zpos[at] = plan.a[j, rows] + plan.length[j, rows]
    if carried_state is None and len(carried):
        carried_state = Z[to_device(np.searchsorted(need, carried), dev)]

    # 5. this shard's output: the aligned shard's carried reads, or the local call from the folded
    #    state
    if aligned and len(carried):
        o = _carried_reads(o, q, g, level_scales, carried_state, int(offsets[rank]), scale, kernel)
    elif not early and len(local):
        o = local_call(carried_state)
    if gathered is not None and wants_grad and not len(carried):
        o = _Depend.apply(o, gathered)  # every rank's backward reaches the collective
    o = ops._joined(o, q, k, v, g, level_scales)  # an empty shard's output in the graph of its empty inputs
    if not output_final_state:
        return o, None
    return o, LogLinearState(Z, to_device(plan.end, dev), validate=False)
