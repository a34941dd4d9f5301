"""Benchmark harness (``hodlr bench``): log-linear attention through the public API, beside its peers,
on one GPU.

For every head width (``--widths``; ``H`` heads with ``H·D`` fixed, B·T tokens fixed) and length it
times, with ``triton.testing.do_bench`` (median, milliseconds), calls exactly as users write them:

* ``hodlr.attention(q, k, v, hodlr.LogLinearMask(level_scales, log_decay), scale=...)`` with its
  default arguments (the mask built per call, validated on the device), the same with an unvalidated
  mask, and the replay of a CUDA graph of the default call (the GPU's own time);
* forward + backward: that call and ``torch.autograd.grad`` of every input (q, k, v, level scales,
  log-decay) for a fixed random ``dO``, eager and as a CUDA-graph replay, and its ratio to the
  forward (``fwdbwd_over_fwd`` eager, ``fwdbwd_over_fwd_graph`` of the replays); the peak memory
  of one forward + backward and the bytes the forward holds for the backward beyond its output
  (``fwd_kept_bytes``: the chunk states, ``docs/backward.md`` §6); the host's time to issue the
  default call and the forward + backward (``fwd_host``, ``fwdbwd_host``: :func:`host_time`), which
  tells where an eager figure is the host's rather than the GPU's;
* causal ``scaled_dot_product_attention`` (FlashAttention on Hopper) and flash-linear-attention's
  ``chunk_log_linear_attn`` (when importable; it refuses ``Dk % 64 != 0`` and ``T >= 2^17``),
  forward and forward + backward, on the same inputs;
* the matmul ``Y = M @ X`` (first width only) against the measured copy bandwidth, counting the bytes
  it must move, as called and as a CUDA-graph replay.

``--accuracy`` adds the bfloat16 errors of ours and of fla against a float64 reference (the
``chunked`` backend in float64 on the GPU), outputs and every gradient, with and without decay;
``--profile`` each row's forward + backward split by kernel (:func:`kernel_times`).
Inputs are fla's ``(B, T, H, D)`` layout; hodlr reads ``(B, H, T, D)`` views of them (no copies).
It prints a table and writes JSON and a PNG plot (matplotlib, Agg).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import subprocess
import sys
import traceback

__all__ = ["main"]

DEFAULT_LENGTHS = (2048, 8192, 16384, 32768, 65536, 131072)
DEFAULT_WIDTHS = (64, 128, 256)


def positive_int(text: str) -> int:
    """An ``argparse`` type: an integer >= 1."""
    return _int_at_least(text, 1, "a positive integer")


def nonnegative_int(text: str) -> int:
    """An ``argparse`` type: an integer >= 0 (seeds, exponents, positions)."""
    return _int_at_least(text, 0, "an integer >= 0")


def _int_at_least(text: str, low: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
    return value


def writable_path(text: str) -> str:
    """An ``argparse`` type: the path of a file a command writes after its run, refused before the run
    where it cannot be written (its folder missing or not writable, or the path a folder); ``''`` (no
    file) as given."""
    if not text:
        return text
    folder = os.path.dirname(os.path.abspath(text))
    target = text if os.path.exists(text) else folder
    if not os.path.isdir(folder):
        why = f"the folder {folder} does not exist"
    elif os.path.isdir(text):
        why = "it is a folder"
    elif not os.access(target, os.W_OK):
        why = f"{target} is not writable"
    else:
        return text
    raise argparse.ArgumentTypeError(f"expected a file path that can be written, got {text!r}: {why}")


MODEL_WIDTH, TOKENS = 1024, 65536
"""The GPU sweep's model width ``H * D`` and tokens ``B * T`` (:func:`sweep_parser`'s defaults)."""


def fill_device_defaults(args, lengths, widths, cpu: dict, **gpu) -> None:
    """For a parser whose sweep defaults depend on ``--device`` (``p.set_defaults(lengths=None,
    widths=None, model_width=None, tokens=None)``): set each argument still None from ``cpu`` for
    ``--device cpu``, else from the GPU sweep (``lengths``, ``widths``, :data:`MODEL_WIDTH`,
    :data:`TOKENS` and ``gpu``)."""
    if args.device != "cpu":
        cpu = {"lengths": lengths, "widths": widths, "model_width": MODEL_WIDTH, "tokens": TOKENS, **gpu}
    for name, value in cpu.items():
        if getattr(args, name) is None:
            setattr(args, name, list(value) if isinstance(value, (list, tuple)) else value)


class HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` that gives each option's default where it takes a value and has one (not for
    switches, nor where the help text already says it)."""

    def _get_help_string(self, action):
        if action.nargs == 0 or action.default in (None, argparse.SUPPRESS) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def sweep_parser(prog, description, lengths, widths, outputs, epilog=None):
    """The arguments every GPU benchmark shares: the ``(T, D)`` sweep at a fixed ``B·T`` and
    model width, ``do_bench`` settings, the JSON and picture paths (``outputs.json`` /
    ``outputs.png``) and the commit to record."""
    p = argparse.ArgumentParser(prog=prog, description=description, formatter_class=HelpWithDefaults,
                                epilog=epilog)
    p.add_argument("--lengths", "-T", type=positive_int, nargs="+", default=list(lengths), help="sequence lengths")
    p.add_argument("--widths", type=positive_int, nargs="+", default=list(widths), help="head widths Dk = Dv")
    p.add_argument("--model-width", type=positive_int, default=MODEL_WIDTH, help="H * D (H = model_width // D heads)")
    p.add_argument("--tokens", type=positive_int, default=TOKENS, help="B*T (B = max(1, tokens // T))")
    p.add_argument("--warmup", type=positive_int, default=25, help="do_bench warm-up, ms")
    p.add_argument("--rep", type=positive_int, default=100, help="do_bench repetitions, ms")
    p.add_argument("--json", type=writable_path, default=f"{outputs}.json",
                   help='output JSON path (written after every row; "complete" is true once the run ends)')
    p.add_argument("--png", type=writable_path, default=f"{outputs}.png", help="output plot path ('' for none)")
    p.add_argument("--commit", default=None, help="commit to record (default: git rev-parse HEAD)")
    p.add_argument("--profile", action="store_true",
                   help="also record each row's time per kernel (torch.profiler, ms a call)")
    return p


