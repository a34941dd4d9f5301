"""``hodlr.distributed``: context parallelism over torch.distributed (gloo on the CPU).

In one process (hypothesis, float64):

* ``state.combine(state at a, state of [a, b) alone, sum g[a:b])`` equals the final state of one
  call over ``[0, b)`` (``a = 0``, ``a = b``, unaligned splits, sequences at different positions);
* ``segment_state`` (what a rank sends) equals the final state of a call from zeros at the same
  start positions;
* ``shard_offsets``, ``payload_bytes`` and the picture of what crosses ranks.

Spawned gloo groups (``torch.multiprocessing``, one spawn of 8 processes holding groups of 1, 2,
3, 4, 5 and 8 ranks): cases drawn by hypothesis in the parent (uneven and even shards, empty
shards, batches and packed sequences crossing shard boundaries, initial states, final states, decay
none / mild / strong, grouped heads, ``chunked`` and ``fenwick``, float64 and float32; two tiny
float32 cases on ``triton`` under the interpreter) give outputs, final states and gradients (of
``q, k, v, g``, the level scales and the initial state) equal to one single-process call on the
whole sequence; the bytes each rank hands to the states ``all_gather`` (forward) and
``reduce_scatter`` (backward) equal :func:`hodlr.distributed.payload_bytes`; arguments that disagree
across ranks, or that one rank refuses, raise on every rank (no rank waits in a collective); a
``torch.compile``d function around the call (a graph break) gives the eager values and gradients;
the benchmark (``hodlr bench-cp``) runs its code path at toy sizes on 4 ranks.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import Phase, example, given, settings, strategies as st

import hodlr
from hodlr import fenwick
from hodlr.distributed import payload_bytes, segment_state, shard_offsets
from hodlr.state import LogLinearState, combine
from hodlr.testing import TOLERANCES, decay_values, relative_error

TOL = TOLERANCES["cpu_float64"]
DT = torch.float64

INTERP = hodlr.backends.load("triton").unavailable_reason("torch", torch.device("cpu")) is None
"""Whether the Triton kernels run on CPU tensors here (the interpreter): their cases below need it."""


# -- inputs ------------------------------------------------------------------------------------
def make_inputs(seed, B, T, Hqk, grp, Dk, Dv, decay, positions, L, dtype=DT):
    """fla-layout inputs; ``positions (B, T)`` the absolute position of every token (NaN in the
    level scales it never reads)."""
    rng = np.random.default_rng(seed)
    H = Hqk * grp
    q, k = (torch.tensor(rng.standard_normal((B, T, Hqk, Dk)), dtype=dtype) for _ in range(2))
    v = torch.tensor(rng.standard_normal((B, T, H, Dv)), dtype=dtype)
    lam = rng.uniform(0.3, 1.5, (B, T, H, L)) * rng.choice([-1.0, 1.0], (B, T, H, L), p=[0.2, 0.8])
    lev = np.arange(L)
    read = (lev == 0) | (((positions[:, :, None] >> np.maximum(lev - 1, 0)) & 1) == 1)
    lam = torch.tensor(np.where(read[:, :, None, :], lam, np.nan))
    g = decay_values(rng, decay, (B, T, H))
    g = None if g is None else torch.tensor(g)
    if dtype != DT:
        lam, g = lam.float(), None if g is None else g.float()
    return q, k, v, g, lam


def random_state(seed, N, H, Dk, Dv, positions, slots, dtype=DT):
    """Bucket states for ``positions``: random where live, 0 elsewhere."""
    rng = np.random.default_rng(seed)
    states = rng.standard_normal((N, H, slots, Dk, Dv))
    live = (np.asarray(positions)[:, None] >> np.arange(slots)[None, :]) & 1
    return LogLinearState(torch.tensor(states * live[:, None, :, None, None], dtype=dtype), torch.tensor(positions))


# -- combine ------------------------------------------------------------------------------------
@settings(max_examples=15, deadline=None)
@given(ends=st.lists(st.tuples(st.one_of(st.sampled_from([0, 1, 7, 8, 31, 32, 33, 64]), st.integers(0, 90)),
                               st.one_of(st.sampled_from([0, 1, 2, 31, 32, 33]), st.integers(0, 60))),
                     min_size=1, max_size=3),
       decay=st.sampled_from(["none", "mild", "strong"]), backend=st.sampled_from(["chunked", "fenwick"]),
       seed=st.integers(0, 2**31))
def test_combine_equals_one_call(ends, decay, backend, seed):
    """Per sequence ``n``: the state at ``a_n`` (one call over ``[0, a_n)``) combined with the state
    of ``[a_n, b_n)`` (a call from zeros at ``a_n``) is the state of one call over ``[0, b_n)``."""
    a = [x for x, _ in ends]
    b = [x + y for x, y in ends]
    N, Hqk, grp, Dk, Dv = len(ends), 1, 2, 2, 3
    H = Hqk * grp
    T = max(max(b), 1)
    pos = np.broadcast_to(np.arange(T), (N, T))
    q, k, v, g, lam = make_inputs(seed, N, T, Hqk, grp, Dk, Dv, decay, pos, fenwick.num_levels(T) + 1)
    lengths = torch.tensor(b)
    # every sequence packed from position 0 (its own tokens), at a, then [a, b) from zeros at a
    S = max(1, T.bit_length())

    def run(lo, hi, start):
        cu = torch.tensor(np.concatenate([[0], np.cumsum(np.subtract(hi, lo))]))
        parts = [[x[n:n + 1, lo[n]:hi[n]] for n in range(N)] for x in (q, k, v, g, lam) if x is not None]
        packed = [torch.cat(p, 1) for p in parts]
        if g is None:
            packed.insert(3, None)
        state = LogLinearState(torch.zeros(N, H, S, Dk, Dv, dtype=DT), torch.tensor(start))
        _, fin = hodlr.log_linear_attn(*packed, initial_state=state, output_final_state=True, cu_seqlens=cu,
                                       backend=backend)
        return fin

    whole = run([0] * N, b, [0] * N)
    head = run([0] * N, a, [0] * N)
    tail = run(a, b, a)
    sums = None if g is None else torch.stack([g[n, a[n]:b[n]].sum(0) for n in range(N)])
    got = combine(head, tail, sums)
    assert got.positions.tolist() == whole.positions.tolist() == b
    assert relative_error(got.states, whole.states) <= TOL
    assert lengths.tolist() == b


def test_combine_checks():
    s = LogLinearState.zeros(2, 1, 2, 2, slots=3)
    later = LogLinearState(torch.zeros(2, 1, 3, 2, 2), torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="second must be at or after first: sequence 0 has first.positions = 1"):
        combine(later, s)
    with pytest.raises(ValueError, match=r"log_decay must be a tensor of shape \(N, H\) = \(2, 1\)"):
        combine(s, later, torch.zeros(2))
    with pytest.raises(ValueError, match=r"second must have the \(N, H, Dk, Dv\) of first"):
        combine(s, LogLinearState.zeros(2, 2, 2, 2, slots=3))
    with pytest.raises(TypeError, match="first must be a hodlr.LogLinearState"):
        combine(s.states, s)


# -- the states a rank sends -------------------------------------------------------------------
@settings(max_examples=15, deadline=None)
@given(B=st.integers(1, 3), T=st.sampled_from([1, 2, 3, 17, 63, 65, 70]), decay=st.sampled_from(["none", "mild",
                                                                                                   "strong"]),
       starts=st.lists(st.one_of(st.sampled_from([0, 1, 2, 64, 96, 127]), st.integers(0, 200)), min_size=3,
                       max_size=3),
       packed=st.booleans(), seed=st.integers(0, 2**31))
@example(B=1, T=65, decay="strong", starts=[0, 0, 0], packed=False, seed=11021261)  # dg of norm 3e-8, 1e-16 apart
def test_segment_state_is_the_final_state_from_zeros(B, T, decay, starts, packed, seed):
    """``segment_state`` equals the final state of a call from an all-zero state at the same start
    positions (values and the gradients of k, v, g), for batches and packed sequences.  The
    gradients are compared as one vector: under a strong decay the gradient of g nearly cancels
    (a norm of 1e-8 from terms of size 1, whose rounding leaves 1e-16 apart), so it is judged at
    the scale the whole computation rounds at, not at its own."""
    a = np.array(starts[:B])
    Hqk, grp, Dk, Dv = 2, 2, 2, 3
    pos = a[:, None] + np.arange(T)[None, :]
    L = fenwick.num_levels(int(pos.max()) + 1) + 1
    q, k, v, g, lam = make_inputs(seed, B, T, Hqk, grp, Dk, Dv, decay, pos, L)
    cu = None
    if packed:  # the B rows as B sequences of one packed row, their lengths T, T - 1, ...
        keep = [T - min(n, T - 1) for n in range(B)]
        cu = torch.tensor(np.concatenate([[0], np.cumsum(keep)]))
        q, k, v, lam = (torch.cat([x[n:n + 1, :keep[n]] for n in range(B)], 1) for x in (q, k, v, lam))
        g = None if g is None else torch.cat([g[n:n + 1, :keep[n]] for n in range(B)], 1)
    leaves = [x.requires_grad_() for x in (k, v, g) if x is not None]
    S = int((a + T).max()).bit_length()
    zero = LogLinearState(torch.zeros(B, Hqk * grp, S, Dk, Dv, dtype=DT), torch.tensor(a))
    _, want = hodlr.log_linear_attn(q, k, v, g, lam, initial_state=zero, output_final_state=True, cu_seqlens=cu)
    got = segment_state(k, v, g, a, cu_seqlens=cu, num_slots=S)
    assert got.positions.tolist() == want.positions.tolist()
    assert relative_error(got.states, want.states) <= TOL
    w = torch.randn_like(want.states)
    flat = lambda grads: torch.cat([x.flatten() for x in grads])  # noqa: E731
    assert relative_error(flat(torch.autograd.grad((got.states * w).sum(), leaves)),
                          flat(torch.autograd.grad((want.states * w).sum(), leaves))) <= 1e-10


@pytest.mark.parametrize("case", [
    # B, T, Hqk, H, Dk, Dv, sequences (row, first token, start position, length), slots, dtype, decay
    (2, 70, 1, 2, 16, 16, [(0, 0, 5, 70), (1, 0, 64, 70)], 8, torch.float64, True),
    (1, 90, 2, 4, 80, 24, [(0, 0, 0, 30), (0, 30, 7, 1), (0, 31, 100, 59)], 8, torch.float64, True),
    (2, 33, 1, 1, 16, 16, [(1, 0, 0, 33)], 6, torch.float64, False),
    (1, 300, 1, 2, 16, 16, [(0, 0, 3, 300)], 9, torch.float32, True),
])
@pytest.mark.interpreter
def test_bucket_states_kernel_equals_einsum(case, monkeypatch):
    """The Triton bucket-state kernels (interpreter; pieces of 64 tokens, so that long buckets are
    cut; scratch gradient buffers NaN-filled) equal the einsum path: values and the gradients of
    k, v, g, with grouped heads, several sequences of a packed row, two Dk tiles and no decay."""
    from hodlr import kernels
    from hodlr.distributed import _segment_states

    bucket_module = importlib.import_module("hodlr.kernels.bucket_states")
    monkeypatch.setattr(bucket_module, "PIECE", 64)
    monkeypatch.setattr(bucket_module, "scratch", lambda shape, dtype, device: torch.full(
        shape, float("nan"), dtype=dtype, device=device))
    assert kernels.interpreting()
    B, T, Hqk, H, Dk, Dv, seqs, S, dtype, decay = case
    rows, begin, a, length = (np.array(c) for c in zip(*seqs))
    torch.manual_seed(len(seqs) + T)
    k = torch.randn(B, T, Hqk, Dk, dtype=dtype, requires_grad=True)
    v = torch.randn(B, T, H, Dv, dtype=dtype, requires_grad=True)
    g = (-0.1 * torch.rand(B, T, H, dtype=dtype)).requires_grad_() if decay else None
    leaves = [x for x in (k, v, g) if x is not None]
    results = []
    for kernel in (False, True):
        X = _segment_states(k, v, g, rows, begin, a, length, S, dtype, kernel)
        w = torch.linspace(-1, 1, X.numel(), dtype=dtype).view(X.shape)
        results.append((X, torch.autograd.grad((X * w).sum(), leaves)))
    (want, want_grads), (got, got_grads) = results
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert relative_error(got, want) <= tol
    for x, y in zip(got_grads, want_grads):
        assert relative_error(x, y) <= tol


@pytest.mark.parametrize("case", [
    # B, T, Hqk, H, Dk, Dv, position, dtype, decay
    (1, 1, 1, 1, 16, 16, 4, torch.float64, True),
    (2, 5, 1, 1, 16, 16, 0, torch.float64, True),
    (1, 40, 2, 2, 16, 24, 64 * 3, torch.float64, True),
    (2, 3, 1, 2, 16, 16, 12, torch.float64, True),
    (1, 63, 2, 4, 16, 32, 64 * 3, torch.float64, True),
    (1, 65, 1, 1, 80, 72, 128 * 5, torch.float64, False),
    (1, 64, 1, 2, 16, 16, 64 * 5, torch.float32, True),
])
def test_aligned_shard_is_the_call_from_position_0_plus_the_carried_reads(case, monkeypatch):
    """A shard at an aligned position ``a`` (a multiple of a power of two covering it): the call
    from position 0 plus the carried reads (``_carried_reads``, einsum and the Triton kernels under
    the interpreter, scratch buffers NaN-filled, level scales of dead slots NaN, the backward's
    stretches cut short so that several programs add to the state gradient) equals the call from
    the state at ``a``: outputs and the gradients of q, k, v, g, level_scales and the state."""
    from hodlr.distributed import _carried_reads

    carried_module = importlib.import_module("hodlr.kernels.carried_reads")
    monkeypatch.setattr(carried_module, "scratch", lambda shape, dtype, device: torch.full(
        shape, float("nan"), dtype=dtype, device=device))
    monkeypatch.setattr(carried_module, "STRETCH", 32)
    monkeypatch.setattr(carried_module, "BACKWARD_ROWS", 16)
    B, T, Hqk, H, Dk, Dv, a, dtype, decay = case
    assert fenwick.aligned(a, T) and (T == 1 or not fenwick.aligned(a + 1, T))
    S = (a + T).bit_length()
    L = fenwick.num_levels(a + T)
    torch.manual_seed(T + a)
    q, k = (torch.randn(B, T, Hqk, Dk, dtype=dtype) for _ in range(2))
    v = torch.randn(B, T, H, Dv, dtype=dtype)
    lam = torch.rand(B, T, H, L, dtype=dtype) + 0.5
    g = -0.2 * torch.rand(B, T, H, dtype=dtype) if decay else None
    X = torch.randn(B, H, S, Dk, Dv, dtype=dtype)
    X[:, :, [j for j in range(S) if not (a >> j) & 1]] = 0.0  # dead buckets: empty
    w = torch.randn(B, T, H, Dv, dtype=dtype)
    results = []
    for how in ("state", "einsum") + (("kernel",) if INTERP else ()):  # float64: the kernels under the interpreter
        leaves = [None if x is None else x.clone().requires_grad_() for x in (q, k, v, g, lam, X)]
        qq, kk, vv, gg, ll, XX = leaves
        if how == "state":
            o, _ = hodlr.log_linear_attn(qq, kk, vv, gg, ll, LogLinearState(XX, torch.full((B,), a)),
                                         backend="chunked")
        else:
            read = ll.clone()
            with torch.no_grad():  # the level scales of dead slots: never read
                read[..., [j + 1 for j in range(S - 1) if not (a >> j) & 1]] = float("nan")
            o, _ = hodlr.log_linear_attn(qq, kk, vv, gg, ll, backend="chunked")
            o = _carried_reads(o, qq, gg, read, XX, a, 1.0, how == "kernel")
        wrt = [x for x in leaves if x is not None]
        results.append((o, torch.autograd.grad((o * w).sum(), wrt, allow_unused=True)))
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    (want, want_grads) = results[0]
    for got, got_grads in results[1:]:
        assert relative_error(got, want) <= tol
        for x, y in zip(got_grads, want_grads):
            if x is None or y is None:  # (a state with no live bucket is read by no form)
                assert all(z is None or not z.any() for z in (x, y))
                continue
            assert not (torch.isnan(x).any() or torch.isnan(y).any())
            assert relative_error(x, y) <= (tol if dtype == torch.float64 else 1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T, a, D", [(3000, 4096 * 3, 64), (1000, 1024 * 5, 128), (9000, 16384, 64)])
def test_carried_reads_on_gpu(dtype, T, a, D):
    """The carried reads' kernels on the GPU (tensor-core dots, several stretches, one or two live
    slots, head widths of one and two tiles) against the einsum form in float64: output and every
    gradient, within float32's 1e-5 or, for bfloat16 inputs, 1e-2."""
    from hodlr.distributed import _carried_reads

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    B, H = 2, 4
    S, L = (a + T).bit_length(), fenwick.num_levels(a + T)
    gen = torch.Generator(device="cuda").manual_seed(T)
    q, o, w = (torch.randn(B, T, H, D, device="cuda", generator=gen) for _ in range(3))
    g = -0.05 * torch.rand(B, T, H, device="cuda", generator=gen)
    lam = torch.rand(B, T, H, L, device="cuda", generator=gen) + 0.5
    X = torch.randn(B, H, S, D, D, device="cuda", generator=gen) / D
    q, o = q.to(dtype), o.to(dtype)  # (the reference reads the same values)
    results = []
    for work, kernel in ((torch.float64, False), (dtype, True)):
        state = torch.float64 if work == torch.float64 else torch.float32  # (the decay, scales and state)
        leaves = [x.to(t).clone().requires_grad_() for x, t in zip((o, q, g, lam, X), (work, work, state, state, state))]
        out = _carried_reads(*leaves, a, 0.7, kernel)
        results.append((out, torch.autograd.grad((out.double() * w.double()).sum(), leaves)))
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    (want, want_grads), (got, got_grads) = results
    assert relative_error(got, want) <= tol
    for name, x, y in zip(("o", "q", "g", "level_scales", "states"), got_grads, want_grads):
        assert relative_error(x, y) <= tol, name


