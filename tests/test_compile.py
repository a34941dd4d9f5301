"""``torch.compile`` and ``torch.library.opcheck`` for the custom operators behind
``hodlr.log_linear_attn`` (``torch.ops.hodlr.log_linear_attn``) and
``hodlr.log_linear_gated_delta_rule`` (``torch.ops.hodlr.log_linear_gated_delta_rule``), and the
Gated DeltaNet decoding step compiled without host reads.

On the CPU the compiled function uses the ``aot_eager`` backend (no C compiler needed), with
``fullgraph=True``: the op, its state hand-off and its backward stay in one graph, and give the
eager values and gradients.  A ``gpu`` test compiles with inductor on CUDA."""

from __future__ import annotations

import functools
import sys

import numpy as np
import pytest
import torch

import hodlr
import hodlr.ops  # noqa: F401  (registers torch.ops.hodlr.*)
from hodlr.testing import relative_error

from test_gated_delta import _step_case
from test_ops import draw_inputs

DT = torch.float64


def model(q, k, v, g, lam, state, backend):
    o, last = hodlr.log_linear_attn(q, k, v, g, lam, initial_state=state, output_final_state=True, scale=None,
                                    backend=backend)
    return (o.square().sum() + last.states.sum()) * 0.5, last.positions


def leaves(args):
    return [x.clone().requires_grad_() for x in args]


def assert_compiled_equals_eager(fn, args, positions, *extra):
    """``fn(*args[:-1], LogLinearState(args[-1], positions), *extra) -> (loss, positions)`` compiled
    whole (``fullgraph``, ``aot_eager``) and eager: the same loss (1e-12), positions and gradients
    of every argument."""
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")

    def run(f, xs):
        loss, pos = f(*xs[:-1], hodlr.LogLinearState(xs[-1], positions), *extra)
        return loss, pos, torch.autograd.grad(loss, xs)

    want, got = run(fn, leaves(args)), run(compiled, leaves(args))
    assert relative_error(got[0], want[0]) <= 1e-12 and torch.equal(got[1], want[1])
    for a, b in zip(got[2], want[2]):
        assert relative_error(a, b) <= 1e-12


def test_compile_fullgraph_aot_eager_matches_eager():
    q, k, v, g, lam = draw_inputs(0, 2, 21, 1, 2, 4, 3, "mild")
    lam = torch.nan_to_num(lam)
    _, state = hodlr.log_linear_attn(q, k, v, g, lam, output_final_state=True)
    state = state.with_slots(6)
    assert_compiled_equals_eager(model, [q, k, v, g, lam, state.states], state.positions, "chunked")


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
    return (*args[:4], args[4], 0.5, states, positions, cu, True, 5, backend, True)


@pytest.mark.parametrize("with_state, packed", [(True, True), (False, True), (True, False)])
def test_opcheck_chunked(with_state, packed):
    torch.library.opcheck(torch.ops.hodlr.log_linear_attn.default, op_args("chunked", with_state, packed))


@pytest.mark.interpreter
def test_opcheck_triton_state():
    torch.library.opcheck(torch.ops.hodlr.log_linear_attn.default, op_args("triton", True, True))


@pytest.mark.interpreter
@pytest.mark.parametrize("keep", [True, False])
def test_opcheck_triton_without_state(keep):
    """The interpreted Triton kernels through the op's plain path (no state, no packing), keeping
    the forward's chunk states for the backward or not."""
    args = list(op_args("triton", False, False))
    args[9] = False  # no final state: the plain forward and backward kernels
    args[12] = keep
    torch.library.opcheck(torch.ops.hodlr.log_linear_attn.default, tuple(args))


def _spy_on_kept(monkeypatch, backward_name, keyword):
    """Wrap the backward kernel launcher ``hodlr.kernels.<backward_name>`` where the operator's
    backward (compiled) and the autograd Function (eager) call it; returns the list to which each
    call appends whether it was handed the forward's intermediates (``keyword`` not None)."""
    from hodlr import kernels

    handed = []
    backward = getattr(kernels, backward_name)

    def spy(*args, **kw):
        handed.append(kw.get(keyword) is not None)
        return backward(*args, **kw)

    monkeypatch.setattr(kernels, backward_name, spy)
    monkeypatch.setattr(sys.modules["hodlr.kernels.autograd"], backward_name, spy)
    return handed


