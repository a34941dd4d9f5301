"""The Triton backward kernels give the dense float64 gradients.

On the CPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set below before
anything imports triton): hypothesis draws masks (never-read scales poisoned with NaN),
operands and cotangents; every gradient of :func:`hodlr.kernels.attention` and
:func:`hodlr.kernels.matmul` must match the dense backend's autograd gradients to
``1e-10`` (float64) or ``1e-5`` (float32), on lengths that are not multiples of the chunk,
and never-read scales must get exactly 0.  The ``gpu`` tests run on CUDA: bfloat16 gradients
against the float64 reference (``<= 1e-2`` per gradient) and against
flash-linear-attention's ``chunk_log_linear_attn`` when it is importable.
"""

from __future__ import annotations

import importlib

import torch

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import given, settings, strategies as st  # noqa: E402

from hodlr import fenwick  # noqa: E402
import hodlr  # noqa: E402
from hodlr import kernels  # noqa: E402

from hodlr import backends as registry  # noqa: E402
from hodlr.testing import TOLERANCES, attention_inputs, batch_shapes, masks, operands, relative_error, st_lengths  # noqa: E402

from test_ops import assert_elementwise  # noqa: E402

CHUNK = 16
"""Small chunk for the interpreter tests, so that short sequences span several chunks and
span several levels of the block sums."""



def _leaves(tensors):
    return [None if x is None else x.detach().clone().requires_grad_(True) for x in tensors]


def _dense_grads(op, q, k, v, lam, g, scale, w):
    """The dense backend's float64 gradients (inputs converted to float64 first)."""
    leaves = _leaves([None if x is None else x.double() for x in (q, k, v, lam, g)])
    M = hodlr.LogLinearMask(leaves[3], leaves[4])
    if op == "attention":
        out = hodlr.attention(*leaves[:3], M, scale=scale, backend="dense")
    else:
        out = hodlr.matmul(M, leaves[2], backend="dense")
    used = [x for x in leaves if x is not None]
    return _named(leaves, torch.autograd.grad((out * w.double()).sum(), used, allow_unused=True), op)


def _triton_grads(op, q, k, v, lam, g, scale, w, chunk=CHUNK, through=None):
    leaves = _leaves([q, k, v, lam, g])
    if through is not None:  # the registered backend, through the public API
        M = hodlr.LogLinearMask(leaves[3], leaves[4])
        out = (hodlr.attention(*leaves[:3], M, scale=scale, backend=through) if op == "attention"
               else hodlr.matmul(M, leaves[2], backend=through))
    elif op == "attention":
        out = kernels.attention(*leaves, scale, chunk=chunk)
    else:
        out = kernels.matmul(leaves[3], leaves[4], leaves[2], chunk=chunk)
    assert out.requires_grad, "result is cut off from the autograd graph"
    used = [x for x in leaves if x is not None]
    return _named(leaves, torch.autograd.grad((out * w.to(out.dtype)).sum(), used, allow_unused=True), op)


def _named(leaves, grads, op):
    names = [n for n, x in zip(["q", "k", "v", "level_scales", "log_decay"], leaves) if x is not None]
    out = dict(zip(names, grads))
    if op == "matmul":
        out.pop("q", None), out.pop("k", None)
    return out


def _check(got, want, tol, what, T):
    for key, expected in want.items():
        actual = got[key] if got[key] is not None else torch.zeros_like(expected)
        err = relative_error(actual, expected)
        assert err <= tol, f"{what}: d{key} relative error {err:.3e} > {tol:.0e} (T={T})"


def _check_unread_zero(dlam, T):
    read = torch.as_tensor(fenwick.read_levels(T, dlam.shape[-1]), device=dlam.device)
    unread = dlam[..., ~read]
    assert torch.equal(unread, torch.zeros_like(unread)), "never-read level scales got a nonzero gradient"


def _inputs(M, q, k, v):
    return q, k, v, M.level_scales, M.log_decay