def test_carried_reads_refuses_bad_positions():
    from hodlr import kernels

    q, o = torch.zeros(1, 4, 1, 2), torch.zeros(1, 4, 1, 2)
    lam, X = torch.zeros(1, 4, 1, 5), torch.zeros(1, 1, 4, 2, 2)
    with pytest.raises(ValueError, match="each a multiple of a power of two >= T=4"):
        kernels.carried_reads(o, q, lam, None, X, [6], 1.0)
    with pytest.raises(ValueError, match="states has 4 slots and level_scales 5 levels"):
        kernels.carried_reads(o, q, lam, None, X, [16], 1.0)


def test_segment_state_refuses_bad_input():
    k, v = torch.zeros(1, 4, 1, 2), torch.zeros(1, 4, 2, 3)
    with pytest.raises(TypeError, match="k must be a 4-d floating torch.Tensor"):
        segment_state(k[0], v, None, [0])
    with pytest.raises(ValueError, match="v must be .B, T, H, Dv. with the B, T of k"):
        segment_state(k, v[:, :3], None, [0])
    with pytest.raises(ValueError, match=r"g must be None or a tensor of shape \(B, T, H\) = \(1, 4, 2\)"):
        segment_state(k, v, torch.zeros(1, 4), [0])
    with pytest.raises(ValueError, match="cu_seqlens must rise from 0 to T=4"):
        segment_state(k, v, None, [0, 0], cu_seqlens=torch.tensor([0, 3, 2]))
    with pytest.raises(ValueError, match="positions must hold 2 start positions >= 0"):
        segment_state(k, v, None, [0], cu_seqlens=torch.tensor([0, 1, 4]))
    with pytest.raises(TypeError, match="cu_seqlens must be a 1-d int32 or int64 torch.Tensor, got list"):
        segment_state(k, v, None, [0, 0], cu_seqlens=[0, 2, 4])
    with pytest.raises(TypeError, match="cu_seqlens must be a 1-d int32 or int64 torch.Tensor"):
        segment_state(k, v, None, [0, 0], cu_seqlens=torch.tensor([0.0, 2.0, 4.0]))
    for positions in (None, [1.7]):
        with pytest.raises(TypeError, match="positions must hold integers"):
            segment_state(k, v, None, positions)
    with pytest.raises(ValueError, match=r"num_slots must be an integer >= 4 \(the slots of the largest end position 11\)"):
        segment_state(k, v, None, [7], num_slots=1)
    with pytest.raises(TypeError, match="k must be a 4-d floating torch.Tensor"):
        segment_state(k.long(), v, None, [0])
    with pytest.raises(ValueError, match="H a multiple of k's 0 heads"):
        segment_state(k[:, :, :0], v, None, [0])
    with pytest.raises(TypeError, match="v has dtype torch.float64 but k has torch.float32"):
        segment_state(k, v.double(), None, [0])
    with pytest.raises(TypeError, match="g must be a floating tensor .a log-decay., got torch.int64"):
        segment_state(k, v, torch.zeros(1, 4, 2, dtype=torch.int64), [0])
    with pytest.raises(ValueError, match="g is on device meta but k is on cpu"):
        segment_state(k, v, torch.zeros(1, 4, 2, device="meta"), [0])


