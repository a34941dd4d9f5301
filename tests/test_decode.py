"""The decode kernel (``hodlr.kernels.decode``, under the interpreter on the CPU) and
``hodlr.log_linear_attn_step``: one token for a batch of sequences at different positions
(0, 1, 2^k - 1, 2^k and others) equals the Fenwick scan, state and positions updated in place.

``kernels`` is imported inside the tests (see tests/test_gpu.py for why)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import hodlr
from hodlr.testing import poison_unread, relative_error

from test_state import prefix_state

INTERP = hodlr.backends.load("triton").unavailable_reason("torch", torch.device("cpu")) is None
DEVICE = "cpu" if INTERP else "cuda"
KERNEL_DT = torch.float64 if INTERP else torch.float32  # float64 runs only under the interpreter
TOL = 1e-12 if INTERP else 1e-5
DT = torch.float64
POSITIONS = [0, 1, 2, 7, 8, 15, 16, 31, 32, 21]
pytestmark = pytest.mark.skipif(not INTERP and not torch.cuda.is_available(),
                                reason="needs TRITON_INTERPRET=1 or a CUDA GPU")


def dev(x):
    """A float64 CPU tensor, or state, on the kernels' device and dtype."""
    if isinstance(x, hodlr.LogLinearState):
        return hodlr.LogLinearState(x.states.to(DEVICE, KERNEL_DT, copy=True), x.positions.to(DEVICE, copy=True))
    return None if x is None else x.to(DEVICE, KERNEL_DT)


def step_inputs(state, seed, grouped=True):
    gen = torch.Generator().manual_seed(seed)
    N, H, Dk, Dv = state.batch_size, state.num_heads, state.Dk, state.Dv
    Hqk = 1 if grouped else H
    q, k = (torch.randn(N, 1, Hqk, Dk, generator=gen, dtype=DT) for _ in range(2))
    v = torch.randn(N, 1, H, Dv, generator=gen, dtype=DT)
    g = -torch.rand(N, 1, H, generator=gen, dtype=DT)
    L = state.num_slots + 1
    lam = torch.rand(N, H, L, generator=gen, dtype=DT)
    # poison what the token at each row's position does not read
    lam = torch.stack([poison_unread(torch.cat([torch.zeros(int(p), L, dtype=DT), lam[n, h:h + 1]]))[-1:]
                       for n, p in enumerate(state.positions.tolist()) for h in range(H)]).reshape(N, H, 1, L)
    return q, k, v, g, lam.transpose(1, 2)


@pytest.mark.parametrize("decay", [True, False])
def test_decode_kernel_equals_scan(decay):
    from hodlr.kernels.decode import decode_step

    state, _ = prefix_state(POSITIONS, H=2, Dk=3, Dv=5)
    q, k, v, g, lam = step_inputs(state, 1)
    g = g if decay else None
    want, after = hodlr.log_linear_attn(q, k, v, g, lam, initial_state=state, output_final_state=True,
                                        backend="fenwick")
    states, positions = dev(state.states), state.positions.to(DEVICE)
    q, k, v, g, lam = (dev(x) for x in (q, k, v, g, lam))
    o = decode_step(q[:, 0, :, :], k[:, 0], v[:, 0], None if g is None else g[:, 0], lam[:, 0], states, positions, 1.0,
                    out=torch.full((len(POSITIONS), 2, 5), float("nan"), dtype=KERNEL_DT, device=DEVICE))
    assert relative_error(o.cpu(), want[:, 0]) <= TOL
    assert relative_error(states.cpu(), after.states[:, :, :states.shape[2]]) <= TOL
    assert positions.tolist() == [p + 1 for p in POSITIONS]


def test_step_triton_equals_torch():
    """Three steps from mixed positions by the kernel and by the torch path (torch operations on the
    slots, which ``test_step_torch_fills_nan_only_for_rows_that_do_not_fit`` and
    ``test_strided_cache_steps_in_place`` hold to one call): the same output at each step, the same
    states and positions after them."""
    state, _ = prefix_state([0, 3, 7, 8], H=2, Dk=2, Dv=3)
    a, b = dev(state), dev(state)
    for t in range(3):
        inputs = [dev(x) for x in step_inputs(a, 10 + t, grouped=False)]
        o1 = hodlr.log_linear_attn_step(*inputs, a, backend="triton", scale=0.5)
        o2 = hodlr.log_linear_attn_step(*inputs, b, backend="torch", scale=0.5)
        assert relative_error(o1, o2) <= TOL
    assert torch.equal(a.positions, b.positions) and relative_error(a.states, b.states) <= TOL


