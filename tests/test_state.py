"""``hodlr.LogLinearState``: construction, copies, batch selection, and the lossless conversion to
and from ``hodlr.fenwick.FenwickState``."""

from __future__ import annotations

import pytest
import torch

import hodlr
from hodlr import fenwick
from hodlr.fenwick import FenwickState
from hodlr.testing import relative_error

DT = torch.float64


def prefix_state(positions, H=3, Dk=2, Dv=4, seed=0):
    """A state of ``len(positions)`` sequences made by the op (one call per sequence), and the
    inputs that continue it by 5 tokens."""
    gen = torch.Generator().manual_seed(seed)
    top = max(positions) + 5
    L = hodlr.num_levels(top)
    q, k = (torch.randn(len(positions), top, 1, Dk, generator=gen, dtype=DT) for _ in range(2))
    v = torch.randn(len(positions), top, H, Dv, generator=gen, dtype=DT)
    g = -torch.rand(len(positions), top, H, generator=gen, dtype=DT)
    lam = torch.rand(len(positions), top, H, L, generator=gen, dtype=DT)
    parts = []
    for n, a in enumerate(positions):
        _, s = hodlr.log_linear_attn(q[n:n + 1, :a], k[n:n + 1, :a], v[n:n + 1, :a], g[n:n + 1, :a],
                                     lam[n:n + 1, :a], output_final_state=True, backend="fenwick")
        parts.append(s.with_slots(top.bit_length()))
    state = hodlr.LogLinearState(torch.cat([p.states for p in parts]), torch.cat([p.positions for p in parts]))
    rest = [torch.stack([x[n, a:a + 5] for n, a in enumerate(positions)]) for x in (q, k, v, g, lam)]
    return state, rest


def test_zeros_and_facts():
    s = hodlr.LogLinearState.zeros(3, 2, 4, 5, max_position=2**16)
    assert s.num_slots == 17 and s.states.dtype == torch.float32 and s.positions.tolist() == [0, 0, 0]
    assert (s.batch_size, s.num_heads, s.Dk, s.Dv, len(s)) == (3, 2, 4, 5, 3)
    assert s.nbytes == 3 * 2 * 17 * 4 * 5 * 4 + 3 * 8
    assert hodlr.LogLinearState.zeros(1, 1, 1, 1, slots=4, dtype=DT).states.shape == (1, 1, 4, 1, 1)
    assert "S=17" in repr(s)
    with pytest.raises(TypeError, match="exactly one of max_position and slots"):
        hodlr.LogLinearState.zeros(1, 1, 1, 1)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 0"):
        hodlr.LogLinearState.zeros(-1, 1, 1, 1, slots=2)


@pytest.mark.parametrize("states, positions, error, match", [
    ("x", torch.zeros(1, dtype=torch.int64), TypeError, "states must be a torch.Tensor"),
    (torch.zeros(1, 1, 1, 1), torch.zeros(1, dtype=torch.int64), ValueError,
     r"states must have shape \(N, H, S, Dk, Dv\)"),
    (torch.zeros(1, 1, 1, 1, 1, dtype=torch.float16), torch.zeros(1, dtype=torch.int64), TypeError, "float32"),
    (torch.zeros(1, 1, 1, 1, 1), torch.zeros(1, dtype=torch.int32), TypeError, "torch.int64"),
    (torch.zeros(2, 1, 1, 1, 1), torch.zeros(1, dtype=torch.int64), ValueError,
     r"positions must have shape \(N,\) = \(2,\)"),
    (torch.zeros(1, 1, 1, 1, 1), torch.zeros(1, dtype=torch.int64, device="meta"), ValueError, "device meta"),
    (torch.zeros(1, 1, 2, 1, 1), torch.tensor([4]), ValueError, "S=2 slots but position 4 needs"),
    (torch.zeros(1, 1, 2, 1, 1), torch.tensor([-1]), ValueError, "positions must be >= 0"),
])
def test_constructor_refuses(states, positions, error, match):
    with pytest.raises(error, match=match):
        hodlr.LogLinearState(states, positions)