# -- small pieces -----------------------------------------------------------------------------
@pytest.mark.parametrize("rank, world, T, grad, decay, final, early", [
    (1, 2, 8, True, True, False, True),     # a later rank: its shard reads the earlier ranks' states
    (3, 4, 8, True, True, False, True),
    (1, 2, 6, True, True, False, False),    # 6 tokens at 6: not aligned
    (0, 2, 8, True, True, False, False),    # the first rank with gradients and a decay: g ties the exchange
    (0, 2, 8, False, True, False, True),    # ... without gradients
    (0, 2, 8, True, False, False, True),    # ... without decay
    (0, 2, 8, True, True, True, True),      # ... with the final state
    (1, 2, 0, True, True, False, False),    # an empty shard
])
def test_early_local_call_decision(rank, world, T, grad, decay, final, early):
    """Which rank queues its local call before the metadata exchange (hodlr.distributed._early_call)."""
    from hodlr.distributed import _early_call

    q = torch.zeros(1, T, 1, 2)
    g = torch.zeros(1, T, 1) if decay else None
    lam = torch.zeros(1, T, 1, fenwick.num_levels(max(world * T, 1)))
    assert _early_call(q, g, lam, None, None, final, grad, rank, world) is early
    assert not _early_call(q, g, lam[..., :1], None, None, final, grad, rank, world)  # level scales too few
    assert not _early_call(q, g, lam, None, torch.tensor([0, T]), final, grad, rank, world)  # cu_seqlens


