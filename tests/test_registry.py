"""The backend registry says the truth: which operations a backend offers, where it can run
on this machine (torch only where torch is installed, CUDA only where a device exists), and
whether the Triton kernels run in the interpreter (decided once, when ``hodlr.kernels`` is
imported)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import hodlr
from hodlr import backends as registry, cli
from hodlr.errors import BackendUnavailableError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(hodlr.__file__)))
HAS_TRITON = importlib.util.find_spec("torch") is not None and importlib.util.find_spec("triton") is not None


def _python(code: str, **env_changes) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in env_changes}
    env.update({k: v for k, v in env_changes.items() if v is not None})
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=300, env=env)


# -- operations --------------------------------------------------------------------------------
def test_get_needs_a_known_op_the_backend_offers(monkeypatch):
    assert registry.get("dense", "numpy", "cpu", op="attention") is registry.load("dense")
    with pytest.raises(TypeError):
        registry.get("dense", "numpy", "cpu")  # the operation is not optional
    with pytest.raises(ValueError, match="op must be one of matmul, attention"):
        registry.get("dense", "numpy", "cpu", op="softmax")
    recursive = registry.load("recursive")
    monkeypatch.delattr(recursive, "attention")
    assert not registry.offers(recursive, "attention") and registry.offers(recursive, "matmul")
    with pytest.raises(BackendUnavailableError, match="backend 'recursive' does not offer attention; backends that do: "
                                                      "dense, sparse, fenwick, chunked, triton"):
        registry.get("recursive", "numpy", "cpu", op="attention")
    T = 300
    M = hodlr.LogLinearMask(np.ones((T, hodlr.num_levels(T))))
    q = np.ones((T, 1))
    with pytest.raises(BackendUnavailableError, match="does not offer attention"):
        hodlr.attention(q, q, q, M, backend="recursive")
    # auto skips a backend that lacks the operation (T > 256 on numpy: recursive, then fenwick)
    assert registry.auto_backend("numpy", "cpu", T, op="matmul") == "recursive"
    assert registry.auto_backend("numpy", "cpu", T, op="attention") == "fenwick"
    np.testing.assert_allclose(hodlr.attention(q, q, q, M), np.arange(1, T + 1)[:, None])
    info = registry.info()
    assert set(info["recursive"]["ops"]) == {"matmul"} and "attention" in info["dense"]["ops"]


@pytest.mark.skipif(not HAS_TRITON, reason="needs torch and triton")
def test_auto_passes_over_kernels_too_narrow_for_the_keys(monkeypatch):
    """On a GPU ``auto`` runs Gated DeltaNet with keys wider than the kernels take (``Dk > 128``,
    the default ``LogLinearGatedDeltaNet`` layer's 256) on ``chunked``, at every entry point; the
    attention kernels take any width."""
    import torch

    from hodlr import ops
    from hodlr.kernels.gated_delta import MAX_DK

    triton_backend = registry.load("triton")
    monkeypatch.setattr(triton_backend, "unavailable_reason", lambda library, device: None)  # as on a GPU
    cuda = torch.device("cuda")
    assert triton_backend.max_key_width("gated_delta_attention") == MAX_DK == 128
    assert triton_backend.max_key_width("attention") is None
    for width, expected in ((64, "triton"), (128, "triton"), (129, "chunked"), (256, "chunked")):
        assert registry.auto_backend("torch", cuda, 4096, op="gated_delta_attention", key_width=width) == expected
        assert ops._resolve_gated_delta("auto", cuda, False, width) is registry.load(expected)
        assert registry.auto_backend("torch", cuda, 4096, op="attention", key_width=width) == "triton"
    assert ops._resolve_gated_delta("auto", cuda, True, 64) is registry.load("chunked")  # a state: chunked
    assert ops._resolve_gated_delta("triton", cuda, False, 256) is triton_backend  # asked for: its own error
    T = 8
    M = hodlr.LogLinearMask(torch.ones(T, hodlr.num_levels(T), dtype=torch.float64))
    q = torch.ones(T, MAX_DK + 1, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"take Dk <= 128, got Dk=129 \(use the 'chunked' backend"):
        hodlr.gated_delta_attention(q, q, torch.ones(T, 2, dtype=torch.float64), torch.zeros(T, dtype=torch.float64),
                                    M, backend="triton")


def test_auto_passes_over_kernels_for_float64_on_a_gpu(monkeypatch):
    """On a GPU the Triton kernels take float16 / bfloat16 / float32 (float64 only under the
    interpreter): ``auto`` runs float64 calls on ``chunked`` at every entry point, and the
    decoding steps on the torch form."""
    import torch

    from hodlr import kernels, ops

    triton_backend = registry.load("triton")
    monkeypatch.setattr(triton_backend, "unavailable_reason", lambda library, device: None)  # as on a GPU
    monkeypatch.setattr(kernels, "interpreting", lambda: False)
    cuda = torch.device("cuda")
    assert registry.takes_dtype(triton_backend, torch.float32) and not registry.takes_dtype(triton_backend,
                                                                                            torch.float64)
    assert registry.takes_dtype(registry.load("chunked"), torch.float64) and registry.takes_dtype(triton_backend, None)
    for op in ("matmul", "attention", "gated_delta_attention"):
        assert registry.auto_backend("torch", cuda, 4096, op=op, dtype=torch.float32) == "triton"
        assert registry.auto_backend("torch", cuda, 4096, op=op, dtype=torch.float64) == "chunked"
    assert ops._resolve("auto", cuda, 4096, False, dtype=torch.float64) is registry.load("chunked")
    assert ops._resolve("auto", cuda, 4096, True, dtype=torch.float64) is registry.load("chunked")
    assert ops._resolve("auto", cuda, 4096, True, dtype=torch.bfloat16) is triton_backend
    assert ops._resolve_gated_delta("auto", cuda, False, 64, dtype=torch.float64) is registry.load("chunked")
    assert ops._resolve_gated_delta("auto", cuda, True, 64, True, torch.float16) is triton_backend
    assert not ops._kernels_on(cuda, torch.float64) and ops._kernels_on(cuda, torch.float32)


def test_backends_declare_state_keywords():
    """``GATED_DELTA_STATE`` says which ``gated_delta_attention`` takes ``state``, ``position``,
    ``final_state`` (what :func:`hodlr.log_linear_gated_delta_rule` hands off through)."""
    import inspect

    for name in registry.NAMES:
        module = registry.load(name)
        if registry.offers(module, "gated_delta_attention"):
            takes = "state" in inspect.signature(module.gated_delta_attention).parameters
            assert getattr(module, "GATED_DELTA_STATE", False) == takes, name
    assert registry.stateful("gated_delta_attention") == ["fenwick", "chunked"]
    assert registry.stateful("attention") == [n for n in registry.NAMES if registry.has_state(registry.load(n))]


def test_missing_backend_module_is_an_error(monkeypatch):
    """No "not implemented" answer: a registered name without its module fails loudly."""
    monkeypatch.setattr(registry, "NAMES", registry.NAMES + ("absent",))
    with pytest.raises(ModuleNotFoundError, match="hodlr.backends.absent"):
        registry.info()
    with pytest.raises(ModuleNotFoundError):
        registry.get("absent", "numpy", "cpu", op="matmul")


# -- where backends run ------------------------------------------------------------------------
@pytest.mark.parametrize("cuda", [False, True])
def test_info_claims_cuda_only_where_a_device_exists(monkeypatch, cuda):
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    info = hodlr.backend_info()
    for name, entry in info.items():
        for op, where in entry["ops"].items():
            if cuda:
                want = registry.load(name).unavailable_reason("torch", "cuda")
                assert where["torch_cuda"] == (True if want is None else want), (name, op)
            else:
                assert where["torch_cuda"] == "no CUDA device here (torch.cuda.is_available() is False)", (name, op)
    assert (info["dense"]["ops"]["matmul"]["torch_cuda"] is True) == cuda


BLOCK_TORCH = """
        import importlib.abc, sys

        class HideTorch(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "triton"):
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)
                return None

        sys.meta_path.insert(0, HideTorch())