@pytest.mark.interpreter
@pytest.mark.parametrize("keep", [True, False])
def test_op_keeps_states_for_its_backward(keep, monkeypatch):
    """The operator's plain path keeps the forward's chunk states for its backward (extra outputs
    of the operator, eager and under ``torch.compile``) unless ``options.attention_save_states`` is
    False; the gradients are those of the recompute."""
    handed = _spy_on_kept(monkeypatch, "attention_backward", "states")
    monkeypatch.setattr(hodlr.options, "attention_save_states", keep)
    q, k, v, g, lam = draw_inputs(2, 1, 40, 2, 2, 3, 4, "mild")
    xs = [x.detach().requires_grad_() for x in (q, k, v, g, lam)]  # unread scales NaN
    do = torch.randn(1, 40, 4, 4, dtype=DT)  # (B, T, H, Dv): two query heads serve four value heads

    def fn(*a):
        return hodlr.log_linear_attn(*a, backend="triton")[0]

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    got = [torch.autograd.grad(f(*xs), xs, do) for f in (fn, compiled)]
    assert handed == [keep, keep]
    monkeypatch.setattr(hodlr.options, "attention_save_states", not keep)
    want = torch.autograd.grad(fn(*xs), xs, do)
    for a, b, c in zip(*got, want):
        assert torch.allclose(a, c, rtol=1e-12, atol=1e-12) and torch.allclose(b, c, rtol=1e-12, atol=1e-12)


@pytest.mark.interpreter
@pytest.mark.parametrize("with_state, packed, final", [(False, False, False), (False, False, True),
                                                       (True, False, True), (True, True, True)])
def test_compiled_triton_backward_equals_chunked(with_state, packed, final, monkeypatch):
    """The compiled op's backward on the triton backend comes straight from the backward kernels
    (no recomputed forward): its gradients, grouped heads and a final state padded to the
    compiled slot count included, equal the eager chunked backend's."""
    q, k, v, g, lam = draw_inputs(4, 1 if packed else 2, 37, 1, 2, 4, 3, "mild", extra_levels=3)
    lam = torch.nan_to_num(lam)
    cu = torch.tensor([0, 1, 20, 20, 37]) if packed else None
    n = 4 if packed else 2
    state = None
    if with_state:
        _, state = hodlr.log_linear_attn(q[:1, :9].expand(n, -1, -1, -1), k[:1, :9].expand(n, -1, -1, -1),
                                         v[:1, :9].expand(n, -1, -1, -1), g[:1, :9].expand(n, -1, -1),
                                         lam[:1, :9].expand(n, -1, -1, -1), output_final_state=True)
        state = state.with_slots(7)

    def fn(q, k, v, g, lam, init, backend):
        o, last = hodlr.log_linear_attn(q, k, v, g, lam, initial_state=init, output_final_state=final,
                                        cu_seqlens=cu, backend=backend)
        return o.square().sum() + (last.states.sum() if final else 0)

    args = [q, k, v, g, lam] + ([state.states] if with_state else [])
    xs_e, xs_c = leaves(args), leaves(args)
    def init(xs):
        return hodlr.LogLinearState(xs[5], state.positions) if with_state else None

    want = torch.autograd.grad(fn(*xs_e[:5], init(xs_e), "chunked"), xs_e)
    triton_backend, calls = hodlr.backends.load("triton"), []
    vjp = triton_backend.attention_state_vjp
    monkeypatch.setattr(triton_backend, "attention_state_vjp", lambda *a, **kw: calls.append(1) or vjp(*a, **kw))
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(*xs_c[:5], init(xs_c), "triton"), xs_c)
    assert calls == [1]
    for a, b in zip(got, want):
        assert relative_error(a, b) <= 1e-12


@pytest.mark.gpu
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


def test_compile_gradients_of_views():
    """q, k, v cut from one projection (strided views, as a layer makes them): the compiled
    backward gives each gradient in its input's layout, and the eager values."""
    def fn(z, lam):
        q, k, v = torch.split(z, [4, 4, 8], -1)
        o, _ = hodlr.log_linear_attn(q.unflatten(-1, (1, 4)), k.unflatten(-1, (1, 4)), v.unflatten(-1, (2, 4)),
                                     None, torch.nn.functional.softplus(lam))
        return o.square().sum()

    z = torch.randn(2, 13, 16, dtype=DT)
    lam = torch.randn(2, 13, 2, 5, dtype=DT)
    xs_e, xs_c = leaves([z, lam]), leaves([z, lam])
    want = torch.autograd.grad(fn(*xs_e), xs_e)
    got = torch.autograd.grad(torch.compile(fn, fullgraph=True, backend="aot_eager")(*xs_c), xs_c)
    for a, b in zip(got, want):
        assert relative_error(a, b) <= 1e-12