@pytest.mark.parametrize("offsets, rank, T, grad, decay, final, holds", [
    ([0, 8, 16], 1, 8, True, True, False, True),    # as an even split
    ([0, 24, 32], 1, 8, True, True, False, True),   # aligned at 24 too
    ([0, 4, 12], 1, 8, True, True, False, False),   # starts at 4: not aligned
    ([0, 0, 8], 1, 8, True, True, False, False),    # first with tokens, gradients wanted somewhere, a decay
    ([0, 0, 8], 1, 8, False, True, False, True),    # ... no gradients anywhere
    ([0, 8, 16], 0, 8, True, True, False, False),   # the first rank where another rank wants gradients
    ([0, 8, 16], 0, 8, True, True, True, True),     # ... with the final state (its call reads the exchange)
])
def test_early_local_call_kept_or_dropped(offsets, rank, T, grad, decay, final, holds):
    """After the exchange the early call is kept only where it is the call the regular path makes
    (hodlr.distributed._early_call_holds)."""
    from hodlr.distributed import _early_call_holds

    g = torch.zeros(1, T, 1) if decay else None
    assert _early_call_holds(offsets, rank, T, g, final, grad) is holds


def test_shard_offsets_and_payload():
    assert shard_offsets(10, 4) == [0, 3, 6, 8, 10]
    assert shard_offsets(3, 5) == [0, 1, 2, 3, 3, 3]
    assert shard_offsets(0, 2) == [0, 0, 0]
    with pytest.raises(ValueError, match="world_size must be an integer >= 1, got 0"):
        shard_offsets(4, 0)
    with pytest.raises(TypeError, match="T must be an integer >= 0, got float"):
        shard_offsets(4.0, 2)
    assert payload_bytes(2, 3, 4, 5, 6, decay=False, itemsize=8) == 2 * 3 * 4 * 5 * 6 * 8
    assert payload_bytes(1, 16, 21, 64, 64) == 16 * (21 * 64 * 64 + 1) * 4
    with pytest.raises(ValueError, match="rows must be an integer >= 0, got -1"):
        payload_bytes(-1, 2, 3, 4, 4)