@pytest.mark.parametrize("layout", ["rows", "slots", "transposed"])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_strided_cache_steps_in_place(backend, layout):
    """A cache whose positions are a column of a larger table (a server's bookkeeping: position,
    request id) and whose states are a view of a larger buffer (every other row; the first slots of
    a wider one; a transposed ``Dk × Dv`` layout): each backend steps it in place as one call does,
    and leaves the table's other column and the rest of the buffer alone."""
    state, _ = prefix_state([5, 3, 6], H=2, Dk=2, Dv=3)
    inputs = [dev(x) for x in step_inputs(state, 4)]
    want, after = hodlr.log_linear_attn(*step_inputs(state, 4), initial_state=state, output_final_state=True,
                                        backend="fenwick")
    table = torch.tensor([[5, 100], [3, 101], [6, 102]], device=DEVICE)
    N, H, S, Dk, Dv = state.states.shape
    if layout == "rows":
        buffer = torch.full((2 * N, H, S, Dk, Dv), 7.0, dtype=KERNEL_DT, device=DEVICE)
        view, rest = buffer[::2], buffer[1::2]
    elif layout == "slots":
        buffer = torch.full((N, H, S + 3, Dk, Dv), 7.0, dtype=KERNEL_DT, device=DEVICE)
        view, rest = buffer[:, :, :S], buffer[:, :, S:]
    else:
        buffer = torch.full((N, H, S, Dv, Dk), 7.0, dtype=KERNEL_DT, device=DEVICE)
        view, rest = buffer.transpose(-1, -2), buffer[:0]
    view.copy_(dev(state.states))
    cache = hodlr.LogLinearState(view, table[:, 0])
    o = hodlr.log_linear_attn_step(*inputs, cache, backend=backend)
    assert relative_error(o.cpu(), want) <= TOL
    assert table.tolist() == [[6, 100], [4, 101], [7, 102]]
    assert relative_error(view.cpu(), after.states[:, :, :S]) <= TOL and (rest == 7).all()


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_step_overflow_refused_or_nan(backend):
    """A step past the state's slots: refused with validation (state untouched); without it the
    step leaves that row alone and writes NaN, other rows step normally (either backend)."""
    state, _ = prefix_state([3, 1], H=1, Dk=2, Dv=2)
    state = dev(state.with_slots(2))  # position 3 -> 4 needs 3 slots
    q, k, v, g, lam = (dev(x) for x in step_inputs(state, 5))
    before = state.clone()
    with pytest.raises(ValueError, match="needs 3 slots but the state has 2"):
        hodlr.log_linear_attn_step(q, k, v, g, lam, state, backend=backend)
    assert torch.equal(state.states, before.states) and torch.equal(state.positions, before.positions)
    o = hodlr.log_linear_attn_step(q, k, v, g, lam, state, backend=backend, validate=False)
    assert torch.isnan(o[0]).all() and torch.isfinite(o[1]).all()
    assert state.positions.tolist() == [3, 2] and torch.equal(state.states[0], before.states[0])
    assert not torch.equal(state.states[1], before.states[1])
    with pytest.raises(ValueError, match="one token per sequence"):
        hodlr.log_linear_attn_step(*(torch.cat([x, x], 1) for x in (q, k, v, g, lam)), state)


def test_step_torch_fills_nan_only_for_rows_that_do_not_fit():
    """The torch step (``validate=False``) gives NaN only for the rows whose step does not fit and
    leaves their state as it was; the other rows step as one call does."""
    state, _ = prefix_state([3, 1], H=1, Dk=2, Dv=2)
    inputs = step_inputs(state, 5)
    want, after = hodlr.log_linear_attn(*inputs, initial_state=state, output_final_state=True, backend="fenwick")
    o = hodlr.log_linear_attn_step(*inputs, state.clone(), backend="torch")
    assert torch.isfinite(o).all() and relative_error(o, want) <= 1e-12
    state = state.with_slots(2)  # position 3 -> 4 needs 3 slots
    before = state.clone()
    o = hodlr.log_linear_attn_step(*inputs, state, backend="torch", validate=False)
    assert torch.isnan(o[0]).all() and relative_error(o[1:], want[1:]) <= 1e-12
    assert torch.equal(state.states[0], before.states[0]) and state.positions.tolist() == [3, 2]
    assert relative_error(state.states[1], after.states[1, :, :2]) <= 1e-12


