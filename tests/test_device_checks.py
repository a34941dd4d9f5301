"""The device-side validation of CUDA masks: the finiteness check of the scales a mask reads and of
its log-decay, run by its own kernel or inside the output kernels of the triton backend's forward
passes (here under the Triton interpreter); the first computation with a mask checks it, and the
verdict reaches the host without a synchronisation (GPU tests)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import hodlr
from hodlr import fenwick, kernels
from hodlr.testing import poison_unread



def _flag(lam, g=None):
    from hodlr.kernels.checks import nonfinite_flag

    return int(nonfinite_flag(lam, g)[0])


@pytest.mark.interpreter
@pytest.mark.parametrize("T", [1, 2, 37, 130])
def test_unread_entries_never_flag(T):
    L = fenwick.num_levels(T) + 2
    lam = poison_unread(torch.rand(2, 1, T, L))
    assert _flag(lam) == 0
    assert _flag(lam, -torch.rand(3, T)) == 0


@pytest.mark.interpreter
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_every_read_entry_flags(bad, rng):
    T = 37
    L = fenwick.num_levels(T)
    read = np.argwhere(fenwick.read_levels(T, L))
    for t, l in read[rng.choice(len(read), 12, replace=False)]:
        lam = poison_unread(torch.rand(2, T, L))
        lam[1, t, l] = bad
        assert _flag(lam) == 1, (t, l)
    g = -torch.rand(2, T)
    g[0, int(rng.integers(T))] = bad
    assert _flag(torch.rand(T, L), g) == 1


@pytest.mark.interpreter
def test_strided_and_broadcast_inputs():
    T, L = 50, 7
    lam = torch.rand(T, 3, L).transpose(0, 1)  # (3, T, L), strided rows
    lam.copy_(poison_unread(lam.clone()))
    g = (-torch.rand(T, 1)).expand(T, 3).t()                   # stride-0 batch
    assert _flag(lam, g) == 0
    lam = lam.clone()
    lam[2, 31, 0] = float("nan")
    assert _flag(lam, g) == 1


@pytest.mark.interpreter
def test_three_runs_of_batch_dims_with_broadcast_scales():
    """Level scales broadcast over a middle batch dim beside a full log-decay: three runs of batch
    dims, the scales copied for the fold (after the log-decay's batch order) and checked."""
    T, L = 9, 5
    lam = poison_unread(torch.rand(2, 1, 4, T, L)).expand(2, 3, 4, T, L)
    g = -torch.rand(2, 3, 4, T)
    assert _flag(lam, g) == 0
    bad = lam.clone()
    bad[1, 0, 3, 8, 0] = float("nan")
    assert _flag(bad[:, :1].expand(2, 3, 4, T, L), g) == 1


def _fused_flag(op, lam, g, chunk, D=4, batch=None):
    """The verdict of the forward ``op``'s output kernel, validating as it computes (operands of
    batch shape ``batch``, default ``lam``'s, against which ``lam`` and ``g`` broadcast)."""
    T = lam.shape[-2]
    batch = tuple(lam.shape[:-2]) if batch is None else batch
    gen = torch.Generator().manual_seed(T)
    q, k, v = (torch.randn(*batch, T, D, dtype=lam.dtype, generator=gen) for _ in range(3))
    flag = torch.zeros(1, dtype=torch.int32)
    if op == "attention":
        kernels.attention_forward(q, k, v, lam, g, 0.5, chunk=chunk, check=flag)
    elif op == "matmul":
        kernels.matmul_forward(lam, g, v, chunk=chunk, check=flag)
    else:
        kernels.gated_delta_forward(q, torch.nn.functional.normalize(k, dim=-1), v,
                                    torch.rand(*batch, T, dtype=lam.dtype, generator=gen), lam, g, 0.5, chunk=chunk,
                                    check=flag)
    return int(flag[0])


@pytest.mark.interpreter
@pytest.mark.parametrize("op", ["attention", "matmul", "gated_delta"])
@pytest.mark.parametrize("T", [1, 3, 65])
def test_output_kernels_validate_as_the_check_kernel(op, T, rng):
    """The forward kernels that validate as they run flag exactly what the check kernel flags: never
    an unread entry (poisoned with NaN), every read entry and every log-decay."""
    L = fenwick.num_levels(T) + 1
    lam = poison_unread(torch.rand(2, T, L, dtype=torch.float64))
    g = -torch.rand(2, T, dtype=torch.float64)
    assert _fused_flag(op, lam, g, 16) == _fused_flag(op, lam, None, 16) == 0
    read = np.argwhere(fenwick.read_levels(T, L))
    bad = [float("nan"), float("inf"), float("-inf")]
    for j, (t, l) in enumerate(read[rng.choice(len(read), min(3, len(read)), replace=False)]):
        poisoned = lam.clone()
        poisoned[1, t, l] = bad[j]
        assert _fused_flag(op, poisoned, g, 16) == _flag(poisoned, g) == 1, (t, l)
    poisoned = g.clone()
    poisoned[0, int(rng.integers(T))] = float("nan")
    assert _fused_flag(op, lam, poisoned, 16) == 1


@pytest.mark.interpreter
@pytest.mark.parametrize("op", ["attention", "matmul", "gated_delta"])
def test_output_kernels_validate_broadcast_batches_and_value_tiles(op):
    """Scales and decays broadcast against the operands' batch (stride 0), and several value tiles
    (only the first checks): the last entry of the last batch element is found, the unread
    entries of a wider ``L`` never are."""
    T = 20
    L = fenwick.num_levels(T) + 3
    lam = poison_unread(torch.rand(1, 2, T, L, dtype=torch.float64))
    g = -torch.rand(2, 1, T, dtype=torch.float64)
    D = 130 if op == "matmul" else 80
    assert _fused_flag(op, lam, g, 16, D, (2, 2)) == 0
    poisoned = lam.clone()
    poisoned[0, 1, T - 1, 0] = float("inf")
    assert _fused_flag(op, poisoned, g, 16, D, (2, 2)) == 1
    poisoned = g.clone()
    poisoned[1, 0, 0] = float("nan")
    assert _fused_flag(op, lam, poisoned, 16, D, (2, 2)) == 1


@pytest.mark.interpreter
@pytest.mark.parametrize("backend", ["triton", "chunked"])
def test_the_first_computation_checks_the_mask(backend):
    """A CUDA mask is checked by its first computation: inside the triton backend's forward kernels
    (gradients wanted or not), by the check kernel queued first on another backend; the verdict is
    reported by ``check()`` and by the next hodlr call.  (CPU tensors under the interpreter stand in
    for CUDA ones: the mask is marked unchecked by hand, as a CUDA mask is built.)"""
    T = 37
    lam = poison_unread(torch.rand(2, T, fenwick.num_levels(T), dtype=torch.float64))
    g = -torch.rand(2, T, dtype=torch.float64)
    q = torch.randn(2, T, 4, dtype=torch.float64)
    beta = torch.rand(2, T, dtype=torch.float64)
    calls = {
        "attention": lambda M: hodlr.attention(q, q, q, M, backend=backend),
        "attention, gradients": lambda M: hodlr.attention(q.requires_grad_(), q, q, M, backend=backend),
        "matmul": lambda M: hodlr.matmul(M, q, backend=backend),
        "gated_delta_attention": lambda M: hodlr.gated_delta_attention(q, q, q, beta, M, backend=backend),
    }
    for name, call in calls.items():
        bad = lam.clone()
        bad[1, 5, 0] = float("nan")
        for scales, fails in ((lam, False), (bad, True)):
            M = hodlr.LogLinearMask(scales, g, validate=False)
            M._unchecked = True
            call(M)
            assert not M._unchecked, name
            if fails:
                with pytest.raises(ValueError, match="found on the device by the first computation"):
                    M.check()
            else:
                M.check()
        M = hodlr.LogLinearMask(bad, g, validate=False)
        M._unchecked = True
        call(M)
        with pytest.raises(ValueError, match="holds NaN or inf"):
            hodlr.matmul(hodlr.LogLinearMask(lam, g), q)    # the next call reports it
        hodlr.matmul(hodlr.LogLinearMask(lam, g), q)        # once


@pytest.mark.interpreter
def test_mask_methods_check_an_unchecked_mask():
    T = 9
    lam = poison_unread(torch.rand(T, fenwick.num_levels(T), dtype=torch.float64))
    lam[4, 0] = float("inf")
    for compute in (lambda M: M.to_dense(), lambda M: M.to_sparse(), lambda M: M.to_hodlr(), lambda M: M.check(),
                    lambda M: M.block_factors(1), hodlr.HODLRMatrix.from_mask, hodlr.sparse.mask_to_sparse):
        M = hodlr.LogLinearMask(lam, validate=False)
        M._unchecked = True
        with pytest.raises(ValueError, match="holds NaN or inf"):
            compute(M)
            M.check()


@pytest.mark.parametrize("unchecked", [False, pytest.param(True, marks=pytest.mark.interpreter)])
def test_each_public_call_reports_once(monkeypatch, unchecked):
    """``matmul``, ``attention``, ``gated_delta_attention`` and ``gated_delta_matrix`` report the
    deferred checks exactly once per call, on every backend that runs here (the recursive one
    builds no mask of its own), with the mask's check kernel or the triton forward's flag queued
    (``unchecked``) and on the early return of an empty result (``D = 0``)."""
    from hodlr import _deferred
    from hodlr import backends as registry

    reports, report = [], _deferred.report

    def counted(*args):
        reports.append(args)
        return report(*args)

    monkeypatch.setattr(_deferred, "report", counted)
    T = 37
    lam = torch.rand(2, T, fenwick.num_levels(T), dtype=torch.float64)
    g = -torch.rand(2, T, dtype=torch.float64)
    beta = torch.rand(2, T, dtype=torch.float64)
    ops = {
        "matmul": lambda M, x, backend: hodlr.matmul(M, x, backend=backend),
        "attention": lambda M, x, backend: hodlr.attention(x, x, x, M, backend=backend),
        "gated_delta_attention": lambda M, x, backend: hodlr.gated_delta_attention(x, x, x, beta, M, backend=backend),
    }
    ran = set()
    for op, call in ops.items():
        for name in registry.NAMES:
            module = registry.load(name)
            if not registry.offers(module, op) or module.unavailable_reason("torch", "cpu") is not None:
                continue
            for D in (4, 0):
                M = hodlr.LogLinearMask(lam, g, validate=not unchecked)
                M._unchecked = unchecked
                reports.clear()
                call(M, torch.randn(2, T, D, dtype=torch.float64), name)
                assert len(reports) == 1, (op, name, D, reports)
                ran.add(name)
    assert {"dense", "recursive", "fenwick", "chunked"} <= ran, ran
    M = hodlr.LogLinearMask(lam, g, validate=not unchecked)
    M._unchecked = unchecked
    reports.clear()
    hodlr.gated_delta_matrix(torch.randn(2, T, 4, dtype=torch.float64), torch.randn(2, T, 4, dtype=torch.float64),
                             beta, M)
    assert len(reports) == 1, reports


@pytest.mark.interpreter
def test_a_check_that_fails_to_queue_leaves_the_mask_unchecked(monkeypatch):
    from hodlr import mask as mask_module

    T = 9
    lam = torch.rand(T, fenwick.num_levels(T), dtype=torch.float64)
    lam[3, 0] = float("nan")
    M = hodlr.LogLinearMask(lam, validate=False)
    M._unchecked = True

    def broken(*args):
        raise RuntimeError("launch failed")

    monkeypatch.setattr(mask_module, "_device_check", broken)
    with pytest.raises(RuntimeError, match="launch failed"):
        M.check()
    monkeypatch.undo()
    with pytest.raises(ValueError, match="holds NaN or inf"):
        M.check()


@pytest.mark.interpreter
def test_empty_broadcast_batch_has_nothing_to_check():
    T = 5
    lam = torch.full((1, T, fenwick.num_levels(T)), float("nan"))
    assert _flag(lam, torch.zeros(0, T)) == 0


def test_check_flag_refused():
    x = torch.ones(2, 8, 4)
    lam = torch.ones(2, 8, fenwick.num_levels(8))
    for flag, what in ((torch.zeros(2, dtype=torch.int32), "shape"), (torch.zeros(1), "float32"), ([0], "list")):
        with pytest.raises(TypeError, match=f"check must be None or a one-element torch.int32 tensor.*{what}"):
            kernels.matmul_forward(lam, None, x, check=flag)


@pytest.mark.gpu
def test_gpu_mask_validation_is_deferred_and_reported():
    T = 4097
    lam = poison_unread(torch.rand(2, T, fenwick.num_levels(T), device="cuda"))
    g = -torch.rand(2, T, device="cuda")
    ok = hodlr.LogLinearMask(lam, g)
    ok.check()                                    # queues the check kernel, waits, nothing raised
    bad = lam.clone()
    bad[1, 5, 0] = float("nan")
    M = hodlr.LogLinearMask(bad)                  # returns at once, nothing queued
    with pytest.raises(ValueError, match="level_scales must be finite where they are read"):
        M.check()
    x = torch.rand(2, T, 8, device="cuda")
    beta = torch.rand(2, T, device="cuda")
    calls = {
        "attention": lambda M: hodlr.attention(x, x, x, M, backend="triton"),
        "attention, gradients": lambda M: hodlr.attention(x.clone().requires_grad_(), x, x, M, backend="triton"),
        "matmul": lambda M: hodlr.matmul(M, x, backend="triton"),
        "gated_delta_attention": lambda M: hodlr.gated_delta_attention(x, x, x, beta, M, backend="triton"),
        "chunked": lambda M: hodlr.attention(x, x, x, M, backend="chunked"),
    }
    for name, call in calls.items():
        call(hodlr.LogLinearMask(lam.clone().index_fill_(1, torch.tensor([6], device="cuda"), float("inf")), g))
        torch.cuda.synchronize()
        with pytest.raises(ValueError, match="holds NaN or inf"):
            hodlr.matmul(ok, x)                   # the next hodlr call reports it
        hodlr.matmul(ok, x)                       # reported once


@pytest.mark.gpu
def test_gpu_attention_validates_without_a_kernel_of_its_own():
    """On the triton backend the forward's output kernel checks the mask: no check kernel runs."""
    T = 2048
    lam = torch.rand(4, T, fenwick.num_levels(T), device="cuda")
    x = torch.rand(4, T, 64, device="cuda", dtype=torch.bfloat16)
    hodlr.attention(x, x, x, hodlr.LogLinearMask(lam, -torch.rand(4, T, device="cuda")), backend="triton")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        M = hodlr.LogLinearMask(lam, -torch.rand(4, T, device="cuda"))
        hodlr.attention(x, x, x, M, backend="triton")
        M.check()
    names = {e.name for e in prof.events()}
    assert any("_output_kernel" in n for n in names) and not any("_nonfinite_kernel" in n for n in names), names


@pytest.mark.gpu
def test_gpu_masks_used_in_a_graph_capture_are_checked_later():
    T = 1000
    lam = torch.rand(2, T, fenwick.num_levels(T), device="cuda")
    x = torch.rand(2, T, 16, device="cuda")
    hodlr.attention(x, x, x, hodlr.LogLinearMask(lam), backend="triton")   # compiled before the capture
    bad = lam.clone()
    bad[0, 3, 0] = float("nan")
    M = hodlr.LogLinearMask(bad)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        hodlr.attention(x, x, x, M, backend="triton")
    graph.replay()
    with pytest.raises(ValueError, match="holds NaN or inf"):
        M.check()                                 # checked by its first use outside the capture


@pytest.mark.gpu
def test_gpu_level_scales_with_rows_past_int32_offsets():
    """Level scales sliced from a wide tensor: ``(T - 1) * row stride`` passes ``2**31``.  The output
    kernels read and check them at 64-bit offsets (same results as a contiguous copy)."""
    T = 65536
    wide = torch.rand(T, 32800, device="cuda")
    lam = wide[:, : fenwick.num_levels(T)]
    x, beta = torch.rand(T, 16, device="cuda"), torch.rand(T, device="cuda")
    calls = (lambda l, f: kernels.matmul_forward(l, None, x, check=f),
             lambda l, f: kernels.attention_forward(x, x, x, l, None, 1.0, check=f),
             lambda l, f: kernels.gated_delta_forward(x, torch.nn.functional.normalize(x, dim=-1), x, beta, l, None,
                                                      1.0, check=f))
    for call in calls:
        flag = torch.zeros(1, dtype=torch.int32, device="cuda")
        assert torch.equal(call(lam, flag), call(lam.contiguous(), None)) and int(flag[0]) == 0
    lam[T - 1, 0] = float("nan")
    for call in calls:
        flag = torch.zeros(1, dtype=torch.int32, device="cuda")
        call(lam, flag)
        assert int(flag[0]) == 1


@pytest.mark.interpreter
def test_a_mask_found_bad_is_refused_at_every_later_use():
    """Once its device check has failed, the mask raises at every ``check()`` and every later
    computation (not only at the first report), and the other hodlr calls report it once."""
    T = 9
    lam = poison_unread(torch.rand(T, fenwick.num_levels(T), dtype=torch.float64))
    lam[4, 0] = float("nan")
    x = torch.ones(T, 1, dtype=torch.float64)
    M = hodlr.LogLinearMask(lam, validate=False)
    M._unchecked = True
    for use in (M.check, M.check, lambda: hodlr.matmul(M, x, backend="chunked"), M.to_dense,
                lambda: hodlr.attention(x, x, x, M, backend="triton"), M.check):
        with pytest.raises(ValueError, match="holds NaN or inf"):
            use()
    good = hodlr.LogLinearMask(torch.ones(T, fenwick.num_levels(T), dtype=torch.float64))
    hodlr.matmul(good, x)  # reported already: other masks compute
