"""Gradients through every torch backend equal the dense float64 gradients.

Every backend of the registry but ``triton`` must run on torch CPU tensors (a missing module
or a refusal fails the test, it is never skipped); for each, hypothesis draws masks and operands
and we compare the gradients with respect to ``q, k, v, level_scales, log_decay`` (and
``X`` for ``matmul``) with the dense backend's, per gradient, to ``TOLERANCES["grad_float64"]``.
``torch.autograd.gradcheck`` checks the dense backend itself (and every other backend) by
finite differences.  Level scales that no row reads get a gradient of exactly zero.  A
backend that cannot differentiate (one that computes through numpy) must say so with an
error that mentions gradients, never return a result silently cut off from the graph.

The Triton backend's gradients are proven in ``tests/test_triton_backward.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from hodlr import fenwick
import hodlr
from hodlr import backends as registry
from hodlr.testing import TOLERANCES, attention_inputs, batch_shapes, masks, operands, relative_error, st_lengths

TOL = TOLERANCES["grad_float64"]
CPU = torch.device("cpu")
TORCH_BACKENDS = [name for name in registry.NAMES if name != "triton"]
MAY_REFUSE_GRAD = {"sparse"}
"""Backends allowed to refuse ``requires_grad`` inputs (they compute through numpy), with
an error that names gradients (:func:`test_no_silent_loss_of_gradient`)."""
GRAD_BACKENDS = [name for name in TORCH_BACKENDS if name not in MAY_REFUSE_GRAD]
"""The torch CPU backends that differentiate."""
COMPARED = [name for name in GRAD_BACKENDS if name != "dense"]
"""Those compared with the dense reference's gradients."""


def _backend(name: str):
    """The module of ``name``, which must run on torch CPU tensors: a missing backend module
    or a refusal is a failure, never a skip."""
    module = registry.load(name)
    reason = module.unavailable_reason("torch", CPU)
    assert reason is None, f"backend {name!r} does not run on torch CPU tensors: {reason}"
    return module


def _leaves(M, operands_):
    """Fresh leaf tensors (requires_grad) for the mask generators and the operands."""
    lam = M.level_scales.detach().clone().requires_grad_(True)
    g = None if M.log_decay is None else M.log_decay.detach().clone().requires_grad_(True)
    ops = [x.detach().clone().requires_grad_(True) for x in operands_]
    return lam, g, ops


def _grads(op, name, M, operands_, scale, cotangent_seed):
    """``{input name: gradient}`` of ``sum(out * W)`` for a fixed random cotangent ``W``."""
    lam, g, ops = _leaves(M, operands_)
    mask = hodlr.LogLinearMask(lam, g)
    if op == "attention":
        q, k, v = ops
        out = hodlr.attention(q, k, v, mask, scale=scale, backend=name)
        names = ["q", "k", "v"]
    else:
        (x,) = ops
        out = hodlr.matmul(mask, x, backend=name)
        names = ["X"]
    if not out.requires_grad:
        raise AssertionError(f"backend {name!r} returned a {op} result without a gradient graph")
    w = torch.as_tensor(np.random.default_rng(cotangent_seed).standard_normal(tuple(out.shape)), dtype=out.dtype)
    inputs = ops + [lam] + ([] if g is None else [g])
    names = names + ["level_scales"] + ([] if g is None else ["log_decay"])
    grads = torch.autograd.grad((out * w).sum(), inputs, allow_unused=True)
    return dict(zip(names, grads))


def _compare(op, name, M, operands_, scale, seed):
    module = _backend(name)
    want = _grads(op, "dense", M, operands_, scale, seed)
    got = _grads(op, name, M, operands_, scale, seed)
    assert module is not None
    for key, expected in want.items():
        actual = got[key]
        if actual is None:  # the input did not enter the graph: its gradient is zero
            actual = torch.zeros_like(expected)
        err = relative_error(actual, expected)
        assert err <= TOL, f"{name} {op}: d{key} relative error {err:.3e} > {TOL:.0e} (T={M.T})"


