"""The documented error types of hodlr.

Every bad input raises a ``ValueError`` or ``TypeError`` that names the argument, what it
got and what it wanted.  The subclasses below let callers catch one family.
"""

__all__ = ["BackendUnavailableError", "DenseTooLargeError", "RankExceededError"]


class BackendUnavailableError(ValueError):
    """The backend exists but cannot run here (missing package, no GPU, wrong array type)."""


class DenseTooLargeError(ValueError):
    """A dense ``T x T`` array would exceed ``hodlr.options.dense_max_bytes``."""


class RankExceededError(ValueError):
    """A block's numerical rank exceeds the rank asked of a HODLR compression."""
