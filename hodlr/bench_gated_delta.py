"""``hodlr bench-gated-delta``: log-linear Gated DeltaNet on the GPU beside fla's Gated DeltaNet.

For each head width ``D`` (``H = model_width // D`` heads) and length ``T`` (``B = tokens // T``)
it times, with medians of ``triton.testing.do_bench`` on bf16 ``(B, T, H, D)`` inputs:

- ``fwd``: :func:`hodlr.log_linear_gated_delta_rule` with its defaults (the ``triton`` backend
  on a GPU), no gradient;
- ``fwdbwd``: the same call and ``torch.autograd.grad`` of every input (q, k, v, g, β, λ);
- ``fla_fwd`` / ``fla_fwdbwd``: fla's ``chunk_gated_delta_rule`` (plain Gated DeltaNet, the
  linear-time floor) on the same q, k, v, g, β, when ``fla`` is importable (a refusal or a
  failure is recorded, the run goes on);
- the ratios ``fwd / fla_fwd`` and ``fwdbwd / fwd``.

``--accuracy T`` also compares, at each head width, the bf16 output and gradients with the
float64 chunked backend, and fla's output with the same reference at λ ≡ 1 with and without
decay (where both compute plain Gated DeltaNet).

``--profile`` adds each row's forward and forward + backward split by kernel (``kernels_fwd``,
``kernels_fwdbwd``: ``torch.profiler``, ms a call).

``--prefill`` adds ``prefill``: the call with ``output_final_state=True`` under ``torch.no_grad``
(a generation's prompt: the Triton forward and the final bucket states read off its hierarchy),
and ``prefill_chunked``, the same on the ``chunked`` backend (what runs where a gradient is
wanted), with ``prefill_over_fwd``; and ``continued`` / ``continued_chunked``, the same call
continuing from a state at position ``T - 1`` (every bit below ``log2 T`` set: the Triton stream
pads up to ``T - 1`` tokens and reads the carried buckets).

``--packed N`` adds ``packed_fwd`` / ``packed_fwdbwd``: the row's ``B·T`` tokens as ``N`` packed
sequences of random lengths (``cu_seqlens``, one call: the aligned stream), and ``looped_fwd`` /
``looped_fwdbwd``, the same sequences one call each; and ``packed_prefill`` / ``looped_prefill``,
their prefill (final states, under ``torch.no_grad``) in one call and one call each.

``--compile`` adds the same call compiled (``torch.compile(..., fullgraph=True)``: inductor on a
GPU, ``aot_eager`` in a ``--device cpu`` smoke run), ``fwd_compiled`` and ``fwdbwd_compiled``,
timed alternately with the eager call (``fwd`` and ``fwdbwd`` are then the medians of two
measurements each), its ratio ``fwdbwd_compiled_over_fwdbwd`` and ``compiled_grads_equal``
(whether the compiled gradients equal the eager ones bit for bit).

Writes a JSON file and a picture (``--json``, ``--png``).  ``--device cpu`` runs the code path
at tiny sizes under Triton's interpreter (a smoke test: no timing meaning).
"""

from __future__ import annotations

import datetime as _dt
import sys
import traceback

from hodlr.bench import (MODEL_WIDTH, TOKENS, _commit, _fla_version, _fmt, _rel, _timed, accuracy_line,
                         fill_device_defaults, forward_calls, kernel_times, positive_int, save_figure, sweep_parser,
                         timer, width_panels, write)

DEFAULT_LENGTHS = (2048, 8192, 16384, 32768, 65536)
DEFAULT_WIDTHS = (64, 128)
CPU_DEFAULTS = {"lengths": [64], "widths": [16], "model_width": 32, "tokens": 128}
"""The sweep of a ``--device cpu`` smoke run where none is given (the GPU sweep takes minutes
under the interpreter)."""


def _parser():
    p = sweep_parser("hodlr bench-gated-delta", __doc__.split("\n\n")[0], DEFAULT_LENGTHS, DEFAULT_WIDTHS,
                     "bench-gated-delta", epilog="--device cpu runs a smoke test of the same code path in the Triton interpreter: its times "
                            "are not kernel speed")
    p.set_defaults(lengths=None, widths=None, model_width=None, tokens=None)
    p.add_argument("--accuracy", type=positive_int, nargs="*", default=(), help="lengths of the accuracy check")
    p.add_argument("--prefill", action="store_true",
                   help="also time the call with output_final_state=True without gradient (triton and chunked)")
    p.add_argument("--packed", type=positive_int, default=None, metavar="N",
                   help="also time the tokens as N packed sequences, in one call and one call each")
    p.add_argument("--compile", action="store_true",
                   help="also time the call under torch.compile(fullgraph=True), alternated with the eager call")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                   help="cuda, or cpu for a smoke run under TRITON_INTERPRET=1 (default sweep: T = 64, D = 16, "
                        "model width 32, 128 tokens; GPU defaults: T = "
                        f"{' '.join(map(str, DEFAULT_LENGTHS))}, D = {' '.join(map(str, DEFAULT_WIDTHS))}, "
                        f"model width {MODEL_WIDTH}, {TOKENS} tokens)")
    return p