@pytest.mark.interpreter
@settings(max_examples=12)
@given(data=st.data())
def test_attention_gradients_match_dense(data):
    M = data.draw(masks(T=st_lengths(max_value=80), batch_shape=batch_shapes(2, 2), library="torch", dtype=torch.float64))
    q, k, v = data.draw(attention_inputs(M, Dk=st.integers(1, 5), Dv=st.integers(1, 5)))
    scale = data.draw(st.sampled_from([1.0, 0.3]))
    batch = torch.broadcast_shapes(M.batch_shape, q.shape[:-2], k.shape[:-2], v.shape[:-2])
    w = torch.as_tensor(np.random.default_rng(data.draw(st.integers(0, 2**31))).standard_normal(batch + (M.T, v.shape[-1])))
    args = _inputs(M, q, k, v)
    got = _triton_grads("attention", *args, scale, w)
    _check(got, _dense_grads("attention", *args, scale, w), TOLERANCES["grad_float64"], "attention", M.T)
    _check_unread_zero(got["level_scales"], M.T)


@pytest.mark.interpreter
@settings(max_examples=10)
@given(data=st.data())
def test_matmul_gradients_match_dense(data):
    M = data.draw(masks(T=st_lengths(max_value=80), batch_shape=batch_shapes(2, 2), library="torch", dtype=torch.float64))
    x = data.draw(operands(M, D=st.integers(1, 5)))
    batch = torch.broadcast_shapes(M.batch_shape, x.shape[:-2])
    w = torch.as_tensor(np.random.default_rng(data.draw(st.integers(0, 2**31))).standard_normal(batch + x.shape[-2:]))
    args = (None, None, x, M.level_scales, M.log_decay)
    got = _triton_grads("matmul", *args, 1.0, w)
    _check(got, _dense_grads("matmul", *args, 1.0, w), TOLERANCES["grad_float64"], "matmul", M.T)
    _check_unread_zero(got["level_scales"], M.T)


def _case(T, rng, dtype=torch.float64, batch=(2,), Dk=3, Dv=4, decay=0.5, poison=True):
    L = fenwick.num_levels(T) + 1
    lam = torch.as_tensor(rng.uniform(0.3, 1.2, batch + (T, L)), dtype=dtype)
    if poison:
        lam = hodlr.testing.poison_unread(lam)
    g = None if decay is None else torch.as_tensor(-rng.uniform(0.0, decay, batch + (T,)), dtype=dtype)
    q = torch.as_tensor(rng.standard_normal((1,) * len(batch) + (T, Dk)), dtype=dtype)
    k = torch.as_tensor(rng.standard_normal(batch + (T, Dk)), dtype=dtype)
    v = torch.as_tensor(rng.standard_normal(batch + (T, Dv)), dtype=dtype)
    w = torch.as_tensor(rng.standard_normal(batch + (T, Dv)), dtype=dtype)
    return q, k, v, lam, g, w


@pytest.mark.interpreter
@pytest.mark.parametrize("T, decay", [(T, decay) for T in (1, 17, 63, 65) for decay in (None, 0.5, 30.0)]
                         + [(2, None), (3, 0.5), (15, 30.0), (16, None), (33, 0.5), (129, 30.0), (257, 0.5),
                            (64, 0.5), (128, None)])  # whole chunks too: the kernels' FULL_CHUNKS variant
def test_awkward_lengths(T, decay, rng):
    q, k, v, lam, g, w = _case(T, rng, decay=decay)
    for op in ("attention", "matmul"):
        got = _triton_grads(op, q, k, v, lam, g, 0.5, w)
        _check(got, _dense_grads(op, q, k, v, lam, g, 0.5, w), TOLERANCES["grad_float64"], op, T)
        _check_unread_zero(got["level_scales"], T)


def _backward_against_dense(module, monkeypatch, T, rng, what, **case):
    """``module.attention_backward`` (its settings patched by the caller, its scratch NaN-filled)
    against the dense float64 gradients; every level that no row reads gets exactly 0."""
    monkeypatch.setattr(module, "scratch", lambda *a: torch.full(*a[:1], float("nan"), dtype=a[1], device=a[2]))
    q, k, v, lam, g, w = _case(T, rng, **case)
    want = _dense_grads("attention", q, k, v, lam, g, 0.5, w)
    got = module.attention_backward(q, k, v, lam, g, 0.5, w, chunk=CHUNK)
    got = dict(zip(["q", "k", "v", "level_scales", "log_decay"], (got[0].sum(0, keepdim=True),) + got[1:]))
    _check(got, want, TOLERANCES["grad_float64"], what, T)
    _check_unread_zero(got["level_scales"], T)


