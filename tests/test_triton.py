"""The Triton forward kernels equal every other backend.

On the CPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set below before
anything imports triton; ``@triton.jit`` reads it when a kernel is defined).  Hypothesis
draws masks (never-read scales poisoned with NaN, every decay kind), operands with
broadcasting batch shapes, lengths that are not multiples of the chunk, and the outputs are
filled with NaN before each launch, so an element the kernels never write fails.  float64
must match to 1e-12 and float32 to 1e-5, against the dense reference (the randomly drawn
problems on ``hodlr.testing.scaled_error``, the error against the same computation on
absolute values) and against every other backend that runs on torch CPU tensors.  On a CUDA machine (no interpreter) the same
tests run on the GPU in float32.
"""

from __future__ import annotations

import math
import sys

import torch

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import given, settings, strategies as st  # noqa: E402
import triton  # noqa: E402

import hodlr  # noqa: E402
from hodlr import kernels  # noqa: E402
from hodlr import backends as registry  # noqa: E402
from hodlr.backends import chunked  # noqa: E402
from hodlr.testing import (  # noqa: E402
    TOLERANCES,
    assert_close,
    attention_inputs,
    batch_shapes,
    masks,
    nan_like,
    operands,
    poison_unread,
    reference,
    relative_error,
    scaled_error,
    st_lengths,
)

INTERP = kernels.interpreting()
DEVICE = "cpu" if INTERP else "cuda"
pytestmark = pytest.mark.skipif(not INTERP and not torch.cuda.is_available(),
                                reason="needs TRITON_INTERPRET=1 or a CUDA GPU")
DTYPES = [torch.float64, torch.float32] if INTERP else [torch.float32]
TOL = {torch.float64: TOLERANCES["interpreter_float64"], torch.float32: TOLERANCES["interpreter_float32"]}
CHUNK = 16
"""Small chunk: short sequences then span several chunks and several chunk levels."""

FEW = settings(max_examples=25)


def _nan_like(shape, dtype):
    return nan_like(torch.empty(0, dtype=dtype, device=DEVICE), shape)


def _ref_attention(q, k, v, M, scale):
    """Dense float64 reference (on the CPU)."""
    return reference("attention", M, q, k, v, scale=scale)[0]


def _ref_matmul(M, x):
    return reference("matmul", M, x)[0]


def _assert_scaled(got, ref, size, tol, what):
    """The random-draw tests measure against the computation on absolute values
    (``hodlr.testing.scaled_error``): a float32 result whose terms cancel can miss a fixed
    relative bound while every operation rounds correctly."""
    err = scaled_error(got, ref, size)
    assert err <= tol, f"{what}: scaled error {err:.3e} > {tol:.1e}"


def _broadcast(M, *ops):
    batch = torch.broadcast_shapes(M.batch_shape, *(o.shape[:-2] for o in ops))
    lam = M.level_scales.expand(batch + M.level_scales.shape[-2:])
    g = None if M.log_decay is None else M.log_decay.expand(batch + (M.T,))
    return batch, lam, g


def _mask_and(ops, T_max, dtype):
    return masks(T=st_lengths(1, T_max), batch_shape=batch_shapes(2, 2), library="torch", dtype=dtype,
                 device=DEVICE).flatmap(lambda M: ops(M).map(lambda o: (M, o)))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@FEW
@given(data=st.data())
def test_attention_equals_dense(dtype, data):
    M, (q, k, v) = data.draw(_mask_and(lambda M: attention_inputs(M, Dk=st.integers(1, 5), Dv=st.integers(1, 5)),
                                       100, dtype))
    scale = data.draw(st.sampled_from([1.0, 0.37]))
    batch, lam, g = _broadcast(M, q, k, v)
    out = _nan_like(batch + (M.T, v.shape[-1]), dtype)
    got = kernels.attention_forward(q, k, v, lam, g, scale, chunk=CHUNK, out=out)
    assert got.data_ptr() == out.data_ptr()
    _assert_scaled(got, *reference("attention", M, q, k, v, scale=scale), TOL[dtype], "triton attention vs dense")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@FEW
@given(data=st.data())
def test_matmul_equals_dense(dtype, data):
    M, x = data.draw(_mask_and(lambda M: operands(M, D=st.integers(1, 5)), 100, dtype))
    batch, lam, g = _broadcast(M, x)
    out = _nan_like(batch + (M.T, x.shape[-1]), dtype)
    got = kernels.matmul_forward(lam, g, x, chunk=CHUNK, out=out)
    assert got.data_ptr() == out.data_ptr()
    _assert_scaled(got, *reference("matmul", M, x), TOL[dtype], "triton matmul vs dense")