def _parser():
    p = sweep_parser("hodlr bench", __doc__.split("\n\n")[0], DEFAULT_LENGTHS, DEFAULT_WIDTHS, "bench")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16",
                   help="dtype of q, k, v (the mask float32)")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="random inputs' seed")
    p.add_argument("--no-backward", dest="backward", action="store_false", help="skip forward + backward")
    p.add_argument("--no-matmul", dest="matmul", action="store_false", help="skip the matmul timings")
    p.add_argument("--no-peers", dest="peers", action="store_false", help="skip SDPA and fla")
    p.add_argument("--fla-max-width", type=positive_int, default=128,
                   help="widest head at which fla's chunk_log_linear_attn is timed (it holds twelve [BK, V] "
                        "float32 state tiles a program: at D = 256 its first call did not finish in 280 s on an "
                        "H200); wider rows record fla_skipped")
    p.add_argument("--accuracy", type=positive_int, nargs="*", default=None,
                   help="also measure bf16 errors against float64 at these lengths (H = 2, D = 64)")
    return p


def _commit(given=None):
    """The commit a benchmark records: ``given`` (``--commit``), else ``$HODLR_COMMIT``, else the
    HEAD of the checkout hodlr runs from (``git rev-parse HEAD`` in this package's folder) with
    ``+dirty`` appended when tracked files differ from it (an edited tree, or a tree copied beside
    a history that is not its own), else ``"unknown"``."""
    if given:
        return given
    if os.environ.get("HODLR_COMMIT"):
        return os.environ["HODLR_COMMIT"]
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=here).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                 text=True, check=True, cwd=here).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if changed else "")


def _fla():
    try:
        from fla.ops.log_linear_attn import chunk_log_linear_attn

        return chunk_log_linear_attn
    except ImportError:
        return None


