"""``hodlr bench-hattention``: the log-linear attention authors' Gated DeltaNet kernel beside hodlr's.

hattention (HanGuo97/log-linear-attention at commit 7f8644159c1406fae1ad863829a5b3a4fbf63022, the
code of the log-linear attention paper) computes log-linear Gated DeltaNet with
``hattention.gated_delta_rule_apis.chunk_h_gated_delta_rule``, as :func:`hodlr.log_linear_gated_delta_rule`
does.  For each head width ``D`` (``H = model_width // D`` heads) and length ``T``
(``B = tokens // T``) it times, with medians of ``triton.testing.do_bench`` (ms) on bf16
``(B, T, H, D)`` inputs, each after one untimed call:

- ``hodlr_fwd``: :func:`hodlr.log_linear_gated_delta_rule` with its defaults (the ``triton``
  backend on a GPU), no gradient; ``hodlr_fwdbwd``: the same call and ``torch.autograd.grad`` of
  every input (q, k, v, g, β, λ);
- ``hatt_fwd`` / ``hatt_fwdbwd``: hattention on the same inputs (``l = λ·scale``), likewise;
- the ratios ``hatt_fwd_over_hodlr_fwd`` and ``hatt_fwdbwd_over_hodlr_fwdbwd``, the peak GPU memory
  while timing each call (``*_peak_GiB``: the inputs and ``do_bench``'s cache-flush buffer
  included) and the size of hattention's ``T x T`` level table (``hatt_llut_GiB``).

``--no-bwd`` skips the forward + backward timings and the gradients of the accuracy check;
``--profile`` adds each row's forward + backward split by kernel (``*_kernels_fwdbwd``, ms a call;
the forward's with ``--no-bwd``).

``--accuracy T ...`` (default 4096; no check when given no length) compares, at ``B = 1, H = 4,
D = 64`` in bf16, the outputs and gradients of both with hodlr's float64 ``chunked`` backend on the
same inputs, q and k l2-normalised inside the autograd graph of the reference and of hodlr (as
hattention does in its kernel): relative Frobenius errors ``hodlr_*``, ``hatt_*`` (level scales in
bf16, as q) and ``hatt_l_float32_*`` (level scales in float32).

``--hatt-levels fixed`` (default) gives hattention ``num_levels(max T)`` level-scale columns at
every ``T`` (it reads only those it needs; the authors' model also uses a fixed count), so its
kernels compile and autotune once per ``D``; ``exact`` gives it ``num_levels(T)``.
``--hatt-l-dtype`` is the dtype of its level scales in the timing rows (default: that of q).

``--autotune-cache DIR`` keeps Triton's autotuning results on disk: hattention's and fla 0.4.0's
kernels autotune on their first call (its backward's for more than 10 minutes on an H200), so a
first run stopped part-way keeps the kernels it tuned and a second
run with the same ``DIR`` (or only its ``*.autotune.json`` files, in their folders:
``cd DIR && find . -name '*.autotune.json' | tar -czf tuned.tgz -T -``) reuses them.  The
autotuners read the setting when they are built: hattention and fla must not be imported before.
The backward's host-level autotuner tries four ``(BK, BV)`` block pairs, each with a set of
kernels of its own to tune; ``--hatt-blocks 64x64`` keeps one pair (recorded as ``hatt_blocks``),
a quarter of that tuning.  The kernels' tuning keys hold the head count ``H`` (not ``T``): the
accuracy check (``H = 4``) tunes a set of its own, which ``--accuracy`` with no length saves.
Tuning in several processes at once does not shorten it: ten
processes sharing one H200 (eight of them hattention's, one a head width and block pair) took 280 s
for the forward's tuning, which one process does in about a minute.

Writes a JSON file (after every row) and a picture (``--json``, ``--png``).  When hattention
cannot be imported, the error is recorded (``hatt_import_error``) and hodlr alone is timed.

Conventions (hattention -> hodlr), from hattention's source and checked numerically:

- call: ``chunk_h_gated_delta_rule(q, k, v, g, l, beta, scale=..., use_qk_l2norm_in_kernel=True)``:
  ``l`` (level scales) comes BEFORE ``beta`` (fla's and hodlr's order is ``g, beta``);
  ``use_qk_l2norm_in_kernel=True`` is required (asserted), and it normalises q as well as k.
- λ: with ``SCALE_LAMBDA = True`` the API divides ``l`` by ``scale`` and the kernel multiplies the
  normalised q by ``scale``, so the scale cancels: hattention computes
  ``sum_l l[t, level] * (q̂ᵀ ⋯ k̂) v``.  Hence
  ``hattention(q, k, v, g, l=λ·scale, β, scale) == hodlr(q̂, k̂, v, g, β, λ, scale=scale)``.
- gate: ``g`` is the per-token log-decay ``(B, T, H)``, float32, as in fla and hodlr (the
  recurrent reference ``hattention.recurrent.hattention_recurrent`` takes ``A = exp(g)`` instead,
  and no scale: ``L = λ·scale`` with q̂, k̂ there).
- levels: ``l`` is ``(B, T, H, L)`` with ``L >= 7 + ceil(log2(T / 64)) == hodlr.num_levels(T)``
  (extra columns unused); base 2, weak cascade, the same level index as hodlr.
- layout ``(B, T, H, D)``, bf16 q/k/v (the API refuses float32), ``T % 64 == 0``, ``D % 64 == 0``.

hattention is used as published; :func:`patch_hattention` adapts it at run time to fla-core 0.4.0
(l2norm API, the keywords of a backward kernel), to large ``T`` (a vectorised level table) and to
Triton's interpreter.  Installing the two outside pieces: hattention's source on
``PYTHONPATH`` (its package ``__init__`` imports transformers and its model classes, which need
mamba-ssm and causal-conv1d; the kernels need none of them, only einops, jaxtyping and click, so
the copy's ``__init__.py`` is reduced to its version line), and fla-core 0.4.0, which hattention
was written against, in a directory of its own (``--target``), since hodlr's other comparisons
use the fla-core 0.6.0 installed beside hodlr::

    DIR=$HOME/hattention-bench   # any folder of your choice
    git clone https://github.com/HanGuo97/log-linear-attention $DIR/log-linear-attention
    git -C $DIR/log-linear-attention checkout 7f8644159c1406fae1ad863829a5b3a4fbf63022
    mkdir -p $DIR/hattention && cp -r $DIR/log-linear-attention/hattention $DIR/hattention/
    echo '__version__ = "0.0.1"' > $DIR/hattention/hattention/__init__.py
    python3 -m pip install einops jaxtyping click
    python3 -m pip install --no-deps --target $DIR/fla04 fla-core==0.4.0

GPU (``T`` 2048 ... 65536, ``D`` 64 and 128, accuracy at 4096), whole or by head width::

    PYTHONPATH=$DIR/fla04:$DIR/hattention python3 -m hodlr bench-hattention \\
        --json hatt.json --png hatt.png
    PYTHONPATH=$DIR/fla04:$DIR/hattention python3 -m hodlr bench-hattention --widths 64 \\
        --json hatt-64.json --png hatt-64.png
    PYTHONPATH=$DIR/fla04:$DIR/hattention python3 -m hodlr bench-hattention --widths 128 --accuracy \\
        --json hatt-128.json --png hatt-128.png

``--device cpu`` runs the code path with Triton's interpreter (``TRITON_INTERPRET=1``, set for the
run when unset; hattention and fla run interpreted, hodlr's default backend on the CPU is the
PyTorch ``chunked`` one) at ``T = 128, D = 64`` (accuracy at ``T = 128, H = 2``) in float32, as
the interpreter's bf16 arithmetic is broken: a smoke test, the times mean nothing.  There hattention is called
through ``hattention.kernel.hattention_kernel`` as its API does (the API refuses float32), and
fla-core 0.4.0 needs a Triton that still has ``tl.make_block_ptr`` (3.6 or older)::

    PYTHONPATH=$DIR/fla04:$DIR/hattention python3 -m hodlr bench-hattention --device cpu \\
        --json hatt-cpu.json --png hatt-cpu.png
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import inspect
import os
import sys
import traceback
import warnings

from hodlr.bench import (_commit, _fmt, _rel, _timed, accuracy_line, fill_device_defaults, forward_calls,
                         kernel_times, positive_int, save_figure, sweep_parser, timer, width_panels, write)
from hodlr.bench_gated_delta import _inputs

__all__ = ["main", "run", "patch_hattention"]

HATT_COMMIT = "7f8644159c1406fae1ad863829a5b3a4fbf63022"
"""The commit of HanGuo97/log-linear-attention whose hattention this benchmark calls."""

DEFAULT_LENGTHS = (2048, 8192, 16384, 32768, 65536)
DEFAULT_WIDTHS = (64, 128)
DEFAULT_ACCURACY = (4096,)
CPU_DEFAULTS = {"lengths": [128], "widths": [64], "model_width": 64, "tokens": 128, "accuracy": [128]}
"""``--device cpu`` defaults: the smallest shapes hattention takes (``T % 64 == D % 64 == 0``)."""

ACCURACY_SHAPE = {"cuda": (1, 4, 64), "cpu": (1, 2, 64)}
"""``(B, H, D)`` of the accuracy check, by device."""


# -- run-time adaptations of hattention ---------------------------------------------------------
# Nothing in hattention's files is edited; patch_hattention rebinds names in its modules:
#
# 1. l2norm API: hattention.kernel was written for an older fla whose l2norm_fwd(x) returned y and
#    l2norm_bwd(x, dy) took the input; fla 0.4.0's l2norm_fwd returns (y, rstd) and its l2norm_bwd
#    is (y, rstd, dy), so l2norm_and_scale_fwd would compute (y, rstd) * scale ("TypeError: can't
#    multiply sequence by non-int of type 'float'").
# 2. level table: hattention.base.make_levels_matrix (T x T int64 level indices) always builds the
#    16384 x 16384 table first, loading it from a path on the authors' cluster (FileNotFoundError
#    elsewhere), else by an O(T^2) Python loop (hours), and raises ValueError for T > 16384.  It is
#    replaced by an exact vectorised equivalent (base 2, weak): level(t, s) = bit_length(t ^ s) for
#    s < t, 0 elsewhere; int32; T x T (the kernels address it with row stride T though they read
#    only the diagonal 64 x 64 blocks): 16 GiB at T = 65536.
# 3. backward: hattention.chunkwise_hgdn.chunkwise_bwd launches fla's chunk_bwd_kernel_dv_local with
#    the older keywords (offsets, indices, HEAD_FIRST); fla 0.4.0's takes (g_gamma, A, cu_seqlens,
#    chunk_indices) -> KeyError: 'g_gamma'.  An adapter maps them (the same computation).
# 4. CPU interpreter only: fla's input_guard opens torch.cpu.device (missing); fla binds exp = tl.exp
#    at import (the interpreter patches tl's builtins only while a kernel runs); the interpreter's
#    __index__ fails on 1-element scalars (range(NT)); the autotuners are cut to one config.
# 5. autotuning kept on disk (--autotune-cache): hattention's own ``autotune`` decorator tunes host
#    functions (a Triton Autotuner over a plain Python function), for which Triton's disk cache
#    looks for a JITFunction to hash ("AttributeError: 'function' object has no attribute 'fn'"):
#    those autotuners tune in memory, every Triton kernel's results are kept on disk.
# 6. fewer host configurations (--hatt-blocks): the backward's host-level autotuner tries every
#    (block_size_K, block_size_V) in {32, 64}^2 and each pair tunes its own set of Triton kernels
#    (their keys hold the block sizes), four sets; --hatt-blocks 64x64 keeps one pair, a quarter of
#    the tuning, and records it (hatt_blocks) beside the figures.


def _levels_matrix_fast(torch, length, device, block=4096):
    """hattention's level table for base 2, weak cascade: ``(length, length)`` int32 with
    ``[t, s] = fenwick.level(t, s)`` (the bit length of ``t ^ s``) for ``s < t`` and 0 elsewhere,
    built ``block`` rows at a time on ``device`` by looking ``t ^ s`` up in the levels of every
    ``x < 2^bits`` (``fenwick.level(x, 0)``, computed once on the host)."""
    import numpy as np

    from hodlr import fenwick

    t = torch.arange(length, device=device, dtype=torch.int32)
    bits = max(1, int(length - 1).bit_length())
    by_xor = torch.as_tensor(fenwick.level(np.arange(1 << bits), 0), dtype=torch.int32, device=device)
    out = torch.empty((length, length), dtype=torch.int32, device=device)
    for r0 in range(0, length, block):
        rows = t[r0:r0 + block, None]
        out[r0:r0 + block] = torch.where(t[None, :] < rows, by_xor[rows ^ t[None, :]], 0)
    return out


def _patch_levels(torch):
    """Point hattention's ``make_levels_matrix`` (in the modules of its Gated DeltaNet path) at
    :func:`_levels_matrix_fast` for the base-2 weak table, cached for the last ``(T, device)``;
    other tables keep the original.  The replacement has ``cache_clear()``."""
    import hattention.base as hbase
    import hattention.chunkwise as cw
    import hattention.chunkwise_hgdn as cwh

    original = getattr(hbase.make_levels_matrix, "__wrapped_original__", hbase.make_levels_matrix)

    @functools.lru_cache(maxsize=1)
    def _cached(length, device):
        return _levels_matrix_fast(torch, length, device)

    def make_levels_matrix(length, base, htype, dtype, device, default=-1, clamp_min=None, file_name=None,
                           cached_length=16384):
        if base != 2 or htype != hbase.HType.WEAK or clamp_min != 0:  # not the H-GDN weak path
            return original(length=length, base=base, htype=htype, dtype=dtype, device=device, default=default,
                            clamp_min=clamp_min, file_name=file_name, cached_length=cached_length)
        return _cached(int(length), torch.device(device))

    make_levels_matrix.__wrapped_original__ = original
    make_levels_matrix.cache_clear = _cached.cache_clear
    for module in (hbase, cw, cwh):
        module.make_levels_matrix = make_levels_matrix


def _patch_l2norm():
    """Give ``hattention.kernel`` the older fla l2norm API on top of fla 0.4.0's; ``True`` when
    applied, ``False`` when fla already has that API."""
    import hattention.kernel as hk
    from fla.modules import l2norm as fl

    if "rstd" not in inspect.signature(fl.l2norm_bwd).parameters:
        return False

    def l2norm_fwd(x, eps=1e-6, output_dtype=None):
        return fl.l2norm_fwd(x, eps, output_dtype)[0]

    def l2norm_bwd(x, dy, eps=1e-6):
        y, rstd = fl.l2norm_fwd(x, eps)
        return fl.l2norm_bwd(y, rstd, dy, eps)

    hk.l2norm_fwd = l2norm_fwd
    hk.l2norm_bwd = l2norm_bwd
    return True


class _DvLocalAdapter:
    """``fla.ops.common.chunk_o.chunk_bwd_kernel_dv_local`` launched with the keyword arguments of
    the older fla that ``hattention.chunkwise_hgdn.chunkwise_bwd`` was written for (``offsets``,
    ``indices``, ``HEAD_FIRST``; no ``g_gamma``, ``A``).  The same computation:
    ``dv_j = scale * sum_{i >= j in chunk} (k_j · q_i) exp(g_i - g_j) do_i``."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.__name__ = "chunk_bwd_kernel_dv_local"

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def call(*args, offsets=None, indices=None, HEAD_FIRST=False, **kwargs):
            if HEAD_FIRST:
                raise NotImplementedError("chunk_bwd_kernel_dv_local: HEAD_FIRST=True (head-first layout)")
            return launch(*args, g_gamma=None, A=None, cu_seqlens=offsets, chunk_indices=indices, **kwargs)

        return call


