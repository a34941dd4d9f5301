"""``hodlr.log_linear_attn``: state hand-off, packed sequences, gradients through the state.

Properties (hypothesis, float64, never-read level scales poisoned with NaN by absolute position):

* one call on ``[0, T)`` equals ``[0, a)`` with ``output_final_state`` then ``[a, T)`` from that
  state (split points 0, 1, non-multiples of the chunk), equals token-by-token steps, equals the
  dense float64 reference -- on every backend with state that runs on the CPU (``chunked``,
  ``fenwick``, ``triton`` under the interpreter);
* the chunked algorithm with small chunks (many chunks, every hierarchy level) and sequences at
  different positions equals the Fenwick scan and the dense reference;
* gradients through ``initial_state`` equal dense float64 gradients (chain rule through the
  prefix's final state) and finite differences;
* ``cu_seqlens``: outputs, gradients and final states equal the loop of per-sequence calls.

The ``triton`` legs run the Triton kernels' state keywords (``hodlr.kernels.attention(...,
initial_state=, initial_positions=, cu_seqlens=, output_final_state=)``) under the interpreter, with
fewer examples (``TRITON_EXAMPLES``).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import hodlr
from hodlr import fenwick
from hodlr.backends import chunked, fenwick as fenwick_backend
from hodlr.testing import TOLERANCES, decay_values, poison_unread, relative_error

TOL = TOLERANCES["cpu_float64"]
DT = torch.float64
FEW = settings(max_examples=12, deadline=None)


STATE_BACKENDS = ["chunked", "fenwick", "triton"]


def require_state(backend):
    """The triton legs run on CPU tensors under the interpreter (tests/test_gpu.py covers the GPU)."""
    if backend == "triton" and hodlr.backends.load("triton").unavailable_reason("torch", torch.device("cpu")):
        pytest.skip("the triton legs run on CPU tensors under TRITON_INTERPRET=1")


def per_backend(examples, triton_examples, strategies, body):
    """``{"triton": test, "other": test}``: ``body(backend, ...)`` under ``given(**strategies)`` with
    ``examples`` examples, ``triton_examples`` for the triton legs (the interpreter runs every
    program of the kernels in Python; ``tests/test_triton_state.py`` proves their paths one by one)."""
    return {"triton": settings(max_examples=triton_examples, deadline=None)(given(**strategies)(body)),
            "other": settings(max_examples=examples, deadline=None)(given(**strategies)(body))}


def run_leg(tests, backend):
    require_state(backend)
    tests["triton" if backend == "triton" else "other"](backend)


# -- inputs and references ----------------------------------------------------------------
def draw_inputs(seed, B, T, Hqk, grp, Dk, Dv, decay="mild", extra_levels=1):
    """fla-layout float64 inputs for positions ``[0, T)``; unread level scales are NaN."""
    rng = np.random.default_rng(seed)
    H = Hqk * grp
    L = fenwick.num_levels(max(T, 1)) + extra_levels
    q, k = (torch.tensor(rng.standard_normal((B, T, Hqk, Dk))) for _ in range(2))
    v = torch.tensor(rng.standard_normal((B, T, H, Dv)))
    lam = torch.tensor(rng.uniform(0.3, 1.5, (B, H, T, L)) * rng.choice([-1.0, 1.0], (B, H, T, L), p=[0.2, 0.8]))
    lam = poison_unread(lam).transpose(1, 2) if T else lam.transpose(1, 2)
    g = decay_values(rng, decay, (B, T, H))
    return q, k, v, None if g is None else torch.tensor(g), lam


def dense(q, k, v, g, lam, scale=1.0):
    """float64 dense reference on the fla layout (positions from 0)."""
    Hqk, H = q.shape[2], v.shape[2]
    q5, k5 = (x.transpose(1, 2)[:, :, None].expand(-1, -1, H // Hqk, -1, -1) for x in (q, k))
    v5, lam5 = (x.transpose(1, 2).unflatten(1, (Hqk, H // Hqk)) for x in (v, lam))
    g5 = None if g is None else g.transpose(1, 2).unflatten(1, (Hqk, H // Hqk))
    o = hodlr.attention(q5, k5, v5, hodlr.LogLinearMask(lam5, g5, validate=False), scale=scale, backend="dense")
    return o.flatten(1, 2).transpose(1, 2)


def dense_final_state(k, v, g, end, slots):
    """``(H, slots, Dk, Dv)``: the buckets of position ``end`` from the definition (one sequence,
    ``k (T, Hqk, Dk)``, ``v (T, H, Dv)``, ``g (T, H)``, all from position 0)."""
    H, Hqk = v.shape[1], k.shape[1]
    kk = k.repeat_interleave(H // Hqk, 1)
    out = torch.zeros((H, slots, k.shape[2], v.shape[2]), dtype=v.dtype)
    for lev in range(1, slots + 1):
        start, stop = fenwick.bucket(end, lev)
        if stop == start:
            continue
        w = torch.ones((stop - start, H), dtype=v.dtype)
        if g is not None:
            rev = torch.flip(torch.cumsum(torch.flip(g[:end], (0,)), 0), (0,))  # rev[m] = sum g[m..end-1]
            after = torch.cat([rev[1:], torch.zeros((1, H), dtype=v.dtype)])  # sum g[s+1..end-1]
            w = torch.exp(after[start:stop])
        out[:, lev - 1] = torch.einsum("sh,shk,shv->hkv", w, kk[start:stop], v[start:stop])
    return out


def assert_elementwise(got, want, tol, what):
    """Every element of ``got`` within ``tol`` relative of ``want``'s, and exactly ``want`` where
    that is 0 (decay gradients under strong steps, where a norm-wise error hides a small element)."""
    got, want = got.detach().cpu().flatten(), want.detach().cpu().flatten()
    zero = want == 0
    assert torch.equal(got[zero], want[zero]), f"{what}: not exactly 0 where the reference is"
    err = ((got - want).abs() / want.abs())[~zero]
    assert err.numel() == 0 or err.max() <= tol, f"{what}: element error {err.max():.2e}"


def cut(x, lo, hi):
    return None if x is None else x[:, lo:hi]


def call(args, lo, hi, **kw):
    q, k, v, g, lam = args
    return hodlr.log_linear_attn(cut(q, lo, hi), cut(k, lo, hi), cut(v, lo, hi), cut(g, lo, hi), cut(lam, lo, hi),
                                 **kw)


# -- split = full = steps = dense ---------------------------------------------------------
shapes = st.tuples(st.integers(1, 2), st.sampled_from([(1, 1), (1, 2), (2, 1), (2, 2)]), st.integers(1, 4),
                   st.integers(1, 4))


def _split_equals_full_and_dense(backend, shape, T, data, decay, seed):
    B, (Hqk, grp), Dk, Dv = shape
    a = data.draw(st.one_of(st.sampled_from([0, 1, T // 2, T - 1, T]), st.integers(0, T)), label="split")
    args = draw_inputs(seed, B, T, Hqk, grp, Dk, Dv, decay)
    scale = data.draw(st.sampled_from([1.0, 0.5, None]), label="scale")
    full, end = call(args, 0, T, scale=scale, output_final_state=True, backend=backend)
    first, mid = call(args, 0, a, scale=scale, output_final_state=True, backend=backend)
    second, last = call(args, a, T, scale=scale, initial_state=mid, output_final_state=True, backend=backend)
    assert mid.positions.tolist() == [a] * B and last.positions.tolist() == [T] * B
    assert relative_error(torch.cat([first, second], 1), full) <= TOL
    ref = dense(*args, scale=Dk ** -0.5 if scale is None else scale)
    assert relative_error(full, ref) <= TOL
    S = min(last.num_slots, end.num_slots)
    assert relative_error(last.states[:, :, :S], end.states[:, :, :S]) <= TOL
    q, k, v, g, lam = args
    for b in range(B):
        want = dense_final_state(k[b], v[b], None if g is None else g[b], T, last.num_slots)
        assert relative_error(last.states[b], want) <= TOL


SPLIT = per_backend(12, 3, dict(shape=shapes, T=st.sampled_from([1, 2, 3, 5, 17, 63, 64, 65, 70]), data=st.data(),
                                decay=st.sampled_from(["none", "mild", "strong"]), seed=st.integers(0, 2**31)),
                    _split_equals_full_and_dense)


@pytest.mark.parametrize("backend", STATE_BACKENDS)
def test_split_equals_full_and_dense(backend):
    run_leg(SPLIT, backend)


# -- the chunked algorithm at absolute positions, many chunks -----------------------------
@settings(max_examples=40, deadline=None)
@given(chunk=st.sampled_from([1, 2, 4, 8]), lengths=st.lists(st.integers(0, 40), min_size=1, max_size=4),
       starts=st.data(), packed=st.booleans(), decay=st.sampled_from(["none", "mild", "strong"]),
       seed=st.integers(0, 2**31))
def test_chunked_offsets_equal_scan(chunk, lengths, starts, packed, decay, seed):
    """Sequences at different positions (packed or in a batch), chunk sizes 1..8: the chunked
    algorithm against the Fenwick scan and, on the outputs, the dense reference."""
    if not packed:
        lengths = [lengths[0]] * len(lengths)
    a = starts.draw(st.lists(st.one_of(st.sampled_from([0, 1, 7, 8, 31, 32, 63]), st.integers(0, 100)),
                             min_size=len(lengths), max_size=len(lengths)), label="starts")
    n, Hqk, grp, Dk, Dv = len(lengths), 2, 2, 2, 3
    H = Hqk * grp
    total = max(x + y for x, y in zip(a, lengths))
    # every sequence drawn from position 0; its state at a[i] from the definition
    seqs = [draw_inputs(seed + i, 1, max(total, 1), Hqk, grp, Dk, Dv, decay) for i in range(n)]
    S = max(1, max(a).bit_length())
    init = torch.stack([dense_final_state(s[1][0], s[2][0], None if s[3] is None else s[3][0], a[i], S)
                        for i, s in enumerate(seqs)])
    pos = torch.tensor(a, dtype=torch.int64)
    parts = [[cut(x, a[i], a[i] + lengths[i]) for x in seqs[i]] for i in range(n)]
    if packed:
        layout = [None if parts[0][j] is None else torch.cat([p[j] for p in parts], 1) for j in range(5)]
        cu = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int64)
    else:
        layout = [None if parts[0][j] is None else torch.cat([p[j] for p in parts], 0) for j in range(5)]
        cu = None
    q, k, v, g, lam = (None if x is None else x.transpose(1, 2) for x in layout)
    args = (q, k, v, lam, g, 0.7, init, pos, cu, True)
    o1, (s1, p1) = chunked.attention_state(*args, chunk=chunk)
    o2, (s2, p2) = fenwick_backend.attention_state(*args)
    assert relative_error(o1, o2) <= TOL and relative_error(s1, s2) <= TOL
    assert p1.tolist() == p2.tolist() == [x + y for x, y in zip(a, lengths)]
    for i in range(n):
        if not lengths[i]:
            continue
        whole = [cut(x, 0, a[i] + lengths[i]) for x in seqs[i]]
        want = dense(*whole, scale=0.7)[:, a[i]:]
        got = o1[:, :, int(cu[i]):int(cu[i + 1])] if packed else o1[i:i + 1]
        assert relative_error(got.transpose(1, 2), want) <= TOL
        e = a[i] + lengths[i]
        s = seqs[i]
        ref = dense_final_state(s[1][0], s[2][0], None if s[3] is None else s[3][0], e, s1.shape[2])
        assert relative_error(s1[i], ref) <= TOL


# -- gradients ------------------------------------------------------------------------------
def _gradients_through_initial_state(backend, T, data, decay, seed):
    """d(loss)/d(every input) of ``prefix -> state -> continuation (+ its final state)`` against
    the same loss computed densely over the whole sequence (the state's gradient enters by the
    chain rule through the prefix's final state)."""
    a = data.draw(st.integers(1, T - 1), label="split")
    B, Hqk, grp, Dk, Dv = 2, 1, 2, 2, 3
    args = [x if x is None else x.clone().requires_grad_() for x in draw_inputs(seed, B, T, Hqk, grp, Dk, Dv, decay)]
    rng = np.random.default_rng(seed)
    w_o = torch.tensor(rng.standard_normal((B, T - a, Hqk * grp, Dv)))
    S = T.bit_length()
    w_s = torch.tensor(rng.standard_normal((B, Hqk * grp, S, Dk, Dv)))
    _, mid = call(args, 0, a, output_final_state=True, backend=backend)
    o, last = call(args, a, T, initial_state=mid, output_final_state=True, backend=backend)
    loss = (o * w_o).sum() + (last.with_slots(S).states * w_s).sum()
    live = [x for x in args if x is not None]
    got = torch.autograd.grad(loss, live)
    q, k, v, g, lam = args
    ref = (dense(*args)[:, a:] * w_o).sum() + sum(
        (dense_final_state(k[b], v[b], None if g is None else g[b], T, S) * w_s[b]).sum() for b in range(B))
    want = torch.autograd.grad(ref, live)
    for name, x, y in zip("qkvgl" if g is not None else "qkvl", got, want):
        assert not torch.isnan(x).any(), name
        if name == "l":  # never-read (NaN-poisoned) scales: the dense reference's NaN, the backend's exact 0
            unread = torch.isnan(y)
            assert torch.all(x[unread] == 0)
            y = torch.where(unread, 0.0, y)
        assert relative_error(x, y) <= 1e-10, name


GRADIENTS = per_backend(6, 2, dict(T=st.sampled_from([3, 9, 20]), data=st.data(),
                                   decay=st.sampled_from(["none", "mild"]), seed=st.integers(0, 2**31)),
                        _gradients_through_initial_state)


@pytest.mark.parametrize("backend", STATE_BACKENDS)
def test_gradients_through_initial_state(backend):
    run_leg(GRADIENTS, backend)


def test_initial_state_gradcheck():
    """Finite differences on the initial state (and q, v) of a continuation from position 5."""
    q, k, v, g, _ = draw_inputs(3, 1, 4, 1, 2, 2, 2, "mild")
    lam_c = torch.rand(1, 4, 2, fenwick.num_levels(9), dtype=DT)  # positions 5..8
    S = torch.randn(1, 2, 3, 2, 2, dtype=DT)
    S[:, :, 1] = 0  # position 5 = 0b101: slots 1 and 3 live

    def f(states, q, v):
        o, st_ = hodlr.log_linear_attn(q, k, v, g, lam_c, initial_state=hodlr.LogLinearState(states, torch.tensor([5])),
                                       output_final_state=True, backend="chunked")
        return o, st_.states

    assert torch.autograd.gradcheck(f, (S.requires_grad_(), q.requires_grad_(), v.requires_grad_()), fast_mode=True)


# -- packed sequences ------------------------------------------------------------------------
def _packed_equals_loop(backend, lengths, with_state, seed):
    if backend == "dense":
        with_state = False  # no state on the dense backend: packed calls run one call per sequence
    n, Hqk, grp, Dk, Dv = len(lengths), 1, 2, 3, 2
    T = sum(lengths)
    starts = [int(x) for x in np.random.default_rng(seed).integers(0, 40, n)] if with_state else [0] * n
    need = fenwick.num_levels(max(max(s + x for s, x in zip(starts, lengths)), 1))
    q, k, v, g, lam = draw_inputs(seed, 1, T, Hqk, grp, Dk, Dv, "mild", extra_levels=need)
    # poisoned by each token's absolute position (sequence i starts at starts[i])
    lam = poison_unread(torch.nan_to_num(lam, nan=0.5).transpose(1, 2), starts, lengths).transpose(1, 2)
    lam = lam.requires_grad_()
    q, k, v, g = (x.requires_grad_() for x in (q, k, v, g))
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32)
    state = None
    if with_state:
        S = max(1, max(starts).bit_length())
        states = torch.randn(n, Hqk * grp, S, Dk, Dv, dtype=DT)
        for i, s in enumerate(starts):
            states[i, :, [lev - 1 for lev in range(1, S + 1) if not (s >> (lev - 1)) & 1]] = 0
        state = hodlr.LogLinearState(states.requires_grad_(), torch.tensor(starts))
    final = with_state or backend != "dense"
    o, last = hodlr.log_linear_attn(q, k, v, g, lam, initial_state=state, output_final_state=final, cu_seqlens=cu,
                                    backend=backend)
    inputs = [x for x in (q, k, v, g, lam, None if state is None else state.states) if x is not None]
    if T == 0:
        return
    w = torch.randn_like(o)
    loss = (o * w).sum() + (last.states.sum() if final else 0)
    got = torch.autograd.grad(loss, inputs, allow_unused=True)
    outs, ref_loss = [], 0
    for i in range(n):
        lo, hi = int(cu[i]), int(cu[i + 1])
        oi, si = call((q, k, v, g, lam), lo, hi, initial_state=None if state is None else state[i],
                      output_final_state=final, backend=backend)
        outs.append(oi)
        ref_loss = ref_loss + (oi * w[:, lo:hi]).sum() + (si.states.sum() if final else 0)
        if final:
            S_i = min(si.num_slots, last.num_slots)
            assert relative_error(last.states[i:i + 1, :, :S_i], si.states[:, :, :S_i]) <= TOL
            assert int(last.positions[i]) == starts[i] + lengths[i]
    assert relative_error(o, torch.cat(outs, 1)) <= TOL
    want = torch.autograd.grad(ref_loss, inputs, allow_unused=True)
    for x, y in zip(got, want):
        assert relative_error(x, y) <= 1e-10 if y is not None else x is None or not x.any()


