"""The Fenwick scan (``fenwick.scan``) and the ``fenwick`` backend.

* the full-sequence backend equals ``dense`` (matmul and attention, numpy and torch);
* for any split, ``prefill`` then ``step`` equals the full computation and ``dense``;
* the invariant after every step: each live state is the brute-force sum over its Fenwick
  bucket, no state for a level whose bit is 0, at most ``num_levels(position + 1)`` states;
* bad input raises and leaves the state unchanged;
* the ``extend`` fast-forward gives the state of the equivalent steps;
* the decode benchmark runs (tiny sizes).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hodlr import fenwick
import hodlr
from hodlr.fenwick.scan import FenwickState, attention, live_levels, matmul
from hodlr.testing import (
    TOLERANCES,
    assert_close,
    attention_inputs,
    batch_shapes,
    decay_values,
    masks,
    operands,
    poison_unread,
    relative_error,
)

torch = pytest.importorskip("torch")

TOL = TOLERANCES["cpu_float64"]


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------
def _pair(mask_kwargs, draw_ops):
    return masks(**mask_kwargs).flatmap(lambda M: draw_ops(M).map(lambda ops: (M, ops)))


def _expand(M, *ops):
    """Mask generators and operands broadcast to one common batch shape."""
    lam, g = M.level_scales, M.log_decay
    shapes = [M.batch_shape] + [tuple(x.shape[:-2]) for x in ops]
    batch = tuple(np.broadcast_shapes(*shapes))
    bc = (lambda x, s: x.expand(*s)) if hodlr.testing.is_torch(lam) else np.broadcast_to
    lam = bc(lam, batch + tuple(lam.shape[-2:]))
    g = None if g is None else bc(g, batch + (M.T,))
    return batch, lam, g, [bc(x, batch + tuple(x.shape[-2:])) for x in ops]


def _rows(x, lo, hi, inner=1):
    """Rows ``lo:hi`` of the time axis (``-1 - inner``)."""
    if x is None:
        return None
    index = (Ellipsis, slice(lo, hi)) + (slice(None),) * inner
    return x[index]


def _row(x, t, inner=1):
    if x is None:
        return None
    return x[(Ellipsis, t) + (slice(None),) * inner]


def _cat(parts, axis):
    parts = [p for p in parts if p.shape[axis] > 0]
    if hodlr.testing.is_torch(parts[0]):
        return torch.cat(parts, axis)
    return np.concatenate(parts, axis)


def _stream(state, q, k, v, lam, g, scale, n):
    """prefill the first ``n`` positions, then step through the rest; all outputs."""
    T = v.shape[-2]
    first = state.prefill(_rows(q, 0, n), _rows(k, 0, n), _rows(v, 0, n), _rows(lam, 0, n),
                          _rows(g, 0, n, 0), scale)
    outs = [first]
    for t in range(n, T):
        o = state.step(_row(q, t), _row(k, t), _row(v, t), _row(lam, t), _row(g, t, 0), scale)
        outs.append(o[..., None, :])
    return _cat(outs, -2)


def _snapshot(state):
    return (state.position, state.levels, state.capacity, state.nbytes,
            {lev: np.array(fenwick.arrays.to_numpy(s)) for lev, s in state.states().items()})


def _assert_same_snapshot(a, b):
    assert a[:4] == b[:4]
    assert a[4].keys() == b[4].keys()
    for lev in a[4]:
        assert np.array_equal(a[4][lev], b[4][lev], equal_nan=True)


def _brute_states(k, v, g, p):
    """``{level: sum_{s in bucket(p, level)} exp(G[p-1] - G[s]) k_s v_s^T}`` for a single
    sequence of numpy arrays, each decay summed from its own terms."""
    out = {}
    for lev, a, b in fenwick.buckets(p)[1:]:
        S = np.zeros((k.shape[-1], v.shape[-1]))
        for s in range(a, b):
            w = 1.0 if g is None else np.exp(np.sum(g[s + 1 : p]))
            S += w * np.outer(k[s], v[s])
        out[lev] = S
    return out


def _close_state(actual, expected):
    diff = np.linalg.norm(actual - expected)
    assert diff <= TOL * np.linalg.norm(expected) + 1e-290, (diff, np.linalg.norm(expected))


# ---------------------------------------------------------------------------------------
# index helper
# ---------------------------------------------------------------------------------------
def test_live_levels_match_buckets():
    positions = np.arange(0, 600)
    lev = live_levels(positions)
    for p in positions:
        want = [b[0] for b in fenwick.buckets(int(p))[1:]][::-1]
        assert [x for x in lev[p] if x > 0] == want
    assert live_levels(0).shape == (1, 0)


def test_num_slots_hold_every_bucket_of_the_state():
    """A state at position ``p`` (its buckets: those of query ``p``, whose own token is not in
    yet) needs a slot for each level up to its highest non-empty bucket, and no more."""
    for p in range(0, 600):
        levels = [lev for lev, a, b in fenwick.buckets(p)[1:] if b > a]
        assert fenwick.num_slots(p) == max(levels, default=0)
        assert fenwick.num_slots(np.int64(p)) == fenwick.num_slots(p)


# ---------------------------------------------------------------------------------------
# full-sequence backend == dense
# ---------------------------------------------------------------------------------------
@given(_pair(dict(T=st.integers(1, 130), batch_shape=batch_shapes(2, 3)), lambda M: operands(M)))
def test_backend_matmul_equals_dense(pair):
    M, X = pair
    assert_close(hodlr.matmul(M, X, backend="fenwick"), hodlr.matmul(M, X, backend="dense"), TOL, "matmul")


@given(_pair(dict(T=st.integers(1, 130), batch_shape=batch_shapes(2, 3)), lambda M: attention_inputs(M)),
       st.floats(0.1, 2.0))
def test_backend_attention_equals_dense(pair, scale):
    M, (q, k, v) = pair
    got = hodlr.attention(q, k, v, M, scale=scale, backend="fenwick")
    assert_close(got, hodlr.attention(q, k, v, M, scale=scale, backend="dense"), TOL, "attention")


@pytest.mark.parametrize("T", [1, 2, 3, 63, 64, 65, 1000])
@pytest.mark.parametrize("decay", ["none", "mild", "strong"])
def test_backend_awkward_lengths(T, decay):
    M = _mask(T, (2,), decay, seed=T)
    rng = np.random.default_rng(T)
    x = rng.standard_normal((2, T, 3))
    q, k = rng.standard_normal((2, 2, T, 4))
    assert_close(hodlr.matmul(M, x, backend="fenwick"), hodlr.matmul(M, x, backend="dense"), TOL, f"matmul T={T}")
    got = hodlr.attention(q, k, x, M, scale=0.5, backend="fenwick")
    assert_close(got, hodlr.attention(q, k, x, M, scale=0.5, backend="dense"), TOL, f"attention T={T}")


@given(_pair(dict(T=st.integers(1, 70), batch_shape=batch_shapes(1, 2), library="torch", dtype=torch.float64),
             lambda M: attention_inputs(M)))
def test_backend_torch_equals_dense(pair):
    M, (q, k, v) = pair
    assert_close(hodlr.attention(q, k, v, M, backend="fenwick"), hodlr.attention(q, k, v, M, backend="dense"), TOL)
    assert_close(hodlr.matmul(M, v, backend="fenwick"), hodlr.matmul(M, v, backend="dense"), TOL)


@pytest.mark.parametrize("T", [1, 5, 33])
def test_backend_torch_autograd(T):
    M = _mask(T, (2,), "mild", seed=T, library="torch", dtype=torch.float64, poison=False)
    rng = np.random.default_rng(T)
    base = [torch.tensor(a) for a in (rng.standard_normal((2, T, 3)), rng.standard_normal((2, T, 3)),
                                       rng.standard_normal((2, T, 2)), M.level_scales.numpy(), M.log_decay.numpy())]
    grads = {}
    for backend in ("fenwick", "dense"):
        leaves = [a.clone().requires_grad_(True) for a in base]
        q, k, v, lam, g = leaves
        Mg = hodlr.LogLinearMask(lam, g)
        out = hodlr.attention(q, k, v, Mg, scale=0.7, backend=backend)
        (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        grads[backend] = [torch.zeros_like(a) if a.grad is None else a.grad for a in leaves]
    for a, b in zip(grads["fenwick"], grads["dense"]):
        assert_close(a, b, TOLERANCES["grad_float64"], "gradient")


def test_backend_half_precision_operands():
    M = _mask(40, library="torch", dtype=torch.float32)
    x = torch.randn(40, 8, dtype=torch.float64)
    got = hodlr.matmul(M, x.bfloat16(), backend="fenwick")
    assert got.dtype == torch.bfloat16
    ref = hodlr.matmul(hodlr.LogLinearMask(M.level_scales.double(), M.log_decay.double()), x, backend="dense")
    assert relative_error(got, ref) <= TOLERANCES["gpu_bfloat16"]


def test_strong_decay_stays_accurate():
    """A decay of -50 per step underflows old states to exactly 0, never to NaN or inf."""
    T = 300
    rng = np.random.default_rng(0)
    lam = rng.uniform(0.5, 1.0, (T, fenwick.num_levels(T)))
    g = np.full(T, -50.0)
    g[::7] = -1e-4
    x = rng.standard_normal((T, 4))
    M = hodlr.LogLinearMask(lam, g)
    got = matmul(lam, g, x)
    assert np.isfinite(got).all()
    assert_close(got, hodlr.matmul(M, x, backend="dense"), TOL)
    got32 = matmul(lam.astype(np.float32), g.astype(np.float32), x.astype(np.float32))
    assert np.isfinite(got32).all()
    assert relative_error(got32, hodlr.matmul(M, x, backend="dense")) <= 1e-5


def test_poisoned_unused_level_scales():
    """Entries never read (and extra columns) may hold NaN; they must not reach any output."""
    T = 77
    rng = np.random.default_rng(1)
    lam = poison_unread(rng.uniform(0.5, 1.0, (2, T, fenwick.num_levels(T) + 3)))
    g = -rng.uniform(0, 1, (2, T))
    q, k, v = rng.standard_normal((3, 2, T, 3))
    ref = hodlr.attention(q, k, v, hodlr.LogLinearMask(np.nan_to_num(lam), g), backend="dense")
    assert_close(attention(q, k, v, lam, g), ref, TOL)
    state = FenwickState((2,), 3, 3)
    assert_close(_stream(state, q, k, v, lam, g, 1.0, 30), ref, TOL)


# ---------------------------------------------------------------------------------------
# streaming: prefill + step == full == dense
# ---------------------------------------------------------------------------------------
@st.composite
def _stream_case(draw, library="numpy", max_T=70):
    kw = dict(T=st.integers(1, max_T), batch_shape=batch_shapes(2, 2))
    if library == "torch":
        kw.update(library="torch", dtype=torch.float64)
    M = draw(masks(**kw))
    q, k, v = draw(attention_inputs(M))
    n = draw(st.integers(0, M.T))
    scale = draw(st.sampled_from([1.0, 0.37]))
    return M, q, k, v, n, scale


@given(_stream_case())
def test_prefill_then_step_equals_full(case):
    M, q, k, v, n, scale = case
    batch, lam, g, (q, k, v) = _expand(M, q, k, v)
    full = attention(q, k, v, lam, g, scale)
    state = FenwickState(batch, q.shape[-1], v.shape[-1])
    got = _stream(state, q, k, v, lam, g, scale, n)
    assert state.position == M.T
    assert_close(got, full, TOL, "stream vs full")
    assert_close(got, hodlr.attention(q, k, v, M, scale=scale, backend="dense"), TOL, "stream vs dense")


@given(_stream_case(library="torch", max_T=40))
def test_prefill_then_step_equals_full_torch(case):
    M, q, k, v, n, scale = case
    batch, lam, g, (q, k, v) = _expand(M, q, k, v)
    state = FenwickState(batch, q.shape[-1], v.shape[-1], dtype=torch.float64)
    got = _stream(state, q, k, v, lam, g, scale, n)
    assert isinstance(got, torch.Tensor)
    assert_close(got, attention(q, k, v, lam, g, scale), TOL)
    assert_close(got, hodlr.attention(q, k, v, M, scale=scale, backend="dense"), TOL)


@given(masks(T=st.integers(1, 60), batch_shape=batch_shapes(1, 2)), st.data())
def test_matmul_streams_with_unit_keys(M, data):
    """Matmul is attention with Dk = 1 and q = k = 1."""
    X = data.draw(operands(M, broadcast=False))
    n = data.draw(st.integers(0, M.T))
    batch, lam, g, (X,) = _expand(M, X)
    ones = np.ones(batch + (M.T, 1))
    got = _stream(FenwickState(batch, 1, X.shape[-1]), ones, ones, X, lam, g, 1.0, n)
    assert_close(got, matmul(lam, g, X), TOL)
    assert_close(got, hodlr.matmul(M, X, backend="dense"), TOL)


@given(masks(T=st.integers(2, 60), decay=st.sampled_from(["mild", "strong", "none"])),
       st.lists(st.integers(0, 20), min_size=1, max_size=4))
def test_several_prefills(M, chunks):
    rng = np.random.default_rng(M.T)
    q, k, v = rng.standard_normal((3, M.T, 2))
    lam, g = M.level_scales, M.log_decay
    state = FenwickState((), 2, 2)
    outs, t = [], 0
    for c in chunks:
        c = min(c, M.T - t)
        outs.append(state.prefill(q[t : t + c], k[t : t + c], v[t : t + c], lam[t : t + c], _rows(g, t, t + c, 0)))
        t += c
    outs.append(_stream(state, q[t:], k[t:], v[t:], lam[t:], _rows(g, t, None, 0), 1.0, M.T - t)
                if t < M.T else np.zeros((0, 2)))
    assert_close(np.concatenate(outs), attention(q, k, v, lam, g), TOL)


def test_long_split_1000():
    T = 1000
    M = _mask(T, (2,), "mild", seed=1)
    rng = np.random.default_rng(7)
    q, k, v = rng.standard_normal((3, 2, T, 3))
    ref = hodlr.attention(q, k, v, M, backend="dense")
    for n in (0, 513, 999):
        got = _stream(FenwickState((2,), 3, 3), q, k, v, M.level_scales, M.log_decay, 1.0, n)
        assert_close(got, ref, TOL, f"split {n}")


# ---------------------------------------------------------------------------------------
# the invariant, after every step
# ---------------------------------------------------------------------------------------
def _mask(T, batch=(), decay="mild", seed=0, library="numpy", dtype=np.float64, poison=True):
    rng = np.random.default_rng(seed)
    lam = rng.uniform(0.2, 1.5, batch + (T, fenwick.num_levels(T) + 1))
    lam = poison_unread(lam) if poison else lam
    g = decay_values(rng, decay, batch + (T,))
    if library == "torch":
        lam = torch.tensor(lam, dtype=dtype)
        g = None if g is None else torch.tensor(g, dtype=dtype)
    return hodlr.LogLinearMask(lam, g)


def _check_invariant(state, k, v, g):
    p = state.position
    want = _brute_states(k, v, g, p)
    got = state.states()
    assert sorted(got) == sorted(want), (p, sorted(got), sorted(want))
    assert list(state.levels) == sorted(want, reverse=True)
    assert state.num_states == len(want) == bin(p).count("1")
    assert state.num_states <= fenwick.num_levels(p + 1)
    assert state.capacity <= fenwick.num_levels(p + 1) - 1 or p == 0
    for lev in range(1, p.bit_length() + 1):
        assert (lev in got) == bool((p >> (lev - 1)) & 1), (p, lev)
    for lev, S in want.items():
        _close_state(fenwick.arrays.to_numpy(got[lev]), S)


@settings(max_examples=25)
@given(st.integers(1, 40), st.sampled_from(["none", "mild", "strong"]), st.integers(0, 2**32 - 1),
       st.sampled_from(["step", "prefill"]))
def test_invariant_every_step(T, decay, seed, mode):
    rng = np.random.default_rng(seed)
    L = fenwick.num_levels(T)
    q, k = rng.standard_normal((2, T, 3))
    v = rng.standard_normal((T, 2))
    lam = poison_unread(rng.uniform(0.5, 1.0, (T, L)))
    g = None if decay == "none" else decay_values(rng, decay, (T,))
    state = FenwickState((), 3, 2)
    _check_invariant(state, k, v, g)
    t = 0
    while t < T:
        c = 1 if mode == "step" else int(rng.integers(1, 6))
        c = min(c, T - t)
        if c == 1 and mode == "step":
            state.step(q[t], k[t], v[t], lam[t], None if g is None else g[t])
        else:
            state.prefill(q[t : t + c], k[t : t + c], v[t : t + c], lam[t : t + c], None if g is None else g[t : t + c])
        t += c
        _check_invariant(state, k[:t], v[:t], None if g is None else g[:t])


def test_capacity_is_peak_live_count():
    state = FenwickState((2,), 2, 3)
    rng = np.random.default_rng(0)
    for p in [2**4 - 1, 2**4, 2**9 - 1, 2**9, 2**12 - 1]:
        n = p - state.position
        state.extend(rng.standard_normal((2, n, 2)), rng.standard_normal((2, n, 3)))
        assert state.num_states == bin(p).count("1")
        assert state.capacity == max(bin(x).count("1") for x in (15, 16, 511, 512, 4095) if x <= p)
    assert state.nbytes == 12 * 2 * (2 * 3 + 1) * 8
    one = np.ones((2, 2))
    state.step(one, one, np.ones((2, 3)), np.ones((2, 13)))
    assert state.position == 4096 and state.num_states == 1 and state.capacity == 12


# ---------------------------------------------------------------------------------------
# extend (fast-forward) == steps
# ---------------------------------------------------------------------------------------
@given(st.integers(0, 40), st.integers(0, 70), st.integers(1, 10), st.sampled_from(["none", "mild", "strong"]),
       st.integers(0, 2**32 - 1), st.sampled_from(["numpy", "torch"]))
def test_extend_equals_steps(a, b, c, decay, seed, library):
    T = a + b + c
    rng = np.random.default_rng(seed)
    q, k = rng.standard_normal((2, 2, T, 3))
    v = rng.standard_normal((2, T, 2))
    lam = poison_unread(rng.uniform(0.5, 1.0, (2, T, fenwick.num_levels(T))))
    g = None if decay == "none" else decay_values(rng, decay, (2, T))
    if library == "torch":
        q, k, v, lam = (torch.tensor(x) for x in (q, k, v, lam))
        g = None if g is None else torch.tensor(g)
    dtype = torch.float64 if library == "torch" else np.float64
    fast, slow = FenwickState((2,), 3, 2, dtype), FenwickState((2,), 3, 2, dtype)
    for s in (fast, slow):
        s.prefill(_rows(q, 0, a), _rows(k, 0, a), _rows(v, 0, a), _rows(lam, 0, a), _rows(g, 0, a, 0))
    fast.extend(_rows(k, a, a + b), _rows(v, a, a + b), _rows(g, a, a + b, 0))
    slow.prefill(_rows(q, a, a + b), _rows(k, a, a + b), _rows(v, a, a + b), _rows(lam, a, a + b), _rows(g, a, a + b, 0))
    assert fast.position == slow.position == a + b and fast.levels == slow.levels
    for lev, S in slow.states().items():
        _close_state(fenwick.arrays.to_numpy(fast.states()[lev]), fenwick.arrays.to_numpy(S))
    rest = [_rows(x, a + b, T) for x in (q, k, v, lam)] + [_rows(g, a + b, T, 0)]
    assert_close(fast.prefill(*rest), slow.prefill(*rest), TOL)


# ---------------------------------------------------------------------------------------
# bad input: clear error, state unchanged
# ---------------------------------------------------------------------------------------
def _fresh(p=11, library="numpy"):
    rng = np.random.default_rng(3)
    T = 20
    L = fenwick.num_levels(T)
    data = dict(q=rng.standard_normal((2, T, 3)), k=rng.standard_normal((2, T, 3)), v=rng.standard_normal((2, T, 4)),
                lam=poison_unread(rng.uniform(0.5, 1, (2, T, L))), g=-rng.uniform(0, 1, (2, T)))
    if library == "torch":
        data = {n: torch.tensor(x) for n, x in data.items()}
    state = FenwickState((2,), 3, 4, torch.float64 if library == "torch" else np.float64)
    state.prefill(*(data[n][:, :p] for n in ("q", "k", "v", "lam", "g")))
    return state, data


def _bad_steps(d, p, library):
    q, k, v, lam, g = (d[n][:, p] for n in ("q", "k", "v", "lam", "g"))
    xp = torch if library == "torch" else np
    nan_g = g.clone() if library == "torch" else g.copy()
    nan_g[1] = float("nan")
    inf_g = g.clone() if library == "torch" else g.copy()
    inf_g[0] = -float("inf")
    read_nan = lam.clone() if library == "torch" else lam.copy()
    read_nan[1, 0] = float("nan")
    read_inf = lam.clone() if library == "torch" else lam.copy()
    read_inf[0, 4] = float("inf")  # p = 11 = 0b1011: level 4 is read
    other = (lambda x: x.numpy()) if library == "torch" else (lambda x: torch.tensor(x))
    return [
        ("q", ValueError, dict(q=q[:, :2])),
        ("k", ValueError, dict(k=xp.concatenate([k, k], -1))),
        ("v", ValueError, dict(v=v[:, :3])),
        ("q", ValueError, dict(q=q[:1])),
        ("v", ValueError, dict(v=v[None])),
        ("level_scales", ValueError, dict(lam=lam[:, :3])),
        ("log_decay", ValueError, dict(g=nan_g)),
        ("log_decay", ValueError, dict(g=inf_g)),
        ("log_decay", ValueError, dict(g=g[:1])),
        ("level_scales", ValueError, dict(lam=read_nan)),
        ("level_scales", ValueError, dict(lam=read_inf)),
        ("scale", ValueError, dict(scale=float("nan"))),
        ("scale", TypeError, dict(scale="1")),
        ("v", TypeError, dict(v=v.float() if library == "torch" else v.astype(np.float32))),
        ("q", TypeError, dict(q=other(q))),
    ]


@pytest.mark.parametrize("library", ["numpy", "torch"])
def test_bad_step_leaves_state_unchanged(library):
    p = 11
    state, d = _fresh(p, library)
    ref, _ = _fresh(p, library)
    before = _snapshot(state)
    base = dict(q=d["q"][:, p], k=d["k"][:, p], v=d["v"][:, p], lam=d["lam"][:, p], g=d["g"][:, p], scale=1.0)
    for name, err, change in _bad_steps(d, p, library):
        args = {**base, **change}
        with pytest.raises(err, match=name):
            state.step(args["q"], args["k"], args["v"], args["lam"], args["g"], args["scale"])
        _assert_same_snapshot(_snapshot(state), before)
    # poison on an unread entry is fine, and the state then continues like an untouched one
    lam = base["lam"].clone() if library == "torch" else base["lam"].copy()
    lam[:, 3] = float("nan")  # level 3 = bit 2 of 11 = 0: not read
    out = state.step(base["q"], base["k"], base["v"], lam, base["g"])
    assert_close(out, ref.step(base["q"], base["k"], base["v"], base["lam"], base["g"]), TOL)
    _assert_same_snapshot(_snapshot(state), _snapshot(ref))


def test_too_few_levels_for_the_new_position():
    rng = np.random.default_rng(0)
    state = FenwickState((), 1, 1)
    x = rng.standard_normal((8, 1))
    state.prefill(x[:4], x[:4], x[:4], np.ones((4, 3)))
    before = _snapshot(state)
    with pytest.raises(ValueError, match=r"level_scales.*num_levels\(5\)=4"):
        state.step(x[4], x[4], x[4], np.ones(3))
    _assert_same_snapshot(_snapshot(state), before)
    with pytest.raises(ValueError, match="level_scales"):
        state.prefill(x[4:], x[4:], x[4:], np.ones((4, 3)))
    _assert_same_snapshot(_snapshot(state), before)
    state.step(x[4], x[4], x[4], np.ones(4))
    assert state.position == 5


def test_bad_prefill_and_extend_leave_state_unchanged():
    state, d = _fresh(5)
    before = _snapshot(state)
    q, k, v, lam, g = (d[n][:, 5:12] for n in ("q", "k", "v", "lam", "g"))
    late_nan = lam.copy()
    late_nan[0, 6, 0] = np.nan
    bad_g = g.copy()
    bad_g[1, 3] = np.inf
    cases = [
        ("q", ValueError, (q[:, :6], k, v, lam, g)),
        ("k", ValueError, (q, k[..., :2], v, lam, g)),
        ("level_scales", ValueError, (q, k, v, late_nan, g)),
        ("log_decay", ValueError, (q, k, v, lam, bad_g)),
        ("v", ValueError, (q, k, v[0], lam, g)),
        ("level_scales", ValueError, (q, k, v, lam[..., :4], g)),
    ]
    for name, err, args in cases:
        with pytest.raises(err, match=name):
            state.prefill(*args)
        _assert_same_snapshot(_snapshot(state), before)
    for name, args in [("log_decay", (k, v, bad_g)), ("k", (k[:, :3], v, g)), ("v", (k, v[..., :2], g))]:
        with pytest.raises(ValueError, match=name):
            state.extend(*args)
        _assert_same_snapshot(_snapshot(state), before)


def test_constructor_errors():
    with pytest.raises(ValueError, match="Dk must be an integer >= 0, got -1"):
        FenwickState((2,), -1, 3)
    assert FenwickState((2,), 0, 3).Dk == 0  # zero-width heads hold empty states
    with pytest.raises(TypeError, match="Dv must be an integer >= 0, got float"):
        FenwickState((2,), 2, 1.5)
    with pytest.raises(TypeError, match="dtype"):
        FenwickState((2,), 2, 2, dtype=np.int64)
    with pytest.raises(TypeError, match="batch_shape"):
        FenwickState(3, 2, 2)
    with pytest.raises(ValueError, match="device"):
        FenwickState((), 2, 2, device="cuda")


def test_repr_and_properties():
    s = FenwickState((2, 3), 4, 5, dtype=torch.float32)
    assert (s.batch_shape, s.Dk, s.Dv, s.dtype, s.position, s.num_states, s.nbytes) == ((2, 3), 4, 5, torch.float32, 0, 0, 0)
    assert "FenwickState(batch_shape=(2, 3)" in repr(s)


def test_torch_stream_autograd():
    """Steps recorded by autograd (out-of-place updates) give the dense gradient."""
    T = 13
    rng = np.random.default_rng(5)
    q, k, v = (torch.tensor(rng.standard_normal((T, 2)), requires_grad=True) for _ in range(3))
    lam = torch.tensor(rng.uniform(0.5, 1.0, (T, 5)))
    g = torch.tensor(-rng.uniform(0, 1, T))
    state = FenwickState((), 2, 2, dtype=torch.float64)
    out = _stream(state, q, k, v, lam, g, 1.0, 6)
    out.square().sum().backward()
    got = [x.grad.clone() for x in (q, k, v)]
    for x in (q, k, v):
        x.grad = None
    hodlr.attention(q, k, v, hodlr.LogLinearMask(lam, g), backend="dense").square().sum().backward()
    for a, x in zip(got, (q, k, v)):
        assert_close(a, x.grad, TOLERANCES["grad_float64"])


# ---------------------------------------------------------------------------------------
# layering and the benchmark
# ---------------------------------------------------------------------------------------
def test_fenwick_imports_neither_torch_nor_hodlr(tmp_path):
    """The shipped ``hodlr/fenwick`` folder imported as a package of its own (from any working
    directory) pulls in neither torch nor hodlr: the layer knows nothing above it."""
    import hodlr.fenwick

    parent = os.path.dirname(os.path.dirname(hodlr.fenwick.__file__))  # the folder holding hodlr's fenwick
    code = (f"import sys; sys.path.insert(0, {parent!r}); import fenwick, fenwick.scan; "
            f"assert fenwick.__file__.startswith({parent!r}), fenwick.__file__; "
            "assert 'torch' not in sys.modules and 'hodlr' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)


def test_bench_decode_smoke(tmp_path, capsys):
    from hodlr import bench_decode

    argv = ["--batch", "2", "--dk", "4", "--dv", "4", "--positions", "3", "6", "--window", "8", "--repeats", "1",
            "--memory-exponent", "7", "--walk", "--matmul-exponents", "4", "6", "--matmul-repeats", "1",
            "--matmul-d", "2", "--json", str(tmp_path / "r.json")]
    shown = []
    res = bench_decode.run(argv, echo=shown.append)
    assert [text.split(" ", 1)[0] for text in shown] == ["per-token", "state", "fenwick"]  # as each finished
    assert json.loads((tmp_path / "r.json").read_text()) == json.loads(json.dumps(res))
    assert res["step"]["ratio_best"] > 0
    mem = res["memory"]
    assert mem["position"] == 128 and mem["slots"] == 7 and mem["live_states"] == 1
    assert mem["state_matrices_bytes"] <= mem["bound_bytes"] == 8 * 4 * 4 * 2 * 4
    assert mem["walk"]["peak_slots"] == 7
    assert set(res["matmul"]) == {"numpy", "torch"}
    assert (tmp_path / "r.json").exists()
    assert bench_decode.main(argv[:-2] + ["--skip", "step", "memory"]) == 0
    assert "fenwick matmul growth" in capsys.readouterr().out


def test_bench_decode_keeps_what_finished(tmp_path, monkeypatch):
    """A run stopped in a later measurement leaves the earlier ones in its JSON file."""
    from hodlr import bench_decode

    def stopped(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(bench_decode, "_bench_matmul", stopped)
    path = tmp_path / "r.json"
    with pytest.raises(KeyboardInterrupt):
        bench_decode.run(["--batch", "2", "--dk", "2", "--dv", "2", "--positions", "3", "4", "--window", "4",
                          "--repeats", "1", "--memory-exponent", "5", "--json", str(path)])
    kept = json.loads(path.read_text())
    assert {"step", "memory"} <= set(kept) and "matmul" not in kept


@pytest.mark.gpu
def test_cuda_backend_and_stream():
    T = 65
    M = _mask(T, (2,), "mild", library="torch", dtype=torch.float64)
    M = hodlr.LogLinearMask(M.level_scales.cuda(), M.log_decay.cuda())
    q, k, v = (torch.randn(2, T, 4, dtype=torch.float64, device="cuda") for _ in range(3))
    ref = hodlr.attention(q, k, v, M, backend="dense")
    assert_close(hodlr.attention(q, k, v, M, backend="fenwick"), ref, TOL)
    assert_close(hodlr.matmul(M, v, backend="fenwick"), hodlr.matmul(M, v, backend="dense"), TOL)
    state = FenwickState((2,), 4, 4, dtype=torch.float64, device="cuda")
    got = _stream(state, q, k, v, M.level_scales, M.log_decay, 1.0, 30)
    assert got.device.type == "cuda"
    assert_close(got, ref, TOL)


def test_step_accepts_numpy_scalars_of_the_state_dtype():
    # g[t] of a float32 array is a numpy.float32 scalar (not a Python float): it must be
    # accepted for an unbatched float32 state, as np.float64 scalars are for float64 ones.
    rng = np.random.default_rng(7)
    T = 9
    q, k, v = (rng.standard_normal((T, 2)).astype(np.float32) for _ in range(3))
    lam = rng.uniform(0.5, 1.0, (T, fenwick.num_levels(T))).astype(np.float32)
    g = -rng.uniform(0.0, 1.0, T).astype(np.float32)
    state = FenwickState((), 2, 2, dtype=np.float32)
    got = np.stack([state.step(q[t], k[t], v[t], lam[t], g[t]) for t in range(T)])
    assert got.dtype == np.float32
    assert_close(got, attention(q, k, v, lam, g), 1e-5)


def test_device_mismatch_is_a_value_error():
    torch = pytest.importorskip("torch")
    state = FenwickState((), 2, 2, dtype=torch.float64)
    q = torch.ones(2, dtype=torch.float64, device="meta")
    with pytest.raises(ValueError, match="device"):
        state.step(q, q, q, torch.ones(1, dtype=torch.float64))


@pytest.mark.parametrize("kind", ["attention", "gated_delta"])
@pytest.mark.parametrize("bad", [float("inf"), float("nan"), 800.0])
def test_log_decay_of_position_zero_is_not_read(kind, bad):
    """The log-decay of absolute position 0 multiplies nothing (the state is empty there): any value,
    NaN and inf included, gives what 0 gives through step, prefill and extend, with a zero gradient,
    as the other backends; a non-finite log-decay at a later position is still refused."""
    import torch

    rng = np.random.default_rng(3)
    T, Dk, Dv = 6, 2, 3
    t = lambda *shape: torch.as_tensor(rng.standard_normal(shape))  # noqa: E731
    q, k, v = t(T, Dk), torch.nn.functional.normalize(t(T, Dk), dim=-1), t(T, Dv)
    beta, lam = torch.as_tensor(rng.uniform(0, 1, T)), torch.as_tensor(rng.uniform(0.5, 1.5, (T, 4)))
    g = -torch.as_tensor(rng.uniform(0, 0.5, T))
    g[0] = 0.0
    state_type = FenwickState if kind == "attention" else fenwick.GatedDeltaState
    extra = () if kind == "attention" else (beta,)

    def run(g0, how):
        gl = torch.cat([torch.full((1,), g0, dtype=torch.float64), g[1:]]).requires_grad_(True)
        state = state_type((), Dk, Dv, dtype=torch.float64)
        xs = (q, k, v) + extra
        if how == "prefill":
            o = state.prefill(*xs, lam, gl)
        elif how == "step":
            o = torch.stack([state.step(*(x[i] for x in xs), lam[i], gl[i]) for i in range(T)])
        else:  # the first three tokens fast-forwarded, the rest stepped
            state.extend(k[:3], v[:3], gl[:3]) if kind == "attention" else state.prefill(
                *(x[:3] for x in xs), lam[:3], gl[:3])
            o = state.prefill(*(x[3:] for x in xs), lam[3:], gl[3:])
        (dg,) = torch.autograd.grad(o.sum(), gl)
        return o.detach(), dg

    for how in ("prefill", "step", "extend"):
        (o0, dg0), (o1, dg1) = run(0.0, how), run(bad, how)
        assert torch.equal(o0, o1), how
        assert dg1[0] == 0 and torch.equal(dg0[1:], dg1[1:]), how
    state = state_type((), Dk, Dv, dtype=torch.float64)
    state.prefill(*(x[:1] for x in (q, k, v) + extra), lam[:1], g[:1])
    with pytest.raises(ValueError, match="log_decay must be finite"):
        state.prefill(*(x[1:] for x in (q, k, v) + extra), lam[1:], torch.full((T - 1,), float("nan")).double())


def test_extend_with_no_value_columns_and_live_levels_checks():
    """``Dv = 0`` through ``extend`` then ``step`` (each slot's decay factor is one number whatever
    the width); ``live_levels`` refuses what is not a non-negative integer."""
    state = FenwickState((), 2, 0)
    state.extend(np.ones((3, 2)), np.ones((3, 0)))
    assert state.step(np.ones(2), np.ones(2), np.ones(0), np.ones(3)).shape == (0,)
    for bad, error in ((2.7, TypeError), (True, TypeError), (-1, ValueError)):
        with pytest.raises(error, match="positions must be"):
            live_levels(bad)


@pytest.mark.parametrize("kind", ["attention", "gated_delta"])
def test_copy_steps_on_its_own(kind):
    """``copy()`` (beam search): the copy continues exactly as the original would, and stepping it
    leaves the original unchanged."""
    from hodlr.fenwick import GatedDeltaState

    rng = np.random.default_rng(3)
    T, Dk, Dv = 9, 3, 2
    q, k, v = (rng.standard_normal((2, T, d)) for d in (Dk, Dk, Dv))
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    beta, g, lam = rng.uniform(0.1, 1.0, (2, T)), -rng.uniform(0.0, 1.0, (2, T)), rng.uniform(0.5, 1.0, (2, T, 5))
    state = FenwickState((2,), Dk, Dv) if kind == "attention" else GatedDeltaState((2,), Dk, Dv)
    args = lambda t: (q[:, t], k[:, t], v[:, t]) + (() if kind == "attention" else (beta[:, t],)) + (  # noqa: E731
        lam[:, t], g[:, t])
    for t in range(5):
        state.step(*args(t))
    twin = state.copy()
    before = {lev: s.copy() for lev, s in state.states().items()}
    got = [twin.step(*args(t)) for t in range(5, 9)]
    assert state.position == 5 and all(np.array_equal(state.states()[lev], s) for lev, s in before.items())
    want = [state.step(*args(t)) for t in range(5, 9)]
    for a, b in zip(got, want):  # (the copy holds each state times its decay factor: rounding apart)
        assert_close(a, b, TOL, f"{kind} copy")


@settings(max_examples=40, deadline=None)
@given(p=st.integers(0, 300), c=st.integers(0, 3), seed=st.integers(0, 2 ** 16))
def test_buckets_from_blocks_equal_their_definition(p, c, seed):
    """``fenwick.delta.buckets_from_blocks`` against the definition, with random per-token states
    ``u_s`` and transitions ``A_s`` (matrices): bucket ``l`` of position ``p`` is
    ``Σ_{s in bucket} A_{p-1} ⋯ A_{s+1} u_s``, aligned blocks of ``2^h`` chunks of ``2^c`` tokens
    hold the same sum over their tokens up to their last, and ``through=True`` also gives
    ``A_{p-1} ⋯ A_0``.  Only the transitions that something earlier crosses are asked for."""
    from hodlr.fenwick.delta import buckets_from_blocks

    rng = np.random.default_rng(seed)
    A = rng.standard_normal((max(p, 1), 2, 2)) / 2
    u = rng.standard_normal((max(p, 1), 2, 3))
    eye = np.eye(2)

    def moved(lo, hi, to):
        """``Σ_{s in [lo, hi)} A_{to-1} ⋯ A_{s+1} u_s`` (the state at ``to`` of tokens ``lo .. hi - 1``)."""
        S = np.zeros((2, 3))
        for s in range(lo, hi):
            M = eye
            for r in range(s + 1, to):
                M = A[r] @ M
            S = S + M @ u[s]
        return S

    def across(lo, hi):
        """``A_{hi-1} ⋯ A_lo``."""
        M = eye
        for r in range(lo, hi):
            M = A[r] @ M
        return M

    C = 1 << c
    asked = []

    def block_state(h, m):
        lo, hi = m * (C << h), (m + 1) * (C << h)
        return moved(lo, hi, hi)

    def block_transition(h, m):
        asked.append((h, m))
        return across(m * (C << h), (m + 1) * (C << h))

    J = p >> c
    partial = None
    if p % C:
        partial = (lambda level, start: moved(start, start + (1 << (level - 1)), p), across(J * C, p))
    out, through = buckets_from_blocks(p, c, max(p.bit_length(), 1), block_state, block_transition, partial,
                                       through=True)
    for level in range(1, p.bit_length() + 1):
        lo, hi = fenwick.bucket(p, level) if p else (0, 0)
        if hi > lo:
            np.testing.assert_allclose(out[level - 1], moved(lo, hi, p), atol=1e-12)
        else:
            assert out[level - 1] is None
    np.testing.assert_allclose(eye if through is None else through, across(0, p), atol=1e-12)
    asked.clear()
    buckets_from_blocks(p, c, max(p.bit_length(), 1), block_state, block_transition, partial)
    top = J.bit_length() - 1
    assert all(h < top for h, _ in asked), "the earliest block's transition is not asked for"