def test_op_with_one_token_matches_step():
    """``log_linear_attn`` with T == 1 and a state (the op's functional form) leaves the given state
    alone and returns the stepped one."""
    state, _ = prefix_state([5, 12], H=2, Dk=2, Dv=2)
    state = dev(state)
    q, k, v, g, lam = (dev(x) for x in step_inputs(state, 7))
    before = state.clone()
    o, after = hodlr.log_linear_attn(q, k, v, g, lam, initial_state=state, output_final_state=True)
    assert torch.equal(state.states, before.states)
    stepped = state.clone()
    o2 = hodlr.log_linear_attn_step(q, k, v, g, lam, stepped, backend="triton")
    assert relative_error(o, o2) <= TOL and relative_error(after.with_slots(stepped.num_slots).states,
                                                           stepped.states) <= TOL
    assert np.array_equal(after.positions.cpu().numpy(), [6, 13])


def test_gated_delta_op_with_one_token_matches_step():
    """``log_linear_gated_delta_rule`` with T == 1 and a state (on a GPU: the decode kernel) leaves the
    given state alone and returns the stepped one."""
    state = dev(gated_delta_cache([5, 12], H=2, Dk=2, Dv=2, seed=3))
    q, k, v, g, beta, lam = (dev(x) for x in gated_delta_step_inputs(state, 7))
    before = state.clone()
    o, after = hodlr.log_linear_gated_delta_rule(q, k, v, g, beta, lam, initial_state=state, output_final_state=True)
    assert torch.equal(state.states.nan_to_num(), before.states.nan_to_num())
    stepped = state.clone()
    o2 = hodlr.log_linear_gated_delta_step(q, k, v, g, beta, lam, stepped, backend="triton")
    live = ((stepped.positions[:, None] >> torch.arange(stepped.num_slots, device=DEVICE)) & 1).bool()
    live = live[:, None, :, None, None]
    assert relative_error(o, o2) <= TOL and relative_error(
        torch.where(live, after.with_slots(stepped.num_slots).states, 0.0), torch.where(live, stepped.states, 0.0)) <= TOL
    assert np.array_equal(after.positions.cpu().numpy(), [6, 13])


@pytest.mark.parametrize("op", ["attention", "gated_delta"])
def test_packed_tokens_one_a_sequence_are_a_step(op):
    """Packed sequences of one token each continuing from their states (a server's decoding batch)
    give the step's outputs and states (on a GPU the op runs the step itself, the tokens moved to
    the batch axis)."""
    positions = [5, 12, 0, 31]
    N = len(positions)
    cache = dev(gated_delta_cache(positions, H=2, Dk=3, Dv=4, seed=21))
    q, k, v, g, beta, lam = (dev(x) for x in gated_delta_step_inputs(cache, 22))
    cu = torch.arange(N + 1, device=DEVICE)
    packed = [x.transpose(0, 1) for x in (q, k, v, g, beta, lam)]  # (1, N, ...)
    stepped = cache.clone()
    if op == "attention":
        o, after = hodlr.log_linear_attn(*packed[:4], packed[5], initial_state=cache, output_final_state=True,
                                         cu_seqlens=cu)
        want = hodlr.log_linear_attn_step(q, k, v, g, lam, stepped)
    else:
        o, after = hodlr.log_linear_gated_delta_rule(*packed, initial_state=cache, output_final_state=True,
                                                     cu_seqlens=cu)
        want = hodlr.log_linear_gated_delta_step(q, k, v, g, beta, lam, stepped)
    assert o.shape == (1, N, 2, 4) and relative_error(o.transpose(0, 1), want) <= TOL
    live = ((stepped.positions[:, None] >> torch.arange(stepped.num_slots, device=DEVICE)) & 1).bool()
    live = live[:, None, :, None, None]
    assert torch.equal(after.positions, stepped.positions)
    assert relative_error(torch.where(live, after.with_slots(stepped.num_slots).states, 0.0),
                          torch.where(live, stepped.states, 0.0)) <= TOL