PACKED = per_backend(8, 3, dict(lengths=st.lists(st.sampled_from([0, 1, 2, 3, 5, 17, 63, 65]), min_size=1, max_size=3),
                                with_state=st.booleans(), seed=st.integers(0, 2**31)),
                     _packed_equals_loop)


@pytest.mark.parametrize("backend", ["chunked", "fenwick", "dense", "triton"])
def test_packed_equals_loop(backend):
    run_leg(PACKED, backend)


def test_many_packed_sequences():
    """10**5 sequences of lengths 0..3 in one call (chunked), against the loop on a sample."""
    rng = np.random.default_rng(0)
    n = 100_000
    lengths = rng.integers(0, 4, n)
    T = int(lengths.sum())
    q, k, v = (torch.randn(1, T, 1, 1, dtype=DT) for _ in range(3))
    g = -torch.rand(1, T, 1, dtype=DT)
    lam = torch.rand(1, T, 1, 3, dtype=DT)
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]))
    o, st_ = hodlr.log_linear_attn(q, k, v, g, lam, cu_seqlens=cu, output_final_state=True, backend="chunked")
    assert st_.positions.tolist() == lengths.tolist()
    for i in rng.integers(0, n, 20).tolist():
        lo, hi = int(cu[i]), int(cu[i + 1])
        oi, si = call((q, k, v, g, lam), lo, hi, output_final_state=True, backend="fenwick")
        assert relative_error(o[:, lo:hi], oi) <= TOL if hi > lo else True
        assert relative_error(st_.states[i, :, :si.num_slots], si.states[0]) <= TOL


