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
        instead of recomputing them (``docs/kernels.md`` §7.2, measured in §7.4): a faster backward for ``4 (C + Dk) + 4 Dk (Dk + Dv) / C`` more bytes a token and head for bfloat16
        inputs (1,408 at ``Dk = Dv = 64``, 4,736 at 128, the chunk ``C = 32``; for float16 and float32
        inputs ``8 Dk (Dk + Dv) / C`` for the hierarchy) held from the forward to the backward, per
        layer: 2.3 GiB for a layer of 65,536 tokens and 8 heads of width 128.  Read by
        ``hodlr.gated_delta_attention`` (when it runs) and ``hodlr.log_linear_gated_delta_rule``,
        eager and under ``torch.compile`` on its path without state or packed sequences, where it
        is read while tracing (an argument of the operator: a compiled function retraces when it
        changes).  False recomputes the same values.  Default True.

    A value of the wrong type is refused when it is set (``TypeError``: ``dense_max_bytes`` an
    integer ``>= 0``, the others bools; ``ValueError`` for a negative budget), and so is a name
    that is not an option (``AttributeError``).
    """

    dense_max_bytes: int = int(os.environ.get("HODLR_DENSE_MAX_BYTES", 2 * 2**30))
    attention_save_states: bool = True
    gated_delta_save_states: bool = True

    def __setattr__(self, name, value):
        if name not in self.__dataclass_fields__:
            raise AttributeError(f"hodlr.options has no option {name!r}; the options are "
                                 f"{', '.join(self.__dataclass_fields__)}")
        if name == "dense_max_bytes":
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"hodlr.options.dense_max_bytes must be an integer >= 0 (bytes), "
                                f"got {type(value).__name__}")
            if value < 0:
                raise ValueError(f"hodlr.options.dense_max_bytes must be an integer >= 0 (bytes), got {value}")
        elif not isinstance(value, bool):
            raise TypeError(f"hodlr.options.{name} must be a bool, got {type(value).__name__}")
        object.__setattr__(self, name, value)


options = Options()


def flag(name: str) -> bool:
    """The boolean option ``name`` of :data:`options` (a bool: :class:`Options` refuses anything
    else when it is set)."""
    return getattr(options, name)