"""


def test_without_torch_no_torch_backend_is_claimed():
    """With torch hidden, ``hodlr backends`` says no for every torch place (torch is not
    installed), yes for numpy where the backend runs on numpy; ``verify`` of a torch-only
    backend runs nothing and exits 1."""
    out = _python(BLOCK_TORCH + """
        import hodlr
        from hodlr import cli
        info = hodlr.backend_info()
        for name, entry in info.items():
            for where in entry["ops"].values():
                assert where["torch_cpu"] == where["torch_cuda"] == "torch is not installed (pip install torch)", name
        assert info["dense"]["ops"]["matmul"]["numpy"] is True and info["chunked"]["ops"]["matmul"]["numpy"] != True
        assert cli.main(["backends"]) == 0
        print("verify exit", cli.main(["verify", "--length", "9", "--backends", "chunked", "--ops", "matmul"]))
        assert "torch" not in sys.modules
    """, TRITON_INTERPRET=None)
    assert out.returncode == 0, out.stdout + out.stderr
    table = out.stdout.split("\n\n")[0].splitlines()[2:]
    assert table and all(row.split()[-4:] == ["no", "(1)", "no", "(1)"] for row in table), table
    assert "(1) torch is not installed (pip install torch)" in out.stdout
    assert "FAIL: none of the requested backends ran here" in out.stdout and "verify exit 1" in out.stdout


# -- one truth for "the interpreter is on" ------------------------------------------------------
@pytest.mark.skipif(not HAS_TRITON, reason="needs torch and triton")
def test_interpreter_set_after_the_kernels_were_defined_is_refused_with_the_reason():
    """``TRITON_INTERPRET=1`` set after ``hodlr.kernels`` was imported does not make the
    (GPU-compiled) kernels run on the CPU: the triton backend refuses CPU tensors with a
    BackendUnavailableError that says why, not an interpreter error."""
    out = _python("""
        import os, torch, hodlr
        from hodlr import kernels
        assert not kernels.interpreting()
        os.environ["TRITON_INTERPRET"] = "1"
        assert not kernels.interpreting()
        T = 5
        M = hodlr.LogLinearMask(torch.ones(T, hodlr.num_levels(T), dtype=torch.float64))
        try:
            hodlr.matmul(M, torch.ones(T, 2, dtype=torch.float64), backend="triton")
        except hodlr.BackendUnavailableError as err:
            print("refused:", err)
        info = hodlr.backend_info()["triton"]["ops"]["attention"]["torch_cpu"]
        print("info:", info)
    """, TRITON_INTERPRET=None)
    assert out.returncode == 0, out.stdout + out.stderr
    refused = out.stdout.split("refused: ")[1].splitlines()[0]
    assert "backend 'triton' cannot run on torch arrays on cpu" in refused
    assert "TRITON_INTERPRET=1 was set after hodlr.kernels was imported" in refused
    assert "compiled for the GPU" in refused and "before importing hodlr.kernels" in refused
    assert "TRITON_INTERPRET=1 was set after" in out.stdout.split("info: ")[1]


@pytest.mark.skipif(not HAS_TRITON, reason="needs torch and triton")
def test_interpreter_is_decided_when_the_kernels_are_defined():
    """With ``TRITON_INTERPRET=1`` at import, the kernels are interpreter functions for good:
    clearing the variable later changes nothing about them, and the triton backend then refuses
    (Triton's interpreter needs the variable while they run) until it is set again."""
    out = _python("""
        import os, torch, hodlr
        from hodlr import kernels
        assert kernels.interpreting()
        T = 5
        M = hodlr.LogLinearMask(torch.ones(T, hodlr.num_levels(T), dtype=torch.float64))
        x = torch.arange(T, dtype=torch.float64)[:, None]
        assert torch.equal(hodlr.matmul(M, x, backend="triton"), hodlr.matmul(M, x, backend="dense"))
        del os.environ["TRITON_INTERPRET"]
        assert kernels.interpreting()
        try:
            hodlr.matmul(M, x, backend="triton")
        except hodlr.BackendUnavailableError as err:
            print("refused:", err)
        os.environ["TRITON_INTERPRET"] = "1"
        assert torch.equal(hodlr.attention(x, x, x, M, backend="triton"), hodlr.attention(x, x, x, M, backend="dense"))
        print("ok")
    """, TRITON_INTERPRET="1")
    assert out.returncode == 0 and out.stdout.splitlines()[-1] == "ok", out.stdout + out.stderr
    assert "TRITON_INTERPRET was unset after hodlr.kernels was imported" in out.stdout


def test_cli_turns_the_interpreter_on_only_before_the_kernels_exist(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setitem(sys.modules, "hodlr.kernels", sys.modules.get("hodlr.kernels", object()))
    cli._interpret_triton_without_gpu()
    assert "TRITON_INTERPRET" not in os.environ


@pytest.mark.gpu
def test_float64_on_gpu_runs_under_auto():
    """float64 on a GPU: ``auto`` runs every operation (on ``chunked``) where the kernels would refuse."""
    import torch

    T, H, D = 40, 2, 4
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, T, H, D, device="cuda", dtype=torch.float64, generator=gen) for _ in range(3))
    k = torch.nn.functional.normalize(k, dim=-1)
    g = -torch.rand(1, T, H, device="cuda", dtype=torch.float64, generator=gen)
    beta = torch.rand(1, T, H, device="cuda", dtype=torch.float64, generator=gen)
    lam = torch.rand(1, T, H, hodlr.num_levels(T), device="cuda", dtype=torch.float64, generator=gen)
    for fn in (hodlr.log_linear_attn, hodlr.log_linear_gated_delta_rule):
        args = (q, k, v, g, lam) if fn is hodlr.log_linear_attn else (q, k, v, g, beta, lam)
        o, state = fn(*args, output_final_state=True)
        want, _ = fn(*args, output_final_state=True, backend="chunked")
        assert o.dtype == torch.float64 and torch.allclose(o, want)
    M = hodlr.LogLinearMask(lam[0, :, 0])
    assert hodlr.attention(q[0, :, 0], k[0, :, 0], v[0, :, 0], M).dtype == torch.float64