@pytest.mark.interpreter
@pytest.mark.parametrize("T", [1, 17, 65, 200])
@pytest.mark.parametrize("tile_chunks", [1, 2, 16])
def test_block_sum_tiles(T, tile_chunks, rng, monkeypatch):
    """The query-side block sums: blocks of at most ``TILE_CHUNKS`` chunks summed whole, larger
    ones tile by tile with atomic adds (small tiles make short sequences take that path)."""
    module = importlib.import_module("hodlr.kernels.attention_backward")
    monkeypatch.setattr(module, "TILE_CHUNKS", tile_chunks)
    _backward_against_dense(module, monkeypatch, T, rng, f"tiles of {tile_chunks} chunks", Dk=5, Dv=3)


@pytest.mark.interpreter
@pytest.mark.parametrize("T, decay", [(1000, 0.5), (1041, 30.0)])
def test_deep_hierarchy(T, decay, rng, monkeypatch):
    """Six and seven chunk levels (63 and 66 chunks of 16): the later readers and the spanning
    pairs' products formed from the top level down for pairs of chunks (the last without its odd
    chunk at 63), their weights summed per chunk; the kernels' scratch NaN-filled."""
    module = importlib.import_module("hodlr.kernels.attention_backward")
    _backward_against_dense(module, monkeypatch, T, rng, f"{T} tokens", Dk=3, Dv=2, decay=decay)


@pytest.mark.interpreter
@pytest.mark.parametrize("chunk", [16, 32, 64])
def test_chunk_sizes(chunk, rng):
    T = 150
    q, k, v, lam, g, w = _case(T, rng)
    got = _triton_grads("attention", q, k, v, lam, g, 1.0, w, chunk=chunk)
    _check(got, _dense_grads("attention", q, k, v, lam, g, 1.0, w), TOLERANCES["grad_float64"], f"chunk {chunk}", T)


@pytest.mark.interpreter
@pytest.mark.parametrize("T, decay, Dk, Dv", [(17, None, 40, 33), (70, 0.5, 40, 33), (70, 0.5, 40, 17),
                                              (17, None, 10, 33), (65, 0.5, 33, 1)])
def test_feature_tiles(T, decay, Dk, Dv, rng, monkeypatch):
    """Heads wider than ``MAX_TILE`` split into (Dk-tile, Dv-tile) programs, one diagonal of tiles
    a launch, whose shares of dq, dk, dv are added launch by launch and whose partial dλ and
    decay sums are added after (the layout of 256-wide heads on a GPU); square and oblong tilings,
    the kernels' scratch (running sums included) NaN-filled."""
    module = importlib.import_module("hodlr.kernels.attention_backward")
    monkeypatch.setattr(module, "MAX_TILE", 16)
    _backward_against_dense(module, monkeypatch, T, rng, "feature tiles", Dk=Dk, Dv=Dv, decay=decay)


@pytest.mark.interpreter
@pytest.mark.parametrize("T, decay, max_tile", [(70, 0.5, 128), (17, None, 128), (70, 0.5, 16)])
def test_span_key_rows(T, decay, max_tile, rng, monkeypatch):
    """The span kernel on feature tiles of fewer key rows than the chunk kernel's
    (``SPAN_KEY_ROWS``): partial Frobenius products summed by ``_span_weight_kernel``, the later
    readers' block sums stored tile by tile; the kernels' scratch NaN-filled."""
    module = importlib.import_module("hodlr.kernels.attention_backward")
    monkeypatch.setattr(module, "SPAN_KEY_ROWS", 8)
    monkeypatch.setattr(module, "MAX_TILE", max_tile)
    _backward_against_dense(module, monkeypatch, T, rng, "span tiles", Dk=40, Dv=33, decay=decay)


@pytest.mark.interpreter
@pytest.mark.parametrize("T, decay, max_tile", [(1, 0.5, 128), (17, None, 128), (70, 0.5, 128), (70, 30.0, 128),
                                                (1, 0.5, 16), (17, None, 16), (70, 30.0, 16)])
def test_query_and_key_sides(T, decay, max_tile, rng, monkeypatch):
    """The chunk kernel as two launches, the query side and the key side (``SIDE_LAUNCHES``), with
    whole heads and with (Dk-tile, Dv-tile) programs; outputs and the kernels' scratch NaN-filled."""
    module = importlib.import_module("hodlr.kernels.attention_backward")
    monkeypatch.setitem(module.SIDE_LAUNCHES, "attention_backward", 2)
    monkeypatch.setattr(module, "MAX_TILE", max_tile)
    _backward_against_dense(module, monkeypatch, T, rng, "two sides", Dk=40, Dv=33, decay=decay)


