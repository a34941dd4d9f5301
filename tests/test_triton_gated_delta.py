"""The Triton kernels of log-linear Gated DeltaNet equal the dense float64 reference.

On the CPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set by
``conftest.py``): hypothesis draws masks (never-read scales poisoned with NaN, every decay kind),
unit keys, write strengths up to 2, operands with broadcasting batch shapes and lengths that are
not multiples of the chunk; outputs are filled with NaN before the launch, so an element the
kernels never write fails.  float64 must match to 1e-12 and float32 to 1e-5 (randomly drawn
problems on ``hodlr.testing.scaled_error`` against ``|P ⊙ Mλ| |V|``), and the chunked backend
with the same chunk.  The gradients of :func:`hodlr.kernels.gated_delta` (all six inputs) must
match the dense float64 gradients under autograd to 1e-10 (float64) and 1e-4 (float32), with
every scratch buffer of the kernels filled with NaN and never-read scales getting exactly 0.
The ``gpu`` tests run bfloat16 on CUDA against the float64 reference.
"""

from __future__ import annotations

import contextlib
import importlib
import sys

import numpy as np
import pytest
import torch
import triton
import triton.language as tl
from hypothesis import given, settings, strategies as st

import hodlr
from hodlr.errors import BackendUnavailableError
from hodlr import fenwick, kernels
from hodlr.backends import chunked
from hodlr.testing import (TOLERANCES, assert_close, batch_shapes, poison_unread, relative_error, scaled_error,
                           st_lengths)
from hodlr.kernels._device import dot, round_tf32, split_dot
from hodlr.kernels._layout import hierarchy_sizes
from hodlr.kernels.gated_delta import MAX_DK, unit_lower_inverse

from test_gated_delta import _op_inputs, gdn_inputs
from test_ops import assert_elementwise

INTERP = kernels.interpreting()
DEVICE = "cpu" if INTERP else "cuda"
pytestmark = pytest.mark.skipif(not INTERP and not torch.cuda.is_available(),
                                reason="needs TRITON_INTERPRET=1 or a CUDA GPU")
DTYPES = [torch.float64, torch.float32] if INTERP else [torch.float32]
TOL = {torch.float64: TOLERANCES["interpreter_float64"], torch.float32: TOLERANCES["interpreter_float32"]}
CHUNK = 16
"""Small chunk: short sequences then span several chunks and several chunk levels."""


def _nan_like(shape, dtype):
    return torch.full(tuple(shape), float("nan"), dtype=dtype, device=DEVICE)


def _expand(batch, *tensors):
    """Each ``(*b, T, ...)`` tensor (``None`` passes) viewed with the batch shape ``batch``."""
    out = []
    for x, tail in tensors:
        out.append(None if x is None else x.expand(batch + tuple(x.shape[x.dim() - tail:])))
    return out


def _dense(q, k, v, beta, lam, g, scale):
    """``(P ⊙ Mλ) V`` and ``|P ⊙ Mλ| |V|`` in float64 on the CPU (the operands broadcast)."""
    to64 = [None if x is None else x.detach().double().cpu() for x in (q, k, v, beta, lam, g)]
    q, k, v, beta, lam, g = to64
    M = hodlr.LogLinearMask(lam, g, validate=False)
    A = hodlr.gated_delta_matrix(q, k, beta, M, scale=scale)
    return A @ v, A.abs() @ v.abs()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@settings(max_examples=8)
@given(args=gdn_inputs(T=st_lengths(1, 50), batch=batch_shapes(2, 2), library="torch", Dk=st.integers(1, 5),
                       Dv=st.integers(1, 5)),
       scale=st.sampled_from([1.0, 0.37]))
def test_forward_equals_dense(dtype, args, scale):
    M, q, k, v, beta = args
    batch = tuple(torch.broadcast_shapes(M.batch_shape, q.shape[:-2], k.shape[:-2], v.shape[:-2], beta.shape[:-1]))
    cast = lambda x: None if x is None else x.to(DEVICE, dtype)  # noqa: E731
    q, k, v, beta, lam, g = (cast(x) for x in (q, k, v, beta, M.level_scales, M.log_decay))
    q, k, v, beta, lam, g = _expand(batch, (q, 2), (k, 2), (v, 2), (beta, 1), (lam, 2), (g, 1))
    out = _nan_like(batch + (M.T, v.shape[-1]), dtype)
    got = kernels.gated_delta_forward(q, k, v, beta, lam, g, scale, chunk=CHUNK, out=out)
    assert got.data_ptr() == out.data_ptr()
    want, size = _dense(q, k, v, beta, lam, g, scale)
    err = scaled_error(got, want, size)
    assert err <= TOL[dtype], f"scaled error {err:.3e} > {TOL[dtype]:.0e} (T={M.T})"


@pytest.mark.interpreter
@pytest.mark.parametrize("T, C", [(1, 16), (2, 16), (17, 16), (65, 16), (97, 32), (130, 64), (64, 32)])
def test_awkward_lengths_equal_chunked(T, C):
    """float64, strong decay (steps down to -50), β up to 2, grouped heads (two value heads read
    one key head): the chunked backend with the same chunk and the dense reference."""
    rng = np.random.default_rng(T)
    t = lambda *shape: torch.as_tensor(rng.standard_normal(shape))  # noqa: E731
    q, k, v = t(1, 1, T, 4), torch.nn.functional.normalize(t(1, 1, T, 4), dim=-1), t(1, 2, T, 3)
    beta = torch.as_tensor(rng.uniform(0, 2, (1, 2, T)))
    lam = poison_unread(torch.as_tensor(rng.uniform(-0.5, 1.5, (1, 2, T, hodlr.num_levels(T) + 1))))
    g = torch.as_tensor(np.where(rng.random((1, 2, T)) < 0.5, -rng.uniform(0, 1e-3, (1, 2, T)),
                                 -rng.uniform(0, 50, (1, 2, T))))
    q, k = _expand((1, 2), (q, 2), (k, 2))
    dev = [x.to(DEVICE) for x in (q, k, v, beta, lam, g)]
    got = kernels.gated_delta_forward(*dev, 0.5, chunk=C, out=_nan_like((1, 2, T, 3), torch.float64))
    assert_close(got.cpu(), chunked.gated_delta_attention(q, k, v, beta, lam, g, 0.5, chunk=C),
                 TOL[torch.float64], "vs chunked")
    assert_close(got.cpu(), _dense(q, k, v, beta, lam, g, 0.5)[0], TOL[torch.float64], "vs dense")


def _one_sequence(T, Dk, seed):
    """``(q, k, v, beta, lam, g, w)`` of one float64 sequence (``Dv = 2``, unit keys, never-read scales
    NaN, ``w`` the output's cotangent weights) on the CPU."""
    rng = np.random.default_rng(seed)
    t = lambda *shape: torch.as_tensor(rng.standard_normal(shape))  # noqa: E731
    q, k, v = t(1, T, Dk), torch.nn.functional.normalize(t(1, T, Dk), dim=-1), t(1, T, 2)
    beta = torch.as_tensor(rng.uniform(0, 1, (1, T)))
    lam = poison_unread(torch.as_tensor(rng.uniform(0.2, 1.5, (1, T, hodlr.num_levels(T)))))
    g = -torch.as_tensor(rng.uniform(0, 0.3, (1, T)))
    return q, k, v, beta, lam, g, t(1, T, 2)


@contextlib.contextmanager
def _chunks_used():
    """The list of chunk sizes the forward and the backward build their hierarchies with, in order."""
    gd, gdb = sys.modules["hodlr.kernels.gated_delta"], sys.modules["hodlr.kernels.gated_delta_backward"]
    build, chunks = gd.chunk_hierarchy, []

    def spy(layout, C, *carried):
        chunks.append(C)
        return build(layout, C, *carried)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gd, "chunk_hierarchy", spy)
        mp.setattr(gdb, "chunk_hierarchy", spy)
        yield chunks


@pytest.mark.interpreter
def test_wide_keys_default_chunk():
    """Keys wider than 64 (128-wide key tiles) run forward and backward at the default chunk
    ``DEFAULT_CHUNK["gated_delta"]`` (checked by a spy: the forward builds the hierarchy, the
    backward reads it): the output and the gradients equal the dense reference."""
    q, k, v, beta, lam, g, w = _one_sequence(70, 80, seed=80)
    leaves = [x.to(DEVICE).requires_grad_(True) for x in (q, k, v, beta, lam, g)]
    with _nan_scratch(), _chunks_used() as chunks:
        got = kernels.gated_delta(*leaves, 0.3)
        grads = torch.autograd.grad((got * w.to(got)).sum(), leaves)
    assert chunks == [kernels.DEFAULT_CHUNK["gated_delta"]]
    assert_close(got.detach().cpu(), _dense(q, k, v, beta, lam, g, 0.3)[0], TOL[torch.float64], "vs dense")
    want = _grads((q, k, v, beta, lam, g), w, 0.3, torch.float64)
    for name, grad in zip(NAMES, grads):
        assert_close(grad.cpu(), want[name], GRAD_TOL[torch.float64], f"d{name}")


@pytest.mark.interpreter
def test_wide_chunk_forward_differentiates_at_the_backward_chunk():
    """A forward at chunk 64 differentiates through a backward at ``MAX_BACKWARD_CHUNK`` (its chunk
    kernel at 64 does not fit a GPU's shared memory; the gradients do not depend on the chunk), and
    the backward called at 64 says so."""
    q, k, v, beta, lam, g, w = _one_sequence(70, 3, seed=70)
    with _chunks_used() as chunks:
        _check_grads((q, k, v, beta, lam, g), w, 0.3, torch.float64, chunk=64)
    assert chunks == [64, sys.modules["hodlr.kernels.gated_delta_backward"].MAX_BACKWARD_CHUNK]
    dev = [x.to(DEVICE) for x in (q, k, v, beta, lam, g)]
    with pytest.raises(ValueError, match=r"chunk of the Gated DeltaNet backward must be at most 32 .*got 64"):
        kernels.gated_delta_backward(*dev, 0.3, torch.ones_like(dev[2]), chunk=64)


@pytest.mark.interpreter
def test_public_api_and_no_decay(rng):
    """``hodlr.gated_delta_attention(..., backend="triton")`` (default chunk, no decay, a mask
    shared by the heads, float32 operands) equals the fenwick recurrence."""
    T = 70
    M = hodlr.LogLinearMask(poison_unread(torch.as_tensor(rng.uniform(0.2, 1.5, (T, hodlr.num_levels(T))))))
    q, v = torch.as_tensor(rng.standard_normal((2, T, 3))), torch.as_tensor(rng.standard_normal((2, T, 2)))
    k = torch.nn.functional.normalize(torch.as_tensor(rng.standard_normal((2, T, 3))), dim=-1)
    beta = torch.as_tensor(rng.uniform(0, 1, (2, T)))
    want = hodlr.gated_delta_attention(q, k, v, beta, M, backend="fenwick")
    assert_close(hodlr.gated_delta_attention(q, k, v, beta, M, backend="triton"), want, TOL[torch.float64], "float64")
    M32 = hodlr.LogLinearMask(M.level_scales.float())
    got = hodlr.gated_delta_attention(q.float(), k.float(), v.float(), beta.float(), M32, backend="triton")
    assert got.dtype == torch.float32
    assert_close(got, want, TOL[torch.float32], "float32")