# -- layout -----------------------------------------------------------------------------------
def test_fla_argument_order_and_defaults():
    """Positional calls in fla-core 0.6.0's order; ``scale=None`` is ``Dk ** -0.5``; grouped heads
    are read in place; float32 inputs keep a float32 state and bfloat16 outputs keep their dtype."""
    q, k, v, g, lam = draw_inputs(0, 2, 11, 2, 3, 4, 5, "mild")
    o1, s1 = hodlr.log_linear_attn(q, k, v, g, lam, None, True, None, None)
    o2, _ = hodlr.log_linear_attn(q, k, v, g, lam, scale=0.5)
    assert relative_error(o1, dense(q, k, v, g, lam, scale=0.5)) <= TOL
    assert relative_error(o2, o1) <= TOL
    assert s1.states.shape == (2, 6, 4, 4, 5) and s1.dtype == DT
    o3, s3 = hodlr.log_linear_attn(*(x.to(torch.bfloat16) for x in (q, k, v)), g.float(), lam.float(),
                                   output_final_state=True, scale=0.5)
    assert o3.dtype == torch.bfloat16 and s3.dtype == torch.float32
    assert relative_error(o3, o1) <= TOLERANCES["gpu_bfloat16"]


@pytest.mark.parametrize("op", ["log_linear_attn", "log_linear_gated_delta_rule"])
def test_head_first_inputs_warn_at_the_callers_line(op):
    """Head-first ``(B, H, T, D)`` tensors handed to the ``(B, T, H, D)`` ops (more tokens than
    heads, read as fewer tokens than heads) raise fla's ``UserWarning``, naming the caller's line;
    the same tensors transposed to the documented layout do not."""
    B, H, T, D = 1, 2, 8, 3
    q, k, v = (torch.randn(B, H, T, D, dtype=DT) for _ in range(3))
    g, beta = -torch.rand(B, H, T, dtype=DT), torch.rand(B, H, T, dtype=DT)
    head_first = [q, k, v, g] + ([beta] if op == "log_linear_gated_delta_rule" else [])
    fn = getattr(hodlr, op)
    with pytest.warns(UserWarning, match="fewer tokens than heads") as caught:
        fn(*head_first, torch.rand(B, H, T, fenwick.num_levels(H), dtype=DT))
    assert [w.filename for w in caught] == [__file__]
    flipped = [x.transpose(1, 2) for x in head_first]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fn(*flipped, torch.rand(B, T, H, fenwick.num_levels(T), dtype=DT))