@settings(max_examples=10, deadline=None)
@given(lengths=st.lists(st.integers(0, 40), min_size=1, max_size=5).filter(lambda x: sum(x) > 0))
def test_picture_of_what_crosses_ranks(lengths):
    """The buckets a rank sends tile its shard; those it composes tile everything before it."""
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    from hodlr.plotting import plot_context_parallel

    offsets = np.concatenate([[0], np.cumsum(lengths)]).tolist()
    fig = Figure()
    left, right = plot_context_parallel(offsets, axes=fig.subplots(1, 2))
    for kind, want in (("sent", lengths), ("composed", offsets[:-1])):
        spans = sorted((p.get_x(), p.get_y(), p.get_width()) for p in right.patches if p.get_gid().startswith(kind))
        per_rank = [sum(w for x, y, w in spans if int(y) // 2 == r) for r in range(len(lengths))]
        assert per_rank == list(want)
    assert sum(line.get_gid() == "shard-boundary" for line in left.lines) == 2 * (len(lengths) - 1)


# -- spawned groups ---------------------------------------------------------------------------
@st.composite
def cases(draw, size):
    """One context-parallel call on a group of ``size`` ranks, with its single-process reference
    drawn later from ``seed``."""
    if draw(st.booleans(), label="even shards"):
        T = draw(st.integers(1, 40 * size))
        lengths = np.diff(shard_offsets(T, size)).tolist()
    else:
        lengths = draw(st.lists(st.one_of(st.sampled_from([0, 1, 2, 3, 31, 32, 33, 64, 65]), st.integers(0, 70)),
                                min_size=size, max_size=size), label="shard lengths")
    T = sum(lengths)
    if T == 0:
        lengths[-1] = T = 1
    packed = draw(st.booleans(), label="packed")
    cuts = sorted(draw(st.lists(st.integers(0, T), max_size=4), label="cuts")) if packed else []
    nseq = len(cuts) + 1 if packed else draw(st.integers(1, 2), label="B")
    init = draw(st.booleans(), label="initial state")
    return dict(
        lengths=lengths, cu=[0, *cuts, T] if packed else None, nseq=nseq,
        heads=draw(st.sampled_from([(1, 1), (1, 2), (2, 1)]), label="heads"),
        Dk=draw(st.integers(1, 3), label="Dk"), Dv=draw(st.integers(1, 3), label="Dv"),
        decay=draw(st.sampled_from(["none", "mild", "strong"]), label="decay"),
        starts=draw(st.lists(st.one_of(st.sampled_from([0, 1, 5, 64]), st.integers(0, 150)), min_size=nseq,
                             max_size=nseq), label="starts") if init else None,
        final=draw(st.booleans(), label="final state"),
        scale=draw(st.sampled_from([1.0, 0.5, None]), label="scale"),
        backend=draw(st.sampled_from(["chunked", "chunked", "fenwick"]), label="backend"),
        dtype=draw(st.sampled_from(["float64", "float64", "float64", "float32"]), label="dtype"),
        seed=draw(st.integers(0, 2**31), label="seed"))


def reference(case):
    """Inputs, loss weights and the single-process results of ``case`` on the whole sequence."""
    dtype = getattr(torch, case["dtype"])
    T, N = sum(case["lengths"]), case["nseq"]
    Hqk, grp = case["heads"]
    H = Hqk * grp
    starts = np.zeros(N, dtype=np.int64) if case["starts"] is None else np.array(case["starts"])
    if case["cu"] is None:
        B, pos = N, starts[:, None] + np.arange(T)[None, :]
    else:
        cu = np.array(case["cu"])
        seq = np.searchsorted(cu, np.arange(T), side="right") - 1
        B, pos = 1, (starts[seq] + np.arange(T) - cu[seq])[None, :]
    end = int((pos.max(initial=0) + 1) if T else 1)
    L = fenwick.num_levels(max(end, int(starts.max(initial=0)) + 1)) + 1
    args = list(make_inputs(case["seed"], B, T, Hqk, grp, case["Dk"], case["Dv"], case["decay"], pos, L, dtype))
    state = None
    if case["starts"] is not None:
        S = max(1, int(starts.max()).bit_length())
        state = random_state(case["seed"] + 1, N, H, case["Dk"], case["Dv"], starts, S,
                             hodlr.ops.work_dtype(dtype))
    leaves = [None if x is None else x.clone().requires_grad_() for x in args]
    init = None if state is None else LogLinearState(state.states.clone().requires_grad_(), state.positions)
    cu = None if case["cu"] is None else torch.tensor(case["cu"])
    o, fin = hodlr.log_linear_attn(*leaves, initial_state=init, output_final_state=case["final"], cu_seqlens=cu,
                                   scale=case["scale"], backend=case["backend"])
    gen = torch.Generator().manual_seed(case["seed"])
    w = torch.randn(o.shape, generator=gen, dtype=o.dtype)
    loss = (o * w).sum()
    wf = None
    if case["final"]:
        wf = torch.randn(fin.states.shape, generator=gen, dtype=fin.dtype)
        loss = loss + (fin.states * wf).sum()
    wrt = [x for x in leaves + [None if init is None else init.states] if x is not None]
    # (a state every sequence starts at position 0 from has no live bucket: nothing reads it)
    grads = [torch.zeros_like(x) if d is None else d
             for x, d in zip(wrt, torch.autograd.grad(loss, wrt, allow_unused=True))]
    return dict(args=args, state=None if state is None else (state.states, state.positions), cu=cu, w=w, wf=wf,
                o=o.detach(), final=None if fin is None else (fin.states.detach(), fin.positions),
                grads=[torch.nan_to_num(x) for x in grads])


def expected_payload(case):
    """The states payload per rank from the formula: rows = the most sequences any rank sends
    (its sequences that continue on a later rank; with a final state, all it holds tokens of)."""
    o = np.concatenate([[0], np.cumsum(case["lengths"])])
    T = o[-1]
    seqs = [(0, T)] * case["nseq"] if case["cu"] is None else list(zip(case["cu"][:-1], case["cu"][1:]))
    rows = 0
    for r in range(len(case["lengths"])):
        held = [(s0, s1) for s0, s1 in seqs if min(s1, o[r + 1]) > max(s0, o[r])]
        rows = max(rows, len(held) if case["final"] else sum(s1 > o[r + 1] for _, s1 in held))
    if rows == 0 or len(case["lengths"]) == 1:
        return 0
    S = max(0 if case["starts"] is None else max(1, max(case["starts"]).bit_length()),
            int(max((s1 - s0) + (0 if case["starts"] is None else case["starts"][i])
                    for i, (s0, s1) in enumerate(seqs))).bit_length())
    Hqk, grp = case["heads"]
    return payload_bytes(rows, Hqk * grp, S, case["Dk"], case["Dv"], decay=case["decay"] != "none",
                         itemsize=8 if case["dtype"] == "float64" else 4)


def _errors(got, want, sl=slice(None)):
    """The error of a shard's gradient ``got`` (the rows ``sl`` of the whole sequence's ``want``)
    measured on the whole: ``want`` with those rows replaced by ``got``, against ``want``.  A shard
    whose own gradient nearly cancels (a strong decay leaves 1e-10 of terms of size 1) is judged at
    the scale the whole computation rounds at, not at its own."""
    want = torch.nan_to_num(want)
    if got.shape != want[:, sl].shape or torch.isnan(got).any():  # a NaN gradient fails
        return math.inf
    whole = want.clone()
    whole[:, sl] = got
    return relative_error(whole, want)


def _run_case(case, ref, group, grank, size):
    """This rank's part of one case: errors against the reference, and the recorded bytes."""
    import torch.distributed as dist

    off = np.concatenate([[0], np.cumsum(case["lengths"])]).tolist()
    sl = slice(off[grank], off[grank + 1])
    grads = grank not in case.get("no_grad_ranks", ())  # (ranks whose inputs want no gradient)
    shard = [None if x is None else x[:, sl].clone().requires_grad_(grads) for x in ref["args"]]
    init = None
    if ref["state"] is not None:
        init = LogLinearState(ref["state"][0].clone().requires_grad_(), ref["state"][1])
    with hodlr.distributed.record_communication() as rec:
        o, fin = hodlr.distributed.log_linear_attn(*shard, initial_state=init, output_final_state=case["final"],
                                                   cu_seqlens=ref["cu"], scale=case["scale"], group=group,
                                                   backend=case["backend"])
        o.mul_(1.0)  # the output is the caller's to modify in place (no view of an autograd function)
        loss = (o * ref["w"][:, sl]).sum()
        if case["final"] and grank == size - 1:  # counted once: on the last rank
            loss = loss + (fin.states * ref["wf"]).sum()
        if grads or loss.requires_grad:  # (an empty shard whose inputs want gradients is in the graph too)
            loss.backward()
    errors = {"o": relative_error(o, ref["o"][:, sl])}
    if case["final"]:
        errors["final"] = relative_error(fin.states, ref["final"][0])
        errors["positions"] = float(fin.positions.tolist() != ref["final"][1].tolist())
    leaves = [x for x in shard if x is not None]
    names = [n for n, x in zip("q k v g level_scales".split(), shard) if x is not None]
    for name, x, want in zip(names, leaves, ref["grads"]):
        if not grads:
            break
        got = torch.zeros_like(x) if x.grad is None else x.grad
        errors["d" + name] = _errors(got, want, sl)
    if init is not None:
        got = (torch.zeros_like(init.states) if init.states.grad is None else init.states.grad).contiguous().clone()
        dist.all_reduce(got, group=group)
        errors["dinitial_state"] = _errors(got, ref["grads"][-1])
    return {"errors": errors, "forward": rec.total("payload", "states", "forward"),
            "backward": rec.total("payload", "states", "backward"), "calls": len(rec.entries)}


def _bad_inputs(group, grank):
    """Arguments the ranks disagree on, or that one rank refuses: every rank raises."""
    out = []
    x = torch.randn(1, 4, 2, 3, dtype=DT)
    lam = torch.rand(1, 4, 2, 5, dtype=DT)
    for kind in ("heads", "refused", "cu_seqlens", "narrow", "one narrow", "stateless backend", "backend type",
                 "scale", "backend name", "cu_seqlens differ", "positions differ", "grad mode"):
        q, v, level_scales, cu, backend, scale, state = x, x, lam, None, "auto", None, None
        if kind == "scale":
            scale = 0.25 if grank == 1 else 0.5
        if kind == "backend name" and grank == 1:
            backend = "fenwick"
        if kind == "cu_seqlens differ":
            cu = torch.tensor([0, 3, 6, 8] if grank == 1 else [0, 3, 5, 8])
        if kind == "positions differ":
            state = LogLinearState.zeros(1, 2, 3, 3, slots=3, dtype=DT)
            state.positions.fill_(5 if grank == 1 else 3)
        if kind == "stateless backend":
            backend = "dense"
        if kind == "backend type" and grank == 1:
            backend = None
        if kind == "heads" and grank == 1:
            v, level_scales = torch.cat([x, x], 2), torch.cat([lam, lam], 2)
        if kind == "refused" and grank == 1:
            q = x[0]
        if kind == "cu_seqlens":
            cu = torch.tensor([0, 3, 5])
        if kind == "narrow" or (kind == "one narrow" and grank == 1):
            level_scales = lam[..., :2]
        if kind == "grad mode":  # rank 1 wants gradients, rank 0 calls under no_grad
            q = x.clone().requires_grad_()
        try:
            with torch.no_grad() if kind == "grad mode" and grank == 0 else contextlib.nullcontext():
                hodlr.distributed.log_linear_attn(q, x, v, None, level_scales, state, cu_seqlens=cu, scale=scale,
                                                  group=group, backend=backend)
            out.append((kind, "no error"))
        except (TypeError, ValueError) as err:
            out.append((kind, f"{type(err).__name__}: {err}"))
    return out


def _training_hazards(group, grank):
    """What a training loop can do that must not hang or desynchronise the ranks: a backend whose
    graph never reaches a rank's log-decay (``fenwick`` on pieces of one token: the exchange is tied
    to the output instead), autocast, a second-order backward, nested recorders."""
    import torch.distributed as dist

    out = {}
    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, 3, 1, 2, dtype=DT, generator=gen) for _ in range(3))
    g, lam = -torch.rand(1, 3, 1, dtype=DT, generator=gen), torch.rand(1, 3, 1, 3, dtype=DT, generator=gen)
    cu = torch.tensor([0, 3])
    sl = slice(0, 1) if grank == 0 else slice(1, 3)
    xs = [t[:, sl].clone().requires_grad_() for t in (q, k, v, g, lam)]
    o, _ = hodlr.distributed.log_linear_attn(*xs, cu_seqlens=cu, group=group, backend="fenwick")
    o.pow(2).sum().backward()
    after = torch.tensor([float(grank + 1)])
    dist.all_reduce(after, group=group)  # the next collective: matched with the other rank's all_reduce
    ref = [t.clone().requires_grad_() for t in (q, k, v, g, lam)]
    want_o, _ = hodlr.log_linear_attn(*ref, cu_seqlens=cu, backend="fenwick")
    want_o.pow(2).sum().backward()
    out["fenwick one-token piece"] = [after.item(), relative_error(o, want_o[:, sl])] + [
        relative_error(a.grad, b.grad[:, sl]) for a, b in zip(xs, ref)]
    x32 = [t.float() for t in xs]
    plain = hodlr.distributed.log_linear_attn(*x32, cu_seqlens=cu, group=group, output_final_state=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = hodlr.distributed.log_linear_attn(*x32, cu_seqlens=cu, group=group, output_final_state=True)
    out["autocast"] = [a.dtype == b.dtype == torch.float32 and torch.equal(a, b)
                       for a, b in ((plain[0], cast[0]), (plain[1].states, cast[1].states))]
    o, _ = hodlr.distributed.log_linear_attn(*xs, cu_seqlens=cu, group=group)
    try:
        torch.autograd.grad(o.pow(2).sum(), xs[0], create_graph=True)
        out["create_graph"] = "no error"
    except NotImplementedError as err:
        out["create_graph"] = f"NotImplementedError: {err}"
    with hodlr.distributed.record_communication() as outer:
        with hodlr.distributed.record_communication() as inner:
            hodlr.distributed.log_linear_attn(*[t.detach() for t in xs], group=group)
        hodlr.distributed.log_linear_attn(*[t.detach() for t in xs], group=group)
    out["nested records"] = [len(outer.entries), len(inner.entries)]
    return out


def _compiled(group, grank):
    """A compiled function around the call (a graph break) against eager: values and gradients."""
    x = [torch.randn(1, 6, 1, 2, dtype=DT, generator=torch.Generator().manual_seed(i)).requires_grad_()
         for i in range(3)]
    lam = torch.rand(1, 6, 1, 5, dtype=DT, generator=torch.Generator().manual_seed(3))

    def f(q, k, v):
        o, _ = hodlr.distributed.log_linear_attn(torch.tanh(q), k * 2, v, None, lam, group=group)
        return (o.sin() * 3).sum()

    eager = f(*x)
    want = torch.autograd.grad(eager, x)
    got_value = torch.compile(f, backend="aot_eager")(*x)
    got = torch.autograd.grad(got_value, x)
    return [relative_error(got_value, eager)] + [relative_error(a, b) for a, b in zip(got, want)]


def _worker(rank, nprocs, folder):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=nprocs,
                            timeout=datetime.timedelta(seconds=120))
    plan = torch.load(os.path.join(folder, "cases.pt"), weights_only=False)
    groups = {ranks: dist.new_group(list(ranks)) for ranks in plan["groups"]}  # every process, same order
    results = []
    for i, (ranks, case, ref) in enumerate(plan["cases"]):
        if rank in ranks:
            results.append((i, _run_case(case, ref, groups[ranks], ranks.index(rank), len(ranks))))
    extra = {}
    if rank in plan["checks"]:
        grp = groups[plan["checks"]]
        grank = plan["checks"].index(rank)
        extra = {"bad": _bad_inputs(grp, grank), "compiled": _compiled(grp, grank),
                 "hazards": _training_hazards(grp, grank)}
    elif plan["checks"] and rank == min(set(range(nprocs)) - set(plan["checks"])):  # a process outside the group
        x = torch.randn(1, 4, 2, 3, dtype=DT)
        try:
            hodlr.distributed.log_linear_attn(x, x, x, None, torch.rand(1, 4, 2, 5, dtype=DT),
                                              group=groups[plan["checks"]])
            extra = {"outsider": "no error"}
        except (TypeError, ValueError) as err:
            extra = {"outsider": f"{type(err).__name__}: {err}"}
    if plan.get("bench") and rank in plan["bench"][0]:  # the benchmark's code path on a group, toy sizes
        from hodlr import distributed_bench

        ranks, argv = plan["bench"]
        extra["bench"] = distributed_bench.run(distributed_bench._parser().parse_args(argv), groups[ranks])
    with open(os.path.join(folder, f"rank{rank}.json"), "w") as fh:
        json.dump({"results": results, **extra}, fh)
    dist.barrier()
    dist.destroy_process_group()


