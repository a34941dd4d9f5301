"""``torch.compile`` and ``torch.library.opcheck`` for the custom operator behind
``hodlr.log_linear_attn`` (``torch.ops.hodlr.log_linear_attn``).

On the CPU the compiled function uses the ``aot_eager`` backend (no C compiler needed), with
``fullgraph=True``: the op, its state hand-off and its backward stay in one graph, and give the
eager values and gradients.  A ``gpu`` test compiles with inductor on CUDA."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import hodlr
from hodlr.testing import relative_error

from test_gated_delta import _step_case
from test_ops import TRITON_STATE, draw_inputs, require_state

DT = torch.float64
INTERP = hodlr.backends.load("triton").unavailable_reason("torch", torch.device("cpu")) is None
interpreter = pytest.mark.skipif(not INTERP, reason="CPU tensors on the triton backend need TRITON_INTERPRET=1")


def model(q, k, v, g, lam, state, backend):
    o, last = hodlr.log_linear_attn(q, k, v, g, lam, initial_state=state, output_final_state=True, scale=None,
                                    backend=backend)
    return (o.square().sum() + last.states.sum()) * 0.5, last.positions


def leaves(args):
    return [x.clone().requires_grad_() for x in args]


def test_compile_fullgraph_aot_eager_matches_eager():
    q, k, v, g, lam = draw_inputs(0, 2, 21, 1, 2, 4, 3, "mild")
    lam = torch.nan_to_num(lam)
    _, state = hodlr.log_linear_attn(q, k, v, g, lam, output_final_state=True)
    state = state.with_slots(6)
    eager_in, compiled_in = leaves([q, k, v, g, lam, state.states]), leaves([q, k, v, g, lam, state.states])
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")

    def run(fn, xs):
        loss, pos = fn(*xs[:5], hodlr.LogLinearState(xs[5], state.positions), "chunked")
        return loss, pos, torch.autograd.grad(loss, xs)

    want, got = run(model, eager_in), run(compiled, compiled_in)
    assert relative_error(got[0], want[0]) <= 1e-12 and torch.equal(got[1], want[1])
    for a, b in zip(got[2], want[2]):
        assert relative_error(a, b) <= 1e-12


def op_args(backend, with_state, packed):
    q, k, v, g, lam = draw_inputs(1, 1, 13, 1, 2, 3, 2, "mild", extra_levels=3)
    lam = torch.nan_to_num(lam)
    args = [x.transpose(1, 2).detach().requires_grad_() for x in (q, k, v, g, lam)]
    Nseq = 3 if packed else 1
    cu = torch.tensor([0, 4, 4, 13]) if packed else None
    states = positions = None
    if with_state:
        positions = torch.tensor([5, 0, 2][:Nseq])
        live = torch.tensor([[(p >> i) & 1 for i in range(3)] for p in positions.tolist()], dtype=DT)
        states = (torch.randn(Nseq, 2, 3, 3, 2, dtype=DT) * live[:, None, :, None, None]).requires_grad_()
    return (*args[:4], args[4], 0.5, states, positions, cu, True, 5, backend)


@pytest.mark.parametrize("with_state, packed", [(True, True), (False, True), (True, False)])
def test_opcheck_chunked(with_state, packed):
    torch.library.opcheck(torch.ops.hodlr.log_linear_attn.default, op_args("chunked", with_state, packed))


@interpreter
@pytest.mark.parametrize("backend", [pytest.param("triton", marks=TRITON_STATE)])
def test_opcheck_triton_state(backend):
    require_state(backend)
    torch.library.opcheck(torch.ops.hodlr.log_linear_attn.default, op_args(backend, True, True))


@interpreter
def test_opcheck_triton_without_state():
    """The interpreted Triton kernels through the op's plain path (no state, no packing)."""
    args = list(op_args("triton", False, False))
    args[9] = False  # no final state: the plain forward and backward kernels
    torch.library.opcheck(torch.ops.hodlr.log_linear_attn.default, tuple(args))


@pytest.mark.gpu
@TRITON_STATE
def test_compile_inductor_on_gpu():
    q, k, v, g, lam = (x.cuda().float() for x in draw_inputs(2, 2, 300, 2, 2, 64, 64, "mild"))
    lam = torch.nan_to_num(lam)
    compiled = torch.compile(model, fullgraph=True)
    xs_e, xs_c = leaves([q, k, v, g, lam]), leaves([q, k, v, g, lam])
    want = model(*xs_e, None, "auto")[0]
    got = compiled(*xs_c, None, "auto")[0]
    assert relative_error(got, want) <= 1e-5
    for a, b in zip(torch.autograd.grad(got, xs_c), torch.autograd.grad(want, xs_e)):
        assert relative_error(a, b) <= 1e-4