def _fla_version():
    try:
        from importlib.metadata import version

        return version("fla-core")
    except Exception:  # noqa: BLE001 - any failure means "not installed"
        return None


def _rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    if not bool(a.isfinite().all()):
        return math.inf
    return float((a - b).norm() / b.norm())


def graph_replay(torch, fn):
    """``fn`` captured into a CUDA graph (after three warm-up calls on a side stream); returns the
    graph's ``replay``."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def host_time(torch, fn, calls: int = 10, repeats: int = 5) -> float:
    """The host's time to issue one call of ``fn`` (ms, median of ``repeats``): ``calls`` calls
    issued behind about 0.2 s of queued GPU work (``torch.cuda._sleep``), so that the host never
    waits for the device; a repeat after which the device had gone idle (the host was the slower)
    is dropped, and all of them dropped raises.  An eager call is host-bound where this exceeds its
    graph replay."""
    import statistics
    import time

    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        torch.cuda._sleep(400_000_000)  # cycles: about 0.2 s at the H100's / H200's clocks
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        elapsed = time.perf_counter() - start
        if not torch.cuda.current_stream().query():  # still busy: the host issued every call first
            times.append(1e3 * elapsed / calls)
        torch.cuda.synchronize()
    if not times:
        raise RuntimeError(f"the device finished its queued work before the host issued {calls} calls")
    return statistics.median(times)


def _copy_bandwidth(torch, bench, device) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + written), 1 GiB buffers."""
    n = 1 << 28
    src = torch.rand(n, device=device)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    return 2 * n * 4 / (ms * 1e-3)


def _inputs(torch, B, T, H, D, dtype, decay=0.1, seed=0):
    """``(q, k, v, log_decay, level_scales, dO)`` in fla's ``(B, T, H, ·)`` layout: 16-bit q, k, v,
    dO; float32 decay and scales (a float32 mask serves 16-bit operands)."""
    from hodlr import fenwick

    gen = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v, do = (torch.randn(B, T, H, D, device="cuda", generator=gen).to(dtype) for _ in range(4))
    g = -decay * torch.rand(B, T, H, device="cuda", generator=gen)
    lam = 0.5 + torch.rand(B, T, H, fenwick.num_levels(T), device="cuda", generator=gen)
    return q, k, v, g, lam, do


def timer(cuda: bool, warmup: int, rep: int):
    """``fn -> ms``: the median of ``triton.testing.do_bench(fn, warmup, rep)`` on a GPU; on the CPU
    one wall-clock call (smoke runs under the interpreter: the figure means nothing)."""
    import time

    def bench(fn):
        if cuda:
            import triton.testing

            return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")
        start = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - start)

    return bench


def forward_calls(torch, call, inputs, do):
    """``(fwd, fwdbwd)``: ``fwd`` runs ``call(*inputs)`` under ``torch.no_grad()`` (returns
    nothing); ``fwdbwd`` runs ``call`` on leaves made of ``inputs`` and returns
    ``torch.autograd.grad`` of all of them for ``do``."""
    leaves = [x.detach().requires_grad_() for x in inputs]

    def fwd():
        with torch.no_grad():
            call(*inputs)

    def fwdbwd():
        return torch.autograd.grad(call(*leaves), leaves, do)

    return fwd, fwdbwd


def _timed(row, key, fn):
    try:
        row[key] = fn()
    except Exception:  # noqa: BLE001 - a failed measurement is recorded, the run goes on
        row[key + "_error"] = traceback.format_exc(limit=3)[-400:]


