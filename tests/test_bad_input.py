"""Bad input gets a clear ValueError / TypeError (or a documented subclass) naming the
argument and what was expected.  One case per row of docs/bad-input.md (a test checks that
the table and this file list the same cases).  The second half checks what is NOT an error:
empty batches, zero widths and strided / transposed / broadcast operands work on every
backend that can run here."""

import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

from hodlr import fenwick
import hodlr
from hodlr import backends as registry, cli
from hodlr.state import combine
from hodlr.testing import TOLERANCES, assert_close

torch = pytest.importorskip("torch")

T, L = 5, fenwick.num_levels(5)
DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "bad-input.md"


def lam(*batch, T=T, L=L, dtype=np.float64):
    return np.ones(batch + (T, L), dtype=dtype)


def mask(*batch, **kw):
    return hodlr.LogLinearMask(lam(*batch, **kw))


def ops(*batch, T=T, D=2, dtype=np.float64):
    return np.ones(batch + (T, D), dtype=dtype)


def meta(shape):
    return torch.ones(shape, dtype=torch.float64, device="meta")


def nan_at(a, index):
    a = np.array(a, copy=True)
    a[index] = np.nan
    return a


def inf_at(a, index):
    a = np.array(a, copy=True)
    a[index] = -np.inf
    return a


def attn(q=None, k=None, v=None, M=None, **kw):
    return hodlr.attention(ops() if q is None else q, ops() if k is None else k, ops() if v is None else v,
                           mask() if M is None else M, **kw)


def gdn(q=None, k=None, v=None, beta=None, M=None, **kw):
    return hodlr.gated_delta_attention(ops() if q is None else q, ops() if k is None else k,
                                       ops() if v is None else v, np.ones(T) if beta is None else beta,
                                       mask() if M is None else M, **kw)


def gdn_rule(state=False, beta_shape=(1, T, 2), backend="auto"):
    """``log_linear_gated_delta_rule`` on ones; ``state``: continue from the state at position T."""
    t = lambda *shape: torch.ones(shape, dtype=torch.float64)  # noqa: E731
    args = [t(1, T, 2, 2), t(1, T, 2, 2), t(1, T, 2, 2), t(1, T, 2), t(*beta_shape), t(1, T, 2, L + 1)]
    init = hodlr.log_linear_gated_delta_rule(*args[:4], t(1, T, 2), args[5], output_final_state=True)[1] if state \
        else None
    return hodlr.log_linear_gated_delta_rule(*args, initial_state=init, backend=backend)


def step(state, positions=None):
    """``log_linear_attn_step`` of one token on ones, ``(B, H, D) = (2, 2, 2)``."""
    t = lambda *shape: torch.ones(shape, dtype=torch.float64)  # noqa: E731
    return hodlr.log_linear_attn_step(t(2, 1, 2, 2), t(2, 1, 2, 2), t(2, 1, 2, 2), None, t(2, 1, 2, 5), state)


def kernels():
    """``hodlr.kernels`` (imported on first use: it needs triton)."""
    import hodlr.kernels

    return hodlr.kernels


def over_budget(monkeypatch):
    monkeypatch.setattr(hodlr.options, "dense_max_bytes", 100)


def lla(B=2, Tq=T, Hqk=1, H=2, Dk=2, L=L, state=None, dtype=torch.float64, **kw):
    """``hodlr.log_linear_attn`` on valid inputs of these sizes, with the keywords ``kw``."""
    q, k = (torch.ones(B, Tq, Hqk, Dk, dtype=dtype) for _ in range(2))
    v = torch.ones(B, Tq, H, 2, dtype=dtype)
    return hodlr.log_linear_attn(q, k, v, torch.zeros(B, Tq, H, dtype=dtype), torch.ones(B, Tq, H, L, dtype=dtype),
                                 initial_state=state, **kw)


def state(N=2, H=2, Dk=2, Dv=2, position=0, dtype=torch.float64, device="cpu", slots=4):
    s = hodlr.LogLinearState.zeros(N, H, Dk, Dv, slots=slots, dtype=dtype, device=device)
    return hodlr.LogLinearState(s.states, torch.full((N,), position, dtype=torch.int64, device=device),
                                validate=False)


