"""``hodlr bench-hattention`` on the CPU without hattention: the code path runs, hodlr is timed and
checked, hattention's import error is recorded (the GPU run with hattention records the real figures)."""

import json
import sys

import pytest

from hodlr import cli


@pytest.fixture
def bench_hattention(monkeypatch):
    """The module, with hattention made unimportable even where it is installed."""
    pytest.importorskip("torch")
    from hodlr import bench_hattention

    monkeypatch.setitem(sys.modules, "hattention", None)
    return bench_hattention


@pytest.mark.interpreter
def test_code_path_on_cpu_without_hattention(bench_hattention, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out, png = tmp_path / "hatt.json", tmp_path / "hatt.png"
    assert bench_hattention.main(["--device", "cpu", "-T", "32", "--widths", "16", "--model-width", "32",
                                  "--tokens", "64", "--accuracy", "32", "--profile", "--commit", "abc123",
                                  "--json", str(out), "--png", str(png)]) == 0
    res = json.loads(out.read_text())
    assert res["commit"] == "abc123" and res["dtype"] == "float32" and res["hatt_levels"] == 6
    assert "hattention" in res["hatt_import_error"] and "hatt_fixes" not in res
    (row,) = res["rows"]
    assert (row["D"], row["H"], row["T"], row["B"]) == (16, 2, 32, 2)
    assert row["hodlr_fwd"] > 0 and row["hodlr_fwdbwd"] > 0 and row["hodlr_kernels_fwdbwd"]
    assert not [key for key in row if key.startswith("hatt") or key.endswith("_error")], row
    (acc,) = res["accuracy"]
    assert (acc["T"], acc["B"], acc["H"], acc["D"], acc["dtype"]) == (32, 1, 2, 64, "float32")
    assert all(acc["hodlr_" + key] < 1e-5 for key in ("o", "dq", "dk", "dv", "dg", "dbeta", "dlam")), acc
    assert not [key for key in acc if key.startswith("hatt") or key.endswith("error")], acc
    assert png.read_bytes().startswith(b"\x89PNG")
    assert "hattention unavailable" in capsys.readouterr().out


def test_no_backward_and_no_accuracy(bench_hattention, tmp_path):
    out = tmp_path / "hatt.json"
    assert bench_hattention.main(["--device", "cpu", "-T", "16", "--widths", "8", "--model-width", "8",
                                  "--tokens", "16", "--accuracy", "--no-bwd", "--json", str(out), "--png", ""]) == 0
    res = json.loads(out.read_text())
    (row,) = res["rows"]
    assert res["accuracy"] == [] and row["hodlr_fwd"] > 0 and "hodlr_fwdbwd" not in row


def test_no_backward_checks_outputs_only(bench_hattention, tmp_path, monkeypatch):
    """``--no-bwd`` drops the gradients from the accuracy check too; a CPU run leaves the caller's
    ``TRITON_INTERPRET`` as it found it."""
    import os

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    out = tmp_path / "hatt.json"
    assert bench_hattention.main(["--device", "cpu", "-T", "16", "--widths", "8", "--model-width", "8",
                                  "--tokens", "16", "--accuracy", "32", "--no-bwd", "--json", str(out),
                                  "--png", ""]) == 0
    assert "TRITON_INTERPRET" not in os.environ
    (acc,) = json.loads(out.read_text())["accuracy"]
    assert acc["hodlr_o"] < 1e-5 and not [key for key in acc if key.startswith("hodlr_d")], acc


def test_level_table_is_fenwick_level(bench_hattention):
    """The vectorised table given to hattention: ``bit_length(t ^ s)`` below the diagonal, 0 on and
    above it, the same with rows built in several blocks."""
    import numpy as np
    import torch

    from hodlr import fenwick

    T = 77
    want = np.maximum(fenwick.level_matrix(T), 0)
    for block in (4096, 10):
        got = bench_hattention._levels_matrix_fast(torch, T, torch.device("cpu"), block=block)
        assert got.dtype == torch.int32 and np.array_equal(got.numpy(), np.tril(want, -1))


def test_padded_level_scales(bench_hattention):
    import torch

    lev = torch.rand(2, 5, 3, 4).transpose(1, 2)
    assert bench_hattention._pad_levels(torch, lev, None).is_contiguous()
    padded = bench_hattention._pad_levels(torch, lev, 6)
    assert padded.shape == (2, 3, 5, 6) and torch.equal(padded[..., :4], lev) and bool((padded[..., 4:] == 1).all())
    assert torch.equal(bench_hattention._pad_levels(torch, lev, 3), lev)


def test_dv_local_adapter_maps_the_old_keywords(bench_hattention):
    """The older fla's ``offsets`` / ``indices`` go to ``cu_seqlens`` / ``chunk_indices``, the new
    ``g_gamma`` and ``A`` are None; the head-first layout is refused by name."""
    calls = []

    class Kernel:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: calls.append((grid, args, kwargs))

    launch = bench_hattention._DvLocalAdapter(Kernel())[(3, 4)]
    launch(1, 2, offsets="cu", indices="idx", BT=64)
    assert calls == [((3, 4), (1, 2), {"g_gamma": None, "A": None, "cu_seqlens": "cu", "chunk_indices": "idx",
                                       "BT": 64})]
    with pytest.raises(NotImplementedError, match="HEAD_FIRST"):
        launch(HEAD_FIRST=True)


def test_autotune_cache_is_set_for_the_run_only(bench_hattention, tmp_path, monkeypatch):
    """``--autotune-cache DIR``: Triton's autotuning cache is on and in ``DIR`` while the run
    imports and calls hattention, and the caller's environment is restored afterwards."""
    import os

    monkeypatch.setenv("TRITON_CACHE_DIR", "/somewhere/else")
    monkeypatch.delenv("TRITON_CACHE_AUTOTUNING", raising=False)
    seen = {}

    def run(args):
        seen.update({name: os.environ.get(name) for name in ("TRITON_CACHE_AUTOTUNING", "TRITON_CACHE_DIR")})
        return {"rows": [], "accuracy": []}

    monkeypatch.setattr(bench_hattention, "run", run)
    cache = tmp_path / "tune"
    assert bench_hattention.main(["--device", "cpu", "--autotune-cache", str(cache), "--json", "", "--png", ""]) == 0
    assert seen == {"TRITON_CACHE_AUTOTUNING": "1", "TRITON_CACHE_DIR": str(cache)} and cache.is_dir()
    assert os.environ["TRITON_CACHE_DIR"] == "/somewhere/else" and "TRITON_CACHE_AUTOTUNING" not in os.environ


@pytest.mark.parametrize("argv, message", [
    (["-T", "0"], "argument --lengths/-T: expected a positive integer, got 0"),
    (["--widths", "16", "-4"], "argument --widths: expected a positive integer, got -4"),
    (["--accuracy", "0"], "argument --accuracy: expected a positive integer, got 0"),
    (["--dtype", "float16"], "--dtype: invalid choice"),
    (["--hatt-blocks", "64"], "--hatt-blocks: want BKxBV with two positive integers, e.g. 64x64; got '64'"),
    (["--hatt-blocks", "64x0"], "got '64x0'"),
])
def test_bad_arguments_are_named(capsys, argv, message):
    from hodlr import bench_hattention

    with pytest.raises(SystemExit) as err:
        bench_hattention.main(["--device", "cpu"] + argv)
    assert err.value.code == 2 and message in capsys.readouterr().err


def test_help_through_the_cli(capsys):
    with pytest.raises(SystemExit) as err:
        cli.main(["bench-hattention", "--help"])
    out = capsys.readouterr().out
    assert err.value.code == 0
    assert "hodlr bench-hattention" in out and "--hatt-levels" in out and "--no-bwd" in out and "--png" in out
    assert "--autotune-cache" in out and "--hatt-blocks" in out


def test_host_autotuners_tune_in_memory(bench_hattention, monkeypatch):
    """Autotuners over host functions (hattention's own decorator) are kept off Triton's disk cache,
    which needs a JITFunction to hash; those over Triton kernels keep it."""
    import types

    triton = pytest.importorskip("triton")
    from triton.runtime.autotuner import Autotuner

    class Host:  # hattention's RunnableFunction: a plain function behind .fn
        def __init__(self, fn):
            self.fn = fn

    def host(x, block):
        return x

    @triton.jit
    def kernel(x, BLOCK: triton.language.constexpr):
        pass

    configs = [triton.Config({"block": 1})]
    over_host = Autotuner(Host(host), ["x", "block"], configs, ["x"], None, None)
    over_kernel = Autotuner(kernel, ["x", "BLOCK"], configs, ["x"], None, None)
    for tuner in (over_host, over_kernel):
        tuner.cache_results = True

    def decorated(*args):  # the decorator's closure holds the autotuner
        return over_host.run(*args)

    module = types.ModuleType("hattention_test_module")
    module.decorated, module.kernel = decorated, over_kernel
    monkeypatch.setitem(sys.modules, "hattention_test_module", module)
    assert bench_hattention._host_autotuners_in_memory() == 1
    assert over_host.cache_results is False and over_kernel.cache_results is True


def _host_autotuner_module(monkeypatch, configs):
    """A module like hattention's: a host function behind an ``Autotuner`` (reached through the
    decorator's closure) with ``configs``, and an autotuned Triton kernel; returns both autotuners."""
    import types

    triton = pytest.importorskip("triton")
    from triton.runtime.autotuner import Autotuner

    class Host:  # hattention's RunnableFunction: a plain function behind .fn
        def __init__(self, fn):
            self.fn = fn

    def chunkwise_bwd(x, block_size_K, block_size_V):
        return x

    @triton.jit
    def kernel(x, BLOCK: triton.language.constexpr):
        pass

    over_host = Autotuner(Host(chunkwise_bwd), ["x", "block_size_K", "block_size_V"], configs, ["x"], None, None)
    over_kernel = Autotuner(kernel, ["x", "BLOCK"], [triton.Config({"BLOCK": 16}), triton.Config({"BLOCK": 32})],
                            ["x"], None, None)

    def decorated(*args):  # the decorator's closure holds the autotuner
        return over_host.run(*args)

    module = types.ModuleType("hattention_blocks_module")
    module.decorated, module.kernel = decorated, over_kernel
    monkeypatch.setitem(sys.modules, "hattention_blocks_module", module)
    return over_host, over_kernel


def test_hatt_blocks_keep_the_named_pairs(bench_hattention, monkeypatch):
    """``--hatt-blocks``: the host-level autotuners over (block_size_K, block_size_V) keep the named
    pairs only; autotuners over Triton kernels are left alone."""
    triton = pytest.importorskip("triton")
    pairs = [(bk, bv) for bk in (32, 64) for bv in (32, 64)]
    configs = [triton.Config({"block_size_K": bk, "block_size_V": bv}) for bk, bv in pairs]
    over_host, over_kernel = _host_autotuner_module(monkeypatch, configs)
    kept = bench_hattention._block_configs({(64, 64), (32, 64), (128, 128)})
    assert list(kept.values()) == [[(32, 64), (64, 64)]] and "chunkwise_bwd" in next(iter(kept))
    assert [bench_hattention._block_pair(c) for c in over_host.configs] == [(32, 64), (64, 64)]
    assert len(over_kernel.configs) == 2


def test_hatt_blocks_none_offered_is_named(bench_hattention, monkeypatch):
    triton = pytest.importorskip("triton")
    over_host, _ = _host_autotuner_module(monkeypatch, [triton.Config({"block_size_K": 32, "block_size_V": 32})])
    with pytest.raises(ValueError, match=r"--hatt-blocks: .*chunkwise_bwd offers \(BK, BV\) in \[\(32, 32\)\], "
                                         r"got \[\(64, 64\)\]"):
        bench_hattention._block_configs({(64, 64)})
    assert len(over_host.configs) == 1


def test_hatt_blocks_not_offered_is_a_usage_error(bench_hattention, monkeypatch, capsys):
    """A pair hattention does not offer ends the run as a usage error (exit 2) that names it."""
    def run(args):
        assert args.hatt_blocks == [(16, 16)]
        raise bench_hattention.BlocksNotOffered("--hatt-blocks: f offers (BK, BV) in [(32, 32)], got [(16, 16)]")

    monkeypatch.setattr(bench_hattention, "run", run)
    with pytest.raises(SystemExit) as err:
        bench_hattention.main(["--device", "cpu", "--hatt-blocks", "16x16", "--json", "", "--png", ""])
    assert err.value.code == 2 and "got [(16, 16)]" in capsys.readouterr().err