def _patch_dv_local():
    """Wrap hattention's ``chunk_bwd_kernel_dv_local`` in :class:`_DvLocalAdapter` when fla's
    kernel has the newer arguments; ``True`` when wrapped (now or before)."""
    import hattention.chunkwise_hgdn as cwh

    kernel = cwh.chunk_bwd_kernel_dv_local
    if isinstance(kernel, _DvLocalAdapter):
        return True
    if "g_gamma" not in getattr(kernel, "arg_names", []):
        return False
    cwh.chunk_bwd_kernel_dv_local = _DvLocalAdapter(kernel)
    return True


def _autotuners():
    """Every Triton ``Autotuner`` reachable from hattention's and fla's modules (also those hidden
    in the closures of hattention's own ``autotune`` decorator)."""
    from triton.runtime.autotuner import Autotuner

    seen = {}
    for name, module in list(sys.modules.items()):
        if module is None or not name.startswith(("hattention", "fla")):
            continue
        for obj in list(vars(module).values()):
            stack = [obj]
            if callable(obj) and getattr(obj, "__closure__", None):
                for cell in obj.__closure__:
                    with contextlib.suppress(ValueError):  # an empty cell
                        stack.append(cell.cell_contents)
            for o in stack:
                for _ in range(4):  # Heuristics -> Autotuner -> JITFunction chains
                    if isinstance(o, Autotuner):
                        seen[id(o)] = o
                    o = getattr(o, "fn", None)
                    if o is None:
                        break
    return list(seen.values())


