"""Every Triton kernel compiles for the GPU, checked on a machine without one.

The interpreter (``TRITON_INTERPRET=1``) runs a kernel's Python body and never builds its IR, so it
cannot see what only the compiler checks: a loop-carried variable whose type changes inside the
loop, a dtype the tensor cores refuse, an operation with no lowering.  This module runs small calls
of every kernel family under the interpreter, records each distinct launch (kernel, argument types,
compile-time constants, launch options), and compiles each one in a fresh process (no
interpreter) for sm_90, the Hopper GPUs the kernels are tuned for, through ``triton.compile``:
Triton's front end, its GPU passes, LLVM and ``ptxas``, all of which run on a CPU.  Each compiled
program must also fit the shared memory of one sm_90 program.  The launches take the GPU's
compile-time values where the interpreter's differ (``NATIVE``: 16-bit dots on the tensor cores).
"""

from __future__ import annotations

import inspect
import os
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch
from triton.tools.tensor_descriptor import TensorDescriptor

from hodlr import kernels

pytestmark = pytest.mark.interpreter  # records launches under the interpreter

TARGET = ("cuda", 90, 32)
"""``triton.backends.compiler.GPUTarget`` arguments: sm_90 (H100, H200), 32-thread warps."""

MAX_SHARED = 232_448
"""Shared memory one program may take on sm_90 (227 KiB; a kernel asking more fails at its launch)."""

GPU_CONSTANTS = {"NATIVE": True}
"""Compile-time constants whose value on the GPU differs from the interpreter's."""

OPTIONS = ("num_warps", "num_stages", "maxnreg")

_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64",
          torch.int32: "i32", torch.int64: "i64", torch.int8: "i8", torch.uint8: "u8", torch.bool: "i1"}


def _launch(fn, args, kwargs):
    """``(module, name, signature, constants, options)`` of one launch of the jit function ``fn``
    (the signature in ``triton.compile``'s terms: pointer types, ``i32`` / ``i64`` / ``fp32``
    scalars, ``constexpr``)."""
    params = inspect.signature(fn).parameters
    bound = dict(zip(params, args))
    bound.update((k, v) for k, v in kwargs.items() if k in params)
    signature, constants = {}, {}
    for name, param in params.items():
        value = bound.get(name, param.default)
        if "constexpr" in str(param.annotation) or value is None:
            signature[name] = "constexpr"
            constants[name] = GPU_CONSTANTS.get(name, value)
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + _TYPES[value.dtype]
        elif isinstance(value, TensorDescriptor):
            signature[name] = f"tensordesc<{_TYPES[value.base.dtype]}{list(value.block_shape)}>"
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            signature[name] = "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: argument {name} of type {type(value).__name__} is not recorded")
    options = {k: v for k, v in kwargs.items() if k in OPTIONS}
    return fn.__module__, fn.__name__, signature, constants, options


