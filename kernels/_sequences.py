"""The sequence table of the state-aware attention kernels (host side).

A call of :func:`kernels.attention` with a recurrent state, packed sequences (``cu_seqlens``), a
final state or grouped heads runs every kernel over the sequences of the call, each its own
Fenwick tree at absolute positions (``docs/kernels.md`` §6.  This
module builds what the kernels index them by, from the host copy of the sequence lengths only:
the start positions stay on the device (no host synchronisation on them).

Sequence table (``(N, 8)`` int64 on the device, one row per sequence; the kernels step eight
columns a row, ``kernels._device``)::

    0  batch row of its tokens (the sequence index, or 0 with cu_seqlens)
    1  row of its first token along T (0, or cu_seqlens[n])
    2  length
    3  absolute position of its first token (the state's position, or 0)  -- device values
    4  first entry of its region of the hierarchy (and of the block sums)
    5  span: (chunk slots - 1), >= 0; level h of its region has (span >> h) + 3 entries
    6  first chunk slot
    7  first group slot (groups of 2**P chunks, the backward's block sums)

A sequence of length ``T_n`` starting at ``a`` covers the absolute chunks ``I0 = a >> c`` to
``I1 = (a + T_n - 1) >> c``: at most ``cdiv(T_n + C - 1, C)`` of them whatever ``a`` is
(``cdiv(T_n, C)`` when every sequence starts at 0), which is the number of chunk slots it gets;
programs of slots past its last chunk exit at once.  Its region of the hierarchy holds, at level
``h``, ``(span >> h) + 3`` entries (the levels one after the other, from ``hbase``): block ``m`` at
entry ``m - (I0 >> h) + 1``, so entry 0 is block ``(I0 >> h) - 1``, the carried bucket of level
``c + 1 + h``.  The backward's block sums take the same layout, the block sum of reader block
``b`` at entry ``b - (I0 >> h)`` (entry 0: the readers of the carried bucket).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from ._layout import integer_tensor


class Sequences(NamedTuple):
    """The sequences of one call as the kernels see them (see the module docstring)."""

    table: torch.Tensor
    chunk_seq: torch.Tensor
    group_seq: torch.Tensor
    count: int
    lengths: np.ndarray
    max_length: int
    n_slots: int
    n_groups: int
    n_entries: int
    levels: int
    final_slots: int
    state_slots: int


def _slots(counts: np.ndarray):
    """``(first slot per sequence, sequence of each slot)`` for ``counts[n]`` slots of sequence ``n``."""
    first = np.zeros(counts.size, dtype=np.int64)
    np.cumsum(counts[:-1], out=first[1:])
    return first, np.repeat(np.arange(counts.size, dtype=np.int32), counts)


def host_lengths(N: int, T: int, cu_seqlens):
    """``(batch rows, first rows, lengths)`` of the sequences (int64 numpy): ``N`` rows of ``T``
    tokens, or the packed sequences of ``cu_seqlens`` (one host read of it, checked here)."""
    if cu_seqlens is None:
        return (np.arange(N, dtype=np.int64), np.zeros(N, dtype=np.int64), np.full(N, T, dtype=np.int64))
    if not integer_tensor(cu_seqlens):
        what = cu_seqlens.dtype if isinstance(cu_seqlens, torch.Tensor) else type(cu_seqlens).__name__
        raise TypeError(f"cu_seqlens must be a 1-d integer torch.Tensor (sequence starts along T), got {what}")
    cu = np.asarray(cu_seqlens.tolist(), dtype=np.int64)
    if cu.ndim != 1 or cu.size < 1 or cu[0] != 0 or cu[-1] != T or (np.diff(cu) < 0).any():
        raise ValueError(f"cu_seqlens must be a non-decreasing 1-d integer tensor from 0 to T={T} (sequence starts "
                         f"along T), got {cu.tolist()[:8]}{' ...' if cu.size > 8 else ''}")
    count = cu.size - 1
    return np.zeros(count, dtype=np.int64), cu[:-1].copy(), np.diff(cu)


def plan(N: int, T: int, C: int, cu_seqlens, positions, state_slots: int, device, group_log: int = 0) -> Sequences:
    """The sequence table and slot maps of one call (chunk size ``C``).

    ``positions`` (device int64 ``(count,)``, or None for sequences from position 0) is never read on
    the host: every size below is a bound from the lengths and ``state_slots`` (a state of ``S``
    slots holds positions below ``2**S``).  ``levels`` is the number of chunk levels of the
    hierarchy (enough for the reads of every chunk and of the final state), ``final_slots`` the
    slots of the final state (``max(S, bit_length(largest possible end))``).
    """
    batch, row0, length = host_lengths(N, T, cu_seqlens)
    count = length.size
    c = C.bit_length() - 1
    max_length = int(length.max(initial=0))
    has_state = positions is not None
    if has_state and positions.shape != (count,):
        raise ValueError(f"initial_positions must have shape ({count},) (one per sequence), got {tuple(positions.shape)}")
    bound = ((1 << state_slots) - 1 if has_state else 0) + max_length  # no end position exceeds it
    levels = max(1, (bound >> c).bit_length())
    final_slots = max(state_slots, bound.bit_length())
    if has_state:
        chunks = np.where(length > 0, (length + 2 * C - 2) // C, 0)
    else:
        chunks = (length + C - 1) // C
    span = np.maximum(chunks - 1, 0)
    h = np.arange(levels)
    entries = ((span[:, None] >> h[None, :]) + 3).sum(1)
    hbase, _ = _slots(entries)
    slot_base, chunk_seq = _slots(chunks)
    groups = np.where(chunks > 0, (span >> group_log) + 2, 0)
    group_base, group_seq = _slots(groups)
    table = np.stack([batch, row0, length, np.zeros(count, dtype=np.int64), hbase, span, slot_base, group_base], 1)
    table = torch.as_tensor(table, dtype=torch.int64).to(device)
    if has_state:
        table[:, 3] = positions
    return Sequences(table, torch.as_tensor(chunk_seq).to(device), torch.as_tensor(group_seq).to(device), count,
                     length, max_length, int(chunks.sum()), int(groups.sum()), int(entries.sum()), levels,
                     final_slots, state_slots)
