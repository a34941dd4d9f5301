"""The Triton forward kernels on a CUDA GPU against the float64 reference (``gpu`` marker,
skipped without a GPU).

Hypothesis draws 200 shapes up to T = 16,384 (batch dims, grouped heads, head widths 16..256,
every decay kind, poisoned never-read scales, outputs filled with NaN before launch):
float32 inputs (IEEE dots) must match to 1e-5 and bfloat16 to 1e-2, measured with
:func:`hodlr.testing.scaled_error` (the error against the same operation on absolute values,
which rounding errors scale with; the plain relative error is recorded beside it).  The reference is the
dense backend in float64 for T <= 2048 and the chunked backend in float64 on the GPU above.
A same-process comparison with flash-linear-attention's ``chunk_log_linear_attn`` runs
when ``fla`` is importable.  With ``HODLR_GPU_REPORT=path`` the counts and worst errors are
written there as JSON (see ``docs/gpu-results.md``).

``kernels`` is imported inside the tests: importing it at collection time on a CPU machine
would define the kernels before ``tests/test_triton.py`` turns the interpreter on.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import hodlr
from hodlr.backends import chunked
from hodlr.testing import TOLERANCES, decay_values, poison_unread, relative_error, scaled_error, st_lengths

pytestmark = pytest.mark.gpu

TOL = {torch.float32: TOLERANCES["gpu_float32"], torch.bfloat16: TOLERANCES["gpu_bfloat16"]}
WIDTHS = [(16, 16), (64, 64), (128, 64), (256, 256)]
DENSE_MAX_T = 2048
REPORT = {"cases": {}, "fla": []}
GPU = settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck))


def _save():
    """Write the report (after every case, so that an interrupted run still leaves one)."""
    path = os.environ.get("HODLR_GPU_REPORT")
    if path:
        REPORT["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
        with open(path, "w") as fh:
            json.dump(REPORT, fh, indent=1)


def _record(key, err, T, relative):
    entry = REPORT["cases"].setdefault(key, {"count": 0, "passed": 0, "worst": 0.0, "worst_T": None, "max_T": 0,
                                             "worst_relative": 0.0})
    entry["count"] += 1
    entry["worst_relative"] = max(entry["worst_relative"], relative)
    entry["passed"] += int(err <= TOL[torch.float32 if "float32" in key else torch.bfloat16])
    entry["max_T"] = max(entry["max_T"], T)
    if err >= entry["worst"]:
        entry["worst"], entry["worst_T"] = err, T
    _save()


def _check(op, dtype, case, got, ref, size):
    """Record the scaled and the plain relative error of ``got``; assert the scaled one."""
    err = scaled_error(got, ref, size)
    _record(f"{op} {str(dtype).replace('torch.', '')}", err, case["T"], relative_error(got, ref))
    assert err <= TOL[dtype], f"{case}: scaled error {err:.3e} > {TOL[dtype]:.0e}"


@st.composite
def gpu_case(draw, widths=None):
    """A random problem: shapes, decay kind, head widths (``widths``, or drawn), grouped heads;
    arrays from a seed.  Heads wider than 128 stop at T = 4096 (the float64 reference's memory)."""
    if widths is not None and max(widths) > 128:
        T = draw(st.one_of(st_lengths(1, 4096), st.sampled_from([4096])))
    else:
        T = draw(st.one_of(st_lengths(1, 16384), st.sampled_from([4097, 8191, 16384])))
    dk, dv = widths or draw(st.sampled_from(WIDTHS if T <= 4096 else WIDTHS[:3]))
    B = draw(st.integers(1, 2))
    H = draw(st.integers(1, 2))
    return dict(T=T, dk=dk, dv=dv, B=B, H=H, grouped=draw(st.booleans()), seed=draw(st.integers(0, 2**31)),
                decay=draw(st.sampled_from(["none", "mild", "strong"])))


def _inputs(case, dtype):
    rng = np.random.default_rng(case["seed"])
    T, B, H = case["T"], case["B"], case["H"]
    L = hodlr.num_levels(T) + 1
    lam = poison_unread(rng.uniform(0.2, 1.5, (B, H, T, L)) * rng.choice([-1.0, 1.0], (B, H, T, L), p=[0.2, 0.8]))
    g = decay_values(rng, case["decay"], (B, 1, T))
    qh = 1 if case["grouped"] else H
    dev = "cuda"
    as_t = lambda a: None if a is None else torch.as_tensor(a, device=dev)
    q = as_t(rng.standard_normal((B, qh, T, case["dk"])))
    k = as_t(rng.standard_normal((B, qh, T, case["dk"])))
    v = as_t(rng.standard_normal((B, H, T, case["dv"])))
    lam64, g64 = as_t(lam), as_t(g)
    # the inputs in the tested dtype; the reference sees exactly the same (rounded) values
    q, k, v = (a.to(dtype) for a in (q, k, v))
    mask_dtype = torch.float32 if dtype != torch.float32 else dtype
    lam_t, g_t = lam64.to(mask_dtype), None if g64 is None else g64.to(mask_dtype)
    return q, k, v, lam_t, g_t


def _reference_attention(q, k, v, lam, g, scale):
    q, k, v, lam = (a.double() for a in (q, k, v, lam))
    g = None if g is None else g.double()
    T = q.shape[-2]
    if T <= DENSE_MAX_T:
        return hodlr.attention(q, k, v, hodlr.LogLinearMask(lam, g, validate=False), scale=scale, backend="dense")
    batch = torch.broadcast_shapes(q.shape[:-2], v.shape[:-2], lam.shape[:-2])
    qq, kk, vv = (a.expand(batch + a.shape[-2:]) for a in (q, k, v))
    return chunked.attention(qq, kk, vv, lam, None if g is None else g.expand(batch + (T,)), scale)


def _reference_matmul(lam, g, x):
    lam, x = lam.double(), x.double()
    g = None if g is None else g.double()
    T = x.shape[-2]
    if T <= DENSE_MAX_T:
        return hodlr.matmul(hodlr.LogLinearMask(lam, g, validate=False), x, backend="dense")
    batch = torch.broadcast_shapes(x.shape[:-2], lam.shape[:-2])
    return chunked.matmul(lam, None if g is None else g.expand(batch + (T,)), x.expand(batch + x.shape[-2:]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@GPU
@given(case=gpu_case())
def test_attention_gpu(dtype, case):
    from hodlr import kernels

    q, k, v, lam, g = _inputs(case, dtype)
    out = torch.full(v.shape, float("nan"), dtype=dtype, device="cuda")
    got = kernels.attention_forward(q, k, v, lam, g, 0.125, out=out)
    _check("attention", dtype, case, got, _reference_attention(q, k, v, lam, g, 0.125),
           _reference_attention(q.abs(), k.abs(), v.abs(), lam.abs(), g, 0.125))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@GPU
@given(case=gpu_case())
def test_matmul_gpu(dtype, case):
    from hodlr import kernels

    _, _, x, lam, g = _inputs(case, dtype)
    out = torch.full(x.shape, float("nan"), dtype=dtype, device="cuda")
    got = kernels.matmul_forward(lam, g, x, out=out)
    _check("matmul", dtype, case, got, _reference_matmul(lam, g, x), _reference_matmul(lam.abs(), g, x.abs()))


@pytest.mark.parametrize("T", [1000, 4096, 16384])
def test_same_inputs_as_fla(T):
    """bfloat16, per-head q/k/v, D = 64: ours and fla's ``chunk_log_linear_attn`` on identical
    inputs, each against the float64 reference."""
    fla = pytest.importorskip("fla.ops.log_linear_attn")
    from hodlr import kernels

    gen = torch.Generator(device="cuda").manual_seed(T)
    B, H, D = 1, 4, 64
    L = hodlr.num_levels(T)
    q, k, v = (torch.randn(B, T, H, D, device="cuda", generator=gen).to(torch.bfloat16) for _ in range(3))
    g = -0.1 * torch.rand(B, T, H, device="cuda", generator=gen)
    lam = (0.5 + torch.rand(B, T, H, L, device="cuda", generator=gen)).to(torch.bfloat16)
    scale = D ** -0.5
    theirs = fla.chunk_log_linear_attn(q, k, v, g, lam, scale=scale)[0]
    th = lambda a: a.transpose(1, 2)
    ours = th(kernels.attention_forward(th(q), th(k), th(v), th(lam), g.transpose(1, 2), scale))
    ref = th(_reference_attention(th(q), th(k), th(v), th(lam).float(), g.transpose(1, 2), scale))
    e_ours, e_fla, e_between = relative_error(ours, ref), relative_error(theirs, ref), relative_error(ours, theirs)
    REPORT["fla"].append({"T": T, "B": B, "H": H, "D": D, "ours_vs_ref": e_ours, "fla_vs_ref": e_fla,
                          "ours_vs_fla": e_between})
    _save()
    assert e_ours <= TOLERANCES["gpu_bfloat16"]
    assert e_between <= 2 * TOLERANCES["gpu_bfloat16"]


def _reference_gradients(q, k, v, lam, g, scale, do):
    """Float64 gradients of every input (dense backend up to DENSE_MAX_T, chunked above)."""
    leaves = [None if a is None else a.detach().double().requires_grad_(True) for a in (q, k, v, lam, g)]
    out = _reference_attention(*leaves, scale)
    used = [a for a in leaves if a is not None]
    return torch.autograd.grad(out, used, do.double())


def _check_gradients(dtype, case, q, k, v, lam, g, scale):
    from hodlr import kernels

    do = torch.randn(torch.broadcast_shapes(q.shape[:-2], v.shape[:-2]) + v.shape[-2:], device="cuda").to(dtype)
    leaves = [None if a is None else a.detach().clone().requires_grad_(True) for a in (q, k, v, lam, g)]
    got = torch.autograd.grad(kernels.attention(*leaves, scale), [a for a in leaves if a is not None], do)
    want = _reference_gradients(q, k, v, lam, g, scale, do)
    tol = TOL[dtype]
    for name, a, b in zip(("q", "k", "v", "level_scales", "log_decay"), got, want):
        err = relative_error(a, b)
        _record(f"gradient d{name} {str(dtype).replace('torch.', '')}", err, case["T"], err)
        assert err <= tol, f"{case}: d{name} relative error {err:.3e} > {tol:.0e}"


@pytest.mark.parametrize("dtype, widths", [
    pytest.param(dtype, w, id=f"{dtype}-{w[0]}x{w[1]}",
                 marks=[pytest.mark.slow] if dtype == torch.float32 and w[0] > 64 else [])
    for dtype in (torch.float32, torch.bfloat16) for w in WIDTHS])
@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_attention_gradients_gpu(dtype, widths, data):
    """Every gradient of the differentiable kernels against float64, one pair of head widths a
    test (each compiles its own kernels, so that a subset runs in minutes: ``-k "bfloat16 and
    64x64"``).  The float32 cases wider than 64 are ``slow`` (``--runslow``): their kernels, IEEE
    dots on wide tiles, compile for more than one command's ten minutes on the device."""
    case = data.draw(gpu_case(widths), label="case")
    if case["decay"] == "strong":
        case = dict(case, decay="mild")  # a decay of -50 per step leaves gradients of ~1e-20: relative errors mean nothing
    q, k, v, lam, g = _inputs(case, dtype)
    _check_gradients(dtype, case, q, k, v, lam, g, 0.125)


@pytest.mark.parametrize("T", [65536, 262144])
def test_attention_gradients_gpu_long(T):
    """bfloat16 gradients at long lengths (the chunked float64 reference on the GPU)."""
    case = dict(T=T, dk=64, dv=64, B=1, H=1, grouped=False, seed=T, decay="mild")
    q, k, v, lam, g = _inputs(case, torch.bfloat16)
    _check_gradients(torch.bfloat16, case, q, k, v, lam, g * 0.1, 0.125)


# -- the fla-shaped op against fla's chunk_log_linear_attn --------------------------------------------------------
FLA_LENGTHS = [63, 64, 65, 2048, 100_000]
D_SCALE = 64 ** -0.5


def _op_inputs(T, dtype, packed):
    """fla-layout inputs ``(q, k, v, g, lam, cu_seqlens)``: B = 2 (or one packed row of random
    lengths summing to T, one of them 1), 2 query/key heads shared by 4 value heads, D = 64."""
    gen = torch.Generator(device="cuda").manual_seed(T + packed)
    B, Hqk, H, D = (1, 2, 4, 64) if packed else (2, 2, 4, 64)
    cu = None
    if packed:
        cut = torch.randperm(T - 1, generator=torch.Generator().manual_seed(T))[:min(6, T - 2)] + 1
        cu = torch.cat([torch.tensor([0, 1]), torch.sort(cut[cut > 1]).values, torch.tensor([T])]).cuda()
    L = hodlr.num_levels(T)
    q, k = (torch.randn(B, T, Hqk, D, device="cuda", generator=gen).to(dtype) for _ in range(2))
    v = torch.randn(B, T, H, D, device="cuda", generator=gen).to(dtype)
    g = -0.1 * torch.rand(B, T, H, device="cuda", generator=gen)
    lam = (0.5 + torch.rand(B, T, H, L, device="cuda", generator=gen)).to(dtype)
    return q, k, v, g, lam, cu


def _op_outputs(fn, xs, cu, do):
    leaves = [x.detach().clone().requires_grad_(True) for x in xs]
    o = fn(*leaves, cu_seqlens=cu, scale=D_SCALE)[0]
    return [o.detach()] + list(torch.autograd.grad(o, leaves, do.to(o.dtype)))


@pytest.mark.parametrize("packed", [False, True], ids=["batch", "cu_seqlens"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("T", FLA_LENGTHS)
def test_op_against_fla(T, dtype, packed):
    """``hodlr.log_linear_attn`` (default backend) and fla's ``chunk_log_linear_attn`` on identical
    inputs, output and every gradient, each against the float64 chunked backend: ours agree
    with fla to the tolerance plus fla's own error, and are within the tolerance of float64."""
    fla = pytest.importorskip("fla.ops.log_linear_attn")
    if packed and T < 4:
        pytest.skip("too short to pack")
    q, k, v, g, lam, cu = _op_inputs(T, dtype, packed)
    do = torch.randn(v.shape, device="cuda", generator=torch.Generator(device="cuda").manual_seed(7))
    ours = _op_outputs(hodlr.log_linear_attn, (q, k, v, g, lam), cu, do)
    row = {"T": T, "dtype": str(dtype).replace("torch.", ""), "cu_seqlens": packed}
    try:
        theirs = _op_outputs(fla.chunk_log_linear_attn, (q, k, v, g, lam), cu, do)
    except Exception as err:  # fla's own refusals (e.g. float32 at 100K: more shared memory than the H200 has)
        if "out of resource" not in str(err):
            raise
        theirs, row["fla_error"] = [None] * len(ours), f"{type(err).__name__}: {err}"
    ref = _op_outputs(lambda *a, **kw: hodlr.log_linear_attn(*a, **kw, backend="chunked"),
                      [x.double() for x in (q, k, v, g, lam)], cu, do.double())
    tol = TOL[dtype]
    for name, a, b, r in zip(("o", "dq", "dk", "dv", "dg", "dlevel_scales"), ours, theirs, ref):
        e_ours = relative_error(a, r)
        row[name] = {"ours_vs_ref": e_ours}
        assert e_ours <= tol, f"{name}: ours {e_ours:.2e} from float64 > {tol:.0e}"
        if b is not None:
            e_fla, e_between = relative_error(b, r), relative_error(a, b)
            row[name].update(fla_vs_ref=e_fla, ours_vs_fla=e_between)
            assert e_between <= tol + e_fla, f"{name}: ours {e_between:.2e} from fla (fla {e_fla:.2e} from float64)"
    REPORT.setdefault("op_vs_fla", []).append(row)
    _save()