def _cpu_backends():
    """Every other backend that runs on torch CPU tensors (dense is the reference)."""
    names = []
    for name in registry.NAMES:
        if name in ("dense", "triton"):
            continue
        if registry.load(name).unavailable_reason("torch", "cpu") is None:
            names.append(name)
    return names


@pytest.mark.interpreter
@settings(max_examples=15)
@given(M=masks(T=st_lengths(1, 70), batch_shape=batch_shapes(1, 2), library="torch", dtype=torch.float64), seed=st.integers(0, 2**31))
def test_equals_every_backend(M, seed):
    """float64: triton (through the public API, default chunk, and with chunk 16) equals
    sparse, recursive, fenwick and chunked, whichever exist."""
    rng = np.random.default_rng(seed)
    T = M.T
    q, k = (torch.as_tensor(rng.standard_normal((T, 3))) for _ in range(2))
    v = torch.as_tensor(rng.standard_normal(M.batch_shape + (T, 2)))
    ours = hodlr.attention(q, k, v, M, scale=0.5, backend="triton")
    ours16 = kernels.attention_forward(q, k, v, *_broadcast(M, q, k, v)[1:], 0.5, chunk=CHUNK)
    mm = hodlr.matmul(M, v, backend="triton")
    assert_close(ours16, ours, TOL[torch.float64], "chunk 16 vs default chunk")
    for name in _cpu_backends():
        assert_close(ours, hodlr.attention(q, k, v, M, scale=0.5, backend=name), TOL[torch.float64], f"attention vs {name}")
        assert_close(mm, hodlr.matmul(M, v, backend=name), TOL[torch.float64], f"matmul vs {name}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T", [1, 2, 3, 15, 16, 17, 63, 65, 100])
def test_awkward_lengths_and_chunked(T, dtype):
    """Lengths that are not multiples of the chunk; the chunked reference with the same chunk."""
    gen = torch.Generator().manual_seed(T)
    L = hodlr.num_levels(T) + 1
    lam = poison_unread(torch.rand(2, T, L, generator=gen, dtype=torch.float64) * 1.3 - 0.3).to(dtype).to(DEVICE)
    g = (-torch.rand(1, T, generator=gen, dtype=torch.float64) * 3).to(dtype).to(DEVICE)
    q, k, v = (torch.randn(2, T, d, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE) for d in (4, 4, 3))
    out = _nan_like((2, T, 3), dtype)
    got = kernels.attention_forward(q, k, v, lam, g, 0.5, chunk=CHUNK, out=out)
    assert got.data_ptr() == out.data_ptr()
    M = hodlr.LogLinearMask(lam, g)
    assert_close(got, _ref_attention(q, k, v, M, 0.5), TOL[dtype], "attention")
    assert_close(got.cpu(), chunked.attention(q.cpu(), k.cpu(), v.cpu(), lam.cpu(), g.expand(2, T).cpu(), 0.5,
                                             chunk=CHUNK), TOL[dtype], "attention vs chunked")
    out = _nan_like((2, T, 3), dtype)
    y = kernels.matmul_forward(lam, g, v, chunk=CHUNK, out=out)
    assert y.data_ptr() == out.data_ptr()
    assert_close(y, _ref_matmul(M, v), TOL[dtype], "matmul")


@pytest.mark.parametrize("T", [1, 2, 3, 15, 63, 65, 257])
@pytest.mark.parametrize("D", [16, 100])
def test_matmul_tma_and_pointer_paths_agree(T, D, monkeypatch):
    """``x`` / ``y`` tiles through tensor descriptors (TMA) or through pointers: the same
    numbers, every element written (NaN-poisoned output), chunk tails clipped by the copy."""
    from hodlr.kernels import _layout

    dtype = DTYPES[0]
    gen = torch.Generator().manual_seed(T + D)
    L = hodlr.num_levels(T)
    x = torch.randn(2, 3, T, D, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE)
    lam = poison_unread(torch.rand(2, 3, T, L, generator=gen, dtype=torch.float64) + 0.2).to(dtype).to(DEVICE)
    g = (-torch.rand(2, 3, T, generator=gen, dtype=torch.float64)).to(dtype).to(DEVICE)
    got = {}
    for tma in (True, False):
        monkeypatch.setattr(_layout, "USE_TMA", tma)
        out = _nan_like((2, 3, T, D), dtype)
        got[tma] = kernels.matmul_forward(lam, g, x, out=out)
        eligible = _layout.tma_descriptor(x, 1, 6, (0, T * D), CHUNK, 16) is not None
        assert eligible == (tma and D * x.element_size() % 16 == 0)
    assert torch.equal(got[True], got[False])
    assert_close(got[True], _ref_matmul(hodlr.LogLinearMask(lam, g), x), TOL[dtype], "matmul")