@pytest.mark.interpreter
def test_bench_decode_gpu_step_smoke():
    """``hodlr bench-decode --gpu-step`` on the CPU (interpreter, tiny sizes): the code path runs
    and the byte model counts 2 * live + 1 state matrices."""
    from hodlr import bench_decode

    res = bench_decode.run(["--gpu-step", "--skip", "step", "memory", "matmul", "--gpu-device", "cpu",
                            "--gpu-batch", "1", "--gpu-heads", "2", "--gpu-d", "16", "--gpu-positions", "3", "4"])
    rows = res["gpu_step"]
    assert rows["3"]["state_bytes"] == 5 * 2 * 16 * 16 * 4 and rows["4"]["live_slots"] == 1
    assert rows["3"]["gated_delta_us"] > 0 and rows["4"]["gated_delta_torch_us"] > 0
    assert "decode step" in bench_decode._report(res) and "Gated DeltaNet" in bench_decode._report(res)


@pytest.mark.parametrize("step", ["triton", "torch", "gated_delta_triton", "gated_delta_torch"])
def test_first_step_ignores_the_log_decay_of_position_zero(step):
    """The log-decay of absolute position 0 multiplies no pair (the state is empty): a first step
    with g = inf gives what g = 0 gives, as the ops do."""
    gen = torch.Generator().manual_seed(5)
    B, H, D = 2, 2, 3
    q, v = (dev(torch.randn(B, 1, H, D, generator=gen)) for _ in range(2))
    k = dev(torch.nn.functional.normalize(torch.randn(B, 1, H, D, generator=gen), dim=-1))
    beta, lam = dev(torch.rand(B, 1, H, generator=gen)), dev(torch.rand(B, 1, H, 5, generator=gen))
    results = []
    for g in (torch.zeros(B, 1, H), torch.full((B, 1, H), float("inf"))):
        g = dev(g)
        state = hodlr.LogLinearState.zeros(B, H, D, D, slots=3, dtype=KERNEL_DT, device=DEVICE)
        if step.startswith("gated_delta"):
            o = hodlr.log_linear_gated_delta_step(q, k, v, g, beta, lam, state, backend=step.rsplit("_", 1)[1])
        else:
            o = hodlr.log_linear_attn_step(q, k, v, g, lam, state, backend=step)
        results.append((o, state.states))
    (o0, s0), (o1, s1) = results
    assert torch.isfinite(o1).all() and torch.equal(o0, o1) and torch.equal(s0, s1)


@pytest.mark.parametrize("L", [0, 3])
@pytest.mark.parametrize("validate", [True, False])
def test_steps_of_no_sequence(L, validate):
    """A step of an empty batch (``B = 0``) returns an empty output and changes nothing, whatever
    the width of the level scales, with or without validation (either op)."""
    state = hodlr.LogLinearState.zeros(0, 2, 2, 3, max_position=8, dtype=DT)
    q, v = torch.ones(0, 1, 2, 2, dtype=DT), torch.ones(0, 1, 2, 3, dtype=DT)
    lam, beta = torch.ones(0, 1, 2, L, dtype=DT), torch.ones(0, 1, 2, dtype=DT)
    assert hodlr.log_linear_attn_step(q, q, v, None, lam, state, validate=validate).shape == (0, 1, 2, 3)
    assert hodlr.log_linear_gated_delta_step(q, q, v, None, beta, lam, state, validate=validate).shape == (0, 1, 2, 3)


@pytest.mark.parametrize("op, backend", [("attention", "triton"), ("attention", "torch"), ("gated_delta", "triton"),
                                         ("gated_delta", "torch")])
