"""Benchmark of context-parallel log-linear attention (``hodlr.distributed``) on N GPUs against one.

Launch on one host with ``torchrun`` (NCCL on GPUs, rank ``r`` on ``cuda:LOCAL_RANK``; gloo with
``--device cpu``)::

    torchrun --nproc_per_node 2 -m hodlr bench-cp --out bench-cp-2gpu

(``-m hodlr.distributed_bench`` is the same).  Every rank must see the same arguments.  Measured,
with ``B`` sequences of ``H`` heads, ``Dk = Dv = D`` (``--batch``, ``--heads``, ``--head-dim``;
default 1, 16, 64), bfloat16 ``q, k, v`` and a float32 log-decay and level scales, every local call
on ``--backend`` (default ``auto``: ``triton`` on CUDA, ``chunked`` on the CPU):

1. **Equality** at the lengths of ``--check`` (default ``2**17`` and ``2**20`` total; each must fit
   one device): every rank builds the whole inputs from one seed, runs the single-device
   :func:`hodlr.log_linear_attn` on all of them and the context-parallel call on its shard, and
   compares its shard of the output, of the final state and of the gradients of ``q, k, v, g`` and
   the level scales (relative error, the largest over the ranks), in float32 and bfloat16
   (tolerances 1e-5 and 1e-2 of ``hodlr.testing.TOLERANCES``; the gradients are sums over many
   more terms and get 10x).  A length whose single-device reference runs out of memory on a device
   is reported as not checked, on every rank together.
2. **Time** of the forward (no gradient) and of forward + backward at the total lengths of
   ``--strong`` (default ``2**20``, ``2**21``: the same sequence split over the N devices) and at
   N times the per-device lengths of ``--weak`` (default none; issue it as ``--weak 20`` for
   ``2**20`` tokens per device), against one device on the same total length (strong) or on the
   per-device length (weak): CUDA events, the median of ``--reps`` runs after ``--warmup``; a
   context-parallel time is the slowest rank's.  ``ratio`` is N devices over one.
3. **Communication**, shown apart: the bytes each rank hands to the states ``all_gather`` and to the
   ``reduce_scatter`` of their gradients (measured by :func:`hodlr.distributed.record_communication`,
   beside :func:`hodlr.distributed.payload_bytes`), the time of those collectives inside the call
   (the device synchronised around each: waiting for the slowest rank included), and the time of
   the same collectives alone on a tensor of that size.

Rank 0 prints each equality line and each row of the table as it is measured, and writes
``bench-cp.json`` (after every row; ``"complete"`` is true once the run ends) and, at the end,
``bench-cp.png`` (the times against the total length, the communication apart, and the equality
errors; needs matplotlib) into the directory ``--out``.  The exit status is 1 when an equality check fails.  ``--device cpu``
(gloo) runs the same code at small sizes (a smoke test, e.g. ``--check 6 --strong 8 --reps 1
--warmup 0 --dtype float32``).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import math
import os
import platform
import statistics
import time

from hodlr.bench import nonnegative_int, positive_int

__all__ = ["main", "run"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hodlr bench-cp", description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=positive_int, default=1, help="sequences B (default 1)")
    p.add_argument("--heads", type=positive_int, default=16, help="heads H (default 16)")
    p.add_argument("--head-dim", type=positive_int, default=64, help="Dk = Dv (default 64)")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16", help="of q, k, v for the timings")
    p.add_argument("--backend", default="auto", help="backend of every local call (default: auto)")
    p.add_argument("--check", type=nonnegative_int, nargs="*", default=[17, 20], metavar="E",
                   help="equality at total lengths 2**E (default 17 20)")
    p.add_argument("--check-dtypes", nargs="*", choices=("bfloat16", "float32"), default=["float32", "bfloat16"])
    p.add_argument("--strong", type=nonnegative_int, nargs="*", default=[20, 21], metavar="E",
                   help="strong scaling: total lengths 2**E (default 20 21)")
    p.add_argument("--weak", type=nonnegative_int, nargs="*", default=[], metavar="E",
                   help="weak scaling: 2**E tokens per device (default none)")
    p.add_argument("--no-single", action="store_true", help="skip the one-device baselines")
    p.add_argument("--reps", type=positive_int, default=10, help="timed runs, the median kept (default 10)")
    p.add_argument("--warmup", type=nonnegative_int, default=3, help="untimed runs first (default 3)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cuda: rank r on cuda:LOCAL_RANK, NCCL (default); cpu: gloo")
    p.add_argument("--seed", type=nonnegative_int, default=0)
    p.add_argument("--out", default=None, metavar="DIR",
                   help="directory for bench-cp.json and bench-cp.png (rank 0 writes them)")
    p.add_argument("--commit", default=None, help="commit to record (default: git rev-parse HEAD)")
    return p


def _inputs(T, args, dtype, device, seed, requires_grad=False):
    """``q, k, v, g, level_scales`` of ``T`` tokens (the fla layout), from ``seed``."""
    import torch

    from hodlr import fenwick

    gen = torch.Generator(device=device).manual_seed(seed)
    B, H, D = args.batch, args.heads, args.head_dim
    L = fenwick.num_levels(max(T, 1))
    q, k, v = (torch.randn((B, T, H, D), generator=gen, device=device).to(dtype) for _ in range(3))
    k = k * D ** -0.5
    g = -torch.rand((B, T, H), generator=gen, device=device) * 0.1
    lam = torch.rand((B, T, H, L), generator=gen, device=device) + 0.5
    out = [q, k, v, g, lam]
    return [x.requires_grad_() for x in out] if requires_grad else out


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, reps, warmup, device, group, together=True):
    """Median milliseconds of ``fn()`` on this rank; ``together``: the ranks of ``group`` (default
    the world) start every run together (a barrier, the device synchronised after it)."""
    import torch
    import torch.distributed as dist

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(reps, 1)):
        _sync(device)
        if together:
            dist.barrier(group=group)
            _sync(device)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def _slowest(value, device, group):
    """The largest ``value`` over the ranks."""
    import torch
    import torch.distributed as dist

    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return float(t)


def _rel(a, b):
    import torch

    a, b = a.detach().double(), b.detach().double()
    denom = torch.linalg.vector_norm(b)
    return float(torch.linalg.vector_norm(a - b) / denom) if denom > 0 else float(torch.linalg.vector_norm(a - b))


def _equality(T, dtype_name, args, device, group, rank, world):
    """Largest relative errors (over the ranks) of the shards against one device."""
    import torch

    import hodlr
    from hodlr.distributed import log_linear_attn as cp_attn, shard_offsets

    dtype = getattr(torch, dtype_name)
    off = shard_offsets(T, world)
    sl = slice(off[rank], off[rank + 1])
    gen = torch.Generator(device=device).manual_seed(args.seed + 1)
    try:  # the single-device reference, on every rank's device; only this rank's shards are kept
        full = _inputs(T, args, dtype, device, args.seed, requires_grad=True)
        o, fin = hodlr.log_linear_attn(*full, output_final_state=True, backend=args.backend)
        w = torch.randn(o.shape, generator=gen, device=device).to(o.dtype)
        wf = torch.randn(fin.states.shape, generator=gen, device=device)
        loss = (o.float() * w.float()).sum() + (fin.states * wf).sum()  # the sum of every rank's loss below
        ref = [x[:, sl].clone() for x in torch.autograd.grad(loss, full)]
        o, w, fin = o.detach()[:, sl].clone(), w[:, sl].clone(), fin.states.detach()
        shard = [x.detach()[:, sl].clone().requires_grad_() for x in full]
        del full, loss
        short = 0.0
    except torch.cuda.OutOfMemoryError as err:
        short, reason = 1.0, str(err).splitlines()[0]
    if _slowest(short, device, group):  # every rank skips together (none waits in a collective)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return {"tokens": T, "dtype": dtype_name, "errors": {}, "pass": None,
                "error": "out of memory on one device: not checked" + (f" ({reason})" if short else "")}
    o2, fin2 = cp_attn(*shard, output_final_state=True, group=group, backend=args.backend)
    loss = (o2.float() * w.float()).sum() + (rank == world - 1) * (fin2.states * wf).sum()
    got = torch.autograd.grad(loss, shard)
    errors = {"o": _rel(o2, o), "final_state": _rel(fin2.states, fin)}
    for name, a, b in zip(("dq", "dk", "dv", "dg", "dlevel_scales"), got, ref):
        errors[name] = _rel(a, b)
    errors = {name: _slowest(e, device, group) for name, e in errors.items()}
    from hodlr.testing import TOLERANCES

    tol = TOLERANCES["gpu_float32" if dtype_name == "float32" else "gpu_bfloat16"]
    ok = all(e <= (tol if name in ("o", "final_state") else 10 * tol) for name, e in errors.items())
    return {"tokens": T, "dtype": dtype_name, "errors": errors, "tolerance": tol, "pass": ok}


def _collective_alone(nbytes, device, group, world, reps, warmup):
    """Milliseconds of the states ``all_gather`` alone, and with its backward, on ``nbytes`` per rank."""
    import torch

    from hodlr.distributed import _all_gather

    if not nbytes:
        return 0.0, 0.0
    x = torch.zeros(nbytes // 4, dtype=torch.float32, device=device, requires_grad=True)
    fwd = _timed(lambda: _all_gather(x.detach(), group, world, "alone"), reps, warmup, device, group)
    both = _timed(lambda: _all_gather(x, group, world, "alone").sum().backward(), reps, warmup, device, group)
    return _slowest(fwd, device, group), _slowest(both, device, group)


def _scaling(T_cp, T_single, mode, args, device, group, rank, world):
    """One row of the timing table: N devices on ``T_cp`` tokens against one on ``T_single``."""
    import torch
    import torch.distributed as dist

    import hodlr
    from hodlr.distributed import log_linear_attn as cp_attn, payload_bytes, record_communication, shard_offsets

    dtype = getattr(torch, args.dtype)
    off = shard_offsets(T_cp, world)
    local = off[rank + 1] - off[rank]
    row = {"mode": mode, "devices": world, "tokens": T_cp, "tokens_per_device": local, "single_tokens": T_single}
    shard = _inputs(local, args, dtype, device, args.seed + 7 + rank, requires_grad=True)
    # levels of the global positions need num_levels(T_cp) scales
    from hodlr import fenwick

    L = fenwick.num_levels(T_cp)
    shard[4] = torch.nn.functional.pad(shard[4].detach(), (0, L - shard[4].shape[-1]), value=1.0).requires_grad_()

    def forward():
        with torch.no_grad():
            cp_attn(*shard, group=group, backend=args.backend)

    def both():
        o, _ = cp_attn(*shard, group=group, backend=args.backend)
        o.float().sum().backward()

    row["fwd_ms"] = _slowest(_timed(forward, args.reps, args.warmup, device, group), device, group)
    row["fwdbwd_ms"] = _slowest(_timed(both, args.reps, args.warmup, device, group), device, group)
    with record_communication(timed=True) as rec:
        both()
    formula = payload_bytes(args.batch, args.heads, T_cp.bit_length() if T_cp else 0, args.head_dim,
                             args.head_dim)
    row["bytes"] = {"payload_forward": rec.total("payload", "states", "forward"),
                    "payload_backward": rec.total("payload", "states", "backward"),
                    "payload_formula": formula,
                    "sent_per_rank_forward": rec.total("sent", "states", "forward"),
                    "sent_per_rank_backward": rec.total("sent", "states", "backward"),
                    "metadata_payload": rec.total("payload", "metadata")}
    row["comm_in_call_ms"] = {
        "states_forward": _slowest(1e3 * rec.total("seconds", "states", "forward"), device, group),
        "states_backward": _slowest(1e3 * rec.total("seconds", "states", "backward"), device, group),
        "metadata": _slowest(1e3 * rec.total("seconds", "metadata"), device, group)}
    alone_f, alone_fb = _collective_alone(row["bytes"]["payload_forward"], device, group, world, args.reps,
                                          args.warmup)
    row["comm_alone_ms"] = {"all_gather": alone_f, "all_gather_and_reduce_scatter": alone_fb}
    del shard
    if not args.no_single:
        single = {}
        if rank == 0:
            full = _inputs(T_single, args, dtype, device, args.seed + 3, requires_grad=True)

            def forward1():
                with torch.no_grad():
                    hodlr.log_linear_attn(*full, backend=args.backend)

            def both1():
                o, _ = hodlr.log_linear_attn(*full, backend=args.backend)
                o.float().sum().backward()

            try:
                single = {"fwd_ms": _timed(forward1, args.reps, args.warmup, device, None, together=False),
                          "fwdbwd_ms": _timed(both1, args.reps, args.warmup, device, None, together=False)}
            except torch.cuda.OutOfMemoryError as err:
                single = {"error": f"out of memory: {str(err).splitlines()[0]}"}
            del full
        box = [single]
        dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
        row["single"] = box[0]
        if "fwd_ms" in row["single"]:
            row["ratio_fwd"] = row["fwd_ms"] / row["single"]["fwd_ms"]
            row["ratio_fwdbwd"] = row["fwdbwd_ms"] / row["single"]["fwdbwd_ms"]
    if device.type == "cuda":
        row["peak_memory_gib"] = _slowest(torch.cuda.max_memory_allocated(device) / 2**30, device, group)
        torch.cuda.reset_peak_memory_stats(device)
    return row


def run(args, group=None, on_row=None) -> dict:
    """The measurements of the module docstring, in the initialised process group ``group``
    (default the world); every rank returns the same dict.  ``on_row(result, kind, row)``, when
    given, is called after each equality check (``kind`` ``"check"``) and each timing row
    (``"timings"``), with ``result`` holding every row so far (``"complete"`` false until the end)."""
    import torch
    import torch.distributed as dist

    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if args.device == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    from hodlr import ops
    from hodlr.bench import _commit

    resolved = ops._resolve(args.backend, device, 1 << max(args.strong + args.check + [0]), True)
    result = {"devices": world, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else
              platform.processor() or platform.machine(), "backend": args.backend,
              "backend_resolved": resolved.__name__.rsplit(".", 1)[-1], "torch": torch.__version__,
              "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "commit": _commit(args.commit),
              "config": {"batch": args.batch, "heads": args.heads, "head_dim": args.head_dim, "dtype": args.dtype,
                         "reps": args.reps, "warmup": args.warmup},
              "check": [], "timings": [], "complete": False}

    def add(kind, row):
        result[kind].append(row)
        if on_row is not None:
            on_row(result, kind, row)

    for e in args.check:
        for name in args.check_dtypes:
            add("check", _equality((1 << e), name, args, device, group, rank, world))
    for e in args.strong:
        add("timings", _scaling((1 << e), (1 << e), "strong", args, device, group, rank, world))
    for e in args.weak:
        add("timings", _scaling(world * (1 << e), (1 << e), "weak", args, device, group, rank, world))
    result["complete"] = True
    return result


def check_line(c) -> str:
    """One equality check of :func:`run`'s result as a line of text."""
    verdict = {True: "pass", False: "FAIL", None: c.get("error")}[c["pass"]]
    return f"equality T={c['tokens']} {c['dtype']}: {verdict} " + " ".join(f"{k}={v:.1e}" for k, v in c["errors"].items())