def test_tma_descriptor_eligibility(monkeypatch):
    """Descriptors only where the copy engine can serve the view: last stride 1, the other
    strides and the base 16-byte aligned, no broadcast batch dim; None when switched off."""
    from hodlr.kernels import _layout

    x = torch.zeros(2, 3, 40, 32, device=DEVICE)
    B0, B1, strides, _ = _layout.collapse_batch((2, 3), [x])
    desc = _layout.tma_descriptor(x, B0, B1, strides[0], 16, 32)
    assert desc.shape == [1, 6, 40, 32] and desc.block_shape == [1, 1, 16, 32]
    assert _layout.tma_descriptor(x.transpose(-1, -2), B0, B1, strides[0], 16, 32) is None  # last stride 40
    assert _layout.tma_descriptor(x[..., :31], B0, B1, strides[0], 16, 32) is not None  # rows still 128 bytes apart
    odd = torch.zeros(2, 3, 40, 31, device=DEVICE)  # rows 124 bytes apart
    assert _layout.tma_descriptor(odd, B0, B1, (3 * 40 * 31, 40 * 31), 16, 32) is None
    shifted = torch.zeros(2 * 3 * 40 * 32 + 1, device=DEVICE)[1:].view(2, 3, 40, 32)  # base 4 bytes off
    assert _layout.tma_descriptor(shifted, B0, B1, strides[0], 16, 32) is None
    wide = x[:, :1].expand(2, 3, 40, 32)
    B0, B1, strides, _ = _layout.collapse_batch((2, 3), [wide])
    assert strides[0][1] == 0 and _layout.tma_descriptor(wide, B0, B1, strides[0], 16, 32) is None
    monkeypatch.setattr(_layout, "USE_TMA", False)
    assert _layout.tma_descriptor(x, 2, 3, (3 * 40 * 32, 40 * 32), 16, 32) is None


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_grouped_heads_broadcast_without_copy(dtype):
    """q, k: (B, 1, T, Dk) serve v: (B, H, T, Dv); the mask is per head; strides stay 0."""
    gen = torch.Generator().manual_seed(1)
    B, H, T = 2, 3, 40
    L = hodlr.num_levels(T)
    q = torch.randn(B, 1, T, 5, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE)
    k = torch.randn(B, 1, T, 5, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE)
    v = torch.randn(B, H, T, 4, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE)
    lam = poison_unread(torch.rand(B, H, T, L, generator=gen, dtype=torch.float64) + 0.2).to(dtype).to(DEVICE)
    g = (-torch.rand(B, 1, T, generator=gen, dtype=torch.float64)).to(dtype).to(DEVICE)
    M = hodlr.LogLinearMask(lam, g)
    got = hodlr.attention(q, k, v, M, backend="triton")
    assert_close(got, _ref_attention(q, k, v, M, 1.0), TOL[dtype], "grouped heads")
    from hodlr.kernels._layout import collapse_batch

    qe = q.expand(B, H, T, 5)
    B0, B1, strides, _ = collapse_batch((B, H), [qe, v])
    assert (B0, B1) == (B, H) and strides[0][1] == 0, "the broadcast q must be read through stride 0"


