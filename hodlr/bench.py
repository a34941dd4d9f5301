"""Benchmark harness (``hodlr bench``): the Triton kernels against their peers on one GPU.

For each length ``T`` it first checks that the compared kernels agree on the same inputs,
then times each with ``triton.testing.do_bench`` (median, milliseconds):

* attention forward: ``kernels.attention`` against flash-linear-attention's
  ``chunk_log_linear_attn`` (same inputs, relative error reported), ``chunk_simple_gla``
  (the linear lower bound; agreement checked with every level scale 1, where log-linear
  equals Mamba-2-style linear attention) and causal ``scaled_dot_product_attention``
  (softmax: timed, not compared), each when importable;
* attention forward+backward (``--backward``, on by default): the differentiable
  ``kernels.autograd.attention`` against ``chunk_log_linear_attn`` and causal SDPA, each
  timing one forward and the gradients of all its inputs for a fixed random ``dO``, with
  the peak memory of our pass;
* matmul forward: ``kernels.matmul`` against a cuBLAS product with the materialised
  ``T x T`` mask (where it fits, ``--dense-max-t``) and against the measured copy
  bandwidth, counting the bytes the operation must move (X read, Y written, the level
  scales and log-decays it reads, each once).  Timed twice: as called from Python, and as
  the replay of a CUDA graph of one call (the GPU's time without the host's launch
  overhead, which is what a caller gets under ``torch.cuda.graphs`` or ``torch.compile``;
  the copy it is compared with is a single launch).

It prints a table and writes JSON and a PNG plot (matplotlib, Agg).  Shapes default to
docs/mathematics.md §12: bf16, H = 16, D = 64, B·T = 65,536 tokens (B = 1 from 64K on), T = 2K … 128K.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import subprocess
import sys

__all__ = ["main"]

DEFAULT_LENGTHS = (2048, 8192, 16384, 32768, 65536, 131072)


def _parser():
    p = argparse.ArgumentParser(prog="hodlr bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", "-T", type=int, nargs="+", default=list(DEFAULT_LENGTHS), help="sequence lengths")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--dim", type=int, default=64, help="Dk = Dv = D")
    p.add_argument("--tokens", type=int, default=65536, help="B*T (B = max(1, tokens // T))")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    p.add_argument("--chunk", type=int, default=None, help="chunk size of the Triton kernels (default: kernels.DEFAULT_CHUNK per operation)")
    p.add_argument("--dense-max-t", type=int, default=16384, help="largest T for the materialised-mask product")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warm-up, ms")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetitions, ms")
    p.add_argument("--json", default="bench.json", help="output JSON path")
    p.add_argument("--png", default="bench.png", help="output plot path ('' for none)")
    p.add_argument("--commit", default=None, help="commit to record (default: git rev-parse HEAD)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-backward", dest="backward", action="store_false",
                   help="skip the forward+backward timings")
    p.add_argument("--no-matmul", dest="matmul", action="store_false", help="skip the matmul timings")
    return p


def _commit(given):
    if given:
        return given
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("HODLR_COMMIT", "unknown")


def _peers():
    out = {}
    try:
        from fla.ops.log_linear_attn import chunk_log_linear_attn

        out["fla_log_linear"] = chunk_log_linear_attn
    except ImportError as err:
        out["fla_log_linear_missing"] = str(err)
    try:
        from fla.ops.simple_gla import chunk_simple_gla

        out["fla_simple_gla"] = chunk_simple_gla
    except ImportError as err:
        out["fla_simple_gla_missing"] = str(err)
    return out


def _rel(a, b) -> float:
    a = a.double()
    b = b.double()
    if not bool(a.isfinite().all()):
        return math.inf
    return float((a - b).norm() / b.norm())


def _copy_bandwidth(torch, bench, device) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + written), 1 GiB buffers."""
    n = 1 << 28
    src = torch.rand(n, device=device)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    return 2 * n * 4 / (ms * 1e-3)


def _graph_replay(torch, fn):
    """``fn`` captured into a CUDA graph (after three warm-up calls on a side stream); returns
    the graph's ``replay``."""
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


def _matmul_bytes(B, H, T, D, itemsize, lam_itemsize, g_itemsize):
    """Bytes the matmul must move: X read, Y written, each level scale that is read
    (``fenwick.read_levels``) and the log-decay, once each."""
    from hodlr import fenwick

    n_read = int(fenwick.read_levels(T).sum())
    return B * H * (2 * T * D * itemsize + n_read * lam_itemsize + T * g_itemsize)