def gated_delta_model(q, k, v, g, beta, lam, state):
    o, last = hodlr.log_linear_gated_delta_rule(q, k, v, g, beta, lam, initial_state=state, output_final_state=True)
    return (o.square().sum() + last.states.sum()) * 0.5, last.positions


def gated_delta_inputs(B=2, T=11, H=2, D=3):
    gen = torch.Generator().manual_seed(3)
    q, v = (torch.randn(B, T, H, D, generator=gen, dtype=DT) for _ in range(2))
    k = torch.nn.functional.normalize(torch.randn(B, T, H, D, generator=gen, dtype=DT), dim=-1)
    g, beta = -torch.rand(B, T, H, generator=gen, dtype=DT), torch.rand(B, T, H, generator=gen, dtype=DT)
    lam = torch.rand(B, T, H, hodlr.num_levels(T + 5), generator=gen, dtype=DT)
    return q, k, v, g, beta, lam


def test_compile_gated_delta_rule_fullgraph_aot_eager_matches_eager():
    q, k, v, g, beta, lam = gated_delta_inputs()
    _, state = hodlr.log_linear_gated_delta_rule(q[:, :5], k[:, :5], v[:, :5], g[:, :5], beta[:, :5], lam[:, :5],
                                                 output_final_state=True)
    state = state.with_slots(5)
    assert_compiled_equals_eager(gated_delta_model, [q, k, v, g, beta, lam, state.states], state.positions)


@pytest.mark.parametrize("with_state, packed", [(True, True), (False, False)])
def test_opcheck_gated_delta_rule(with_state, packed):
    q, k, v, g, beta, lam = (x.transpose(1, 2).detach().requires_grad_() for x in gated_delta_inputs(1, 9, 2, 3))
    cu = torch.tensor([0, 4, 4, 9]) if packed else None
    Nseq = 3 if packed else 1
    states = positions = None
    if with_state:
        positions = torch.tensor([5, 0, 2][:Nseq])
        live = torch.tensor([[(p >> i) & 1 for i in range(3)] for p in positions.tolist()], dtype=DT)
        states = (torch.randn(Nseq, 2, 3, 3, 3, dtype=DT) * live[:, None, :, None, None]).requires_grad_()
    torch.library.opcheck(torch.ops.hodlr.log_linear_gated_delta_rule.default,
                          (q, k, v, g, beta, lam, 0.5, states, positions, cu, True, 5, "chunked", True))


@pytest.mark.interpreter
@pytest.mark.parametrize("packed", [False, True])
def test_opcheck_gated_delta_rule_triton_with_state(packed):
    """The operator on ``triton`` with states: its forward (without autograd) runs the Triton stream
    from the states, its backward recomputes with ``chunked``."""
    q, k, v, g, beta, lam = (x.transpose(1, 2).detach().requires_grad_() for x in gated_delta_inputs(1, 9, 2, 3))
    cu = torch.tensor([0, 4, 4, 9]) if packed else None
    Nseq = 3 if packed else 1
    positions = torch.tensor([5, 0, 2][:Nseq])
    live = torch.tensor([[(p >> i) & 1 for i in range(3)] for p in positions.tolist()], dtype=DT)
    states = (torch.randn(Nseq, 2, 3, 3, 3, dtype=DT) * live[:, None, :, None, None]).requires_grad_()
    torch.library.opcheck(torch.ops.hodlr.log_linear_gated_delta_rule.default,
                          (q, k, v, g, beta, lam, 0.5, states, positions, cu, True, 5, "triton", True))