def _host_autotuners():
    """The autotuners among :func:`_autotuners` whose function is a host function (hattention's
    ``autotune`` decorator), not a Triton kernel."""
    from triton.runtime.autotuner import Autotuner, Heuristics
    from triton.runtime.jit import KernelInterface

    found = []
    for autotuner in _autotuners():
        fn = autotuner.fn
        while isinstance(fn, (Autotuner, Heuristics)):
            fn = fn.fn
        if not isinstance(fn, KernelInterface):
            found.append(autotuner)
    return found


def _host_autotuners_in_memory():
    """Turn Triton's disk cache off for the autotuners over host functions (item 5 above); returns
    how many."""
    count = 0
    for autotuner in _host_autotuners():
        if getattr(autotuner, "cache_results", False):
            autotuner.cache_results = False
            count += 1
    return count


class BlocksNotOffered(ValueError):
    """``--hatt-blocks`` names no pair that one of hattention's host-level autotuners offers."""


def _block_configs(blocks):
    """Cut hattention's host-level autotuners over ``(block_size_K, block_size_V)`` to the pairs in
    ``blocks`` (item 6 above); returns ``{autotuner's function: [kept pairs]}``.  Raises
    :class:`BlocksNotOffered` (a ``ValueError`` naming ``--hatt-blocks``) when an autotuner offers
    none of them."""
    kept = {}
    for autotuner in _host_autotuners():
        offered = [_block_pair(c) for c in autotuner.configs]
        if any(None in p for p in offered):
            continue
        configs = [c for c in autotuner.configs if _block_pair(c) in blocks]
        fn = autotuner.fn.fn
        name = f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', fn)}"
        if not configs:
            raise BlocksNotOffered(f"--hatt-blocks: {name} offers (BK, BV) in {sorted(set(offered))}, got "
                                   f"{sorted(blocks)}; want at least one of its pairs")
        autotuner.configs = configs
        kept[name] = sorted(_block_pair(c) for c in configs)
    return kept