@pytest.mark.interpreter
@pytest.mark.parametrize("T, period", [(2, 2), (3, 2), (17, 2), (40, 2), (100, 37), (300, 50)])
@pytest.mark.parametrize("sides", [1, 2])
def test_strong_decay_gradients(T, period, sides, rng, monkeypatch):
    """Decay steps of -31 every ``period`` positions, steps near 0 elsewhere (float64): the decay
    gradient at a strong step is ~1e-12 of the pair weights around it, and must still match the
    dense reference to 1e-10 element by element (each pair is summed once, inside a chunk and
    across chunks; differences of row and column sums or of prefix sums over the chunks left such
    elements ~1e-3 off)."""
    module = importlib.import_module("hodlr.kernels.attention_backward")
    monkeypatch.setitem(module.SIDE_LAUNCHES, "attention_backward", sides)
    q, k, v, lam, _, w = _case(T, rng, batch=(1,), Dk=2, Dv=2)
    u = np.arange(T)
    g = torch.as_tensor(np.where((u % period == period - 1), -31.0, -rng.uniform(0, 1e-3, T)))[None]
    for op in ("attention", "matmul"):
        got = _triton_grads(op, q, k, v, lam, g, 1.0, w)
        want = _dense_grads(op, q, k, v, lam, g, 1.0, w)
        _check(got, want, TOLERANCES["grad_float64"], op, T)
        assert_elementwise(got["log_decay"], want["log_decay"], 1e-10, f"{op}, T={T}: dlog_decay")


@pytest.mark.interpreter
@pytest.mark.parametrize("Dk, Dv", [(5, 3), (20, 17)])
def test_gradients_into_strided_buffers(Dk, Dv, rng, monkeypatch):
    """``out=``: buffers laid out like (B, T, H, ·) inputs seen as (B, H, T, ·), NaN-filled, get
    the gradients in place (returned as they are) and equal the freshly allocated ones; with
    feature tiles ``dλ`` (summed over the tiles after) comes in a new tensor instead.  Entries may
    be None (those gradients come in new tensors); ``dq`` without ``dk`` is not written in place."""
    module = importlib.import_module("hodlr.kernels.attention_backward")
    if Dk > 16:
        monkeypatch.setattr(module, "MAX_TILE", 16)
    B, H, T = 2, 2, 33
    q, k, v, lam, g, w = _case(T, rng, batch=(B, H), Dk=Dk, Dv=Dv)
    want = module.attention_backward(q, k, v, lam, g, 0.5, w, chunk=CHUNK)
    out = tuple(torch.full((B, T, H, x.shape[-1]), float("nan"), dtype=x.dtype).transpose(1, 2)
                for x in (q, q, v, lam))
    got = module.attention_backward(q, k, v, lam, g, 0.5, w, chunk=CHUNK, out=out)
    assert all((a is b) == (name != "dl" or Dk <= 16) for a, b, name in zip(got[:4], out, ("dq", "dk", "dv", "dl")))
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    for given in ((False, False, True, True), (True, False, False, True)):
        part = tuple(torch.full_like(x, float("nan")) if use else None for x, use in zip(out, given))
        got = module.attention_backward(q, k, v, lam, g, 0.5, w, chunk=CHUNK, out=part)
        in_place = (False, False, given[2], given[3] and Dk <= 16)
        assert all((a is b) == kept for a, b, kept in zip(got[:4], part, in_place))
        for a, b in zip(got, want):
            assert torch.equal(a, b)