PREFILL_LENGTHS = [1, 2, 3, 31, 32, 33, 63, 64, 65, 96, 127, 128, 129, 200]
"""Around the default chunk (32) and its powers of two: a last chunk partial or whole, hierarchies
whose final buckets need a level the forward does not store (64, 128) and transitions it forms
only below its top level."""


def _rule(args, dtype, **kw):
    return hodlr.log_linear_gated_delta_rule(*(None if x is None else x.to(DEVICE, dtype) for x in args), **kw)


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("decay", [True, False])
def test_prefill_final_state_equals_chunked(dtype, decay):
    """``backend="triton"`` with ``output_final_state`` and no gradient (a prefill) returns the
    outputs and the bucket states of the float64 ``chunked`` backend (grouped heads, never-read
    scales poisoned), and decoding continues from them as from one call."""
    rng = np.random.default_rng(11)
    for T in PREFILL_LENGTHS:
        q, k, v, g, beta, lam = _op_inputs(rng, 2, T + 3, 2, 5, 3, Hqk=1)
        g = g if decay else None
        head = [None if x is None else x[:, :T] for x in (q, k, v, g, beta, lam)]
        with torch.no_grad():
            o, state = _rule(head, dtype, output_final_state=True, backend="triton")
        want_o, want = hodlr.log_linear_gated_delta_rule(*head, output_final_state=True, backend="chunked")
        assert state.states.dtype == dtype and state.positions.tolist() == [T, T]
        assert state.states.shape == want.states.shape, T
        assert_close(o, want_o, TOL[dtype], f"outputs at T={T}")
        assert_close(state.states, want.states, TOL[dtype], f"final bucket states at T={T}")
        tail = [None if x is None else x[:, T:] for x in (q, k, v, g, beta, lam)]
        o_rest, _ = _rule(tail, dtype, initial_state=state, backend="chunked")
        whole, _ = hodlr.log_linear_gated_delta_rule(q, k, v, g, beta, lam, backend="chunked")
        assert_close(torch.cat([o, o_rest], 1), whole, TOL[dtype], f"prefill + continuation at T={T}")


@pytest.mark.interpreter
@pytest.mark.parametrize("lengths", [[0, 5, 70, 1, 32], [300, 1, 0, 257, 64, 33]])
def test_prefill_of_packed_sequences_equals_chunked(lengths):
    """Packed sequences (some empty, some shorter than a chunk, some over several, the longer over
    whole blocks of several levels, read at once for all sequences) each get their own final
    state."""
    rng = np.random.default_rng(12)
    T = sum(lengths)
    q, k, v, g, beta, lam = _op_inputs(rng, 1, T, 2, 4, 3, poison=False)
    lam = torch.as_tensor(poison_unread(lam.transpose(1, 2).numpy(), [0] * len(lengths), lengths)).transpose(1, 2)
    cu = torch.as_tensor(np.cumsum([0] + lengths))
    with torch.no_grad():
        o, state = hodlr.log_linear_gated_delta_rule(q, k, v, g, beta, lam, output_final_state=True, cu_seqlens=cu,
                                                     backend="triton")
    want_o, want = hodlr.log_linear_gated_delta_rule(q, k, v, g, beta, lam, output_final_state=True, cu_seqlens=cu,
                                                     backend="chunked")
    assert_close(o, want_o, TOL[torch.float64], "outputs")
    assert_close(state.states, want.states, TOL[torch.float64], "final states")
    assert state.positions.tolist() == lengths


@pytest.mark.interpreter
@settings(max_examples=10, deadline=None)
@given(lengths=st.lists(st.integers(0, 80), min_size=2, max_size=7).filter(any), decay=st.booleans(), grouped=st.booleans(),
       seed=st.integers(0, 2 ** 16))
def test_packed_prefill_is_one_forward(lengths, decay, grouped, seed):
    """Packed prompts prefilled without gradient (final states, no initial one) are one forward over
    the aligned stream, each sequence's final buckets read off its hierarchy relative to its start
    (short sequences sharing a chunk, sequences ending inside one, at a chunk's edge, empty):
    outputs and final states equal the float64 ``chunked`` backend's."""
    forwards = []
    original = kernels.gated_delta_forward
    rng = np.random.default_rng(seed)
    T = sum(lengths)
    q, k, v, g, beta, lam = _op_inputs(rng, 1, T, 2, 3, 2, Hqk=1 if grouped else 2, poison=False)
    lam = torch.as_tensor(poison_unread(lam.transpose(1, 2).numpy(), [0] * len(lengths), lengths)).transpose(1, 2)
    args = (q, k, v, g if decay else None, beta, lam)
    cu = torch.as_tensor(np.cumsum([0] + lengths))
    with torch.no_grad(), pytest.MonkeyPatch.context() as patch:
        patch.setattr(kernels, "gated_delta_forward", lambda *a, **kw: forwards.append(1) or original(*a, **kw))
        o, state = hodlr.log_linear_gated_delta_rule(*args, output_final_state=True, cu_seqlens=cu, backend="triton")
    want_o, want = hodlr.log_linear_gated_delta_rule(*args, output_final_state=True, cu_seqlens=cu, backend="chunked")
    assert len(forwards) == (1 if np.count_nonzero(lengths) > 1 else np.count_nonzero(lengths))
    assert state.positions.tolist() == lengths and state.states.shape == want.states.shape
    assert_close(o, want_o, TOL[torch.float64], "outputs")
    assert_close(state.states, want.states, TOL[torch.float64], "final states")


def test_states_only_without_gradient():
    """The triton backend differentiates no Gated DeltaNet state: a call with an initial or a final
    state runs without gradient, and is refused with the backends that take it where a gradient is
    wanted (``auto`` runs those)."""
    rng = np.random.default_rng(13)
    args = [x.to(DEVICE, DTYPES[0]) for x in _op_inputs(rng, 1, 20, 1, 3, 3, L_extra=1)]
    with torch.no_grad():
        _, state = hodlr.log_linear_gated_delta_rule(*args, output_final_state=True, backend="triton")
        hodlr.log_linear_gated_delta_rule(*args, initial_state=state, backend="triton")
    leaf = args[2].clone().requires_grad_(True)
    for kw in ({"output_final_state": True}, {"initial_state": state}):
        with pytest.raises(BackendUnavailableError, match="only without gradient .*use one of fenwick, chunked"):
            hodlr.log_linear_gated_delta_rule(args[0], args[1], leaf, *args[3:], backend="triton", **kw)
    o, grad_state = hodlr.log_linear_gated_delta_rule(args[0], args[1], leaf, *args[3:], output_final_state=True)
    assert o.requires_grad and grad_state.states.requires_grad, "auto: chunked, differentiable"
    assert_close(grad_state.states.detach(), state.states, TOL[torch.float64] if INTERP else 1e-5, "same state")


CONTINUATIONS = [(5, 3), (1, 1), (3, 40), (31, 2), (32, 33), (100, 64), (1000, 129), (1023, 2), (1024, 70),
                 (2 ** 20 - 5, 10), (2 ** 20 - 40, 100), (12345, 300), (63, 65), (96, 32), (2 ** 16 + 3, 61)]
"""``(position, T)`` of continued calls: from positions with one and with many set bits, inside a
chunk and at its edge, whose calls cross a multiple of a high power of two (2^20 from 2^20 - 5:
the stream's crossing level far above its own) or end on one."""


def _continued_call(rng, a, T, decay, Hqk=1, B=2, poison=True):
    """fla-layout inputs of ``T`` tokens from position ``a`` (never-read scales NaN) and a state at
    ``a`` with random live buckets (0 in the empty slots)."""
    L = hodlr.num_levels(a + T) + 1
    q, k, v, g, beta, _ = _op_inputs(rng, B, T, 2, 3, 2, Hqk=Hqk, poison=False)
    lam = rng.uniform(0.2, 1.5, (B, 2, T, L))
    if poison:
        lam = poison_unread(lam, [a], [T])
    S = max(1, a.bit_length())
    live = torch.tensor([(a >> i) & 1 for i in range(S)], dtype=torch.bool)
    init = torch.where(live[:, None, None], torch.as_tensor(rng.standard_normal((B, 2, S, 3, 2))), 0.0)
    state = hodlr.LogLinearState(init, torch.full((B,), a))
    return [q, k, v, g if decay else None, beta, torch.as_tensor(lam).transpose(1, 2)], state


@pytest.mark.interpreter
@pytest.mark.parametrize("split", [True, False])
@pytest.mark.parametrize("decay", [True, False])
def test_continued_calls_equal_chunked(decay, split, monkeypatch):
    """A call continuing from a state without gradient on ``triton`` (the stream of
    ``gated_delta_with_state``) gives the float64 ``chunked`` backend's outputs and final states,
    grouped heads, never-read scales NaN; with a long padding as two calls (the first to the
    multiple it crosses, ``SPLIT_LONG_PADDING``: from 100 and from 1000 here) and as one."""
    from hodlr.backends import triton as triton_backend

    monkeypatch.setattr(triton_backend, "SPLIT_LONG_PADDING", split)
    forwards = []
    original = kernels.gated_delta_forward
    monkeypatch.setattr(kernels, "gated_delta_forward", lambda *a, **kw: forwards.append(1) or original(*a, **kw))
    rng = np.random.default_rng(16)
    for a, T in CONTINUATIONS:
        forwards.clear()
        args, state = _continued_call(rng, a, T, decay, Hqk=1 + (a % 2))
        with torch.no_grad():
            o, final = hodlr.log_linear_gated_delta_rule(*args, initial_state=state, output_final_state=True,
                                                         backend="triton")
        want_o, want = hodlr.log_linear_gated_delta_rule(*args, initial_state=state, output_final_state=True,
                                                         backend="chunked")
        assert final.states.shape == want.states.shape and final.positions.tolist() == [a + T] * 2
        assert_close(o, want_o, TOL[torch.float64], f"outputs from {a}, T={T}")
        with torch.no_grad():  # without the final state: the same outputs
            alone, none = hodlr.log_linear_gated_delta_rule(*args, initial_state=state, backend="triton")
        assert none is None and torch.equal(alone, o)
        assert_close(final.states, want.states, TOL[torch.float64], f"final states from {a}, T={T}")
        assert len(forwards) == (4 if split and (a, T) in ((100, 64), (1000, 129)) else 2), (a, T)


