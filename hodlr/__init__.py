"""hodlr: the structured (HODLR) matrices behind log-linear attention.

>>> import numpy as np, hodlr
>>> T = 8
>>> M = hodlr.LogLinearMask(np.ones((T, hodlr.num_levels(T))))
>>> M.to_dense().shape
(8, 8)
"""

from __future__ import annotations

import importlib

from hodlr.fenwick import level, num_levels
from hodlr.api import attention, backends, gated_delta_attention, gated_delta_matrix, matmul
from hodlr.errors import BackendUnavailableError, DenseTooLargeError, RankExceededError
from hodlr.mask import LogLinearMask
from hodlr.options import options

__version__ = "0.1.0"

_LAZY = {
    "HODLRMatrix": "hodlr.tree",
    "LogLinearState": "hodlr.state",
    "log_linear_attn": "hodlr.ops",
    "log_linear_attn_step": "hodlr.ops",
    "log_linear_gated_delta_rule": "hodlr.ops",
    "spy": "hodlr.plotting",
    "heatmap": "hodlr.plotting",
    "plot_buckets": "hodlr.plotting",
    "rank_profile": "hodlr.display",
    "symbolic": None,
    "testing": None,
}

__all__ = [
    "BackendUnavailableError",
    "DenseTooLargeError",
    "LogLinearMask",
    "RankExceededError",
    "attention",
    "backends",
    "gated_delta_attention",
    "gated_delta_matrix",
    "level",
    "matmul",
    "num_levels",
    "options",
    *_LAZY,
]


def __getattr__(name):
    if name in _LAZY:
        module_name = _LAZY[name]
        if module_name is None:
            return importlib.import_module(f"hodlr.{name}")
        return getattr(importlib.import_module(module_name), name)
    raise AttributeError(f"module 'hodlr' has no attribute {name!r}")