@pytest.mark.interpreter
@pytest.mark.parametrize("Hqk", [3, 1])
def test_operator_backward_gradients_laid_out_as_the_inputs(Hqk, rng):
    """The operator's backward on the triton backend (``attention_state_vjp``, no state) hands back
    the gradients of ``v`` and the level scales laid out as its ``(N, H, T, ·)`` views of fla-layout
    inputs (so the operator copies neither), with one or three value heads a query/key head, and
    ``dq``, ``dk`` too where every value head has its own (the log-decay's is assembled by torch from
    per-chunk parts); all equal the chunked backend's."""
    from hodlr.backends import chunked, triton as triton_backend

    N, T, H, D = 2, 21, 3, 3
    t = lambda *shape: torch.as_tensor(rng.standard_normal(shape))  # noqa: E731
    q, k, v, do = t(N, T, Hqk, D), t(N, T, Hqk, D), t(N, T, H, D), t(N, T, H, D)
    g = -torch.as_tensor(rng.uniform(0, 0.5, (N, T, H)))
    lam = torch.as_tensor(rng.uniform(0.2, 1.5, (N, T, H, fenwick.num_levels(T))))
    q, k, v, do, g, lam = (x.transpose(1, 2) for x in (q, k, v, do, g, lam))
    got = triton_backend.attention_state_vjp(q, k, v, lam, g, 0.5, None, None, None, do, None)
    leaves = [x.detach().requires_grad_() for x in (q, k, v, lam, g)]
    qk = [x.repeat_interleave(H // Hqk, 1) for x in leaves[:2]]
    o = chunked.attention(*qk, *leaves[2:], 0.5)
    want = torch.autograd.grad(o, leaves, do)
    for name, x, ref, like in zip(("q", "k", "v", "level_scales", "log_decay"), got, want, (q, k, v, lam, g)):
        if name in ("v", "level_scales") or (Hqk == H and name in ("q", "k")):
            assert x.stride() == like.stride(), name
        assert relative_error(x, ref) <= 1e-10, name


@pytest.mark.interpreter
@pytest.mark.parametrize("T, decay", [(1, 0.5), (33, None), (70, 30.0)])
def test_saved_states_equal_recomputed(T, decay, rng):
    """The forward's chunk states kept for the backward (``save_states=True``, the default) give
    the gradients of a backward that recomputes them, bit for bit; and so does
    ``attention_backward`` handed them directly."""
    q, k, v, lam, g, w = _case(T, rng, decay=decay)
    grads = []
    for save in (True, False):
        leaves = _leaves([q, k, v, lam, g])
        out = kernels.attention(*leaves, 0.5, chunk=CHUNK, save_states=save)
        used = [x for x in leaves if x is not None]
        grads.append(torch.autograd.grad((out * w).sum(), used))
    module = importlib.import_module("hodlr.kernels.attention_backward")
    _, saved = kernels.attention_forward(q, k, v, lam, g, 0.5, chunk=CHUNK, return_states=True)
    direct = [x for x in module.attention_backward(q, k, v, lam, g, 0.5, w, chunk=CHUNK, states=saved)
              if x is not None]
    direct[0] = direct[0].sum(0, keepdim=True)  # q is broadcast over the batch
    for a, b, c in zip(*grads, direct):
        assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.interpreter
@pytest.mark.parametrize("keep", [True, False])
def test_option_decides_what_the_public_call_keeps(keep, rng, monkeypatch):
    """``hodlr.options.attention_save_states`` through ``hodlr.attention(..., backend="triton")``:
    the graph holds the inputs and, when True, the states and log-decays; the gradients are the
    same either way."""
    monkeypatch.setattr(hodlr.options, "attention_save_states", keep)
    q, k, v, lam, g, w = _case(40, rng)
    leaves = _leaves([q, k, v, lam, g])
    out = hodlr.attention(*leaves[:3], hodlr.LogLinearMask(leaves[3], leaves[4]), scale=0.5, backend="triton")
    assert len(out.grad_fn.saved_tensors) == (7 if keep else 5)
    got = torch.autograd.grad((out * w).sum(), leaves)
    monkeypatch.setattr(hodlr.options, "attention_save_states", not keep)
    again = _leaves([q, k, v, lam, g])
    out = hodlr.attention(*again[:3], hodlr.LogLinearMask(again[3], again[4]), scale=0.5, backend="triton")
    for a, b in zip(got, torch.autograd.grad((out * w).sum(), again)):
        assert torch.equal(a, b)
    with pytest.raises(TypeError, match="hodlr.options.attention_save_states must be a bool, got str"):
        hodlr.options.attention_save_states = "yes"


@pytest.mark.interpreter
def test_saved_states_refused_when_they_do_not_fit(rng):
    q, k, v, lam, g, w = _case(40, rng)
    module = importlib.import_module("hodlr.kernels.attention_backward")
    _, (states, logdec) = kernels.attention_forward(q, k, v, lam, g, 0.5, chunk=CHUNK, return_states=True)
    with pytest.raises(ValueError, match="states must be the forward's"):
        module.attention_backward(q, k, v, lam, g, 0.5, w, chunk=2 * CHUNK, states=(states, logdec))
    with pytest.raises(ValueError, match="states must be the forward's"):
        module.attention_backward(q, k, v, lam, g, 0.5, w, chunk=CHUNK, states=(states.float(), logdec))
    with pytest.raises(TypeError, match="states must be the"):
        module.attention_backward(q, k, v, lam, g, 0.5, w, chunk=CHUNK, states=states)
    with pytest.raises(TypeError, match="save_states must be a bool, got str"):
        kernels.attention(q, k, v, lam, g, 0.5, save_states="yes")


@pytest.mark.interpreter
@pytest.mark.parametrize("T", [5, 40, 100])
def test_float32(T, rng):
    q, k, v, lam, g, w = _case(T, rng, dtype=torch.float32)
    for op in ("attention", "matmul"):
        got = _triton_grads(op, q, k, v, lam, g, 0.5, w)
        _check(got, _dense_grads(op, q, k, v, lam, g, 0.5, w), TOLERANCES["interpreter_float32"], op, T)


@pytest.mark.interpreter
@pytest.mark.parametrize("T", [3, 33, 65])
def test_unread_finite_scales_get_exactly_zero(T, rng):
    """Unread scales hold finite values here, so a leak would show as a number."""
    q, k, v, lam, g, w = _case(T, rng, poison=False)
    read = torch.as_tensor(fenwick.read_levels(T, lam.shape[-1]))
    for op in ("attention", "matmul"):
        dlam = _triton_grads(op, q, k, v, lam, g, 1.0, w)["level_scales"]
        _check_unread_zero(dlam, T)
        assert bool((dlam[..., read] != 0).all()), f"{op}: a read scale got a zero gradient"


@pytest.mark.interpreter
def test_gradcheck(rng):
    T = 37
    q, k, v, lam, g, _ = _case(T, rng, batch=(), Dk=2, Dv=2, poison=False)
    inputs = tuple(x.requires_grad_(True) for x in (q, k, v, lam, g))
    assert torch.autograd.gradcheck(lambda *a: kernels.attention(*a, 0.6, chunk=CHUNK), inputs, fast_mode=True)
    assert torch.autograd.gradcheck(lambda lam, g, x: kernels.matmul(lam, g, x, chunk=CHUNK), inputs[3:] + inputs[2:3],
                                    fast_mode=True)


@pytest.mark.interpreter
@settings(max_examples=10)
@given(data=st.data())
def test_registered_backend_gradients(data):
    """Once ``backend="triton"`` is registered and runs here, its gradients (through the
    public API) are the dense ones."""
    module = registry.load("triton")
    assert module.unavailable_reason("torch", torch.device("cpu")) is None, \
        "under the interpreter backend='triton' must run on torch CPU tensors"
    M = data.draw(masks(T=st_lengths(max_value=80), library="torch", dtype=torch.float64))
    q, k, v = data.draw(attention_inputs(M, Dk=st.integers(1, 4), Dv=st.integers(1, 4)))
    w = torch.ones(torch.broadcast_shapes(M.batch_shape, v.shape[:-2]) + v.shape[-2:], dtype=torch.float64)
    args = _inputs(M, q, k, v)
    for op in ("attention", "matmul"):
        got = _triton_grads(op, *args, 0.5, w, through="triton")
        _check(got, _dense_grads(op, *args, 0.5, w), TOLERANCES["grad_float64"], f"backend=triton {op}", M.T)


# -- GPU ------------------------------------------------------------------------------------

def _gpu_case(B, H, T, D, seed, decay=0.05):
    """bf16 ``q, k, v, level_scales, dO`` and a float32 log-decay (as models keep it)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    L = fenwick.num_levels(T)

    def rnd(*shape, lo=None, hi=None):
        x = torch.rand(shape, generator=gen, device="cuda", dtype=torch.float32) if lo is not None else \
            torch.randn(shape, generator=gen, device="cuda", dtype=torch.float32)
        return x * (hi - lo) + lo if lo is not None else x

    q, k, v, do = (rnd(B, H, T, D) for _ in range(4))
    q, k = q / D**0.5, k / D**0.5
    lam = rnd(B, H, T, L, lo=0.2, hi=1.0)
    g = -rnd(B, H, T, lo=0.0, hi=decay)
    return [x.to(torch.bfloat16) for x in (q, k, v, lam)] + [g, do.to(torch.bfloat16)]


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 63, 1000, 2048, 4097])
def test_gpu_bf16_gradients_match_float64(T):
    q, k, v, lam, g, do = _gpu_case(2, 2, T, 64, seed=T)
    got = _triton_grads("attention", q, k, v, lam, g, 1.0, do, chunk=None)
    want = _dense_grads("attention", q, k, v, lam, g, 1.0, do)
    _check(got, want, TOLERANCES["gpu_bfloat16"], "bf16 attention", T)
    _check_unread_zero(got["level_scales"], T)
    got = _triton_grads("matmul", q, k, v, lam, g, 1.0, do, chunk=None)
    want = _dense_grads("matmul", q, k, v, lam, g, 1.0, do)
    _check(got, want, TOLERANCES["gpu_bfloat16"], "bf16 matmul", T)


@pytest.mark.gpu
@pytest.mark.parametrize("T,D", [(1, 64), (4097, 64), (1500, 128), (700, 256)])
def test_gpu_saved_states_equal_recomputed(T, D):
    """bf16 on the GPU: the forward keeps its float32 states for the backward, and the gradients
    equal those of a backward that recomputes them, bit for bit."""
    q, k, v, lam, g, do = _gpu_case(2, 2, T, D, seed=T + D)
    grads = []
    for save in (True, False):
        leaves = _leaves([q, k, v, lam, g])
        out = kernels.attention(*leaves, D ** -0.5, save_states=save)
        if save:
            saved = out.grad_fn.saved_tensors
            assert saved[5].dtype == torch.float32 and saved[6].dtype == torch.float32
        grads.append(torch.autograd.grad(out, leaves, do))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("T,D", [(4097, 16), (4097, 64), (1500, 100), (1500, 128), (700, 256), (300, 384)])
def test_gpu_widths_bf16(T, D):
    """Every head width the kernels tile differently (one feature tile up to 128, tiles beyond
    whose shares are added launch by launch: two a gradient at 256, three at 384; 100 is not a
    power of two)."""
    from hodlr.kernels import attention_backward

    q, k, v, lam, g, do = _gpu_case(1, 3, T, D, seed=T + D)
    want = _dense_grads("attention", q, k, v, lam, g, D ** -0.5, do)
    got = attention_backward(q, k, v, lam, g, D ** -0.5, do)
    got = dict(zip(["q", "k", "v", "level_scales", "log_decay"], got))
    _check(got, want, TOLERANCES["gpu_bfloat16"], f"bf16 D={D}", T)
    _check_unread_zero(got["level_scales"], T)


@pytest.mark.gpu
@pytest.mark.parametrize("T", [256, 2048, 4096])
def test_gpu_gradients_match_fla(T):
    fla = pytest.importorskip("fla.ops.log_linear_attn")
    q, k, v, lam, g, do = _gpu_case(1, 4, T, 64, seed=7 + T)
    ours = _triton_grads("attention", q, k, v, lam, g, 1.0, do, chunk=None)
    want = _dense_grads("attention", q, k, v, lam, g, 1.0, do)
    leaves = _leaves([x.transpose(1, 2).contiguous() for x in (q, k, v, lam)] + [g.transpose(1, 2).contiguous()])
    o, _ = fla.chunk_log_linear_attn(leaves[0], leaves[1], leaves[2], leaves[4], leaves[3], scale=1.0)
    grads = torch.autograd.grad((o * do.transpose(1, 2)).sum(), leaves)
    theirs = dict(zip(["q", "k", "v", "level_scales", "log_decay"], (x.transpose(1, 2) for x in grads)))
    for key in want:
        err_ours = relative_error(ours[key], want[key])
        err_fla = relative_error(theirs[key], want[key])
        err_between = relative_error(ours[key], theirs[key])
        print(f"T={T} d{key}: ours {err_ours:.2e}, fla {err_fla:.2e}, ours vs fla {err_between:.2e}")
        assert err_ours <= TOLERANCES["gpu_bfloat16"]
        assert err_between <= 2 * TOLERANCES["gpu_bfloat16"] or err_ours <= err_fla