def _calls():
    """Small calls reaching every kernel and its compiled variants: attention with one feature tile
    and with several, with a state, packed sequences and a final state; matmul; Gated DeltaNet with
    one key tile and wider keys; the decoder's step; the bucket states and carried reads of context
    parallelism.  Forward and backward, bfloat16 with and without a decay, float16, and float32
    (IEEE dots, exact in-chunk decays)."""
    from hodlr import fenwick
    from hodlr.kernels.decode import decode_step

    gen = torch.Generator().manual_seed(0)

    def rnd(*shape, dtype=torch.float32, lo=-1.0, hi=1.0):
        return (lo + (hi - lo) * torch.rand(*shape, generator=gen)).to(dtype)

    def grads(out, xs):
        torch.autograd.grad(out, [x for x in xs if x is not None], torch.ones_like(out))

    def leaves(*xs):
        return [None if x is None else x.detach().requires_grad_() for x in xs]

    T, H, D = 70, 2, 16
    L = fenwick.num_levels(T)
    # (dtype, decay, head width): 64 and 128 the models' widths (128: the backward's two launches, the
    # Gated DeltaNet's wide variants), 160 two feature tiles (and 80-wide Gated DeltaNet keys)
    cases = [(torch.bfloat16, True, 64), (torch.bfloat16, False, 16), (torch.float32, True, 16),
             (torch.float16, True, 64), (torch.bfloat16, True, 128), (torch.bfloat16, True, 160)]
    for dtype, decay, width in cases:
        q, k, v = (rnd(1, H, T, width, dtype=dtype) for _ in range(3))
        lam = rnd(1, H, T, L, lo=0.5, hi=1.5)
        g = -rnd(1, H, T, lo=0.0, hi=0.1) if decay else None
        xs = leaves(q, k, v, lam, g)
        grads(kernels.attention(*xs, width ** -0.5), xs)
        if width == 16:
            xs = leaves(lam, g, v)
            grads(kernels.matmul(*xs), xs)
        Dk = width if width <= 128 else 80
        q, v = rnd(1, H, T, Dk, dtype=dtype), rnd(1, H, T, 16, dtype=dtype)
        k = torch.nn.functional.normalize(rnd(1, H, T, Dk), dim=-1).to(dtype)
        beta = rnd(1, H, T, lo=0.0, hi=1.0, dtype=dtype)
        xs = leaves(q, k, v, beta, lam, g)
        grads(kernels.gated_delta(*xs, Dk ** -0.5), xs)
    for dtype in (torch.bfloat16, torch.float32):
        # a state, packed sequences, a final state (the kernels over sequences)
        q, k, v = (rnd(1, H, T, D, dtype=dtype) for _ in range(3))
        lam, g = rnd(1, H, T, 12, lo=0.5, hi=1.5), -rnd(1, H, T, lo=0.0, hi=0.1)
        xs = leaves(q, k, v, lam, g, rnd(2, H, 10, D, D, lo=-0.1, hi=0.1))
        o, (final, _) = kernels.attention(*xs[:5], 0.25, initial_state=xs[5], initial_positions=torch.tensor([5, 0]),
                                          cu_seqlens=torch.tensor([0, 30, T]), output_final_state=True)
        torch.autograd.grad(o.sum() + final.sum(), xs)
        # the decoder's step on three sequences at positions 0, 5 and 1000
        N, S = 3, 11
        decode_step(rnd(N, H, D, dtype=dtype), rnd(N, H, D, dtype=dtype), rnd(N, H, D, dtype=dtype),
                    -rnd(N, H, lo=0.0, hi=0.1), rnd(N, H, S + 1, lo=0.5, hi=1.5), rnd(N, H, S, D, D),
                    torch.tensor([0, 5, 1000]), 0.25)
        # ... and on rows 4, 0, 2 of a cache of five (state_indices)
        decode_step(rnd(N, H, D, dtype=dtype), rnd(N, H, D, dtype=dtype), rnd(N, H, D, dtype=dtype),
                    -rnd(N, H, lo=0.0, hi=0.1), rnd(N, H, S + 1, lo=0.5, hi=1.5), rnd(5, H, S, D, D),
                    torch.tensor([0, 5, 1000, 3, 9]), 0.25, state_indices=torch.tensor([4, 0, 2]))
        # context parallelism: a shard's bucket states, and the reads of a carried state
        xs = leaves(rnd(1, T, H, D, dtype=dtype), rnd(1, T, H, D, dtype=dtype), -rnd(1, T, H, lo=0.0, hi=0.1))
        grads(kernels.bucket_states(*xs, [(0, 0, 64, 0, 6), (0, 64, 6, 0, 2)], 1, 7), xs)
        xs = leaves(rnd(1, T, H, D, dtype=dtype), rnd(1, T, H, D, dtype=dtype), rnd(1, T, H, 9, lo=0.5, hi=1.5),
                    -rnd(1, T, H, lo=0.0, hi=0.1), rnd(1, H, 9, D, D, lo=-0.1, hi=0.1))
        grads(kernels.carried_reads(*xs, [128], 0.25), xs)


def _recorded_launches(monkeypatch):
    from triton.runtime import interpreter

    launches = {}
    run = interpreter.InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        launch = _launch(self.fn, args, kwargs)
        launches.setdefault(repr(launch), launch)
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(interpreter.InterpretedFunction, "run", recording_run)
    _calls()
    return list(launches.values())


_COMPILE = textwrap.dedent("""
    import concurrent.futures, importlib, os, pickle, sys

    def compile_one(launch, target, max_shared):
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        module, name, signature, constants, options = launch
        fn = getattr(importlib.import_module(module), name)
        where = f"{module}.{name} {sorted(constants.items())} {options}"
        try:
            kernel = triton.compile(ASTSource(fn, signature, constants), target=GPUTarget(*target), options=options)
        except Exception as e:  # noqa: BLE001 - every failure is reported, then the run fails
            lines = [line for line in str(e).splitlines() if line.strip()] or [repr(e)]
            return f"{where}: {lines[-1]}"
        if kernel.metadata.shared > max_shared:
            return f"{where}: {kernel.metadata.shared} bytes of shared memory, more than {max_shared}"

    if __name__ == "__main__":
        launches, target, max_shared = pickle.load(sys.stdin.buffer)
        with concurrent.futures.ProcessPoolExecutor(min(4, os.cpu_count() or 1)) as pool:
            n = len(launches)
            failures = [f for f in pool.map(compile_one, launches, [target] * n, [max_shared] * n) if f]
        print("\\n".join(failures))
        sys.exit(1 if failures else 0)
""")


def test_every_kernel_compiles_for_sm90(monkeypatch, tmp_path):
    launches = _recorded_launches(monkeypatch)
    names = {name for _, name, *_ in launches}
    assert {"_chunk_kernel", "_span_kernel", "_span_weight_kernel", "_sequence_kernel", "_query_block_kernel",
            "_output_kernel", "_reader_kernel", "_reverse_hierarchy_kernel", "_step_kernel"} <= names, sorted(names)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")  # empty: a cached kernel would not be compiled again
    script = tmp_path / "compile_launches.py"
    script.write_text(_COMPILE)
    done = subprocess.run([sys.executable, "-W", "ignore", str(script)], capture_output=True, env=env, timeout=1200,
                          input=pickle.dumps((launches, TARGET, MAX_SHARED)))
    assert done.returncode == 0, (f"{len(launches)} launches, these do not compile for sm_90 or do not fit it:\n"
                                  + done.stdout.decode() + done.stderr.decode()[-3000:])
