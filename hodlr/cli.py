"""The ``hodlr`` command line (also ``python -m hodlr``).

Subcommands
-----------
``demo``
    Build a default mask (T = 1000, batch 2, mild decay), print its block structure, run
    every backend that can run here on random inputs (matmul, attention and log-linear Gated
    DeltaNet) and print the relative error against the float64 reference and the time of
    each.  Exit status 1 if any backend disagrees beyond the tolerance or fails unexpectedly.
``verify``
    The same check at a chosen length, batch, widths, decay and set of backends.  Where
    the dense reference would exceed ``hodlr.options.dense_max_bytes`` the reference is a
    per-row float64 computation from the definition on sampled rows (``--rows``).  A
    reference is computed only for the operations that a requested backend offers.
``show T``
    The level structure: a character grid for ``T <= 64``, the block table beyond;
    ``--png FILE`` saves the structure picture (needs matplotlib).
``backends``
    Which backends exist, which operations each offers and where each can run here (torch
    rows only where torch is installed, CUDA only where a CUDA device exists), and why not.
``bench``, ``bench-cpu``, ``bench-decode``, ``bench-gated-delta``, ``bench-hattention``, ``bench-cp``
    Hand the remaining arguments to ``hodlr.bench.main``, ``hodlr.bench_cpu.main``,
    ``hodlr.bench_decode.main``, ``hodlr.bench_gated_delta.main``,
    ``hodlr.bench_hattention.main`` (beside the log-linear attention authors' kernel) and
    ``hodlr.distributed_bench.main`` (context parallelism, under ``torchrun``).

The Triton backend under ``TRITON_INTERPRET=1`` (CPU) runs Python per program instance:
1.5 – 6 s an operation for the demo's T = 1000, batch 2 (two cores), so ``demo`` and the default ``verify`` run it at
full length, but longer sequences are checked on the causal prefix of the first
``--interpreter-length`` rows (default 8192): the mask is lower triangular, so those rows
of the output depend only on the first rows of the inputs, and the prefix problem is
compared with the same rows of the full reference.  On CUDA it always runs at full length.
Without a CUDA GPU, ``demo`` and ``verify`` turn the interpreter on themselves (unless
``TRITON_INTERPRET`` is already set, to anything, or ``hodlr.kernels`` was already imported),
so that the Triton kernels are checked too; their times are then labelled as not kernel
speed.  Both exit with status 1 when a backend disagrees or fails, and when none of the
requested backends could run here (nothing was checked).
"""

from __future__ import annotations

import argparse
import functools
import importlib
import math
import os
import resource
import sys
import time
import tracemalloc
from dataclasses import dataclass

import numpy as np

from hodlr import fenwick
from hodlr import backends as registry
from hodlr._accuracy import DECAYS, TOLERANCES, decay_values, relative_error
from hodlr._formulas import check_dense_budget
from hodlr.bench import nonnegative_int, positive_int, writable_path
from hodlr.errors import BackendUnavailableError, DenseTooLargeError
from hodlr.mask import LogLinearMask

__all__ = ["main", "row_reference"]

GRID_MAX_T = 64
"""``show`` draws a character grid up to this length."""

INTERPRETER_LENGTH = 8192
"""Default prefix length at which the Triton interpreter is checked."""

LEVEL_CHARS = "0123456789abcdefghijklmnopqrstuvwxyz"

BENCHES = {"bench": "hodlr.bench", "bench-cpu": "hodlr.bench_cpu", "bench-decode": "hodlr.bench_decode",
           "bench-gated-delta": "hodlr.bench_gated_delta", "bench-hattention": "hodlr.bench_hattention",
           "bench-cp": "hodlr.distributed_bench"}

BENCH_HELP = {
    "bench": "GPU: attention forward / forward + backward beside SDPA and fla, and the matmul, JSON + PNG",
    "bench-cpu": "CPU: matmul time and its growth with T, every CPU backend beside dense",
    "bench-decode": "CPU (GPU with --gpu-step): the Fenwick decoder's step time and memory by position",
    "bench-gated-delta": "GPU: log-linear Gated DeltaNet forward / forward + backward beside fla's Gated DeltaNet",
    "bench-hattention": "GPU: Gated DeltaNet beside the paper authors' kernel (hattention), where it runs",
    "bench-cp": "several GPUs or CPU ranks under torchrun: context parallelism, equality and scaling",
}
"""One line each for ``hodlr --help`` (``--device cpu`` runs any GPU benchmark as a smoke test)."""