def _spawn(tmp, nprocs, groups, assigned, checks=(), bench=None):
    """Run ``assigned`` (``(group ranks, case)`` pairs) in ``nprocs`` spawned gloo processes (and
    the refusal and compile checks on the group ``checks``); assert every rank's errors and bytes."""
    import torch.multiprocessing as mp

    cases_ = [(group, case, reference(case)) for group, case in assigned]
    torch.save({"groups": groups, "cases": cases_, "checks": checks, "bench": bench}, tmp / "cases.pt")
    mp.spawn(_worker, args=(nprocs, str(tmp)), nprocs=nprocs, join=True)
    out = [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(nprocs)]
    seen = set()
    for r in range(nprocs):
        for i, res in out[r]["results"]:
            seen.add(i)
            ranks, case, _ = cases_[i]
            f64 = case["dtype"] == "float64"
            for name, err in res["errors"].items():
                bound = (TOL if f64 else 1e-5) if name in ("o", "final", "positions") else (1e-10 if f64 else 1e-4)
                assert err <= bound, f"rank {r} of {ranks}: {name} error {err:.2e} > {bound:.0e} in {case}"
            want = expected_payload(case)
            assert res["forward"] == want, f"rank {r} of {ranks}: sent {res['forward']} bytes, formula {want}: {case}"
            if len(case.get("no_grad_ranks", ())) == len(case["lengths"]):
                want = 0  # no rank wants gradients: no backward
            assert res["backward"] == want, f"rank {r} of {ranks}: backward {res['backward']} != {want}: {case}"
    assert seen == set(range(len(cases_)))
    return out


