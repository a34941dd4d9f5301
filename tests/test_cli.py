"""The ``hodlr`` command line: demo, verify, show, backends and the bench hand-offs."""

import json
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


def run(capsys, *argv):
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_demo_runs_every_available_backend(capsys):
    """The newcomer command: no arguments, exit status 0, a row for every backend."""
    code, out, _ = run(capsys, "demo")
    assert code == 0, out
    assert "T=1000" in out and re.search(r"level\s+blocks\s+block size", out)
    assert "reference matmul: dense float64" in out
    assert "reference gated_delta_attention: float64 from the definition, every row" in out
    assert re.search(r"\nchunked +numpy +gated_delta_attention .* ok", out)
    for name in registry.NAMES:
        assert f"\n{name} " in out, f"no row for {name}"
    for name, entry in hodlr.backend_info().items():  # each operation an available backend offers: its own row ok
        for op, where in entry["ops"].items():
            for key, arrays in (("numpy", "numpy"), ("torch_cpu", "torch/cpu")):
                if where.get(key) is True:
                    assert re.search(rf"\n{name} +{re.escape(arrays)} +{op} +\S+ +\S+ +[0-9.]+ m?s +ok", out), \
                        f"no ok row for {name} {arrays} {op}"
    assert "OK: every backend that ran agrees" in out


def test_verify_small_with_row_reference(capsys):
    code, out, _ = run(capsys, "verify", "--length", "65", "--batch", "2,1", "--backends", "dense,recursive",
                       "--reference", "rows", "--rows", "5", "--dk", "3", "--dv", "2", "--decay", "strong",
                       "--arrays", "numpy", "--memory")
    assert code == 0, out
    assert "row by row, on" in out
    assert "torch/cpu" not in out and "peak traced" in out and "peak RSS" in out


def test_verify_exit_code_reflects_disagreement(capsys, monkeypatch):
    dense = registry.load("dense")
    monkeypatch.setattr(dense, "matmul", lambda lam, g, x: x * 1.0)
    code, out, _ = run(capsys, "verify", "--length", "33", "--backends", "dense", "--ops", "matmul")
    assert code == 1
    assert "DISAGREES" in out and "FAIL" in out


@pytest.mark.parametrize("error", [IndexError("boom"), ValueError("operands could not be broadcast together")],
                         ids=lambda e: type(e).__name__)
def test_verify_reports_unexpected_failures(capsys, monkeypatch, error):
    # verify builds valid inputs: a backend raising anything on them, a plain ValueError /
    # TypeError included, is a failure, not a refusal (only BackendUnavailableError,
    # DenseTooLargeError and float64 on the GPU are refusals)
    dense = registry.load("dense")

    def broken(lam, g, x):
        raise error

    monkeypatch.setattr(dense, "matmul", broken)
    code, out, _ = run(capsys, "verify", "--length", "9", "--backends", "dense", "--ops", "matmul")
    assert code == 1 and f"FAILED: {type(error).__name__}: {error}" in out


def test_row_reference_matches_dense():
    problem = cli.make_problem(40, (2,), 3, 2, 4, "strong", seed=1)
    rows = cli.sample_rows(40, 5)
    for op in cli.OPS:
        want = cli.dense_reference(problem, op)[..., rows, :]
        got = cli.row_reference(problem, op, rows)
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-300)


def test_interpreter_prefix_is_a_causal_prefix():
    """Rows < n of the output depend only on the first n positions (used for Triton under
    the interpreter)."""
    problem = cli.make_problem(100, (1,), 3, 2, 2, "mild", seed=2)
    for op in ("attention", "gated_delta_attention"):
        full = cli.dense_reference(problem, op)
        prefix = cli.dense_reference(problem.prefix(37), op)
        np.testing.assert_allclose(prefix, full[..., :37, :], rtol=1e-13, err_msg=op)