# -- problems and references -------------------------------------------------------------
OPS = registry.OPS
"""The operations a check runs: ``matmul``, ``attention`` and ``gated_delta_attention``."""


@dataclass
class Problem:
    """float64 numpy inputs of one check; every backend gets them converted.  Gated DeltaNet
    reads ``q``, the keys scaled to unit length (:meth:`unit_keys`), ``v`` and ``beta``."""

    lam: np.ndarray
    g: np.ndarray | None
    x: np.ndarray
    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    scale: float
    beta: np.ndarray

    @property
    def T(self) -> int:
        return self.lam.shape[-2]

    def prefix(self, n: int) -> "Problem":
        """The causal prefix: the first ``n`` positions (its outputs are the first ``n``
        rows of the full outputs)."""
        return Problem(
            self.lam[..., :n, :], None if self.g is None else self.g[..., :n],
            *(a[..., :n, :] for a in (self.x, self.q, self.k, self.v)), self.scale, self.beta[..., :n],
        )

    def unit_keys(self) -> np.ndarray:
        """``k`` with every row scaled to unit length (Gated DeltaNet's keys: with ``β ≤ 1`` each
        transition ``exp(g)(I − β k kᵀ)`` then has norm at most 1)."""
        norm = np.linalg.norm(self.k, axis=-1, keepdims=True)
        return self.k / np.where(norm > 0, norm, 1.0)


def make_problem(T, batch=(2,), d=16, dk=16, dv=16, decay="mild", seed=0) -> Problem:
    """Random float64 inputs: scales in ``[0.5, 1.5]``, operands standard normal, ``β`` in
    ``[0, 1)``, the decay a kind of :data:`hodlr.testing.DECAYS` or a constant per-step
    log-decay."""
    rng = np.random.default_rng(seed)
    batch = tuple(batch)
    lam = rng.uniform(0.5, 1.5, batch + (T, fenwick.num_levels(T)))
    if isinstance(decay, str):
        if decay not in DECAYS:
            raise ValueError(f"decay must be one of {DECAYS} or a number, got {decay!r}")
        g = decay_values(rng, decay, batch + (T,))
    else:
        g = np.full(batch + (T,), float(decay))
    normal = lambda width: rng.standard_normal(batch + (T, width))  # noqa: E731
    x, q, k, v = normal(d), normal(dk), normal(dk), normal(dv)
    return Problem(lam, g, x, q, k, v, 1.0 / math.sqrt(dk), rng.uniform(0.0, 1.0, batch + (T,)))


def _row_weights(lam, g, t: int) -> np.ndarray:
    """Row ``t`` of the mask, ``M[t, :t+1]``, from the definition (segment sums of ``g``)."""
    s = np.arange(t + 1)
    weights = lam[t, fenwick.level(t, s)]
    if g is not None:
        exponent = np.concatenate([np.cumsum(g[t:0:-1])[::-1], [0.0]])
        weights = weights * np.exp(exponent)
    return weights


