"""The Triton kernels over sequences: recurrent state, packed sequences, final state, grouped heads.

Under ``TRITON_INTERPRET=1`` (float64): ``hodlr.kernels.attention`` with ``initial_state``,
``initial_positions``, ``cu_seqlens`` and ``output_final_state`` gives the outputs, final states and
every gradient (``q, k, v, level_scales, log_decay`` and the initial state) of the chunked backend's
``attention_state`` (the PyTorch reference, itself proven against the Fenwick scan and the dense
definition in ``tests/test_ops.py``) to ``1e-10``, and the dense float64 reference on outputs and
final states:

* a sequence split at a random point (0, 1, non-multiples of the chunk): the prefix's final state
  continues the suffix, and the pair equals one call over the whole sequence;
* packed sequences of lengths 0, 1 and non-multiples of the chunk, each continuing from its own
  state or starting at 0;
* grouped heads (``q, k`` with fewer heads than ``v``), feature tiles, the block sums' atomic path.

Every work buffer and the output are NaN-filled (an element read before it is written shows), and
never-read level scales are NaN.  The launch grids of a call over ``10**5`` sequences stay within
the limits of grid axes 1 and 2 (host side, the kernels stubbed; the ``gpu`` test runs it).
Chunk 16 keeps the interpreter's programs few.  Without ``TRITON_INTERPRET=1`` only the ``gpu``
test runs (on a CUDA GPU).
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from hodlr import fenwick, kernels
from hodlr.backends import chunked
from hodlr.testing import poison_unread, relative_error

from test_ops import assert_elementwise, dense, dense_final_state, draw_inputs

CHUNK = 16
TOL = 1e-10
FEW = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
forward = importlib.import_module("hodlr.kernels.attention")
backward = importlib.import_module("hodlr.kernels.attention_backward")


@pytest.fixture
def nan_buffers(monkeypatch):
    """Work buffers, hierarchies, final states and outputs of the state kernels filled with NaN."""
    def nan(shape, dtype, device):
        return torch.full(tuple(shape), float("nan"), dtype=dtype, device=device)

    def nan_output(out, shape, like, inputs=None):
        return nan(shape, like.dtype, like.device) if out is None else out

    for module in (forward, backward):
        monkeypatch.setattr(module, "scratch", nan)
    monkeypatch.setattr(forward, "output_buffer", nan_output)


def kernel_layout(args):
    """fla-layout ``(q, k, v, g, lam)`` -> the kernels' ``(q, k, v, lam, g)`` on ``(N, H, T, ·)``."""
    q, k, v, g, lam = args
    return [q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), lam.transpose(1, 2),
            None if g is None else g.transpose(1, 2)]


def triton_call(q, k, v, lam, g, scale, state, positions, cu, final=True):
    out = kernels.attention(q, k, v, lam, g, scale, chunk=CHUNK, initial_state=state, initial_positions=positions,
                            cu_seqlens=cu, output_final_state=final)
    return out if final else (out, (None, None))


def chunked_call(q, k, v, lam, g, scale, state, positions, cu, final=True):
    out = chunked.attention_state(q, k, v, lam, g, scale, state, positions, cu, final, chunk=4)
    return out if final else (out, (None, None))


def leaves(tensors):
    return [None if x is None else x.detach().clone().requires_grad_(True) for x in tensors]


def compare_grads(got, want, names, what):
    for name, x, y in zip(names, got, want):
        y = torch.zeros_like(x) if y is None else torch.nan_to_num(y)  # never-read scales: exactly 0
        x = torch.zeros_like(y) if x is None else x
        err = relative_error(x, y)
        assert err <= TOL, f"{what}: d{name} relative error {err:.2e}"


# -- a sequence split at a random point ---------------------------------------------------
def split_pipeline(call, xs, a, scale):
    """``[0, a)`` with its final state, then ``[a, T)`` continuing from it: ``(o, final, positions)``."""
    q, k, v, lam, g = xs
    B = q.shape[0]
    cut = [None if x is None else x[:, :, :a] for x in xs]
    rest = [None if x is None else x[:, :, a:] for x in xs]
    o1, (s1, p1) = call(*cut[:4], cut[4], scale, None, None, None)
    assert p1.tolist() == [a] * B
    o2, (s2, p2) = call(*rest[:4], rest[4], scale, s1, p1, None)
    return torch.cat([o1, o2], 2), s2, p2