def _fla():
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule

        return chunk_gated_delta_rule
    except ImportError:
        return None


def _inputs(torch, B, T, H, D, dtype, device, seed=0, levels=True):
    """``(q, k, v, g, beta, level_scales, dO)`` on fla's layout: unit-norm keys, β in (0, 1),
    log-decays in (-0.1, 0), level scales in (0.5, 1.5) (or 1 without ``levels``)."""
    import hodlr

    gen = torch.Generator(device=device).manual_seed(seed)
    q, v, do = (torch.randn(B, T, H, D, device=device, generator=gen).to(dtype) for _ in range(3))
    k = torch.nn.functional.normalize(torch.randn(B, T, H, D, device=device, generator=gen), dim=-1).to(dtype)
    g = -0.1 * torch.rand(B, T, H, device=device, generator=gen)
    beta = torch.rand(B, T, H, device=device, generator=gen).to(dtype)
    L = hodlr.num_levels(T)
    lam = (0.5 + torch.rand(B, T, H, L, device=device, generator=gen)) if levels else \
        torch.ones(B, T, H, L, device=device)
    return q, k, v, g, beta, lam, do


def _packed(torch, bench, row, inputs, do, scale, backend, count):
    """``packed_*`` and ``looped_*`` of a row (module docstring): its ``B`` rows laid end to end
    and cut into ``count`` sequences of random lengths (at least one token each)."""
    import numpy as np

    import hodlr

    flat = [x.reshape((1, -1) + tuple(x.shape[2:])) for x in (*inputs, do)]
    total = flat[0].shape[1]
    count = min(count, total)
    cuts = np.sort(np.random.default_rng(0).choice(np.arange(1, total), count - 1, replace=False))
    cu_host = [0, *cuts.tolist(), total]
    cu = torch.tensor(cu_host, device=flat[0].device)
    *xs, dflat = flat
    longest = int(np.diff(cu_host).max())  # a sequence may be longer than T: its levels, scales of 1
    xs[5] = torch.nn.functional.pad(xs[5], (0, max(0, hodlr.num_levels(longest) - xs[5].shape[-1])), value=1.0)

    def packed(*a, **kw):  # one call: (o, state)
        return hodlr.log_linear_gated_delta_rule(*a, scale=scale, backend=backend, cu_seqlens=cu, **kw)

    def looped(*a, **kw):  # one call each: [(o, state)]
        return [hodlr.log_linear_gated_delta_rule(*(x[:, s:e] for x in a), scale=scale, backend=backend, **kw)
                for s, e in zip(cu_host[:-1], cu_host[1:])]

    row["packed_sequences"] = count
    outputs = {"packed": lambda *a: packed(*a)[0], "looped": lambda *a: torch.cat([o for o, _ in looped(*a)], 1)}
    for name, call in outputs.items():
        fwd, fwdbwd = forward_calls(torch, call, xs, dflat)
        _timed(row, name + "_fwd", lambda: bench(fwd))
        _timed(row, name + "_fwdbwd", lambda: bench(fwdbwd))
    for name, run in (("packed", packed), ("looped", looped)):
        def prefill(run=run):
            with torch.no_grad():
                return run(*xs, output_final_state=True)

        _timed(row, name + "_prefill", lambda: bench(prefill))