def gated_delta_rows(problem: Problem, rows) -> np.ndarray:
    """Rows ``rows`` (in any order) of log-linear Gated DeltaNet's output in float64 from the
    definition, ``(*batch, len(rows), Dv)``:
    ``o_t = Σ_{s ≤ t} λ[t, level(t, s)] P[t, s] v_s`` with
    ``P[t, s] = scale β_s q_tᵀ A_t ⋯ A_{s+1} k_s`` and ``A_u = exp(g_u) (I − β_u k_u k_uᵀ)``
    (unit keys).  One sweep over the keys from the last row down keeps, for every row
    ``t ≥ s``, ``w_t = A_{s+1} ⋯ A_t q_t`` (the ``A`` are symmetric): ``P[t, s] = scale β_s
    w_t · k_s``, then ``w_t ← A_s w_t``.  ``O(len(rows) · Dk)`` memory, no backend involved."""
    p = problem
    rows = np.asarray(rows, dtype=np.int64)
    order = np.argsort(rows, kind="stable")
    rows = rows[order]  # ascending: the rows t >= s are a suffix
    batch = p.lam.shape[:-2]
    keys = p.unit_keys()
    out = np.zeros(batch + (len(rows), p.v.shape[-1]))
    if len(rows) == 0:
        return out
    for b in np.ndindex(*batch):
        lam, q, k, v, beta = p.lam[b], p.q[b], keys[b], p.v[b], p.beta[b]
        alpha = None if p.g is None else np.exp(p.g[b])
        w = q[rows].copy()
        o = np.zeros((len(rows), v.shape[-1]))
        for s in range(int(rows[-1]), -1, -1):
            j = int(np.searchsorted(rows, s))  # rows[j:] are the rows t >= s
            proj = w[j:] @ k[s]
            weight = lam[rows[j:], fenwick.level(rows[j:], s)] * (p.scale * beta[s]) * proj
            o[j:] += weight[:, None] * v[s]
            w[j:] -= (beta[s] * proj)[:, None] * k[s]
            if alpha is not None:
                w[j:] *= alpha[s]
        out[b + (order,)] = o
    return out


def row_reference(problem: Problem, op: str, rows) -> np.ndarray:
    """Rows ``rows`` of the ``op`` (:data:`OPS`) output in float64, one row at a time from the
    definition (each decay segment summed from its own terms; Gated DeltaNet's rows by
    :func:`gated_delta_rows`): ``(*batch, len(rows), D)``, ``O(T)`` memory per row."""
    p = problem
    if op == "gated_delta_attention":
        return gated_delta_rows(p, rows)
    batch = p.lam.shape[:-2]
    width = p.x.shape[-1] if op == "matmul" else p.v.shape[-1]
    out = np.empty(batch + (len(rows), width))
    for b in np.ndindex(*batch):
        lam, g = p.lam[b], None if p.g is None else p.g[b]
        for i, t in enumerate(rows):
            w = _row_weights(lam, g, int(t))
            if op == "matmul":
                out[b + (i,)] = w @ p.x[b][: t + 1]
            else:
                scores = p.scale * (p.k[b][: t + 1] @ p.q[b][t])
                out[b + (i,)] = (w * scores) @ p.v[b][: t + 1]
    return out


def sample_rows(T: int, n: int, seed: int = 0) -> np.ndarray:
    """First, last, powers of two and their neighbours, plus random rows: ``<= n + 40`` rows."""
    special = {0, T - 1}
    for b in range(T.bit_length()):
        special |= {(1 << b) - 1, 1 << b, (1 << b) + 1}
    rng = np.random.default_rng(seed)
    extra = rng.integers(0, T, size=n) if n > 0 else []
    return np.array(sorted(r for r in special | set(int(r) for r in extra) if 0 <= r < T))


def dense_reference(problem: Problem, op: str) -> np.ndarray:
    """The float64 result from ``LogLinearMask.to_dense()`` and numpy (not through any
    backend, so that a broken ``dense`` backend is caught too); Gated DeltaNet's from its
    definition, every row (:func:`gated_delta_rows`)."""
    p = problem
    if op == "gated_delta_attention":
        return gated_delta_rows(p, np.arange(p.T))
    dense = LogLinearMask(p.lam, p.g, validate=False).to_dense()
    if op == "matmul":
        return dense @ p.x
    return (dense * (p.scale * (p.q @ np.swapaxes(p.k, -1, -2)))) @ p.v


def dense_fits(problem: Problem) -> bool:
    """Does the dense float64 reference fit ``hodlr.options.dense_max_bytes``?  Attention's
    holds three dense arrays at once: the mask, the scores and their product."""
    try:
        check_dense_budget(problem.lam.shape[:-2], problem.T, 8, "reference", arrays=3)
    except DenseTooLargeError:
        return False
    return True


# -- running backends --------------------------------------------------------------------
ARRAYS = {"numpy": ("numpy", "cpu"), "torch": ("torch", "cpu"), "cuda": ("torch", "cuda")}
"""``--arrays`` names of the (library, device) pairs a check can run on."""