@pytest.mark.gpu
def test_compiled_no_slower_than_eager_on_gpu():
    """B = 16, T = 16,384, H = 16, D = 64, bfloat16, default backend: a compiled function calling
    the op against the same function eager (medians of ``triton.testing.do_bench``), forward and
    forward + backward; the times are printed and written to ``HODLR_COMPILE_REPORT`` if set.  A
    shape whose time the GPU sets: at B = 4 (0.76 ms of kernels a forward) the compiled call's host
    work (torch.compile's guards and wrappers, about 0.25 ms more than eager on the H200's host)
    decides it, and the comparison measures the host (docs/gpu-results.md §1.3)."""
    import json
    import os

    from triton.testing import do_bench

    B, T, H, D = 16, 16384, 16, 64
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, T, H, D, device="cuda", generator=gen).to(torch.bfloat16).requires_grad_()
               for _ in range(3))
    g = (-0.1 * torch.rand(B, T, H, device="cuda", generator=gen)).requires_grad_()
    lam = (0.5 + torch.rand(B, T, H, hodlr.num_levels(T), device="cuda", generator=gen)).requires_grad_()
    do = torch.randn(B, T, H, D, device="cuda", generator=gen).to(torch.bfloat16)

    def layer(q, k, v, g, lam):
        return hodlr.log_linear_attn(q, k, v, g, lam, scale=None)[0]

    compiled = torch.compile(layer, fullgraph=True)
    xs = (q, k, v, g, lam)
    assert relative_error(compiled(*xs), layer(*xs)) <= 1e-2
    times = {}
    for name, fn in (("eager", layer), ("compiled", compiled)):
        with torch.no_grad():
            times[f"{name} forward ms"] = do_bench(lambda: fn(*xs))
        times[f"{name} forward+backward ms"] = do_bench(
            lambda: torch.autograd.grad(fn(*xs), xs, do), grad_to_none=list(xs))
    print(times)
    if os.environ.get("HODLR_COMPILE_REPORT"):
        with open(os.environ["HODLR_COMPILE_REPORT"], "w") as fh:
            json.dump(dict(times, B=B, T=T, H=H, D=D, dtype="bfloat16", device=torch.cuda.get_device_name()), fh)
    assert times["compiled forward ms"] <= 1.1 * times["eager forward ms"]
    assert times["compiled forward+backward ms"] <= 1.1 * times["eager forward+backward ms"]


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


@pytest.mark.interpreter
@pytest.mark.parametrize("decay", [True, False])
def test_compiled_gated_delta_triton_backward_equals_chunked(decay, monkeypatch):
    """The compiled Gated DeltaNet operator's backward on the triton backend comes straight from
    the backward kernels (``gated_delta_vjp``: no recomputed forward output) on calls without
    state; its gradients, grouped heads included, equal the eager chunked backend's."""
    q, k, v, g, beta, lam = gated_delta_inputs(2, 37, 4, 3)
    q, k = q[:, :, :2], k[:, :, :2]  # two query / key heads serve four value heads
    args = [q, k, v, g, beta, lam] if decay else [q, k, v, beta, lam]

    def fn(*xs, backend):
        q, k, v, *rest = xs
        g, beta, lam = rest if decay else (None, *rest)
        o, _ = hodlr.log_linear_gated_delta_rule(q, k, v, g, beta, lam, backend=backend)
        return o.square().sum()

    xs_e, xs_c = leaves(args), leaves(args)
    want = torch.autograd.grad(fn(*xs_e, backend="chunked"), xs_e)
    triton_backend, calls = hodlr.backends.load("triton"), []
    vjp = triton_backend.gated_delta_vjp
    monkeypatch.setattr(triton_backend, "gated_delta_vjp", lambda *a, **kw: calls.append(1) or vjp(*a, **kw))
    compiled = torch.compile(functools.partial(fn, backend="triton"), fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(*xs_c), xs_c)
    assert calls == [1]
    for a, b in zip(got, want):
        assert relative_error(a, b) <= 1e-10


