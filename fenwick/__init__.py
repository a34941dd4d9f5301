"""fenwick: the index algebra of log-linear attention and its O(log T)-state scan.

Knows nothing of ``hodlr`` or ``kernels``; needs only numpy (torch tensors are accepted
where documented, and torch is imported only when one is passed in).
"""

from .index import (
    NO_LEVEL,
    Block,
    aligned,
    blocks_at_level,
    bucket,
    buckets,
    level,
    level_matrix,
    num_blocks,
    num_levels,
    num_slots,
    offdiag_blocks,
    read_levels,
    reads,
)
from .delta import GatedDeltaState
from .scan import FenwickState, live_levels

__all__ = [
    "FenwickState",
    "GatedDeltaState",
    "NO_LEVEL",
    "Block",
    "aligned",
    "blocks_at_level",
    "bucket",
    "buckets",
    "level",
    "level_matrix",
    "live_levels",
    "num_blocks",
    "num_levels",
    "num_slots",
    "offdiag_blocks",
    "read_levels",
    "reads",
]
