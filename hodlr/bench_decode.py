"""Benchmark of the Fenwick decoder (``fenwick.FenwickState``) and the ``fenwick`` backend.

Three measurements (figures and method in ``docs/fenwick.md``):

1. **Per-token step cost** at positions around ``2**a`` and ``2**b`` (default 8 and 16),
   ``Dk = Dv = 64``, batch 8, float32, torch on the CPU.  The state is brought to
   ``2**e - window/2`` with :meth:`FenwickState.extend` (the documented fast-forward: the
   same state as that many steps, computed in bulk), then ``window`` real :meth:`step`
   calls are timed one by one, over positions ``[2**e - window/2, 2**e + window/2)``.
   Repeats are interleaved between the two positions; the reported figure per position is
   the smallest mean over the repeats (the least disturbed by other processes), by wall
   clock and by this process's CPU time.
2. **State memory at position 2**20** with the same widths: ``extend`` to ``2**20 - 1``
   (20 live states, the most any position ``<= 2**20`` has), one real ``step`` to
   ``2**20``, then :attr:`FenwickState.nbytes`; the bound is
   ``21 * Dk * Dv * batch * itemsize``.  ``--walk`` also consumes all ``2**20`` tokens with
   :meth:`FenwickState.prefill` at width 1 (no fast-forward) and reports the peak number of
   state slots it allocated.
3. **Growth of the full-sequence matmul** (``fenwick.scan.matmul``, i.e. the ``fenwick``
   backend) from ``T = 2**10`` to ``2**18``: the least-squares slope of log(time) against
   log(T) (``O(T log T)`` work gives about 1.1 over this range), best of the repeats,
   which are interleaved over the lengths.

4. **The decode step on the GPU** (``--gpu-step``): :func:`hodlr.log_linear_attn_step` with the
   Triton decode kernel (``hodlr.kernels.decode``) for ``B`` sequences of ``H`` heads with
   ``Dk = Dv = D`` (default 64, 16, 64) at positions ``2**16 - 1`` and ``2**16``, float32 state,
   timed as the replay of a CUDA graph of one step (with the copy that puts the positions back,
   so that every replay steps from the same position); the bytes of the states the step must
   read and write (every live slot read; every live slot decayed or cleared, and the merged slot,
   written) over the copy bandwidth measured in the same run (a device-to-device copy of 1 GiB).
   When ``fla`` is importable, fla's decoding path for its log-linear layer --
   ``chunk_log_linear_attn`` on one token from a state at the same position, batch, heads and
   widths (prefilled with one sequence and repeated along the batch) -- is timed beside it
   (eager: that path reads values on the host and cannot be captured).  ``--gpu-device cpu``
   runs the same code under ``TRITON_INTERPRET=1`` at small sizes (a smoke test; no timing value).
   The log-linear Gated DeltaNet step (:func:`hodlr.log_linear_gated_delta_step`: the same kernel
   with write strengths, the same bytes) is timed beside it, with its torch form.

Run ``hodlr bench-decode`` or ``python -m hodlr.bench_decode`` (``--help`` for options);
``hodlr bench-decode --gpu-step --skip step memory matmul`` times only the GPU step.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time

import numpy as np

from hodlr.bench import HelpWithDefaults, nonnegative_int, positive_int, writable_path
from hodlr.fenwick import num_levels
from hodlr.fenwick.scan import FenwickState, matmul

__all__ = ["main", "run"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hodlr bench-decode", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpWithDefaults,
                                epilog="example: hodlr bench-decode --skip matmul --json decode.json")
    p.add_argument("--batch", type=positive_int, default=8, help="sequences stepped together")
    p.add_argument("--dk", type=positive_int, default=64, help="key width")
    p.add_argument("--dv", type=positive_int, default=64, help="value width")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32", help="dtype of the CPU steps")
    p.add_argument("--threads", type=positive_int, default=1,
                   help="torch CPU threads (1: the steps are small, and OpenMP threads on "
                        "shared cores make the timings erratic)")
    p.add_argument("--positions", type=nonnegative_int, nargs=2, default=(8, 16), metavar=("A", "B"),
                   help="time steps around positions 2**A and 2**B (exponents)")
    p.add_argument("--window", type=positive_int, default=256, help="steps timed per repeat (<= 2**A)")
    p.add_argument("--repeats", type=positive_int, default=7, help="timed windows per position (their median)")
    p.add_argument("--memory-exponent", type=nonnegative_int, default=20, help="measure state memory at 2**E")
    p.add_argument("--walk", action="store_true",
                   help="also prefill all 2**E tokens at width 1 and report the peak slot count")
    p.add_argument("--matmul-exponents", type=nonnegative_int, nargs=2, default=(10, 18), metavar=("LO", "HI"),
                   help="time the matmul at T = 2**LO .. 2**HI (exponents)")
    p.add_argument("--matmul-d", type=positive_int, default=64, help="columns of X for the matmul growth")
    p.add_argument("--matmul-libraries", nargs="+", choices=("numpy", "torch"), default=("numpy", "torch"),
                   help="array libraries of the matmul growth")
    p.add_argument("--matmul-repeats", type=positive_int, default=2, help="calls per length (the best)")
    p.add_argument("--skip", nargs="*", choices=("step", "memory", "matmul"), default=(),
                   help="measurements to leave out")
    p.add_argument("--gpu-step", action="store_true", help="also time the Triton decode step on the GPU")
    p.add_argument("--gpu-device", default="cuda", help="device of --gpu-step (cpu: interpreter smoke test)")
    p.add_argument("--gpu-batch", type=positive_int, default=64, help="sequences of --gpu-step")
    p.add_argument("--gpu-heads", type=positive_int, default=16, help="heads of --gpu-step")
    p.add_argument("--gpu-d", type=positive_int, default=64, help="Dk = Dv of --gpu-step")
    p.add_argument("--gpu-positions", type=nonnegative_int, nargs="+", default=(2**16 - 1, 2**16),
                   help="positions (not exponents) the --gpu-step sequences step from")
    p.add_argument("--gpu-replays", type=positive_int, default=200, help="CUDA-graph replays timed")
    p.add_argument("--gpu-dtype", choices=("float32", "bfloat16"), default="bfloat16",
                   help="dtype of q, k, v (the state is float32)")
    p.add_argument("--json", type=writable_path, metavar="PATH",
                   help="also write the results as JSON (after each measurement: a stopped run keeps the finished ones)")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="random inputs' seed")
    return p


def _torch(threads: int):
    import torch

    torch.set_num_threads(threads)
    return torch


def _fast_forward(state, torch, position: int, gen, chunk: int = 1 << 14):
    """``state.extend`` to ``position`` in chunks (same random chunk reused: the timing and
    the memory do not depend on the values)."""
    B, Dk, Dv = int(np.prod(state.batch_shape)), state.Dk, state.Dv
    size = min(chunk, max(position, 1))
    k = torch.randn(B, size, Dk, generator=gen, dtype=state.dtype) / math.sqrt(Dk)
    v = torch.randn(B, size, Dv, generator=gen, dtype=state.dtype)
    g = -0.01 * torch.rand(B, size, generator=gen, dtype=state.dtype)
    peak = state.nbytes
    while state.position < position:
        n = min(size, position - state.position)
        state.extend(k[:, :n], v[:, :n], g[:, :n])
        peak = max(peak, state.nbytes)
    return peak


def _step_inputs(torch, gen, n, B, Dk, Dv, L, dtype):
    q = torch.randn(n, B, Dk, generator=gen, dtype=dtype) / math.sqrt(Dk)
    k = torch.randn(n, B, Dk, generator=gen, dtype=dtype) / math.sqrt(Dk)
    v = torch.randn(n, B, Dv, generator=gen, dtype=dtype)
    lam = torch.rand(n, B, L, generator=gen, dtype=dtype)
    g = -0.01 * torch.rand(n, B, generator=gen, dtype=dtype)
    return q, k, v, lam, g


def _time_steps(args, torch, dtype, exponent, gen):
    W = args.window
    start = (1 << exponent) - W // 2
    state = FenwickState((args.batch,), args.dk, args.dv, dtype=dtype)
    _fast_forward(state, torch, start, gen)
    q, k, v, lam, g = _step_inputs(torch, gen, W, args.batch, args.dk, args.dv, num_levels(start + W), dtype)
    wall = cpu = 0.0
    for i in range(W):
        c0, t0 = time.process_time(), time.perf_counter()
        state.step(q[i], k[i], v[i], lam[i], g[i])
        wall += time.perf_counter() - t0
        cpu += time.process_time() - c0
    return wall / W, cpu / W


def _bench_steps(args, torch, dtype):
    a, b = args.positions
    gen = torch.Generator().manual_seed(args.seed)
    means = {a: [], b: []}
    for _ in range(args.repeats):
        for e in (a, b):
            means[e].append(_time_steps(args, torch, dtype, e, gen))
    out = {}
    for e in (a, b):
        lo = (1 << e) - args.window // 2
        pops = [bin(p).count("1") for p in range(lo, lo + args.window)]
        wall = [m[0] for m in means[e]]
        cpu = [m[1] for m in means[e]]
        out[f"2^{e}"] = {
            "positions": [lo, lo + args.window],
            "mean_live_states": sum(pops) / len(pops),
            "best_mean_us": min(wall) * 1e6,
            "median_mean_us": statistics.median(wall) * 1e6,
            "best_mean_cpu_us": min(cpu) * 1e6,
        }
    best = {e: min(m[0] for m in means[e]) for e in (a, b)}
    median = {e: statistics.median(m[0] for m in means[e]) for e in (a, b)}
    out["ratio_best"] = best[b] / best[a]
    out["ratio_median"] = median[b] / median[a]
    out["ratio_best_cpu"] = out[f"2^{b}"]["best_mean_cpu_us"] / out[f"2^{a}"]["best_mean_cpu_us"]
    out["target_ratio"] = 2.5
    return out


def _bench_memory(args, torch, dtype):
    E = args.memory_exponent
    P = 1 << E
    gen = torch.Generator().manual_seed(args.seed)
    state = FenwickState((args.batch,), args.dk, args.dv, dtype=dtype)
    t0 = time.perf_counter()
    peak = _fast_forward(state, torch, P - 1, gen)
    live_before = state.num_states
    q, k, v, lam, g = _step_inputs(torch, gen, 1, args.batch, args.dk, args.dv, num_levels(P), dtype)
    state.step(q[0], k[0], v[0], lam[0], g[0])
    peak = max(peak, state.nbytes)
    itemsize = torch.empty((), dtype=dtype).element_size()
    matrix = args.dk * args.dv * args.batch * itemsize
    out = {
        "position": state.position,
        "live_states_at_2^E-1": live_before,
        "live_states": state.num_states,
        "slots": state.capacity,
        "nbytes": state.nbytes,
        "peak_nbytes": peak,
        "state_matrices_bytes": state.capacity * matrix,
        "decay_factor_bytes": state.capacity * args.batch * itemsize,
        "bound_bytes": (E + 1) * matrix,
        "seconds": time.perf_counter() - t0,
    }
    if args.walk:
        t0 = time.perf_counter()
        walk = FenwickState((1,), 1, 1, dtype=np.float64)
        rng = np.random.default_rng(args.seed)
        x = rng.standard_normal((1, P, 1))
        walk.prefill(x, x, x, np.ones((1, P, E + 1)), -0.01 * rng.random((1, P)))
        out["walk"] = {"position": walk.position, "peak_slots": walk.capacity,
                       "seconds": time.perf_counter() - t0}
    return out


def _bench_matmul(args):
    lo, hi = args.matmul_exponents
    lengths = [1 << e for e in range(lo, hi + 1)]
    out = {}
    for library in args.matmul_libraries:
        inputs = {}
        for T in lengths:
            rng = np.random.default_rng(args.seed)
            lam = rng.uniform(0.5, 1.0, (T, num_levels(T)))
            g = -rng.uniform(0.0, 1.0, T)
            x = rng.standard_normal((T, args.matmul_d))
            if library == "torch":
                torch = _torch(args.threads)
                lam, g, x = (torch.as_tensor(a, dtype=torch.float32) for a in (lam, g, x))
            inputs[T] = (lam, g, x)
        wall = {T: math.inf for T in lengths}
        cpu = {T: math.inf for T in lengths}
        for _ in range(args.matmul_repeats):  # repeats interleaved over T: interference spreads evenly
            for T in lengths:
                c0, t0 = time.process_time(), time.perf_counter()
                matmul(*inputs[T])
                wall[T] = min(wall[T], time.perf_counter() - t0)
                cpu[T] = min(cpu[T], time.process_time() - c0)
        out[library] = {
            "dtype": "float64" if library == "numpy" else "float32",
            "D": args.matmul_d,
            "seconds": {str(T): wall[T] for T in lengths},
            "cpu_seconds": {str(T): cpu[T] for T in lengths},
            "us_per_token": {str(T): wall[T] / T * 1e6 for T in lengths},
            "exponent_fit": _slope(lengths, [wall[T] for T in lengths]),
            "exponent_endpoints": _slope(lengths[:: max(len(lengths) - 1, 1)], [wall[lengths[0]], wall[lengths[-1]]]),
            "exponent_fit_cpu": _slope(lengths, [cpu[T] for T in lengths]),
            "target_exponent": 1.2,
        }
    return out


def _slope(lengths, seconds) -> float:
    """Least-squares slope of log(seconds) against log(T)."""
    if len(lengths) < 2 or min(seconds) <= 0:
        return float("nan")
    return float(np.polyfit(np.log(lengths), np.log(seconds), 1)[0])


def _step_bytes(p: int, B: int, H: int, D: int) -> int:
    """State bytes one step from position ``p`` must move: every live slot read, every live slot
    written (decayed, or cleared when it merges) and the merged slot written, float32."""
    live = bin(p).count("1")
    return (2 * live + 1) * B * H * D * D * 4


def _gpu_timer(torch, device):
    """``time(fn, repeats) -> seconds per call``: CUDA events on a GPU, the wall clock otherwise."""
    if device.type == "cuda":
        def time_it(fn, repeats):
            fn()
            torch.cuda.synchronize()
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(repeats):
                fn()
            stop.record()
            torch.cuda.synchronize()
            return start.elapsed_time(stop) / 1e3 / repeats
        return time_it

    def time_wall(fn, repeats):
        fn()
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - t0) / repeats
    return time_wall


def _copy_bandwidth(torch, device, time_it, nbytes=1 << 30):
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    seconds = time_it(lambda: dst.copy_(src), 20)
    return 2 * src.numel() * 4 / seconds


def _fla_step(torch, args, p, dtype, device, time_it):
    """fla's log-linear decoding: one token from a state at position ``p`` (seconds per step)."""
    from fla.ops.log_linear_attn import chunk_log_linear_attn

    B, H, D = args.gpu_batch, args.gpu_heads, args.gpu_d
    gen = torch.Generator(device=device).manual_seed(args.seed)
    L = num_levels(p + 1) + 1

    def inputs(n, T):
        q, k, v = (torch.randn(n, T, H, D, generator=gen, device=device, dtype=dtype) / math.sqrt(D) for _ in range(3))
        g = -0.01 * torch.rand(n, T, H, generator=gen, device=device)
        lam = torch.rand(n, T, H, L, generator=gen, device=device, dtype=dtype)
        return q, k, v, g, lam

    _, state = chunk_log_linear_attn(*inputs(1, p), output_final_state=True)
    for name, value in vars(state).items():  # one prefilled sequence, repeated along the batch
        if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == 1:
            setattr(state, name, value.expand(B, *value.shape[1:]).contiguous())
    step = inputs(B, 1)
    return time_it(lambda: chunk_log_linear_attn(*step, initial_state=state, output_final_state=True), 20)


