"""Global, user-settable options of hodlr."""

from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = ["options"]


@dataclass
class Options:
    """Settings read at call time.

    Attributes
    ----------
    dense_max_bytes : int
        Most bytes that ``to_dense`` and the ``dense`` backend may hold at once: the dense
        ``(*batch, T, T)`` arrays of the operation (the mask; for attention also the scores
        and their product) plus the temporaries of assembling the mask, which is built a
        slab of rows at a time.  A call that would need more raises
        :class:`hodlr.errors.DenseTooLargeError` before allocating.  Default 2 GiB, or the
        environment variable ``HODLR_DENSE_MAX_BYTES``.
    attention_save_states : bool
        The ``triton`` backend's differentiable attention keeps the forward's chunk-state
        hierarchy for the backward instead of recomputing it (``docs/backward.md`` §6): a faster
        backward for about ``8 Dk Dv / C`` more bytes a token and head held from the forward to
        the backward (float32 states: 512 at ``Dk = Dv = 64``, 2,048 at 128, the chunk
        ``C = 64``).  Read by ``hodlr.attention`` (when it runs) and ``hodlr.log_linear_attn`` on its
        common path (no state, no packed sequences), eager and under ``torch.compile``, where it is
        read while tracing (an argument of the operator: a compiled function retraces when it
        changes).  False recomputes the same states.  Default True.
    gated_delta_save_states : bool
        The ``triton`` backend's differentiable log-linear Gated DeltaNet keeps the forward's
        chunk products and hierarchy (``X``, ``W``, the states and transitions) for the backward
        instead of recomputing them (``docs/kernels.md`` §7.2; forward + backward 5 – 9% faster on
        an H200): ``4 (C + Dk) + 4 Dk (Dk + Dv) / C`` more bytes a token and head for bfloat16
        inputs (1,408 at ``Dk = Dv = 64``, 4,736 at 128, the chunk ``C = 32``; for float16 and float32
        inputs ``8 Dk (Dk + Dv) / C`` for the hierarchy) held from the forward to the backward, per
        layer: 2.3 GiB for a layer of 65,536 tokens and 8 heads of width 128.  Read by
        ``hodlr.gated_delta_attention`` (when it runs) and ``hodlr.log_linear_gated_delta_rule``,
        eager and under ``torch.compile`` on its path without state or packed sequences, where it
        is read while tracing (an argument of the operator: a compiled function retraces when it
        changes).  False recomputes the same values.  Default True.
        Either option set to anything but a bool is refused (``TypeError``) by the calls that read
        it.
    """

    dense_max_bytes: int = int(os.environ.get("HODLR_DENSE_MAX_BYTES", 2 * 2**30))
    attention_save_states: bool = True
    gated_delta_save_states: bool = True


options = Options()


def flag(name: str) -> bool:
    """The boolean option ``name`` of :data:`options`, refused with a ``TypeError`` naming it if it
    has been set to anything but a bool."""
    value = getattr(options, name)
    if not isinstance(value, bool):
        raise TypeError(f"hodlr.options.{name} must be a bool, got {type(value).__name__}")
    return value
