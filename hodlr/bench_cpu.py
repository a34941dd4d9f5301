"""CPU benchmark (``hodlr bench-cpu``): ``sparse`` and ``recursive`` matmul against ``dense``.

For each length ``T`` (default ``2^10 … 2^20``) it draws a float64 mask with decay and
``X (T, D)`` (``D = 16``), checks the backends agree (relative error against ``dense``
where it runs, else against ``recursive``), and times ``hodlr.matmul(M, X, backend=...)``
through the public API: the median of several repeats after one untimed warm-up call
(fewer repeats for large ``T``).  ``sparse-prebuilt`` times only the product
``S.matmul(X)`` of an already built :class:`hodlr.sparse.SparseMask`.  It then fits the
growth exponent ``p`` of ``time ~ T^p`` by least squares in log-log coordinates (over all
lengths, and over ``T >= 2^14``, where fixed overheads no longer dominate) and prints a
table.  Targets: ``p <= 1.2``, ``>= 10x`` faster than dense at ``T = 4096``, ``T = 2^20``
in a few seconds.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import time

import numpy as np

from hodlr.bench import HelpWithDefaults, _commit, nonnegative_int, positive_int, writable_path

__all__ = ["fit_exponent", "main"]

BACKENDS = ("sparse", "recursive", "sparse-prebuilt")


def _parser():
    p = argparse.ArgumentParser(prog="hodlr bench-cpu", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpWithDefaults)
    p.add_argument("--lengths", "-T", type=positive_int, nargs="+", default=[1 << n for n in range(10, 21)],
                   help="sequence lengths (default 2^10 .. 2^20)")
    p.add_argument("--dim", "-D", type=positive_int, default=16, help="columns of X (default 16)")
    p.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS),
                   help="backends timed beside dense (sparse-prebuilt: the scipy factors built once, outside the "
                        "timing)")
    p.add_argument("--dense-max-t", type=positive_int, default=4096, help="largest T timed with the dense backend")
    p.add_argument("--repeats", type=positive_int, default=None,
                   help="timed repeats per case (default: 15 for T <= 2^14, then fewer, at least 3)")
    p.add_argument("--json", type=writable_path, default=None, help="also write the results as JSON to this path")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="random inputs' seed")
    return p


def _repeats(T: int, given) -> int:
    return given if given else max(3, min(15, (15 << 14) // T))


def _time(fn, repeats: int):
    """``(median seconds, fastest seconds, result)`` of ``repeats`` calls after one warm-up
    call."""
    out = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times)), float(np.min(times)), out


def fit_exponent(lengths, seconds) -> float:
    """Least-squares slope of ``log(seconds)`` against ``log(lengths)`` (``nan`` for fewer
    than two points).

    >>> round(fit_exponent([1, 2, 4], [3.0, 6.0, 12.0]), 6)
    1.0
    """
    x, y = np.log(np.asarray(lengths, float)), np.log(np.asarray(seconds, float))
    if x.size < 2:
        return math.nan
    return float(np.polyfit(x, y, 1)[0])


def _cpus() -> int:
    """CPUs this process may run on (respects ``taskset``)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _case(T: int, D: int, rng):
    import hodlr

    L = hodlr.num_levels(T)
    lam = rng.uniform(0.2, 1.5, (T, L))
    g = -rng.uniform(0.0, 1.0, T)
    return hodlr.LogLinearMask(lam, g), rng.standard_normal((T, D))


def run(lengths, D: int, backends, dense_max_t: int, repeats, seed: int, on_row=None) -> list:
    """Time every case; one dict per length (``on_row(rows)`` after each: a stopped run keeps them)."""
    import hodlr
    from hodlr._accuracy import relative_error

    rng = np.random.default_rng(seed)
    rows = []
    for T in lengths:
        M, X = _case(T, D, rng)
        n = _repeats(T, repeats)
        row = {"T": T, "repeats": n, "seconds": {}, "fastest": {}, "error": {}}
        ref = None
        if T <= dense_max_t:
            row["seconds"]["dense"], row["fastest"]["dense"], ref = _time(lambda: hodlr.matmul(M, X, backend="dense"), n)
        for name in backends:
            if name == "sparse-prebuilt":
                S = M.to_sparse()
                fn = lambda: S.matmul(X)
            else:
                fn = lambda name=name: hodlr.matmul(M, X, backend=name)
            row["seconds"][name], row["fastest"][name], out = _time(fn, n)
            if ref is None:
                ref = out
            row["error"][name] = relative_error(out, ref)
        rows.append(row)
        print(_format_row(row, ["dense"] + list(backends)), flush=True)
        if on_row is not None:
            on_row(rows)
    return rows


def _format_row(row, names) -> str:
    cells = [f"{row['T']:>9,}", f"{row['repeats']:>3}"]
    for name in names:
        s = row["seconds"].get(name)
        width = max(12, len(name))
        cells.append(f"{s * 1e3:>{width}.2f}" if s is not None else f"{'-':>{width}}")
    errs = [e for e in row["error"].values()]
    cells.append(f"{max(errs):>9.1e}" if errs else "")
    return " | ".join(cells)


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    names = ["dense"] + list(args.backends)
    commit = _commit()
    print(f"hodlr bench-cpu: matmul, float64, D={args.dim}, {_cpus()} CPUs, commit {commit}, "
          f"{_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC")
    print("median ms per call (after one warm-up call); max err = relative error vs dense (T <= --dense-max-t), "
          "else vs the first backend listed")
    print(" | ".join([f"{'T':>9}", "rep"] + [f"{n:>12}" for n in names] + [f"{'max err':>9}"]))

    def save(rows, summary=None):
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"command": "hodlr bench-cpu", "argv": argv, "dim": args.dim, "commit": commit,
                           "cpus": _cpus(), "machine": platform.platform(), "rows": rows,
                           "summary": summary, "complete": summary is not None}, f, indent=1)

    rows = run(args.lengths, args.dim, args.backends, args.dense_max_t, args.repeats, args.seed, save)
    print()
    summary = {}
    for name in args.backends:
        pts = [(r["T"], r["seconds"][name]) for r in rows]
        big = [(T, s) for T, s in pts if T >= 1 << 14]
        entry = {"exponent_all": fit_exponent(*zip(*pts)) if len(pts) > 1 else None,
                 "exponent_large": fit_exponent(*zip(*big)) if len(big) > 1 else None}
        dense_rows = [r for r in rows if "dense" in r["seconds"]]
        if dense_rows:
            last = dense_rows[-1]
            entry["speedup_vs_dense"] = (last["T"], last["seconds"]["dense"] / last["seconds"][name])
        summary[name] = entry
        parts = []
        if entry["exponent_all"] is not None:
            exponents = f"growth exponent {entry['exponent_all']:.3f} (all T)"
            if entry["exponent_large"] is not None:
                exponents += f", {entry['exponent_large']:.3f} (T >= 2^14)"
            parts.append(exponents)
        if "speedup_vs_dense" in entry:
            T, x = entry["speedup_vs_dense"]
            parts.append(f"{x:.1f}x faster than dense at T = {T:,}" if x >= 1 else
                         f"{1 / x:.1f}x slower than dense at T = {T:,}")
        print(f"{name:>16}: " + ("; ".join(parts) or "one length: no growth exponent"))
    save(rows, summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