def kernel_times(torch, fn, calls: int = 5, top: int = 12) -> dict:
    """``{kernel name: ms a call}`` of the ``top`` kernels (device time on a GPU, host time of the
    operators on the CPU) over ``calls`` calls of ``fn`` after one warm-up call."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    fn()
    if cuda:
        torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            fn()
        if cuda:
            torch.cuda.synchronize()
    times = {}
    for event in prof.key_averages():
        us = event.self_device_time_total if cuda else event.self_cpu_time_total
        if us > 0:
            times[event.key[:60]] = times.get(event.key[:60], 0.0) + us / 1e3 / calls
    return dict(sorted(times.items(), key=lambda kv: -kv[1])[:top])


def _attention_row(torch, bench, args, D, H, T, dtype, fla):
    import hodlr

    B = max(1, args.tokens // T)
    row = {"D": D, "H": H, "T": T, "B": B}
    q, k, v, g, lam, do = _inputs(torch, B, T, H, D, dtype, seed=args.seed)
    scale = D ** -0.5

    def heads(*xs):  # (B, T, H, ·) -> (B, H, T, ·) views
        return [x.transpose(1, 2) for x in xs]

    qh, kh, vh, gh, lamh, doh = heads(q, k, v, g, lam, do)

    def call(validate=True):
        return hodlr.attention(qh, kh, vh, hodlr.LogLinearMask(lamh, gh, validate=validate), scale=scale)

    _timed(row, "fwd", lambda: bench(call))
    _timed(row, "fwd_unvalidated", lambda: bench(lambda: call(False)))
    _timed(row, "fwd_graph", lambda: bench(graph_replay(torch, call)))
    if args.backward:
        leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v, g, lam)]

        def forward():  # the default call on the leaves
            lq, lk, lv, lg, ll = heads(*leaves)
            return hodlr.attention(lq, lk, lv, hodlr.LogLinearMask(ll, lg), scale=scale)

        def fwdbwd():
            return torch.autograd.grad(forward(), leaves, doh)

        _timed(row, "fwdbwd", lambda: bench(fwdbwd))
        _timed(row, "fwdbwd_graph", lambda: bench(graph_replay(torch, fwdbwd)))
        _timed(row, "fwd_host", lambda: host_time(torch, call))
        _timed(row, "fwdbwd_host", lambda: host_time(torch, fwdbwd))
        if args.profile:
            row["kernels_fwdbwd"] = kernel_times(torch, fwdbwd)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fwdbwd()
        torch.cuda.synchronize()
        row["fwdbwd_peak_extra_bytes"] = torch.cuda.max_memory_allocated() - base

        def kept():  # what the forward holds for the backward beyond its output (the graph's saved tensors)
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            out = forward()
            torch.cuda.synchronize()
            return torch.cuda.memory_allocated() - before - out.numel() * out.element_size()

        _timed(row, "fwd_kept_bytes", kept)
        if "fwd" in row and "fwdbwd" in row:
            row["fwdbwd_over_fwd"] = row["fwdbwd"] / row["fwd"]
        if "fwd_graph" in row and "fwdbwd_graph" in row:
            row["fwdbwd_over_fwd_graph"] = row["fwdbwd_graph"] / row["fwd_graph"]
    if args.peers:
        sdpa = torch.nn.functional.scaled_dot_product_attention
        sl = [x.detach().clone().requires_grad_(True) for x in (qh, kh, vh)]
        _timed(row, "sdpa_fwd", lambda: bench(lambda: sdpa(*sl, is_causal=True)))
        if args.backward:
            _timed(row, "sdpa_fwdbwd", lambda: bench(lambda: torch.autograd.grad(sdpa(*sl, is_causal=True), sl, doh)))
        if fla is not None and D % 64 == 0 and T < (1 << 17):
            if D > args.fla_max_width:
                row["fla_skipped"] = f"D = {D} is wider than --fla-max-width {args.fla_max_width}"
            else:  # fla takes level scales in the inputs' dtype
                fl = [x.detach().clone().requires_grad_(True) for x in (q, k, v, g, lam.to(dtype))]
                _timed(row, "fla_fwd", lambda: bench(lambda: fla(*fl, scale=scale)[0]))
                if args.backward:
                    _timed(row, "fla_fwdbwd",
                           lambda: bench(lambda: torch.autograd.grad(fla(*fl, scale=scale)[0], fl, do)))
    return row


def _matmul_row(torch, bench, args, D, H, T, dtype, copy_bw):
    import hodlr
    from hodlr import fenwick

    B = max(1, args.tokens // T)
    row = {"T": T, "B": B, "H": H, "D": D}
    x = torch.randn(B, H, T, D, device="cuda", dtype=dtype)
    lam = 0.5 + torch.rand(B, H, T, fenwick.num_levels(T), device="cuda")
    g = -0.1 * torch.rand(B, H, T, device="cuda")

    def call():
        return hodlr.matmul(hodlr.LogLinearMask(lam, g, validate=False), x)

    n_read = int(fenwick.read_levels(T).sum())
    nbytes = B * H * (2 * T * D * x.element_size() + n_read * 4 + T * 4)
    row["mm_bytes"] = nbytes
    _timed(row, "mm", lambda: bench(call))
    _timed(row, "mm_graph", lambda: bench(graph_replay(torch, call)))
    for key in ("mm", "mm_graph"):
        if key in row:
            row[key + "_fraction_of_copy"] = nbytes / (row[key] * 1e-3) / copy_bw
    return row


def _accuracy(torch, T, decay, fla):
    """bf16 errors of ours and of fla against the float64 chunked backend: output and gradients."""
    from hodlr import kernels
    from hodlr.backends import chunked

    q, k, v, g, lam, do = _inputs(torch, 1, T, 2, 64, torch.bfloat16, decay=max(decay, 1e-9), seed=T)
    if decay == 0.0:
        g = torch.zeros_like(g)
    lam = lam.to(torch.bfloat16)
    heads = [x.transpose(1, 2) for x in (q, k, v, lam, g)]
    ref = [x.double().detach().requires_grad_(True) for x in heads]
    o_ref = chunked.attention(*ref[:3], ref[3], ref[4], 1.0)
    g_ref = torch.autograd.grad(o_ref, ref, do.transpose(1, 2).double())
    ours = [x.detach().clone().requires_grad_(True) for x in heads]
    o = kernels.attention(*ours, 1.0)
    names = ("q", "k", "v", "level_scales", "log_decay")
    row = {"T": T, "decay": decay, "o_ours": _rel(o, o_ref)}
    for n, a, b in zip(names, torch.autograd.grad(o, ours, do.transpose(1, 2)), g_ref):
        row[f"d{n}_ours"] = _rel(a, b)
    if fla is not None and T < (1 << 17):
        fl = [x.detach().clone().requires_grad_(True) for x in (q, k, v, g, lam)]
        of = fla(*fl, scale=1.0)[0]
        row["o_fla"] = _rel(of.transpose(1, 2), o_ref)
        grads = dict(zip(("q", "k", "v", "log_decay", "level_scales"), torch.autograd.grad(of, fl, do)))
        for n, b in zip(names, g_ref):
            row[f"d{n}_fla"] = _rel(grads[n].transpose(1, 2), b)
    return row


def run(args) -> dict:
    import torch
    import triton
    import triton.testing

    from hodlr import kernels

    if not torch.cuda.is_available():
        raise SystemExit("hodlr bench needs a CUDA GPU (torch.cuda.is_available() is False)")
    dtype = getattr(torch, args.dtype)

    def bench(fn):
        return triton.testing.do_bench(fn, warmup=args.warmup, rep=args.rep, return_mode="median")

    fla = _fla() if args.peers else None
    copy_bw = _copy_bandwidth(torch, bench, "cuda")
    result = {
        "device": torch.cuda.get_device_properties(0).name,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": _commit(args.commit), "torch": torch.__version__, "triton": triton.__version__,
        "fla": _fla_version(), "dtype": args.dtype, "tokens": args.tokens, "copy_bandwidth": copy_bw,
        "chunk": dict(kernels.DEFAULT_CHUNK), "rows": [], "matmul": [], "accuracy": [], "complete": False,
    }
    for D in args.widths:
        H = max(1, args.model_width // D)
        for T in args.lengths:
            row = _attention_row(torch, bench, args, D, H, T, dtype, fla)
            result["rows"].append(row)
            print(_format_row(row), flush=True)
            write(result, args.json, None, plot)
            torch.cuda.empty_cache()
    if args.matmul:
        D = args.widths[0]
        for T in args.lengths:
            row = _matmul_row(torch, bench, args, D, max(1, args.model_width // D), T, dtype, copy_bw)
            result["matmul"].append(row)
            print(_format_matmul_row(row), flush=True)
            write(result, args.json, None, plot)
            torch.cuda.empty_cache()
    for T in args.accuracy or ():
        for decay in (0.0, 0.1):
            try:
                row = _accuracy(torch, T, decay, _fla())
            except Exception:  # noqa: BLE001
                row = {"T": T, "decay": decay, "error": traceback.format_exc(limit=3)[-400:]}
            result["accuracy"].append(row)
            print(accuracy_line(row), flush=True)
            write(result, args.json, None, plot)
            torch.cuda.empty_cache()
    result["complete"] = True
    return result


def _fmt(v, spec=".3f"):
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def _format_row(r) -> str:
    return (f"D={r['D']:>3} H={r['H']:>2} T={r['T']:>7} B={r['B']:>3} | fwd {_fmt(r.get('fwd'))} "
            f"unvalidated {_fmt(r.get('fwd_unvalidated'))} graph {_fmt(r.get('fwd_graph'))} ms | fwd+bwd "
            f"{_fmt(r.get('fwdbwd'))} graph {_fmt(r.get('fwdbwd_graph'))} ms, ratio "
            f"{_fmt(r.get('fwdbwd_over_fwd'), '.2f')} (graph {_fmt(r.get('fwdbwd_over_fwd_graph'), '.2f')}) | "
            f"sdpa fwd / fwd+bwd {_fmt(r.get('sdpa_fwd'))} / {_fmt(r.get('sdpa_fwdbwd'))} ms | "
            f"fla {_fmt(r.get('fla_fwd'))} / {_fmt(r.get('fla_fwdbwd'))} ms | "
            f"host a call fwd / fwd+bwd {_fmt(r.get('fwd_host'))} / {_fmt(r.get('fwdbwd_host'))} ms")


def _format_matmul_row(r) -> str:
    def part(key):
        share = r.get(key + "_fraction_of_copy")
        return f"{_fmt(r.get(key))} ms" + ("" if share is None else f" ({100 * share:.0f}% of copy bandwidth)")

    return (f"matmul D={r['D']:>3} H={r['H']:>2} T={r['T']:>7} B={r['B']:>3} | {r['mm_bytes'] / 1e9:.3f} GB moved | "
            f"eager {part('mm')}, graph {part('mm_graph')}")


def accuracy_line(row, labels=("T", "D", "decay")) -> str:
    """One accuracy row of a benchmark as text: the case (``labels`` present in ``row``), then each
    relative error against the float64 reference, or why the row failed."""
    case = " ".join(f"{k}={row[k]}" for k in labels if k in row)
    if "error" in row:
        return f"accuracy {case}: failed: {row['error'].strip().splitlines()[-1]}"
    errors = ", ".join(f"{k} {v:.2e}" for k, v in row.items() if k not in labels and isinstance(v, float))
    failed = [k for k, v in row.items() if k not in labels and isinstance(v, str)]
    return (f"accuracy {case}, relative error against float64: {errors}"
            + (f"; failed: {', '.join(failed)}" if failed else ""))


def table(result) -> str:
    """The attention results as a Markdown table (times in ms)."""
    head = ("| D | H | T | B | fwd ms | fwd, unvalidated mask ms | fwd, graph ms | fwd+bwd ms | fwd+bwd, graph ms | "
            "fwd+bwd / fwd | fwd+bwd / fwd, graph | SDPA fwd ms | SDPA fwd+bwd ms | fla fwd ms | fla fwd+bwd ms | "
            "host, fwd ms | host, fwd+bwd ms |")
    lines = [head, "|" + " --- |" * 17]
    for r in result["rows"]:
        lines.append(
            f"| {r['D']} | {r['H']} | {r['T']:,} | {r['B']} | {_fmt(r.get('fwd'))} | {_fmt(r.get('fwd_unvalidated'))} | "
            f"{_fmt(r.get('fwd_graph'))} | {_fmt(r.get('fwdbwd'))} | {_fmt(r.get('fwdbwd_graph'))} | "
            f"{_fmt(r.get('fwdbwd_over_fwd'), '.2f')} | {_fmt(r.get('fwdbwd_over_fwd_graph'), '.2f')} | "
            f"{_fmt(r.get('sdpa_fwd'))} | {_fmt(r.get('sdpa_fwdbwd'))} | "
            f"{_fmt(r.get('fla_fwd'))} | {_fmt(r.get('fla_fwdbwd'))} | "
            f"{_fmt(r.get('fwd_host'))} | {_fmt(r.get('fwdbwd_host'))} |")
    return "\n".join(lines)


def plot_times(ax, result, D, series) -> None:
    """Medians against ``T`` (log-log) of the rows of head width ``D``: one line per
    ``(key, label, color, linestyle)`` of ``series`` that has a value."""
    rows = [r for r in result["rows"] if r["D"] == D]
    for key, label, color, style in series:
        ys = [r.get(key, math.nan) for r in rows]
        if any(not math.isnan(y) for y in ys):
            ax.plot([r["T"] for r in rows], ys, marker="o", color=color, ls=style, label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("T")
    ax.set_ylabel("ms (median)")
    ax.set_title(f"D = {D}, H = {rows[0]['H']}, B·T = {result['tokens']:,}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)


def save_figure(fig, result, path) -> None:
    """Title ``fig`` with the run's device, date, commit and dtype, save it at ``path``, close it."""
    import matplotlib.pyplot as plt

    fig.suptitle(f"{result['device']}  {result['date']}  commit {result['commit'][:10]}  {result['dtype']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(result, json_path, png_path, plot_fn) -> None:
    """The result as JSON at ``json_path`` and ``plot_fn(result, png_path)`` (each when given).

    The benchmarks write their JSON after every row (``"complete": false`` until the last), so a
    run that is stopped part-way keeps the rows it measured."""
    if json_path:
        with open(json_path, "w") as fh:
            json.dump(result, fh, indent=1)
    if png_path:
        plot_fn(result, png_path)


def width_panels(result, series, extra: int = 0, panel_width: float = 5.5):
    """``(figure, axes, widths)``: one panel per head width of ``result["rows"]`` (``widths``, sorted)
    with ``series`` drawn by :func:`plot_times`, then ``extra`` empty panels (the last axes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    widths = sorted({r["D"] for r in result["rows"]})
    n = len(widths) + extra
    fig, axes = plt.subplots(1, n, figsize=(panel_width * n, 4.5), squeeze=False)
    for ax, D in zip(axes[0], widths):
        plot_times(ax, result, D, series)
    return fig, axes[0], widths


def plot(result, path) -> None:
    series = (("fwd", "hodlr fwd", "C0", "-"), ("fwdbwd", "hodlr fwd+bwd", "C0", "--"),
              ("sdpa_fwd", "SDPA (causal) fwd", "C1", "-"), ("sdpa_fwdbwd", "SDPA fwd+bwd", "C1", "--"),
              ("fla_fwd", "fla log-linear fwd", "C2", "-"), ("fla_fwdbwd", "fla log-linear fwd+bwd", "C2", "--"))
    fig, axes, widths = width_panels(result, series, extra=1, panel_width=5)
    ax = axes[-1]
    for i, D in enumerate(widths):
        rows = [r for r in result["rows"] if r["D"] == D]
        for key, ls, what in (("fwdbwd_over_fwd", "-", "eager"), ("fwdbwd_over_fwd_graph", "--", "graph")):
            ax.plot([r["T"] for r in rows], [r.get(key, math.nan) for r in rows], marker="o", ls=ls, color=f"C{i}",
                    label=f"D = {D}, {what}")
    ax.axhline(3.0, color="k", ls=":", label="3x")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("T")
    ax.set_title("hodlr fwd+bwd / fwd")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    save_figure(fig, result, path)


def main(argv=None) -> int:
    """Entry point of ``hodlr bench``; returns the exit status."""
    args = _parser().parse_args(argv)
    result = run(args)
    print(table(result))
    print(f"copy bandwidth {result['copy_bandwidth'] / 1e12:.2f} TB/s; device {result['device']}; commit {result['commit']}")
    write(result, args.json, args.png, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