def _targets(arrays=tuple(ARRAYS)):
    """The (library, device) pairs among ``arrays`` that this machine offers."""
    out = [ARRAYS["numpy"]] if "numpy" in arrays else []
    try:
        import torch
    except ImportError:
        return out
    if "torch" in arrays:
        out.append(ARRAYS["torch"])
    if "cuda" in arrays and torch.cuda.is_available():
        out.append(ARRAYS["cuda"])
    return out


def _convert(a, library, device, dtype):
    if a is None or library == "numpy":
        return None if a is None else a.astype(dtype)
    import torch

    return torch.as_tensor(a, device=device).to(getattr(torch, dtype))


def _to_numpy(y) -> np.ndarray:
    from hodlr.fenwick.arrays import to_numpy

    return np.asarray(to_numpy(y), dtype=np.float64)


def _sync(library, device):
    if library == "torch" and device == "cuda":
        import torch

        torch.cuda.synchronize()


def _tolerance(device, dtype, interpreted) -> float:
    """The bound (:data:`hodlr.testing.TOLERANCES`) of a backend's result on this device and dtype."""
    if dtype == "float64":
        return TOLERANCES["interpreter_float64" if interpreted else "cpu_float64"]
    if interpreted:
        return TOLERANCES["interpreter_float32"]
    return TOLERANCES["gpu_float32" if device == "cuda" else "cpu_float32"]


def _is_refusal(err, device, dtype) -> bool:
    """Does ``err`` say the backend declines these (valid) inputs: it cannot run here, the
    dense intermediates are over budget, or the GPU kernels take no float64?"""
    if isinstance(err, (BackendUnavailableError, DenseTooLargeError)):
        return True
    return isinstance(err, TypeError) and device == "cuda" and dtype == "float64"


@dataclass
class Result:
    backend: str
    where: str
    op: str
    error: float | None = None
    tol: float | None = None
    seconds: float | None = None
    peak_bytes: int | None = None
    note: str = ""
    ok: bool = True


def run_one(name, library, device, problem, op, rows, reference, dtype, repeat, interpreter_length, memory):
    """Run backend ``name`` once per repeat on ``problem`` for ``op``; compare rows ``rows``
    (``None``: all rows) with ``reference``."""
    from hodlr.api import attention, gated_delta_attention, matmul

    where = library if library == "numpy" else f"torch/{device}"
    interpreted = name == "triton" and device != "cuda"
    note = "Triton interpreter on the CPU: the time is not kernel speed" if interpreted else ""
    if interpreted and problem.T > interpreter_length:
        problem = problem.prefix(interpreter_length)
        note = f"Triton interpreter on the CPU, first {interpreter_length} rows: the time is not kernel speed"
        if rows is None:
            reference = reference[..., :interpreter_length, :]
        else:
            inside = rows < interpreter_length
            reference, rows = reference[..., inside, :], rows[inside]
    inputs = {"matmul": (problem.x,), "attention": (problem.q, problem.k, problem.v),
              "gated_delta_attention": (problem.q, problem.unit_keys(), problem.v, problem.beta)}[op]
    lam, g, *args = (_convert(a, library, device, dtype) for a in (problem.lam, problem.g) + inputs)
    M = LogLinearMask(lam, g, validate=False)
    call = {"matmul": lambda: matmul(M, *args, backend=name),
            "attention": lambda: attention(*args, M, scale=problem.scale, backend=name),
            "gated_delta_attention": lambda: gated_delta_attention(*args, M, scale=problem.scale, backend=name)}[op]
    best = math.inf
    peak = None
    try:
        for _ in range(max(repeat, 1)):
            if memory:
                tracemalloc.start()
            _sync(library, device)
            start = time.perf_counter()
            y = call()
            _sync(library, device)
            best = min(best, time.perf_counter() - start)
            if memory:
                peak = tracemalloc.get_traced_memory()[1]
                tracemalloc.stop()
    except (ValueError, TypeError) as err:
        if memory and tracemalloc.is_tracing():
            tracemalloc.stop()
        if not _is_refusal(err, device, dtype):
            raise  # valid inputs: any other ValueError / TypeError is a failure (reported by check)
        return Result(name, where, op, note=f"refused: {type(err).__name__}: {err}", ok=True)
    got = _to_numpy(y)
    if rows is not None:
        got = got[..., rows, :]
    err = relative_error(got, reference)
    tol = _tolerance(device, dtype, interpreted)
    return Result(name, where, op, err, tol, best, peak, note, ok=bool(err <= tol))