def _bench_gpu_step(args):
    import torch

    import hodlr

    device = torch.device(args.gpu_device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--gpu-step needs a CUDA device (or --gpu-device cpu with TRITON_INTERPRET=1)")
    B, H, D = args.gpu_batch, args.gpu_heads, args.gpu_d
    dtype = getattr(torch, args.gpu_dtype)
    time_it = _gpu_timer(torch, device)
    out = {"batch": B, "heads": H, "D": D, "dtype": args.gpu_dtype, "state_dtype": "float32",
           "copy_bytes_per_s": _copy_bandwidth(torch, device, time_it, 1 << (30 if device.type == "cuda" else 22))}
    gen = torch.Generator(device=device).manual_seed(args.seed)
    for p in args.gpu_positions:
        slots = (p + 1).bit_length()
        state = hodlr.LogLinearState.zeros(B, H, D, D, slots=slots, device=device)
        live = torch.tensor([(p >> i) & 1 for i in range(slots)], dtype=torch.float32, device=device)
        state.states.normal_(generator=gen).mul_(live[:, None, None])
        start = torch.full((B,), p, dtype=torch.int64, device=device)
        state.positions.copy_(start)
        q, k = (torch.randn(B, 1, H, D, generator=gen, device=device).to(dtype) / math.sqrt(D) for _ in range(2))
        v = torch.randn(B, 1, H, D, generator=gen, device=device).to(dtype)
        g = -0.01 * torch.rand(B, 1, H, generator=gen, device=device)
        lam = torch.rand(B, 1, H, slots + 1, generator=gen, device=device)
        beta = torch.rand(B, 1, H, generator=gen, device=device).to(dtype)
        kn = torch.nn.functional.normalize(k.float(), dim=-1).to(dtype)

        def step(backend="triton", gated=False):
            state.positions.copy_(start)
            if gated:
                return hodlr.log_linear_gated_delta_step(q, kn, v, g, beta, lam, state, backend=backend,
                                                         validate=False)
            return hodlr.log_linear_attn_step(q, k, v, g, lam, state, backend=backend, validate=False)

        from hodlr.bench import graph_replay

        def seconds_of(fn):
            replay = graph_replay(torch, fn) if device.type == "cuda" else fn
            return time_it(replay, args.gpu_replays if device.type == "cuda" else 2)

        seconds = seconds_of(step)
        nbytes = _step_bytes(p, B, H, D)
        row = {"position": p, "live_slots": bin(p).count("1"), "slots": slots, "us": seconds * 1e6,
               "state_bytes": nbytes, "bytes_per_s": nbytes / seconds,
               "fraction_of_copy": nbytes / seconds / out["copy_bytes_per_s"]}
        # the Gated DeltaNet step (the same kernel with the write strengths) and its torch form
        gated = seconds_of(lambda: step("triton", True))
        row.update(gated_delta_us=gated * 1e6, gated_delta_fraction_of_copy=nbytes / gated / out["copy_bytes_per_s"],
                   gated_delta_torch_us=seconds_of(lambda: step("torch", True)) * 1e6)
        if device.type == "cuda":
            try:
                row["fla_us"] = _fla_step(torch, args, p, dtype, device, time_it) * 1e6
            except ImportError:
                row["fla_us"] = None
            except Exception as err:  # fla's own refusals (shapes, lengths, shared memory) are reported
                row["fla_error"] = f"{type(err).__name__}: {err}"
        out[str(p)] = row
    return out


def run(argv=None, echo=None) -> dict:
    """Run the benchmark and return the results as a dict.  Each measurement, when done, is handed to
    ``echo`` as its report lines (``main`` prints them) and written to ``--json`` (the file holds what
    has finished, so a long run interrupted keeps its earlier measurements)."""
    parser = _parser()
    args = parser.parse_args(argv)
    for name, (lo, hi) in (("--positions", args.positions), ("--matmul-exponents", args.matmul_exponents)):
        if lo > hi:
            parser.error(f"{name} must be in increasing order, got {lo} {hi}")
    if set(args.skip) >= {"step", "memory", "matmul"} and not args.gpu_step:
        parser.error("--skip step memory matmul leaves nothing to measure (add --gpu-step, or skip less)")
    if args.window > (1 << args.positions[0]):
        parser.error(f"--window {args.window} must be <= 2**{args.positions[0]} (the first of --positions)")
    if args.gpu_step:
        import torch

        try:
            device_type = torch.device(args.gpu_device).type
        except RuntimeError:
            device_type = None
        if device_type not in ("cuda", "cpu"):
            parser.error(f"--gpu-device must be a torch device string of a CUDA device or the CPU, such as cuda, "
                         f"cuda:1 or cpu; got {args.gpu_device!r}")
    results = {"config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()},
               "machine": {"python": platform.python_version(), "processor": platform.processor() or platform.machine()}}

    def done(key, value):
        results[key] = value
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(results, fh, indent=2)
        if echo is not None:
            echo(_REPORTS[key](value))

    if "step" not in args.skip or "memory" not in args.skip:
        torch = _torch(args.threads)
        dtype = getattr(torch, args.dtype)
        results["machine"]["torch"] = torch.__version__
        results["machine"]["torch_threads"] = torch.get_num_threads()
        if "step" not in args.skip:
            done("step", _bench_steps(args, torch, dtype))
        if "memory" not in args.skip:
            done("memory", _bench_memory(args, torch, dtype))
    if "matmul" not in args.skip:
        done("matmul", _bench_matmul(args))
    if args.gpu_step:
        done("gpu_step", _bench_gpu_step(args))
    return results


def _report_step(s: dict) -> str:
    lines = ["per-token FenwickState.step (torch CPU): positions, mean live states, best / median mean step"]
    for key, row in s.items():
        if isinstance(row, dict):
            lines.append(f"  {key:>5}  {row['positions']}  {row['mean_live_states']:.2f}  "
                         f"{row['best_mean_us']:.1f} us / {row['median_mean_us']:.1f} us")
    lines.append(f"  ratio best {s['ratio_best']:.3f}, median {s['ratio_median']:.3f}, "
                 f"best by CPU time {s['ratio_best_cpu']:.3f} (target <= {s['target_ratio']})")
    return "\n".join(lines)


def _report_memory(m: dict) -> str:
    lines = [f"state memory at position {m['position']}: {m['nbytes']} B = {m['slots']} slots "
             f"({m['state_matrices_bytes']} B matrices + {m['decay_factor_bytes']} B decay factors); "
             f"peak {m['peak_nbytes']} B; bound {m['bound_bytes']} B; "
             f"live states {m['live_states']} (at 2^E-1: {m['live_states_at_2^E-1']})"]
    if "walk" in m:
        w = m["walk"]
        lines.append(f"  walk: prefill of {w['position']} tokens, peak slots {w['peak_slots']} ({w['seconds']:.1f} s)")
    return "\n".join(lines)


def _report_matmul(libraries: dict) -> str:
    lines = []
    for library, mm in libraries.items():
        lines.append(f"fenwick matmul growth ({library} {mm['dtype']}, D={mm['D']}): "
                     f"exponent {mm['exponent_fit']:.3f} (fit), {mm['exponent_endpoints']:.3f} (endpoints), "
                     f"{mm['exponent_fit_cpu']:.3f} (fit, CPU time); "
                     f"target <= {mm['target_exponent']}")
        for T, t in mm["seconds"].items():
            lines.append(f"  T={T:>7}  {t:9.4f} s  {mm['us_per_token'][T]:6.2f} us/token  "
                         f"(CPU {mm['cpu_seconds'][T]:.4f} s)")
    return "\n".join(lines)


def _report_gpu_step(gs: dict) -> str:
    lines = [f"decode step (Triton, graph replay), B={gs['batch']} H={gs['heads']} D={gs['D']} {gs['dtype']}, "
             f"float32 state; copy {gs['copy_bytes_per_s'] / 1e12:.2f} TB/s"]
    for key, row in gs.items():
        if isinstance(row, dict):
            fla = (f"fla {row['fla_us']:.1f} us" if row.get("fla_us") else
                   row.get("fla_error", "fla not importable"))
            lines.append(f"  position {row['position']:>7} ({row['live_slots']} live slots): {row['us']:.1f} us, "
                         f"{row['state_bytes'] / 1e6:.1f} MB of states, {row['bytes_per_s'] / 1e12:.2f} TB/s = "
                         f"{100 * row['fraction_of_copy']:.1f}% of copy; {fla}")
            lines.append(f"    Gated DeltaNet: {row['gated_delta_us']:.1f} us "
                         f"({100 * row['gated_delta_fraction_of_copy']:.1f}% of copy), torch step "
                         f"{row['gated_delta_torch_us']:.1f} us")
    return "\n".join(lines)


_REPORTS = {"step": _report_step, "memory": _report_memory, "matmul": _report_matmul, "gpu_step": _report_gpu_step}


def _report(res: dict) -> str:
    """The report lines of every measurement in ``res``."""
    return "\n".join(report(res[key]) for key, report in _REPORTS.items() if key in res)


def main(argv=None) -> int:
    """Command-line entry point (``hodlr bench-decode``): each measurement's lines as it finishes."""
    run(argv, echo=lambda text: print(text, flush=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