def test_copies_and_batch_selection():
    state, _ = prefix_state([3, 8, 5])
    for other in (state.clone(), state.detach(), state.to(torch.float64), state.to("cpu")):
        assert torch.equal(other.states, state.states) and torch.equal(other.positions, state.positions)
    assert state.clone().states.data_ptr() != state.states.data_ptr()
    assert state.to(torch.float32).dtype == torch.float32 and state.to(torch.float32).positions.dtype == torch.int64
    picked = state.index_select([2, 0, 0])
    assert picked.positions.tolist() == [5, 3, 3] and torch.equal(picked.states[1], state.states[0])
    for indices in (torch.tensor([2, 0, 0]), [torch.tensor(2), torch.tensor(0), 0]):  # a tensor, a list holding some
        assert torch.equal(state.index_select(indices).states, picked.states)
    assert state[1].positions.tolist() == [8] and state[-1].positions.tolist() == [5]
    assert state[1:].batch_size == 2 and state[torch.tensor([True, False, True])].positions.tolist() == [3, 5]
    assert torch.equal(state.with_slots(8).states[:, :, :state.num_slots], state.states)
    assert state.with_slots(4).num_slots == 4
    with pytest.raises(ValueError, match="slots=3 cannot hold position 8"):
        state.with_slots(3)
    with pytest.raises(IndexError):
        state[3]


def test_copies_do_not_share_what_a_step_updates():
    """A step updates a state's states and positions in place: every copy that holds new states
    (``to`` another dtype, ``with_slots``, ``combine``) holds new positions too, so stepping it
    leaves the original as it was; selection by a 0-d tensor, by no indices, and refusals."""
    state, rest = prefix_state([3, 8, 5], H=1)
    step = [x[:, :1] for x in rest]
    before = state.clone()
    for copy in (state.to(torch.float32).to(DT), state.with_slots(6), state.with_slots(4),
                 hodlr.distributed.combine(state, hodlr.LogLinearState(torch.zeros_like(state.states),
                                                                       state.positions.clone()))):
        assert copy.positions.data_ptr() != state.positions.data_ptr()
        hodlr.log_linear_attn_step(*step, copy)
        assert torch.equal(state.positions, before.positions) and torch.equal(state.states, before.states)
    assert state.to(DT) is state  # nothing to change: the state itself
    assert state[torch.tensor(1)].positions.tolist() == [8]
    assert state.index_select([]).batch_size == 0
    for bad in (None, True, (0, 1)):
        with pytest.raises(TypeError, match="indexed along its sequences"):
            state[bad]


def test_zeros_refuses_what_a_state_cannot_be():
    for dtype in (torch.float16, "float32"):
        with pytest.raises(TypeError, match="dtype must be torch.float32 or torch.float64"):
            hodlr.LogLinearState.zeros(1, 1, 2, 2, slots=2, dtype=dtype)
    with pytest.raises(ValueError, match="device must be a torch device or its name, got 'nope'"):
        hodlr.LogLinearState.zeros(1, 1, 2, 2, slots=2, device="nope")


def test_combine_reads_only_live_slots():
    """What an empty slot of ``first`` holds (junk left by resetting a row's position) does not
    change ``combine``, as it does not change the operations."""
    state, rest = prefix_state([4, 6], H=1)
    dirty = state.clone()
    dirty.states[0, :, :2] = 7.0  # position 4 = 0b100: slots 0, 1 (levels 1, 2) are empty
    dirty.states[1, :, 0] = -3.0  # position 6 = 0b110: slot 0 (level 1) is empty
    _, tail = hodlr.log_linear_attn(*rest[:4], rest[4], initial_state=hodlr.LogLinearState(
        torch.zeros_like(state.states), state.positions.clone()), output_final_state=True, backend="fenwick")
    g_sum = rest[3].sum(1)
    want = hodlr.distributed.combine(state, tail, g_sum)
    got = hodlr.distributed.combine(dirty, tail, g_sum)
    assert torch.equal(got.states, want.states) and torch.equal(got.positions, want.positions)
    with pytest.raises(TypeError, match="validate must be a bool, got str"):
        hodlr.distributed.combine(state, tail, g_sum, validate="x")