@pytest.mark.interpreter
@pytest.mark.parametrize("keep, decay", [(True, True), (False, False)])
def test_gated_delta_op_keeps_chunks_for_its_backward(keep, decay, monkeypatch):
    """The Gated DeltaNet operator's plain path keeps the forward's ``X``, ``W`` and hierarchy for its
    backward (extra outputs of the operator, eager and under ``torch.compile``) unless
    ``options.gated_delta_save_states`` is False; the gradients are those of the recompute."""
    handed = _spy_on_kept(monkeypatch, "gated_delta_backward", "chunks")
    monkeypatch.setattr(hodlr.options, "gated_delta_save_states", keep)
    q, k, v, g, beta, lam = gated_delta_inputs(2, 37, 4, 3)
    q, k = q[:, :, :2], k[:, :, :2]  # two query / key heads serve four value heads
    if not decay:
        g = None
    xs = [x.detach().requires_grad_() for x in (q, k, v, beta, lam) + (() if g is None else (g,))]
    do = torch.randn(v.shape, dtype=v.dtype)

    def fn(q, k, v, beta, lam, g=None):
        return hodlr.log_linear_gated_delta_rule(q, k, v, g, beta, lam, backend="triton")[0]

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    got = [torch.autograd.grad(f(*xs), xs, do) for f in (fn, compiled)]
    assert handed == [keep, keep]
    monkeypatch.setattr(hodlr.options, "gated_delta_save_states", not keep)
    want = torch.autograd.grad(fn(*xs), xs, do)
    for a, b, c in zip(*got, want):
        assert torch.equal(a, c) and torch.equal(b, c)


@pytest.mark.interpreter
@pytest.mark.parametrize("op", ["attention", "gated_delta"])
def test_compiled_graph_follows_the_save_states_option(op, monkeypatch):
    """The option deciding whether an operator keeps its forward's intermediates is an argument of
    the operator read while tracing: flipping it retraces (a guard), so a graph never holds the
    other setting's outputs; the gradients are the same either way."""
    from torch._dynamo.testing import CompileCounterWithBackend

    option = f"{op}_save_states"
    q, k, v, g, beta, lam = gated_delta_inputs(1, 40, 2, 3)
    if op == "attention":
        xs, call = (q, k, v, g, lam), lambda *a: hodlr.log_linear_attn(*a, backend="triton")[0]
    else:
        xs, call = (q, k, v, g, beta, lam), lambda *a: hodlr.log_linear_gated_delta_rule(*a, backend="triton")[0]
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(call, fullgraph=True, backend=counter)
    grads = []
    for keep in (True, False, True):
        monkeypatch.setattr(hodlr.options, option, keep)
        leaves = [x.detach().requires_grad_() for x in xs]
        grads.append(torch.autograd.grad(compiled(*leaves).square().sum(), leaves))
    assert counter.frame_count == 2
    for other in grads[1:]:
        for a, b in zip(grads[0], other):
            assert torch.equal(a, b)


@pytest.mark.interpreter
@pytest.mark.parametrize("op", ["attention", "gated_delta"])
def test_compiled_graph_without_gradients_keeps_nothing(op, monkeypatch):
    """A compiled call that differentiates nothing (under ``no_grad``, or on inputs that do not
    require a gradient) runs the operator's plain forward: it keeps no intermediates for a backward
    (no extra stores, less host work), and its output is the eager one; with a gradient wanted the
    same compiled function keeps them (grad mode and ``requires_grad`` are guarded: a retrace)."""
    from hodlr.backends import triton as triton_backend

    name = "attention_keeping_states" if op == "attention" else "gated_delta_keeping_chunks"
    kept = []
    keeping = getattr(triton_backend, name)

    def spy(*args):
        kept.append(True)
        return keeping(*args)

    monkeypatch.setattr(triton_backend, name, spy)
    monkeypatch.setattr(hodlr.options, f"{op}_save_states", True)
    q, k, v, g, beta, lam = gated_delta_inputs(1, 40, 2, 3)
    if op == "attention":
        xs, call = (q, k, v, g, lam), lambda *a: hodlr.log_linear_attn(*a, backend="triton")[0]
    else:
        xs, call = (q, k, v, g, beta, lam), lambda *a: hodlr.log_linear_gated_delta_rule(*a, backend="triton")[0]
    compiled = torch.compile(call, fullgraph=True, backend="aot_eager")
    leaves = [x.detach().requires_grad_() for x in xs]
    want = call(*xs)
    with torch.no_grad():
        assert torch.equal(compiled(*leaves), want)
    assert torch.equal(compiled(*xs), want) and kept == []
    compiled(*leaves).sum().backward()
    assert kept == [True]