def check(problem, names, ops=OPS, dtype="float64", rows=None, repeat=1,
          interpreter_length=INTERPRETER_LENGTH, memory=False, arrays=tuple(ARRAYS), out=None):
    """Run every backend in ``names`` on every (library, device) where it can run; print a
    table; return ``True`` iff at least one result was compared with the reference and all
    of them agree within tolerance.  A reference is computed only for the operations that
    some backend of ``names`` offers."""
    if out is None:  # each line as soon as it is known, into a pipe too
        out = functools.partial(print, flush=True)
    offered = {name: [op for op in ops if registry.offers(registry.load(name), op)] for name in names}
    references = {}
    for op in ops:
        if not any(op in offered[name] for name in names):
            continue
        start = time.perf_counter()
        if rows is None:
            references[op] = _to_numpy(dense_reference(problem, op))
            kind = "dense float64" if op != "gated_delta_attention" else "float64 from the definition, every row"
        else:
            references[op] = row_reference(problem, op, rows)
            kind = f"float64 from the definition, row by row, on {len(rows)} sampled rows"
        out(f"reference {op}: {kind} ({time.perf_counter() - start:.2f} s)")
    results = _Rows(out, memory)
    for name in names:
        module = registry.load(name)
        for op in ops:
            if op not in offered[name]:
                results.append(Result(name, "-", op, note="not offered by this backend"))
        if not offered[name]:
            continue
        ran = False
        reasons = []
        for library, device in _targets(arrays):
            reason = module.unavailable_reason(library, device)
            if reason is not None:
                reasons.append(f"{library}/{device}: {reason}")
                continue
            ran = True
            for op in offered[name]:
                if not registry.takes_keys(module, op, problem.k.shape[-1]):
                    where = library if library == "numpy" else f"torch/{device}"
                    results.append(Result(name, where, op, note=f"refused: its kernels take keys up to "
                                                                f"{module.max_key_width(op)} wide, these are "
                                                                f"{problem.k.shape[-1]}"))
                    continue
                try:
                    res = run_one(name, library, device, problem, op, rows, references[op], dtype, repeat,
                                  interpreter_length, memory)
                    if res.note.startswith("refused") and device == "cuda" and dtype == "float64":
                        # GPU kernels may take float32 only: check them there, at its tolerance
                        res = run_one(name, library, device, problem, op, rows, references[op], "float32", repeat,
                                      interpreter_length, memory)
                        res.note = ("float32: float64 refused; " + res.note).rstrip("; ")
                except Exception as err:  # an unexpected failure is reported, not hidden
                    where = library if library == "numpy" else f"torch/{device}"
                    res = Result(name, where, op, note=f"FAILED: {type(err).__name__}: {err}", ok=False)
                results.append(res)
        if not ran:
            results.append(Result(name, "-", "-", note="unavailable here: " + "; ".join(
                reasons or [f"none of the arrays {', '.join(arrays)} exists on this machine"])))
    bad = [r for r in results if not r.ok]
    compared = [r for r in results if r.error is not None]
    if bad:
        out(f"FAIL: {len(bad)} result(s) disagree with the reference or failed")
    elif not compared:
        out("FAIL: none of the requested backends ran here, so nothing was checked")
    else:
        out(f"OK: every backend that ran agrees with the reference ({len(compared)} result(s) compared)")
    return bool(compared) and not bad


RESULT_COLUMNS = (("backend", 9), ("arrays", 10), ("op", 21), ("rel. error", 10), ("tolerance", 9), ("time", 9),
                  ("peak traced", 11), ("status", 0))
"""The result table's columns and widths (fixed, so that each row prints as soon as it is known)."""


def _result_cells(r) -> list:
    status = ("ok" if r.ok else "DISAGREES") if r.error is not None else ("" if r.ok else "FAILED")
    if r.note:
        status = f"{status} ({r.note})" if status and not r.note.startswith("FAILED") else r.note
    return [r.backend, r.where, r.op, "" if r.error is None else f"{r.error:.2e}",
            "" if r.tol is None else f"{r.tol:.0e}", "" if r.seconds is None else _fmt_seconds(r.seconds),
            "" if r.peak_bytes is None else f"{r.peak_bytes / 2**20:.1f} MiB", status]