def test_fenwick_round_trip_one_position():
    """LogLinearState -> FenwickState -> LogLinearState is exact, and the FenwickState continues
    like the op does."""
    state, (q, k, v, g, lam) = prefix_state([6, 6])
    f = state.to_fenwick()
    assert isinstance(f, FenwickState) and f.position == 6 and f.levels == (3, 2)
    for lev, s in f.states().items():
        assert torch.equal(s, state.states[:, :, lev - 1])
    back = hodlr.LogLinearState.from_fenwick(f)
    assert torch.equal(back.with_slots(state.num_slots).states, state.states)
    o, _ = hodlr.log_linear_attn(q, k, v, g, lam, initial_state=state, backend="chunked")
    grp = v.shape[2]
    out = f.prefill(*(x.transpose(1, 2).expand(-1, grp, -1, -1) for x in (q, k)), v.transpose(1, 2),
                    lam.transpose(1, 2), g.transpose(1, 2))
    assert relative_error(out.transpose(1, 2), o) <= 1e-12
    numpy_state = FenwickState.from_states(6, {lev: s.numpy() for lev, s in state.to_fenwick().states().items()},
                                           (2, 3), 2, 4)
    assert torch.equal(hodlr.LogLinearState.from_fenwick(numpy_state).states, back.states)


def test_fenwick_round_trip_per_sequence():
    state, _ = prefix_state([0, 1, 7, 8])
    parts = state.to_fenwick()
    assert [p.position for p in parts] == [0, 1, 7, 8] and all(p.batch_shape == (1, 3) for p in parts)
    back = hodlr.LogLinearState.from_fenwick(parts)
    assert torch.equal(back.positions, state.positions)
    assert torch.equal(back.with_slots(state.num_slots).states, state.states)
    with pytest.raises(TypeError, match="must be a hodlr.fenwick.FenwickState"):
        hodlr.LogLinearState.from_fenwick("x")
    with pytest.raises(ValueError, match="must hold exactly the live levels"):
        FenwickState.from_states(3, {1: torch.zeros(1, 1, dtype=DT)}, (), 1, 1, DT)


def test_empty_slots_are_never_read_whatever_they_hold():
    """A slot whose bucket is empty at the state's position may hold anything, NaN included: the
    ops continuing from the state, and the steps, give what a state with zeros there gives (the
    torch paths once multiplied such a slot by 0, and 0 · NaN is NaN)."""
    torch.manual_seed(0)
    B, T, H, D, S = 2, 9, 2, 3, 5
    pos = torch.tensor([4, 10])
    live = torch.tensor([[(p >> l) & 1 for l in range(S)] for p in pos.tolist()], dtype=torch.bool)
    states = torch.randn(B, H, S, D, D, dtype=DT)
    clean = torch.where(live[:, None, :, None, None], states, 0.0)
    dirty = torch.where(live[:, None, :, None, None], states, float("nan"))
    q, v = (torch.randn(B, T, H, D, dtype=DT) for _ in range(2))
    k = torch.nn.functional.normalize(torch.randn(B, T, H, D, dtype=DT), dim=-1)
    g, beta, lam = -torch.rand(B, T, H, dtype=DT), torch.rand(B, T, H, dtype=DT), torch.rand(B, T, H, 6, dtype=DT)
    state = lambda x: hodlr.LogLinearState(x.clone(), pos.clone())  # noqa: E731
    for backend in ("chunked", "fenwick"):
        for op, args in ((hodlr.log_linear_attn, (q, k, v, g, lam)), (hodlr.log_linear_gated_delta_rule,
                                                                        (q, k, v, g, beta, lam))):
            (a, fa), (b, fb) = (op(*args, initial_state=state(x), output_final_state=True, backend=backend)
                                for x in (clean, dirty))
            assert torch.equal(a, b) and torch.equal(fa.states, fb.states), (backend, op.__name__)
    steps = (lambda s, t: hodlr.log_linear_attn_step(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], g[:, t:t + 1],
                                                     lam[:, t:t + 1], s, backend="torch"),
             lambda s, t: hodlr.log_linear_gated_delta_step(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1],
                                                            g[:, t:t + 1], beta[:, t:t + 1], lam[:, t:t + 1], s))
    for step in steps:
        a, b = state(clean), state(dirty)
        assert torch.equal(torch.cat([step(a, t) for t in range(T)], 1), torch.cat([step(b, t) for t in range(T)], 1))