def _check_bad_and_compiled(out, checks):
    """The ranks of ``checks`` agree on every refusal; the compiled function matches eager."""
    bad = [dict(out[r]["bad"]) for r in checks]
    assert bad[0]["heads"] == bad[1]["heads"] == ("ValueError: every rank of the group must pass the same heads of "
                                                  "v: rank 0 has 2, rank 1 has 4"), bad
    assert bad[1]["refused"].startswith("ValueError: q must have shape (B, T, Hqk, Dk)"), bad
    assert bad[0]["refused"].startswith("ValueError: rank 1 of the group refused its arguments"), bad
    assert bad[1]["backend type"] == "TypeError: backend must be a string, got NoneType", bad
    assert bad[0]["backend type"].startswith("ValueError: rank 1 of the group refused its arguments"), bad
    for b in bad:
        assert b["stateless backend"].startswith("BackendUnavailableError: backend 'dense' has no recurrent state, "
                                                 "which context parallelism needs"), b
        assert "cu_seqlens must end at T=8" in b["cu_seqlens"], b
        assert "level_scales has L=2 levels but absolute position 7" in b["narrow"], b
        assert b["one narrow"] == ("ValueError: level_scales must have L >= num_levels(8)=4 on every rank (the "
                                   "largest global end position is 7): rank 1 has L=2"), b
        # what each rank passed, named on both ranks
        assert b["scale"] == ("ValueError: every rank of the group must pass the same scale: rank 0 has 0.5, "
                              "rank 1 has 0.25"), b
        assert b["backend name"] == ("ValueError: every rank of the group must pass the same backend: rank 0 has "
                                     "'auto', rank 1 has 'fenwick'"), b
        assert b["cu_seqlens differ"] == ("ValueError: every rank of the group must pass the same cu_seqlens: "
                                          "rank 0 has cu_seqlens[2]=5, rank 1 has cu_seqlens[2]=6"), b
        assert b["positions differ"] == (
            "ValueError: every rank of the group must pass the same initial_state.positions: rank 0 has "
            "initial_state.positions[0]=3, rank 1 has initial_state.positions[0]=5"), b
        assert b["grad mode"] == ("ValueError: rank 1 of the group wants gradients but rank 0 calls with autograd off "
                                  "(torch.no_grad or torch.inference_mode): call under the same grad mode on every "
                                  "rank"), b
    for r in checks:
        assert max(out[r]["compiled"]) <= TOL, out[r]["compiled"]
        hazards = out[r]["hazards"]
        after, *errors = hazards["fenwick one-token piece"]
        assert after == 3.0 and max(errors) <= 1e-12, hazards
        assert hazards["autocast"] == [True, True], hazards
        assert hazards["create_graph"] == ("NotImplementedError: hodlr.distributed.log_linear_attn has no second-order "
                                           "gradients (a backward with create_graph=True): its collectives are not "
                                           "differentiable"), hazards
        assert hazards["nested records"][0] == 2 * hazards["nested records"][1] > 0, hazards
    outsider = min(set(range(len(out))) - set(checks))
    assert out[outsider]["outsider"] == (
        f"ValueError: group: this process (global rank {outsider}) is not a member of the group; only the group's "
        f"ranks may call hodlr.distributed.log_linear_attn with it"), out[outsider]


def draw(strategy, n):
    """``n`` values of ``strategy`` drawn by hypothesis (its simplest first), for the spawned
    groups: one spawn runs them all; a failure names the case."""
    out = []

    @settings(max_examples=n, deadline=None, phases=(Phase.generate,), database=None)
    @given(strategy)
    def collect(x):
        out.append(x)

    collect()
    return out


TRITON = [  # tiny cases for the Triton interpreter (float32): a packed layout with initial states and a
    # final state, and a batch with a decay crossing an unaligned boundary
    dict(lengths=[7, 13], cu=[0, 3, 17, 20], nseq=3, heads=(1, 2), Dk=2, Dv=3, decay="mild", starts=[5, 0, 64],
         final=True, scale=None, backend="triton", dtype="float32", seed=11),
    dict(lengths=[11, 6], cu=None, nseq=2, heads=(2, 1), Dk=3, Dv=2, decay="strong", starts=None, final=False,
         scale=0.5, backend="triton", dtype="float32", seed=12),
    # aligned shards: the call from position 0 and the carried-reads kernels
    dict(lengths=[8, 8], cu=None, nseq=2, heads=(2, 1), Dk=3, Dv=2, decay="strong", starts=None, final=True,
         scale=0.5, backend="triton", dtype="float32", seed=13),
]

ALIGNED = [  # aligned shards on 2, 3 and 4 ranks (the call from position 0, and the early local call
    # before the metadata exchange: kept, or dropped), chunked, float64
    dict(lengths=[16, 16], cu=None, nseq=2, heads=(1, 2), Dk=2, Dv=3, decay="mild", starts=None, final=False,
         scale=None, backend="chunked", dtype="float64", seed=21),
    dict(lengths=[8] * 4, cu=None, nseq=1, heads=(2, 1), Dk=3, Dv=2, decay="none", starts=None, final=True,
         scale=1.0, backend="chunked", dtype="float64", seed=22),
    dict(lengths=[4, 4, 8, 0], cu=None, nseq=2, heads=(1, 1), Dk=2, Dv=2, decay="strong", starts=None, final=False,
         scale=0.5, backend="chunked", dtype="float64", seed=23),
    # rank 1's early local call (its shard would be aligned in an even split) dropped after the
    # exchange: the shard starts at 4 (unaligned); or it is the first with tokens, sends its states to
    # rank 2 and wants gradients (its g must tie the exchange into its backward)
    dict(lengths=[4, 8], cu=None, nseq=1, heads=(1, 1), Dk=2, Dv=2, decay="mild", starts=None, final=False,
         scale=None, backend="chunked", dtype="float64", seed=24),
    dict(lengths=[0, 8, 8], cu=None, nseq=2, heads=(1, 2), Dk=2, Dv=1, decay="strong", starts=None, final=False,
         scale=1.0, backend="chunked", dtype="float64", seed=25),
    # rank 0's early local call: kept in a call without gradients; dropped where rank 1 wants them
    # (rank 0's log-decay then ties the exchange into its backward)
    dict(lengths=[8, 8], cu=None, nseq=1, heads=(1, 1), Dk=2, Dv=2, decay="mild", starts=None, final=False,
         scale=None, backend="chunked", dtype="float64", seed=26, no_grad_ranks=(0, 1)),
    dict(lengths=[8, 8], cu=None, nseq=2, heads=(2, 1), Dk=1, Dv=2, decay="strong", starts=None, final=False,
         scale=0.5, backend="chunked", dtype="float64", seed=27, no_grad_ranks=(0,)),
]