def _block_pair(config):
    """``(block_size_K, block_size_V)`` of a Triton config (None where it sets no such keyword)."""
    return config.kwargs.get("block_size_K"), config.kwargs.get("block_size_V")


def _rebind_builtin_aliases():
    """Triton's interpreter patches the builtins of ``triton.language`` only while a kernel runs;
    fla binds some at import (``exp = tl.exp`` in ``fla.ops.utils.op``), which then raise "Did you
    forget to add @triton.jit ?".  Rebind such aliases to look-ups at call time."""
    import triton.language as tl

    def late(owner, name):
        def f(*args, **kwargs):
            return getattr(owner, name)(*args, **kwargs)

        return f

    for module_name, module in list(sys.modules.items()):
        if module is None or not module_name.startswith(("hattention", "fla")):
            continue
        for name, value in list(vars(module).items()):
            if not tl.core.is_builtin(value):
                continue
            attr = getattr(value, "__name__", None)
            for owner in (tl, tl.math):
                if attr and getattr(owner, attr, None) is value:
                    setattr(module, name, late(owner, attr))
                    break


def _patch_interpreter_index():
    """Triton's interpreter converts a kernel scalar used as an index (``range(NT)`` with
    ``NT = tl.cdiv(T, BT)``) by ``int(array)``, which fails for the 1-element arrays it keeps some
    scalars in ("only 0-dimensional arrays can be converted to Python scalars")."""
    import triton.runtime.interpreter as ti

    if getattr(ti._patch_lang_tensor, "_hatt_patched", False):
        return
    original = ti._patch_lang_tensor

    def _patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    _patch_lang_tensor._hatt_patched = True
    ti._patch_lang_tensor = _patch_lang_tensor