def test_fenwick_round_trip_keeps_a_preallocated_shape_and_reorders_without_host_reads():
    """``from_fenwick(..., slots=)`` gives a cache its slot count back (the values round-trip either
    way); ``index_select(..., validate=False)`` reorders as the checked call does."""
    state, _ = prefix_state([5, 5], H=2)
    cache = state.with_slots(13)
    back = hodlr.LogLinearState.from_fenwick(cache.to_fenwick(), slots=cache.num_slots)
    assert back.num_slots == 13 and torch.equal(back.states, cache.states)
    assert hodlr.LogLinearState.from_fenwick(cache.to_fenwick()).num_slots == fenwick.num_slots(5)
    with pytest.raises(ValueError, match=r"slots must be an integer >= 3 \(the slots of position 5\), got 2"):
        hodlr.LogLinearState.from_fenwick(cache.to_fenwick(), slots=2)
    order = torch.tensor([1, 0, 1])
    got, want = cache.index_select(order, validate=False), cache.index_select(order)
    assert torch.equal(got.states, want.states) and torch.equal(got.positions, want.positions)


@pytest.mark.parametrize("backend", ["chunked", "fenwick", pytest.param("triton", marks=pytest.mark.interpreter)])
@pytest.mark.parametrize("gated", [False, True])
def test_an_empty_sequence_reads_no_level_scales(backend, gated):
    """An empty packed sequence passes its state through without reading a level scale: a call
    whose scales cover only the tokens it computes runs even where that sequence's state sits at
    a position those scales could not reach, and equals the call without it."""
    H, D = 2, 4
    gen = torch.Generator().manual_seed(3)
    state = hodlr.LogLinearState.zeros(2, H, D, D, max_position=1000)
    state.positions[:] = torch.tensor([1000, 0])  # row 0 finished at 1000; row 1 gets 3 tokens from 0
    live = (state.positions[:, None] >> torch.arange(state.num_slots)) & 1  # slot l - 1 holds level l
    state.states.copy_(torch.randn(state.states.shape, generator=gen) * live[:, None, :, None, None])
    q, k, v = (torch.randn(1, 3, H, D, generator=gen, dtype=torch.float64) for _ in range(3))
    g, lam = -torch.rand(1, 3, H, generator=gen, dtype=torch.float64), torch.rand(1, 3, H, 3, dtype=torch.float64)
    state = state.to(torch.float64)
    if gated:
        beta = torch.rand(1, 3, H, generator=gen, dtype=torch.float64)
        run = lambda st, cu: hodlr.log_linear_gated_delta_rule(  # noqa: E731
            q, k, v, g, beta, lam, initial_state=st, cu_seqlens=cu, output_final_state=True, backend=backend)
    else:
        run = lambda st, cu: hodlr.log_linear_attn(  # noqa: E731
            q, k, v, g, lam, initial_state=st, cu_seqlens=cu, output_final_state=True, backend=backend)
    o, final = run(state, torch.tensor([0, 0, 3]))
    alone, alone_final = run(state[1], None)
    assert relative_error(o, alone) <= 1e-13
    assert torch.equal(final.positions, torch.tensor([1000, 3]))
    assert torch.equal(final.states[0, :, :state.num_slots], state.states[0])
    assert relative_error(final.states[1:, :, :alone_final.num_slots], alone_final.states) <= 1e-13