@pytest.mark.interpreter
@settings(max_examples=12, deadline=None)
@given(a=st.integers(0, 2 ** 21), T=st.integers(1, 120), decay=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_continued_calls_from_any_position(a, T, decay, seed):
    """The same from drawn positions and lengths."""
    _assert_continued_call_equals_chunked(*_continued_call(np.random.default_rng(seed), a, T, decay, B=1))


def _assert_continued_call_equals_chunked(args, state):
    """A call from ``state`` without gradient on ``triton``: the ``chunked`` backend's outputs and final
    states (float64)."""
    with torch.no_grad():
        o, final = hodlr.log_linear_gated_delta_rule(*args, initial_state=state, output_final_state=True,
                                                     backend="triton")
    want_o, want = hodlr.log_linear_gated_delta_rule(*args, initial_state=state, output_final_state=True,
                                                     backend="chunked")
    assert_close(o, want_o, TOL[torch.float64], "outputs")
    assert_close(final.states, want.states, TOL[torch.float64], "final states")


@pytest.mark.interpreter
def test_packed_sequences_with_states_equal_chunked():
    """Packed sequences continuing from states at different positions (one empty) without gradient:
    one stream each, the outputs and final states of ``chunked``."""
    rng = np.random.default_rng(17)
    lengths, starts = [5, 0, 40, 1, 33], [0, 3, 70, 2 ** 12 - 1, 64]
    T, S = sum(lengths), 13
    q, k, v, g, beta, _ = _op_inputs(rng, 1, T, 2, 3, 2, poison=False)
    lam = torch.as_tensor(rng.uniform(0.2, 1.5, (1, T, 2, hodlr.num_levels(2 ** 12 + 1))))
    init = torch.as_tensor(rng.standard_normal((len(lengths), 2, S, 3, 2)))
    live = torch.tensor([[(a >> i) & 1 for i in range(S)] for a in starts], dtype=torch.bool)
    state = hodlr.LogLinearState(torch.where(live[:, None, :, None, None], init, 0.0), torch.tensor(starts))
    cu = torch.as_tensor(np.cumsum([0] + lengths))
    with torch.no_grad():
        o, final = hodlr.log_linear_gated_delta_rule(q, k, v, g, beta, lam, initial_state=state, cu_seqlens=cu,
                                                     output_final_state=True, backend="triton")
    want_o, want = hodlr.log_linear_gated_delta_rule(q, k, v, g, beta, lam, initial_state=state, cu_seqlens=cu,
                                                     output_final_state=True, backend="chunked")
    assert_close(o, want_o, TOL[torch.float64], "outputs")
    assert_close(final.states, want.states, TOL[torch.float64], "final states")


@pytest.mark.interpreter
def test_packed_sequences_run_as_one_call(monkeypatch):
    """Packed sequences without state on ``triton`` are one forward and one backward over the aligned
    stream: outputs and gradients equal the float64 ``chunked`` backend's per-sequence calls."""
    from hodlr.kernels import autograd as kernel_autograd

    rng = np.random.default_rng(15)
    lengths = [40, 3, 0, 70, 1, 17]
    T = sum(lengths)
    q, k, v, g, beta, lam = _op_inputs(rng, 1, T, 2, 3, 2, poison=False)
    lam = torch.as_tensor(poison_unread(lam.transpose(1, 2).numpy(), [0] * len(lengths), lengths)).transpose(1, 2)
    cu = torch.as_tensor(np.cumsum([0] + lengths))
    w = torch.randn(1, T, 2, 2, dtype=torch.float64)
    calls = []
    original = kernel_autograd.gated_delta
    monkeypatch.setattr(kernel_autograd, "gated_delta", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    monkeypatch.setattr(kernels, "gated_delta", kernel_autograd.gated_delta)
    results = []
    for backend in ("triton", "chunked"):
        leaves = [x.clone().requires_grad_(True) for x in (q, k, v, g, beta, lam)]
        if backend == "triton":
            o = hodlr.log_linear_gated_delta_rule(*leaves, cu_seqlens=cu, backend="triton")[0]
        else:
            o = torch.cat([hodlr.log_linear_gated_delta_rule(*(x[:, int(cu[n]):int(cu[n + 1])] for x in leaves),
                                                             backend="chunked")[0] for n in range(len(lengths))], 1)
        results.append((o, torch.autograd.grad((o * w).sum(), leaves)))
    assert len(calls) == 1
    (o1, g1), (o2, g2) = results
    assert_close(o1, o2, TOL[torch.float64], "outputs")
    for name, a, b in zip(("q", "k", "v", "g", "beta", "level_scales"), g1, g2):
        assert_close(a, b, TOL[torch.float64], f"d{name} (never-read scales' exactly 0)")


@pytest.mark.interpreter
def test_packed_bfloat16_sequences_cross_their_zero_transitions():
    """bfloat16 packed sequences over one stream: each sequence's first log-decay is -inf (a zero
    transition), and the chunks holding one form their in-chunk decays from the terms, not as
    ``G_t - G_s`` (NaN past an -inf): outputs and gradients within the bfloat16 tolerance of the
    float64 ``chunked`` backend's per-sequence calls, none NaN."""
    rng = np.random.default_rng(16)
    lengths = [40, 1, 0, 63, 70, 20]
    cu = torch.as_tensor(np.cumsum([0] + lengths))
    xs = _op_inputs(rng, 1, sum(lengths), 2, 16, 16, poison=False)
    leaves = [x.to(torch.bfloat16).requires_grad_(True) for x in xs]
    refs = [x.detach().double().requires_grad_(True) for x in leaves]
    o = hodlr.log_linear_gated_delta_rule(*leaves, cu_seqlens=cu, backend="triton")[0]
    ref = torch.cat([hodlr.log_linear_gated_delta_rule(*(x[:, int(cu[n]):int(cu[n + 1])] for x in refs),
                                                       backend="chunked")[0] for n in range(len(lengths))], 1)
    w = torch.as_tensor(rng.standard_normal(ref.shape))
    assert relative_error(o, ref) <= TOLERANCES["gpu_bfloat16"]
    for name, a, b in zip(("q", "k", "v", "g", "beta", "level_scales"),
                          torch.autograd.grad((o.double() * w).sum(), leaves), torch.autograd.grad((ref * w).sum(), refs)):
        assert relative_error(a, b) <= TOLERANCES["gpu_bfloat16"], f"d{name}"


@pytest.mark.interpreter
def test_compiled_prefill_differentiates_through_chunked():
    """Compiled, the operator's forward runs without autograd, so a call with a final state and no
    initial one is the triton prefill even where a gradient is wanted; its backward recomputes with
    ``chunked`` (triton keeps no state), so outputs, final states and gradients equal eager
    ``chunked``'s."""
    rng = np.random.default_rng(14)
    args = list(_op_inputs(rng, 2, 37, 2, 3, 2))

    def run(backend, *xs):
        o, state = hodlr.log_linear_gated_delta_rule(*xs, output_final_state=True, backend=backend)
        return o, state.states

    grads = []
    for fn, backend in ((torch.compile(run, fullgraph=True, backend="aot_eager"), "triton"), (run, "chunked")):
        xs = [x.clone().requires_grad_(True) for x in args]
        o, states = fn(backend, *xs)
        loss = (o * torch.linspace(-1, 1, o.numel()).reshape(o.shape)).sum() + states.square().sum()
        grads.append((o.detach(), states.detach(), torch.autograd.grad(loss, xs)))
    (o1, s1, g1), (o2, s2, g2) = grads
    assert_close(o1, o2, TOL[torch.float64], "outputs")
    assert_close(s1, s2, TOL[torch.float64], "final states")
    for name, a, b in zip(("q", "k", "v", "g", "beta", "level_scales"), g1, g2):
        assert_close(torch.nan_to_num(a), torch.nan_to_num(b), TOL[torch.float64], f"d{name}")


def test_wide_keys_are_refused():
    q = torch.zeros(1, 16, MAX_DK + 1, device=DEVICE)
    with pytest.raises(ValueError, match=r"Dk <= 128, got Dk=129 \(use the 'chunked' backend"):
        kernels.gated_delta_forward(q, q, q[..., :2], q[..., 0], torch.ones(1, 16, 5, device=DEVICE))


# -- the backward ----------------------------------------------------------------------------------
GRAD_TOL = {torch.float64: TOLERANCES["grad_float64"], torch.float32: 1e-4}
NAMES = ("q", "k", "v", "beta", "level_scales", "log_decay")


@contextlib.contextmanager
def _nan_scratch():
    """Every scratch buffer of the kernels (``kernels._layout.scratch``) filled with NaN: a read
    of anything not written first poisons the result."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kernels._layout, "scratch", lambda shape, dtype, device: torch.full(
            shape, float("nan"), dtype=dtype, device=device))
        yield


def _grads(inputs, w, scale, dtype, chunk=None):
    """``{name: gradient}`` of ``Σ w ⊙ O``: the dense float64 reference under autograd
    (``chunk=None``) or :func:`kernels.gated_delta` in ``dtype`` with chunk ``chunk``."""
    if chunk is None:
        leaves = [None if x is None else x.detach().double().cpu().requires_grad_(True) for x in inputs]
        q, k, v, beta, lam, g = leaves
        out = hodlr.gated_delta_matrix(q, k, beta, hodlr.LogLinearMask(lam, g, validate=False), scale=scale) @ v
    else:
        leaves = [None if x is None else x.detach().to(DEVICE, dtype).requires_grad_(True) for x in inputs]
        with _nan_scratch():
            out = kernels.gated_delta(*leaves, scale, chunk=chunk)
            assert out.requires_grad, "result is cut off from the autograd graph"
            grads = torch.autograd.grad((out * w.to(out)).sum(), [x for x in leaves if x is not None])
        return dict(zip([n for n, x in zip(NAMES, leaves) if x is not None], grads))
    grads = torch.autograd.grad((out * w.double()).sum(), [x for x in leaves if x is not None])
    return dict(zip([n for n, x in zip(NAMES, leaves) if x is not None], grads))


def _check_grads(inputs, w, scale, dtype, chunk=CHUNK):
    got, want = _grads(inputs, w, scale, dtype, chunk), _grads(inputs, w, scale, dtype)
    assert got.keys() == want.keys()
    T = inputs[2].shape[-2]
    for name, expected in want.items():
        err = relative_error(got[name].cpu(), expected)
        assert err <= GRAD_TOL[dtype], f"d{name}: relative error {err:.3e} > {GRAD_TOL[dtype]:.0e} (T={T}, {dtype})"
    dlam = got["level_scales"]
    read = torch.as_tensor(fenwick.read_levels(T, dlam.shape[-1]), device=dlam.device)
    assert torch.equal(dlam[..., ~read], torch.zeros_like(dlam[..., ~read])), "never-read scales got a gradient"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@settings(max_examples=4, deadline=None)
@given(args=gdn_inputs(T=st_lengths(1, 40), batch=batch_shapes(2, 2), library="torch", Dk=st.integers(1, 5),
                       Dv=st.integers(1, 4)),
       scale=st.sampled_from([1.0, 0.37]), seed=st.integers(0, 2**32 - 1))
def test_gradients_equal_dense(dtype, args, scale, seed):
    """Every decay kind, broadcast batch shapes (the gradients of a broadcast operand are summed)."""
    M, q, k, v, beta = args
    batch = tuple(torch.broadcast_shapes(M.batch_shape, q.shape[:-2], k.shape[:-2], v.shape[:-2], beta.shape[:-1]))
    w = torch.as_tensor(np.random.default_rng(seed).standard_normal(batch + (M.T, v.shape[-1])))
    _check_grads((q, k, v, beta, M.level_scales, M.log_decay), w, scale, dtype)


@pytest.mark.interpreter
@pytest.mark.parametrize("T, C, decay, Dk, Dv", [
    (1, 16, True, 3, 2), (2, 16, False, 3, 2), (3, 16, True, 1, 3), (17, 16, False, 3, 2), (33, 16, True, 5, 2),
    (65, 16, True, 3, 2), (65, 16, False, 2, 3), (100, 32, True, 3, 2), (20, 16, True, 2, 67), (40, 16, True, 67, 3),
    (64, 16, True, 3, 2), (96, 32, False, 2, 3)])  # whole chunks too: the kernels' FULL_CHUNKS variant
def test_gradients_awkward_lengths(T, C, decay, Dk, Dv):
    """float64, β up to 2, strong and weak decay steps, head widths that are not powers of two
    (``Dv = 67``: two value tiles; ``Dk = 67``: 2 x 2 blocks of the transition gradients), never-read
    scales poisoned with NaN."""
    rng = np.random.default_rng(T + Dv)
    t = lambda *shape: torch.as_tensor(rng.standard_normal(shape))  # noqa: E731
    q, k, v = t(2, T, Dk), torch.nn.functional.normalize(t(2, T, Dk), dim=-1), t(2, T, Dv)
    beta = torch.as_tensor(rng.uniform(0, 2, (2, T)))
    lam = poison_unread(torch.as_tensor(rng.uniform(-0.5, 1.5, (2, T, hodlr.num_levels(T) + 1))))
    g = torch.as_tensor(np.where(rng.random((2, T)) < 0.5, -rng.uniform(0, 1e-3, (2, T)),
                                 -rng.uniform(0, 5, (2, T)))) if decay else None
    _check_grads((q, k, v, beta, lam, g), t(2, T, Dv), 0.6, torch.float64, chunk=C)


@pytest.mark.interpreter
@pytest.mark.parametrize("T, period", [(2, 2), (3, 2), (17, 2), (40, 2), (100, 37), (200, 50)])
def test_strong_decay_gradients(T, period):
    """Decay steps of -31 every ``period`` positions, steps near 0 elsewhere (float64): the decay
    gradient at a strong step is then ~1e-14 of the terms around it, and must still match the
    dense reference to 1e-10, norm-wise and element by element (each term is summed once;
    differences of in-chunk sums left it at ~1e-4 relative)."""
    rng = np.random.default_rng(T)
    t = lambda *shape: torch.as_tensor(rng.standard_normal(shape))  # noqa: E731
    q, k, v = t(1, T, 2), torch.nn.functional.normalize(t(1, T, 2), dim=-1), t(1, T, 2)
    beta = torch.as_tensor(rng.uniform(0, 1, (1, T)))
    lam = poison_unread(torch.as_tensor(rng.uniform(-1, 1, (1, T, hodlr.num_levels(T)))))
    g = torch.as_tensor(np.where(np.arange(T) % period == period - 1, -31.0, -rng.uniform(0, 1e-3, T)))[None]
    inputs, w = (q, k, v, beta, lam, g), t(1, T, 2)
    _check_grads(inputs, w, 1.0, torch.float64, chunk=16)
    got = _grads(inputs, w, 1.0, torch.float64, chunk=16)["log_decay"]
    assert_elementwise(got[..., 1:], _grads(inputs, w, 1.0, torch.float64)["log_decay"][..., 1:], 1e-10, "dlog_decay")


@pytest.mark.parametrize("split_above, share_up_to, key_rows, decay, D",
                         [(64, 64, 64, True, 8), (0, 0, 16, False, 20)])
def test_bfloat16_hierarchy(split_above, share_up_to, key_rows, decay, D, monkeypatch):
    """bfloat16 inputs over several chunks and levels (the hierarchy held in bfloat16, see
    ``gated_delta.BF16_HIERARCHY``), each of the backward's two ways of multiplying: the
    defaults at narrow keys (the reverse hierarchy with tf32 dots of the widened tiles, the
    reader's ``dH`` share through ``split_dot``, the chunk kernel's value side widened), with
    decay, and the other way round (``0``, ``0``) without decay, the forward chunk kernel forming
    ``R`` and ``U`` in two blocks of 16 key rows (``Dk = 20``, the second cut short): output and
    gradients near the float64 reference (the interpreter's bfloat16 rounding is not the GPU's: a
    loose bound)."""
    forward = sys.modules["hodlr.kernels.gated_delta"]
    assert forward.BF16_HIERARCHY
    backward = importlib.import_module("hodlr.kernels.gated_delta_backward")
    monkeypatch.setattr(backward, "SPLIT_REVERSE_HIERARCHY_ABOVE", split_above)
    monkeypatch.setattr(backward, "SPLIT_VALUE_SIDE_ABOVE", split_above)
    monkeypatch.setattr(backward, "SPLIT_READER_SHARE_UP_TO", share_up_to)
    monkeypatch.setattr(forward, "STATE_KEY_ROWS", key_rows)
    T = 150
    rng = np.random.default_rng(T)
    t = lambda *shape: torch.as_tensor(rng.standard_normal(shape))  # noqa: E731
    q, k, v = t(1, T, D), torch.nn.functional.normalize(t(1, T, D), dim=-1), t(1, T, D)
    beta = torch.as_tensor(rng.uniform(0, 1, (1, T)))
    lam = poison_unread(torch.as_tensor(rng.uniform(0.5, 1.5, (1, T, hodlr.num_levels(T)))))
    g = -torch.as_tensor(rng.uniform(0, 0.1, (1, T))) if decay else None
    w = t(1, T, D)
    got, want = _grads((q, k, v, beta, lam, g), w, 0.4, torch.bfloat16, chunk=16), \
        _grads((q, k, v, beta, lam, g), w, 0.4, torch.float64)
    for name in want:
        err = relative_error(got[name].double().cpu(), want[name])
        assert err <= 2e-2, f"d{name}: relative error {err:.2e}"
    with _nan_scratch():
        o = kernels.gated_delta_forward(*(None if x is None else x.to(DEVICE, torch.bfloat16)
                                          for x in (q, k, v, beta, lam, g)), 0.4, chunk=16)
    ref = _dense(q, k, v, beta, lam, g, 0.4)[0]
    assert relative_error(o.double().cpu(), ref) <= 2e-2


@pytest.mark.interpreter
@pytest.mark.parametrize("levels", [3, 5])
def test_hierarchy_levels_per_launch(levels):
    """The hierarchy built ``levels`` levels a launch (each program a subtree of ``2**levels``
    blocks, read back from what it stored; 19 and 10 chunks of 16: levels of odd sizes, subtrees
    cut short at the end, a last launch of fewer levels, one launch for all) equals the default's
    (two levels a launch) bit for bit, and the forward equals the chunked backend."""
    gd = sys.modules["hodlr.kernels.gated_delta"]
    q, k, v, beta, lam, g, _ = _two_sequences(np.random.default_rng(levels), 300, 3)
    for T in (300, 145):  # 145: views of the first 145 positions (10 chunks)
        args = [x[..., :T, :] if x.dim() == 3 else x[..., :T] for x in (q, k, v, beta, lam, g)]
        layout = gd.gated_delta_layout(*args)
        want = gd.chunk_hierarchy(layout, 16)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(gd, "HIERARCHY_LEVELS", levels)  # Dk = 3: the narrow heads' setting
            got = gd.chunk_hierarchy(layout, 16)
            o = kernels.gated_delta_forward(*args, 0.7, chunk=16, out=_nan_like((2, T, 3), torch.float64))
        used = sum(hierarchy_sizes(got.n))  # the entries past it (the shapes' bound) are never written
        below_top = used - hierarchy_sizes(got.n)[-1]  # the top level gets no transitions
        assert got.states.shape[1] == 2 * got.n
        assert torch.equal(got.states[:, :used], want.states[:, :used])
        assert torch.equal(got.trans[:, :below_top], want.trans[:, :below_top])
        assert torch.equal(got.decays[:, :below_top], want.decays[:, :below_top])
        assert_close(o, chunked.gated_delta_attention(*args, 0.7, chunk=16), TOL[torch.float64], f"T={T}")


@pytest.mark.interpreter
@pytest.mark.parametrize("T, C", [(1, 16), (16, 16), (17, 16), (48, 16), (100, 16), (129, 32), (300, 16)])
@pytest.mark.parametrize("decay", [0.5, None])
def test_output_kernel_pairs(T, C, decay):
    """The output kernel with two chunks a program (``OUTPUT_PAIRS``, the wide heads' setting, forced
    here on 3-wide keys): chunk counts odd and even, a last pair of one chunk, ``T`` inside a chunk and
    at the pairs' edge, with and without decay, never-read scales NaN, outputs NaN-filled: the chunked
    backend's outputs, and those of one chunk a program; a NaN level scale that a pair reads (in its
    odd chunk's level 0) sets the check flag."""
    gd = sys.modules["hodlr.kernels.gated_delta"]
    q, k, v, beta, lam, g, _ = _two_sequences(np.random.default_rng(T), T, 3, decay=decay)
    outs = {}
    for pair in (False, True):
        with pytest.MonkeyPatch.context() as mp:
            mp.setitem(gd.OUTPUT_PAIRS, True, pair)
            outs[pair] = kernels.gated_delta_forward(q, k, v, beta, lam, g, 0.7, chunk=C,
                                                     out=_nan_like((2, T, 3), torch.float64))
    want = chunked.gated_delta_attention(q, k, v, beta, lam, g, 0.7, chunk=C)
    assert_close(outs[True], want, TOL[torch.float64], f"pairs, T={T}")
    assert_close(outs[True], outs[False], TOL[torch.float64], f"pairs against one chunk a program, T={T}")
    if T > C:  # row C reads level log2(C) + 1 (the pair's even chunk)
        bad = lam.clone()
        bad[1, C, C.bit_length()] = float("nan")
        for pair in (False, True):
            check = torch.zeros(1, dtype=torch.int32)
            with pytest.MonkeyPatch.context() as mp:
                mp.setitem(gd.OUTPUT_PAIRS, True, pair)
                kernels.gated_delta_forward(q, k, v, beta, bad, g, 0.7, chunk=C, check=check)
            assert check.item() == 1, f"pair={pair}"


@pytest.mark.interpreter
@pytest.mark.parametrize("a, T", [(5, 3), (1000, 129), (63, 65), (2 ** 16 + 3, 61)])
def test_output_kernel_pairs_continued(a, T, monkeypatch):
    """A call continuing from a state (the output kernel's carried reads) with two chunks a program:
    the chunked backend's outputs and final states."""
    gd = sys.modules["hodlr.kernels.gated_delta"]
    monkeypatch.setitem(gd.OUTPUT_PAIRS, True, True)
    _assert_continued_call_equals_chunked(*_continued_call(np.random.default_rng(a), a, T, True, B=1))


@pytest.mark.interpreter
@pytest.mark.parametrize("T", [1, 16, 17, 33, 48, 145, 300])
@pytest.mark.parametrize("decay", [0.5, None])
@pytest.mark.parametrize("levels", [1, 2])
def test_chunk_kernel_builds_level_one(T, decay, levels):
    """Level 1 of the hierarchy built by the chunk kernel (``CHUNK_KERNEL_PARENTS``: a pair of chunks a
    program, the parent from the tiles it has just stored; chunk counts 1, 2, 3, odd and even, the
    hierarchy's launches then starting from level 1 one or two levels at a time) equals the hierarchy
    built from level 0 by the hierarchy kernel bit for bit, with and without decay (calls with carried
    states leave level 1 to the hierarchy kernel: ``test_continued_calls_equal_chunked``)."""
    gd = sys.modules["hodlr.kernels.gated_delta"]
    q, k, v, beta, lam, g, _ = _two_sequences(np.random.default_rng(T), T, 3, decay=decay)
    layout = gd.gated_delta_layout(q, k, v, beta, lam, g)
    built = {}
    for parents in (False, True):
        with pytest.MonkeyPatch.context() as mp:
            mp.setitem(gd.CHUNK_KERNEL_PARENTS, True, parents)
            mp.setattr(gd, "HIERARCHY_LEVELS", levels)
            built[parents] = gd.chunk_hierarchy(layout, 16)
    want, got = built[False], built[True]
    used = sum(hierarchy_sizes(got.n))
    below_top = used - hierarchy_sizes(got.n)[-1]  # the top level gets no transitions
    assert torch.equal(got.X, want.X) and torch.equal(got.W, want.W)
    assert torch.equal(got.states[:, :used], want.states[:, :used])
    assert torch.equal(got.trans[:, :below_top], want.trans[:, :below_top])
    if decay is not None:
        assert torch.equal(got.decays[:, :below_top], want.decays[:, :below_top])


@pytest.mark.parametrize("levels", [0, -1, 2.0, True])
def test_hierarchy_levels_must_be_positive_ints(levels):
    gd = sys.modules["hodlr.kernels.gated_delta"]
    args = [x.to(DEVICE, torch.float32) for x in _two_sequences(np.random.default_rng(0), 40, 3)[:6]]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gd, "HIERARCHY_LEVELS", levels)
        with pytest.raises(ValueError, match=f"HIERARCHY_LEVELS must be an int >= 1 .*got {levels!r}"):
            kernels.gated_delta_forward(*args, 0.5, chunk=16)


def _two_sequences(rng, T, Dv, extra_levels=1, decay=0.5, Dk=3):
    """``(q, k, v, beta, lam, g, draw)`` of two float64 sequences: ``Dk`` wide unit keys, β in
    ``[0, 2)``, level scales in ``[-0.5, 1.5)`` with ``extra_levels`` columns past ``num_levels(T)``
    and never-read ones NaN, log-decays in ``(-decay, 0]`` (None for ``decay=None``); ``draw(*shape)``
    draws more standard normals from ``rng``."""
    t = lambda *shape: torch.as_tensor(rng.standard_normal(shape))  # noqa: E731
    q, k, v = t(2, T, Dk), torch.nn.functional.normalize(t(2, T, Dk), dim=-1), t(2, T, Dv)
    beta = torch.as_tensor(rng.uniform(0, 2, (2, T)))
    lam = poison_unread(torch.as_tensor(rng.uniform(-0.5, 1.5, (2, T, hodlr.num_levels(T) + extra_levels))))
    g = None if decay is None else -torch.as_tensor(rng.uniform(0, decay, (2, T)))
    return q, k, v, beta, lam, g, t


@pytest.mark.interpreter
@pytest.mark.parametrize("group, value_tile, T, Dv", [
    (1, 128, 65, 3), (1, 128, 130, 3), (2, 128, 100, 3), (2, 128, 260, 3), (4, 128, 150, 3), (8, 128, 260, 3),
    (2, 16, 100, 40)])
def test_gradients_reader_groups(group, value_tile, T, Dv):
    """The reader kernel's chunk groups: one chunk a program, groups that end past the last chunk
    (7, 10 and 17 chunks of 16; the default group of 8 over three programs, the last of one
    chunk), levels added atomically by several groups, levels above the group's whose rows ``P``
    cross the blocks of two set bits above it (chunk 7 of 9 in groups of one, chunks 14 and 15 of
    17 in groups of two, the latter with a set bit below the group's level too), and value heads
    wider than its tile (each chunk's ``dH`` share added tile by tile).  The interpreter runs the
    programs one after another: races between programs show only on the GPU
    (``test_gradients_on_gpu``)."""
    gdb = importlib.import_module("hodlr.kernels.gated_delta_backward")
    q, k, v, beta, lam, g, t = _two_sequences(np.random.default_rng(group + T), T, Dv, extra_levels=2)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gdb, "READER_GROUP", group)
        mp.setattr(gdb, "READER_VALUE_TILE", value_tile)
        _check_grads((q, k, v, beta, lam, g), t(2, T, Dv), 0.6, torch.float64, chunk=16)