def test_one_to_five_and_eight_ranks_equal_one_process(tmp_path_factory, tmp_path):
    """One spawn of 8 gloo processes holding groups of 1, 2, 3, 4, 5 and 8 ranks (the small groups
    disjoint, side by side): drawn cases on ``chunked`` and ``fenwick``, two on ``triton`` (under the
    interpreter; left out where the kernels are compiled for a GPU), an even split of 64 tokens over 8 ranks from a state at position 37 with a final
    state; the refusals and the compiled function on 2 ranks; the benchmark's code path on 4."""
    groups = [(0,), (1, 2), (3, 4), (5, 6, 7), (0, 1, 2, 3), (3, 4, 5, 6, 7), tuple(range(8))]
    assigned = [((0,), c) for c in draw(cases(1), 1)]
    assigned += [(groups[1 + i % 2], c) for i, c in enumerate(draw(cases(2), 6))]
    assigned += [((1, 2), c) for c in TRITON if INTERP]
    assigned += [((5, 6, 7), c) for c in draw(cases(3), 4)]
    assigned += [((0, 1, 2, 3), c) for c in draw(cases(4), 4)]
    assigned += [(groups[1], ALIGNED[0])] + [((0, 1, 2, 3), c) for c in ALIGNED[1:3]]
    assigned += [(groups[2], ALIGNED[3]), (groups[3], ALIGNED[4])] + [(groups[2], c) for c in ALIGNED[5:]]
    assigned += [(groups[5], c) for c in draw(cases(5), 2)] + [(groups[6], c) for c in draw(cases(8), 2)]
    assigned.append((groups[6], dict(assigned[-1][1], lengths=[8] * 8, cu=None, nseq=1, starts=[37], final=True)))
    bench = ["--device", "cpu", "--check", "6", "--check-dtypes", "float32", "--strong", "6", "--weak", "4",
             "--reps", "1", "--warmup", "0", "--heads", "2", "--head-dim", "3", "--dtype", "float32",
             "--backend", "chunked"]
    out = _spawn(tmp_path_factory.mktemp("cp8"), 8, groups, assigned, (1, 2), (groups[4], bench))
    _check_bad_and_compiled(out, (1, 2))
    _check_bench(out[0]["bench"], tmp_path)


def _check_bench(result, folder):
    """The benchmark's smoke run: equality passes, its bytes are the formula's, the table and the
    picture render."""
    from hodlr import distributed_bench

    assert [c["pass"] for c in result["check"]] == [True], result["check"]
    assert [(r["mode"], r["tokens"], r["single_tokens"]) for r in result["timings"]] == [("strong", 64, 64),
                                                                                          ("weak", 64, 16)]
    assert result["backend_resolved"] == "chunked" and result["devices"] == 4
    for r in result["timings"]:
        b = r["bytes"]
        assert b["payload_forward"] == b["payload_backward"] == b["payload_formula"] == payload_bytes(1, 2, 7, 3, 3)
        assert b["sent_per_rank_forward"] == 3 * b["payload_formula"]
        assert r["fwd_ms"] > 0 and r["single"]["fwd_ms"] > 0 and r["ratio_fwdbwd"] > 0
    assert distributed_bench.table(result).count("\n") == 3
    distributed_bench.plot(result, folder / "bench-cp.png")
    assert (folder / "bench-cp.png").stat().st_size > 10_000


def test_bench_cp_prints_and_saves_each_row(tmp_path):
    """``hodlr bench-cp`` (one gloo process, as ``torchrun`` would start it): the equality line and
    each timing row printed as measured, the JSON rewritten after every row (``complete`` false until
    the end), the picture at the end."""
    driver = (
        "import sys, hodlr.bench as hb, hodlr.distributed_bench as b\n"
        "seen, write = [], hb.write\n"
        "def recording(result, *rest):\n"
        "    seen.append([len(result['check']), len(result['timings']), result['complete'], rest[1] is not None])\n"
        "    write(result, *rest)\n"
        "hb.write = recording\n"
        "rc = b.main(sys.argv[1:])\n"
        "print('WRITES', seen)\n"
        "sys.exit(rc)\n")
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29000 + os.getpid() % 1000), RANK="0",
               WORLD_SIZE="1", LOCAL_RANK="0")
    argv = ["--device", "cpu", "--check", "4", "--check-dtypes", "float32", "--strong", "4", "5", "--reps", "1",
            "--warmup", "0", "--heads", "1", "--head-dim", "2", "--dtype", "float32", "--backend", "chunked",
            "--out", str(tmp_path)]
    run = subprocess.run([sys.executable, "-c", driver, *argv], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0].startswith("equality T=16 float32: pass o=")
    assert lines[1].startswith("| mode | devices | tokens |") and lines[2].startswith("| --- |")
    assert lines[3].startswith("| strong | 1 | 16 |") and lines[4].startswith("| strong | 1 | 32 |")
    assert lines[5].startswith("wrote ")
    assert lines[6] == "WRITES [[1, 0, False, False], [1, 1, False, False], [1, 2, False, False], [1, 2, True, True]]"
    assert json.loads((tmp_path / "bench-cp.json").read_text())["complete"] is True
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "bench-cp.png").stat().st_size > 10_000


# -- one GPU, two processes ------------------------------------------------------------------
def _gpu_worker(rank, world, folder, T, dtype_name):
    """One rank of two gloo processes sharing ``cuda:0``: its shard of the context-parallel call
    against the single-process call, the relative errors written to ``folder``."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    dev = torch.device("cuda", 0)
    dtype = getattr(torch, dtype_name)
    B, H, D = 1, 4, 64
    gen = torch.Generator(device=dev).manual_seed(T)
    q, k, v = (torch.randn(B, T, H, D, device=dev, generator=gen).to(dtype) for _ in range(3))
    g = -0.1 * torch.rand(B, T, H, device=dev, generator=gen)
    lam = torch.rand(B, T, H, fenwick.num_levels(T), device=dev, generator=gen) + 0.5
    w = torch.randn(B, T, H, D, device=dev, generator=gen)
    full = [x.clone().requires_grad_() for x in (q, k, v, g, lam)]
    o, fin = hodlr.log_linear_attn(*full, output_final_state=True)
    wf = torch.randn(fin.states.shape, device=dev, generator=gen)
    want = torch.autograd.grad((o.float() * w).sum() + (fin.states * wf).sum(), full)
    lo, hi = shard_offsets(T, world)[rank:rank + 2]
    shard = [x[:, lo:hi].detach().clone().requires_grad_() for x in (q, k, v, g, lam)]
    o2, fin2 = hodlr.distributed.log_linear_attn(*shard, output_final_state=True)
    loss = (o2.float() * w[:, lo:hi]).sum() + (rank == world - 1) * (fin2.states * wf).sum()
    got = torch.autograd.grad(loss, shard)
    errors = {"o": relative_error(o2, o[:, lo:hi]), "final": relative_error(fin2.states, fin.states)}
    errors.update({"d" + n: relative_error(a, b[:, lo:hi]) for n, a, b in zip("q k v g lam".split(), got, want)})
    with open(os.path.join(folder, f"gpu{rank}.json"), "w") as fh:
        json.dump(errors, fh)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.parametrize("T, dtype", [(4096, "bfloat16"), (4096, "float32"), (3000, "bfloat16")])
def test_two_processes_on_one_gpu_equal_one_call(T, dtype, tmp_path):
    """The GPU kernels of the context-parallel path (the shard states, the overlapped exchange, the
    carried reads of an aligned shard at 4,096 tokens, the call from a state of an unaligned one at
    3,000) on two gloo processes sharing one GPU equal one call: outputs, final state, gradients."""
    import torch.multiprocessing as mp

    mp.spawn(_gpu_worker, args=(2, str(tmp_path), T, dtype), nprocs=2, join=True)
    tol = TOLERANCES["gpu_float32" if dtype == "float32" else "gpu_bfloat16"]
    for rank in range(2):
        errors = json.loads((tmp_path / f"gpu{rank}.json").read_text())
        for name, err in errors.items():
            bound = tol if name in ("o", "final") else 10 * tol
            assert err <= bound, f"rank {rank}: {name} error {err:.2e} > {bound:.0e} (T={T}, {dtype})"