def _table_line(cells, memory: bool) -> str:
    keep = [i for i in range(len(RESULT_COLUMNS)) if memory or RESULT_COLUMNS[i][0] != "peak traced"]
    return "  ".join(cells[i].ljust(RESULT_COLUMNS[i][1]) for i in keep).rstrip()


class _Rows(list):
    """The results of :func:`check`, each printed as a table row when it is appended (the header
    first): a long run shows its progress row by row."""

    def __init__(self, out, memory: bool):
        super().__init__()
        self.out, self.memory = out, memory
        out(_table_line([name for name, _ in RESULT_COLUMNS], memory))
        out(_table_line(["-" * max(width, len(name)) for name, width in RESULT_COLUMNS], memory))

    def append(self, result) -> None:
        super().append(result)
        self.out(_table_line(_result_cells(result), self.memory))



def _fmt_seconds(s: float) -> str:
    return f"{s * 1e3:.2f} ms" if s < 1 else f"{s:.2f} s"


# -- show ----------------------------------------------------------------------------------
def level_grid(T: int) -> str:
    """Character picture of the levels: row ``t``, column ``s``; the digit/letter is
    ``level(t, s)``, ``.`` above the diagonal (zero)."""
    lev = fenwick.level_matrix(T)
    lines = [f"levels of the T={T} mask (row t = query, column s = key; '.' = zero above the diagonal)"]
    for t in range(T):
        lines.append(" ".join("." if lev[t, s] < 0 else LEVEL_CHARS[lev[t, s]] for s in range(T)))
    return "\n".join(lines)


def _save_png(T: int, path: str) -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SystemExit("hodlr show --png needs matplotlib: pip install matplotlib (in a checkout: pip install -e '.[plot]')") from None
    try:
        plotting = importlib.import_module("hodlr.plotting")
    except ModuleNotFoundError as err:
        if err.name == "hodlr.plotting":
            raise SystemExit("hodlr show --png: hodlr.plotting is not part of this version") from None
        raise
    save = getattr(plotting, "save_structure_png", None)
    if save is None:
        raise SystemExit("hodlr show --png: hodlr.plotting has no save_structure_png in this version")
    try:
        save(T, path)
    except OSError as err:
        raise SystemExit(f"hodlr show --png: cannot write {path}: {err.strerror or err}") from None


# -- argument parsing ----------------------------------------------------------------------
def _batch(text: str) -> tuple:
    """``"2"`` -> ``(2,)``, ``"2,3"`` (or ``"2x3"``) -> ``(2, 3)``; every part a positive integer."""
    parts = text.replace("x", ",").split(",")
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a batch shape such as 2 or 2,3 (or 2x3), got {text!r}") from None
    if any(n < 1 for n in shape):
        raise argparse.ArgumentTypeError(f"batch sizes must be >= 1 (an empty batch checks nothing), got {text!r}")
    return shape


def _backend_list(text: str) -> list:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in registry.NAMES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown backend(s) {', '.join(unknown) or '(none given)'}; known: {', '.join(registry.NAMES)}"
        )
    return names


def _decay(text: str):
    if text in DECAYS:
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"decay must be one of {', '.join(DECAYS)} or a number (constant per-step log-decay), got {text!r}"
        ) from None
    if not math.isfinite(value) or value > 0:
        raise argparse.ArgumentTypeError(f"decay must be a finite log-decay <= 0 (a positive one grows without "
                                         f"bound and overflows the reference), got {text!r}")
    return value


def _arrays(text: str) -> tuple:
    names = tuple(a.strip() for a in text.split(",") if a.strip())
    if not names or any(a not in ARRAYS for a in names):
        raise argparse.ArgumentTypeError(f"arrays must be a comma-separated subset of {', '.join(ARRAYS)}, got {text!r}")
    return names


def _ops(text: str) -> tuple:
    ops = tuple(o.strip() for o in text.split(",") if o.strip())
    if not ops or any(o not in OPS for o in ops):
        raise argparse.ArgumentTypeError(f"ops must be a comma-separated subset of {', '.join(OPS)}, got {text!r}")
    return ops