def _patch_cpu():
    """The interpreter-only adaptations (item 4 above)."""
    import fla.modules.l2norm  # noqa: F401 - the modules whose aliases and autotuners are patched
    import fla.ops.utils  # noqa: F401
    import fla.utils as fu

    _patch_interpreter_index()
    fu.custom_device_ctx = lambda index: contextlib.nullcontext()
    _rebind_builtin_aliases()
    for autotuner in _autotuners():
        autotuner.configs = autotuner.configs[:1]


def patch_hattention(torch, cpu=False, blocks=None):
    """Import hattention and apply the run-time adaptations listed in the comment above (``cpu``:
    also those for Triton's interpreter; ``blocks``: a set of ``(BK, BV)`` for item 6); returns
    ``(chunk_h_gated_delta_rule, {adaptation: applied})``.  Raises ``ImportError`` when hattention
    or fla cannot be imported."""
    import hattention.chunkwise_hgdn  # noqa: F401
    import hattention.kernel  # noqa: F401
    from hattention.gated_delta_rule_apis import chunk_h_gated_delta_rule

    warnings.filterwarnings("ignore", message=".*Scaling lambda.*")  # the API warns on every call
    fixes = {"l2norm_adapter": _patch_l2norm()}
    _patch_levels(torch)
    fixes["levels_matrix"] = "vectorised int32 T x T"
    fixes["dv_local_adapter"] = _patch_dv_local()
    fixes["host_autotuners_in_memory"] = _host_autotuners_in_memory()
    if blocks:
        fixes["host_blocks"] = {name: [f"{bk}x{bv}" for bk, bv in pairs]
                                for name, pairs in _block_configs(blocks).items()}
    if cpu:
        _patch_cpu()
        fixes["cpu_interpreter"] = True
    return chunk_h_gated_delta_rule, fixes


# -- the benchmark -------------------------------------------------------------------------------
def _hatt_direct(q, k, v, g, lev, beta, scale):
    """What ``chunk_h_gated_delta_rule`` computes for ``output_final_state=False``, without its
    bf16-only assert: ``(B, T, H, D)`` from q, k, v ``(B, T, H, D)``, g, beta ``(B, T, H)`` and level
    scales ``lev`` ``(B, T, H, L)`` (used for float32 under the CPU interpreter)."""
    from hattention.base import HStruct, HType
    from hattention.kernel import hattention_kernel

    return hattention_kernel(q=q, k=k, v=v, b=beta, g=g, l=lev / scale, scale=scale, head_first=False, level_base=2,
                             htype=HType.WEAK, hstruct=HStruct.GDELTA, use_qk_l2norm_in_kernel=True)


def _hatt_call(hatt, scale, direct):
    """hattention's output ``(B, T, H, D)`` as a function of ``(q, k, v, g, lev, beta)``: through
    its API, or (``direct``, for float32) through its kernel as the API calls it."""
    if direct:
        return lambda q, k, v, g, lev, beta: _hatt_direct(q, k, v, g, lev, beta, scale)
    return lambda q, k, v, g, lev, beta: hatt(q, k, v, g, lev, beta, scale=scale, use_qk_l2norm_in_kernel=True)[0]


def _pad_levels(torch, lev, L):
    """Level scales ``(B, T, H, l)`` widened with ones to ``(B, T, H, L)`` (``L`` None or
    ``<= l``: unchanged), contiguous.  hattention never reads the extra columns; a fixed ``L``
    keeps its kernels' constexpr, and so their compilation and autotuning, the same for every T."""
    if L is None or L <= lev.shape[-1]:
        return lev.contiguous()
    pad = torch.ones(*lev.shape[:-1], L - lev.shape[-1], dtype=lev.dtype, device=lev.device)
    return torch.cat([lev, pad], dim=-1).contiguous()


def _measure(torch, row, key, bench, fn, cuda):
    """``row[key] = bench(fn)`` (ms) after one untimed call (compilation, autotuning), with (``cuda``)
    the peak GPU memory of both in ``row[key + "_peak_GiB"]``; a failure is recorded as
    ``row[key + "_error"]`` and printed, and the run goes on."""

    def measure():
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        fn()
        ms = bench(fn)
        if cuda:
            row[key + "_peak_GiB"] = torch.cuda.max_memory_allocated() / 2 ** 30
        return ms

    _timed(row, key, measure)
    if key + "_error" in row:
        print(f"  {key} failed: {row[key + '_error'].strip().splitlines()[-1]}", flush=True)


