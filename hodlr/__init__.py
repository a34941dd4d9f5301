"""hodlr: the structured (HODLR) matrices behind log-linear attention.

>>> import numpy as np, hodlr
>>> T = 8
>>> M = hodlr.LogLinearMask(np.ones((T, hodlr.num_levels(T))))
>>> M.to_dense().shape
(8, 8)

``import hodlr`` imports numpy and nothing heavier: scipy, sympy, hypothesis, matplotlib,
torch and triton are imported by the functions that need them, and the names below marked
lazy (``HODLRMatrix``, the pictures, ``rank_profile``, ``kernels``, ``nn``, ``symbolic``,
``testing``) are imported on first use.
"""

from hodlr import backends, errors, fenwick
from hodlr.api import attention, gated_delta_attention, gated_delta_matrix, matmul
from hodlr.backends import info as backend_info
from hodlr.errors import BackendUnavailableError, DenseTooLargeError, LevelsExceededError, RankExceededError
from hodlr.fenwick import level, num_levels
from hodlr.mask import LogLinearMask
from hodlr.options import options

__version__ = "0.1.0"

_LAZY = {
    "HODLRMatrix": "hodlr.tree",
    "LogLinearState": "hodlr.state",
    "log_linear_attn": "hodlr.ops",
    "log_linear_attn_step": "hodlr.ops",
    "log_linear_gated_delta_rule": "hodlr.ops",
    "log_linear_gated_delta_step": "hodlr.ops",
    "spy": "hodlr.plotting",
    "heatmap": "hodlr.plotting",
    "plot_buckets": "hodlr.plotting",
    "rank_profile": "hodlr.display",
    "distributed": None,
    "kernels": None,
    "nn": None,
    "symbolic": None,
    "testing": None,
}
"""Names imported on first use: ``{name: module holding it}``, ``None`` for a submodule."""

__all__ = [
    "BackendUnavailableError",
    "DenseTooLargeError",
    "LevelsExceededError",
    "LogLinearMask",
    "RankExceededError",
    "attention",
    "backend_info",
    "backends",
    "errors",
    "fenwick",
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
        import importlib

        module_name = _LAZY[name]
        if module_name is None:
            return importlib.import_module(f"hodlr.{name}")
        return getattr(importlib.import_module(module_name), name)
    raise AttributeError(f"module 'hodlr' has no attribute {name!r}")


def __dir__():
    """The public names (``__all__``): the modules hodlr is built from (``hodlr.api``,
    ``hodlr.mask``, ...) stay importable by name but are not its interface."""
    return sorted(__all__) + sorted(n for n in globals() if n.startswith("__") and n.endswith("__"))