def _torch_masks(max_T=70, poison=True):
    return masks(
        T=st_lengths(max_value=max_T),
        batch_shape=batch_shapes(max_dims=2, max_side=2),
        library="torch",
        dtype=torch.float64,
        poison=poison,
    )


@pytest.mark.parametrize("name", COMPARED)
@settings(max_examples=25)
@given(data=st.data())
def test_attention_gradients_match_dense(name, data):
    M = data.draw(_torch_masks())
    q, k, v = data.draw(attention_inputs(M, Dk=st.integers(1, 4), Dv=st.integers(1, 4)))
    scale = data.draw(st.sampled_from([1.0, 0.37]))
    _compare("attention", name, M, (q, k, v), scale, data.draw(st.integers(0, 2**31)))


@pytest.mark.parametrize("name", COMPARED)
@settings(max_examples=25)
@given(data=st.data())
def test_matmul_gradients_match_dense(name, data):
    M = data.draw(_torch_masks())
    (x,) = (data.draw(operands(M, D=st.integers(1, 4))),)
    _compare("matmul", name, M, (x,), 1.0, data.draw(st.integers(0, 2**31)))


def _small_case(T, decay, rng, batch=(2,)):
    L = fenwick.num_levels(T) + 1
    lam = torch.as_tensor(rng.uniform(0.3, 1.2, batch + (T, L)))
    g = None if decay is None else torch.as_tensor(-rng.uniform(0.0, decay, batch + (T,)))
    q, k = (torch.as_tensor(rng.standard_normal((1, T, 2))) for _ in range(2))
    v = torch.as_tensor(rng.standard_normal(batch + (T, 3)))
    return lam, g, q, k, v


@pytest.mark.parametrize("name", GRAD_BACKENDS)
@pytest.mark.parametrize("T,decay", [(1, 0.5), (5, None), (9, 0.7), (17, 2.0)])
def test_gradcheck(name, T, decay, rng):
    _backend(name)
    lam, g, q, k, v = _small_case(T, decay, rng)
    inputs = [x.requires_grad_(True) for x in (q, k, v, lam) + (() if g is None else (g,))]

    def attention(q, k, v, lam, g=None):
        return hodlr.attention(q, k, v, hodlr.LogLinearMask(lam, g), scale=0.7, backend=name)

    def matmul(v, lam, g=None):
        return hodlr.matmul(hodlr.LogLinearMask(lam, g), v, backend=name)

    assert torch.autograd.gradcheck(attention, tuple(inputs))
    assert torch.autograd.gradcheck(matmul, tuple(inputs[2:]))


@pytest.mark.parametrize("name", GRAD_BACKENDS)
@pytest.mark.parametrize("T", [1, 2, 3, 7, 63, 65])
def test_unread_level_scales_get_exactly_zero_gradient(name, T, rng):
    """Unread scales hold finite values (so a leak would show as a number, not NaN) and
    must still get a gradient of exactly 0; every read scale gets a nonzero one here."""
    _backend(name)
    lam, g, q, k, v = _small_case(T, 0.5, rng)
    lam.requires_grad_(True)
    g.requires_grad_(True)
    read = torch.as_tensor(fenwick.read_levels(T, lam.shape[-1]))
    w = torch.as_tensor(rng.standard_normal(v.shape))
    for op in ("attention", "matmul"):
        M = hodlr.LogLinearMask(lam, g)
        out = (hodlr.attention(q, k, v, M, backend=name) if op == "attention" else hodlr.matmul(M, v, backend=name))
        (dlam,) = torch.autograd.grad((out * w).sum(), [lam])
        unread = dlam[..., ~read]
        assert torch.equal(unread, torch.zeros_like(unread)), f"{name} {op}: unread scales got gradient {unread}"
        assert bool((dlam[..., read] != 0).all()), f"{name} {op}: a read scale got a zero gradient"


