"""The documented error types of hodlr.

Every bad input raises a ``ValueError`` or ``TypeError`` that names the argument, what it
got and what it wanted.  The subclasses below let callers catch one family.
"""

from __future__ import annotations

__all__ = ["BackendUnavailableError", "DenseTooLargeError", "LevelsExceededError", "RankExceededError"]


class BackendUnavailableError(ValueError):
    """The backend exists but cannot run here (missing package, no GPU, wrong array type)."""


class DenseTooLargeError(ValueError):
    """A dense ``T x T`` array would exceed ``hodlr.options.dense_max_bytes``."""


class LevelsExceededError(ValueError):
    """Level scales with fewer columns than a call's positions read: a sequence that reaches
    absolute position ``end - 1`` needs ``need = num_levels(end)`` columns and ``levels`` were
    given; ``continued`` is the largest position a state continued from (None without a state)."""

    def __init__(self, message: str, *, end: int, need: int, levels: int, continued: int | None = None):
        super().__init__(message)
        self.end, self.need, self.levels, self.continued = end, need, levels, continued


class RankExceededError(ValueError):
    """A block's numerical rank exceeds the rank asked of a HODLR compression."""