@pytest.mark.parametrize("decay", ["none", "mild", "strong", -0.3])
def test_gated_delta_reference_is_the_definition(decay):
    """The check's Gated DeltaNet reference (one sweep over the keys) equals the definition
    written out: ``P[t, s] = scale β_s q_tᵀ A_t ⋯ A_{s+1} k_s`` with the transitions multiplied
    as matrices, ``O = (P ⊙ Mλ) V`` with ``Mλ[t, s] = λ[t, level(t, s)]``; and the backends
    agree with it."""
    T, Dk = 13, 3
    p = cli.make_problem(T, (2,), 2, Dk, 4, decay, seed=3)
    k = p.unit_keys()
    np.testing.assert_allclose(np.linalg.norm(k, axis=-1), 1.0, rtol=1e-15)
    want = np.zeros(p.v.shape)
    for b in range(2):
        g = np.zeros(T) if p.g is None else p.g[b]
        A = [np.exp(g[u]) * (np.eye(Dk) - p.beta[b, u] * np.outer(k[b, u], k[b, u])) for u in range(T)]
        for t in range(T):
            chain = np.eye(Dk)  # A_t ⋯ A_{s+1}
            for s in range(t, -1, -1):
                P = p.scale * p.beta[b, s] * p.q[b, t] @ chain @ k[b, s]
                want[b, t] += p.lam[b, t, fenwick.level(t, s)] * P * p.v[b, s]
                chain = chain @ A[s]
    got = cli.dense_reference(p, "gated_delta_attention")
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)
    for rows in (np.array([0, 5, 12]), np.array([12, 0, 7, 5])):  # any order
        np.testing.assert_allclose(cli.row_reference(p, "gated_delta_attention", rows), want[:, rows], rtol=1e-12,
                                   atol=1e-14)
    M = hodlr.LogLinearMask(p.lam, p.g)
    for name in ("dense", "fenwick", "chunked"):
        out = hodlr.gated_delta_attention(p.q, k, p.v, p.beta, M, scale=p.scale, backend=name)
        np.testing.assert_allclose(np.asarray(out), want, rtol=1e-12, atol=1e-14, err_msg=name)


def test_verify_reports_a_wrong_gated_delta_backend(capsys, monkeypatch):
    dense = registry.load("dense")
    right = dense.gated_delta_attention
    monkeypatch.setattr(dense, "gated_delta_attention", lambda *a: 1.001 * right(*a))
    code, out, _ = run(capsys, "verify", "--length", "33", "--backends", "dense", "--ops", "gated_delta_attention")
    assert code == 1 and "DISAGREES" in out and "gated_delta_attention" in out


def test_references_only_for_offered_operations(capsys):
    """A backend that does not offer Gated DeltaNet costs no reference for it."""
    code, out, _ = run(capsys, "verify", "--length", "20", "--backends", "sparse", "--arrays", "numpy")
    assert code == 0, out
    assert "reference matmul" in out and "reference gated_delta_attention" not in out
    assert "not offered by this backend" in out


@pytest.mark.parametrize("reference", ["dense", "rows"])
def test_triton_interpreter_prefix(capsys, reference):
    if registry.load("triton").unavailable_reason("torch", "cpu") is not None:
        pytest.skip("triton cannot run on CPU tensors here (needs TRITON_INTERPRET=1)")
    code, out, _ = run(capsys, "verify", "--length", "70", "--backends", "triton", "--arrays", "torch",
                       "--interpreter-length", "33", "--reference", reference, "--rows", "4", "--dk", "2", "--dv", "3")
    assert code == 0, out
    assert out.count("Triton interpreter on the CPU, first 33 rows") == 3  # matmul, attention, gated delta


@pytest.mark.parametrize("T", [1, 2, 9, 64])
def test_show_grid(capsys, T):
    code, out, _ = run(capsys, "show", str(T))
    assert code == 0
    grid = [line.split() for line in out.splitlines()[1 : T + 1]]
    lev = fenwick.level_matrix(T)
    for t in range(T):
        assert grid[t] == ["." if lev[t, s] < 0 else cli.LEVEL_CHARS[lev[t, s]] for s in range(T)]


def test_show_large_prints_blocks_only(capsys):
    code, out, _ = run(capsys, "show", "1000000")
    assert code == 0
    assert "levels of the" not in out and "475,712 x 524,288" in out  # the top block: rows clipped to T