# (id, call, error type, message regex).  ``call`` takes pytest's monkeypatch fixture.
CASES = [
    # -- LogLinearMask ----------------------------------------------------------------
    ("scales-rank-1", lambda mp: hodlr.LogLinearMask(np.ones(5)), ValueError,
     r"level_scales must have shape \(\.\.\., T, L\).*got shape \(5,\)"),
    ("scales-not-array", lambda mp: hodlr.LogLinearMask("abc"), TypeError,
     r"level_scales must be a numpy.ndarray or torch.Tensor"),
    ("scales-none", lambda mp: hodlr.LogLinearMask(None), TypeError, r"level_scales must be an array.*got None"),
    ("length-zero", lambda mp: hodlr.LogLinearMask(np.ones((0, 1))), ValueError, r"T >= 1"),
    ("too-few-levels", lambda mp: hodlr.LogLinearMask(np.ones((5, 3))), hodlr.LevelsExceededError,
     r"L=3 columns but T=5 needs at least num_levels\(T\)=4"),
    ("decay-wrong-length", lambda mp: hodlr.LogLinearMask(lam(), np.zeros(4)), ValueError,
     r"log_decay must have shape \(\.\.\., T\) with T=5"),
    ("decay-rank-0", lambda mp: hodlr.LogLinearMask(lam(), 0.5), ValueError, r"log_decay must have shape \(\.\.\., T\)"),
    ("mask-batch-not-broadcastable", lambda mp: hodlr.LogLinearMask(lam(2), np.zeros((3, T))), ValueError,
     r"batch dimensions do not broadcast: level_scales \(2,\), log_decay \(3,\)"),
    ("scales-nan-read", lambda mp: hodlr.LogLinearMask(nan_at(lam(), (3, 2))), ValueError,
     r"level_scales must be finite where they are read; entry \(3, 2\)"),
    ("scales-inf-read", lambda mp: hodlr.LogLinearMask(inf_at(lam(), (4, 0))), ValueError,
     r"level_scales must be finite where they are read; entry \(4, 0\)"),
    ("decay-nan", lambda mp: hodlr.LogLinearMask(lam(), nan_at(np.zeros(T), 2)), ValueError,
     r"log_decay must be finite"),
    ("decay-inf", lambda mp: hodlr.LogLinearMask(lam(), inf_at(np.zeros(T), 2)), ValueError,
     r"log_decay must be finite"),
    ("scales-int", lambda mp: hodlr.LogLinearMask(lam(dtype=np.int64)), TypeError,
     r"level_scales must have dtype float32 or float64, got int64"),
    ("scales-bool", lambda mp: hodlr.LogLinearMask(lam(dtype=bool)), TypeError,
     r"level_scales must have dtype float32 or float64, got bool"),
    ("scales-complex", lambda mp: hodlr.LogLinearMask(lam(dtype=np.complex128)), TypeError,
     r"level_scales must have dtype float32 or float64, got complex128"),
    ("scales-float16-numpy", lambda mp: hodlr.LogLinearMask(lam(dtype=np.float16)), TypeError,
     r"level_scales must have dtype float32 or float64, got float16"),
    ("scales-torch-int", lambda mp: hodlr.LogLinearMask(torch.ones(T, L, dtype=torch.int32)), TypeError,
     r"level_scales must have a real floating dtype .*got torch.int32"),
    ("scales-torch-float8", lambda mp: hodlr.LogLinearMask(torch.ones(T, L).to(torch.float8_e4m3fn)), TypeError,
     r"level_scales must have a real floating dtype \(float16, bfloat16, float32, float64\), got torch.float8_e4m3fn"),
    ("scales-torch-complex", lambda mp: hodlr.LogLinearMask(torch.ones(T, L, dtype=torch.complex64)), TypeError,
     r"level_scales must have a real floating dtype .*got torch.complex64"),
    ("decay-dtype-mismatch", lambda mp: hodlr.LogLinearMask(lam(), np.zeros(T, np.float32)), TypeError,
     r"log_decay has dtype float32 but level_scales has float64"),
    ("decay-other-library", lambda mp: hodlr.LogLinearMask(torch.ones(T, L, dtype=torch.float64), np.zeros(T)),
     TypeError, r"log_decay is a numpy array but level_scales is a torch array"),
    ("decay-other-device", lambda mp: hodlr.LogLinearMask(torch.ones(T, L, dtype=torch.float64), meta(T)),
     ValueError, r"log_decay is on device meta but level_scales is on cpu"),
    # -- matmul -----------------------------------------------------------------------
    ("matmul-not-a-mask", lambda mp: hodlr.matmul(lam(), ops()), TypeError, r"M must be a hodlr.LogLinearMask"),
    ("matmul-x-rank-1", lambda mp: hodlr.matmul(mask(), np.ones(T)), ValueError,
     r"X must have shape \(\.\.\., T, D\) \(at least 2 dims\)"),
    ("matmul-x-wrong-length", lambda mp: hodlr.matmul(mask(), ops(T=6)), ValueError,
     r"X must have shape \(\.\.\., T, D\) with T=5.*got shape \(6, 2\)"),
    ("matmul-x-int", lambda mp: hodlr.matmul(mask(), ops(dtype=np.int32)), TypeError,
     r"X must have dtype float32 or float64, got int32"),
    ("matmul-x-complex", lambda mp: hodlr.matmul(mask(), ops(dtype=np.complex64)), TypeError,
     r"X must have dtype float32 or float64, got complex64"),
    ("matmul-dtype-mismatch", lambda mp: hodlr.matmul(mask(), ops(dtype=np.float32)), TypeError,
     r"the mask has dtype float64 but X has float32"),
    ("matmul-other-library", lambda mp: hodlr.matmul(mask(), torch.ones(T, 2, dtype=torch.float64)), TypeError,
     r"X is a torch array but M.level_scales is a numpy array"),
    ("matmul-cuda-mask-cpu-operand",
     lambda mp: hodlr.matmul(hodlr.LogLinearMask(meta((T, L))), torch.ones(T, 2, dtype=torch.float64)),
     ValueError, r"X is on device cpu but M.level_scales is on meta"),
    ("matmul-cpu-mask-cuda-operand",
     lambda mp: hodlr.matmul(hodlr.LogLinearMask(torch.ones(T, L, dtype=torch.float64)), meta((T, 2))),
     ValueError, r"X is on device meta but M.level_scales is on cpu"),
    ("matmul-batch-not-broadcastable", lambda mp: hodlr.matmul(mask(2), ops(3)), ValueError,
     r"batch dimensions do not broadcast: M \(2,\), X \(3,\)"),
    ("unknown-backend", lambda mp: hodlr.matmul(mask(), ops(), backend="cuda"), ValueError,
     r"unknown backend 'cuda'; known backends: auto, dense, sparse, recursive, fenwick, chunked, triton"),
    ("backend-not-a-string", lambda mp: hodlr.matmul(mask(), ops(), backend=None), TypeError,
     r"backend must be a string"),
    ("backend-unavailable-numpy", lambda mp: hodlr.matmul(mask(), ops(), backend="triton"),
     hodlr.BackendUnavailableError, r"backend 'triton'"),
    ("mask-validate-not-a-bool", lambda mp: hodlr.LogLinearMask(np.ones((T, L)), validate=None), TypeError,
     r"validate must be a bool, got NoneType"),
    ("state-validate-not-a-bool", lambda mp: hodlr.LogLinearState(state().states, state().positions, validate="no"),
     TypeError, r"validate must be a bool, got str"),
    ("op-step-backend-not-a-string", lambda mp: hodlr.log_linear_attn_step(
        *(torch.ones(2, 1, 2, 2, dtype=torch.float64),) * 3, None, torch.ones(2, 1, 2, 5, dtype=torch.float64),
        state(), backend=None), TypeError, r"backend must be a string, 'auto', 'triton' or 'torch', got NoneType"),
    ("options-unknown-name", lambda mp: setattr(hodlr.options, "dense_max_byte", 10), AttributeError,
     r"hodlr.options has no option 'dense_max_byte'; the options are dense_max_bytes, attention_save_states"),
    ("options-budget-not-an-integer", lambda mp: setattr(hodlr.options, "dense_max_bytes", None), TypeError,
     r"hodlr.options.dense_max_bytes must be an integer >= 0 \(bytes\), got NoneType"),
    ("options-budget-negative", lambda mp: setattr(hodlr.options, "dense_max_bytes", -1), ValueError,
     r"hodlr.options.dense_max_bytes must be an integer >= 0 \(bytes\), got -1"),
    ("options-flag-not-a-bool", lambda mp: setattr(hodlr.options, "attention_save_states", "yes"), TypeError,
     r"hodlr.options.attention_save_states must be a bool, got str"),
    ("kernels-scale-string", lambda mp: kernels().attention(*(torch.ones(4, 2),) * 3, torch.ones(4, 3), None, "2"),
     TypeError, r"scale must be a real number or None, got str"),
    ("kernels-scale-nan", lambda mp: kernels().gated_delta(*(torch.ones(4, 2),) * 3, torch.ones(4), torch.ones(4, 3),
                                                           None, float("nan")),
     ValueError, r"scale must be finite, got nan"),
    ("kernels-numpy-operand", lambda mp: kernels().attention(np.ones((4, 2)), *(torch.ones(4, 2),) * 2,
                                                             torch.ones(4, 3)),
     TypeError, r"q must be a torch.Tensor, got ndarray"),
    ("dense-over-budget", lambda mp: (over_budget(mp), hodlr.matmul(mask(), ops(), backend="dense")),
     hodlr.DenseTooLargeError, r"dense_max_bytes.*use backend='recursive'"),
    ("backend-lacks-op", lambda mp: (mp.delattr(registry.load("recursive"), "attention"), attn(backend="recursive")),
     hodlr.BackendUnavailableError, r"backend 'recursive' does not offer attention; backends that do: dense"),
    # -- attention --------------------------------------------------------------------
    ("attention-q-rank-1", lambda mp: attn(q=np.ones(T)), ValueError, r"q must have shape \(\.\.\., T, Dk\)"),
    ("attention-v-wrong-length", lambda mp: attn(v=ops(T=4)), ValueError,
     r"v must have shape \(\.\.\., T, D\) with T=5"),
    ("attention-dk-mismatch", lambda mp: attn(k=ops(D=3)), ValueError, r"q and k must share their last dim Dk"),
    ("attention-dtype-mismatch", lambda mp: attn(k=ops(dtype=np.float32)), TypeError,
     r"k has dtype float32 but q has float64"),
    ("attention-batch-not-broadcastable", lambda mp: attn(q=ops(2), v=ops(3)), ValueError,
     r"batch dimensions do not broadcast: M \(\), q \(2,\), k \(\), v \(3,\)"),
    ("scale-string", lambda mp: attn(scale="0.5"), TypeError, r"scale must be a real number or None, got str"),
    ("scale-bool", lambda mp: attn(scale=True), TypeError, r"scale must be a real number or None, got bool"),
    ("scale-complex", lambda mp: attn(scale=1j), TypeError, r"scale must be a real number or None, got complex"),
    ("scale-array", lambda mp: attn(scale=np.ones(2)), TypeError, r"scale must be a real number or None, got ndarray"),
    ("scale-nan", lambda mp: attn(scale=float("nan")), ValueError, r"scale must be finite, got nan"),
    ("scale-inf", lambda mp: attn(scale=np.inf), ValueError, r"scale must be finite, got inf"),
    ("scale-huge-int", lambda mp: attn(scale=10 ** 400), ValueError,
     r"scale must be finite, got an integer of 1329 bits \(beyond float64\)"),
    # -- log_linear_attn: packed sequences, state hand-off -----------------------------
    ("op-cu-seqlens-not-from-zero", lambda mp: lla(B=1, cu_seqlens=torch.tensor([1, 5])), ValueError,
     r"cu_seqlens must start at 0, got cu_seqlens\[0\]=1"),
    ("op-cu-seqlens-decreasing", lambda mp: lla(B=1, cu_seqlens=torch.tensor([0, 3, 2, 5])), ValueError,
     r"cu_seqlens must be non-decreasing, got cu_seqlens\[1\]=3 > cu_seqlens\[2\]=2"),
    ("op-cu-seqlens-not-ending-at-t", lambda mp: lla(B=1, cu_seqlens=torch.tensor([0, 4])), ValueError,
     r"cu_seqlens must end at T=5 \(the tokens of q\), got cu_seqlens\[-1\]=4"),
    ("op-cu-seqlens-not-integer", lambda mp: lla(B=1, cu_seqlens=torch.tensor([0.0, 5.0])), TypeError,
     r"cu_seqlens must be an int32 or int64 tensor, got torch.float32"),
    ("op-cu-seqlens-batch", lambda mp: lla(B=2, cu_seqlens=torch.tensor([0, 5])), ValueError,
     r"with cu_seqlens the batch size must be 1 .*got B=2"),
    ("op-state-batch", lambda mp: lla(state=state(N=3)), ValueError,
     r"initial_state must have \(N, H, Dk, Dv\) = \(2, 2, 2, 2\) .*got states of shape \(3, 2, 4, 2, 2\)"),
    ("op-state-heads", lambda mp: lla(state=state(H=4)), ValueError,
     r"initial_state must have \(N, H, Dk, Dv\) = \(2, 2, 2, 2\)"),
    ("op-state-width", lambda mp: lla(state=state(Dk=3)), ValueError,
     r"initial_state must have \(N, H, Dk, Dv\) = \(2, 2, 2, 2\) .*got states of shape \(2, 2, 4, 3, 2\)"),
    ("op-state-dtype", lambda mp: lla(state=state(dtype=torch.float32)), TypeError,
     r"initial_state has dtype torch.float32 but torch.float64 inputs need a torch.float64 state"),
    ("op-state-device", lambda mp: lla(state=state(device="meta")), ValueError,
     r"initial_state is on device meta but q is on cpu"),
    ("op-state-not-a-state", lambda mp: lla(state=torch.zeros(2, 2, 4, 2, 2)), TypeError,
     r"initial_state must be a hodlr.LogLinearState, got Tensor"),
    ("op-scales-too-narrow-for-state", lambda mp: lla(state=state(position=12), L=5), hodlr.LevelsExceededError,
     r"level_scales has L=5 levels but absolute position 16 \(the state continues from position 12\) needs at "
     r"least num_levels\(17\)=6"),
    ("op-heads-not-dividing", lambda mp: lla(Hqk=2, H=3), ValueError,
     r"the 2 heads of q and k must divide the 3 heads of v"),
    ("op-no-heads", lambda mp: lla(Hqk=0, H=0), ValueError,
     r"q, k and v must have at least one head, got 0 heads of q and k and 0 of v"),
    ("op-step-state-dtype", lambda mp: step(state=state(dtype=torch.float32)), TypeError,
     r"^state has dtype torch.float32 but torch.float64 inputs need a torch.float64 state"),
    ("op-step-state-heads", lambda mp: step(state=state(H=3)), ValueError,
     r"^state must have \(N, H, Dk, Dv\) = \(2, 2, 2, 2\)"),
    ("op-backend-without-state", lambda mp: lla(output_final_state=True, backend="dense"),
     hodlr.BackendUnavailableError, r"backend 'dense' has no recurrent state"),
    ("op-step-past-the-slots",
     lambda mp: hodlr.log_linear_attn_step(*(x[:, :1] for x in (torch.ones(2, 1, 1, 2, dtype=torch.float64),) * 2),
                                           torch.ones(2, 1, 2, 2, dtype=torch.float64), None,
                                           torch.ones(2, 1, 2, 5, dtype=torch.float64), state(position=15)),
     ValueError, r"the step takes position 15 to 16, which needs 5 slots but the state has 4"),
    ("op-step-no-levels-unvalidated", lambda mp: hodlr.log_linear_gated_delta_step(
        *(torch.ones(2, 1, 2, 2, dtype=torch.float64),) * 3, None, torch.ones(2, 1, 2, dtype=torch.float64),
        torch.ones(2, 1, 2, 0, dtype=torch.float64), state(), validate=False),
     hodlr.LevelsExceededError, r"level_scales has L=0 levels; every token reads level 0 \(L >= 1\)"),
    ("op-step-state-not-a-state", lambda mp: step(state=torch.zeros(2)), TypeError,
     r"state must be a hodlr.LogLinearState \(LogLinearState.zeros\(...\) for a new cache\), got torch.Tensor"),
    ("op-step-state-expanded",
     lambda mp: step(state=hodlr.LogLinearState(state(N=1).states.expand(2, 2, 4, 2, 2), torch.zeros(2, dtype=torch.int64))),
     ValueError, r"state.states is updated in place, so it must not be an expanded \(stride 0\) view"),
    ("combine-behind", lambda mp: combine(state(position=5), state(position=3)), ValueError,
     r"second must be at or after first: sequence 0 has first.positions = 5 > second.positions = 3"),
    ("combine-decay-shape", lambda mp: combine(state(), state(), torch.zeros(2, dtype=torch.float64)), ValueError,
     r"log_decay must be a tensor of shape \(N, H\) = \(2, 2\)"),
    ("cp-no-process-group", lambda mp: hodlr.distributed.log_linear_attn(*(torch.ones(1, 2, 1, 1),) * 3, None,
                                                                          torch.ones(1, 2, 1, 2)),
     ValueError, r"group: torch.distributed is not initialised"),
    ("cp-group-not-a-group", lambda mp: hodlr.distributed.log_linear_attn(*(torch.ones(1, 2, 1, 1),) * 3, None,
                                                                            torch.ones(1, 2, 1, 2), group="world"),
     TypeError, r"group must be a torch.distributed.ProcessGroup or None, got str"),
    # -- gated delta attention -----------------------------------------------------------
    ("gdn-beta-wrong-length", lambda mp: gdn(beta=np.ones(T + 1)), ValueError,
     r"beta must have shape \(\.\.\., T\) with T=5"),
    ("gdn-v-none", lambda mp: hodlr.gated_delta_attention(ops(), ops(), None, np.ones(T), mask()), TypeError,
     r"v must be an array of shape \(\.\.\., T, Dv\), got None"),
    ("gdn-beta-dtype-mismatch", lambda mp: gdn(beta=np.ones(T, np.float32)), TypeError,
     r"beta has dtype float32 but q has float64"),
    ("gdn-beta-batch-not-broadcastable", lambda mp: gdn(q=ops(2), beta=np.ones((3, T))), ValueError,
     r"batch dimensions do not broadcast: M \(\), q \(2,\), k \(\), v \(\), beta \(3,\)"),
    ("gdn-backend-without-op", lambda mp: gdn(backend="recursive"), hodlr.BackendUnavailableError,
     r"backend 'recursive' does not offer gated_delta_attention; backends that do: dense, fenwick, chunked"),
    ("gdn-dense-over-budget", lambda mp: (over_budget(mp), gdn(backend="dense")), hodlr.DenseTooLargeError,
     r"backend 'dense' gated_delta_attention: a dense mask of shape \(5, 5\).*use backend='fenwick' or 'chunked'"),
    ("gdn-rule-beta-shape", lambda mp: gdn_rule(beta_shape=(1, T, 1)), ValueError,
     r"beta must have shape \(B, T, H\) = \(1, 5, 2\), got \(1, 5, 1\)"),
    ("gdn-rule-state-on-dense", lambda mp: gdn_rule(state=True, backend="dense"), hodlr.BackendUnavailableError,
     r"backend 'dense' has no recurrent state"),
    # -- conversions, registry, fenwick ------------------------------------------------
    ("to-dense-over-budget", lambda mp: (over_budget(mp), mask(2).to_dense()), hodlr.DenseTooLargeError,
     r"LogLinearMask.to_dense: a dense mask of shape \(2, 5, 5\).*make it for a smaller T or batch"),
    ("gdn-matrix-over-budget", lambda mp: (over_budget(mp), hodlr.gated_delta_matrix(ops(), ops(), np.ones(T),
                                                                                       mask())),
     hodlr.DenseTooLargeError, r"hodlr.gated_delta_matrix: a dense mask .*make it for a smaller T or batch"),
    ("tree-to-dense-over-budget", lambda mp: (over_budget(mp), hodlr.HODLRMatrix.from_mask(mask()).to_dense()),
     hodlr.DenseTooLargeError, r"HODLRMatrix.to_dense: a dense mask of shape \(5, 5\)"),
    ("sparse-toarray-over-budget", lambda mp: (over_budget(mp), mask().to_sparse().toarray()),
     hodlr.DenseTooLargeError, r"SparseMask.toarray: a dense mask of shape \(5, 5\)"),
    ("masked-array", lambda mp: hodlr.LogLinearMask(np.ma.masked_array(np.ones((T, L)))), TypeError,
     r"level_scales must be a plain numpy.ndarray or torch.Tensor of shape \(\.\.\., T, L\), got a numpy masked array"),
    ("from-dense-tol-type", lambda mp: hodlr.HODLRMatrix.from_dense(np.tril(np.ones((4, 4))), tol="1e-3"),
     TypeError, r"tol must be a float in \(0, 1\), got str '1e-3'"),
    ("symbolic-foreign-block", lambda mp: __import__("hodlr.symbolic").symbolic.block_factors(
        4, list(hodlr.fenwick.offdiag_blocks(16))[-1]), ValueError,
     r"blk must be one of hodlr.fenwick.offdiag_blocks\(4\), got Block"),
    ("block-factors-level", lambda mp: mask().block_factors(0), ValueError, r"lev must be in 1\.\.3 for T=5, got 0"),
    ("block-factors-t1", lambda mp: hodlr.LogLinearMask(np.ones((1, 1))).block_factors(1), ValueError,
     r"lev: a mask of T=1 has no off-diagonal blocks"),
    ("from-mask-array", lambda mp: hodlr.HODLRMatrix.from_mask(np.ones((8, 8))), TypeError,
     r"M must be a hodlr.LogLinearMask \(HODLRMatrix.from_dense takes an array\), got ndarray"),
    ("tree-leaf-upper", lambda mp: hodlr.HODLRMatrix(leaf=np.ones((3, 3))), ValueError,
     r"leaf must be lower triangular, but leaf\[0, 1\] = 1.0 lies above the diagonal"),
    ("rank-profile-rtol", lambda mp: hodlr.rank_profile(mask(), rtol=-1), ValueError,
     r"rtol must be a finite number >= 0 or None, got -1"),
    ("registry-unknown", lambda mp: registry.get("nope", "numpy", "cpu", op="matmul"), ValueError, r"unknown backend 'nope'"),
    ("registry-unknown-op", lambda mp: registry.get("dense", "numpy", "cpu", op="softmax"), ValueError,
     r"op must be one of matmul, attention.*got 'softmax'"),
    ("num-levels-zero", lambda mp: fenwick.num_levels(0), ValueError, r"T must be an integer >= 1, got 0"),
    ("num-levels-float", lambda mp: fenwick.num_levels(2.5), TypeError, r"T must be an integer >= 1, got float"),
    ("num-levels-bool", lambda mp: fenwick.num_levels(True), TypeError, r"T must be an integer >= 1, got bool"),
    ("num-slots-negative", lambda mp: fenwick.num_slots(-1), ValueError,
     r"position must be an integer >= 0, got -1"),
    ("level-negative", lambda mp: fenwick.level(-1, 0), ValueError, r"positions must be >= 0"),
    ("level-float-array", lambda mp: fenwick.level(np.array([1.5]), 0), TypeError,
     r"t must hold integers, got dtype float64"),
]