@pytest.mark.parametrize("op", ["log_linear_attn", "log_linear_gated_delta_rule"])
def test_no_head_first_warning_with_a_state_no_tokens_or_inside_hodlr(op):
    """Fewer tokens than heads is no warning in a call with a state (a decoding step, a short
    continuation), with packed sequences, with no tokens, or from hodlr's own layers."""
    B, T, H, D = 2, 1, 4, 3
    q, k, v = (torch.randn(B, T, H, D, dtype=DT) for _ in range(3))
    g, beta = -torch.rand(B, T, H, dtype=DT), torch.rand(B, T, H, dtype=DT)
    args = [q, k, v, g] + ([beta] if op == "log_linear_gated_delta_rule" else [])
    lam = torch.rand(B, T, H, 3, dtype=DT)
    fn = getattr(hodlr, op)
    with pytest.warns(UserWarning, match="fewer tokens than heads"):
        _, state = fn(*args, lam, output_final_state=True)
    packed = [x.reshape((1, B * T) + x.shape[2:]) for x in args]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fn(*args, lam, initial_state=state)
        fn(*packed, lam.reshape(1, B * T, H, 3), cu_seqlens=torch.tensor([0, 1, 2]))
        fn(*(x[:, :0] for x in args), lam[:, :0])
        layer = hodlr.nn.LogLinearMamba2(num_heads=4, head_dim=3, hidden_size=6, state_size=5).double()
        layer(torch.randn(1, 2, 6, dtype=DT))