@pytest.mark.interpreter
@settings(max_examples=4, **FEW)
@given(shape=st.sampled_from([(1, 1, 1), (2, 1, 2), (1, 2, 2)]), T=st.sampled_from([1, 2, 3, 17, 33]),
       data=st.data(), decay=st.sampled_from(["none", "mild", "strong"]), seed=st.integers(0, 2**31))
def test_split_equals_one_call(nan_buffers, shape, T, data, decay, seed):
    B, Hqk, grp = shape
    a = data.draw(st.one_of(st.sampled_from([0, 1, T // 2, T - 1, T]), st.integers(0, T)), label="split")
    Dk, Dv, scale = 3, 2, 0.6
    args = draw_inputs(seed, B, T, Hqk, grp, Dk, Dv, decay)
    xs = leaves(kernel_layout(args))
    o, final, pos = split_pipeline(triton_call, xs, a, scale)
    assert pos.tolist() == [T] * B
    rng = np.random.default_rng(seed)
    w_o = torch.as_tensor(rng.standard_normal(o.shape))
    w_s = torch.as_tensor(rng.standard_normal(final.shape))
    used = [x for x in xs if x is not None]
    names = [n for n, x in zip(["q", "k", "v", "level_scales", "log_decay"], xs) if x is not None]
    got = torch.autograd.grad((o * w_o).sum() + (final * w_s).sum(), used)
    ref = leaves(kernel_layout(args))
    o_ref, final_ref, _ = split_pipeline(chunked_call, ref, a, scale)
    S = min(final.shape[2], final_ref.shape[2])
    assert not final[:, :, S:].any() and not final_ref[:, :, S:].any()
    assert relative_error(o, o_ref) <= TOL and relative_error(final[:, :, :S], final_ref[:, :, :S]) <= TOL
    want = torch.autograd.grad((o_ref * w_o).sum() + (final_ref[:, :, :S] * w_s[:, :, :S]).sum(),
                               [x for x in ref if x is not None])
    compare_grads(got, want, names, f"split at {a} of {T}")
    # the dense definition over the whole sequence (one call)
    assert relative_error(o.transpose(1, 2), dense(*args, scale=scale)) <= TOL
    q, k, v, g, lam = args
    for b in range(B):
        want_s = dense_final_state(k[b], v[b], None if g is None else g[b], T, final.shape[2])
        assert relative_error(final[b], want_s) <= TOL


# -- packed sequences ------------------------------------------------------------------------
def live_state(rng, starts, H, Dk, Dv):
    """Random initial buckets of the live slots of each start position (the others 0)."""
    S = max(1, max(starts).bit_length())
    states = torch.as_tensor(rng.standard_normal((len(starts), H, S, Dk, Dv)))
    for i, a in enumerate(starts):
        states[i, :, [lev for lev in range(S) if not (a >> lev) & 1]] = 0
    return states


@pytest.mark.interpreter
@settings(max_examples=4, **FEW)
@given(lengths=st.lists(st.sampled_from([0, 1, 2, 3, 15, 17]), min_size=1, max_size=3),
       starts=st.lists(st.one_of(st.sampled_from([0, 1, 15, 16, 31, 64]), st.integers(0, 300)), min_size=3,
                       max_size=3),
       with_state=st.booleans(), final=st.booleans(), grouped=st.booleans(), decay=st.sampled_from(["none", "mild"]),
       seed=st.integers(0, 2**31))
def test_packed_sequences(nan_buffers, lengths, starts, with_state, final, grouped, decay, seed):
    """Outputs, final states and every gradient equal the chunked backend's (which equals the loop
    of per-sequence calls, ``tests/test_ops.py``)."""
    n, Dk, Dv = len(lengths), 2, 3
    Hqk, grp = (1, 2) if grouped else (1, 1)
    H = Hqk * grp
    T = sum(lengths)
    rng = np.random.default_rng(seed)
    starts = starts[:n] if with_state else [0] * n
    end = max(s + x for s, x in zip(starts, lengths))
    L = fenwick.num_levels(max(end, 1))
    q, k = (torch.as_tensor(rng.standard_normal((1, Hqk, T, Dk))) for _ in range(2))
    v = torch.as_tensor(rng.standard_normal((1, H, T, Dv)))
    lam = poison_unread(torch.as_tensor(rng.uniform(0.3, 1.5, (1, H, T, L))), starts, lengths)
    g = None if decay == "none" else torch.as_tensor(-rng.uniform(0, 1, (1, H, T)))
    cu = torch.as_tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int64)
    pos = torch.as_tensor(starts, dtype=torch.int64) if with_state else None
    state = live_state(rng, starts, H, Dk, Dv) if with_state else None
    inputs = [q, k, v, lam, g, state]
    names = ["q", "k", "v", "level_scales", "log_decay", "initial_state"]

    def run(call):
        xs = leaves(inputs)
        o, (s, p) = call(*xs[:5], 0.8, xs[5], pos, cu, final)
        loss = (o * torch.as_tensor(np.random.default_rng(seed + 1).standard_normal(o.shape))).sum()
        if final:  # weights of the slots both have (the kernels' state may have more, empty ones)
            w_s = np.random.default_rng(seed + 2).standard_normal(s.shape[:2] + (64,) + s.shape[3:])
            loss = loss + (s * torch.as_tensor(w_s[:, :, :s.shape[2]])).sum()
        used = [x for x in xs if x is not None]
        return o, s, p, torch.autograd.grad(loss, used, allow_unused=True) if T or final else [None] * len(used)

    o, s, p, got = run(triton_call)
    o_ref, s_ref, p_ref, want = run(chunked_call)
    assert relative_error(o, o_ref) <= TOL
    if final:
        assert p.tolist() == p_ref.tolist() == [a + x for a, x in zip(starts, lengths)]
        S = min(s.shape[2], s_ref.shape[2])
        assert relative_error(s[:, :, :S], s_ref[:, :, :S]) <= TOL and not s[:, :, S:].any()
    if T or final:
        compare_grads(got, want, [m for m, x in zip(names, inputs) if x is not None], f"packed {lengths} from {starts}")


@pytest.mark.interpreter
@pytest.mark.parametrize("lengths", [[2, 40], [100, 37, 130]])
def test_strong_decay_gradients(nan_buffers, lengths):
    """Packed sequences from position 0, final states returned, decay steps of -31 every 37th
    position and ~0 elsewhere (float64): where such a step leaves the decay gradient ~1e-12 of
    the pairs around it, it still matches the dense definition element by element to 1e-10
    (each term is summed once; prefix-sum differences left such elements ~1e-3 off)."""
    rng = np.random.default_rng(len(lengths))
    T, Dk, Dv, scale = sum(lengths), 2, 3, 0.7
    L = fenwick.num_levels(max(lengths))
    j = np.concatenate([np.arange(n) for n in lengths])
    q, k, v = (torch.as_tensor(rng.standard_normal((1, 1, T, d))) for d in (Dk, Dk, Dv))
    lam = torch.as_tensor(rng.uniform(0.3, 1.5, (1, 1, T, L)))
    g = torch.as_tensor(np.where((j % 37 == 0) & (j > 0), -31.0, -rng.uniform(0, 1e-3, T)))[None, None]
    cu = torch.as_tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int64)
    xs = leaves([q, k, v, lam, g])
    o, (final, _) = kernels.attention(*xs, scale, chunk=CHUNK, cu_seqlens=cu, output_final_state=True)
    w_o, w_s = torch.as_tensor(rng.standard_normal(o.shape)), torch.as_tensor(rng.standard_normal(final.shape))
    got = torch.autograd.grad((o * w_o).sum() + (final * w_s).sum(), xs)
    ref = leaves([q, k, v, lam, g])
    loss = 0
    for n, (lo, hi) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        qn, kn, vn, ln, gn = (x[0, :, lo:hi].transpose(0, 1)[None] for x in ref)  # (1, length, H, ·)
        loss = loss + (dense(qn, kn, vn, gn, ln, scale=scale) * w_o[:, :, lo:hi].transpose(1, 2)).sum()
        loss = loss + (dense_final_state(kn[0], vn[0], gn[0], hi - lo, final.shape[2]) * w_s[n]).sum()
    want = torch.autograd.grad(loss, ref)
    compare_grads(got, want, ["q", "k", "v", "level_scales", "log_decay"], f"packed {lengths}")
    assert_elementwise(got[4], want[4], TOL, f"packed {lengths}: dlog_decay")


# -- the other paths of the kernels ----------------------------------------------------------
def one_case(seed, T, starts, Hqk=1, grp=1, Dk=3, Dv=4, dtype=torch.float64):
    """Packed sequences of lengths ``T`` (a list) from ``starts`` with states: kernel inputs."""
    rng = np.random.default_rng(seed)
    n, H = len(T), Hqk * grp
    total = sum(T)
    L = fenwick.num_levels(max(s + x for s, x in zip(starts, T)))
    q, k = (torch.as_tensor(rng.standard_normal((1, Hqk, total, Dk)), dtype=dtype) for _ in range(2))
    v = torch.as_tensor(rng.standard_normal((1, H, total, Dv)), dtype=dtype)
    lam = poison_unread(torch.as_tensor(rng.uniform(0.3, 1.5, (1, H, total, L)), dtype=dtype), starts, T)
    g = torch.as_tensor(-rng.uniform(0, 0.5, (1, H, total)), dtype=dtype)
    cu = torch.as_tensor(np.concatenate([[0], np.cumsum(T)]), dtype=torch.int64)
    state = live_state(rng, starts, H, Dk, Dv).to(torch.float64 if dtype == torch.float64 else torch.float32)
    return [q, k, v, lam, g, state], torch.as_tensor(starts, dtype=torch.int64), cu


def check_against_chunked(inputs, pos, cu, tol=TOL):
    """Outputs, final states and every gradient against the chunked backend in float64."""
    def run(call, tensors):
        xs = leaves(tensors)
        o, (s, _) = call(*xs[:5], 0.7, xs[5], pos, cu, True)
        w_s = torch.arange(s[:, :, :1].numel(), dtype=s.dtype).reshape(s[:, :, :1].shape).sin()
        loss = o.sum() + (s * w_s * torch.arange(1, s.shape[2] + 1, dtype=s.dtype)[:, None, None]).sum()
        return o, s, torch.autograd.grad(loss, xs)

    o, s, got = run(triton_call, inputs)
    o_ref, s_ref, want = run(chunked_call, [x.double() for x in inputs])
    S = min(s.shape[2], s_ref.shape[2])
    assert relative_error(o, o_ref) <= tol and relative_error(s[:, :, :S], s_ref[:, :, :S]) <= tol
    for name, x, y in zip(["q", "k", "v", "level_scales", "log_decay", "initial_state"], got, want):
        assert relative_error(x, y) <= tol, name


@pytest.mark.interpreter
@pytest.mark.parametrize("Dk, Dv", [(20, 17), (20, 40)])
def test_feature_tiles(Dk, Dv, nan_buffers, monkeypatch):
    """Heads wider than a backward tile: ``(Dk-tile, Dv-tile)`` programs, one diagonal of tiles a
    launch, their shares added launch by launch (2 × 2 and 2 × 3 tiles)."""
    monkeypatch.setattr(backward, "MAX_TILE", 16)
    inputs, pos, cu = one_case(1, [20], [37], Dk=Dk, Dv=Dv)
    check_against_chunked(inputs, pos, cu)


@pytest.mark.interpreter
def test_span_key_rows(nan_buffers, monkeypatch):
    """The span kernel on feature tiles of fewer key rows than the backward's (``SPAN_KEY_ROWS``):
    its partial Frobenius products summed by ``_span_weight_kernel``, each tile's gathered block sums stored in
    place."""
    monkeypatch.setattr(backward, "SPAN_KEY_ROWS", 8)
    inputs, pos, cu = one_case(1, [20], [37], Dk=20, Dv=12)
    check_against_chunked(inputs, pos, cu)


@pytest.mark.interpreter
def test_output_tiles(nan_buffers, monkeypatch):
    """The forward's output kernel on tiles narrower than the head (three value-tile programs a
    chunk, two key tiles) over packed sequences with states."""
    monkeypatch.setattr(forward, "OUTPUT_TILE", 16)
    inputs, pos, cu = one_case(4, [20, 9], [37, 3], Dk=20, Dv=40)
    check_against_chunked(inputs, pos, cu)


@pytest.mark.interpreter
def test_block_sums_of_groups(nan_buffers, monkeypatch):
    """Groups of one chunk: every level above the first sums its blocks group by group with atomic
    adds, decayed by the groups before (from the sequence's first: chunks 6..9 of levels 1..3)."""
    monkeypatch.setattr(backward, "TILE_CHUNKS", 1)
    inputs, pos, cu = one_case(2, [50], [100])
    check_against_chunked(inputs, pos, cu)


@pytest.mark.interpreter
def test_float32(nan_buffers):
    inputs, pos, cu = one_case(3, [20, 3], [5, 70], dtype=torch.float32)
    check_against_chunked(inputs, pos, cu, tol=1e-5)


@pytest.mark.interpreter
def test_grouped_heads_without_state():
    """``q, k`` with 2 heads serving 4 heads of ``v`` (no state, no packing): the plain op per head."""
    rng = np.random.default_rng(4)
    q, k = (torch.as_tensor(rng.standard_normal((1, 2, 21, 3))) for _ in range(2))
    v = torch.as_tensor(rng.standard_normal((1, 4, 21, 2)))
    lam = torch.as_tensor(rng.uniform(0.3, 1.5, (1, 4, 21, 6)))
    g = torch.as_tensor(-rng.uniform(0, 1, (1, 4, 21)))
    o = kernels.attention(q, k, v, lam, g, 0.5, chunk=CHUNK)
    want = kernels.attention(q.repeat_interleave(2, 1), k.repeat_interleave(2, 1), v, lam, g, 0.5, chunk=CHUNK)
    assert relative_error(o, want) <= 1e-12


@pytest.mark.interpreter
def test_narrow_level_scales_give_nan():
    """The positions stay on the device, so the kernels cannot refuse level scales too narrow for
    them: the rows that would read past ``L`` come out NaN (``hodlr.log_linear_attn`` refuses first)."""
    inputs, pos, cu = one_case(5, [20], [20])
    q, k, v, lam, g, state = inputs
    o = forward.attention_state_forward(q, k, v, lam[..., :6], g, 1.0, chunk=CHUNK, initial_state=state,
                                        initial_positions=pos, cu_seqlens=cu)
    rows = torch.arange(20, 40)  # positions 32.. read level 6
    assert torch.isnan(o[0, :, rows >= 32]).all() and torch.isfinite(o[0, :, rows < 32]).all()


@pytest.mark.interpreter
def test_bad_input():
    inputs, pos, cu = one_case(6, [5, 3], [1, 2])
    q, k, v, lam, g, state = inputs
    with pytest.raises(TypeError, match="initial_positions"):
        kernels.attention(q, k, v, lam, g, initial_state=state, cu_seqlens=cu)
    with pytest.raises(ValueError, match="initial_state must have shape"):
        kernels.attention(q, k, v, lam, g, initial_state=state[:1], initial_positions=pos[:1], cu_seqlens=cu)
    with pytest.raises(TypeError, match="initial_state must be torch.float64"):
        kernels.attention(q, k, v, lam, g, initial_state=state.float(), initial_positions=pos, cu_seqlens=cu)
    with pytest.raises(ValueError, match="cu_seqlens"):
        kernels.attention(q, k, v, lam, g, cu_seqlens=torch.tensor([0, 5, 4, 8]))
    with pytest.raises(ValueError, match="N == 1"):
        kernels.attention(*(torch.cat([x, x]) for x in (q, k, v, lam, g)), cu_seqlens=cu)
    with pytest.raises(ValueError, match="Hqk dividing H"):
        kernels.attention(torch.cat([q, q], 1), torch.cat([k, k], 1), torch.cat([v, v, v], 1),
                          lam.expand(1, 3, -1, -1), g.expand(1, 3, -1), cu_seqlens=cu)


# -- 10**5 sequences -------------------------------------------------------------------------
class _Recorder:
    """Stands in for a kernel: records the grid of every launch and runs nothing."""

    def __init__(self, name, grids):
        self.name, self.grids = name, grids

    def __getitem__(self, grid):
        self.grids.append((self.name, tuple(grid)))
        return lambda *args, **kwargs: None


@pytest.mark.interpreter
def test_many_sequences_grids(monkeypatch):
    """``10**5`` sequences (with states, packed, final state, forward and backward): every launch
    puts at most 65,535 programs on grid axes 1 and 2 (the sequences and chunk slots go on axis 0),
    and the host side (sequence table, slot maps, the ``dg`` gather) runs at that size."""
    from hodlr.kernels import states as states_module

    grids = []
    for module in (forward, backward, states_module):
        for name in dir(module):
            if name.startswith("_") and name.endswith("_kernel"):
                monkeypatch.setattr(module, name, _Recorder(name, grids))
    n = 100_000
    rng = np.random.default_rng(0)
    lengths = rng.integers(0, 4, n)
    T = int(lengths.sum())
    q, k, v, do = (torch.zeros(1, 2, T, 1) for _ in range(4))
    lam, g = torch.zeros(1, 2, T, 24), torch.zeros(1, 2, T)
    cu = torch.as_tensor(np.concatenate([[0], np.cumsum(lengths)]))
    pos = torch.as_tensor(rng.integers(0, 2**20, n))
    state = torch.zeros(n, 2, 20, 1, 1)
    o, (final, ends) = forward.attention_state_forward(q, k, v, lam, g, 1.0, initial_state=state, initial_positions=pos,
                                                       cu_seqlens=cu, output_final_state=True)
    assert ends.tolist() == (pos + torch.as_tensor(lengths)).tolist()
    backward.attention_state_backward(q, k, v, lam, g, 1.0, do, torch.zeros_like(final), initial_state=state,
                                      initial_positions=pos, cu_seqlens=cu)
    launched = {name for name, _ in grids}
    assert {"_state_kernel", "_hierarchy_kernel", "_output_kernel", "_final_state_kernel", "_query_block_kernel",
            "_sequence_kernel", "_chunk_kernel", "_span_kernel", "_span_weight_kernel", "_gap_kernel"} <= launched
    for name, grid in grids:
        assert len(grid) == 3 and grid[1] <= 65_535 and grid[2] <= 65_535 and grid[0] < 2**31, (name, grid)
    assert max(grid[0] for name, grid in grids if name == "_sequence_kernel") == n


@pytest.mark.gpu
def test_many_sequences_gpu():
    """``10**5`` packed sequences with states on the GPU: outputs, final states and gradients of a
    sample of sequences equal separate calls of the chunked backend."""
    n = 100_000
    rng = np.random.default_rng(1)
    lengths = rng.integers(0, 4, n)
    starts = rng.integers(0, 1000, n)
    T = int(lengths.sum())
    H, D = 2, 16
    dev = "cuda"
    q, k, v = (torch.randn(1, H, T, D, device=dev) for _ in range(3))
    lam = torch.rand(1, H, T, 12, device=dev) + 0.5
    g = -torch.rand(1, H, T, device=dev)
    state = torch.zeros(n, H, 10, D, D, device=dev)
    for lev in range(10):
        live = torch.as_tensor((starts >> lev) & 1 == 1, device=dev)
        state[:, :, lev] = torch.randn(n, H, D, D, device=dev) * live[:, None, None, None] * 0.1
    cu = torch.as_tensor(np.concatenate([[0], np.cumsum(lengths)]), device=dev)
    pos = torch.as_tensor(starts, device=dev)
    xs = leaves([q, k, v, lam, g, state])
    o, (final, ends) = kernels.attention(*xs[:5], 0.25, initial_state=xs[5], initial_positions=pos, cu_seqlens=cu,
                                         output_final_state=True)
    grads = torch.autograd.grad(o.sum() + final.sum(), xs)
    for i in rng.integers(0, n, 20).tolist():
        lo, hi = int(cu[i]), int(cu[i + 1])
        part = leaves([x[:, :, lo:hi].double() for x in (q, k, v, lam, g)] + [state[i:i + 1].double()])
        o_i, (s_i, _) = chunked.attention_state(*part[:5], 0.25, part[5], pos[i:i + 1], None, True)
        S = min(s_i.shape[2], final.shape[2])
        assert relative_error(o[:, :, lo:hi], o_i) <= 1e-5
        assert relative_error(final[i:i + 1, :, :S], s_i[:, :, :S]) <= 1e-5
        want = torch.autograd.grad(o_i.sum() + s_i.sum(), part)
        for got_full, w in zip(grads[:5], want[:5]):
            assert relative_error(got_full[:, :, lo:hi], w) <= 1e-4
        assert relative_error(grads[5][i:i + 1], want[5]) <= 1e-4