@pytest.mark.interpreter
@pytest.mark.parametrize("T, Dk, Dv, decay, launches", [(65, 3, 3, 0.5, 2), (100, 3, 40, None, 2),
                                                         (40, 67, 3, 0.5, 1)])
def test_gradients_chunk_kernel_launches(T, Dk, Dv, decay, launches):
    """The backward chunk kernel with the launch count that its width does not take by default
    (``SIDE_LAUNCHES``): two at ``Dk = 3`` (everything up to the adjoint of the solve, then that
    adjoint from the float32 tiles handed over, NaN-filled scratch), with and without decay, and
    one at ``Dk = 67``: the gradients of the reference."""
    gdb = importlib.import_module("hodlr.kernels.gated_delta_backward")
    q, k, v, beta, lam, g, t = _two_sequences(np.random.default_rng(T), T, Dv, Dk=Dk, decay=decay)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gdb, "SIDE_LAUNCHES", {name: launches for name in gdb.SIDE_LAUNCHES})
        _check_grads((q, k, v, beta, lam, g), t(2, T, Dv), 0.6, torch.float64, chunk=16)


@pytest.mark.interpreter
def test_public_api_gradients(rng):
    """``hodlr.gated_delta_attention(..., backend="triton")`` and ``log_linear_gated_delta_rule``
    with the triton backend (default chunk, grouped heads) differentiate: their gradients equal
    the dense and the chunked backend's."""
    T = 37
    t = lambda *shape: torch.as_tensor(rng.standard_normal(shape))  # noqa: E731
    lam = poison_unread(torch.as_tensor(rng.uniform(0.2, 1.5, (2, T, hodlr.num_levels(T)))))
    inputs = (t(2, T, 3), torch.nn.functional.normalize(t(2, T, 3), dim=-1), t(2, T, 2),
              torch.as_tensor(rng.uniform(0, 1, (2, T))), lam, -torch.as_tensor(rng.uniform(0, 1, (2, T))))
    w = t(2, T, 2)

    def api(backend):
        leaves = [x.clone().requires_grad_(True) for x in inputs]
        q, k, v, beta, lam, g = leaves
        out = hodlr.gated_delta_attention(q, k, v, beta, hodlr.LogLinearMask(lam, g), scale=0.5, backend=backend)
        return torch.autograd.grad((out * w).sum(), leaves)

    for name, got, want in zip(NAMES, api("triton"), api("dense")):
        assert_close(got, want, GRAD_TOL[torch.float64], f"gated_delta_attention d{name}")
    # fla's layout (B, T, H, D): two value heads read one key head
    B, T, H = 1, 21, 2
    q, k = t(B, T, 1, 3), torch.nn.functional.normalize(t(B, T, 1, 3), dim=-1)
    ops = (q, k, t(B, T, H, 2), -torch.as_tensor(rng.uniform(0, 1, (B, T, H))),
           torch.as_tensor(rng.uniform(0, 1, (B, T, H))), torch.as_tensor(rng.uniform(0.2, 1.5, (B, T, H, 6))))
    w = t(B, T, H, 2)

    def rule(backend):
        leaves = [x.clone().requires_grad_(True) for x in ops]
        o, _ = hodlr.log_linear_gated_delta_rule(*leaves, backend=backend)
        return torch.autograd.grad((o * w).sum(), leaves)

    for name, got, want in zip(("q", "k", "v", "g", "beta", "level_scales"), rule("triton"), rule("chunked")):
        assert_close(got, want, GRAD_TOL[torch.float64], f"log_linear_gated_delta_rule d{name}")