@pytest.mark.parametrize("B, T", [(2, 0), (0, 5)])
@pytest.mark.parametrize("op", ["log_linear_attn", "log_linear_gated_delta_rule"])
def test_calls_without_tokens_differentiate(op, B, T):
    """A call with no token (T = 0, or an empty batch) is part of the autograd graph: a backward
    through it gives every input an empty gradient of its shape, on every backend that runs it."""
    H, D = 2, 3
    t = lambda *shape: torch.rand(shape, dtype=torch.float64, requires_grad=True)  # noqa: E731
    q, k, v, g, lam = t(B, T, H, D), t(B, T, H, D), t(B, T, H, D), t(B, T, H), t(B, T, H, 4)
    args = (q, k, v, g, lam) if op == "log_linear_attn" else (q, k, v, g, t(B, T, H), lam)
    names = ["chunked", "fenwick"] + (["dense"] if op == "log_linear_attn" else [])
    for backend in names:
        o, _ = getattr(hodlr, op)(*args, backend=backend)
        grads = torch.autograd.grad(o.sum(), args)
        assert [x.shape for x in grads] == [x.shape for x in args], backend


@pytest.mark.parametrize("cu_seqlens", [None, [0, 0]])
@pytest.mark.parametrize("backend", ["chunked", "fenwick"])
@pytest.mark.parametrize("op", ["log_linear_attn", "log_linear_gated_delta_rule"])
def test_a_call_without_tokens_passes_its_state_on_in_new_tensors(op, backend, cu_seqlens):
    """A call with no token and a state returns that state in new tensors (a decoding step on it,
    which updates it in place, leaves the caller's state alone), its empty buckets' slots 0."""
    H, D = 2, 3
    state = hodlr.LogLinearState(torch.randn(1, H, 3, D, D, dtype=DT), torch.tensor([5]))  # slots 0, 2 live
    given = state.states.clone()
    e = lambda *shape: torch.zeros(shape, dtype=DT)  # noqa: E731
    args = [e(1, 0, H, D), e(1, 0, H, D), e(1, 0, H, D), e(1, 0, H)]
    if op == "log_linear_gated_delta_rule":
        args.append(e(1, 0, H))
    cu = None if cu_seqlens is None else torch.tensor(cu_seqlens)
    _, final = getattr(hodlr, op)(*args, e(1, 0, H, 4), initial_state=state, output_final_state=True,
                                  cu_seqlens=cu, backend=backend)
    assert final.states.data_ptr() != state.states.data_ptr() and final.positions.tolist() == [5]
    assert torch.equal(final.states[:, :, [0, 2]], given[:, :, [0, 2]])
    assert torch.equal(final.states[:, :, 1], torch.zeros_like(given[:, :, 1]))
    final.states.zero_()
    assert torch.equal(state.states, given)