# -- log-linear Gated DeltaNet: torch.ops.hodlr.log_linear_gated_delta_rule ----------------------------
def gdn_inputs(seed, B, T, Hqk, grp, Dk, Dv, extra_levels=1):
    """fla-layout float64 inputs with unit keys and write strengths in [0, 1]."""
    q, k, v, g, lam = draw_inputs(seed, B, T, Hqk, grp, Dk, Dv, "mild", extra_levels=extra_levels)
    beta = torch.rand(B, T, Hqk * grp, generator=torch.Generator().manual_seed(seed), dtype=DT)
    return q, torch.nn.functional.normalize(k, dim=-1), v, g, beta, lam


def gdn_model(q, k, v, g, beta, lam, state, backend):
    o, last = hodlr.log_linear_gated_delta_rule(q, k, v, g, beta, lam, initial_state=state, output_final_state=True,
                                                backend=backend)
    return (o.square().sum() + last.states.sum()) * 0.5, last.positions


def test_gated_delta_compile_fullgraph_aot_eager_matches_eager():
    """The Gated DeltaNet op in one compiled graph (state in and out, grouped heads): the eager
    values and gradients, the initial state's included."""
    q, k, v, g, beta, lam = gdn_inputs(3, 2, 13, 1, 2, 4, 3)
    lam = torch.nan_to_num(lam)
    _, state = hodlr.log_linear_gated_delta_rule(*gdn_inputs(4, 2, 9, 1, 2, 4, 3), output_final_state=True)
    state = state.with_slots(5)
    eager_in, compiled_in = leaves([q, k, v, g, beta, lam, state.states]), leaves([q, k, v, g, beta, lam,
                                                                                   state.states])
    compiled = torch.compile(gdn_model, fullgraph=True, backend="aot_eager")

    def run(fn, xs):
        loss, pos = fn(*xs[:6], hodlr.LogLinearState(xs[6], state.positions), "chunked")
        return loss, pos, torch.autograd.grad(loss, xs)

    want, got = run(gdn_model, eager_in), run(compiled, compiled_in)
    assert relative_error(got[0], want[0]) <= 1e-12 and got[1].tolist() == [22, 22]
    for a, b in zip(got[2], want[2]):
        assert relative_error(a, b) <= 1e-12


def test_opcheck_gated_delta():
    """Packed sequences (one empty) continuing from states: fake tensors, schema and autograd."""
    q, k, v, g, beta, lam = gdn_inputs(5, 1, 13, 1, 2, 3, 2, extra_levels=3)
    args = [x.transpose(1, 2).detach().requires_grad_() for x in (q, k, v, beta, g, torch.nan_to_num(lam))]
    cu, positions = torch.tensor([0, 4, 4, 13]), torch.tensor([5, 0, 2])
    live = torch.tensor([[(p >> i) & 1 for i in range(3)] for p in positions.tolist()], dtype=DT)
    states = (torch.randn(3, 2, 3, 3, 2, dtype=DT) * live[:, None, :, None, None]).requires_grad_()
    torch.library.opcheck(torch.ops.hodlr.log_linear_gated_delta_rule.default,
                          (*args, 0.5, states, positions, cu, True, 5, "chunked"))


def test_gated_delta_step_compiles_without_host_reads():
    """``log_linear_gated_delta_step(..., validate=False)`` reads nothing on the host (what a CUDA
    graph needs): it compiles with ``fullgraph=True``, where a host read would break the graph, and
    updates the cache as the eager step does."""
    cache, token, want_o, want_s = _step_case(np.random.default_rng(7), [0, 3, 8, 15], S=5)
    eager = cache.clone()

    def step(q, k, v, g, beta, lam, states, positions):
        return hodlr.log_linear_gated_delta_step(q, k, v, g, beta, lam, hodlr.LogLinearState(states, positions,
                                                                                              validate=False),
                                                 validate=False)

    got = torch.compile(step, fullgraph=True, backend="aot_eager")(*token, cache.states, cache.positions)
    want = step(*token, eager.states, eager.positions)
    assert relative_error(got, want) <= 1e-12 and relative_error(got, want_o) <= 1e-12
    assert relative_error(cache.states, eager.states) <= 1e-12 and relative_error(cache.states, want_s) <= 1e-12
    assert cache.positions.tolist() == eager.positions.tolist() == [1, 4, 9, 16]