def test_state_indices_step_rows_of_a_cache_in_place(op, backend):
    """``state_indices``: the inputs' rows step the named rows of a larger cache in place, as stepping
    those rows alone does, and leave the other rows as they were; repeated or out-of-range rows are
    refused with validation, a wrong index tensor always."""
    cache, _ = prefix_state([0, 5, 3, 8, 6], H=2, Dk=2, Dv=3)
    cache = dev(cache)
    idx = torch.tensor([3, 0], device=DEVICE)
    q, k, v, g, lam = (dev(x) for x in step_inputs(cache.index_select(idx), 6))
    beta = torch.rand(2, 1, 2, dtype=KERNEL_DT, device=DEVICE)

    def step(state, **kw):
        if op == "attention":
            return hodlr.log_linear_attn_step(q, k, v, g, lam, state, backend=backend, **kw)
        return hodlr.log_linear_gated_delta_step(q, k, v, g, beta, lam, state, backend=backend, **kw)

    alone = cache.index_select(idx)
    want = step(alone)
    for validate in (True, False):
        got_cache = cache.clone()
        got = step(got_cache, state_indices=idx, validate=validate)
        assert relative_error(got, want) <= TOL
        assert torch.equal(got_cache.positions, torch.tensor([1, 5, 3, 9, 6], device=DEVICE))
        assert relative_error(got_cache.states[idx], alone.states) <= TOL
        assert torch.equal(got_cache.states[[1, 2, 4]], cache.states[[1, 2, 4]])
    for bad, message in ((torch.tensor([3, 3]), r"state_indices must name distinct rows of the state's 5, got a row "
                                                r"twice"),
                         (torch.tensor([3, 5]), r"state_indices must name distinct rows of the state's 5, got 5 outside "
                                                r"\[0, 5\)")):
        with pytest.raises(ValueError, match=message):
            step(cache.clone(), state_indices=bad.to(DEVICE))
    with pytest.raises(TypeError, match=r"state_indices must be an int64 tensor, got list"):
        step(cache.clone(), state_indices=[3, 0])
    with pytest.raises(ValueError, match=r"state_indices must have shape \(2,\) \(one state row for each row of q\)"):
        step(cache.clone(), state_indices=torch.tensor([3, 0, 1], device=DEVICE))
    with pytest.raises(TypeError, match=r"q must be a torch.Tensor"):  # q is checked before the indices it counts
        hodlr.log_linear_attn_step(None, None, None, None, None, cache.clone(), state_indices=idx)


def gated_delta_cache(positions, H, Dk, Dv, seed, slots=None):
    """A float64 CPU cache at ``positions`` holding random states in its live slots (every state
    is one some prefix could leave: the step is linear in it) and NaN in the empty ones (never read)."""
    gen = torch.Generator().manual_seed(seed)
    size = {"max_position": max(positions) + 2} if slots is None else {"slots": slots}
    state = hodlr.LogLinearState.zeros(len(positions), H, Dk, Dv, dtype=DT, **size)
    state.positions[:] = torch.tensor(positions)
    live = ((state.positions[:, None] >> torch.arange(state.num_slots)) & 1).bool()
    X = torch.randn(state.states.shape, generator=gen, dtype=DT)
    state.states.copy_(torch.where(live[:, None, :, None, None], X, float("nan")))
    return state


def gated_delta_step_inputs(state, seed, grouped=True):
    """``(q, k, v, g, beta, lam)`` of one step from ``state`` (unit keys, the unread scales NaN)."""
    q, k, v, g, lam = step_inputs(state, seed, grouped)
    gen = torch.Generator().manual_seed(seed + 1)
    beta = 2 * torch.rand(v.shape[:3], generator=gen, dtype=DT)
    return q, torch.nn.functional.normalize(k, dim=-1), v, g, beta, lam


@pytest.mark.parametrize("decay", [True, False])
@pytest.mark.parametrize("grouped", [True, False])
def test_gated_delta_decode_kernel_equals_one_call(decay, grouped):
    """The Gated DeltaNet decode kernel (``backend="triton"``) from mixed positions equals a one-token
    call of the recurrence continuing from the same cache: outputs, states (NaN in the empty slots
    never read) and positions, over three steps, and equals the torch step there."""
    cache = gated_delta_cache(POSITIONS, H=2, Dk=3, Dv=5, seed=7)
    a, b = dev(cache), dev(cache)
    want_state = cache
    for t in range(3):
        q, k, v, g, beta, lam = gated_delta_step_inputs(want_state, 20 + t, grouped)
        g = g if decay else None
        want, want_state = hodlr.log_linear_gated_delta_rule(q, k, v, g, beta, lam, initial_state=want_state,
                                                             output_final_state=True, backend="fenwick", scale=0.7)
        inputs = [dev(x) for x in (q, k, v, g, beta, lam)]
        o1 = hodlr.log_linear_gated_delta_step(*inputs, a, backend="triton", scale=0.7)
        o2 = hodlr.log_linear_gated_delta_step(*inputs, b, backend="torch", scale=0.7)
        assert relative_error(o1.cpu(), want) <= TOL and relative_error(o2.cpu(), want) <= TOL
        assert a.positions.tolist() == [p + t + 1 for p in POSITIONS]
        live = ((a.positions.cpu()[:, None] >> torch.arange(a.num_slots)) & 1).bool()[:, None, :, None, None]
        S = a.num_slots
        got, want_s = (torch.where(live, x, 0.0) for x in (a.states.cpu(), want_state.states[:, :, :S].to(DT)))
        assert relative_error(got, want_s) <= TOL