def _differentiate(inputs, w, dtype=None, **kwargs):
    """``(gradients, chunk sizes the hierarchy was built with, tensors the graph saved)`` of
    ``Σ w ⊙ kernels.gated_delta(*inputs, 0.3, **kwargs)`` on the kernels' device in ``dtype``
    (default: float64 under the interpreter, float32 on a GPU), with every scratch buffer
    NaN-filled."""
    dtype = dtype or DTYPES[0]
    leaves = [None if x is None else x.to(DEVICE, dtype).requires_grad_(True) for x in inputs]
    with _nan_scratch(), _chunks_used() as built:
        out = kernels.gated_delta(*leaves, 0.3, **kwargs)
        saved = len(out.grad_fn.saved_tensors)
        grads = torch.autograd.grad((out * w.to(out)).sum(), [x for x in leaves if x is not None])
    return grads, built, saved


@pytest.mark.parametrize("T, decay, dtype, grouped", [
    (1, True, None, False), (70, True, None, True), (70, True, torch.bfloat16, False),
    (40, False, torch.float16, True)])
def test_saved_chunks_equal_recomputed(T, decay, dtype, grouped):
    """The forward's ``X``, ``W`` and hierarchy kept for the backward (``save_states=True``, the
    default) give the gradients of a backward that recomputes them, bit for bit (16-bit inputs,
    whose hierarchy is held in bfloat16 or float32, and keys shared by two heads too), and the
    backward then builds no hierarchy of its own; so does ``gated_delta_backward`` handed them
    directly."""
    q, k, v, beta, lam, g, w = _one_sequence(T, 3, seed=T)
    if grouped:  # q, k (1, T, Dk) serve two heads of v, β, λ, g
        v, beta, lam, g, w = (torch.cat([x, 0.5 * x]) for x in (v, beta, lam, g, w))
    inputs = (q, k, v, beta, lam, g if decay else None)
    kept, built_kept, saved_kept = _differentiate(inputs, w, dtype, chunk=CHUNK)
    again, built_again, saved_again = _differentiate(inputs, w, dtype, chunk=CHUNK, save_states=False)
    assert built_kept == [CHUNK] and built_again == [CHUNK, CHUNK]
    assert (saved_kept, saved_again) == (11, 6)
    dev = [None if x is None else x.to(DEVICE, dtype or DTYPES[0]) for x in inputs]
    dev[:2] = [x.expand(v.shape[:1] + x.shape[1:]) for x in dev[:2]]
    _, chunks = kernels.gated_delta_forward(*dev, 0.3, chunk=CHUNK, return_chunks=True)
    backward = sys.modules["hodlr.kernels.gated_delta_backward"].gated_delta_backward
    direct = [x for x in backward(*dev, 0.3, w.to(DEVICE, dev[2].dtype), chunk=CHUNK, chunks=chunks)
              if x is not None]
    direct[:2] = [x.sum(0, keepdim=True) for x in direct[:2]]  # q, k broadcast over the heads
    for a, b, c in zip(kept, again, direct):
        assert torch.equal(a, b) and torch.equal(a, c)


