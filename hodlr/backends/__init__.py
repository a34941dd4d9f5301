"""The backend registry: one module per backend, all with the same signature.

A backend module defines

``DESCRIPTION`` : str
    One line saying what it computes with.
``unavailable_reason(library, device) -> str | None``
    ``None`` if it can run on arrays of that library (``"numpy"`` / ``"torch"``) and
    device, else why not.
``matmul(level_scales, log_decay, x)``
    ``level_scales (*batch, T, L)``, ``log_decay (*batch, T)`` or ``None``,
    ``x (*batch, T, D)`` -> ``(*batch, T, D)``.
``attention(q, k, v, level_scales, log_decay, scale)``
    ``q, k (*batch, T, Dk)``, ``v (*batch, T, Dv)``, ``scale`` a float -> ``(*batch, T, Dv)``.

``attention_state(q, k, v, level_scales, log_decay, scale, initial_state, initial_positions, cu_seqlens, output_final_state)`` (optional)
    Attention that continues from a recurrent state and/or runs packed sequences, on the
    layout of ``hodlr.kernels.attention``: ``q, k (N, Hqk, T, Dk)``, ``v (N, H, T, Dv)``
    (``Hqk`` divides ``H``; head ``h`` reads head ``h // (H // Hqk)`` of ``q`` and ``k``),
    ``level_scales (N, H, T, L)``, ``log_decay (N, H, T)`` or ``None``, ``initial_state
    (Nseq, H, S, Dk, Dv)`` with ``initial_positions (Nseq,)`` (int64) or both ``None``,
    ``cu_seqlens (Nseq + 1,)`` or ``None`` (then ``Nseq = N``; with it ``N = 1``) ->
    ``o (N, H, T, Dv)``, or with ``output_final_state`` ``(o, (states (Nseq, H, S', Dk, Dv),
    positions (Nseq,)))`` where ``S' >= S`` holds every end position.  Positions continue:
    token ``i`` of sequence ``n`` is at ``initial_positions[n] + i`` (docs/models.md).  torch
    only, differentiable in every floating input.  Defined by ``chunked``, ``fenwick`` and
    ``triton``.

:func:`hodlr.log_linear_attn` calls ``attention_state`` for every call with an initial state,
a final state or ``cu_seqlens``.  A backend without it serves the calls with neither state
(packed sequences by one ``attention`` call per sequence) and refuses the others with
:class:`hodlr.BackendUnavailableError`.

``gated_delta_attention(q, k, v, beta, level_scales, log_decay, scale)`` (optional)
    Log-linear Gated DeltaNet (:func:`hodlr.gated_delta_attention`): the layout of
    ``attention`` plus ``beta (*batch, T)`` -> ``(*batch, T, Dv)``.  Defined by ``dense``,
    ``fenwick`` and ``chunked``; the others are refused by name.  ``fenwick`` and ``chunked``
    also take the keywords ``state`` (``(*batch, S, Dk, Dv)``, the bucket states of the first
    token's absolute position, slot ``l - 1`` = level ``l``), ``position`` (that position) and
    ``final_state`` (also return the bucket states after the last token):
    :func:`hodlr.log_linear_gated_delta_rule` runs state hand-off and packed sequences through
    them, one call per start position.

The public functions :func:`hodlr.matmul`, :func:`hodlr.attention` and
:func:`hodlr.gated_delta_attention` validate the inputs
and broadcast every batch shape to one common ``batch`` (as views, no copies) before a
backend sees them, so backends never validate.

``backend="auto"`` picks the first rule that matches and whose backend can run:

1. torch tensors on a CUDA device: ``triton``, then ``chunked``;
2. ``T <= 256``: ``dense`` (fastest for small masks);
3. torch tensors: ``chunked``, then ``recursive``;
4. numpy arrays: ``recursive``.

For ``gated_delta_attention`` a pick without it (``triton``, ``recursive``) is replaced by
``chunked`` (torch) or ``fenwick`` (numpy).
"""

from __future__ import annotations

import importlib
import sys
import types

from hodlr.errors import BackendUnavailableError

__all__ = ["NAMES", "auto_backend", "get", "has_state", "info"]

NAMES = ("dense", "sparse", "recursive", "fenwick", "chunked", "triton")
"""Every backend name, in the order :func:`hodlr.backends` lists them."""

AUTO_DENSE_MAX_T = 256


def _load(name: str):
    try:
        return importlib.import_module(f"hodlr.backends.{name}")
    except ModuleNotFoundError as err:
        if err.name == f"hodlr.backends.{name}":
            return None
        raise


def get(name: str, library: str, device) -> object:
    """The backend module ``name``, checked to run on ``library`` / ``device``."""
    if not isinstance(name, str):
        raise TypeError(f"backend must be a string, one of {('auto',) + NAMES}, got {type(name).__name__}")
    if name not in NAMES:
        raise ValueError(f"unknown backend {name!r}; known backends: {', '.join(('auto',) + NAMES)}")
    module = _load(name)
    if module is None:
        raise BackendUnavailableError(f"backend {name!r} is not implemented in this version of hodlr")
    reason = module.unavailable_reason(library, device)
    if reason is not None:
        raise BackendUnavailableError(f"backend {name!r} cannot run on {library} arrays on {device}: {reason}")
    return module


def has_state(module) -> bool:
    """Whether the backend module defines the optional ``attention_state`` (see above)."""
    return callable(getattr(module, "attention_state", None))


def auto_backend(library: str, device, T: int) -> str:
    """The name ``backend="auto"`` resolves to (rules in the module docstring)."""
    cuda = library == "torch" and getattr(device, "type", str(device)) == "cuda"
    if cuda:
        candidates = ["triton", "chunked"]
    elif T <= AUTO_DENSE_MAX_T:
        candidates = ["dense"]
    elif library == "torch":
        candidates = ["chunked", "recursive"]
    else:
        candidates = ["recursive"]
    for name in candidates + ["dense"]:
        module = _load(name)
        if module is not None and module.unavailable_reason(library, device) is None:
            return name
    raise BackendUnavailableError(f"no backend can run on {library} arrays on {device}")


def info() -> dict:
    """``{name: {"description", "numpy", "torch_cpu", "torch_cuda"}}``: each entry of the
    last three is ``True`` or the reason the backend cannot run there."""
    out = {}
    for name in NAMES:
        module = _load(name)
        if module is None:
            out[name] = {"description": "not implemented", "numpy": "not implemented",
                         "torch_cpu": "not implemented", "torch_cuda": "not implemented"}
            continue
        entry = {"description": module.DESCRIPTION}
        for key, library, device in (("numpy", "numpy", "cpu"), ("torch_cpu", "torch", "cpu"),
                                     ("torch_cuda", "torch", "cuda")):
            reason = module.unavailable_reason(library, device)
            entry[key] = True if reason is None else reason
        out[name] = entry
    return out


class _Registry(types.ModuleType):
    """This module is also the function ``hodlr.backends()``: ``hodlr.backends`` is one
    object whether reached as the package attribute or as ``import hodlr.backends``, so
    ``hodlr.backends()`` and ``hodlr.backends.NAMES`` both work."""

    def __call__(self) -> dict:
        """Every backend, what it computes with, and whether it can run here.

        Returns ``{name: {"description": str, "numpy": True | reason, "torch_cpu": ...,
        "torch_cuda": ...}}`` (see :func:`info`).
        """
        return info()


sys.modules[__name__].__class__ = _Registry