def test_gated_delta_decode_kernel_takes_wide_heads():
    """Keys and values 256 wide (the Gated DeltaNet layer's default head, wider than the chunk
    kernels take): the decode kernel steps them as the recurrence does."""
    cache = gated_delta_cache([5, 12], H=1, Dk=256, Dv=256, seed=12)
    q, k, v, g, beta, lam = gated_delta_step_inputs(cache, 13)
    want, after = hodlr.log_linear_gated_delta_rule(q, k, v, g, beta, lam, initial_state=cache, output_final_state=True,
                                                     backend="fenwick")
    state = dev(cache)
    o = hodlr.log_linear_gated_delta_step(*(dev(x) for x in (q, k, v, g, beta, lam)), state, backend="triton")
    live = ((state.positions.cpu()[:, None] >> torch.arange(state.num_slots)) & 1).bool()[:, None, :, None, None]
    assert relative_error(o.cpu(), want) <= TOL
    assert relative_error(torch.where(live, state.states.cpu(), 0.0),
                          torch.where(live, after.states[:, :, :state.num_slots], 0.0)) <= TOL


def test_gated_delta_decode_kernel_leaves_rows_that_do_not_fit():
    """Without validation a row whose step would leave the slots keeps its state and position and
    gets NaN; the other rows step (the kernel as the torch step)."""
    cache = gated_delta_cache([3, 1], H=1, Dk=2, Dv=2, seed=8, slots=2)  # 3 -> 4 needs 3 slots
    inputs = [dev(x) for x in gated_delta_step_inputs(cache, 9)]
    outs = []
    for backend in ("triton", "torch"):
        state = dev(cache)
        before = state.clone()
        o = hodlr.log_linear_gated_delta_step(*inputs, state, backend=backend, validate=False)
        assert torch.isnan(o[0]).all() and torch.isfinite(o[1]).all()
        assert state.positions.tolist() == [3, 2]
        assert torch.equal(state.states[0].nan_to_num(), before.states[0].nan_to_num())
        outs.append((o[1], state.states[1]))
    assert relative_error(outs[0][0], outs[1][0]) <= TOL and relative_error(outs[0][1], outs[1][1]) <= TOL


def test_gated_delta_step_takes_the_backend_argument_of_the_attention_step():
    """``log_linear_gated_delta_step`` takes ``backend=`` as ``log_linear_attn_step`` does: ``auto``
    is ``torch`` on the CPU, anything else is refused by name."""
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 1, 2, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    g, beta = -torch.rand(2, 1, 2, generator=gen, dtype=torch.float64), torch.rand(2, 1, 2, dtype=torch.float64)
    lam = torch.rand(2, 1, 2, 3, dtype=torch.float64)
    outs = []
    for backend in ("auto", "torch"):
        cache = hodlr.LogLinearState.zeros(2, 2, 4, 4, max_position=4, dtype=torch.float64)
        outs.append(hodlr.log_linear_gated_delta_step(q, k, v, g, beta, lam, cache, backend=backend))
    assert torch.equal(outs[0], outs[1])
    with pytest.raises(ValueError, match=r"backend must be 'auto', 'triton' or 'torch', got 'fenwick'"):
        hodlr.log_linear_gated_delta_step(q, k, v, g, beta, lam, cache, backend="fenwick")
    with pytest.raises(TypeError, match="backend must be a string, 'auto', 'triton' or 'torch', got int"):
        hodlr.log_linear_gated_delta_step(q, k, v, g, beta, lam, cache, backend=1)