def _fla_layout(rng, N, T, H, Dk, Dv, dtype):
    """``q, k, v (N, H, T, D)``, ``beta, g (N, H, T)``, ``lam (N, H, T, L)`` as transposed views of
    tensors laid out as fla's ``(N, T, H, ...)`` (never-read scales NaN), and a cotangent ``do``."""
    t = lambda *shape: torch.as_tensor(rng.standard_normal(shape), dtype=dtype, device=DEVICE)  # noqa: E731
    q, k, v = t(N, T, H, Dk), torch.nn.functional.normalize(t(N, T, H, Dk), dim=-1), t(N, T, H, Dv)
    beta = torch.as_tensor(rng.uniform(0, 1.5, (N, T, H)), dtype=dtype, device=DEVICE)
    g = -torch.as_tensor(rng.uniform(0, 0.5, (N, T, H)), dtype=dtype, device=DEVICE)
    lam = poison_unread(torch.as_tensor(rng.uniform(0.2, 1.5, (N, H, T, hodlr.num_levels(T)))))
    lam = lam.transpose(1, 2).contiguous().to(DEVICE, dtype)  # (N, T, H, L)
    q, k, v, beta, lam, g = (x.transpose(1, 2) for x in (q, k, v, beta, lam, g))
    return q, k, v, beta, lam, g, t(N, H, T, Dv)


@pytest.mark.parametrize("T, decay", [(1, False), (37, True)])
def test_backward_out_buffers_in_the_inputs_layout(T, decay):
    """``gated_delta_backward(..., out=...)`` writes every gradient into NaN-filled buffers laid out
    as fla's ``(N, T, H, D)`` inputs read as ``(N, H, T, D)`` and returns those buffers, equal bit for
    bit to the gradients it returns without them; a buffer of another dtype (or ``dlog_decay`` of a
    call without decay) is passed over, a buffer of the wrong shape refused."""
    q, k, v, beta, lam, g, do = _fla_layout(np.random.default_rng(T), 2, T, 3, 4, 5, DTYPES[0])
    g = g if decay else None
    backward = sys.modules["hodlr.kernels.gated_delta_backward"].gated_delta_backward
    want = backward(q, k, v, beta, lam, g, 0.4, do, chunk=CHUNK)
    work = torch.float64 if DTYPES[0] == torch.float64 else torch.float32
    out = [torch.empty_like(x).fill_(float("nan")) for x in (q, k, v, beta, lam, beta.to(work))]
    got = backward(q, k, v, beta, lam, g, 0.4, do, chunk=CHUNK, out=out)
    assert (got[5] is None) == (not decay)
    for x, buf, ref, like in zip(got, out, want, (q, k, v, beta, lam, beta)):
        if ref is None:
            continue
        assert x.data_ptr() == buf.data_ptr() and x.stride() == like.stride()
        assert torch.equal(x, ref)
    other = torch.float32 if DTYPES[0] == torch.float64 else torch.float64
    skipped = backward(q, k, v, beta, lam, g, 0.4, do, chunk=CHUNK, out=(None, q.to(other), None, None, None, None))
    assert all(torch.equal(a, b) for a, b in zip(skipped[:5], want[:5]))
    assert skipped[1].data_ptr() != q.data_ptr()
    with pytest.raises(ValueError, match="out's dv must have shape"):
        backward(q, k, v, beta, lam, g, 0.4, do, chunk=CHUNK, out=(None, None, v[:1], None, None, None))
    with pytest.raises(ValueError, match="out's dbeta must have shape"):
        backward(q, k, v, beta, lam, g, 0.4, do, chunk=CHUNK, out=(None, None, None, beta[:1], None, None))
    with pytest.raises(TypeError, match="out must be a tuple of 6"):
        backward(q, k, v, beta, lam, g, 0.4, do, chunk=CHUNK, out=(None,) * 5)
    with pytest.raises(TypeError, match="out's dk must be a tensor or None, got list"):
        backward(q, k, v, beta, lam, g, 0.4, do, chunk=CHUNK, out=(None, [1], None, None, None, None))


def test_autograd_gradients_laid_out_as_the_inputs():
    """``kernels.gated_delta`` on ``(N, H, T, D)`` views of fla-layout tensors: the gradients autograd
    returns for the views are laid out as the views (so the tensors' own gradients are contiguous),
    equal to those of contiguous copies of the inputs."""
    q, k, v, beta, lam, g, do = _fla_layout(np.random.default_rng(3), 2, 37, 3, 4, 5, DTYPES[0])
    views = [x.detach().requires_grad_() for x in (q, k, v, beta, lam, g)]
    got = torch.autograd.grad(kernels.gated_delta(*views, 0.4, chunk=CHUNK), views, do)
    dense = [x.detach().contiguous().requires_grad_() for x in (q, k, v, beta, lam, g)]
    want = torch.autograd.grad(kernels.gated_delta(*dense, 0.4, chunk=CHUNK), dense, do)
    for name, a, b, like in zip(NAMES, got, want, views):
        assert a.stride() == like.stride(), name
        assert torch.equal(a, b), name