def run(args) -> dict:
    import torch
    import triton
    import triton.testing

    from hodlr import fenwick
    from hodlr import kernels
    from hodlr.mask import LogLinearMask

    if not torch.cuda.is_available():
        raise SystemExit("hodlr bench needs a CUDA GPU (torch.cuda.is_available() is False)")
    dev = torch.device("cuda")
    dtype = getattr(torch, args.dtype)
    chunk = args.chunk
    torch.manual_seed(args.seed)

    def bench(fn):
        return triton.testing.do_bench(fn, warmup=args.warmup, rep=args.rep, return_mode="median")

    peers = _peers()
    H, D = args.heads, args.dim
    copy_bw = _copy_bandwidth(torch, bench, dev)
    rows = []
    for T in args.lengths:
        B = max(1, args.tokens // T)
        L = fenwick.num_levels(T)
        row = {"T": T, "B": B, "H": H, "D": D}
        # inputs in flash-linear-attention's (B, T, H, D) layout; ours reads (B, H, T, D)
        q, k, v = (torch.randn(B, T, H, D, device=dev, dtype=dtype) for _ in range(3))
        g = -0.1 * torch.rand(B, T, H, device=dev, dtype=torch.float32)
        lam = (0.5 + torch.rand(B, T, H, L, device=dev, dtype=torch.float32)).to(dtype)
        scale = D ** -0.5
        qh, kh, vh = (x.transpose(1, 2).contiguous() for x in (q, k, v))
        gh = g.transpose(1, 2).contiguous()
        lamh = lam.transpose(1, 2).contiguous()

        def ours():
            return kernels.attention_forward(qh, kh, vh, lamh, gh, scale, chunk=chunk)

        o = ours()
        if "fla_log_linear" in peers:
            fn_fla = peers["fla_log_linear"]

            def fla():
                return fn_fla(q, k, v, g, lam, scale=scale)[0]

            row["attn_err_vs_fla_log_linear"] = _rel(o.transpose(1, 2), fla())
            row["attn_ms_fla_log_linear"] = bench(fla)
        if "fla_simple_gla" in peers:
            fn_gla = peers["fla_simple_gla"]
            ones = torch.ones(1, 1, 1, 1, device=dev, dtype=dtype).expand(B, H, T, L)
            o1 = kernels.attention_forward(qh, kh, vh, ones, gh, scale, chunk=chunk)

            def gla():
                return fn_gla(q, k, v, g=g, scale=scale)[0]

            row["attn_err_ones_vs_fla_simple_gla"] = _rel(o1.transpose(1, 2), gla())
            row["attn_ms_fla_simple_gla"] = bench(gla)
        row["attn_ms_ours"] = bench(ours)
        sdpa = torch.nn.functional.scaled_dot_product_attention
        row["attn_ms_sdpa_causal"] = bench(lambda: sdpa(qh, kh, vh, is_causal=True))
        if args.backward:
            row.update(_forward_backward(torch, bench, peers, q, k, v, g, lam, scale, chunk))
        del q, k, v, o
        torch.cuda.empty_cache()

        if not args.matmul:
            rows.append(row)
            print(_format_row(row), flush=True)
            continue
        # matmul: per-head level scales and decay (the bandwidth figure) ...
        x = torch.randn(B, H, T, D, device=dev, dtype=dtype)
        row["mm_ms_ours"] = ms = bench(lambda: kernels.matmul_forward(lamh, gh, x, chunk=chunk))
        nbytes = _matmul_bytes(B, H, T, D, x.element_size(), lamh.element_size(), 4)
        row["mm_bytes"] = nbytes
        row["mm_bandwidth"] = nbytes / (ms * 1e-3)
        row["mm_fraction_of_copy"] = row["mm_bandwidth"] / copy_bw
        row["mm_ms_ours_graph"] = ms = bench(_graph_replay(torch, lambda: kernels.matmul_forward(lamh, gh, x, chunk=chunk)))
        row["mm_bandwidth_graph"] = nbytes / (ms * 1e-3)
        row["mm_fraction_of_copy_graph"] = row["mm_bandwidth_graph"] / copy_bw
        # ... and one mask shared by all heads, against the materialised-mask cuBLAS product
        if T <= args.dense_max_t:
            lam1, g1 = lamh[:1, :1], gh[:1, :1]
            y = kernels.matmul_forward(lam1, g1, x, chunk=chunk)
            dense = LogLinearMask(lam1[0, 0].float(), g1[0, 0].float(), validate=False)
            from hodlr.options import options

            old = options.dense_max_bytes
            options.dense_max_bytes = max(old, 4 * T * T * 8)
            try:
                Md = dense.to_dense().to(dtype)
            finally:
                options.dense_max_bytes = old
            row["mm_err_vs_dense"] = _rel(y, torch.matmul(Md, x))
            row["mm_ms_dense_cublas"] = bench(lambda: torch.matmul(Md, x))
            del Md
        del x
        torch.cuda.empty_cache()
        rows.append(row)
        print(_format_row(row), flush=True)
    props = torch.cuda.get_device_properties(dev)
    return {
        "device": props.name,
        "sm_count": props.multi_processor_count,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": _commit(args.commit),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "fla": _fla_version(),
        "dtype": args.dtype,
        "chunk": chunk or dict(kernels.DEFAULT_CHUNK),
        "tokens": args.tokens,
        "copy_bandwidth": copy_bw,
        "peers_missing": {k: v for k, v in peers.items() if k.endswith("_missing")},
        "rows": rows,
    }


def _forward_backward(torch, bench, peers, q, k, v, g, lam, scale, chunk) -> dict:
    """Forward+backward medians (ms) of ours, fla's log-linear kernel and causal SDPA on the
    same inputs (``(B, T, H, D)`` layout given; ours reads ``(B, H, T, D)`` views), and the
    peak memory of ours beyond the inputs."""
    from hodlr import kernels

    def leaves(*xs):
        return [x.detach().clone().requires_grad_(True) for x in xs]

    qh, kh, vh, lamh = leaves(*(x.transpose(1, 2) for x in (q, k, v, lam)))
    (gh,) = leaves(g.transpose(1, 2))
    do = torch.randn_like(vh)
    ours_in = (qh, kh, vh, lamh, gh)

    def ours():
        out = kernels.attention(qh, kh, vh, lamh, gh, scale, chunk=chunk)
        return torch.autograd.grad(out, ours_in, do)

    row = {}
    ours()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    ours()
    torch.cuda.synchronize()
    row["fwdbwd_peak_extra_bytes"] = torch.cuda.max_memory_allocated() - base
    row["fwdbwd_ms_ours"] = bench(ours)
    if "fla_log_linear" in peers:
        fn_fla = peers["fla_log_linear"]
        fla_in = leaves(q, k, v, g, lam)
        do_fla = do.transpose(1, 2)

        def fla():
            out = fn_fla(*fla_in, scale=scale)[0]
            return torch.autograd.grad(out, fla_in, do_fla)

        theirs = fla()
        mine = ours()
        row["fwdbwd_err_dq_vs_fla"] = _rel(mine[0].transpose(1, 2), theirs[0])
        row["fwdbwd_ms_fla_log_linear"] = bench(fla)
    sdpa_in = leaves(*(x.transpose(1, 2) for x in (q, k, v)))
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def causal():
        return torch.autograd.grad(sdpa(*sdpa_in, is_causal=True), sdpa_in, do)

    row["fwdbwd_ms_sdpa_causal"] = bench(causal)
    return row


def _fla_version():
    try:
        from importlib.metadata import version

        return version("fla-core")
    except Exception:  # noqa: BLE001 - any failure means "not installed"
        return None


def _fmt(v, spec=".3f"):
    return "-" if v is None else format(v, spec)


def _format_row(r) -> str:
    return (f"T={r['T']:>7} B={r['B']:>3} | attn ms ours {_fmt(r.get('attn_ms_ours'))} "
            f"fla-loglin {_fmt(r.get('attn_ms_fla_log_linear'))} gla {_fmt(r.get('attn_ms_fla_simple_gla'))} "
            f"sdpa {_fmt(r.get('attn_ms_sdpa_causal'))} | err fla {_fmt(r.get('attn_err_vs_fla_log_linear'), '.1e')} "
            f"gla {_fmt(r.get('attn_err_ones_vs_fla_simple_gla'), '.1e')} | mm ms {_fmt(r.get('mm_ms_ours'))} "
            f"{_fmt(r.get('mm_fraction_of_copy', 0) * 100, '.0f')}% copy, graph {_fmt(r.get('mm_ms_ours_graph'))} "
            f"{_fmt(r.get('mm_fraction_of_copy_graph', 0) * 100, '.0f')}%, dense {_fmt(r.get('mm_ms_dense_cublas'))} "
            f"err {_fmt(r.get('mm_err_vs_dense'), '.1e')} | fwd+bwd ms ours {_fmt(r.get('fwdbwd_ms_ours'))} "
            f"fla {_fmt(r.get('fwdbwd_ms_fla_log_linear'))} sdpa {_fmt(r.get('fwdbwd_ms_sdpa_causal'))} "
            f"dq err vs fla {_fmt(r.get('fwdbwd_err_dq_vs_fla'), '.1e')} "
            f"peak {_fmt(None if r.get('fwdbwd_peak_extra_bytes') is None else r['fwdbwd_peak_extra_bytes'] / 2**30, '.2f')} GiB")


def table(result) -> str:
    """The results as a Markdown table."""
    head = ("| T | B | ours attn ms | fla log-linear ms | speed-up | fla simple_gla ms | SDPA causal ms | "
            "err vs fla | matmul ms | matmul GB/s | % of copy | matmul graph ms | % of copy (graph) | "
            "dense cuBLAS ms | ours fwd+bwd ms | fla fwd+bwd ms | SDPA fwd+bwd ms | fwd+bwd peak GiB |")
    lines = [head, "|" + " --- |" * 18]
    for r in result["rows"]:
        ours, fla = r.get("attn_ms_ours"), r.get("attn_ms_fla_log_linear")
        bandwidth = r.get("mm_bandwidth")
        fraction = r.get("mm_fraction_of_copy")
        fraction_graph = r.get("mm_fraction_of_copy_graph")
        peak = r.get("fwdbwd_peak_extra_bytes")
        lines.append(
            f"| {r['T']:,} | {r['B']} | {_fmt(ours)} | {_fmt(fla)} | "
            f"{_fmt(None if fla is None else fla / ours, '.1f')}x | {_fmt(r.get('attn_ms_fla_simple_gla'))} | "
            f"{_fmt(r.get('attn_ms_sdpa_causal'))} | {_fmt(r.get('attn_err_vs_fla_log_linear'), '.1e')} | "
            f"{_fmt(r.get('mm_ms_ours'))} | {_fmt(None if bandwidth is None else bandwidth / 1e9, '.0f')} | "
            f"{_fmt(None if fraction is None else fraction * 100, '.0f')}% | {_fmt(r.get('mm_ms_ours_graph'))} | "
            f"{_fmt(None if fraction_graph is None else fraction_graph * 100, '.0f')}% | {_fmt(r.get('mm_ms_dense_cublas'))} | "
            f"{_fmt(r.get('fwdbwd_ms_ours'))} | {_fmt(r.get('fwdbwd_ms_fla_log_linear'))} | "
            f"{_fmt(r.get('fwdbwd_ms_sdpa_causal'))} | {_fmt(None if peak is None else peak / 2**30, '.2f')} |")
    return "\n".join(lines)


def plot(result, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    Ts = [r["T"] for r in rows]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for key, label in (("attn_ms_ours", "hodlr triton (ours)"), ("attn_ms_fla_log_linear", "fla chunk_log_linear_attn"),
                       ("attn_ms_fla_simple_gla", "fla chunk_simple_gla (linear)"),
                       ("attn_ms_sdpa_causal", "causal SDPA (softmax)"),
                       ("fwdbwd_ms_ours", "hodlr triton fwd+bwd"), ("fwdbwd_ms_fla_log_linear", "fla log-linear fwd+bwd"),
                       ("fwdbwd_ms_sdpa_causal", "causal SDPA fwd+bwd")):
        ys = [r.get(key) for r in rows]
        if any(y is not None for y in ys):
            a1.plot(Ts, ys, marker="o", label=label)
    a1.set_xscale("log", base=2)
    a1.set_yscale("log")
    a1.set_xlabel("T")
    a1.set_ylabel("ms (median)")
    a1.set_title(f"attention, {result['dtype']}, B·T={result['tokens']:,}, H={rows[0]['H']}, D={rows[0]['D']}")
    a1.legend()
    a1.grid(True, which="both", alpha=0.3)
    if any("mm_bandwidth" in r for r in rows):
        a2.plot(Ts, [r.get("mm_bandwidth", math.nan) / 1e12 for r in rows], marker="o", label="hodlr triton matmul")
        a2.plot(Ts, [r.get("mm_bandwidth_graph", math.nan) / 1e12 for r in rows], marker="s",
                label="the same, CUDA-graph replay")
        a2.axhline(result["copy_bandwidth"] / 1e12, color="k", ls="--", label="measured copy")
        a2.axhline(result["copy_bandwidth"] / 2e12, color="gray", ls=":", label="50% of copy")
        a2.set_xscale("log", base=2)
        a2.set_xlabel("T")
        a2.set_ylabel("TB/s (bytes it must move / time)")
        a2.set_title("matmul fwd bandwidth")
        a2.legend()
        a2.grid(True, which="both", alpha=0.3)
    else:
        a2.set_axis_off()
    fig.suptitle(f"{result['device']}  {result['date']}  commit {result['commit'][:10]}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    """Entry point of ``hodlr bench``; returns the exit status."""
    args = _parser().parse_args(argv)
    result = run(args)
    print(table(result))
    print(f"copy bandwidth {result['copy_bandwidth'] / 1e12:.2f} TB/s; device {result['device']}; "
          f"commit {result['commit']}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)
    if args.png:
        plot(result, args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
