"""Benchmark of context-parallel log-linear attention (``hodlr.distributed``) on N GPUs against one.

Launch on one host with ``torchrun`` (NCCL on GPUs; gloo with ``--device cpu``)::

    torchrun --nproc_per_node 2 -m hodlr.distributed_bench --out cp-2.json

(``hodlr bench-cp`` is the same module).  Every rank must see the same arguments.  Measured, with
``B`` sequences of ``H`` heads, ``Dk = Dv = D`` (default 1, 16, 64), bfloat16 ``q, k, v`` and a
float32 log-decay and level scales:

1. **Equality** at the lengths of ``--check`` (default ``2**17`` and ``2**20`` total; each must fit
   one device): every rank builds the whole inputs from one seed, runs the single-device
   :func:`hodlr.log_linear_attn` on all of them and the context-parallel call on its shard, and
   compares its shard of the output, of the final state and of the gradients of ``q, k, v, g`` and
   the level scales (relative error, the largest over the ranks), in float32 and bfloat16
   (tolerances 1e-5 and 1e-2 of ``hodlr.testing.TOLERANCES``; the gradients are sums over many
   more terms and get 10x).
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

Rank 0 prints a table and writes the JSON (``--out``).  ``--device cpu`` (gloo) runs the same code at
small sizes (a smoke test, e.g. ``--check 6 --strong 8 --reps 1 --warmup 0 --dtype float32``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

__all__ = ["main", "run"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hodlr bench-cp", description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--d", type=int, default=64, help="Dk = Dv")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16", help="of q, k, v for the timings")
    p.add_argument("--backend", default="auto", help="backend of every local call (default: auto)")
    p.add_argument("--check", type=int, nargs="*", default=[17, 20], metavar="E",
                   help="equality at total lengths 2**E (default 17 20)")
    p.add_argument("--check-dtypes", nargs="*", choices=("bfloat16", "float32"), default=["float32", "bfloat16"])
    p.add_argument("--strong", type=int, nargs="*", default=[20, 21], metavar="E",
                   help="strong scaling: total lengths 2**E (default 20 21)")
    p.add_argument("--weak", type=int, nargs="*", default=[], metavar="E",
                   help="weak scaling: 2**E tokens per device (default none)")
    p.add_argument("--no-single", action="store_true", help="skip the one-device baselines")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON file written by rank 0")
    return p


def _inputs(T, args, dtype, device, seed, requires_grad=False):
    """``q, k, v, g, level_scales`` of ``T`` tokens (the fla layout), from ``seed``."""
    import torch

    from hodlr import fenwick

    gen = torch.Generator(device=device).manual_seed(seed)
    B, H, D = args.batch, args.heads, args.d
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


def _timed(fn, reps, warmup, device, group):
    """Median milliseconds of ``fn()`` on this rank (the ranks start together)."""
    import torch
    import torch.distributed as dist

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(reps, 1)):
        _sync(device)
        if group is not None:
            dist.barrier(group=group)
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

    a, b = a.double(), b.double()
    denom = torch.linalg.vector_norm(b)
    return float(torch.linalg.vector_norm(a - b) / denom) if denom > 0 else float(torch.linalg.vector_norm(a - b))


def _equality(T, dtype_name, args, device, group, rank, world):
    """Largest relative errors (over the ranks) of the shards against one device."""
    import torch

    import hodlr
    from hodlr.distributed import log_linear_attn as cp_attn, shard_offsets

    dtype = getattr(torch, dtype_name)
    full = _inputs(T, args, dtype, device, args.seed, requires_grad=True)
    o, fin = hodlr.log_linear_attn(*full, output_final_state=True, backend=args.backend)
    gen = torch.Generator(device=device).manual_seed(args.seed + 1)
    w = torch.randn(o.shape, generator=gen, device=device).to(o.dtype)
    wf = torch.randn(fin.states.shape, generator=gen, device=device)
    ref = torch.autograd.grad((o.float() * w.float()).sum() + (fin.states * wf).sum(), full)
    o, fin = o.detach(), fin.states.detach()
    off = shard_offsets(T, world)
    sl = slice(off[rank], off[rank + 1])
    shard = [x.detach()[:, sl].clone().requires_grad_() for x in full]
    del full
    o2, fin2 = cp_attn(*shard, output_final_state=True, group=group, backend=args.backend)
    loss = (o2.float() * w[:, sl].float()).sum() + (rank == world - 1) * (fin2.states * wf).sum()
    got = torch.autograd.grad(loss, shard)
    errors = {"o": _rel(o2, o[:, sl]), "final_state": _rel(fin2.states, fin)}
    for name, a, b in zip(("dq", "dk", "dv", "dg", "dlevel_scales"), got, ref):
        errors[name] = _rel(a, b[:, sl])
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
    formula = payload_bytes(args.batch, args.heads, T_cp.bit_length() if T_cp else 0, args.d, args.d)
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
                single = {"fwd_ms": _timed(forward1, args.reps, args.warmup, device, None),
                          "fwdbwd_ms": _timed(both1, args.reps, args.warmup, device, None)}
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


def run(args, group=None) -> dict:
    """The measurements of the module docstring, in the initialised process group ``group``
    (default the world); every rank returns the same dict."""
    import torch
    import torch.distributed as dist

    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if args.device == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    result = {"devices": world, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else
              platform.processor() or platform.machine(), "backend": args.backend, "torch": torch.__version__,
              "config": {"batch": args.batch, "heads": args.heads, "d": args.d, "dtype": args.dtype,
                         "reps": args.reps, "warmup": args.warmup},
              "check": [], "timings": []}
    for e in args.check:
        for name in args.check_dtypes:
            result["check"].append(_equality((1 << e), name, args, device, group, rank, world))
    for e in args.strong:
        result["timings"].append(_scaling((1 << e), (1 << e), "strong", args, device, group, rank, world))
    for e in args.weak:
        result["timings"].append(_scaling(world * (1 << e), (1 << e), "weak", args, device, group, rank, world))
    return result


def table(result) -> str:
    """Markdown table of the timings of :func:`run`'s result."""
    lines = ["| mode | devices | tokens | fwd ms (1 device) | fwd ms (N) | ratio | fwd+bwd ms (1 device) | "
             "fwd+bwd ms (N) | ratio | states all_gather ms | reduce_scatter ms | bytes sent per rank (fwd) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["timings"]:
        s = r.get("single", {})
        lines.append(
            f"| {r['mode']} | {r['devices']} | {r['tokens']} | {s.get('fwd_ms', float('nan')):.2f} | "
            f"{r['fwd_ms']:.2f} | {r.get('ratio_fwd', float('nan')):.2f} | "
            f"{s.get('fwdbwd_ms', float('nan')):.2f} | {r['fwdbwd_ms']:.2f} | "
            f"{r.get('ratio_fwdbwd', float('nan')):.2f} | {r['comm_in_call_ms']['states_forward']:.3f} | "
            f"{r['comm_in_call_ms']['states_backward']:.3f} | {r['bytes']['sent_per_rank_forward']} |")
    return "\n".join(lines)


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
            raise SystemExit("hodlr bench-cp: launch it with torchrun --nproc_per_node N -m hodlr.distributed_bench")
        if args.device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    try:
        result = run(args)
        if dist.get_rank() == 0:
            for c in result["check"]:
                print(f"equality T={c['tokens']} {c['dtype']}: {'pass' if c['pass'] else 'FAIL'} "
                      + " ".join(f"{k}={v:.1e}" for k, v in c["errors"].items()))
            print(table(result))
            if args.out:
                with open(args.out, "w") as fh:
                    json.dump(result, fh, indent=1)
        return 0 if all(c["pass"] for c in result["check"]) else 1
    finally:
        if started:
            dist.destroy_process_group()


if __name__ == "__main__":
    raise SystemExit(main())