@pytest.mark.parametrize("call, error, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(monkeypatch, call, error, message):
    with pytest.raises(error, match=message) as info:
        call(monkeypatch)
    assert isinstance(info.value, (ValueError, TypeError)) or error is AttributeError  # (an option's name)


def test_backend_unavailable_torch_cpu_without_interpreter():
    """triton on CPU tensors without TRITON_INTERPRET (fresh process: the interpreter
    switch is read when hodlr.kernels defines its kernels; ``tests/test_registry.py`` covers
    the variable set or cleared after that)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = (
        "import torch, hodlr\n"
        "M = hodlr.LogLinearMask(torch.ones(5, 4, dtype=torch.float64))\n"
        "try:\n"
        "    hodlr.matmul(M, torch.ones(5, 2, dtype=torch.float64), backend='triton')\n"
        "except hodlr.BackendUnavailableError as err:\n"
        "    print('RAISED', err)\n"
        "state = hodlr.LogLinearState.zeros(1, 1, 2, 2, slots=4)\n"
        "try:\n"
        "    hodlr.log_linear_attn_step(*(torch.ones(1, 1, 1, 2),) * 3, None, torch.ones(1, 1, 1, 2), state,\n"
        "                               backend='triton')\n"
        "except hodlr.BackendUnavailableError as err:\n"
        "    print('STEP RAISED', err)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert re.search(r"RAISED backend 'triton'", out.stdout), out.stdout
    assert re.search(r"STEP RAISED backend 'triton'", out.stdout), out.stdout


def test_doc_table_lists_every_case():
    text = DOC.read_text()
    ids = set(re.findall(r"test_bad_input\[([\w-]+)\]", text))
    assert ids == {c[0] for c in CASES}, f"docs/bad-input.md and tests differ: {ids ^ {c[0] for c in CASES}}"


# -- not errors -------------------------------------------------------------------------
def _runnable(library):
    device = "cpu"
    out = []
    for name in registry.NAMES:
        if registry.load(name).unavailable_reason(library, device) is None:
            out.append(name)
    return out


def _problem(rng, T=37, batch=(3,)):
    lam_ = rng.uniform(0.5, 1.5, batch + (T, fenwick.num_levels(T) + 1))
    g = -rng.uniform(0, 1, batch + (T,))
    return lam_, g


def _as(library, a):
    return a if library == "numpy" else torch.as_tensor(a)


@pytest.mark.parametrize("library", ["numpy", "torch"])
def test_strided_operands_work_on_every_backend(library):
    """Transposed, sliced (non-unit stride), Fortran-ordered and broadcast (stride-0)
    operands and masks give the contiguous answer on every backend that runs here."""
    rng = np.random.default_rng(7)
    T, D = 37, 4
    lam_, g = _problem(rng, T)
    X = rng.standard_normal((3, T, D))
    q, k, v = (rng.standard_normal((3, T, D)) for _ in range(3))
    want_M = hodlr.LogLinearMask(lam_, g)
    want_mm = hodlr.matmul(want_M, X, backend="dense")
    want_at = hodlr.attention(q, k, v, want_M, scale=0.5, backend="dense")
    want_bc = hodlr.matmul(want_M, np.broadcast_to(X[:1], X.shape).copy(), backend="dense")

    def odd_layouts(a):
        """The same values as ``a`` held transposed, with a stride-2 slice and in Fortran order."""
        transposed = np.swapaxes(np.swapaxes(a, -1, -2).copy(), -1, -2)
        doubled = np.repeat(a, 2, axis=-2)[..., ::2, :]
        return [transposed, doubled, np.asfortranarray(a)]

    lam_f = np.swapaxes(np.swapaxes(lam_, -1, -2).copy(), -1, -2)
    g_s = np.repeat(g, 2, axis=-1)[..., ::2]
    M = hodlr.LogLinearMask(_as(library, lam_f), _as(library, g_s))
    for name in _runnable(library):
        for Xs in odd_layouts(X):
            assert_close(hodlr.matmul(M, _as(library, Xs), backend=name), _as(library, want_mm),
                         TOLERANCES["cpu_float64"], f"{name} matmul strided")
        for qs, ks, vs in zip(odd_layouts(q), odd_layouts(k)[::-1], odd_layouts(v)):
            assert_close(hodlr.attention(_as(library, qs), _as(library, ks), _as(library, vs), M, scale=0.5,
                                         backend=name),
                         _as(library, want_at), TOLERANCES["cpu_float64"], f"{name} attention strided")
        Xb = np.broadcast_to(X[:1], X.shape)
        Xb = Xb if library == "numpy" else torch.as_tensor(X[:1]).expand(X.shape)
        assert_close(hodlr.matmul(M, Xb, backend=name), _as(library, want_bc), TOLERANCES["cpu_float64"],
                     f"{name} matmul broadcast")


@pytest.mark.parametrize("library", ["numpy", "torch"])
def test_empty_batch_and_zero_width_are_not_errors(library):
    """A batch dim of size 0 returns an empty result of the right shape; so does D = 0."""
    rng = np.random.default_rng(3)
    lam_, g = _problem(rng, T=9, batch=(1,))
    M = hodlr.LogLinearMask(_as(library, lam_), _as(library, g))
    for name in _runnable(library):
        y = hodlr.matmul(M, _as(library, np.ones((0, 9, 3))), backend=name)
        assert tuple(y.shape) == (0, 9, 3), name
        y = hodlr.matmul(M, _as(library, np.ones((9, 0))), backend=name)
        assert tuple(y.shape) == (1, 9, 0), name
        o = hodlr.attention(*(_as(library, np.ones((2, 0, 9, w))) for w in (2, 2, 3)), M, backend=name)
        assert tuple(o.shape) == (2, 0, 9, 3), name
        empty_mask = hodlr.LogLinearMask(_as(library, np.ones((0, 9, 5))))
        y = hodlr.matmul(empty_mask, _as(library, np.ones((9, 2))), backend=name)
        assert tuple(y.shape) == (0, 9, 2), name


@pytest.mark.parametrize("op", ["log_linear_attn", "log_linear_gated_delta_rule"])
@pytest.mark.parametrize("B, Dk, Dv", [(0, 2, 3), (2, 0, 3), (2, 2, 0), (2, 0, 0)])
def test_fla_ops_empty_batch_and_zero_widths(op, B, Dk, Dv):
    """The fla-shaped ops on an empty batch or zero head widths: zero outputs (and final states)
    of the right shapes on every backend that runs the op, not errors."""
    T_, H = 5, 2
    t = lambda *shape: torch.rand(shape, dtype=torch.float64)  # noqa: E731
    q, k, v, g, lam_ = t(B, T_, H, Dk), t(B, T_, H, Dk), t(B, T_, H, Dv), -t(B, T_, H), t(B, T_, H, L)
    extra = (t(B, T_, H),) if op == "log_linear_gated_delta_rule" else ()
    args = (q, k, v, g) + extra + (lam_,)
    gated = op == "log_linear_gated_delta_rule"
    for name in _runnable("torch"):
        module = registry.load(name)
        kind = "gated_delta_attention" if gated else "attention"
        if not registry.offers(module, kind):
            continue
        if not registry.keeps_state(module, kind):
            with torch.no_grad():  # (sparse differentiates nothing)
                o, _ = getattr(hodlr, op)(*args, backend=name)
            assert tuple(o.shape) == (B, T_, H, Dv) and not o.abs().sum(), name
            continue
        o, final = getattr(hodlr, op)(*args, output_final_state=True, backend=name)
        assert tuple(o.shape) == (B, T_, H, Dv) and not o.abs().sum(), name
        assert tuple(final.states.shape) == (B, H, 3 if B else 0, Dk, Dv) and tuple(final.positions.shape) == (B,), name


@pytest.mark.parametrize("library", ["numpy", "torch"])
def test_unread_non_finite_scales_are_not_errors(library):
    """NaN and inf in never-read scales are accepted and change no output of any backend."""
    rng = np.random.default_rng(11)
    lam_, g = _problem(rng, T=9, batch=())
    unread = ~fenwick.read_levels(9, lam_.shape[-1])
    poisoned = lam_.copy()
    poisoned[unread] = np.where(rng.random(int(unread.sum())) < 0.5, np.nan, np.inf)
    M, P = (hodlr.LogLinearMask(_as(library, a), _as(library, g)) for a in (lam_, poisoned))
    X, q, k = (_as(library, rng.standard_normal((9, 3))) for _ in range(3))
    for name in _runnable(library):
        want, got = hodlr.matmul(M, X, backend=name), hodlr.matmul(P, X, backend=name)
        assert_close(got, want, TOLERANCES["cpu_float64"], f"{name} matmul")
        want, got = hodlr.attention(q, k, X, M, backend=name), hodlr.attention(q, k, X, P, backend=name)
        assert_close(got, want, TOLERANCES["cpu_float64"], f"{name} attention")


@pytest.mark.parametrize("call, error, message", [
    (lambda: mask().block_factors(1.5), TypeError, r"lev must be an integer, got float"),
    (lambda: mask().block_factors("1"), TypeError, r"lev must be an integer, got str"),
    (lambda: fenwick.num_blocks(8, 1.5), TypeError, r"lev must be an integer >= 1, got float"),
    (lambda: fenwick.bucket("a", 1), TypeError, r"t must be an integer >= 0, got str"),
    (lambda: fenwick.bucket(3, 1.5), TypeError, r"lev must be an integer >= 0, got float"),
    (lambda: fenwick.read_levels(8, -1), ValueError, r"L must be an integer >= 0, got -1"),
    (lambda: fenwick.read_levels(8, 2.0), TypeError, r"L must be an integer >= 0, got float"),
    (lambda: fenwick.buckets(6.9), TypeError, r"t must be an integer >= 0, got float"),
    (lambda: fenwick.buckets(-1), ValueError, r"t must be an integer >= 0, got -1"),
    (lambda: fenwick.GatedDeltaState((), 2, 2).stacked(3.9), TypeError, r"slots must be an integer, got float"),
], ids=["block-factors-float", "block-factors-str", "num-blocks-float", "bucket-str", "bucket-float",
        "read-levels-negative", "read-levels-float", "buckets-float", "buckets-negative", "stacked-slots-float"])
def test_level_arguments_name_themselves(call, error, message):
    # not in the CASES table above (that one mirrors docs/bad-input.md row by row)
    with pytest.raises(error, match=message):
        call()


@pytest.mark.parametrize("argv, message", [
    (["bench-cpu", "--json", "{tmp}/missing/b.json"],
     r"argument --json: expected a file path that can be written, got '.*/missing/b.json': the folder .*/missing "
     r"does not exist"),
    (["bench-cpu", "--json", "{tmp}"],
     r"argument --json: expected a file path that can be written, got '.*': it is a folder"),
    (["bench-decode", "--json", "{tmp}/missing/d.json"],
     r"argument --json: expected a file path that can be written, got '.*/missing/d.json': the folder .*/missing "
     r"does not exist"),
    (["bench-decode", "--gpu-step", "--gpu-device", "nope"],
     r"--gpu-device must be a torch device string of a CUDA device or the CPU, such as cuda, cuda:1 or cpu; "
     r"got 'nope'"),
    (["bench-decode", "--gpu-step", "--gpu-device", "meta"], r"--gpu-device must be .* got 'meta'"),
    (["bench", "--json", "{tmp}/missing/b.json"],
     r"argument --json: expected a file path that can be written, got '.*/missing/b.json'"),
    (["bench-gated-delta", "--png", "{tmp}/missing/g.png"],
     r"argument --png: expected a file path that can be written, got '.*/missing/g.png'"),
], ids=["bench-cpu-json-no-folder", "bench-cpu-json-a-folder", "bench-decode-json-no-folder",
        "bench-decode-gpu-device-unknown", "bench-decode-gpu-device-meta", "bench-json-no-folder",
        "bench-gated-delta-png-no-folder"])
def test_bench_commands_refuse_before_running(capsys, tmp_path, argv, message):
    """A ``--json`` path the benchmark could not write at its end, or a ``--gpu-device`` that is not a CUDA
    device or the CPU, is a usage error (exit status 2) before anything is timed: nothing printed."""
    # not in the CASES table above (that one mirrors docs/bad-input.md, the library's refusals)
    with pytest.raises(SystemExit) as info:
        cli.main([a.format(tmp=tmp_path) for a in argv])
    out = capsys.readouterr()
    assert info.value.code == 2 and out.out == "", out.out
    assert re.search(message, out.err), out.err


def test_meta_masks_compute_shapes_or_refuse():
    """A mask on the meta device: the backends that compute without reading values return meta
    results of the right shape; those that read values, and the conversions, refuse by name."""
    M = hodlr.LogLinearMask(meta((9, fenwick.num_levels(9))))
    X = meta((9, 2))
    for name in ("dense", "recursive", "chunked"):
        assert hodlr.matmul(M, X, backend=name).shape == (9, 2), name
        assert hodlr.attention(X, X, X, M, backend=name).device.type == "meta", name
    for name in ("sparse", "fenwick"):
        with pytest.raises(hodlr.BackendUnavailableError, match=f"backend '{name}' cannot run on torch arrays on meta"):
            hodlr.matmul(M, X, backend=name)
    for convert in (M.to_sparse, M.to_hodlr, M.rank_profile):
        with pytest.raises(ValueError, match="reads the mask's values; a mask on the meta device holds none"):
            convert()


def _launcher_inputs():
    torch.manual_seed(0)
    B, T_, D = 2, 20, 3
    t = lambda *shape: torch.randn(shape, dtype=torch.float64)  # noqa: E731
    q, k, v, do = t(B, T_, D), t(B, T_, D), t(B, T_, D), t(B, T_, D)
    lam_, g = torch.rand(B, T_, 6, dtype=torch.float64), -torch.rand(B, T_, dtype=torch.float64)
    beta = torch.rand(B, T_, dtype=torch.float64)
    return q, torch.nn.functional.normalize(k, dim=-1), v, do, lam_, g, beta


@pytest.mark.parametrize("call, error, message", [
    (lambda K, q, k, v, do, lam_, g, beta: K.attention_backward(q, k, v, lam_, None, 1.0, do, out=(
        torch.empty(2, 5, 3, dtype=q.dtype), torch.empty(2, 5, 3, dtype=q.dtype), None, None)),
     ValueError, r"out's dq must have shape \(2, 20, 3\) \(the inputs' broadcast batch\), got \(2, 5, 3\)"),
    (lambda K, q, k, v, do, lam_, g, beta: K.attention_backward(q, k, v, lam_, None, 1.0, do, out=(
        None, None, torch.empty(3, 2, 20, 3, dtype=q.dtype), None)),
     ValueError, r"out's dv must have shape \(2, 20, 3\)"),
    (lambda K, q, k, v, do, lam_, g, beta: K.attention_backward(q, k, v, lam_, None, 1.0, do, out=(do, do, None, None)),
     ValueError, r"out's dq overlaps do in memory"),
    (lambda K, q, k, v, do, lam_, g, beta: K.attention_backward(q, k, v, lam_, None, 1.0, do, out=(None, None, None)),
     TypeError, r"out must be a tuple of 4 tensors or None \(dq, dk, dv, dlevel_scales\), got tuple of 3"),
    (lambda K, q, k, v, do, lam_, g, beta: K.attention_backward(q, k, v, lam_, None, 1.0, do[:, :5]),
     ValueError, r"do must have shape \(\*batch, T, Dv\) = \(2, 20, 3\)"),
    (lambda K, q, k, v, do, lam_, g, beta: K.attention_state_backward(q[None], k[None], v[None], lam_[None], None, 1.0,
                                                                       do[None, ..., :1]),
     ValueError, r"do must have shape \(N, H, T, Dv\) = \(1, 2, 20, 3\)"),
    (lambda K, q, k, v, do, lam_, g, beta: K.matmul_backward(lam_, None, v, do[..., :2]),
     ValueError, r"dy must have shape \(\*batch, T, D\) with \(T, D\) = \(20, 3\)"),
    (lambda K, q, k, v, do, lam_, g, beta: K.gated_delta_backward(q, k, v, beta, lam_, g, 1.0, do, out=(
        None, None, None, torch.empty(2, 19, dtype=q.dtype), None, None)),
     ValueError, r"out's dbeta must have shape \(2, 20\)"),
    (lambda K, q, k, v, do, lam_, g, beta: K.attention_forward(q, k, v, lam_, out=v),
     ValueError, r"out overlaps v in memory"),
    (lambda K, q, k, v, do, lam_, g, beta: K.attention_forward(q, k, v, lam_, scale="2"),
     TypeError, r"scale must be a real number or None, got str"),
    (lambda K, q, k, v, do, lam_, g, beta: K.gated_delta_forward(q, k, v, beta, lam_, g, float("inf")),
     ValueError, r"scale must be finite, got inf"),
    (lambda K, q, k, v, do, lam_, g, beta: K.attention_forward(q[0, 0], k, v, lam_),
     ValueError, r"q must have shape \(\*batch, T, Dk\), got shape \(3,\)"),
    (lambda K, q, k, v, do, lam_, g, beta: K.attention_forward(q.long(), k, v, lam_),
     TypeError, r"q must be a floating tensor, got torch.int64"),
    (lambda K, q, k, v, do, lam_, g, beta: K.attention_forward(q.float(), k, v, lam_),
     TypeError, r"k has dtype torch.float64 but q has torch.float32; they must match"),
    (lambda K, q, k, v, do, lam_, g, beta: K.attention_forward(q, k, v, lam_, return_states="yes"),
     TypeError, r"return_states must be a bool, got str"),
    (lambda K, q, k, v, do, lam_, g, beta: K.matmul_forward(lam_, None, v[0, 0]),
     ValueError, r"x must have shape \(\*batch, T, D\), got shape \(3,\)"),
    (lambda K, q, k, v, do, lam_, g, beta: K.attention_state_forward(q[None], k[None], v[None], lam_[None],
                                                                      cu_seqlens=torch.tensor([0.0, 7.5, 20.0])),
     TypeError, r"cu_seqlens must be a 1-d integer torch.Tensor"),
    (lambda K, q, k, v, do, lam_, g, beta: K.bucket_states(k[:, :8, None], v[:, :8, None], g[:, :8, None],
                                                            [(0, 0, 4, 3, 0)], 1, 2),
     ValueError, r"buckets row 0 \[0, 0, 4, 3, 0\] \(b, t0, n, i, j\) must have .*0 <= i < count=1"),
    (lambda K, q, k, v, do, lam_, g, beta: K.bucket_states(k[:, :8, None], v[:, :8, None], g[:, :8, None],
                                                            [(0, 0, 4, 0, 0), (0, 2, 4, 0, 1)], 1, 2),
     ValueError, r"share tokens: the buckets must be disjoint"),
    (lambda K, q, k, v, do, lam_, g, beta: K.carried_reads(v[:, :8, None], q[:, :8, None], lam_[:, :8, None], None,
                                                            torch.zeros(2, 1, 5, 3, 3, dtype=q.dtype), [16.5, 48], 1.0),
     TypeError, r"positions\[0\] must be an integer, got float"),
], ids=["out-shape", "out-batch", "out-overlaps-input", "out-tuple-length", "do-shape", "state-do-shape", "dy-shape",
        "gdn-out-shape", "forward-out-overlaps", "scale-string", "scale-inf", "rank", "integer", "mixed-dtypes",
        "flag-not-bool", "matmul-x-rank", "cu-seqlens-float", "buckets-out-of-range", "buckets-overlap",
        "positions-float"])
def test_kernel_launchers_refuse_what_they_cannot_write(call, error, message):
    """The kernels write every element of their outputs and read every element they are told of:
    a buffer, cotangent, bucket table or position of another size is refused by name before a
    launch (it was written or read past its end), as are odd scales, flags, ranks and dtypes."""
    with pytest.raises(error, match=message):
        call(kernels(), *_launcher_inputs())
