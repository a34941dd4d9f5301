"""The device-side validation of CUDA masks: the finiteness check of the scales a mask reads and of
its log-decay runs as one kernel (here under the Triton interpreter), and its verdict reaches the
host without a synchronisation (GPU tests)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import hodlr
from hodlr import fenwick, kernels
from hodlr.testing import poison_unread

interpreter = pytest.mark.skipif(not kernels.interpreting(), reason="runs the check kernel in the interpreter")


def _flag(lam, g=None):
    from hodlr.kernels.checks import nonfinite_flag

    return int(nonfinite_flag(lam, g)[0])


@interpreter
@pytest.mark.parametrize("T", [1, 2, 37, 130])
def test_unread_entries_never_flag(T):
    L = fenwick.num_levels(T) + 2
    lam = poison_unread(torch.rand(2, 1, T, L))
    assert _flag(lam) == 0
    assert _flag(lam, -torch.rand(3, T)) == 0


@interpreter
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_every_read_entry_flags(bad, rng):
    T = 37
    L = fenwick.num_levels(T)
    read = np.argwhere(fenwick.read_levels(T, L))
    for t, l in read[rng.choice(len(read), 12, replace=False)]:
        lam = poison_unread(torch.rand(2, T, L))
        lam[1, t, l] = bad
        assert _flag(lam) == 1, (t, l)
    g = -torch.rand(2, T)
    g[0, int(rng.integers(T))] = bad
    assert _flag(torch.rand(T, L), g) == 1


@interpreter
def test_strided_and_broadcast_inputs():
    T, L = 50, 7
    lam = torch.rand(T, 3, L).transpose(0, 1)  # (3, T, L), strided rows
    lam.copy_(poison_unread(lam.clone()))
    g = (-torch.rand(T, 1)).expand(T, 3).t()                   # stride-0 batch
    assert _flag(lam, g) == 0
    lam = lam.clone()
    lam[2, 31, 0] = float("nan")
    assert _flag(lam, g) == 1


@pytest.mark.gpu
def test_gpu_mask_validation_is_deferred_and_reported():
    T = 4097
    lam = poison_unread(torch.rand(2, T, fenwick.num_levels(T), device="cuda"))
    ok = hodlr.LogLinearMask(lam, -torch.rand(2, T, device="cuda"))
    ok.check()                                    # waits, nothing raised
    bad = lam.clone()
    bad[1, 5, 0] = float("nan")
    M = hodlr.LogLinearMask(bad)                  # returns at once
    with pytest.raises(ValueError, match="level_scales must be finite where they are read"):
        M.check()
    bad = hodlr.LogLinearMask(lam.clone().index_fill_(1, torch.tensor([6], device="cuda"), float("inf")))
    torch.cuda.synchronize()
    with pytest.raises(ValueError, match="holds NaN or inf"):
        hodlr.matmul(ok, torch.rand(2, T, 3, device="cuda"))   # the next hodlr call reports it
    hodlr.matmul(ok, torch.rand(2, T, 3, device="cuda"))       # reported once