def _add_check_args(p, length, batch, decay):
    p.add_argument("--length", "-T", type=positive_int, default=length, help=f"sequence length T (default {length})")
    p.add_argument("--batch", type=_batch, default=batch,
                   help=f"batch shape, e.g. 2 or 2,3 (default {','.join(map(str, batch))})")
    p.add_argument("--backends", type=_backend_list, default=list(registry.NAMES),
                   help="comma-separated backends (default: all)")
    p.add_argument("--ops", type=_ops, default=OPS,
                   help=f"comma-separated operations among {', '.join(OPS)} (default: all)")
    p.add_argument("--arrays", type=_arrays, default=tuple(ARRAYS),
                   help="array types to run on: numpy, torch (CPU), cuda (default: all present)")
    p.add_argument("--d", type=positive_int, default=16, help="matmul width D (default 16)")
    p.add_argument("--dk", type=positive_int, default=16, help="attention and Gated DeltaNet Dk (default 16)")
    p.add_argument("--dv", type=positive_int, default=16, help="attention and Gated DeltaNet Dv (default 16)")
    p.add_argument("--decay", type=_decay, default=decay,
                   help=f"one of {', '.join(DECAYS)} or a constant per-step log-decay (default {decay})")
    p.add_argument("--dtype", choices=("float64", "float32"), default="float64")
    p.add_argument("--seed", type=nonnegative_int, default=0)
    p.add_argument("--repeat", type=positive_int, default=1, help="time the best of this many runs (demo: 2, verify: 1)")
    p.add_argument("--reference", choices=("auto", "dense", "rows"), default="auto",
                   help="dense float64, sampled rows from the definition, or auto (dense when it fits the budget)")
    p.add_argument("--rows", type=positive_int, default=64, help="random rows sampled for the row reference, beside the first, the last and those around "
                        "each power of two (default 64)")
    p.add_argument("--interpreter-length", type=positive_int, default=INTERPRETER_LENGTH,
                   help=f"prefix length for triton under TRITON_INTERPRET=1 (default {INTERPRETER_LENGTH})")
    p.add_argument("--memory", action="store_true",
                   help="trace the peak of Python/numpy allocations per call and print the peak RSS (tracing "
                        "slows the timed calls)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hodlr", description="HODLR matrices of log-linear attention: check, inspect, benchmark."
    )
    sub = parser.add_subparsers(dest="command", metavar="command")
    demo = sub.add_parser("demo", help="build a default mask, run every backend, compare with dense float64")
    _add_check_args(demo, 1000, (2,), "mild")
    demo.set_defaults(repeat=2)
    verify = sub.add_parser("verify", help="the demo's check at a chosen size")
    _add_check_args(verify, 4097, (1,), "mild")
    show = sub.add_parser("show", help="the level structure of a length-T mask")
    show.add_argument("T", type=positive_int)
    show.add_argument("--png", metavar="FILE", type=writable_path,
                      help="also save the structure picture (needs matplotlib)")
    sub.add_parser("backends", help="which backends exist and where they can run")
    for name, module in BENCHES.items():
        sub.add_parser(name, help=f"{BENCH_HELP[name]} (`hodlr {name} --help`)", add_help=False)
    return parser


def _cmd_check(args) -> int:
    problem = make_problem(args.length, args.batch, args.d, args.dk, args.dv, args.decay, args.seed)
    M = LogLinearMask(problem.lam, problem.g)
    print(repr(M))
    if args.dtype != "float64":
        print(f"(the float64 problem and its reference; the backends compute on its {args.dtype} copy)")
    print()
    rows = None
    if args.reference == "rows" or (args.reference == "auto" and not dense_fits(problem)):
        rows = sample_rows(args.length, args.rows, args.seed)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        ok = check(problem, args.backends, args.ops, args.dtype, rows, args.repeat, args.interpreter_length,
                   args.memory, args.arrays)
    except DenseTooLargeError as err:  # (--reference dense past the budget)
        print(f"hodlr {args.command}: error: --reference dense builds the whole T x T reference, and here: {err}. "
              f"Use --reference rows (or auto, which picks rows when the dense one does not fit).", file=sys.stderr)
        return 2
    if args.memory:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(f"peak RSS of this process: {rss / 2**10:.1f} MiB (before the checks, inputs built: {rss0 / 2**10:.1f} MiB)")
    return 0 if ok else 1