@pytest.mark.interpreter
def test_operator_backward_gradients_laid_out_as_the_inputs():
    """The operator's backward on the triton backend (``gated_delta_vjp``) hands back gradients laid
    out as its ``(N, H, T, D)`` views of fla-layout inputs (so the operator copies none of them),
    equal to the chunked backend's, also with two value heads a key head."""
    from hodlr.backends import triton as triton_backend

    for H, Hqk in ((3, 3), (4, 2)):
        q, k, v, beta, lam, g, do = _fla_layout(np.random.default_rng(H), 2, 21, H, 3, 2, torch.float64)
        q, k = q[:, :Hqk], k[:, :Hqk]
        got = triton_backend.gated_delta_vjp(q, k, v, beta, lam, g, 0.5, do)
        leaves = [x.detach().requires_grad_() for x in (q, k, v, beta, lam, g)]
        qk = [x.repeat_interleave(H // Hqk, 1) for x in leaves[:2]]
        o = chunked.gated_delta_attention(*qk, *leaves[2:], 0.5)
        want = torch.autograd.grad(o, leaves, do)
        for name, x, ref, like in zip(NAMES, got, want, (q, k, v, beta, lam, g)):
            if Hqk == H or name not in ("q", "k"):  # (grouped: dq, dk per value head, summed over groups)
                assert x.stride() == like.stride(), name
            assert relative_error(x, ref) <= 1e-10, name


def test_saved_chunks_twice_and_not_twice_differentiable():
    """A graph that keeps the forward's intermediates runs its backward twice (``retain_graph``)
    with the same gradients, and refuses a second derivative (the backward is Triton kernels)."""
    q, k, v, beta, lam, g, w = _one_sequence(40, 3, seed=41)
    leaves = [x.to(DEVICE, DTYPES[0]).requires_grad_(True) for x in (q, k, v, beta, lam, g)]
    out = kernels.gated_delta(*leaves, 0.3, chunk=CHUNK)
    loss = (out * w.to(out)).sum()
    first = torch.autograd.grad(loss, leaves, retain_graph=True)
    second = torch.autograd.grad(loss, leaves, retain_graph=True)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    (dq, *_) = torch.autograd.grad(loss, leaves, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad"):
        torch.autograd.grad(dq.sum(), leaves[0])


def test_saved_chunks_only_at_the_backward_chunk():
    """A forward at a chunk wider than ``MAX_BACKWARD_CHUNK`` keeps nothing beyond its inputs (its
    hierarchy is not the backward's) and its backward recomputes at the backward's chunk."""
    q, k, v, beta, lam, g, w = _one_sequence(70, 3, seed=7)
    grads, built, saved = _differentiate((q, k, v, beta, lam, g), w, chunk=64)
    assert built == [64, 32] and saved == 6
    want, _, _ = _differentiate((q, k, v, beta, lam, g), w, chunk=32)
    for a, b in zip(grads, want):
        assert torch.equal(a, b)


@pytest.mark.parametrize("keep", [True, False])
def test_option_decides_what_the_gated_delta_call_keeps(keep, monkeypatch):
    """``hodlr.options.gated_delta_save_states`` through ``hodlr.gated_delta_attention(...,
    backend="triton")``: the graph holds the inputs and, when True, the forward's chunk products
    and hierarchy; the gradients are the same either way."""
    q, k, v, beta, lam, g, w = _one_sequence(40, 3, seed=40)
    grads = []
    for option in (keep, not keep):
        monkeypatch.setattr(hodlr.options, "gated_delta_save_states", option)
        leaves = [x.to(DEVICE, DTYPES[0]).requires_grad_(True) for x in (q, k, v, beta, lam, g)]
        out = hodlr.gated_delta_attention(*leaves[:4], hodlr.LogLinearMask(leaves[4], leaves[5]), scale=0.3,
                                          backend="triton")
        assert len(out.grad_fn.saved_tensors) == (11 if option else 6)
        grads.append(torch.autograd.grad((out * w.to(out)).sum(), leaves))
    for a, b in zip(*grads):
        assert torch.equal(a, b)
    with pytest.raises(TypeError, match="hodlr.options.gated_delta_save_states must be a bool, got str"):
        hodlr.options.gated_delta_save_states = "yes"


def test_saved_chunks_refused_when_they_do_not_fit():
    q, k, v, beta, lam, g, w = _one_sequence(40, 3, seed=4)
    dev = [x.to(DEVICE, DTYPES[0]) for x in (q, k, v, beta, lam, g)]
    backward = sys.modules["hodlr.kernels.gated_delta_backward"].gated_delta_backward
    _, chunks = kernels.gated_delta_forward(*dev, 0.3, chunk=CHUNK, return_chunks=True)
    do = w.to(DEVICE, DTYPES[0])
    with pytest.raises(ValueError, match=r"chunks must be the forward's of this call at chunk 32: X should be"):
        backward(*dev, 0.3, do, chunk=32, chunks=chunks)
    with pytest.raises(ValueError, match=r"decays should be .*got None"):
        backward(*dev, 0.3, do, chunk=CHUNK, chunks=chunks._replace(decays=None))
    with pytest.raises(ValueError, match=r"it has no log_decay, but chunks holds the block decays"):
        backward(*dev[:5], None, 0.3, do, chunk=CHUNK, chunks=chunks)
    with pytest.raises(ValueError, match=r"states should be .*got"):
        backward(*dev, 0.3, do, chunk=CHUNK, chunks=chunks._replace(states=chunks.states[:, :-1]))
    with pytest.raises(ValueError, match=r"X should be .*contiguous, got .*not contiguous"):
        backward(*dev, 0.3, do, chunk=CHUNK, chunks=chunks._replace(X=chunks.X.transpose(-1, -2).contiguous()
                                                                    .transpose(-1, -2)))
    with pytest.raises(ValueError, match=r"trans should be .*, got .*float16"):
        backward(*dev, 0.3, do, chunk=CHUNK, chunks=chunks._replace(trans=chunks.trans.half()))
    with pytest.raises(TypeError, match="chunks must be the Chunks .* got tuple"):
        backward(*dev, 0.3, do, chunk=CHUNK, chunks=tuple(chunks))
    with pytest.raises(TypeError, match="return_chunks must be a bool, got str"):
        kernels.gated_delta_forward(*dev, 0.3, return_chunks="yes")
    with pytest.raises(TypeError, match="save_states must be a bool, got int"):
        kernels.gated_delta(*dev, 0.3, save_states=1)


@triton.jit
def _round_tf32_kernel(x_ptr, y_ptr, N: tl.constexpr):
    i = tl.arange(0, N)
    tl.store(y_ptr + i, round_tf32(tl.load(x_ptr + i)))


@triton.jit
def _split_dot_kernel(a_ptr, b_ptr, c_ptr, split_ptr, mirrored_ptr, tf32_ptr, acc_split_ptr, acc_tf32_ptr,
                      M: tl.constexpr, K: tl.constexpr, N: tl.constexpr, NATIVE: tl.constexpr):
    m, k, n = tl.arange(0, M), tl.arange(0, K), tl.arange(0, N)
    a = tl.load(a_ptr + m[:, None] * K + k[None, :])
    b = tl.load(b_ptr + k[:, None] * N + n[None, :])
    out = m[:, None] * N + n[None, :]
    tl.store(split_ptr + out, split_dot(a, b, tl.float32, "tf32", NATIVE))
    # the float32 operand on the right: (a b)ᵀ = bᵀ aᵀ
    tl.store(mirrored_ptr + out, tl.trans(split_dot(tl.trans(b), tl.trans(a), tl.float32, "tf32", NATIVE)))
    tl.store(tf32_ptr + out, dot(a, b, tl.float32, "tf32", NATIVE))
    # with an accumulator: a b + c
    c = tl.load(c_ptr + out)
    tl.store(acc_split_ptr + out, split_dot(a, b, tl.float32, "tf32", NATIVE, c))
    tl.store(acc_tf32_ptr + out, dot(a, b.to(tl.float32), tl.float32, "tf32", NATIVE, c))


def _split_dots(seed):
    """``(a, b, c)`` (float32 ``32 × 64`` rows of mixed scales, bfloat16 ``64 × 64``, float32
    ``32 × 64``) and the kernel's ``split_dot``, mirrored ``split_dot``, tf32 ``dot`` of ``a b`` and
    ``split_dot``, tf32 ``dot`` of ``a b + c``, each on the CPU."""
    rng = np.random.default_rng(seed)
    a = torch.from_numpy((rng.standard_normal((32, 64)) * np.exp2(rng.integers(-8, 8, (32, 1)))).astype(np.float32))
    b = torch.from_numpy(rng.standard_normal((64, 64))).to(torch.bfloat16)
    c = torch.from_numpy((rng.standard_normal((32, 64)) * 8).astype(np.float32))
    outs = [torch.full((32, 64), float("nan"), device=DEVICE) for _ in range(5)]
    _split_dot_kernel[(1,)](a.to(DEVICE), b.to(DEVICE), c.to(DEVICE), *outs, M=32, K=64, N=64, NATIVE=not INTERP)
    return (a, b, c), [x.cpu().double() for x in outs]


def test_split_dot_carries_sixteen_bits():
    """``split_dot`` (a float32 operand against a bfloat16 one as two bfloat16 dots of its high
    part and its rest: the Gated DeltaNet walk and reverse hierarchy), with the float32 operand on
    either side, is closer to the float64 product than the tf32 dot of the same operands, within
    ``2^-15`` of the size of its terms; on the GPU through the tensor cores' bfloat16 dots, under
    the interpreter through float32 dots of the same values."""
    (a, b, _), (got, mirrored, tf32, _, _) = _split_dots(1)
    want = a.double() @ b.double()
    size = a.double().abs() @ b.double().abs()
    err, err_mirrored, err_tf32 = (((x - want).abs() / size).max().item() for x in (got, mirrored, tf32))
    for name, e in (("split_dot", err), ("split_dot, float32 operand on the right", err_mirrored)):
        assert e <= 2.0 ** -15, f"{name}: {e:.2e} of the terms' size"
        assert e < err_tf32 / 8, f"{name}: {e:.2e} against tf32 {err_tf32:.2e}"


def test_dots_add_their_accumulator():
    """``dot`` and ``split_dot`` with ``acc`` give ``a @ b + acc``, the sum formed in the dot's
    accumulator (what the Gated DeltaNet reader and walk use): ``split_dot`` within ``2^-15`` of the
    size of the terms, the tf32 ``dot`` within ``2^-10``, against float64."""
    (a, b, c), (_, _, _, got, tf32) = _split_dots(2)
    want = a.double() @ b.double() + c.double()
    size = a.double().abs() @ b.double().abs() + c.double().abs()
    for name, x, tol in (("split_dot", got, 2.0 ** -15), ("dot", tf32, 2.0 ** -10)):
        err = ((x - want).abs() / size).max().item()
        assert err <= tol, f"{name} with acc: {err:.2e} of the terms' size"


def _nearest_tf32(x):
    """float32 ``x`` rounded to 10 explicit mantissa bits, ties away from zero (float64 arithmetic;
    subnormals keep the smallest exponent's spacing)."""
    with np.errstate(invalid="ignore"):  # signalling NaNs
        x = x.astype(np.float64)
    out = x.copy()
    finite = np.isfinite(x) & (x != 0)
    a = np.abs(x[finite])
    step = np.exp2(np.maximum(np.floor(np.log2(a)), -126) - 10)
    with np.errstate(over="ignore"):
        out[finite] = (np.sign(x[finite]) * np.floor(a / step + 0.5) * step).astype(np.float32)
    return out.astype(np.float32)


@triton.jit
def _unit_lower_inverse_kernel(l_ptr, x_ptr, C: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    r = tl.arange(0, C)
    Lm = tl.load(l_ptr + r[:, None] * C + r[None, :])
    tl.store(x_ptr + r[:, None] * C + r[None, :], unit_lower_inverse(Lm, C, ACC, PREC))


@pytest.mark.interpreter
@pytest.mark.parametrize("C", [16, 32, 64])
@pytest.mark.parametrize("shared", [0.0, 3.0])
def test_unit_lower_inverse(C, shared):
    """The chunk kernel's ``(I + Lm)⁻¹`` (``Lm = strictly_lower(diag(β) K Kᵀ ⊙ Γ)``, unit keys, with
    and without a direction ``shared`` by every key, which makes the entries of ``Lm``'s powers
    grow like binomial coefficients) equals LAPACK's inverse in float64."""
    rng = np.random.default_rng(C)
    K = rng.standard_normal((C, 8)) + shared * rng.standard_normal(8)
    K /= np.linalg.norm(K, axis=1, keepdims=True)
    G = np.cumsum(-rng.uniform(0, 0.1, C))
    Lm = np.tril(rng.uniform(0, 1, C)[:, None] * (K @ K.T) * np.exp(G[:, None] - G[None, :]), -1)
    X = torch.full((C, C), float("nan"), dtype=torch.float64)
    _unit_lower_inverse_kernel[(1,)](torch.from_numpy(Lm), X, C=C, ACC=tl.float64, PREC="ieee")
    want = np.linalg.inv(np.eye(C) + Lm)
    assert np.abs(X.numpy() - want).max() <= 1e-12 * np.abs(want).max()


def test_round_tf32_is_round_to_nearest():
    """``round_tf32`` (the tf32 operands of the Gated DeltaNet forward) is round to nearest, ties
    away from zero, bit for bit: random magnitudes over the whole range, the halfway points, a
    carry into the exponent, subnormals, the largest float32 (to inf), ±0, ±inf, and NaNs of every
    payload (they stay NaN: a payload carried into the sign or the exponent would make 0 or inf)."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(4096) * np.exp2(rng.integers(-140, 127, 4096))).astype(np.float32)
    one = np.float32(1.0)
    special = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1.0 + 2.0 ** -11, 1.0 + 3 * 2.0 ** -11, -(1.0 + 2.0 ** -11),
                        np.nextafter(np.float32(2.0), one), 1.0 + 2.0 ** -11 - 2.0 ** -23, np.finfo(np.float32).max,
                        np.finfo(np.float32).tiny / 3, -np.finfo(np.float32).smallest_subnormal * 4097],
                       dtype=np.float32)
    nans = np.array([0x7FFFFFFF, 0xFFFFFFFF, 0x7F800001, 0xFF800FFF, 0x7FC00000], np.uint32).view(np.float32)
    x = np.concatenate([x, special, nans, np.zeros(8192 - x.size - special.size - nans.size, np.float32)])
    y = torch.empty(x.size, dtype=torch.float32, device=DEVICE)
    _round_tf32_kernel[(1,)](torch.from_numpy(x).to(DEVICE), y, N=x.size)
    got, want = y.cpu().numpy(), _nearest_tf32(x)
    assert np.array_equal(got.view(np.uint32)[~np.isnan(x)], want.view(np.uint32)[~np.isnan(x)])
    assert np.isnan(got[np.isnan(x)]).all() and np.isnan(x).sum() == 6
    at = 4096  # the special values: halfway points tie away from zero, 2 - 2^-23 carries into the exponent
    assert got[at + 5] == np.float32(1.0 + 2.0 ** -10) and got[at + 6] == np.float32(1.0 + 2.0 ** -9)
    assert got[at + 8] == np.float32(2.0) and got[at + 9] == np.float32(1.0) and got[at + 10] == np.inf


@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 128])
def test_bfloat16_on_gpu(D):
    """bfloat16 at the benchmark's head widths against the float64 reference (1e-2)."""
    gen = torch.Generator().manual_seed(D)
    B, H, T = 1, 2, 1000
    q, v = (torch.randn(B, H, T, D, generator=gen, dtype=torch.float64) for _ in range(2))
    k = torch.nn.functional.normalize(torch.randn(B, H, T, D, generator=gen, dtype=torch.float64), dim=-1)
    beta = torch.rand(B, H, T, generator=gen, dtype=torch.float64)
    lam = 0.5 + torch.rand(B, H, T, hodlr.num_levels(T), generator=gen, dtype=torch.float64)
    g = -0.1 * torch.rand(B, H, T, generator=gen, dtype=torch.float64)
    want = chunked.gated_delta_attention(q, k, v, beta, lam, g, D**-0.5)
    bf = [x.cuda().bfloat16() for x in (q, k, v, beta)]
    got = kernels.gated_delta_forward(*bf, lam.cuda().float(), g.cuda().float(), D**-0.5)
    assert_close(got.cpu(), want, TOLERANCES["gpu_bfloat16"], "bfloat16")


def _gpu_problem(T, D, dtype, unit_levels=False, seed=0):
    """fla-layout ``(q, k, v, g, beta, lam)`` on the GPU in ``dtype`` (g, lam float32)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    B, H = 1, 2
    q, v = (torch.randn(B, T, H, D, device="cuda", generator=gen).to(dtype) for _ in range(2))
    k = torch.nn.functional.normalize(torch.randn(B, T, H, D, device="cuda", generator=gen), dim=-1).to(dtype)
    beta = torch.rand(B, T, H, device="cuda", generator=gen).to(dtype)
    g = -0.1 * torch.rand(B, T, H, device="cuda", generator=gen)
    L = hodlr.num_levels(T)
    lam = torch.ones(B, T, H, L, device="cuda") if unit_levels else \
        0.5 + torch.rand(B, T, H, L, device="cuda", generator=gen)
    return q, k, v, g, beta, lam


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, marks=pytest.mark.slow), torch.bfloat16], ids=str)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("T", [1, 63, 1000, 4097])
def test_gradients_on_gpu(T, D, dtype):
    """Output and the six gradients of ``log_linear_gated_delta_rule`` (default backend: the
    Triton kernels) against the float64 chunked backend: 1e-5 in float32, 1e-2 in bfloat16.  The
    float32 cases are ``slow`` (``--runslow``): their kernels, IEEE dots, take minutes to compile
    (the backward's at ``Dk = Dv = 128`` about 8.5 minutes of one core)."""
    xs = [x.requires_grad_() for x in _gpu_problem(T, D, dtype, seed=T + D)]
    o = hodlr.log_linear_gated_delta_rule(*xs, scale=D ** -0.5)[0]
    _assert_near_chunked(o, xs, D, TOLERANCES["gpu_float32" if dtype == torch.float32 else "gpu_bfloat16"], seed=1)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("T", [1, 63, 64, 1000, 4096, 4097])
def test_prefill_on_gpu(T, dtype):
    """A prefill (final state, no gradient) under ``auto`` runs the Triton forward (as ``triton`` by
    name) and its outputs and final bucket states are within 1e-5 (float32) / 1e-2 (bfloat16) of the
    float64 chunked backend's."""
    xs = _gpu_problem(T, 64, dtype, seed=T)
    with torch.no_grad():
        o, state = hodlr.log_linear_gated_delta_rule(*xs, output_final_state=True)
        o_named, state_named = hodlr.log_linear_gated_delta_rule(*xs, output_final_state=True, backend="triton")
    assert torch.equal(o, o_named) and torch.equal(state.states, state_named.states), "auto is the Triton prefill"
    ref_o, ref = hodlr.log_linear_gated_delta_rule(*(x.double() for x in xs), output_final_state=True,
                                                   backend="chunked")
    tol = TOLERANCES["gpu_float32" if dtype == torch.float32 else "gpu_bfloat16"]
    assert state.states.dtype == torch.float32 and state.positions.tolist() == [T]
    assert relative_error(o, ref_o) <= tol
    assert relative_error(state.states, ref.states) <= tol, f"{relative_error(state.states, ref.states):.2e}"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("a, T", [(1000, 1), (1000, 63), (2 ** 16 - 7, 1000), (12345, 4097)])
def test_continued_call_on_gpu(a, T, dtype):
    """A call continuing from a state without gradient (``auto``: the Triton stream; one token: the
    decode kernel) against the float64 chunked backend: 1e-5 (float32), 1e-2 (bfloat16)."""
    xs = list(_gpu_problem(T, 64, dtype, seed=a + T))
    xs[-1] = torch.nn.functional.pad(xs[-1], (0, hodlr.num_levels(a + T) - xs[-1].shape[-1]), value=0.7)
    S = a.bit_length()
    gen = torch.Generator(device="cuda").manual_seed(a)
    live = torch.tensor([(a >> i) & 1 for i in range(S)], dtype=torch.bool, device="cuda")
    init = torch.randn(1, 2, S, 64, 64, device="cuda", generator=gen) * live[:, None, None]
    state = hodlr.LogLinearState(init, torch.tensor([a], device="cuda"))
    with torch.no_grad():
        o, final = hodlr.log_linear_gated_delta_rule(*xs, initial_state=state, output_final_state=True)
    ref_o, ref = hodlr.log_linear_gated_delta_rule(*(x.double() for x in xs), initial_state=state.to(torch.float64),
                                                   output_final_state=True, backend="chunked")
    tol = TOLERANCES["gpu_float32" if dtype == torch.float32 else "gpu_bfloat16"]
    assert relative_error(o, ref_o) <= tol
    assert relative_error(final.states, ref.states) <= tol, f"{relative_error(final.states, ref.states):.2e}"


@pytest.mark.gpu
def test_packed_sequences_on_gpu():
    """Packed bfloat16 sequences (one call over the aligned stream) and their gradients against the
    float64 chunked backend's per-sequence calls (1e-2)."""
    lengths = [1000, 1, 0, 63, 4097, 200]
    xs = [x.requires_grad_() for x in _gpu_problem(sum(lengths), 64, torch.bfloat16, seed=3)]
    cu = torch.tensor(np.cumsum([0] + lengths), device="cuda")
    o = hodlr.log_linear_gated_delta_rule(*xs, cu_seqlens=cu)[0]
    do = torch.randn(o.shape, device="cuda", generator=torch.Generator(device="cuda").manual_seed(1))
    refs = [x.detach().double().requires_grad_() for x in xs]
    ref = torch.cat([hodlr.log_linear_gated_delta_rule(*(x[:, int(cu[n]):int(cu[n + 1])] for x in refs),
                                                       backend="chunked")[0] for n in range(len(lengths))], 1)
    assert relative_error(o, ref) <= TOLERANCES["gpu_bfloat16"]
    for name, a, b in zip(("q", "k", "v", "g", "beta", "level_scales"), torch.autograd.grad(o, xs, do.to(o.dtype)),
                          torch.autograd.grad(ref, refs, do.double())):
        assert relative_error(a, b) <= TOLERANCES["gpu_bfloat16"], f"d{name}: {relative_error(a, b):.2e}"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_prefill_on_gpu(dtype):
    """Packed prompts' prefill (one forward over the aligned stream, each sequence's final buckets
    off its hierarchy) against the float64 chunked backend's per-sequence calls: outputs and final
    states (1e-5 in float32, 1e-2 in bfloat16)."""
    lengths = [1000, 1, 0, 63, 4097, 200, 33]
    xs = _gpu_problem(sum(lengths), 64, dtype, seed=4)
    cu = torch.tensor(np.cumsum([0] + lengths), device="cuda")
    with torch.no_grad():
        o, state = hodlr.log_linear_gated_delta_rule(*xs, cu_seqlens=cu, output_final_state=True)
    want_o, want = hodlr.log_linear_gated_delta_rule(*(x.double() for x in xs), cu_seqlens=cu, output_final_state=True,
                                                     backend="chunked")
    tol = TOLERANCES["gpu_float32" if dtype == torch.float32 else "gpu_bfloat16"]
    assert state.positions.tolist() == lengths
    assert relative_error(o, want_o) <= tol
    assert relative_error(state.states, want.states) <= tol


def _assert_near_chunked(o, xs, D, tol, seed):
    """``o`` (fla layout, computed from the leaves ``xs``) and its gradients for a cotangent drawn
    from ``seed`` are within ``tol`` of the float64 chunked backend's on float64 copies of ``xs``."""
    do = torch.randn(xs[2].shape, device="cuda", generator=torch.Generator(device="cuda").manual_seed(seed))
    refs = [x.detach().double().requires_grad_() for x in xs]
    ref = hodlr.log_linear_gated_delta_rule(*refs, scale=D ** -0.5, backend="chunked")[0]
    assert relative_error(o, ref) <= tol
    for name, a, b in zip(("q", "k", "v", "g", "beta", "level_scales"), torch.autograd.grad(o, xs, do.to(o.dtype)),
                          torch.autograd.grad(ref, refs, do.double())):
        assert relative_error(a, b) <= tol, f"d{name}: {relative_error(a, b):.2e}"


@pytest.mark.gpu
@pytest.mark.parametrize("chunk", [16, 32])
@pytest.mark.parametrize("D", [64, 128])
def test_every_chunk_on_gpu(D, chunk):
    """The backward at each chunk it accepts compiles and runs at both widths (bfloat16, the
    forward at the same chunk), and its gradients match the float64 chunked backend."""
    xs = [x.requires_grad_() for x in _gpu_problem(100, D, torch.bfloat16, seed=chunk + D)]
    q, k, v, g, beta, lam = (x.transpose(1, 2) for x in xs)
    o = kernels.gated_delta(q, k, v, beta, lam, g, D ** -0.5, chunk=chunk).transpose(1, 2)
    _assert_near_chunked(o, xs, D, TOLERANCES["gpu_bfloat16"], seed=2)


def _errors_beside_fla(q, k, v, g, beta, lam, scale):
    """``(ours, fla's)`` relative errors of the bfloat16 output (λ ≡ 1: plain Gated DeltaNet, fla's
    ``chunk_gated_delta_rule``) against the float64 chunked backend on the same inputs."""
    fla = pytest.importorskip("fla.ops.gated_delta_rule")
    ref = hodlr.log_linear_gated_delta_rule(*(x.double() for x in (q, k, v, g, beta, lam)), scale=scale,
                                            backend="chunked")[0]
    ours = hodlr.log_linear_gated_delta_rule(q, k, v, g, beta, lam, scale=scale)[0]
    theirs = fla.chunk_gated_delta_rule(q, k, v, g, beta, scale=scale)[0]
    e_ours, e_fla = relative_error(ours, ref), relative_error(theirs, ref)
    print(f"T={q.shape[1]}, D={q.shape[-1]}: ours {e_ours:.2e}, fla {e_fla:.2e} from float64")
    return e_ours, e_fla


@pytest.mark.gpu
@pytest.mark.parametrize("T", [63, 2048, 16384])
def test_unit_levels_equal_fla_gated_delta_on_gpu(T):
    """λ ≡ 1 at every level is plain Gated DeltaNet: ours and fla's ``chunk_gated_delta_rule`` on
    the same bfloat16 inputs, each against the float64 chunked backend; ours no further."""
    e_ours, e_fla = _errors_beside_fla(*_gpu_problem(T, 64, torch.bfloat16, unit_levels=True, seed=T), 0.125)
    assert e_ours <= TOLERANCES["gpu_bfloat16"] and e_ours <= 1.5 * e_fla


@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 128])
def test_no_decay_no_further_than_fla_on_gpu(D):
    """Without decay (log-decays of exactly 0, through the decay path) and with λ ≡ 1 (plain
    DeltaNet: the transitions are multiplied over the whole sequence, where a biased rounding of
    the tf32 operands drifts), bfloat16 at the default chunk of each width is no further from
    float64 than fla's ``chunk_gated_delta_rule``."""
    q, k, v, g, beta, lam = _gpu_problem(4096, D, torch.bfloat16, unit_levels=True, seed=D)
    e_ours, e_fla = _errors_beside_fla(q, k, v, torch.zeros_like(g), beta, lam, D ** -0.5)
    assert e_ours <= e_fla