def test_grouped_heads_in_fla_layout_fold_without_copying_the_values():
    """Grouped heads in fla's ``(N, T, H, D)`` layout read as ``(N, Hqk, G, T, D)`` views (the keys
    broadcast over ``G``) leave three batch runs.  ``collapse_batch`` folds them as ``(N, Hqk·G)``,
    copying only the broadcast keys (in the values' memory order); ``collapse_grouped`` folds the
    keys as ``(N, Hqk)`` read at ``b1 // G``, nothing copied, and the attention layout does that."""
    from hodlr.kernels._layout import collapse_batch, collapse_grouped
    from hodlr.kernels.attention import attention_layout

    N, T, Hqk, G, D = 2, 5, 3, 2, 4
    q = torch.randn(N, T, Hqk, D).transpose(1, 2)[:, :, None].expand(N, Hqk, G, T, D)
    v = torch.randn(N, T, Hqk * G, D).transpose(1, 2).unflatten(1, (Hqk, G))
    B0, B1, strides, (q2, v2, none) = collapse_batch((N, Hqk, G), [q, v, None])
    assert (B0, B1) == (N, Hqk * G) and v2 is v and none is None and strides[2] == (0, 0)
    assert strides[1] == (v.stride(0), v.stride(2)) and torch.equal(q2, q) and 0 not in q2.stride()
    assert q2.transpose(2, 3).transpose(1, 2).is_contiguous()  # copied in the values' (N, T, Hqk, G, D) order
    B0g, B1g, strides_g, (q3, v3, none3), group = collapse_grouped((N, Hqk, G), [q, v, None], (0,))
    assert (B0g, B1g, group) == (N, Hqk * G, G) and q3 is q and v3 is v and none3 is None
    assert strides_g == [(q.stride(0), q.stride(1)), strides[1], (0, 0)]
    for b in range(B0 * B1):  # the kernels' addressing: b0 * s0 + b1 * s1 (b1 // G for the grouped keys)
        b0, b1 = divmod(b, B1)
        for x, (s0, s1), j in ((q2, strides[0], b1), (v2, strides[1], b1), (q3, strides_g[0], b1 // G)):
            row = torch.as_strided(x, (T, D), (x.stride(-2), x.stride(-1)), x.storage_offset() + b0 * s0 + j * s1)
            assert torch.equal(row, x[b0, b1 // G, b1 % G])
    lam = torch.rand(N, T, Hqk * G, hodlr.num_levels(T)).transpose(1, 2).unflatten(1, (Hqk, G))
    layout = attention_layout(q, q, v, lam, None)
    for name, x in (("q", q), ("v", v), ("l", lam)):  # the inputs themselves (as views)
        assert layout.tensors[name].data_ptr() == x.data_ptr() and layout.tensors[name].stride() == x.stride()
    assert layout.group == G and layout.strides["q"] == strides_g[0]
    assert attention_layout(q.contiguous(), q.contiguous(), v, lam, None).group == 1


def test_collapse_batch_copies_a_tensor_with_more_trailing_dims_than_the_template():
    """Three runs of batch dims, the tensor that does not fold having more trailing dims than the
    one it is copied after (level scales beside a log-decay): the copy takes the template's batch
    order and keeps its own trailing dims, and every entry is addressed."""
    from hodlr.kernels._layout import collapse_batch

    lam = torch.randn(2, 1, 4, 5, 3).expand(2, 3, 4, 5, 3)  # (B, H, G, T, L), broadcast over H
    g = torch.randn(2, 3, 4, 5)  # (B, H, G, T)
    B0, B1, strides, out = collapse_batch((2, 3, 4), [lam, g])
    assert out[1] is g and out[0].data_ptr() != lam.data_ptr()
    _assert_fold_addresses((2, 3, 4), [lam, g], B0, B1, strides, out)


def _assert_fold_addresses(batch, tensors, B0, B1, strides, out, grouped=(), group=1):
    """Every batch entry ``b`` of each of ``tensors`` is found in the folded ``out`` tensor at
    ``b0 * s0 + b1 * s1`` (``b1 // group`` for the tensors at the indices ``grouped``), with its
    trailing dims through ``out``'s own strides."""
    for i, (x, y, (s0, s1)) in enumerate(zip(tensors, out, strides)):
        tail = tuple(x.shape[len(batch):])
        for b in range(B0 * B1):
            b0, b1 = divmod(b, B1)
            j = b1 // group if i in grouped else b1
            rows = torch.as_strided(y, tail, y.stride()[len(batch):], y.storage_offset() + b0 * s0 + j * s1)
            assert torch.equal(rows, x.reshape((-1,) + tail)[b])


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_collapse_batch_addresses_every_entry(data):
    """Tensors of one batch in any memory order, some batch dims broadcast (stride 0), some of
    size 1, with trailing dims ``(T, D)`` or ``(T,)`` (a log-decay beside level scales): the two
    folded indices and strides address every batch entry's rows, and a tensor is copied only where
    it does not fold; with some tensors grouped (``collapse_grouped``), those read at
    ``b1 // group``, and a grouped fold copies nothing."""
    from hodlr.kernels._layout import collapse_batch, collapse_grouped

    batch = tuple(data.draw(st.lists(st.integers(1, 3), min_size=1, max_size=4), label="batch"))
    tensors = []
    for j in range(data.draw(st.integers(1, 4), label="count")):
        full = batch + data.draw(st.sampled_from([(3, 2), (3,)]), label=f"trailing dims {j}")
        order = data.draw(st.permutations(range(len(full))), label=f"order {j}")
        base = torch.randn([full[d] for d in order]).permute([order.index(d) for d in range(len(full))])
        keep = data.draw(st.lists(st.booleans(), min_size=len(batch), max_size=len(batch)), label=f"kept {j}")
        index = tuple(slice(None) if k else slice(0, 1) for k in keep)
        tensors.append(base[index].expand(full))
    grouped = data.draw(st.sets(st.integers(0, len(tensors) - 1)), label="grouped")
    for fold in ("batch", "grouped"):
        if fold == "batch":
            B0, B1, strides, out = collapse_batch(batch, list(tensors))
            group = 1
        else:
            B0, B1, strides, out, group = collapse_grouped(batch, list(tensors), grouped)
            if group > 1:
                assert all(y is x for x, y in zip(tensors, out))
        assert B0 * B1 == math.prod(batch) and B1 % group == 0
        assert all(y is x or y.data_ptr() != x.data_ptr() for x, y in zip(tensors, out))
        _assert_fold_addresses(batch, tensors, B0, B1, strides, out, grouped, group)


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_collapse_grouped_reads_grouped_heads_in_place(data):
    """Grouped heads with any memory orders: values ``(N, T, H, D)`` and keys ``(N, T, Hqk, D)`` each
    stored in a drawn order of their dims, read as ``(N, Hqk, G, T, D)`` views (keys broadcast over
    ``G``): ``collapse_grouped`` addresses every entry, the keys at ``b1 // group``; a grouped fold
    copies nothing, and fla's order (``N, T, heads, D`` for both) folds grouped where it leaves three
    runs of batch dims."""
    from hodlr.kernels._layout import collapse_grouped

    N, Hqk, G, T, D = (data.draw(st.integers(lo, 3), label=name) for lo, name in
                       ((1, "N"), (1, "Hqk"), (2, "G"), (1, "T"), (1, "D")))
    fla = data.draw(st.booleans(), label="fla order")

    def stored(heads):
        order = [0, 1, 2, 3] if fla else data.draw(st.permutations(range(4)), label="order")
        shape = (N, T, heads, D)
        return torch.randn([shape[d] for d in order]).permute([order.index(d) for d in range(4)]).transpose(1, 2)

    v = stored(Hqk * G).unflatten(1, (Hqk, G))
    q, k = (stored(Hqk)[:, :, None].expand(N, Hqk, G, T, D) for _ in range(2))
    tensors = [q, k, v]
    B0, B1, strides, out, group = collapse_grouped((N, Hqk, G), list(tensors), (0, 1))
    if fla and min(N, Hqk, T) > 1:  # three runs (N), (Hqk), (G): copies without the grouped fold
        assert group == G
    if group > 1:
        assert all(y is x for x, y in zip(tensors, out))
    for i, (x, y, (s0, s1)) in enumerate(zip(tensors, out, strides)):
        for b in range(B0 * B1):
            b0, b1 = divmod(b, B1)
            j = b1 // group if i < 2 else b1
            rows = torch.as_strided(y, (T, D), (y.stride(-2), y.stride(-1)), y.storage_offset() + b0 * s0 + j * s1)
            assert torch.equal(rows, x.reshape((-1, T, D))[b])


@pytest.mark.parametrize("op", ["attention", "gated_delta"])
def test_grouped_heads_in_fla_layout_equal_chunked(op):
    """The fla-shaped ops with two value heads a query/key head, inputs in fla's layout, batch 2:
    the Triton kernels' outputs and gradients equal the chunked backend's (float64 under the
    interpreter, float32 on a GPU)."""
    dtype, tol = (torch.float64, TOLERANCES["grad_float64"]) if INTERP else (torch.float32, 1e-4)
    rng = np.random.default_rng(5)
    N, T, Hqk, H, D = 2, 37, 2, 4, 3
    t = lambda *shape: torch.as_tensor(rng.standard_normal(shape), dtype=dtype, device=DEVICE)  # noqa: E731
    q, v = t(N, T, Hqk, D), t(N, T, H, D)
    k = torch.nn.functional.normalize(t(N, T, Hqk, D), dim=-1)
    g = -torch.as_tensor(rng.uniform(0, 0.5, (N, T, H)), dtype=dtype, device=DEVICE)
    beta = torch.as_tensor(rng.uniform(0, 1.5, (N, T, H)), dtype=dtype, device=DEVICE)
    lam = torch.as_tensor(rng.uniform(0.2, 1.5, (N, T, H, hodlr.num_levels(T))), dtype=dtype, device=DEVICE)
    do = t(N, T, H, D)
    args = [q, k, v, g, beta, lam] if op == "gated_delta" else [q, k, v, g, lam]
    fn = hodlr.log_linear_gated_delta_rule if op == "gated_delta" else hodlr.log_linear_attn
    results = []
    for backend in ("triton", "chunked"):
        xs = [x.detach().clone().requires_grad_() for x in args]
        o = fn(*xs, backend=backend)[0]
        results.append((o, *torch.autograd.grad(o, xs, do)))
    names = ["o", "dq", "dk", "dv", "dg"] + (["dbeta"] if op == "gated_delta" else []) + ["dlevel_scales"]
    for name, got, want in zip(names, *results):
        assert relative_error(got, want) <= tol, name


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous_inputs(dtype):
    """Transposed storage, sliced strides and a mask broadcast over heads."""
    gen = torch.Generator().manual_seed(2)
    B, H, T = 2, 2, 37
    L = hodlr.num_levels(T) + 2
    base = torch.randn(B, T, H, 12, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE)
    q = base[..., 0:8:2].transpose(1, 2)           # (B, H, T, 4), strided last dim
    k = base[..., 8:12].transpose(1, 2)            # (B, H, T, 4), (B, T, H, D) layout
    v = torch.randn(B, H, 3, T, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE).transpose(-1, -2)
    lam = poison_unread(torch.rand(T, L, generator=gen, dtype=torch.float64) + 0.1).T.contiguous().T  # column-major
    lam = lam.to(dtype).to(DEVICE)
    g = (-torch.rand(T, 2, generator=gen, dtype=torch.float64)[:, 1]).to(dtype).to(DEVICE)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous() or lam.is_contiguous())
    M = hodlr.LogLinearMask(lam, g)
    out = _nan_like((B, H, T, 3), dtype)
    got = kernels.attention_forward(q, k, v, lam, g, 0.3, chunk=CHUNK, out=out)
    assert_close(got, _ref_attention(q, k, v, M, 0.3), TOL[dtype], "non-contiguous attention")
    y = kernels.matmul_forward(lam, g, v, chunk=CHUNK)
    assert_close(y, _ref_matmul(M, v), TOL[dtype], "non-contiguous matmul")


@pytest.mark.parametrize("tile", [64, 16, 128])
def test_wide_heads_and_states(tile, monkeypatch):
    """Head widths above one tile (Dk, Dv > 64) and the chunk-state hierarchy's level 0, with the
    output kernel's key and value tiles (``attention.OUTPUT_TILE``) at their default, at 16 (five
    key tiles and five value-tile programs a chunk) and at 128 (one of each)."""
    monkeypatch.setattr(sys.modules["hodlr.kernels.attention"], "OUTPUT_TILE", tile)
    dtype = DTYPES[0]
    gen = torch.Generator().manual_seed(3)
    T, Dk, Dv = 50, 80, 70
    L = hodlr.num_levels(T)
    q, k = (torch.randn(T, Dk, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE) for _ in range(2))
    v = torch.randn(T, Dv, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE)
    lam = hodlr.testing.poison_unread(torch.rand(T, L, generator=gen, dtype=torch.float64) + 0.5).to(dtype).to(DEVICE)
    g = (-torch.rand(T, generator=gen, dtype=torch.float64)).to(dtype).to(DEVICE)
    got, (states, logdec) = kernels.attention_forward(q, k, v, lam, g, 1.0, chunk=CHUNK, return_states=True)
    want = _ref_attention(q, k, v, hodlr.LogLinearMask(lam, g, validate=False), 1.0)
    assert_close(got, want, TOL[dtype], f"wide heads, output tiles of {tile}")
    # level 0, chunk 0: K_0^T diag(exp(sum_{k>s} g_k)) V_0
    w = torch.exp(torch.flip(torch.cumsum(torch.flip(torch.cat([g[1:CHUNK], g.new_zeros(1)]), (0,)), 0), (0,)))
    S0 = (k[:CHUNK] * w[:, None]).T @ v[:CHUNK]
    assert_close(states[0, 0].reshape(Dk, Dv), S0, TOL[dtype], "chunk state 0")
    assert_close(logdec[0, 0], g[:CHUNK].sum(), TOL[dtype], "chunk log-decay 0")


@pytest.mark.parametrize("n", [1, 2, 3, 64, 65, 128, 129, 300, 1025])
def test_hierarchy_equals_block_sums(n):
    """``kernels.states.build_hierarchy`` (subtrees of 2**SUBTREE_LEVELS entries, several
    launches from n = 129 on) against each aligned block's decayed sum of its chunk states,
    computed directly; the level layout of :mod:`kernels.states`."""
    from hodlr.kernels import states as chunk_states
    from hodlr.kernels._layout import hierarchy_sizes

    dtype = DTYPES[0]
    gen = torch.Generator().manual_seed(n)
    B, F = 2, 3
    level0 = torch.randn(B, n, F, generator=gen, dtype=torch.float64)
    a0 = -torch.rand(B, n, generator=gen, dtype=torch.float64)
    states, logdec = chunk_states.allocate(B, n, F, DEVICE, dtype)
    states.fill_(float("nan"))
    logdec.fill_(float("nan"))
    states[:, :n] = level0.to(dtype)
    logdec[:, :n] = a0.to(dtype)
    chunk_states.build_hierarchy(states, logdec, n)
    offset = 0
    for h, size in enumerate(hierarchy_sizes(n)):
        for m in range(size):
            chunks = range(m << h, (m + 1) << h)
            decay = [a0[:, j + 1:(m + 1) << h].sum(-1) for j in chunks]
            want = sum(torch.exp(d)[:, None] * level0[:, j] for d, j in zip(decay, chunks))
            assert_close(states[:, offset + m], want, TOL[dtype], f"level {h} block {m}")
            assert_close(logdec[:, offset + m], a0[:, m << h:(m + 1) << h].sum(-1), TOL[dtype], f"A level {h} block {m}")
        offset += size
    assert offset <= 2 * n - 1 and states.shape[1] == 2 * n  # the entries past the levels: the shapes' bound


@pytest.mark.parametrize("rows, chunk, tma", [(16, 16, True), (32, 16, False), (64, 16, True), (128, 16, True),
                                             (128, 16, False), (128, 32, True), (64, 64, False)])
@pytest.mark.parametrize("T", [1, 40, 520])
def test_matmul_state_kernel_levels(rows, chunk, tma, T, monkeypatch):
    """The matmul's state kernel (programs of ``kernels.matmul.STATE_ROWS`` rows, ``P`` chunks)
    writes levels ``0 .. log2 P`` of the hierarchy straight from ``x``, ``build_hierarchy``
    the rest: every block state and log-decay equals its decayed sum computed directly, with
    the buffers poisoned with NaN (a slot left unwritten or written twice by different
    programs fails); ``x`` read through a tensor descriptor and through pointers."""
    import importlib

    from hodlr.kernels import _layout
    from hodlr.kernels import states as chunk_states
    from hodlr.kernels._layout import hierarchy_sizes

    module = importlib.import_module("hodlr.kernels.matmul")
    monkeypatch.setattr(module, "STATE_ROWS", rows)
    monkeypatch.setattr(_layout, "USE_TMA", tma)
    allocate = chunk_states.allocate

    def poisoned(*args, **kwargs):
        return tuple(buffer.fill_(float("nan")) for buffer in allocate(*args, **kwargs))

    monkeypatch.setattr(chunk_states, "allocate", poisoned)
    dtype = DTYPES[0]
    gen = torch.Generator().manual_seed(T)
    x = torch.randn(2, T, 4, generator=gen, dtype=torch.float64)
    g = -torch.rand(2, T, generator=gen, dtype=torch.float64)
    lam = torch.rand(2, T, hodlr.num_levels(T), generator=gen, dtype=torch.float64)
    _, (states, logdec) = kernels.matmul_forward(*(a.to(DEVICE, dtype) for a in (lam, g, x)), chunk=chunk, return_states=True)
    states, logdec = states.cpu(), logdec.cpu()
    offset = 0
    for h, size in enumerate(hierarchy_sizes(-(-T // chunk))):
        for m in range(size):
            rows = range(m * chunk << h, min((m + 1) * chunk << h, T))
            want = sum(torch.exp(g[:, s + 1:rows[-1] + 1].sum(-1))[:, None] * x[:, s] for s in rows)
            assert_close(states[:, offset + m], want, TOL[dtype], f"level {h} block {m}")
            assert_close(logdec[:, offset + m], g[:, rows[0]:rows[-1] + 1].sum(-1), TOL[dtype], f"A level {h} block {m}")
        offset += size
    n = -(-T // chunk)
    assert offset <= 2 * n - 1 and states.shape[1] == 2 * n  # the entries past the levels: the shapes' bound


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_attention_state_dtype(dtype):
    """The attention keeps its chunk states and their log-decays in float32 for every input dtype
    (each state is rounded once, when it is read, which is why its error does not grow with the
    levels a state was summed through; the GPU tests measure that error); the matmul keeps bfloat16
    block states for bfloat16 inputs."""
    T = 40
    x = torch.randn(T, 16, device=DEVICE).to(dtype)
    lam = torch.ones(T, hodlr.num_levels(T), device=DEVICE)
    _, (states, logdec) = kernels.attention_forward(x, x, x, lam, None, 1.0, chunk=CHUNK, return_states=True)
    assert states.dtype == torch.float32 and logdec.dtype == torch.float32
    _, (states, logdec) = kernels.matmul_forward(lam, None, x, chunk=CHUNK, return_states=True)
    assert states.dtype == (torch.bfloat16 if dtype == torch.bfloat16 else torch.float32)


def test_bad_arguments():
    x = torch.randn(5, 2, device=DEVICE)
    lam = torch.ones(5, hodlr.num_levels(5), device=DEVICE)
    with pytest.raises(ValueError, match="chunk"):
        kernels.matmul_forward(lam, None, x, chunk=24)
    with pytest.raises(TypeError, match="chunk"):
        kernels.matmul_forward(lam, None, x, chunk=16.0)
    with pytest.raises(ValueError, match="level_scales"):
        kernels.matmul_forward(lam[:, :2], None, x)
    with pytest.raises(ValueError, match="out"):
        kernels.matmul_forward(lam, None, x, out=torch.empty(5, 3, device=DEVICE))


def test_registered_backend():
    ops = hodlr.backend_info()["triton"]["ops"]
    assert set(ops) == {"matmul", "attention", "gated_delta_attention"}
    for where in ops.values():
        assert (where["torch_cuda"] is True) == torch.cuda.is_available()
        assert (where["torch_cpu"] is True) == INTERP
        assert isinstance(where["numpy"], str)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("step", [0.5, 50.0])
def test_half_precision_inputs(dtype, step):
    """16-bit operands with a float32 mask (float32 accumulation) through the public API.
    Decay steps up to 0.5 keep every chunk's in-chunk decay as a product of two per-row
    factors; steps up to 50 take the element-by-element exponentials (``intra_mask``)."""
    gen = torch.Generator().manual_seed(4)
    B, H, T = 1, 2, 45
    L = hodlr.num_levels(T)
    lam = poison_unread(torch.rand(H, T, L, generator=gen) + 0.2).to(DEVICE)
    g = (-step * torch.rand(H, T, generator=gen)).to(DEVICE)
    q, k, v = (torch.randn(B, H, T, 16, generator=gen).to(dtype).to(DEVICE) for _ in range(3))
    M = hodlr.LogLinearMask(lam, g)
    got = hodlr.attention(q, k, v, M, scale=0.25, backend="triton")
    assert got.dtype == dtype
    assert_close(got, _ref_attention(q, k, v, M, 0.25), TOLERANCES["gpu_bfloat16"], "16-bit attention")
    y = hodlr.matmul(M, v, backend="triton")
    assert_close(y, _ref_matmul(M, v), TOLERANCES["gpu_bfloat16"], "16-bit matmul")


@settings(max_examples=200)
@given(data=st.data())
def test_host_shape_helpers_match_torch_and_triton(data):
    """The launchers' host helpers (cheaper than ``torch.broadcast_shapes``, ``triton.cdiv``
    and ``triton.next_power_of_2``) give the same answers; shapes that do not broadcast raise
    ``ValueError`` naming them."""
    from hypothesis.extra.numpy import mutually_broadcastable_shapes

    from hodlr.kernels._layout import broadcast_shape, cdiv, next_power_of_2

    shapes = data.draw(mutually_broadcastable_shapes(num_shapes=data.draw(st.integers(1, 4)), min_side=0,
                                                     max_dims=4)).input_shapes
    assert broadcast_shape(*shapes) == torch.broadcast_shapes(*shapes)
    n, m = data.draw(st.integers(1, 10**6)), data.draw(st.integers(1, 300))
    assert cdiv(n, m) == triton.cdiv(n, m)
    assert next_power_of_2(n) == triton.next_power_of_2(n)
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(4, 3\)"):
        broadcast_shape((2, 3), (4, 3))