TABLE_HEAD = ("| mode | devices | tokens | fwd ms (1 device) | fwd ms (N) | ratio N / 1 | fwd+bwd ms (1 device) | "
              "fwd+bwd ms (N) | ratio N / 1 | states all_gather ms | reduce_scatter ms | bytes sent per rank (fwd) |\n"
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")


def table_row(r) -> str:
    """One timing row of :func:`run`'s result as a line of the Markdown table (:data:`TABLE_HEAD`)."""
    s = r.get("single", {})
    return (f"| {r['mode']} | {r['devices']} | {r['tokens']} | {s.get('fwd_ms', float('nan')):.2f} | "
            f"{r['fwd_ms']:.2f} | {r.get('ratio_fwd', float('nan')):.2f} | "
            f"{s.get('fwdbwd_ms', float('nan')):.2f} | {r['fwdbwd_ms']:.2f} | "
            f"{r.get('ratio_fwdbwd', float('nan')):.2f} | {r['comm_in_call_ms']['states_forward']:.3f} | "
            f"{r['comm_in_call_ms']['states_backward']:.3f} | {r['bytes']['sent_per_rank_forward']} |")


def table(result) -> str:
    """Markdown table of the timings of :func:`run`'s result."""
    return "\n".join([TABLE_HEAD] + [table_row(r) for r in result["timings"]])


def plot(result, path) -> None:
    """``path`` (PNG): per scaling mode, the forward and forward + backward times of one device and
    of N against the total length, with the states collectives' time inside the N-device call (the
    communication, apart); and the equality errors against one device."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m in ("strong", "weak") if any(r["mode"] == m for r in result["timings"])]
    fig, axes = plt.subplots(1, len(modes) + 1, figsize=(5.2 * (len(modes) + 1), 4.4), squeeze=False)
    N = result["devices"]
    for ax, mode in zip(axes[0], modes):
        rows = [r for r in result["timings"] if r["mode"] == mode]
        x = [r["tokens"] for r in rows]
        for key, label, style in (("fwd_ms", "fwd", "-"), ("fwdbwd_ms", "fwd+bwd", "--")):
            single = [r.get("single", {}).get(key, math.nan) for r in rows]
            if not all(math.isnan(y) for y in single):
                ax.plot(x, single, marker="o", color="C0", ls=style, label=f"1 device {label}")
            ax.plot(x, [r[key] for r in rows], marker="s", color="C1", ls=style, label=f"{N} devices {label}")
        comm = [r["comm_in_call_ms"]["states_forward"] + r["comm_in_call_ms"]["states_backward"] for r in rows]
        ax.plot(x, comm, marker="^", color="C3", ls=":", label=f"{N} devices: all_gather + reduce_scatter")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("total tokens" + (" (1 device: tokens / N)" if mode == "weak" else ""))
        ax.set_ylabel("ms (median; N devices: slowest rank)")
        ax.set_title(f"{mode} scaling")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    ax = axes[0][-1]
    for dtype, color in (("float32", "C0"), ("bfloat16", "C1")):
        checks = [c for c in result["check"] if c["dtype"] == dtype and c["errors"]]
        if checks:
            x = [c["tokens"] for c in checks]
            ax.plot(x, [c["errors"]["o"] for c in checks], marker="o", color=color, label=f"{dtype} o")
            ax.plot(x, [max(c["errors"].values()) for c in checks], marker="s", color=color, ls="--",
                    label=f"{dtype} worst of o, state, gradients")
            ax.axhline(checks[0]["tolerance"], color=color, ls=":", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("total tokens")
    ax.set_ylabel("relative error against 1 device")
    ax.set_title("equality (dotted: tolerance of o)")
    ax.grid(True, which="both", alpha=0.3)
    if result["check"]:
        ax.legend(fontsize=7)
    c = result["config"]
    fig.suptitle(f"hodlr context parallelism: {N} x {result['device']}, backend {result['backend_resolved']}, "
                 f"B={c['batch']} H={c['heads']} D={c['head_dim']} {c['dtype']}  {result['date']}  "
                 f"commit {result['commit'][:10]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    """Entry point (under ``torchrun``): initialise the process group, run, report on rank 0."""
    import torch
    import torch.distributed as dist

    args = _parser().parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("hodlr bench-cp: no CUDA device (use --device cpu for the gloo smoke run)")
    started = not dist.is_initialized()
    if started:
        if "RANK" not in os.environ:
            raise SystemExit("hodlr bench-cp: launch it with torchrun --nproc_per_node N -m hodlr bench-cp ...")
        if args.device == "cuda":  # rank r of this host on cuda:LOCAL_RANK, NCCL
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    from hodlr.bench import write

    lead = dist.get_rank() == 0
    paths = [os.path.join(args.out, name) for name in ("bench-cp.json", "bench-cp.png")] if args.out else None
    if lead and paths:
        os.makedirs(args.out, exist_ok=True)

    def on_row(result, kind, row):  # rank 0: each row as soon as it is known, and the JSON so far
        if not lead:
            return
        if kind == "timings" and len(result["timings"]) == 1:
            print(TABLE_HEAD, flush=True)
        print(check_line(row) if kind == "check" else table_row(row), flush=True)
        if paths:
            write(result, paths[0], None, None)

    try:
        result = run(args, on_row=on_row)
        if lead and paths:
            try:
                write(result, *paths, plot)
            except ImportError:
                paths[1] = "no picture: matplotlib is not installed"
            print("wrote " + ", ".join(paths))
        return 1 if any(c["pass"] is False for c in result["check"]) else 0
    finally:
        if started:
            dist.destroy_process_group()


if __name__ == "__main__":
    raise SystemExit(main())