def _row(torch, bench, D, H, T, B, dtype, device, fla, profile=False, compiled=False, prefill=False, packed=None):
    import statistics

    import hodlr

    q, k, v, g, beta, lam, do = _inputs(torch, B, T, H, D, dtype, device)
    row = {"D": D, "H": H, "T": T, "B": B}
    scale = D ** -0.5

    backend = "auto" if device.type == "cuda" else "triton"  # a CPU smoke run: the kernels in the interpreter

    def call(*a):
        return hodlr.log_linear_gated_delta_rule(*a, scale=scale, backend=backend)[0]

    inputs = (q, k, v, g, beta, lam)
    fwd, fwdbwd = forward_calls(torch, call, inputs, do)
    if not compiled:
        _timed(row, "fwd", lambda: bench(fwd))
        _timed(row, "fwdbwd", lambda: bench(fwdbwd))
    else:
        torch._dynamo.reset()  # a fresh cache per row (dynamo caches by code object: every row's call would count)
        fast = torch.compile(call, fullgraph=True, backend="inductor" if device.type == "cuda" else "aot_eager")
        fwd_c, fwdbwd_c = forward_calls(torch, fast, inputs, do)
        _timed(row, "compiled_grads_equal", lambda: all(torch.equal(a, b) for a, b in zip(fwdbwd(), fwdbwd_c())))
        for _ in range(2):  # eager and compiled alternated: the same conditions for both
            for key, fn in (("fwd", fwd), ("fwdbwd", fwdbwd), ("fwd_compiled", fwd_c), ("fwdbwd_compiled", fwdbwd_c)):
                _timed(row, key, lambda: bench(fn))  # row[key], or row[key + "_error"] when it fails
                if key in row:
                    row.setdefault(key + "_runs", []).append(row.pop(key))
        for key in ("fwd", "fwdbwd", "fwd_compiled", "fwdbwd_compiled"):
            if row.get(key + "_runs"):
                row[key] = statistics.median(row[key + "_runs"])
        if row.get("fwdbwd") and row.get("fwdbwd_compiled"):
            row["fwdbwd_compiled_over_fwdbwd"] = row["fwdbwd_compiled"] / row["fwdbwd"]
    if prefill:
        # a continuation from T - 1 (every bit below log2(T) set): the stream's padding and carried reads
        a = T - 1
        wide = torch.nn.functional.pad(lam, (0, hodlr.num_levels(a + T) - lam.shape[-1]), value=1.0)
        gen = torch.Generator(device=device).manual_seed(1)
        live = torch.tensor([(a >> i) & 1 for i in range(max(1, a.bit_length()))], device=device, dtype=torch.float32)
        state = hodlr.LogLinearState(torch.randn((B, H, live.numel(), D, D), device=device, generator=gen)
                                     * live[:, None, None], torch.full((B,), a, device=device))
        for key, name, kw in (("prefill", backend, {}), ("prefill_chunked", "chunked", {}),
                              ("continued", backend, {"initial_state": state}),
                              ("continued_chunked", "chunked", {"initial_state": state})):
            def run_stateful(name=name, kw=kw):
                with torch.no_grad():
                    return hodlr.log_linear_gated_delta_rule(*inputs[:5], wide if kw else lam, scale=scale,
                                                             backend=name, output_final_state=True, **kw)
            _timed(row, key, lambda: bench(run_stateful))
        if row.get("prefill") and row.get("fwd"):
            row["prefill_over_fwd"] = row["prefill"] / row["fwd"]
    if packed:
        _packed(torch, bench, row, inputs, do, scale, backend, packed)
    if profile:
        row["kernels_fwd"] = kernel_times(torch, fwd)
        row["kernels_fwdbwd"] = kernel_times(torch, fwdbwd)
    if fla is not None:
        fla_fwd, fla_fwdbwd = forward_calls(torch, lambda *a: fla(*a, scale=scale)[0], (q, k, v, g, beta), do)
        _timed(row, "fla_fwd", lambda: bench(fla_fwd))
        _timed(row, "fla_fwdbwd", lambda: bench(fla_fwdbwd))
    if row.get("fwd") and row.get("fla_fwd"):
        row["fwd_over_fla_fwd"] = row["fwd"] / row["fla_fwd"]
    if row.get("fwd") and row.get("fwdbwd"):
        row["fwdbwd_over_fwd"] = row["fwdbwd"] / row["fwd"]
    return row


