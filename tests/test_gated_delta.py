"""Log-linear Gated DeltaNet: every representation equals the dense float64 reference.

* the bucket recurrence (``hodlr.fenwick.delta``) equals the literal definition
  ``P[t, s] = scale β_s q_tᵀ A_t ⋯ A_{s+1} k_s`` built from explicit ``Dk x Dk`` products;
* the ``fenwick`` and ``chunked`` backends equal ``dense`` (outputs to 1e-12, gradients in q, k,
  v, β, g, λ to 1e-10) on awkward lengths, every decay kind, poisoned never-read scales;
* λ ≡ 1 is plain Gated DeltaNet (a ten-line recurrence below); β ≡ 0 gives 0;
* the chunked algorithm continues from a state at any position (0, 1, non-multiples of the
  chunk) with outputs and final bucket states equal to one call; the op
  ``hodlr.log_linear_gated_delta_rule`` splits, steps and packs sequences exactly, gradients
  into the initial state included;
* the off-diagonal blocks of ``P ⊙ Mλ`` have rank at most ``Dk``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import hodlr
from hodlr.backends import chunked, dense, fenwick as fenwick_backend
from hodlr.errors import BackendUnavailableError
from hodlr.fenwick import level, read_levels
from hodlr.fenwick.delta import GatedDeltaState, gated_delta
from hodlr.testing import (TOLERANCES, assert_close, batch_shapes, gated_delta_inputs, masks, relative_error,
                           poison_unread, st_lengths)

TOL = TOLERANCES["cpu_float64"]
GTOL = TOLERANCES["grad_float64"]
CHUNKS = st.sampled_from([1, 2, 4, 8, 16])


# -- references written out in full --------------------------------------------------------
def literal(q, k, v, beta, lam, g, scale):
    """``o_t = Σ_s λ[t, level(t, s)] scale β_s (q_tᵀ A_t ⋯ A_{s+1} k_s) v_s`` with explicit matrices."""
    T, Dk = q.shape
    A = [np.exp(g[t]) * (np.eye(Dk) - beta[t] * np.outer(k[t], k[t])) for t in range(T)]
    out = np.zeros((T, v.shape[1]))
    for t in range(T):
        prod = np.eye(Dk)
        for s in range(t, -1, -1):
            out[t] += lam[t, level(t, s)] * scale * beta[s] * (q[t] @ prod @ k[s]) * v[s]
            prod = prod @ A[s]
    return out


def plain_gated_deltanet(q, k, v, beta, g, scale):
    """Gated DeltaNet: ``S_t = exp(g_t) (I - β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ``,
    ``o_t = scale S_tᵀ q_t``."""
    S = np.zeros(q.shape[-1:] + v.shape[-1:])
    out = []
    for t in range(q.shape[0]):
        S = np.exp(g[t]) * (S - beta[t] * np.outer(k[t], k[t] @ S)) + beta[t] * np.outer(k[t], v[t])
        out.append(scale * q[t] @ S)
    return np.array(out)


# -- inputs ------------------------------------------------------------------------------------
def _unit(k):
    """Keys of unit norm (the delta rule's regime: each ``I - β k kᵀ`` a contraction for β <= 2)."""
    if isinstance(k, torch.Tensor):
        return torch.nn.functional.normalize(k, dim=-1)
    return k / np.linalg.norm(k, axis=-1, keepdims=True)


@st.composite
def gdn_inputs(draw, T=st_lengths(1, 130), batch=batch_shapes(2, 2), library="numpy", Dk=st.integers(1, 4),
               Dv=st.integers(1, 3)):
    """``(M, q, k, v, beta)``: a mask of any decay kind with poisoned never-read scales, and
    ``hodlr.testing.gated_delta_inputs`` for it (unit keys, ``beta`` in ``[0, 1]`` or ``[0, 2]``,
    each operand with its own broadcastable batch shape)."""
    M = draw(masks(T=T, batch_shape=batch, library=library, dtype=np.float64))
    return (M,) + draw(gated_delta_inputs(M, Dk=Dk, Dv=Dv))


def _broadcast(M, q, k, v, beta):
    """The backend arguments: every operand broadcast to the common batch."""
    batch = tuple(np.broadcast_shapes(M.batch_shape, q.shape[:-2], k.shape[:-2], v.shape[:-2], beta.shape[:-1]))
    bt = lambda a, tail: np.broadcast_to(a, batch + tuple(a.shape[len(a.shape) - tail:]))  # noqa: E731
    g = None if M.log_decay is None else bt(M.log_decay, 1)
    return bt(q, 2), bt(k, 2), bt(v, 2), bt(beta, 1), bt(M.level_scales, 2), g


# -- the recurrence and the reference -------------------------------------------------------------
@settings(max_examples=30)
@given(T=st.integers(1, 20), Dk=st.integers(1, 4), seed=st.integers(0, 2**32 - 1), scale=st.sampled_from([1.0, 0.3]))
def test_recurrence_and_dense_equal_the_literal_definition(T, Dk, seed, scale):
    rng = np.random.default_rng(seed)
    q, v = rng.standard_normal((T, Dk)), rng.standard_normal((T, 2))
    k = _unit(rng.standard_normal((T, Dk)))
    beta, g = rng.uniform(0, 2, T), -rng.uniform(0, 2, T)
    lam = poison_unread(rng.uniform(-1.5, 1.5, (T, hodlr.num_levels(T) + 1)))
    want = literal(q, k, v, beta, lam, g, scale)
    assert_close(gated_delta(q, k, v, beta, lam, g, scale), want, TOL, "recurrence")
    assert_close(dense.gated_delta_attention(q, k, v, beta, lam, g, scale), want, TOL, "dense")


@settings(max_examples=40)
@given(args=gdn_inputs(), C=CHUNKS, scale=st.sampled_from([1.0, 0.25]))
def test_backends_equal_dense(args, C, scale):
    """numpy float64 in, numpy float64 out, every backend to 1e-12."""
    M, q, k, v, beta = args
    want = hodlr.gated_delta_attention(q, k, v, beta, M, scale=scale, backend="dense")
    assert_close(hodlr.gated_delta_attention(q, k, v, beta, M, scale=scale, backend="fenwick"), want, TOL, "fenwick")
    got = chunked.gated_delta_attention(*_broadcast(M, q, k, v, beta), scale, chunk=C)
    assert isinstance(got, np.ndarray) and got.dtype == np.float64, "numpy in, numpy out"
    assert_close(got, want, TOL, f"chunked C={C}")


@pytest.mark.parametrize("T", [1, 2, 3, 63, 65, 257])
def test_awkward_lengths_strong_decay_default_chunk(T, rng):
    """Through the public function with the default chunk (64), g down to -50."""
    lam = poison_unread(rng.uniform(-1.5, 1.5, (2, T, hodlr.num_levels(T))))
    g = np.where(rng.random(T) < 0.5, -rng.uniform(0, 1e-3, T), -rng.uniform(0, 50, T))
    M = hodlr.LogLinearMask(lam, g)
    q, v = rng.standard_normal((2, T, 4)), rng.standard_normal((2, T, 3))
    k, beta = _unit(rng.standard_normal((T, 4))), rng.uniform(0, 1, (2, T))
    want = hodlr.gated_delta_attention(q, k, v, beta, M, backend="dense")
    for name in ("fenwick", "chunked"):
        assert_close(hodlr.gated_delta_attention(q, k, v, beta, M, backend=name), want, TOL, name)


@pytest.mark.parametrize("g", [0.5, -0.5])
def test_growing_gates_recurrence(g, rng):
    """A gate above 1 (``g = 0.5`` at every step, 64 steps, ``β ~ U(0, 1)``): the recurrence
    (``fenwick``) stays accurate in float32, which the chunk-wise form does not (docs/mathematics.md
    §13, growth gates); under the decay of the same size both are."""
    T = 64
    lam = rng.uniform(0.5, 1.5, (T, hodlr.num_levels(T)))
    q, v, k = rng.standard_normal((T, 2)), rng.standard_normal((T, 2)), _unit(rng.standard_normal((T, 2)))
    beta, gates = rng.uniform(0, 1, T), np.full(T, g)
    want = literal(q, k, v, beta, lam, gates, 1.0)
    f32 = lambda x: x.astype(np.float32)  # noqa: E731
    M = hodlr.LogLinearMask(f32(lam), f32(gates))
    names = ("fenwick", "dense") if g > 0 else ("fenwick", "dense", "chunked")
    for name in names:
        got = hodlr.gated_delta_attention(f32(q), f32(k), f32(v), f32(beta), M, scale=1.0, backend=name)
        assert np.linalg.norm(got - want) <= 1e-5 * np.linalg.norm(want), name


@settings(max_examples=12)
@given(args=gdn_inputs(T=st_lengths(1, 70), batch=batch_shapes(1, 2), library="torch"), C=st.sampled_from([2, 16]),
       seed=st.integers(0, 2**31))
def test_gradients_equal_dense(args, C, seed):
    """Autograd through fenwick and chunked equals autograd through dense in q, k, v, β, g, λ;
    the never-read (NaN) scales get gradient exactly 0."""
    M, q, k, v, beta = args
    lam0 = M.level_scales
    g0 = M.log_decay
    inputs = [q, k, v, beta, lam0] + ([] if g0 is None else [g0])
    names = ("q", "k", "v", "beta", "level_scales", "log_decay")
    batch = tuple(torch.broadcast_shapes(M.batch_shape, q.shape[:-2], k.shape[:-2], v.shape[:-2], beta.shape[:-1]))
    w = torch.as_tensor(np.random.default_rng(seed).standard_normal(batch + (M.T, v.shape[-1])))

    def grads(name):
        leaves = [a.detach().clone().requires_grad_(True) for a in inputs]
        q, k, v, beta, lam = leaves[:5]
        g = leaves[5] if len(leaves) > 5 else None
        if name == "chunked":
            args = _broadcast_torch(batch, q, k, v, beta, lam, g)
            out = chunked.gated_delta_attention(*args, 0.5, chunk=C)
        else:
            out = hodlr.gated_delta_attention(q, k, v, beta, hodlr.LogLinearMask(lam, g, validate=False), scale=0.5,
                                              backend=name)
        (out * w).sum().backward()
        return [a.grad for a in leaves]

    want = grads("dense")
    unread = torch.isnan(lam0)
    for name in ("fenwick", "chunked"):
        for got, ref, what in zip(grads(name), want, names):
            if what == "level_scales":
                assert bool((got[unread] == 0).all()), f"{name}: never-read scales must get gradient 0"
                got, ref = got[~unread], ref[~unread]
            assert_close(got, ref, GTOL, f"{name} d/d{what}")


def _broadcast_torch(batch, q, k, v, beta, lam, g):
    ex = lambda a, tail: a.expand(batch + tuple(a.shape[a.dim() - tail:]))  # noqa: E731
    return ex(q, 2), ex(k, 2), ex(v, 2), ex(beta, 1), ex(lam, 2), None if g is None else ex(g, 1)


# -- special cases -------------------------------------------------------------------------------
@pytest.mark.parametrize("T", [1, 5, 64, 100])
@pytest.mark.parametrize("decay", [True, False])
def test_unit_level_scales_give_gated_deltanet(T, decay, rng):
    q, v = rng.standard_normal((T, 3)), rng.standard_normal((T, 2))
    k, beta = _unit(rng.standard_normal((T, 3))), rng.uniform(0, 1, T)
    g = -rng.uniform(0, 1, T) if decay else np.zeros(T)
    want = plain_gated_deltanet(q, k, v, beta, g, 3**-0.5)
    M = hodlr.LogLinearMask(np.ones((T, hodlr.num_levels(T))), g if decay else None)
    for name in ("dense", "fenwick", "chunked"):
        assert_close(hodlr.gated_delta_attention(q, k, v, beta, M, backend=name), want, TOL, name)


def test_zero_beta_gives_zero(rng):
    T = 70
    M = hodlr.LogLinearMask(rng.uniform(0.2, 1.5, (T, hodlr.num_levels(T))), -rng.uniform(0, 1, T))
    q, k, v = rng.standard_normal((3, T, 4))
    for name in ("dense", "fenwick", "chunked"):
        out = hodlr.gated_delta_attention(q, k, v, np.zeros(T), M, backend=name)
        assert np.array_equal(out, np.zeros_like(out)), name


def test_rank_profile_of_the_matrix(rng):
    """``P ⊙ Mλ`` is a HODLR matrix whose off-diagonal blocks have rank ``min(Dk, block size)``."""
    T, Dk = 64, 3
    M = hodlr.LogLinearMask(rng.uniform(0.2, 1.5, (T, hodlr.num_levels(T))), -rng.uniform(0, 0.2, T))
    q, k = rng.standard_normal((2, T, Dk))
    beta = rng.uniform(0, 1, T)
    A = hodlr.gated_delta_matrix(q, _unit(k), beta, M)
    v = rng.standard_normal((T, 2))
    assert_close(A @ v, hodlr.gated_delta_attention(q, _unit(k), v, beta, M), TOL, "matrix times v")
    profile = hodlr.rank_profile(hodlr.HODLRMatrix.from_dense(A, rank=Dk))
    assert profile.max_rank == Dk
    for lev, ranks in profile.ranks.items():
        assert (ranks == min(Dk, 1 << (lev - 1))).all(), f"level {lev}: {ranks}"


def test_half_precision_and_float32(rng):
    T = 40
    lam = torch.as_tensor(rng.uniform(0.2, 1.5, (T, hodlr.num_levels(T))), dtype=torch.float32)
    g = -torch.rand(T)
    M = hodlr.LogLinearMask(lam, g)
    q, v = torch.randn(2, T, 4), torch.randn(2, T, 3)
    k, beta = _unit(torch.randn(T, 4)), torch.rand(T)
    M64 = hodlr.LogLinearMask(lam.double(), g.double())
    want = hodlr.gated_delta_attention(q.double(), k.double(), v.double(), beta.double(), M64, backend="dense")
    for name in ("dense", "fenwick", "chunked"):
        out = hodlr.gated_delta_attention(q, k, v, beta, M, backend=name)
        assert out.dtype == torch.float32
        assert_close(out, want, 1e-5, name)
        half = hodlr.gated_delta_attention(q.half(), k.half(), v.half(), beta.half(), M, backend=name)
        assert half.dtype == torch.float16
        assert_close(half, want, 1e-2, f"{name} float16")


# -- state hand-off in the chunked algorithm ----------------------------------------------------------
@settings(max_examples=60)
@given(T=st_lengths(1, 100), C=CHUNKS, cut=st.floats(0, 1), seed=st.integers(0, 2**32 - 1),
       decay=st.booleans())
def test_chunked_split_equals_one_call(T, C, cut, seed, decay):
    """``f([0, T)) == f([0, a)) then f([a, T); state)`` for any ``a``; the final states equal the
    recurrence's bucket states."""
    rng = np.random.default_rng(seed)
    a = int(round(cut * T))
    q, v = rng.standard_normal((2, T, 3)), rng.standard_normal((2, T, 2))
    k, beta = _unit(rng.standard_normal((2, T, 3))), rng.uniform(0, 1, (2, T))
    lam = poison_unread(rng.uniform(0.2, 1.5, (2, T, hodlr.num_levels(T) + 1)))
    g = -rng.uniform(0, 1, (2, T)) if decay else None
    pieces = lambda lo, hi: (q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], beta[:, lo:hi], lam[:, lo:hi],  # noqa: E731
                             None if g is None else g[:, lo:hi])
    want = dense.gated_delta_attention(*pieces(0, T), 0.5)
    o1, s1 = chunked.gated_delta_attention(*pieces(0, a), 0.5, chunk=C, final_state=True)
    o2, s2 = chunked.gated_delta_attention(*pieces(a, T), 0.5, chunk=C, state=s1, position=a, final_state=True)
    assert_close(np.concatenate([o1, o2], 1), want, TOL, f"split at {a}")
    rec = GatedDeltaState((2,), 3, 2)
    rec.prefill(*pieces(0, a), 0.5)
    assert s1.shape == (2, a.bit_length(), 3, 2)
    assert np.abs(s1 - rec.stacked()).max(initial=0) <= 1e-13, "state after the first part"
    rec.prefill(*pieces(a, T), 0.5)
    assert s2.shape == (2, T.bit_length(), 3, 2)
    assert np.abs(s2 - rec.stacked()).max() <= 1e-13, "state after the second part"


def test_initial_state_gradient_gradcheck(rng):
    """The chunked algorithm is differentiable in the carried state (finite differences), and its
    state gradients equal the recurrence's."""
    T, a, C = 7, 5, 4
    q, k, v = (torch.as_tensor(rng.standard_normal((T, 2))) for _ in range(3))
    k = _unit(k)
    beta, g = torch.as_tensor(rng.uniform(0, 1, T)), torch.as_tensor(-rng.uniform(0, 1, T))
    lam = torch.as_tensor(rng.uniform(0.2, 1.5, (T, hodlr.num_levels(a + T))))
    state = torch.as_tensor(rng.standard_normal((a.bit_length(), 2, 2)), dtype=torch.float64)
    state[1] = 0  # the empty bucket (bit 1 of 5 is clear)

    def run(backend):
        extra = {"chunk": C} if backend is chunked else {}
        return lambda s: backend.gated_delta_attention(q, k, v, beta, lam, g, 0.7, state=s, position=a,
                                                       final_state=True, **extra)

    assert torch.autograd.gradcheck(run(chunked), (state.clone().requires_grad_(True),))
    w_o, w_s = torch.randn(T, 2, dtype=torch.float64), torch.randn((a + T).bit_length(), 2, 2, dtype=torch.float64)
    grads = []
    for backend in (chunked, fenwick_backend):
        s = state.clone().requires_grad_(True)
        o, fin = run(backend)(s)
        ((o * w_o).sum() + (fin * w_s).sum()).backward()
        grads.append(s.grad)
    assert_close(grads[0], grads[1], GTOL, "d/dstate")


# -- the fla-shaped op ------------------------------------------------------------------------------
def _op_inputs(rng, B, T, H, Dk, Dv, Hqk=None, L_extra=0, poison=True):
    """fla-layout inputs; the never-read scales of positions ``0..T-1`` poisoned (unless a call
    continues from another position: ``poison=False``)."""
    Hqk = H if Hqk is None else Hqk
    t = lambda *shape: torch.as_tensor(rng.standard_normal(shape))  # noqa: E731
    q, k, v = t(B, T, Hqk, Dk), _unit(t(B, T, Hqk, Dk)), t(B, T, H, Dv)
    g = -torch.as_tensor(rng.uniform(0, 1, (B, T, H)))
    beta = torch.as_tensor(rng.uniform(0, 1, (B, T, H)))
    lam = rng.uniform(0.2, 1.5, (B, H, T, hodlr.num_levels(T) + L_extra))  # (..., T, L)
    lam = poison_unread(lam) if poison else lam
    return q, k, v, g, beta, torch.as_tensor(lam).transpose(1, 2)


@pytest.mark.parametrize("backend", ["chunked", "fenwick"])
def test_op_equals_api_and_steps(backend, rng):
    """The op equals ``gated_delta_attention`` on the transposed layout (grouped heads read in
    place); a prefill then single-token calls with the state equals one call."""
    B, T, H, Hqk = 2, 23, 4, 2
    q, k, v, g, beta, lam = _op_inputs(rng, B, T, H, 3, 2, Hqk)
    o, state = hodlr.log_linear_gated_delta_rule(q, k, v, g, beta, lam, backend=backend, output_final_state=True)
    assert o.shape == (B, T, H, 2) and state.positions.tolist() == [T, T] and state.num_slots == T.bit_length()
    rep = lambda x: x.repeat_interleave(H // Hqk, 2).transpose(1, 2)  # noqa: E731
    M = hodlr.LogLinearMask(lam.transpose(1, 2), g.transpose(1, 2))
    want = hodlr.gated_delta_attention(rep(q), rep(k), v.transpose(1, 2), beta.transpose(1, 2), M, backend="dense")
    assert_close(o.transpose(1, 2), want, TOL, "op vs api")
    a = 18
    outs = [hodlr.log_linear_gated_delta_rule(q[:, :a], k[:, :a], v[:, :a], g[:, :a], beta[:, :a], lam[:, :a],
                                              backend=backend, output_final_state=True)]
    for t in range(a, T):
        sl = slice(t, t + 1)
        outs.append(hodlr.log_linear_gated_delta_rule(q[:, sl], k[:, sl], v[:, sl], g[:, sl], beta[:, sl],
                                                      lam[:, sl], initial_state=outs[-1][1], backend=backend,
                                                      output_final_state=True))
    assert_close(torch.cat([x for x, _ in outs], 1), o, TOL, "prefill + steps")
    assert_close(outs[-1][1].states, state.states, TOL, "state after the steps")


@pytest.mark.parametrize("backend", ["chunked", "fenwick"])
def test_op_packed_sequences_equal_the_loop(backend, rng):
    """``cu_seqlens`` with an empty sequence and initial states at different positions equals
    the loop of single-sequence calls: outputs, final states, and gradients (initial state
    included)."""
    lengths, starts = [5, 0, 17, 1], [0, 3, 70, 64]
    T, H, Dk, Dv = sum(lengths), 2, 3, 2
    q, k, v, g, beta, _ = _op_inputs(rng, 1, T, H, Dk, Dv)
    lam = torch.as_tensor(rng.uniform(0.2, 1.5, (1, T, H, hodlr.num_levels(128))))
    S = 7
    init = torch.as_tensor(rng.standard_normal((4, H, S, Dk, Dv)))
    for n, a in enumerate(starts):  # empty buckets hold 0
        for lev in range(1, S + 1):
            if not (a >> (lev - 1)) & 1:
                init[n, :, lev - 1] = 0
    cu = torch.as_tensor(np.concatenate([[0], np.cumsum(lengths)]))
    positions = torch.as_tensor(starts)
    w = torch.randn(1, T, H, Dv, dtype=torch.float64)

    def packed(leaves):
        q, k, v, g, beta, lam, init = leaves
        state = hodlr.LogLinearState(init, positions)
        o, st = hodlr.log_linear_gated_delta_rule(q, k, v, g, beta, lam, initial_state=state, output_final_state=True,
                                                  cu_seqlens=cu, backend=backend)
        return o, st.states, st.positions

    def looped(leaves):
        q, k, v, g, beta, lam, init = leaves
        outs, finals = [], []
        for n in range(4):
            sl = slice(int(cu[n]), int(cu[n + 1]))
            o, st = hodlr.log_linear_gated_delta_rule(
                q[:, sl], k[:, sl], v[:, sl], g[:, sl], beta[:, sl], lam[:, sl],
                initial_state=hodlr.LogLinearState(init[n:n + 1], positions[n:n + 1]), output_final_state=True,
                backend=backend)
            outs.append(o)
            finals.append(st.with_slots(7).states)
        return torch.cat(outs, 1), torch.cat(finals), None

    results = []
    for fn in (packed, looped):
        leaves = [x.clone().requires_grad_(True) for x in (q, k, v, g, beta, lam, init)]
        o, states, pos = fn(leaves)
        if pos is not None:
            assert pos.tolist() == [a + n for a, n in zip(starts, lengths)]
            assert states.shape[2] == 7  # bit_length of the largest end, 87
        ((o * w).sum() + states.square().sum()).backward()
        results.append((o, states, [x.grad for x in leaves]))
    (o1, s1, g1), (o2, s2, g2) = results
    assert_close(o1, o2, TOL, "outputs")
    assert_close(s1, s2, TOL, "final states")
    assert_close(s1[1, :, :S], init[1], 0.0, "an empty sequence passes its state through")
    for a_, b_, name in zip(g1, g2, ("q", "k", "v", "g", "beta", "level_scales", "initial_state")):
        assert_close(a_, b_, GTOL, f"d/d{name}")


@pytest.mark.parametrize("decay", [True, False])
@pytest.mark.parametrize("backend", ["chunked", "fenwick"])
def test_op_packed_sequences_without_state_in_one_call(backend, decay, rng, monkeypatch):
    """Packed sequences without state equal the loop of single-sequence calls (outputs and every
    gradient, never-read scales poisoned, gradients 0 there); on ``chunked`` (and ``triton``, whose
    backends declare ``PACKED_AS_ONE_STREAM``) they are one backend call over the aligned stream of
    ``hodlr.ops.stream_layout``, on ``fenwick`` one call each."""
    from hodlr import ops

    lengths = [5, 0, 17, 1, 40, 33, 2, 64]
    T, H, Dk, Dv = sum(lengths), 2, 3, 2
    q, k, v, g, beta, _ = _op_inputs(rng, 1, T, H, Dk, Dv, Hqk=1)
    g[0, [0, 22, 23]] = 50.0  # first tokens of sequences: their log-decays multiply no pair
    g = g if decay else None
    lam = rng.uniform(0.2, 1.5, (1, H, T, hodlr.num_levels(64) + 1))
    lam = torch.as_tensor(poison_unread(lam, [0] * len(lengths), lengths)).transpose(1, 2)
    cu = torch.as_tensor(np.concatenate([[0], np.cumsum(lengths)]))
    w = torch.randn(1, T, H, Dv, dtype=torch.float64)
    module = hodlr.backends.load(backend)
    calls = []
    original = module.gated_delta_attention
    monkeypatch.setattr(module, "gated_delta_attention", lambda *a, **kw: calls.append(1) or original(*a, **kw))

    def packed(q, k, v, g, beta, lam):
        return hodlr.log_linear_gated_delta_rule(q, k, v, g, beta, lam, cu_seqlens=cu, backend=backend)[0]

    def looped(q, k, v, g, beta, lam):
        outs = [hodlr.log_linear_gated_delta_rule(*(None if x is None else x[:, int(cu[n]):int(cu[n + 1])]
                                                    for x in (q, k, v, g, beta, lam)), backend=backend)[0]
                for n in range(len(lengths))]
        return torch.cat(outs, 1)

    results = []
    for fn in (packed, looped):
        leaves = [None if x is None else x.clone().requires_grad_(True) for x in (q, k, v, g, beta, lam)]
        calls.clear()
        o = fn(*leaves)
        wrt = [x for x in leaves if x is not None]
        results.append((o, torch.autograd.grad((o * w).sum(), wrt), len(calls)))
    (o1, g1, n1), (o2, g2, n2) = results
    assert n1 == (1 if backend == "chunked" else len(lengths) - 1) and n2 == len(lengths) - 1  # none for the empty one
    assert_close(o1, o2, TOL, "outputs")
    for a, b in zip(g1, g2):
        assert_close(a, b, TOL, "gradients (never-read scales' exactly 0)")
    for lengths, want in (([5, 0, 17, 1], ([24, 0, 0, 29], 30)), ([3, 3, 3], ([0, 4, 8], 11)), ([1], ([0], 1)),
                          ([0, 0], ([0, 0], 0)), ([64, 65, 1], ([128, 0, 192], 193))):
        starts, end, K = ops.stream_layout(lengths)
        assert (starts.tolist(), end) == want, lengths
        assert all(n <= 1 << k and (n <= 1 or n > 1 << (k - 1)) for n, k in zip(lengths, K.tolist())), lengths


def test_packed_sequences_with_growing_gates_stay_finite():
    """In the stream no product of transitions runs across two sequences (each one's first
    log-decay is -inf there): growing gates over many packed float32 sequences give the finite
    outputs of the per-sequence calls, where a product across the whole stream would overflow."""
    rng = np.random.default_rng(4)
    lengths = [64] * 6
    T = sum(lengths)
    t = lambda *s: torch.as_tensor(rng.standard_normal(s), dtype=torch.float32)  # noqa: E731
    q, k, v = t(1, T, 1, 4), _unit(t(1, T, 1, 4)), t(1, T, 1, 4)
    g, beta = torch.full((1, T, 1), 0.3), torch.full((1, T, 1), 0.5)
    lam = torch.ones(1, T, 1, hodlr.num_levels(64))
    cu = torch.as_tensor(np.cumsum([0] + lengths))
    with torch.no_grad():
        o = hodlr.log_linear_gated_delta_rule(q, k, v, g, beta, lam, cu_seqlens=cu, backend="chunked")[0]
        pieces = [[x[:, 64 * n:64 * (n + 1)] for x in (q, k, v, g, beta, lam)] for n in range(6)]
        alone = torch.cat([hodlr.log_linear_gated_delta_rule(*p, backend="chunked")[0] for p in pieces], 1)
    assert torch.isfinite(o).all() and relative_error(o, alone) <= 1e-5


def test_op_split_at_random_points_matches_one_call(rng):
    """Through the op with the default chunk, states at positions 0, 1, non-multiples of 64."""
    B, T, H = 2, 150, 2
    q, k, v, g, beta, lam = _op_inputs(rng, B, T, H, 4, 3)
    want, final = hodlr.log_linear_gated_delta_rule(q, k, v, g, beta, lam, output_final_state=True)
    for cuts in ([0, 1, 150], [0, 63, 65, 150], [0, 2, 129, 130, 150]):
        outs, state = [], None
        for lo, hi in zip(cuts[:-1], cuts[1:]):
            o, state = hodlr.log_linear_gated_delta_rule(q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], g[:, lo:hi],
                                                         beta[:, lo:hi], lam[:, lo:hi], initial_state=state,
                                                         output_final_state=True)
            outs.append(o)
        assert_close(torch.cat(outs, 1), want, TOL, f"cuts {cuts}")
        assert_close(state.states, final.states, TOL, f"state, cuts {cuts}")


def test_op_rows_at_different_positions(rng):
    """A batch whose sequences continue from different positions (one of them 0) equals the
    per-row calls."""
    B, T, H = 3, 10, 2
    q, k, v, g, beta, lam = _op_inputs(rng, B, T, H, 2, 2, L_extra=3, poison=False)
    states = [hodlr.log_linear_gated_delta_rule(*_op_inputs(rng, 1, n, H, 2, 2), output_final_state=True)[1]
              for n in (5, 37)]
    zero = hodlr.LogLinearState.zeros(1, H, 2, 2, slots=6, dtype=torch.float64)
    parts = [states[0].with_slots(6), zero, states[1].with_slots(6)]
    init = hodlr.LogLinearState(torch.cat([s.states for s in parts]), torch.tensor([5, 0, 37]))
    o, fin = hodlr.log_linear_gated_delta_rule(q, k, v, g, beta, lam, initial_state=init, output_final_state=True)
    for n in range(B):
        on, fn = hodlr.log_linear_gated_delta_rule(q[n:n + 1], k[n:n + 1], v[n:n + 1], g[n:n + 1], beta[n:n + 1],
                                                   lam[n:n + 1], initial_state=init[n], output_final_state=True)
        assert_close(o[n:n + 1], on, TOL, f"row {n}")
        assert_close(fin.states[n:n + 1], fn.states, TOL, f"state {n}")


# -- the streaming state and bad input -----------------------------------------------------------------
def test_state_step_equals_prefill_and_refuses_bad_input(rng):
    T = 12
    q, v = rng.standard_normal((T, 3)), rng.standard_normal((T, 2))
    k, beta, g = _unit(rng.standard_normal((T, 3))), rng.uniform(0, 1, T), -rng.uniform(0, 1, T)
    lam = rng.uniform(0.2, 1.5, (T, hodlr.num_levels(T)))
    full = gated_delta(q, k, v, beta, lam, g, 0.5)
    st_ = GatedDeltaState((), 3, 2)
    first = st_.prefill(q[:7], k[:7], v[:7], beta[:7], lam[:7], g[:7], 0.5)
    before = {lev: s.copy() for lev, s in st_.states().items()}
    with pytest.raises(ValueError, match="beta must have shape"):
        st_.step(q[7], k[7], v[7], beta[7:9], lam[7], g[7], 0.5)
    with pytest.raises(ValueError, match="level_scales has L=2 levels"):
        st_.step(q[7], k[7], v[7], beta[7], lam[7, :2], g[7], 0.5)
    assert st_.position == 7 and all(np.array_equal(before[lev], s) for lev, s in st_.states().items())
    rest = [st_.step(q[t], k[t], v[t], beta[t], lam[t], g[t], 0.5) for t in range(7, T)]
    assert_close(np.concatenate([first, np.stack(rest)]), full, TOL, "prefill + steps")
    again = GatedDeltaState((), 3, 2, position=st_.position, states=st_.stacked(5))
    assert sorted(again.states()) == sorted(st_.states()) and again.levels == st_.levels
    with pytest.raises(ValueError, match="states are needed"):
        GatedDeltaState((), 3, 2, position=3)
    with pytest.raises(ValueError, match="S >= 4 slots"):
        GatedDeltaState((), 3, 2, position=12, states=np.zeros((3, 3, 2)))


def test_bad_input_and_refusals(rng):
    T = 8
    M = hodlr.LogLinearMask(np.ones((T, hodlr.num_levels(T))))
    q, k, v = rng.standard_normal((3, T, 2))
    with pytest.raises(ValueError, match=r"beta must have shape \(\.\.\., T\) with T=8"):
        hodlr.gated_delta_attention(q, k, v, np.ones(T + 1), M)
    with pytest.raises(TypeError, match="beta has dtype float32"):
        hodlr.gated_delta_attention(q, k, v, np.ones(T, np.float32), M)
    with pytest.raises(BackendUnavailableError, match="does not offer gated_delta_attention"):
        hodlr.gated_delta_attention(q, k, v, np.ones(T), M, backend="recursive")
    assert hodlr.gated_delta_attention(q[:, :0], k[:, :0], v, np.ones(T), M).shape == (T, 2), "Dk = 0 gives zeros"
    assert not hodlr.gated_delta_attention(q[:, :0], k[:, :0], v, np.ones(T), M).any()
    tq, tk, tv, tg, tb, tl = _op_inputs(rng, 1, T, 2, 2, 2, L_extra=1)
    o, st_ = hodlr.log_linear_gated_delta_rule(tq, tk, tv, tg, tb, tl, output_final_state=True)
    with pytest.raises(BackendUnavailableError, match="has no recurrent state"):
        hodlr.log_linear_gated_delta_rule(tq, tk, tv, tg, tb, tl, initial_state=st_, backend="dense")
    with pytest.raises(ValueError, match="needs at least num_levels"):
        hodlr.log_linear_gated_delta_rule(tq, tk, tv, tg, tb, tl[..., :-1], initial_state=st_)
    with pytest.raises(ValueError, match=r"beta must have shape \(B, T, H\)"):
        hodlr.log_linear_gated_delta_rule(tq, tk, tv, tg, tb[..., :1], tl)
    o_dense, _ = hodlr.log_linear_gated_delta_rule(tq, tk, tv, tg, tb, tl, backend="dense")
    assert_close(o_dense, o, TOL, "dense serves stateless calls")


# -- the decoding step ---------------------------------------------------------------------------------------
STEP_POSITIONS = [0, 1, 2, 3, 7, 8, 15, 16, 21]


def _step_case(rng, positions, S, scale=None, H=4, Hqk=2, Dk=3, Dv=2):
    """A cache of ``len(positions)`` sequences with ``S`` slots, sequence ``n`` at ``positions[n]``
    (its prefix run through the op), the token each consumes next (never-read scales of its row
    NaN), and what one call over the prefix and the token gives: its outputs at the token and its
    final states (with enough slots for every end position)."""
    N, T = len(positions), max(positions) + 1
    q, k, v, g, beta, lam = _op_inputs(rng, N, T, H, Dk, Dv, Hqk, L_extra=1, poison=False)
    prefix, want_o, want_s = [], [], []
    for n, p in enumerate(positions):
        part = [x[n:n + 1, :p + 1] for x in (q, k, v, g, beta, lam)]
        o, fin = hodlr.log_linear_gated_delta_rule(*part, scale=scale, output_final_state=True, backend="fenwick")
        want_o.append(o[:, p])
        want_s.append(fin.with_slots(max(S, T.bit_length())).states)
        if p:
            prefix.append(hodlr.log_linear_gated_delta_rule(*[x[:, :p] for x in part], output_final_state=True,
                                                            backend="fenwick")[1].with_slots(S).states)
        else:
            prefix.append(torch.zeros_like(want_s[-1][:, :, :S]))
    cache = hodlr.LogLinearState(torch.cat(prefix), torch.tensor(positions))
    rows = torch.arange(N), torch.tensor(positions)
    token = [x[rows][:, None] for x in (q, k, v, g, beta, lam)]
    L = lam.shape[-1]
    read = torch.as_tensor(np.stack([read_levels(p + 1, L)[p] for p in positions]))  # (N, L): what each row reads
    token[5] = token[5].masked_fill(~read[:, None, None, :], float("nan"))
    return cache, token, torch.cat(want_o)[:, None], torch.cat(want_s)


def test_step_equals_one_call_at_every_kind_of_position(rng):
    """``log_linear_gated_delta_step`` for sequences at positions 0, 1, 2^k - 1, 2^k and others
    equals one call over each sequence's prefix and token: outputs, states, positions."""
    cache, token, want_o, want_s = _step_case(rng, STEP_POSITIONS, S=6)
    o = hodlr.log_linear_gated_delta_step(*token, cache)
    assert o.shape == (len(STEP_POSITIONS), 1, 4, 2) and o.dtype == torch.float64
    assert_close(o, want_o, TOL, "outputs")
    assert_close(cache.states, want_s, TOL, "states")
    assert cache.positions.tolist() == [p + 1 for p in STEP_POSITIONS]


def test_step_refuses_or_skips_an_overflowing_row(rng):
    """A row at ``2**S - 1`` would need one more slot: ``validate`` refuses before anything changes;
    without it the row is left as it was with a NaN output and the other rows step."""
    cache, token, want_o, want_s = _step_case(rng, [5, 7], S=3, scale=0.7)
    before = cache.clone()
    with pytest.raises(ValueError, match="takes position 7 to 8, which needs 4 slots but the state has 3"):
        hodlr.log_linear_gated_delta_step(*token, cache)
    assert torch.equal(cache.states, before.states) and torch.equal(cache.positions, before.positions)
    o = hodlr.log_linear_gated_delta_step(*token, cache, scale=0.7, validate=False)
    assert bool(torch.isnan(o[1]).all()) and torch.equal(cache.states[1], before.states[1])
    assert cache.positions.tolist() == [6, 7]
    assert_close(o[0], want_o[0], TOL, "the row that fits")
    assert_close(cache.states[0], want_s[0, :, :3], TOL, "its state")


def test_auto_backend_of_the_rule():
    """``auto`` is ``chunked`` on the CPU (and for calls with state and a gradient anywhere);
    ``triton`` only on a CUDA device, for calls without state or without gradient, with keys the
    kernels take (``Dk <= 128``)."""
    from hodlr import ops

    for stateful, inference in ((False, False), (True, False), (True, True)):
        assert ops._resolve_gated_delta("auto", torch.device("cpu"), stateful, 64,
                                        inference).__name__.endswith(".chunked")
    if torch.cuda.is_available():
        assert ops._resolve_gated_delta("auto", torch.device("cuda"), False, 64).__name__.endswith(".triton")
        assert ops._resolve_gated_delta("auto", torch.device("cuda"), False, 256).__name__.endswith(".chunked")
        assert ops._resolve_gated_delta("auto", torch.device("cuda"), True, 64).__name__.endswith(".chunked")
        assert ops._resolve_gated_delta("auto", torch.device("cuda"), True, 64, True).__name__.endswith(".triton")
        assert ops._resolve_gated_delta("auto", torch.device("cuda"), True, 256, True).__name__.endswith(".chunked")


def test_state_refuses_a_non_finite_beta_and_hands_out_copies():
    """A NaN ``beta`` is refused before the state changes (as a read level scale or a log-decay is);
    ``states()`` returns new arrays; a length mismatch names ``v`` as the source of ``T``."""
    rng = np.random.default_rng(5)
    T, Dk, Dv = 6, 3, 2
    q, v = rng.standard_normal((T, Dk)), rng.standard_normal((T, Dv))
    k = _unit(rng.standard_normal((T, Dk)))
    beta, g, lam = rng.uniform(0.1, 1.0, T), -rng.uniform(0.0, 1.0, T), rng.uniform(0.5, 1.0, (T, 4))
    state = GatedDeltaState((), Dk, Dv)
    state.prefill(q[:4], k[:4], v[:4], beta[:4], lam[:4], g[:4])
    before = state.stacked().copy()
    with pytest.raises(ValueError, match=r"beta must be finite \(position 4\); got NaN or inf"):
        state.step(q[4], k[4], v[4], np.nan, lam[4], g[4])
    with pytest.raises(ValueError, match=r"beta must be finite \(positions 4\.\.5\)"):
        state.prefill(q[4:], k[4:], v[4:], np.array([0.5, np.inf]), lam[4:], g[4:])
    with pytest.raises(ValueError, match=r"q must have shape \(\*batch, T=2 as in v, Dk\) = \(2, 3\), got shape \(1, 3\)"):
        state.prefill(q[4:5], k[4:], v[4:], beta[4:], lam[4:], g[4:])
    assert state.position == 4 and np.array_equal(state.stacked(), before)
    for S in state.states().values():
        S[...] = 0.0
    assert np.array_equal(state.stacked(), before)
