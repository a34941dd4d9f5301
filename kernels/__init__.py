"""Triton kernels for the log-linear (HODLR) mask: chunked attention, matmul and log-linear Gated
DeltaNet, forward and backward (imported as ``hodlr.kernels``).

Imports ``hodlr.fenwick`` only (never the rest of ``hodlr``). The public functions
:func:`attention`, :func:`matmul` and :func:`gated_delta` are differentiable (``torch.autograd``);
the launchers without autograd are :func:`attention_forward` / :func:`matmul_forward` /
:func:`gated_delta_forward` and :func:`attention_backward` / :func:`matmul_backward` /
:func:`gated_delta_backward` (and, for attention calls with a recurrent state, packed sequences, a
final state or grouped heads, :func:`attention_state_forward` / :func:`attention_state_backward`).
:func:`bucket_states` sums key-value products over Fenwick buckets (what a rank sends in context
parallelism); :func:`carried_reads` adds the reads of such a state by a shard at an aligned position
(what a rank does with what it receives). They take torch tensors with any strides and run on CUDA,
and on the CPU under ``TRITON_INTERPRET=1`` (which must be set before this package is first
imported: ``@triton.jit`` reads it when a kernel is defined; :func:`interpreting` says which way the
kernels were built). See ``docs/kernels.md`` for the algorithm, the chunk-state layout and the FLOP
/ byte floor.
"""

from ._layout import DEFAULT_CHUNK, interpreting
from .attention import attention_forward, attention_state_forward
from .attention_backward import attention_backward, attention_state_backward
from .autograd import attention, bucket_states, carried_reads, gated_delta, matmul
from .gated_delta import gated_delta_forward
from .gated_delta_backward import gated_delta_backward
from .matmul import matmul_forward
from .matmul_backward import matmul_backward

__all__ = ["DEFAULT_CHUNK", "attention", "attention_backward", "attention_forward", "attention_state_backward",
           "attention_state_forward", "bucket_states", "carried_reads", "gated_delta", "gated_delta_backward",
           "gated_delta_forward", "interpreting", "matmul", "matmul_backward", "matmul_forward"]