def _accuracy(torch, T, D, device, fla):
    """bf16 errors against the float64 chunked backend at head width ``D``: ours with random λ
    (output and every gradient); ours and fla's at λ ≡ 1 (output), with the decay and without
    (``g ≡ 0``)."""
    import hodlr

    row = {"T": T, "D": D}
    B, H = 1, max(1, 256 // max(D, 64))
    for case in ("levels", "unit_levels", "unit_levels_no_decay"):
        q, k, v, g, beta, lam, do = _inputs(torch, B, T, H, D, torch.bfloat16, device, seed=T,
                                            levels=case == "levels")
        if case == "unit_levels_no_decay":
            g = torch.zeros_like(g)
        xs = [x.detach().requires_grad_() for x in (q, k, v, g, beta, lam)]
        refs = [x.detach().double().requires_grad_() for x in (q, k, v, g, beta, lam)]
        o = hodlr.log_linear_gated_delta_rule(*xs, scale=D ** -0.5)[0]
        ref = hodlr.log_linear_gated_delta_rule(*refs, scale=D ** -0.5, backend="chunked")[0]
        key = "" if case == "levels" else "_" + case
        row["o" + key] = _rel(o, ref)
        if case == "levels":
            for name, a, b in zip(("dq", "dk", "dv", "dg", "dbeta", "dlevel_scales"),
                                  torch.autograd.grad(o, xs, do), torch.autograd.grad(ref, refs, do.double())):
                row[name] = _rel(a, b)
        elif fla is not None:
            try:
                row["fla_o" + key] = _rel(fla(q, k, v, g, beta, scale=D ** -0.5)[0], ref)
            except Exception:  # noqa: BLE001
                row["fla_error" + key] = traceback.format_exc(limit=2)[-300:]
    return row


def run(args) -> dict:
    import torch
    import triton

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("hodlr bench-gated-delta needs a CUDA GPU (or --device cpu with TRITON_INTERPRET=1)")
    cuda = device.type == "cuda"

    bench = timer(cuda, args.warmup, args.rep)
    fla = _fla() if cuda else None
    result = {
        "device": torch.cuda.get_device_properties(0).name if cuda else "cpu (interpreter smoke run)",
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": _commit(args.commit), "torch": torch.__version__, "triton": triton.__version__,
        "fla": _fla_version(), "dtype": "bfloat16", "tokens": args.tokens, "rows": [], "accuracy": [],
        "complete": False,
    }
    for D in args.widths:
        H = max(1, args.model_width // D)
        for T in args.lengths:
            row = _row(torch, bench, D, H, T, max(1, args.tokens // T), torch.bfloat16, device, fla, args.profile,
                       args.compile, args.prefill, args.packed)
            result["rows"].append(row)
            print(_format_row(row), flush=True)
            write(result, args.json, None, plot)
            if cuda:
                torch.cuda.empty_cache()
    for T, D in ((T, D) for D in args.widths for T in args.accuracy):
        try:
            row = _accuracy(torch, T, D, device, fla)
        except Exception:  # noqa: BLE001
            row = {"T": T, "D": D, "error": traceback.format_exc(limit=3)[-400:]}
        result["accuracy"].append(row)
        print(accuracy_line(row), flush=True)
        write(result, args.json, None, plot)
    result["complete"] = True
    return result


def _format_row(r) -> str:
    return (f"D={r['D']:>3} H={r['H']:>2} T={r['T']:>7} B={r['B']:>3} | fwd {_fmt(r.get('fwd'))} "
            f"fwd+bwd {_fmt(r.get('fwdbwd'))} ms, ratio {_fmt(r.get('fwdbwd_over_fwd'), '.2f')} | fla GDN fwd "
            f"{_fmt(r.get('fla_fwd'))} fwd+bwd {_fmt(r.get('fla_fwdbwd'))} ms"
            f"{' (failed)' if 'fla_fwdbwd_error' in r else ''} | fwd / fla fwd {_fmt(r.get('fwd_over_fla_fwd'), '.2f')}"
            + (f" | compiled fwd+bwd {_fmt(r.get('fwdbwd_compiled'))} ms" if "fwdbwd_compiled_runs" in r else "")
            + (f" | prefill {_fmt(r.get('prefill'))} ms (chunked {_fmt(r.get('prefill_chunked'))}), continued "
               f"{_fmt(r.get('continued'))} (chunked {_fmt(r.get('continued_chunked'))})"
               if "prefill" in r or "prefill_error" in r else "")
            + (f" | {r['packed_sequences']} packed: fwd+bwd {_fmt(r.get('packed_fwdbwd'))} ms, one call each "
               f"{_fmt(r.get('looped_fwdbwd'))}, prefill {_fmt(r.get('packed_prefill'))} / "
               f"{_fmt(r.get('looped_prefill'))}" if "packed_sequences" in r else ""))


def plot(result, path) -> None:
    series = (("fwd", "hodlr log-linear GDN fwd", "C0", "-"), ("fwdbwd", "hodlr log-linear GDN fwd+bwd", "C0", "--"),
              ("fwdbwd_compiled", "hodlr log-linear GDN fwd+bwd, torch.compile", "C1", ":"),
              ("fla_fwd", "fla GDN (linear) fwd", "C2", "-"), ("fla_fwdbwd", "fla GDN (linear) fwd+bwd", "C2", "--"))
    fig = width_panels(result, series)[0]
    save_figure(fig, result, path)


def main(argv=None) -> int:
    """Entry point of ``hodlr bench-gated-delta``; returns the exit status."""
    args = _parser().parse_args(argv)
    fill_device_defaults(args, DEFAULT_LENGTHS, DEFAULT_WIDTHS, CPU_DEFAULTS)
    write(run(args), args.json, args.png, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