@pytest.mark.parametrize("backend", ["chunked", "fenwick"])
def test_autocast_leaves_the_precision_to_the_inputs(backend):
    """Under ``torch.autocast`` every public operation computes in its inputs' dtypes, as outside it
    (bit for bit): float32 inputs are not run in bfloat16, and the final state keeps its dtype."""
    gen = torch.Generator().manual_seed(3)
    B, T, H, D = 1, 70, 2, 8
    q, k, v = (torch.randn(B, T, H, D, generator=gen) for _ in range(3))
    k = torch.nn.functional.normalize(k, dim=-1)
    g = -0.1 * torch.rand(B, T, H, generator=gen)
    beta = torch.rand(B, T, H, generator=gen)
    lam = torch.rand(B, T, H, fenwick.num_levels(T), generator=gen)
    M = hodlr.LogLinearMask(lam[0, :, 0], g[0, :, 0])
    x = q[0, :, 0]

    def calls():
        o, state = hodlr.log_linear_attn(q, k, v, g, lam, output_final_state=True, backend=backend)
        od, dstate = hodlr.log_linear_gated_delta_rule(q, k, v, g, beta, lam, output_final_state=True,
                                                       backend=backend)
        return [o, state.states, od, dstate.states, hodlr.matmul(M, x, backend=backend),
                hodlr.attention(x, x, x, M, backend=backend)]

    want = calls()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = calls()
    for a, b in zip(got, want):
        assert a.dtype == b.dtype == torch.float32
        assert torch.equal(a, b)