def _time_pair(torch, row, name, bench, fwd, fwdbwd, args):
    """``{name}_fwd`` and, unless ``--no-bwd``, ``{name}_fwdbwd``; with ``--profile`` the per-kernel
    split of the last of them; then the GPU cache is emptied."""
    cuda = args.device == "cuda"
    _measure(torch, row, name + "_fwd", bench, fwd, cuda)
    if not args.no_bwd:
        _measure(torch, row, name + "_fwdbwd", bench, fwdbwd, cuda)
    if args.profile:
        which, fn = ("fwd", fwd) if args.no_bwd else ("fwdbwd", fwdbwd)
        _timed(row, f"{name}_kernels_{which}", lambda: kernel_times(torch, fn))
    if cuda:
        torch.cuda.empty_cache()


def _row(torch, bench, hatt, D, H, T, B, device, args):
    """One timing row at ``(B, T, H, D)``: hodlr, then hattention when ``hatt`` is not None."""
    import hodlr

    row = {"D": D, "H": H, "T": T, "B": B}
    q, k, v, g, beta, lam, do = _inputs(torch, B, T, H, D, args.dtype, device)
    scale = D ** -0.5
    calls = forward_calls(torch, lambda *a: hodlr.log_linear_gated_delta_rule(*a, scale=scale)[0],
                          (q, k, v, g, beta, lam), do)
    _time_pair(torch, row, "hodlr", bench, *calls, args)

    if hatt is not None:
        import hattention.base

        lev = _pad_levels(torch, (lam * scale).to(args.hatt_l_dtype), args.hatt_levels)
        row["hatt_L"] = lev.shape[-1]
        calls = forward_calls(torch, _hatt_call(hatt, scale, direct=args.dtype == torch.float32),
                              (q, k, v, g, lev, beta), do)
        _time_pair(torch, row, "hatt", bench, *calls, args)
        row["hatt_llut_GiB"] = 4 * T * T / 2 ** 30  # its T x T int32 level table
        hattention.base.make_levels_matrix.cache_clear()
    for a, b in (("hatt_fwd", "hodlr_fwd"), ("hatt_fwdbwd", "hodlr_fwdbwd")):
        if row.get(a) and row.get(b):
            row[a + "_over_" + b] = row[a] / row[b]
    return row


def _accuracy(torch, hatt, T, B, H, D, device, dtype, gradients=True):
    """Relative Frobenius errors against hodlr's float64 ``chunked`` backend at ``(B, T, H, D)`` in
    ``dtype``, q and k l2-normalised inside the autograd graph (as hattention's
    ``use_qk_l2norm_in_kernel`` does): the output and (``gradients``) the gradients of q, k, v, g,
    β, λ of hodlr's default backend and of hattention (level scales ``l = λ·scale`` in ``dtype`` and
    in float32; λ's gradient through ``l``)."""
    import hodlr

    normalize = torch.nn.functional.normalize
    row = {"T": T, "B": B, "H": H, "D": D, "dtype": str(dtype).replace("torch.", "")}
    q, k, v, g, beta, lam, do = _inputs(torch, B, T, H, D, dtype, device, seed=T)
    scale = D ** -0.5
    names = ("dq", "dk", "dv", "dg", "dbeta", "dlam")

    refs = [x.detach().double().requires_grad_() for x in (q, k, v, g, beta, lam)]
    ref = hodlr.log_linear_gated_delta_rule(normalize(refs[0], dim=-1), normalize(refs[1], dim=-1), *refs[2:],
                                            scale=scale, backend="chunked")[0]
    ref_grads = torch.autograd.grad(ref, refs, do.double()) if gradients else ()
    row["ref_norm"] = float(ref.detach().norm())

    try:
        xs = [x.detach().requires_grad_() for x in (q, k, v, g, beta, lam)]
        o = hodlr.log_linear_gated_delta_rule(normalize(xs[0].float(), dim=-1).to(dtype),
                                              normalize(xs[1].float(), dim=-1).to(dtype), *xs[2:], scale=scale)[0]
        row["hodlr_o"] = _rel(o, ref)
        for name, a, b in zip(names, torch.autograd.grad(o, xs, do) if gradients else (), ref_grads):
            row["hodlr_" + name] = _rel(a, b)
    except Exception:  # noqa: BLE001 - a failure is recorded, the run goes on
        row["hodlr_error"] = traceback.format_exc(limit=4)[-600:]

    if hatt is None:
        return row
    direct = dtype == torch.float32
    call = _hatt_call(hatt, scale, direct)
    for l_dtype in (torch.float32,) if direct else (torch.bfloat16, torch.float32):
        key = "hatt" + ("" if l_dtype == dtype else "_l_" + str(l_dtype).replace("torch.", ""))
        try:
            xs = [x.detach().requires_grad_() for x in (q, k, v, g, beta, lam)]
            o = call(xs[0], xs[1], xs[2], xs[3], (xs[5] * scale).to(l_dtype), xs[4])
            row[key + "_o"] = _rel(o, ref)
            for name, a, b in zip(names, torch.autograd.grad(o, xs, do) if gradients else (), ref_grads):
                row[key + "_" + name] = _rel(a, b)
        except Exception:  # noqa: BLE001
            row[key + "_error"] = traceback.format_exc(limit=4)[-600:]
            print(f"  {key} accuracy failed: {row[key + '_error'].strip().splitlines()[-1]}", flush=True)
    return row


