"""Log-linear Gated DeltaNet against the recurrent reference of the paper's authors
(``hattention.recurrent.hattention_recurrent``, ``HStruct.GDELTA``, weak cascade, base 2).

Everywhere (CI included): against that reference's outputs stored in
``tests/data/hattention_gated_delta.npz`` (inputs and outputs of the cases :data:`STORED`, float32,
made by :func:`stored_cases` with hattention at commit 7f8644159c14 of HanGuo97/log-linear-attention).
Where hattention is importable, also against the reference itself, which must still give the stored
outputs (so the file stays what hattention computes).

hattention's recurrent form runs on the CPU with torch, einops and jaxtyping (its package
``__init__`` also imports its model classes; a copy of its ``hattention`` folder with that file
reduced to its version line will do, as ``hodlr.bench_hattention`` describes)::

    PYTHONPATH=/opt/hattention python3 -m pytest -q tests/test_gated_delta_hattention.py

Conventions (docs/mathematics.md §13, "Checked against"): its layout is hodlr's fla-shaped
``(B, T, H, D)``, its gate argument is ``α = exp(g)``, it has no ``scale`` (hodlr's ``scale=1``),
and it keeps float32 states, so the comparison is against hodlr's float64 result to float32's
rounding.  Its recurrence updates its states in place, so autograd cannot differentiate it: the
gradients are checked against hodlr's dense float64 backend (tests/test_gated_delta.py), the
outputs here.
"""

import os

import numpy as np
import pytest
import torch

import hodlr
from hodlr.testing import relative_error

try:
    from hattention import base as hbase, recurrent
except ImportError:  # the stored outputs serve
    recurrent = hbase = None
needs_hattention = pytest.mark.skipif(recurrent is None, reason="hattention (the paper authors' code) is not installed")

DATA = os.path.join(os.path.dirname(__file__), "data", "hattention_gated_delta.npz")
STORED = [(1, 4), (2, 4), (3, 4), (17, 4), (63, 4), (64, 4), (65, 4), (100, 4), (65, 16)]
"""``(T, D)`` of the stored cases (B = H = 2)."""


def _inputs(T, D, seed):
    gen = torch.Generator().manual_seed(seed)
    B, H = 2, 2
    q, k, v = (torch.randn(B, T, H, D, generator=gen) for _ in range(3))
    k = torch.nn.functional.normalize(k, dim=-1)
    g = -0.2 * torch.rand(B, T, H, generator=gen)
    beta = torch.rand(B, T, H, generator=gen)
    lam = 0.5 + torch.rand(B, T, H, hodlr.num_levels(T), generator=gen)
    return q, k, v, g, beta, lam


def _theirs(q, k, v, g, beta, lam):
    return recurrent.hattention_recurrent(q, k, v, g.exp(), beta, lam, base=2, htype=hbase.HType.WEAK,
                                          hstruct=hbase.HStruct.GDELTA)[0]


def _ours(q, k, v, g, beta, lam):
    return hodlr.log_linear_gated_delta_rule(q, k, v, g, beta, lam, scale=1.0)[0]


def stored_cases():
    """``{name: array}`` of :data:`STORED`: each case's inputs and hattention's output, float32 (what
    ``tests/data/hattention_gated_delta.npz`` holds; needs hattention)."""
    arrays = {}
    for T, D in STORED:
        xs = _inputs(T, D, seed=T * 31 + D)
        with torch.no_grad():
            out = _theirs(*xs)
        for name, x in zip(("q", "k", "v", "g", "beta", "lam", "out"), (*xs, out)):
            arrays[f"{T}_{D}_{name}"] = x.numpy().astype(np.float32)
    return arrays


@pytest.mark.parametrize("T, D", STORED)
def test_output_matches_stored_hattention_recurrent(T, D):
    """hodlr in float64 against hattention's stored float32 outputs, to float32's rounding."""
    with np.load(DATA) as data:
        q, k, v, g, beta, lam, theirs = (torch.as_tensor(data[f"{T}_{D}_{name}"]).double()
                                         for name in ("q", "k", "v", "g", "beta", "lam", "out"))
    assert relative_error(theirs, _ours(q, k, v, g, beta, lam)) < 1e-5


@needs_hattention
def test_stored_outputs_are_hattentions():
    """The stored file is what hattention computes today, to the bit."""
    want = stored_cases()
    with np.load(DATA) as data:
        assert sorted(data.files) == sorted(want)
        for name, x in want.items():
            assert np.array_equal(data[name], x), name


@needs_hattention
@pytest.mark.parametrize("T", [1, 2, 3, 17, 63, 64, 65, 100])
@pytest.mark.parametrize("D", [4, 16])
def test_output_matches_hattention_recurrent(T, D):
    xs = _inputs(T, D, seed=T * 31 + D)
    with torch.no_grad():
        theirs = _theirs(*xs)
    ours = _ours(*(x.double() for x in xs))
    assert relative_error(theirs.double(), ours) < 1e-5


@needs_hattention
def test_unit_levels_and_zero_beta():
    """λ ≡ 1 is plain Gated DeltaNet in both; β ≡ 0 leaves both outputs zero."""
    q, k, v, g, beta, lam = _inputs(33, 8, seed=5)
    ones = torch.ones_like(lam)
    assert relative_error(_theirs(q, k, v, g, beta, ones).double(),
                          _ours(*(x.double() for x in (q, k, v, g, beta, ones)))) < 1e-5
    zero = torch.zeros_like(beta)
    assert _theirs(q, k, v, g, zero, lam).abs().max() == 0
    assert _ours(q, k, v, g, zero, lam).abs().max() == 0