@pytest.mark.parametrize("name", TORCH_BACKENDS)
def test_no_silent_loss_of_gradient(name, rng):
    """With inputs that require grad, a backend returns a result on the graph or refuses
    with an error that mentions gradients."""
    _backend(name)
    lam, g, q, k, v = _small_case(33, 0.5, rng)
    v.requires_grad_(True)
    try:
        out = hodlr.attention(q, k, v, hodlr.LogLinearMask(lam, g), backend=name)
    except Exception as err:
        assert "grad" in str(err).lower(), f"{name}: refused gradients with an unclear error: {err!r}"
        assert name in MAY_REFUSE_GRAD, f"{name} must support autograd: {err!r}"
        return
    assert name not in MAY_REFUSE_GRAD, f"{name} was expected to refuse gradients (or leave MAY_REFUSE_GRAD)"
    assert out.requires_grad and out.grad_fn is not None, f"{name}: result silently detached from the graph"


def test_scale_that_requires_grad_is_refused_not_cut_off():
    # scale is read as a Python float: a 0-d tensor that requires grad would silently get no
    # gradient, so it is refused (under no_grad, or without requires_grad, it is accepted).
    T = 5
    M = hodlr.LogLinearMask(torch.ones(T, fenwick.num_levels(T), dtype=torch.float64))
    q = torch.randn(T, 2, dtype=torch.float64)
    scale = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    with pytest.raises(TypeError, match="scale.*requires grad"):
        hodlr.attention(q, q, q, M, scale=scale, backend="dense")
    from hodlr.fenwick.scan import attention as scan_attention

    with pytest.raises(TypeError, match="scale.*requires grad"):
        scan_attention(q, q, q, M.level_scales, None, scale)
    want = hodlr.attention(q, q, q, M, scale=0.5, backend="dense")
    with torch.no_grad():
        assert torch.equal(hodlr.attention(q, q, q, M, scale=scale, backend="dense"), want)
        assert relative_error(scan_attention(q, q, q, M.level_scales, None, scale), want) <= TOL
    assert torch.equal(hodlr.attention(q, q, q, M, scale=scale.detach(), backend="dense"), want)


@pytest.mark.parametrize("op", ["matmul", "attention"])
@pytest.mark.parametrize("batch", [(), (2,)], ids=str)
def test_length_one_decay_gets_a_zero_gradient_on_every_backend(op, batch):
    """At ``T = 1`` no decay enters the result (``log_decay[..., 0]`` never does), yet a
    ``log_decay`` that is an input gets a gradient on every backend that differentiates: zero,
    never ``None`` (``torch.autograd.grad`` without ``allow_unused`` fails on an unused input).
    The triton backend is included when it runs here (under the interpreter)."""
    gen = torch.Generator().manual_seed(1)
    names = [n for n in registry.NAMES if n not in MAY_REFUSE_GRAD
             and registry.load(n).unavailable_reason("torch", CPU) is None]
    assert set(TORCH_BACKENDS) - MAY_REFUSE_GRAD <= set(names)
    values = (torch.rand(batch + (1, 2), generator=gen, dtype=torch.float64),
              -torch.rand(batch + (1,), generator=gen, dtype=torch.float64),
              torch.randn(batch + (1, 3), generator=gen, dtype=torch.float64))
    grads = {}
    for name in names:
        lam, g, x = (a.clone().requires_grad_(True) for a in values)
        M = hodlr.LogLinearMask(lam, g)
        out = hodlr.matmul(M, x, backend=name) if op == "matmul" else hodlr.attention(x, x, x, M, backend=name)
        grads[name] = torch.autograd.grad(out.sum(), (lam, g, x))
    for name, (d_lam, d_g, d_x) in grads.items():
        assert torch.equal(d_g, torch.zeros_like(d_g)), name
        assert torch.equal(d_lam[..., 1:], torch.zeros_like(d_lam[..., 1:])), name  # column 1 is never read
        for got, want in zip((d_lam, d_x), grads["dense"][::2]):
            assert relative_error(got, want) <= TOL, name
