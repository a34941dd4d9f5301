"""The chunked PyTorch reference (the Triton kernels' algorithm) equals the dense mask.

float64 to 1e-12 for every chunk size (1 .. 64, so lengths land on, inside and across chunk
boundaries), awkward lengths, poisoned never-read scales, strong decay; numpy in, numpy out;
autograd gradients equal the dense backend's to 1e-10.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import hodlr
from hodlr.backends import chunked
from hodlr.testing import (TOLERANCES, assert_close, attention_inputs, batch_shapes, masks, operands, poison_unread,
                           relative_error, st_lengths)

TOL = TOLERANCES["cpu_float64"]
CHUNKS = st.sampled_from([1, 2, 4, 8, 16, 64])


def _args(M, *ops):
    batch = torch.broadcast_shapes(M.batch_shape, *(o.shape[:-2] for o in ops))
    lam = M.level_scales.expand(batch + M.level_scales.shape[-2:])
    g = None if M.log_decay is None else M.log_decay.expand(batch + (M.T,))
    return batch, lam, g


def _mask_and(ops):
    return masks(T=st_lengths(1, 200), batch_shape=batch_shapes(2, 3), library="torch",
                 dtype=torch.float64).flatmap(lambda M: ops(M).map(lambda o: (M, o)))


@settings(max_examples=40)
@given(pair=_mask_and(lambda M: operands(M, D=st.integers(1, 4))), C=CHUNKS)
def test_matmul_equals_dense(pair, C):
    M, x = pair
    batch, lam, g = _args(M, x)
    got = chunked.matmul(lam, g, x.expand(batch + x.shape[-2:]), chunk=C)
    assert_close(got, hodlr.matmul(M, x, backend="dense"), TOL)


@settings(max_examples=40)
@given(pair=_mask_and(lambda M: attention_inputs(M, Dk=st.integers(1, 4), Dv=st.integers(1, 4))), C=CHUNKS,
       scale=st.sampled_from([1.0, 0.25]))
def test_attention_equals_dense(pair, C, scale):
    M, (q, k, v) = pair
    batch, lam, g = _args(M, q, k, v)
    q, k, v = (a.expand(batch + a.shape[-2:]) for a in (q, k, v))
    got = chunked.attention(q, k, v, lam, g, scale, chunk=C)
    assert_close(got, hodlr.attention(q, k, v, M, scale=scale, backend="dense"), TOL)


@pytest.mark.parametrize("T", [1, 2, 3, 63, 65, 1000])
@pytest.mark.parametrize("C", [4, 64])
def test_awkward_lengths_strong_decay(T, C, rng):
    L = hodlr.num_levels(T) + 1
    lam = poison_unread(rng.uniform(-1.5, 1.5, (2, T, L)))
    g = np.where(rng.random((1, T)) < 0.5, -rng.uniform(0, 1e-3, (1, T)), -rng.uniform(0, 50, (1, T)))
    M = hodlr.LogLinearMask(lam, g)
    x = rng.standard_normal((2, T, 3))
    got = chunked.matmul(lam, np.broadcast_to(g, (2, T)), x, chunk=C)
    assert isinstance(got, np.ndarray) and got.dtype == np.float64, "numpy in, numpy out"
    assert_close(got, hodlr.matmul(M, x, backend="dense"), TOL)
    q, k = rng.standard_normal((2, 2, T, 2))
    got = chunked.attention(q, k, x, lam, np.broadcast_to(g, (2, T)), 0.5, chunk=C)
    assert_close(got, hodlr.attention(q, k, x, M, scale=0.5, backend="dense"), TOL)


def test_public_api_and_float32(rng):
    """Through ``hodlr`` with the default chunk; float32 with float16 operands cast back."""
    T = 300
    lam = torch.as_tensor(poison_unread(rng.uniform(0.2, 1.5, (T, hodlr.num_levels(T)))))
    g = torch.as_tensor(-rng.uniform(0, 1, T))
    x = torch.as_tensor(rng.standard_normal((2, T, 5)))
    M = hodlr.LogLinearMask(lam, g)
    assert_close(hodlr.matmul(M, x, backend="chunked"), hodlr.matmul(M, x, backend="dense"), TOL)
    M32 = hodlr.LogLinearMask(lam.float(), g.float())
    y = hodlr.matmul(M32, x.half(), backend="chunked")
    assert y.dtype == torch.float16
    assert_close(y, hodlr.matmul(M, x.half().double(), backend="dense"), 1e-3)


@settings(max_examples=15)
@given(M=masks(T=st_lengths(1, 80), batch_shape=batch_shapes(1, 2), library="torch", dtype=torch.float64,
               decay=st.sampled_from(["none", "mild", "strong"])),
       C=st.sampled_from([2, 16]), seed=st.integers(0, 2**31))
def test_gradients_equal_dense(M, C, seed):
    """Autograd through the chunked algorithm equals autograd through the dense mask; the
    never-read (NaN) scales get gradient exactly 0."""
    rng = np.random.default_rng(seed)
    T = M.T
    lam0 = M.level_scales.detach()
    g0 = None if M.log_decay is None else M.log_decay.detach()
    q, k = (torch.as_tensor(rng.standard_normal((T, 3))) for _ in range(2))
    v = torch.as_tensor(rng.standard_normal(M.batch_shape + (T, 2)))
    w = torch.as_tensor(rng.standard_normal(M.batch_shape + (T, 2)))

    def grads(fn):
        leaves = [a.clone().requires_grad_(True) for a in (q, k, v, lam0)] + (
            [] if g0 is None else [g0.clone().requires_grad_(True)])
        out = fn(*leaves)
        (out * w).sum().backward()
        return [a.grad for a in leaves]

    def dense(q, k, v, lam, g=None):
        return hodlr.attention(q, k, v, hodlr.LogLinearMask(lam, g, validate=False), scale=0.5, backend="dense")

    def chunk(q, k, v, lam, g=None):
        batch = M.batch_shape
        qq, kk, vv = (a.expand(batch + a.shape[-2:]) for a in (q, k, v))
        return chunked.attention(qq, kk, vv, lam, None if g is None else g.expand(batch + (T,)), 0.5, chunk=C)

    for got, ref, name in zip(grads(chunk), grads(dense), ("q", "k", "v", "level_scales", "log_decay")):
        if name == "level_scales":
            unread = torch.isnan(lam0)
            assert bool((got[unread] == 0).all()), "never-read scales must get gradient 0"
            got, ref = got[~unread], ref[~unread]
        assert_close(got, ref, TOLERANCES["grad_float64"], f"d/d{name}")


def test_bad_chunk():
    lam = torch.ones(4, hodlr.num_levels(4), dtype=torch.float64)
    x = torch.ones(4, 1, dtype=torch.float64)
    with pytest.raises(ValueError, match="chunk"):
        chunked.matmul(lam, None, x, chunk=3)
    with pytest.raises(TypeError, match="chunk"):
        chunked.matmul(lam, None, x, chunk=2.0)


def test_large_log_decay_at_position_zero_is_not_read():
    """The log-decay of absolute position 0 multiplies no pair: a large one there (which would
    overflow the chunk-local cumulative sums) changes nothing, in plain calls, packed sequences and
    Gated DeltaNet."""
    rng = np.random.default_rng(7)
    T = 70
    g = np.full(T, -0.1)
    g[0] = 800.0
    M = hodlr.LogLinearMask(rng.uniform(0.5, 1.5, (T, hodlr.num_levels(T))), g)
    x, q = rng.standard_normal((T, 3)), rng.standard_normal((T, 3))
    k = q / np.linalg.norm(q, axis=-1, keepdims=True)
    beta = rng.uniform(0, 1, T)
    tol = TOLERANCES["cpu_float64"]
    assert_close(hodlr.matmul(M, x, backend="chunked"), hodlr.matmul(M, x, backend="dense"), tol, "matmul")
    assert_close(hodlr.attention(q, k, x, M, backend="chunked"), hodlr.attention(q, k, x, M, backend="dense"), tol,
                 "attention")
    assert_close(hodlr.gated_delta_attention(q, k, x, beta, M, backend="chunked"),
                 hodlr.gated_delta_attention(q, k, x, beta, M, backend="dense"), tol, "gated delta")
    H, D, cu = 2, 4, torch.tensor([0, 30, 2 * T])
    t = torch.as_tensor(rng.standard_normal((1, 2 * T, H, D)))
    gp = torch.full((1, 2 * T, H), -0.1, dtype=torch.float64)
    gp[:, [0, 30]] = 800.0  # the first position of each packed sequence
    lam = torch.as_tensor(rng.uniform(0.5, 1.5, (1, 2 * T, H, hodlr.num_levels(2 * T))))
    want = hodlr.log_linear_attn(t, t, t, gp, lam, cu_seqlens=cu, backend="fenwick")[0]
    assert_close(hodlr.log_linear_attn(t, t, t, gp, lam, cu_seqlens=cu, backend="chunked")[0], want, tol, "packed")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gated_delta_on_a_16_bit_mask(dtype):
    """A 16-bit mask on the chunked Gated DeltaNet (whose triangular solves have no 16-bit CPU
    kernel) runs in float32 and agrees with the float64 definition to the inputs' precision
    (the 16-bit dense backend no closer: measured 2e-4 / 2e-3 float16 / bfloat16)."""
    gen = torch.Generator().manual_seed(3)
    T = 300
    M = hodlr.LogLinearMask(torch.rand(T, hodlr.num_levels(T), generator=gen).to(dtype),
                            (-0.1 * torch.rand(T, generator=gen)).to(dtype))
    q = torch.randn(T, 4, generator=gen).to(dtype)
    k = torch.nn.functional.normalize(torch.randn(T, 4, generator=gen), dim=-1).to(dtype)
    beta = torch.rand(T, generator=gen).to(dtype)
    got = hodlr.gated_delta_attention(q, k, q, beta, M, backend="chunked")
    M64 = hodlr.LogLinearMask(M.level_scales.double(), M.log_decay.double())
    want = hodlr.gated_delta_attention(q.double(), k.double(), q.double(), beta.double(), M64, backend="dense")
    assert got.dtype == dtype
    assert relative_error(got.double(), want) <= (1e-3 if dtype == torch.float16 else TOLERANCES["gpu_bfloat16"])


@pytest.mark.parametrize("n, C", [(1, 4), (2, 1), (7, 2), (16, 4), (37, 1)])
def test_block_hierarchy_aligned_is_per_row_at_chunk_zero(n, C):
    """One definition of the chunk hierarchy: its per-row form (the state hand-off's) with every
    row from absolute chunk 0 reads exactly, bit for bit, what the aligned form (strided views)
    reads, and a row from chunk I0 reads what a row from 0 reads of the same blocks."""
    gen = torch.Generator().manual_seed(n)
    R, H, width = 3, 2, 2 + (n - 1).bit_length() + C.bit_length()
    S0 = torch.randn(R, H, n, 2, 3, generator=gen, dtype=torch.float64)
    A0 = -torch.rand(R, H, n, generator=gen, dtype=torch.float64)
    lam = torch.rand(R, H, n, C, width, generator=gen, dtype=torch.float64)
    G = -torch.rand(R, H, n, C, generator=gen, dtype=torch.float64)
    c, bits = C.bit_length() - 1, (n - 1).bit_length()

    def reads(first):
        states, A = chunked._hierarchy(S0, A0, bits, first)
        return [rowf[..., None, None] * chunked._take(states[h], idx, first, 2)[..., None, :, :]
                for h, idx, rowf in chunked._block_reads(A, lam, G, c, bits, first)]

    for got, want in zip(reads(np.zeros(R, dtype=np.int64)), reads(None), strict=True):
        assert torch.equal(got, want)