SHOW_MAX_T = 2**50
"""The longest ``T`` ``hodlr show`` describes (its block table is closed-form arithmetic on numpy
integers, exact below 2**53)."""


def _cmd_show(args) -> int:
    T = args.T
    if T > SHOW_MAX_T:
        print(f"hodlr show: error: T must be <= 2**50 = {SHOW_MAX_T}, got {T}", file=sys.stderr)
        return 2
    # unit level scales as a broadcast view: the structure of any T without memory of size T
    M = LogLinearMask(np.broadcast_to(np.ones(()), (T, fenwick.num_levels(T))), validate=False)
    if T <= GRID_MAX_T:
        print(level_grid(T))
        print()
    print(repr(M))
    if args.png:
        _save_png(T, args.png)
        print(f"saved {args.png}")
    return 0


def backends_table(info: dict) -> str:
    """The text ``hodlr backends`` prints for :func:`hodlr.backend_info`'s ``info``: one row
    per backend and operation it offers, ``yes`` or ``no (n)`` per place with the reasons as
    numbered notes, then what each backend computes with."""
    places = list(registry.WHERE)
    heads = ["backend", "op"] + [p.replace("_", " ") for p in places]
    cells, reasons = [], {}
    for name, entry in info.items():
        for op, where in entry["ops"].items():
            row = [name, op]
            for p in places:
                value = where[p]
                row.append("yes" if value is True else f"no ({reasons.setdefault(value, len(reasons) + 1)})")
            cells.append(row)
    widths = [max(len(heads[i]), *(len(c[i]) for c in cells)) for i in range(len(heads))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(heads, widths)).rstrip(), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(x.ljust(w) for x, w in zip(c, widths)).rstrip() for c in cells]
    if reasons:
        lines += ["", "why not:"] + [f"  ({n}) {reason}" for reason, n in reasons.items()]
        if any("TRITON_INTERPRET=1 set before" in reason for reason in reasons):
            lines.append("  (hodlr demo, verify and the benchmarks' CPU runs set TRITON_INTERPRET=1 themselves "
                         "where there is no CUDA GPU)")
    unoffered = [op for op in registry.OPS if not any(op in entry["ops"] for entry in info.values())]
    if unoffered:
        lines += ["", "no backend offers: " + ", ".join(unoffered)]
    lines += ["", "backends:"] + [f"  {name}: {entry['description']}" for name, entry in info.items()]
    return "\n".join(lines)


def _cmd_backends() -> int:
    print(backends_table(registry.info()))
    return 0


def _cmd_bench(command: str, rest: list) -> int:
    module_name = BENCHES[command]
    _interpret_triton_without_gpu()  # a CPU smoke run's kernels run in the interpreter
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name == module_name:
            print(f"hodlr {command}: {module_name} is not part of this version of hodlr", file=sys.stderr)
            return 2
        print(f"hodlr {command}: {module_name} needs the missing package {err.name!r}", file=sys.stderr)
        return 2
    result = module.main(rest)
    return int(result or 0)


def _interpret_triton_without_gpu() -> None:
    """Set ``TRITON_INTERPRET=1`` when there is no CUDA GPU, before ``hodlr.kernels`` is
    imported (its kernels are defined for the interpreter or the GPU then, once)."""
    if "TRITON_INTERPRET" in os.environ or "hodlr.kernels" in sys.modules:
        return
    try:
        import torch
    except ImportError:
        return
    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


def main(argv=None) -> int:
    """Entry point of the ``hodlr`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in BENCHES:
        return _cmd_bench(argv[0], argv[1:])
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if args.command in ("demo", "verify"):
            _interpret_triton_without_gpu()
            try:
                return _cmd_check(args)
            except KeyboardInterrupt:
                print(f"\nhodlr {args.command}: interrupted (the rows above were complete)", file=sys.stderr)
                return 130
        if args.command == "show":
            return _cmd_show(args)
        return _cmd_backends()
    except BrokenPipeError:  # the reader stopped (``| head``): nothing more to say, and no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # as the shell reports a command ended by SIGPIPE