@pytest.mark.parametrize("layout", ["operator", "contiguous", "grouped", "broadcast"])
def test_row_padding_and_scattering_keep_the_memory_order(layout):
    """``pad_rows`` and ``scatter_rows`` equal ``F.pad`` and a zero tensor with rows assigned, for
    views of any layout (the ``(B, T, H, D)`` operator layout read as ``(N, H, T, D)``, grouped-head
    views, a broadcast dim), lay their result out in the input's memory order, and ``scatter_rows``
    passes gradients back to the rows it placed."""
    torch = pytest.importorskip("torch")
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(2, 7, 3, 4, generator=gen, dtype=torch.float64)
    x = {"operator": base.transpose(1, 2), "contiguous": base.transpose(1, 2).contiguous(),
         "grouped": base.transpose(1, 2).unsqueeze(2).expand(2, 3, 2, 7, 4),
         "broadcast": base[:1].transpose(1, 2).expand(2, 3, 7, 4)}[layout]
    dim = x.dim() - 2
    padded = registry.pad_rows(x, dim, 5)
    assert torch.equal(padded, torch.nn.functional.pad(x, (0, 0, 5, 0)))
    assert registry.pad_rows(x, dim, 0) is x
    if layout == "operator":  # the rows (H, D) stay whole: T outermost after the batch
        assert padded.stride(2) == 3 * 4 and padded.stride(1) == 4
    if layout == "grouped":  # the group's heads stay a broadcast (stride 0), the features contiguous
        assert padded.stride(2) == 0 and padded.stride(-1) == 1
    index = torch.tensor([9, 0, 4, 5, 1, 12, 7])
    leaf = x.detach().clone().requires_grad_(True)
    placed = registry.scatter_rows(leaf, dim, index, 13)
    want = torch.zeros(x.shape[:dim] + (13,) + x.shape[dim + 1:], dtype=x.dtype)
    want.index_copy_(dim, index, x)
    assert torch.equal(placed, want)
    w = torch.randn(placed.shape, generator=gen, dtype=torch.float64)
    (grad,) = torch.autograd.grad((placed * w).sum(), leaf)
    assert torch.equal(grad, w.index_select(dim, index))
