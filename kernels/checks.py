"""Device-side input checks: the finiteness of the level scales a mask reads and of its log-decay,
without a host round-trip (the verdict is one int32 on the device)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._device import validate_rows
from ._layout import broadcast_shape, collapse_batch, next_power_of_2


@triton.jit(do_not_specialize=["T", "B1", "L", "slb0", "slb1", "slt", "sgb0", "sgb1", "sgt"])
def _nonfinite_kernel(l_ptr, g_ptr, flag_ptr, T, B1, L, slb0, slb1, slt, sll, sgb0, sgb1, sgt,
                      BT: tl.constexpr, BL: tl.constexpr, HAS_G: tl.constexpr):
    """Program ``(row tile, batch entry)``: sets ``flag`` to 1 where a scale that is read (level 0,
    or level ``l >= 1`` with bit ``l - 1`` of the row set) or a log-decay is NaN or infinite."""
    t = tl.program_id(0) * BT + tl.arange(0, BT)
    bh = tl.program_id(1).to(tl.int64)
    b0 = bh // B1
    b1 = bh % B1
    validate_rows(flag_ptr, l_ptr + b0 * slb0 + b1 * slb1, slt, sll, L, g_ptr + b0 * sgb0 + b1 * sgb1, sgt, t, t < T,
                  BL, HAS_G)


def nonfinite_flag(level_scales: torch.Tensor, log_decay: torch.Tensor = None) -> torch.Tensor:
    """A one-element int32 device tensor: 1 if a level scale that is read or a log-decay is NaN or
    infinite, else 0.  Queued on the current stream; nothing waits for it.

    Parameters
    ----------
    level_scales : torch.Tensor, shape ``(..., T, L)``
    log_decay : torch.Tensor, shape ``(..., T)``, optional
        Leading dims broadcast.
    """
    T, L = level_scales.shape[-2:]
    batch = tuple(broadcast_shape(level_scales.shape[:-2], () if log_decay is None else log_decay.shape[:-1]))
    lam = level_scales.expand(batch + (T, L))
    g = None if log_decay is None else log_decay.expand(batch + (T,))
    B0, B1, strides, (lam, g) = collapse_batch(batch, [lam, g])
    flag = torch.zeros(1, dtype=torch.int32, device=level_scales.device)
    if B0 * B1 == 0 or T == 0:  # an empty broadcast batch: nothing to check
        return flag
    BT = 128
    gst = (0, 0, 0) if g is None else (*strides[1], g.stride(-1))
    _nonfinite_kernel[(triton.cdiv(T, BT), B0 * B1)](
        lam, lam if g is None else g, flag, T, B1, L, *strides[0], lam.stride(-2), lam.stride(-1), *gst,
        BT=BT, BL=next_power_of_2(L), HAS_G=g is not None)
    return flag