def test_show_prints_true_sizes_of_clipped_blocks(capsys):
    """The last block of a level is clipped by T: T = 5 has one level-3 block of 1 x 4 (rows 4,
    columns 0..3), T = 7 two level-2 blocks, the second 1 x 2."""
    table = {}
    for T in (5, 7):
        code, out, _ = run(capsys, "show", str(T))
        assert code == 0
        table[T] = {int(line.split()[0]): line.split(None, 2)[2] for line in out.splitlines()
                    if re.match(r"\s+\d+\s+\d+\s+\d", line)}
    assert table[5] == {1: "1 x 1", 2: "2 x 2", 3: "1 x 4"}
    assert table[7] == {1: "1 x 1", 2: "2 x 2, last 1 x 2", 3: "3 x 4"}


def test_show_png(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "m.png"
    code, out, _ = run(capsys, "show", "16", "--png", str(path))
    assert code == 0 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_show_describes_a_huge_length_without_its_memory(capsys):
    code, out, _ = run(capsys, "show", str(10**11))
    assert code == 0 and "34,359,738,368 x 34,359,738,368" in out


def test_show_png_unwritable_path(capsys, tmp_path):
    """A path that cannot be written is a usage error before anything is drawn; one that fails
    while the picture is saved is reported by name."""
    with pytest.raises(SystemExit) as info:
        cli.main(["show", "8", "--png", str(tmp_path / "missing" / "m.png")])
    out = capsys.readouterr()
    assert info.value.code == 2 and out.out == ""
    assert re.search(r"argument --png: expected a file path that can be written, got '.*/missing/m.png': the "
                     r"folder .*/missing does not exist", out.err), out.err
    plotting = pytest.importorskip("hodlr.plotting")

    def fail(T, path):
        raise OSError(28, "No space left on device")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(plotting, "save_structure_png", fail)
        with pytest.raises(SystemExit, match=r"hodlr show --png: cannot write .*m.png: No space left on device"):
            cli.main(["show", "8", "--png", str(tmp_path / "m.png")])


def test_show_png_without_matplotlib(capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(SystemExit, match="needs matplotlib"):
        cli.main(["show", "8", "--png", str(tmp_path / "m.png")])


def test_backends_table(capsys):
    code, out, _ = run(capsys, "backends")
    assert code == 0
    rows = {tuple(line.split()[:2]): line.split()[2:] for line in out.split("\n\n")[0].splitlines()[2:]}
    for name in registry.NAMES:
        assert (name, "matmul") in rows and (name, "attention") in rows, name
    assert rows["dense", "matmul"][:2] == ["yes", "yes"]
    cpu_only = {"triton": {"ops": {"matmul": {"numpy": "needs torch tensors", "torch_cuda": "no CUDA device here",
                                              "torch_cpu": "needs a CUDA device (or CPU tensors with TRITON_INTERPRET=1 "
                                                           "set before hodlr.kernels is imported)"}},
                           "description": "kernels"}}
    assert "demo, verify and the benchmarks' CPU runs set TRITON_INTERPRET=1 themselves" in cli.backends_table(cpu_only)


def test_bench_missing_module(capsys, monkeypatch):
    monkeypatch.setitem(cli.BENCHES, "bench", "hodlr.no_such_bench_module")
    code, _, err = run(capsys, "bench", "--anything")
    assert code == 2 and "is not part of this version" in err


def test_bench_hands_arguments_on(capsys, monkeypatch):
    seen = {}
    fake = type(sys)("hodlr_fake_bench")
    fake.main = lambda argv: seen.setdefault("argv", argv) and 0
    monkeypatch.setitem(sys.modules, "hodlr_fake_bench", fake)
    monkeypatch.setitem(cli.BENCHES, "bench-cpu", "hodlr_fake_bench")
    code, _, _ = run(capsys, "bench-cpu", "--lengths", "10", "--help-me")
    assert code == 0 and seen["argv"] == ["--lengths", "10", "--help-me"]


@pytest.mark.parametrize("argv, message", [
    (["verify", "--length", "0"], "positive integer"),
    (["verify", "--backends", "dense,nope"], "unknown backend"),
    (["verify", "--decay", "lots"], "decay must be one of"),
    (["verify", "--batch", "a,b"], "batch shape"),
    (["show", "-3"], "positive integer"),
    (["verify", "--arrays", "tpu"], "arrays must be"),
    (["verify", "--ops", "softmax"], "ops must be a comma-separated subset of matmul, attention, "
                                     "gated_delta_attention"),
    (["demo", "--batch", "0"], "batch sizes must be >= 1 (an empty batch checks nothing)"),
    (["verify", "--decay", "5"], "decay must be a finite log-decay <= 0"),
    (["verify", "--batch", "x"], "expected a batch shape such as 2 or 2,3 (or 2x3), got 'x'"),
    (["verify", "--batch", ",,"], "expected a batch shape"),
    (["verify", "--batch", ""], "expected a batch shape"),
    (["verify", "--batch", "2,x"], "expected a batch shape"),
])
def test_bad_arguments_exit_2(capsys, argv, message):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_run_time_refusals_are_one_line_errors(capsys, monkeypatch):
    """A dense reference over the memory budget is exit 2 with one line naming --reference (no
    traceback); Ctrl-C is exit 130 after the rows already printed; arrays that do not exist here
    are named as the reason."""
    monkeypatch.setattr(hodlr.options, "dense_max_bytes", 1000)
    code, out, err = run(capsys, "verify", "-T", "300", "--reference", "dense", "--backends", "sparse",
                         "--arrays", "numpy")
    assert code == 2 and "Traceback" not in err
    assert re.search(r"hodlr verify: error: --reference dense builds the whole T x T reference.*Use --reference "
                     r"rows", err)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "check", interrupted)
    code, out, err = run(capsys, "verify", "-T", "8")
    assert code == 130 and "hodlr verify: interrupted" in err
    monkeypatch.undo()
    if not torch_cuda_available():
        code, out, _ = run(capsys, "demo", "-T", "8", "--arrays", "cuda", "--backends", "chunked")
        assert code == 1 and "unavailable here: none of the arrays cuda exists on this machine" in out


def test_rows_print_as_they_finish(capsys):
    """The table's header comes before any backend runs and each row as soon as it is known."""
    lines = []
    problem = cli.make_problem(20, (1,), 2, 2, 2, "mild", 0)
    assert cli.check(problem, ["dense", "recursive"], ("matmul",), arrays=("numpy",), out=lines.append)
    assert lines[0].startswith("reference matmul") and lines[1].split()[:3] == ["backend", "arrays", "op"]
    assert [line.split()[0] for line in lines[3:5]] == ["dense", "recursive"] and lines[-1].startswith("OK:")


def torch_cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def test_no_command_prints_help(capsys):
    code, out, _ = run(capsys)
    assert code == 2 and "demo" in out


def test_python_dash_m():
    out = subprocess.run([sys.executable, "-m", "hodlr", "show", "4"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[1:5] == ["0 . . .", "1 0 . .", "2 2 0 .", "2 2 1 0"]


# -- README and CI ----------------------------------------------------------------------
ROOT = pathlib.Path(__file__).resolve().parents[1]


def readme_commands():
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Two commands\n\n```bash\n(.*?)```", text, re.S).group(1)
    return [line for line in block.splitlines() if line and not line.startswith("#")]


def test_readme_starts_with_the_two_commands():
    install_demo, install_test = readme_commands()
    assert install_demo == "python3 -m pip install -e '.[triton]' && hodlr demo"  # every backend: torch, triton too
    assert install_test.startswith("python3 -m pip install -e '.[test]' && python3 -m pytest")


def test_ci_runs_the_readme_test_command_and_fails_on_no_tests():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert readme_commands()[1] in ci
    assert ci.index("python3 -m pip install -q torch==2.13.0") < ci.index(readme_commands()[1])
    assert any('"$rc" -eq 5' in line for line in ci)


def test_readme_python_snippets_run(capsys):
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) >= 3
    for i, block in enumerate(blocks):
        exec(compile(block, f"README.md python block {i}", "exec"), {"__name__": "readme"})


def test_readme_backend_table_lists_every_backend():
    text = (ROOT / "README.md").read_text()
    listed = re.findall(r"^\| `(\w+)` \|", text, re.M)
    assert set(registry.NAMES) <= set(listed)


def test_readme_links_exist():
    text = (ROOT / "README.md").read_text()
    for link in re.findall(r"\]\((docs/[^)#]+)\)", text):
        assert (ROOT / link).exists(), link


def test_verify_still_reports_refusals_as_refusals(capsys, monkeypatch):
    dense = registry.load("dense")

    def unavailable(lam, g, x):
        raise hodlr.BackendUnavailableError("not here")

    monkeypatch.setattr(dense, "matmul", unavailable)
    code, out, _ = run(capsys, "verify", "--length", "9", "--backends", "dense,recursive", "--ops", "matmul")
    assert code == 0 and "refused: BackendUnavailableError: not here" in out and "FAILED" not in out


def test_verify_fails_when_no_requested_backend_ran(capsys, monkeypatch):
    """Nothing compared is not a pass: every requested backend refused or cannot run here."""
    monkeypatch.setattr(registry.load("dense"), "matmul", lambda lam, g, x: (_ for _ in ()).throw(
        hodlr.BackendUnavailableError("not here")))
    code, out, _ = run(capsys, "verify", "--length", "9", "--backends", "dense", "--ops", "matmul")
    assert code == 1 and "FAIL: none of the requested backends ran here" in out and "OK" not in out
    code, out, _ = run(capsys, "verify", "--length", "9", "--backends", "triton", "--arrays", "numpy")
    assert code == 1 and "unavailable here" in out and "FAIL: none of the requested backends ran here" in out


def test_demo_checks_triton_in_the_interpreter_without_a_gpu():
    """A fresh ``hodlr demo`` on a machine without CUDA turns the Triton interpreter on
    itself, so the kernels are checked (and their times labelled as not kernel speed)."""
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("with a GPU the demo runs triton on CUDA")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "hodlr", "demo", "--length", "70"], capture_output=True,
                         text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    rows = [line for line in out.stdout.splitlines() if line.startswith("triton")]
    assert len(rows) == 3 and all(" ok (Triton interpreter on the CPU" in row for row in rows), rows


def test_bench_cpu_prints_no_exponent_for_one_length(capsys, tmp_path):
    path = tmp_path / "bench.json"
    code, out, _ = run(capsys, "bench-cpu", "--lengths", "16", "--repeats", "1", "--backends", "recursive",
                       "--json", str(path))
    assert code == 0
    assert "nan" not in out.lower() and "growth exponent" not in out and "recursive: " in out
    assert json.loads(path.read_text())["summary"]["recursive"]["exponent_all"] is None
    code, out, _ = run(capsys, "bench-cpu", "--lengths", "16", "32", "--repeats", "1", "--backends", "recursive")
    assert code == 0 and "growth exponent" in out and "nan" not in out.lower()


@pytest.mark.interpreter
def test_bench_gated_delta_code_path_on_cpu(tmp_path):
    """``hodlr bench-gated-delta --device cpu`` (tiny sizes): the timing rows with their per-kernel
    split, the compiled call beside the eager one and the prefill, the accuracy row and the picture are written
    (the GPU run records the real figures)."""
    pytest.importorskip("torch")
    pytest.importorskip("matplotlib")
    from hodlr import bench_gated_delta

    out, png = tmp_path / "gd.json", tmp_path / "gd.png"
    assert bench_gated_delta.main(["--device", "cpu", "-T", "9", "--widths", "8", "--model-width", "16",
                                   "--tokens", "18", "--accuracy", "5", "--profile", "--compile", "--prefill", "--packed", "3", "--json",
                                   str(out), "--png", str(png)]) == 0
    res = json.loads(out.read_text())
    (row,) = res["rows"]
    assert (row["D"], row["H"], row["T"], row["B"]) == (8, 2, 9, 2) and row["fwd"] > 0 and row["fwdbwd_over_fwd"] > 0
    assert row["prefill"] > 0 and row["prefill_chunked"] > 0 and row["prefill_over_fwd"] > 0
    assert row["continued"] > 0 and row["continued_chunked"] > 0
    assert row["packed_sequences"] == 3 and all(row[k] > 0 for k in ("packed_fwd", "packed_fwdbwd", "looped_fwd",
                                                                      "looped_fwdbwd", "packed_prefill",
                                                                      "looped_prefill"))
    assert row["compiled_grads_equal"] is True and len(row["fwdbwd_compiled_runs"]) == 2
    assert row["fwd_compiled"] > 0 and row["fwdbwd_compiled_over_fwdbwd"] > 0
    for key in ("kernels_fwd", "kernels_fwdbwd"):
        assert row[key] and all(ms > 0 for ms in row[key].values()), key
    (acc,) = res["accuracy"]
    assert all(acc[key] < 2e-2 for key in ("o", "dq", "dk", "dv", "dg", "dbeta", "dlevel_scales", "o_unit_levels",
                                                   "o_unit_levels_no_decay"))
    assert png.read_bytes().startswith(b"\x89PNG")


def test_bench_table_gives_both_ratios():
    """``hodlr bench``'s table and printed row give forward + backward over forward eager and by
    graph replay (the GPU's own time), and "-" where a row has no figure."""
    from hodlr import bench

    row = {"D": 64, "H": 16, "T": 2048, "B": 32, "fwd": 0.8, "fwd_graph": 0.7, "fwdbwd": 2.4, "fwdbwd_graph": 2.1,
           "fwdbwd_over_fwd": 3.0, "fwdbwd_over_fwd_graph": 3.0}
    lines = bench.table({"rows": [row, {"D": 128, "H": 8, "T": 2048, "B": 32}]}).splitlines()
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    assert len(head) == len(cells) == 17 and head[10] == "fwd+bwd / fwd, graph" and cells[10] == "3.00"
    assert head[15:] == ["host, fwd ms", "host, fwd+bwd ms"] and cells[15:] == ["-", "-"]
    assert [c.strip() for c in lines[3].strip("|").split("|")][9:11] == ["-", "-"]
    assert "ratio 3.00 (graph 3.00)" in bench._format_row(row)


def test_bench_host_time_keeps_only_repeats_the_device_outlasted():
    """``hodlr bench``'s host time per call counts a repeat only if the device was still busy with
    its queued work when the host had issued every call (else the host waited), and refuses when
    none was (a stand-in for ``torch.cuda`` on the CPU)."""
    from types import SimpleNamespace

    from hodlr import bench

    busy = iter([True, False, True, True, False])
    cuda = SimpleNamespace(_sleep=lambda cycles: None, synchronize=lambda: None,
                           current_stream=lambda: SimpleNamespace(query=lambda: not next(busy)))
    calls = []
    assert bench.host_time(SimpleNamespace(cuda=cuda), lambda: calls.append(1), calls=3, repeats=5) >= 0
    assert len(calls) == 1 + 3 * 5
    idle = SimpleNamespace(cuda=dict(vars(cuda), current_stream=lambda: SimpleNamespace(query=lambda: True)))
    idle.cuda = SimpleNamespace(**idle.cuda)
    with pytest.raises(RuntimeError, match="the device finished its queued work before the host issued 3 calls"):
        bench.host_time(idle, lambda: None, calls=3, repeats=2)


def test_bench_lines_give_their_units():
    """Every time a benchmark prints says it is in ms, and an accuracy line says what it compares."""
    from hodlr import bench, bench_gated_delta, bench_hattention

    row = {"D": 64, "H": 16, "T": 2048, "B": 32, "fwd": 0.8, "fwdbwd": 2.4, "fwdbwd_over_fwd": 3.0, "fla_fwd": 1.0}
    assert bench._format_row(row).count(" ms") == 5
    assert bench_gated_delta._format_row(row).count(" ms") == 2
    assert all(c.strip().endswith(" ms") for c in bench.table({"rows": [row]}).splitlines()[0].strip("|").split("|")
               if c.strip().startswith(("fwd ", "fwd,", "fwd+bwd ", "fwd+bwd,", "SDPA", "fla")) and "/" not in c)
    assert bench_hattention.TABLE_HEAD.startswith("times in ms")
    mm = {"D": 64, "H": 16, "T": 2048, "B": 32, "mm_bytes": 3.1e8, "mm": 0.08, "mm_fraction_of_copy": 0.9}
    assert bench._format_matmul_row(mm).endswith("eager 0.080 ms (90% of copy bandwidth), graph - ms")
    line = bench.accuracy_line({"T": 4096, "decay": 0.0, "o_ours": 2.3e-3, "o_fla": 2.9e-3, "fla_error": "x\nE: y"})
    assert line == ("accuracy T=4096 decay=0.0, relative error against float64: o_ours 2.30e-03, o_fla 2.90e-03; "
                    "failed: fla_error")
    assert bench.accuracy_line({"T": 8, "D": 4, "error": "Traceback\n  x\nRuntimeError: boom"}) == (
        "accuracy T=8 D=4: failed: RuntimeError: boom")


def test_bench_times_fla_only_up_to_its_width(monkeypatch):
    """``hodlr bench`` times fla's log-linear kernel up to ``--fla-max-width`` (default 128) and
    records why it skipped a wider row (a row's code path on the CPU, inputs made there)."""
    torch = pytest.importorskip("torch")
    import hodlr
    from hodlr import bench

    def inputs(torch, B, T, H, D, dtype, seed=0):
        gen = torch.Generator().manual_seed(seed)
        q, k, v, do = (torch.randn(B, T, H, D, generator=gen) for _ in range(4))
        lam = 0.5 + torch.rand(B, T, H, hodlr.num_levels(T), generator=gen)
        return q, k, v, -0.1 * torch.rand(B, T, H, generator=gen), lam, do

    calls = []

    def fla(q, k, v, g, lam, scale):
        calls.append(q.shape[-1])
        return (q,)

    monkeypatch.setattr(bench, "_inputs", inputs)
    once = lambda fn: (fn(), 1.0)[1]  # noqa: E731
    args = bench._parser().parse_args(["--no-backward", "--tokens", "8"])
    wide = bench._attention_row(torch, once, args, 256, 1, 8, torch.float32, fla)
    assert "fla_fwd" not in wide and wide["fla_skipped"] == "D = 256 is wider than --fla-max-width 128"
    narrow = bench._attention_row(torch, once, args, 128, 1, 8, torch.float32, fla)
    assert narrow["fla_fwd"] == 1.0 and "fla_skipped" not in narrow and calls == [128]
    assert wide["fwd"] == narrow["sdpa_fwd"] == 1.0


def test_bench_gated_delta_cpu_defaults_are_a_smoke_run(tmp_path):
    """``--device cpu`` without a sweep runs a tiny one (the GPU sweep would take minutes)."""
    pytest.importorskip("torch")
    from hodlr import bench_gated_delta

    out = tmp_path / "g.json"
    assert bench_gated_delta.main(["--device", "cpu", "--json", str(out), "--png", ""]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert (row["D"], row["T"], row["B"]) == (16, 64, 2)


@pytest.mark.interpreter
def test_bench_keeps_the_rows_of_a_stopped_run(tmp_path, monkeypatch):
    """A benchmark stopped part-way (here in its accuracy section) leaves a JSON with the rows it
    measured, marked ``"complete": false``; a finished run is marked ``true``."""
    pytest.importorskip("torch")
    from hodlr import bench_gated_delta

    class Stopped(BaseException):
        pass

    def stop(*args, **kwargs):
        raise Stopped

    out = tmp_path / "gd.json"
    argv = ["--device", "cpu", "-T", "9", "--widths", "8", "--model-width", "8", "--tokens", "9", "--json", str(out),
            "--png", ""]
    monkeypatch.setattr(bench_gated_delta, "_accuracy", stop)
    with pytest.raises(Stopped):
        bench_gated_delta.main(argv + ["--accuracy", "5"])
    res = json.loads(out.read_text())
    assert res["complete"] is False and len(res["rows"]) == 1 and res["rows"][0]["fwd"] > 0
    assert bench_gated_delta.main(argv) == 0
    assert json.loads(out.read_text())["complete"] is True


def test_benchmarks_record_the_commit_and_a_changed_tree(tmp_path, monkeypatch):
    """The commit a benchmark records: ``--commit`` as given, else ``$HODLR_COMMIT``, else the HEAD
    of the checkout hodlr runs from, marked ``+dirty`` when a tracked file differs from it (a
    result must not name a commit whose code it did not run), whatever the current folder."""
    from hodlr import bench

    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "a.py").write_text("x = 1\n")
    subprocess.run(git + ["add", "a.py"], check=True)
    subprocess.run(git + ["commit", "-q", "-m", "a"], check=True)
    head = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    monkeypatch.setattr(bench, "__file__", str(tmp_path / "bench.py"))  # hodlr "runs from" that checkout
    monkeypatch.delenv("HODLR_COMMIT", raising=False)
    monkeypatch.chdir(pathlib.Path(tmp_path).parent)                  # not the current folder's repository
    assert bench._commit() == head and bench._commit("abc123") == "abc123"
    (tmp_path / "b.py").write_text("untracked files do not count\n")
    assert bench._commit() == head
    (tmp_path / "a.py").write_text("x = 2\n")
    assert bench._commit() == head + "+dirty"
    monkeypatch.setenv("HODLR_COMMIT", "f00d")
    assert bench._commit() == "f00d" and bench._commit("abc123") == "abc123"


@pytest.mark.parametrize("argv, message", [
    (["bench-cpu", "-T", "0"], "argument --lengths/-T: expected a positive integer, got 0"),
    (["bench-cpu", "--repeats", "-1"], "argument --repeats: expected a positive integer, got -1"),
    (["bench-cpu", "--seed", "-1"], "argument --seed: expected an integer >= 0, got -1"),
    (["verify", "-T", "5", "--seed", "-1"], "argument --seed: expected an integer >= 0, got -1"),
    (["bench-decode", "--positions", "-1", "3"], "argument --positions: expected an integer >= 0, got -1"),
    (["bench-decode", "--window", "0"], "argument --window: expected a positive integer, got 0"),
    (["bench-gated-delta", "--device", "cpu", "-T", "0"], "argument --lengths/-T: expected a positive integer, got 0"),
    (["bench-gated-delta", "--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
    (["bench", "--widths", "0"], "argument --widths: expected a positive integer, got 0"),
    (["bench-cp", "--heads", "0"], "argument --heads: expected a positive integer, got 0"),
    (["bench-decode", "--matmul-exponents", "5", "2"], "--matmul-exponents must be in increasing order, got 5 2"),
])
def test_bench_arguments_are_checked_before_running(capsys, argv, message):
    """Counts, sizes, seeds and exponents are refused as usage errors (exit 2), never a traceback."""
    with pytest.raises(SystemExit) as err:
        cli.main(argv)
    assert err.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.interpreter
def test_verify_reports_narrower_kernels_as_a_refusal(capsys):
    """A backend whose kernels take narrower keys is a refusal row in ``verify``, not a disagreement
    (``--batch 1x1``: a batch shape)."""
    code, out, _ = run(capsys, "verify", "-T", "20", "--dk", "129", "--dv", "2", "--d", "1", "--batch", "1x1",
                       "--ops", "gated_delta_attention", "--backends", "triton,fenwick", "--arrays", "torch")
    assert code == 0, out
    assert re.search(r"triton .* gated_delta_attention .*refused: its kernels take keys up to 128 wide, these are 129",
                     out), out


def test_cli_edges_a_user_meets(capsys):
    """A ``show`` past 2**50 a one-line error; a closed pipe no traceback."""
    code, _, err = run(capsys, "show", str(2**50 + 1))
    assert code == 2 and err.strip() == f"hodlr show: error: T must be <= 2**50 = {2**50}, got {2**50 + 1}"
    piped = subprocess.run(f"{sys.executable} -m hodlr show 64 | head -1", shell=True, capture_output=True, text=True,
                           timeout=120)
    assert "Traceback" not in piped.stderr and piped.stdout.startswith("levels of the T=64 mask")