def _format_row(r) -> str:
    def t(key):
        return "FAIL" if key + "_error" in r else _fmt(r.get(key))

    return (f"| {r['D']:>3} | {r['H']:>2} | {r['T']:>6} | {r['B']:>2} | {t('hatt_fwd'):>9} | {t('hodlr_fwd'):>9} | "
            f"{_fmt(r.get('hatt_fwd_over_hodlr_fwd'), '.2f'):>6} | {t('hatt_fwdbwd'):>9} | {t('hodlr_fwdbwd'):>9} | "
            f"{_fmt(r.get('hatt_fwdbwd_over_hodlr_fwdbwd'), '.2f'):>6} |")


TABLE_HEAD = ("times in ms (medians); ratio: hattention / hodlr\n"
              "|   D |  H |      T |  B |  hatt fwd | hodlr fwd |  ratio | hatt f+b  | hodlr f+b |  ratio |\n"
              "|----:|---:|-------:|---:|----------:|----------:|-------:|----------:|----------:|-------:|")


def _fla_import():
    """``(fla.__version__, its directory)`` of the fla that imports here, or ``(None, None)``."""
    try:
        import fla
    except Exception:  # noqa: BLE001 - any failure means "not importable here"
        return None, None
    return getattr(fla, "__version__", "?"), os.path.dirname(fla.__file__)


