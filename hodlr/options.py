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
        Largest total size of the dense ``T x T`` intermediates that ``to_dense`` and the
        ``dense`` backend may allocate; larger requests raise
        :class:`hodlr.errors.DenseTooLargeError` before allocating.  Default 2 GiB, or the
        environment variable ``HODLR_DENSE_MAX_BYTES``.
    """

    dense_max_bytes: int = int(os.environ.get("HODLR_DENSE_MAX_BYTES", 2 * 2**30))


options = Options()
