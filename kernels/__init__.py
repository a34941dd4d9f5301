"""Triton kernels for the log-linear (HODLR) mask: chunked attention and matmul, forward.

Imports ``fenwick`` only (never ``hodlr``).  Launchers take torch tensors ``(*batch, T, D)``
with any strides; they run on CUDA, and on the CPU under ``TRITON_INTERPRET=1`` (which must
be set before ``triton`` is first imported: ``@triton.jit`` reads it when a kernel is
defined).  See ``docs/kernels.md`` for the algorithm, the chunk-state layout and the
FLOP / byte floor.
"""

from kernels._layout import DEFAULT_CHUNK, interpreting
from kernels.attention import attention
from kernels.matmul import matmul

__all__ = ["DEFAULT_CHUNK", "attention", "interpreting", "matmul"]