@pytest.mark.interpreter
@pytest.mark.parametrize("op", ["attention", "gated_delta"])
def test_compiled_kept_intermediates_do_not_pin_the_length(op):
    """The kept intermediates' shapes are linear in the chunk count: a compiled call whose length
    varies (dynamic after the second) traces at most twice for lengths of many chunk counts, and
    every call's gradients equal the eager ones."""
    from torch._dynamo.testing import CompileCounterWithBackend

    def call(q, k, v, g, beta, lam):
        if op == "attention":
            return hodlr.log_linear_attn(q, k, v, g, lam, backend="triton")[0]
        return hodlr.log_linear_gated_delta_rule(q, k, v, g, beta, lam, backend="triton")[0]

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(call, fullgraph=True, backend=counter)
    for T in (33, 70, 135):
        xs = [x.detach().requires_grad_() for x in gated_delta_inputs(1, T, 1, 2)]
        got = torch.autograd.grad(compiled(*xs).square().sum(), xs, allow_unused=True)
        want = torch.autograd.grad(call(*xs).square().sum(), xs, allow_unused=True)
        for a, b in zip(got, want):
            assert (a is None and b is None) or relative_error(a, b) <= 1e-12
    assert counter.frame_count <= 2


@pytest.mark.interpreter
@pytest.mark.parametrize("op", ["attention", "gated_delta"])
@pytest.mark.parametrize("B, T", [(0, 37), (2, 0)])
def test_compiled_call_without_tokens(op, B, T):
    """A compiled call with an empty batch or no tokens has zero gradients (the recomputed forward's
    output depends on no input)."""
    q, k, v, g, beta, lam = gated_delta_inputs(max(B, 1), max(T, 1), 2, 3)
    xs = [x[:B, :T].detach().requires_grad_() for x in ((q, k, v, g, lam) if op == "attention" else
                                                         (q, k, v, g, beta, lam))]

    def fn(*a):
        if op == "attention":
            return hodlr.log_linear_attn(*a, backend="triton")[0]
        return hodlr.log_linear_gated_delta_rule(*a, backend="triton")[0]

    got = torch.autograd.grad(torch.compile(fn, fullgraph=True, backend="aot_eager")(*xs).sum(), xs,
                              allow_unused=True)
    for x, d in zip(xs, got):
        assert d is not None and d.shape == x.shape and not d.any()


@pytest.mark.interpreter
@pytest.mark.parametrize("T, decay, keep", [(9, True, True), (9, True, False), (70, True, True), (70, False, False)])
def test_opcheck_gated_delta_rule_triton_without_state(T, decay, keep):
    """The interpreted Triton kernels through the Gated DeltaNet operator's plain path (its backward
    from ``gated_delta_vjp``), keeping the forward's chunks or not; at T = 70 (three chunks) the
    kept hierarchy has a top level that nothing reads, and the operator must still give the same
    outputs every call."""
    q, k, v, g, beta, lam = (x.transpose(1, 2).detach().requires_grad_() for x in gated_delta_inputs(1, T, 2, 3))
    torch.library.opcheck(torch.ops.hodlr.log_linear_gated_delta_rule.default,
                          (q, k, v, g if decay else None, beta, lam, 0.5, None, None, None, False, 0, "triton",
                           keep))


def test_attention_step_compiles_without_host_reads():
    """``log_linear_attn_step(..., backend="torch", validate=False)`` reads nothing on the host: it
    compiles with ``fullgraph=True`` and updates the cache as the eager step and one call do."""
    from test_decode import step_inputs
    from test_state import prefix_state

    cache, _ = prefix_state([0, 3, 8, 15], H=2, Dk=3, Dv=2)
    inputs = step_inputs(cache, 9)
    want_o, want_s = hodlr.log_linear_attn(*inputs, initial_state=cache, output_final_state=True, backend="fenwick")
    eager = cache.clone()

    def step(q, k, v, g, lam, states, positions):
        return hodlr.log_linear_attn_step(q, k, v, g, lam, hodlr.LogLinearState(states, positions, validate=False),
                                          backend="torch", validate=False)

    got = torch.compile(step, fullgraph=True, backend="aot_eager")(*inputs, cache.states, cache.positions)
    want = step(*inputs, eager.states, eager.positions)
    assert relative_error(got, want) <= 1e-12 and relative_error(got, want_o) <= 1e-12
    S = cache.num_slots
    assert relative_error(cache.states, eager.states) <= 1e-12
    assert relative_error(cache.states, want_s.states[:, :, :S]) <= 1e-12
    assert cache.positions.tolist() == eager.positions.tolist() == [1, 4, 9, 16]