def run(args) -> dict:
    """The accuracy check and the timing rows for parsed ``args`` (writing ``args.json`` after
    each); returns the result."""
    cuda = args.device == "cuda"
    if not cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch
    import triton

    import hodlr

    if cuda and not torch.cuda.is_available():
        raise SystemExit("hodlr bench-hattention: --device cuda needs a CUDA GPU (or --device cpu for a smoke run)")
    device = torch.device(args.device)
    args.dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    args.hatt_l_dtype = getattr(torch, args.hatt_l_dtype) if args.hatt_l_dtype else args.dtype
    args.hatt_levels = hodlr.num_levels(max(args.lengths)) if args.hatt_levels == "fixed" else None

    bench = timer(cuda, args.warmup, args.rep)
    fla_version, fla_path = _fla_import()
    result = {
        "device": torch.cuda.get_device_properties(0).name if cuda else "cpu (Triton interpreter smoke run)",
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": _commit(args.commit), "torch": torch.__version__, "triton": triton.__version__,
        "fla": fla_version, "fla_path": fla_path, "hattention_commit": HATT_COMMIT,
        "dtype": str(args.dtype).replace("torch.", ""), "hatt_l_dtype": str(args.hatt_l_dtype).replace("torch.", ""),
        "hatt_levels": args.hatt_levels or "num_levels(T)",
        "hatt_blocks": [f"{bk}x{bv}" for bk, bv in args.hatt_blocks] if args.hatt_blocks else "all",
        "tokens": args.tokens, "model_width": args.model_width,
        "rows": [], "accuracy": [], "complete": False,
        "notes": ("hatt = hattention chunk_h_gated_delta_rule(q, k, v, g, l=λ·scale, beta, scale, "
                  "use_qk_l2norm_in_kernel=True) with the run-time adaptations of hodlr.bench_hattention "
                  "(l2norm API, level table, dv_local keywords); hodlr = hodlr.log_linear_gated_delta_rule, default "
                  "backend; times are do_bench medians in ms (cpu: one wall-clock call); *_fwdbwd = forward + "
                  "torch.autograd.grad of all inputs; hattention also l2-normalises q and k in its kernel, hodlr "
                  "does not."),
    }
    hatt = None
    try:
        hatt, result["hatt_fixes"] = patch_hattention(torch, cpu=not cuda, blocks=set(args.hatt_blocks or ()))
    except BlocksNotOffered:  # the caller's mistake, reported by main()
        raise
    except Exception:  # noqa: BLE001 - without hattention, hodlr alone is timed
        result["hatt_import_error"] = traceback.format_exc(limit=4)[-1200:]
        last = result["hatt_import_error"].strip().splitlines()[-1]
        print(f"hattention unavailable ({last}): timing hodlr alone (the JSON keeps the traceback; installing "
              f"hattention: this command's module docstring, hodlr.bench_hattention)", flush=True)
    print(f"{result['device']} | torch {result['torch']} | triton {result['triton']} | fla {result['fla']} | "
          f"hattention adaptations {result.get('hatt_fixes')}", flush=True)

    B, H, D = ACCURACY_SHAPE["cuda" if cuda else "cpu"]
    accuracy_dtype = torch.bfloat16 if cuda else torch.float32
    for T in args.accuracy:
        try:
            row = _accuracy(torch, hatt, T, B, H, D, device, accuracy_dtype, gradients=not args.no_bwd)
        except Exception:  # noqa: BLE001
            row = {"T": T, "dtype": str(accuracy_dtype).replace("torch.", ""),
                   "error": traceback.format_exc(limit=4)[-600:]}
        result["accuracy"].append(row)
        print(accuracy_line({k: v for k, v in row.items() if k != "ref_norm"}, ("T", "B", "H", "D", "dtype")),
              flush=True)
        write(result, args.json, None, plot)

    print(TABLE_HEAD, flush=True)
    for D in args.widths:
        H = max(1, args.model_width // D)
        for T in args.lengths:
            row = _row(torch, bench, hatt, D, H, T, max(1, args.tokens // T), device, args)
            result["rows"].append(row)
            print(_format_row(row), flush=True)
            write(result, args.json, None, plot)
    result["complete"] = True
    return result


def plot(result, path) -> None:
    """One panel per head width: ms against T (log-log), hodlr's and hattention's forward and
    forward + backward."""
    series = (("hodlr_fwd", "hodlr fwd", "C0", "-"), ("hodlr_fwdbwd", "hodlr fwd+bwd", "C0", "--"),
              ("hatt_fwd", "hattention fwd", "C3", "-"), ("hatt_fwdbwd", "hattention fwd+bwd", "C3", "--"))
    fig = width_panels(result, series)[0]
    save_figure(fig, result, path)


def _block_size_pair(text):
    """``"64x32"`` -> ``(64, 32)`` (an ``argparse`` type)."""
    import argparse

    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"want BKxBV with two positive integers, e.g. 64x64; got {text!r}")
    return int(parts[0]), int(parts[1])


def _parser():
    p = sweep_parser("hodlr bench-hattention", __doc__.split("\n\n")[0], DEFAULT_LENGTHS, DEFAULT_WIDTHS,
                     "bench-hattention", epilog="--device cpu runs a smoke test of the same code path in the Triton interpreter: its times "
                            "are not kernel speed")
    p.set_defaults(lengths=None, widths=None, model_width=None, tokens=None)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                   help="cuda, or cpu: a smoke run under Triton's interpreter, by default at T = 128, D = 64, "
                        "model width 64, 128 tokens, accuracy at T = 128 (GPU defaults: T = "
                        f"{' '.join(map(str, DEFAULT_LENGTHS))}, D = {' '.join(map(str, DEFAULT_WIDTHS))}, "
                        "model width 1024, 65536 tokens)")
    p.add_argument("--accuracy", type=positive_int, nargs="*", default=None,
                   help="lengths of the accuracy check at B = 1, H = 4, D = 64 (cpu: H = 2); default "
                        f"{' '.join(map(str, DEFAULT_ACCURACY))} (cpu: 128); none when given no length")
    p.add_argument("--dtype", default=None, choices=("bfloat16", "float32"),
                   help="q/k/v dtype of the timing rows (default bfloat16; cpu: float32, as the interpreter's "
                        "bf16 arithmetic is broken)")
    p.add_argument("--hatt-l-dtype", default=None, choices=("bfloat16", "float32"),
                   help="dtype of hattention's level scales in the timing rows (default: that of q)")
    p.add_argument("--hatt-levels", default="fixed", choices=("fixed", "exact"),
                   help="hattention's level-scale columns: fixed = num_levels(max T) at every T (its kernels "
                        "then compile and autotune once per D; default), exact = num_levels(T)")
    p.add_argument("--hatt-blocks", type=_block_size_pair, nargs="+", default=None, metavar="BKxBV",
                   help="keep only these (block_size_K, block_size_V) pairs, e.g. 64x64, in hattention's "
                        "host-level autotuner (its backward tries each of {32, 64}^2 and tunes a set of kernels "
                        "for each: one pair is a quarter of the tuning); default: all of them")
    p.add_argument("--no-bwd", action="store_true",
                   help="skip the forward + backward timings and the accuracy check's gradients")
    p.add_argument("--autotune-cache", default=None, metavar="DIR",
                   help="keep Triton's autotuning results (hattention's and fla's kernels tune on their first call: "
                        "the backward's for more than 10 minutes on an H200) and compiled kernels in DIR "
                        "(TRITON_CACHE_AUTOTUNING=1, TRITON_CACHE_DIR=DIR): a run stopped part-way keeps every "
                        "kernel it tuned, and a later run with the same DIR (or its *.autotune.json files in "
                        "their folders) skips them")
    return p


def main(argv=None) -> int:
    """Entry point of ``hodlr bench-hattention``; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    fill_device_defaults(args, DEFAULT_LENGTHS, DEFAULT_WIDTHS, CPU_DEFAULTS, accuracy=DEFAULT_ACCURACY)
    names = ("TRITON_INTERPRET", "TRITON_CACHE_AUTOTUNING", "TRITON_CACHE_DIR")
    saved = {name: os.environ.get(name) for name in names}
    if args.autotune_cache:  # read when the autotuners are built, at hattention's import in run()
        os.makedirs(args.autotune_cache, exist_ok=True)
        os.environ["TRITON_CACHE_AUTOTUNING"] = "1"
        os.environ["TRITON_CACHE_DIR"] = os.path.abspath(args.autotune_cache)
    try:
        result = run(args)
    except BlocksNotOffered as err:
        parser.error(str(err))
    finally:  # the caller's environment is left as it was (run() sets TRITON_INTERPRET for a CPU run)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    write(result, args.json, args.png, plot)
    print("wrote", ", ".join(p for p in (args.json, args.png) if p) or "nothing (--json '' --png '')")
    return 0


if __name__ == "__main__":
    sys.exit(main())
