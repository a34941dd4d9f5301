"""The backend registry: one module per backend, all with the same signatures.

A backend module defines

``DESCRIPTION`` : str
    One line saying what it computes with.
``unavailable_reason(library, device) -> str | None``
    ``None`` if it can run on arrays of that library (``"numpy"`` / ``"torch"``) and
    device, else why not.

and any of the operations of :data:`OPS` (a module that lacks one does not offer it):

``matmul(level_scales, log_decay, x)``
    ``level_scales (*batch, T, L)``, ``log_decay (*batch, T)`` or ``None``,
    ``x (*batch, T, D)`` -> ``(*batch, T, D)``.
``attention(q, k, v, level_scales, log_decay, scale)``
    ``q, k (*batch, T, Dk)``, ``v (*batch, T, Dv)``, ``scale`` a float -> ``(*batch, T, Dv)``.
``gated_delta_attention(q, k, v, beta, level_scales, log_decay, scale)``
    Log-linear Gated DeltaNet (:func:`hodlr.gated_delta_attention`): the layout of
    ``attention`` plus ``beta (*batch, T)`` -> ``(*batch, T, Dv)``.  Offered by ``dense``,
    ``fenwick``, ``chunked`` and ``triton``.  ``fenwick`` and ``chunked`` also take the keywords ``state``
    (``(*batch, S, Dk, Dv)``, the bucket states of the first token's absolute position, slot
    ``l - 1`` = level ``l``), ``position`` (that position) and ``final_state`` (also return the
    bucket states after the last token): :func:`hodlr.log_linear_gated_delta_rule` runs state
    hand-off and packed sequences through them, one call per start position (packed sequences
    without state as one call, see ``PACKED_AS_ONE_STREAM``).

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

``max_key_width(op) -> int | None`` (optional)
    The widest key head ``Dk`` the module's ``op`` takes (None: any); ``backend="auto"`` passes
    over a backend whose limit a call exceeds (``triton``'s Gated DeltaNet kernels take
    ``Dk <= 128``), and the backend itself refuses such a call with a ``ValueError``.

``takes_dtype(dtype) -> bool`` (optional)
    Whether the module computes with inputs of ``dtype`` (absent: every floating dtype);
    ``backend="auto"`` passes over a backend that does not (``triton`` takes float64 only under
    Triton's interpreter).

``GATED_DELTA_STATE`` : bool (optional)
    True where the module's ``gated_delta_attention`` takes the keywords ``state``, ``position``
    and ``final_state`` (``fenwick``, ``chunked``).

``PACKED_AS_ONE_STREAM`` : bool (optional)
    True where the module's ``gated_delta_attention`` costs about linearly in ``T`` (``chunked``,
    ``triton``): :func:`hodlr.log_linear_gated_delta_rule` runs packed sequences without state as
    one call over an aligned stream (``hodlr.ops.stream_layout``) instead of one call each.

``gated_delta_with_state(q, k, v, beta, level_scales, log_decay, scale, state=None, position=0) -> (o, states)`` (optional)
    A backend whose state takes no gradient (``triton``) may still run calls with state without
    one: from the bucket states ``state`` of ``position`` (None: none), returning the final ones
    (as ``chunked``'s ``final_state``); :func:`hodlr.log_linear_gated_delta_rule` runs the calls
    with state and no gradient with it and refuses the backend for those with a gradient.

``CHECKS_MASK`` : bool (optional)
    True where the module's ``matmul``, ``attention`` and ``gated_delta_attention`` also take the
    keyword ``check``: a zeroed one-element int32 device tensor (or ``None``) that their kernels
    set to 1 if a level scale that is read or a log-decay is NaN or infinite, as they read them.
    A CUDA mask is then validated by the computation itself instead of a check kernel of its
    own (``triton``).

``READS_16_BIT_MASKS`` : bool (optional)
    True where the module computes with float16 / bfloat16 level scales and log-decays as they are
    (in float32 accumulation: ``triton``).  Every other backend computes in its generators'
    dtype, so the public calls hand it a 16-bit mask's generators cast to float32.

``USES_KERNELS`` : bool (optional)
    True where the module computes with the Triton kernels of :mod:`hodlr.kernels` (``triton``).
    Work done beside a call on its inputs (the bucket states and carried reads of
    :mod:`hodlr.distributed`) then runs on those kernels too, and on torch operations otherwise.

The public functions :func:`hodlr.matmul`, :func:`hodlr.attention` and
:func:`hodlr.gated_delta_attention` validate the inputs and broadcast every batch shape to one common ``batch`` (as views, no copies) before a
backend sees them, so backends never validate.

``backend="auto"`` picks the first rule that matches and whose backend offers the operation
and can run:

1. torch tensors on a CUDA device: ``triton``, then ``chunked``;
2. a small whole problem, ``T <= 256`` and at most ``2^22`` mask entries over the call's batch
   (``masks · T² <= AUTO_DENSE_MAX_ENTRIES``): ``dense`` (fastest there; a large batch of short
   masks goes to rule 3, where ``dense`` would be slower or exceed ``options.dense_max_bytes``);
3. torch tensors: ``chunked``, then ``recursive``;
4. numpy arrays: ``recursive``, then ``fenwick`` (Gated DeltaNet, which ``recursive`` lacks, runs
   on ``fenwick`` in ``O(T log T)``, not on the quadratic ``dense``);

then any backend that offers the operation, in the order of :data:`NAMES`; a backend whose
``max_key_width`` the call's keys exceed, or whose ``takes_dtype`` refuses its inputs' dtype, is
passed over (so Gated DeltaNet with ``Dk > 128``, and float64 inputs, on a GPU run ``chunked``).
"""

from __future__ import annotations

import importlib

from hodlr.errors import BackendUnavailableError

__all__ = ["AUTO_DENSE_MAX_ENTRIES", "AUTO_DENSE_MAX_T", "NAMES", "OPS", "WHERE", "auto_backend", "get", "has_state", "info", "keeps_state",
           "load", "offers", "pad_rows", "scatter_rows", "stateful", "takes_dtype", "takes_keys"]

NAMES = ("dense", "sparse", "recursive", "fenwick", "chunked", "triton")
"""Every backend name, in the order :func:`info` lists them."""

OPS = ("matmul", "attention", "gated_delta_attention")
"""Every operation a backend module may define."""

WHERE = {"numpy": ("numpy", "cpu"), "torch_cpu": ("torch", "cpu"), "torch_cuda": ("torch", "cuda")}
"""The places :func:`info` reports on: key -> ``(library, device)``."""

AUTO_DENSE_MAX_T = 256
"""The longest mask ``backend="auto"`` computes densely (rule 2 of the module docstring)."""

AUTO_DENSE_MAX_ENTRIES = 1 << 22
"""The most mask entries (``masks · T²`` over a call's batch) ``backend="auto"`` computes densely."""


def _check_name(name) -> str:
    if not isinstance(name, str):
        raise TypeError(f"backend must be a string, one of {('auto',) + NAMES}, got {type(name).__name__}")
    if name not in NAMES:
        raise ValueError(f"unknown backend {name!r}; known backends: {', '.join(('auto',) + NAMES)}")
    return name


def _check_op(op) -> str:
    if op not in OPS:
        raise ValueError(f"op must be one of {', '.join(OPS)}, got {op!r}")
    return op


def load(name: str):
    """The module of backend ``name`` (every name of :data:`NAMES` has one: a missing
    module is an installation error and raises ``ModuleNotFoundError``)."""
    return importlib.import_module(f"hodlr.backends.{_check_name(name)}")


def offers(module, op: str) -> bool:
    """Does the backend ``module`` define the operation ``op``?"""
    return callable(getattr(module, _check_op(op), None))


def get(name: str, library: str, device, *, op: str):
    """The module of backend ``name``, checked to define ``op`` and to run on ``library``
    (``"numpy"`` / ``"torch"``) arrays on ``device``.

    Raises
    ------
    BackendUnavailableError
        If the backend does not define ``op``, or cannot run there (the message says why).
    ValueError, TypeError
        For an unknown backend name or operation.
    """
    _check_op(op)
    module = load(name)
    if not offers(module, op):
        have = [n for n in NAMES if offers(load(n), op)]
        raise BackendUnavailableError(
            f"backend {name!r} does not offer {op}; backends that do: {', '.join(have) or 'none'}"
        )
    reason = module.unavailable_reason(library, device)
    if reason is not None:
        raise BackendUnavailableError(f"backend {name!r} cannot run on {library} arrays on {device}: {reason}")
    return module


def takes_keys(module, op: str, key_width: int) -> bool:
    """Whether the backend ``module``'s ``op`` takes key heads ``key_width`` wide (its optional
    ``max_key_width``)."""
    limit = getattr(module, "max_key_width", None)
    widest = None if limit is None else limit(op)
    return widest is None or key_width <= widest


def takes_dtype(module, dtype) -> bool:
    """Whether the backend ``module`` computes with inputs of ``dtype`` (its optional
    ``takes_dtype``; None: any)."""
    check = getattr(module, "takes_dtype", None)
    return dtype is None or check is None or check(dtype)


def has_state(module) -> bool:
    """Whether the backend module defines the optional ``attention_state`` (see above)."""
    return callable(getattr(module, "attention_state", None))


def keeps_state(module, op: str) -> bool:
    """Whether the backend module carries ``op``'s recurrent state: ``attention_state`` for
    ``attention``, ``GATED_DELTA_STATE`` for ``gated_delta_attention`` (see above)."""
    if _check_op(op) == "gated_delta_attention":
        return offers(module, op) and getattr(module, "GATED_DELTA_STATE", False)
    return has_state(module)


def stateful(op: str) -> list:
    """The names of the backends that carry ``op``'s recurrent state (:func:`keeps_state`), in the
    order of :data:`NAMES`."""
    return [name for name in NAMES if keeps_state(load(name), op)]



def auto_backend(library: str, device, T: int, *, op: str, key_width: int = 0, masks: int = 1, dtype=None) -> str:
    """The name ``backend="auto"`` resolves to for ``op`` on keys ``key_width`` wide over a batch of
    ``masks`` masks of length ``T``, inputs of ``dtype`` (None: not checked; rules in the module
    docstring)."""
    _check_op(op)
    cuda = library == "torch" and getattr(device, "type", str(device)) == "cuda"
    if cuda:
        candidates = ["triton", "chunked"]
    elif T <= AUTO_DENSE_MAX_T and masks * T * T <= AUTO_DENSE_MAX_ENTRIES:
        candidates = ["dense"]
    elif library == "torch":
        candidates = ["chunked", "recursive"]
    else:
        candidates = ["recursive", "fenwick"]
    for name in candidates + [n for n in NAMES if n not in candidates]:
        module = load(name)
        if offers(module, op) and module.unavailable_reason(library, device) is None and takes_keys(
                module, op, key_width) and takes_dtype(module, dtype):
            return name
    raise BackendUnavailableError(f"no backend can run {op} on {library} arrays on {device}")


def grouped_heads(q, k, v, level_scales, log_decay):
    """5-d views ``(N, Hqk, G, T, ·)`` of the ``attention_state`` layout for a backend's
    ``attention``: ``q`` and ``k`` broadcast over the ``G = H // Hqk`` heads of each group (no
    copies; the gradient of a broadcast view sums over its group)."""
    Hqk, grp = q.shape[1], v.shape[1] // q.shape[1]
    q5, k5 = (x.unsqueeze(2).expand(x.shape[0], Hqk, grp, *x.shape[2:]) for x in (q, k))
    v5, lam5 = (x.unflatten(1, (Hqk, grp)) for x in (v, level_scales))
    g5 = None if log_decay is None else log_decay.unflatten(1, (Hqk, grp))
    return q5, k5, v5, lam5, g5


def grouped_delta_heads(q, k, v, beta, level_scales, log_decay):
    """:func:`grouped_heads` with the write strengths ``beta (N, H, T)`` seen as ``(N, Hqk, G, T)``,
    in the order of a backend's ``gated_delta_attention``: ``(q5, k5, v5, beta5, lam5, g5)``."""
    q5, k5, v5, lam5, g5 = grouped_heads(q, k, v, level_scales, log_decay)
    return q5, k5, v5, beta.unflatten(1, (q.shape[1], v.shape[1] // q.shape[1])), lam5, g5


def _in_memory_order(x, dim: int, rebuild):
    """``rebuild(y, at)`` of ``y``, ``x`` permuted to its memory order (dims by decreasing stride,
    broadcast ones last: contiguous or nearly, whatever layout ``x`` is a view of, e.g. the
    ``(B, T, H, D)`` operator layout read as ``(N, H, T, D)``), ``at`` where ``dim`` went; the
    result permuted back."""
    order = sorted(range(x.dim()), key=lambda d: (-x.stride(d), d))
    y = rebuild(x.permute(order), order.index(dim % x.dim()))
    return y.permute([order.index(d) for d in range(x.dim())])


def pad_rows(x, dim: int, before: int):
    """``x`` with ``before`` zero entries ahead of its own along ``dim``, laid out in ``x``'s memory
    order (a copy that reads and writes whole rows as they lie, where padding the view itself
    would gather them across the memory; kernels take any strides), its broadcast dims broadcast
    still."""
    import torch

    if before == 0:
        return x
    dim %= x.dim()
    shape = list(x.shape)
    shape[dim] += before
    # a broadcast dim (stride 0: the heads of a query group) is padded once and broadcast again, so
    # that it stays outermost instead of becoming a copied, innermost one
    broadcast = [d for d in range(x.dim()) if d != dim and x.stride(d) == 0 and x.shape[d] > 1]
    for d in broadcast:
        x = x.narrow(d, 0, 1)
    y = _in_memory_order(x, dim, lambda y, at: torch.nn.functional.pad(y, (0, 0) * (y.dim() - 1 - at) + (before, 0)))
    return y.expand(shape) if broadcast else y


def scatter_rows(x, dim: int, index, size: int):
    """A tensor of ``size`` entries along ``dim``, zero but for entry ``index[i]``, which is ``x``'s
    entry ``i`` (``index`` a 1-d int64 tensor on ``x``'s device), laid out in ``x``'s memory order
    (one fill and one scatter of whole rows); differentiable in ``x``."""
    def rebuild(y, at):
        shape = list(y.shape)
        shape[at] = size
        return y.new_zeros(shape).index_copy(at, index, y)

    return _in_memory_order(x, dim, rebuild)


def _environment() -> dict:
    """``{key of WHERE: None | why nothing runs there on this machine}``."""
    try:
        import torch
    except ImportError:
        missing = "torch is not installed (pip install torch)"
        return {"numpy": None, "torch_cpu": missing, "torch_cuda": missing}

    cuda = None if torch.cuda.is_available() else "no CUDA device here (torch.cuda.is_available() is False)"
    return {"numpy": None, "torch_cpu": None, "torch_cuda": cuda}


def info() -> dict:
    """Every backend, what it computes with, the operations it offers and where each can
    run here.

    Returns
    -------
    dict
        ``{name: {"description": str, "ops": {op: {"numpy": v, "torch_cpu": v,
        "torch_cuda": v}}}}`` for every name of :data:`NAMES`; ``"ops"`` holds the
        operations of :data:`OPS` that the backend offers, and ``v`` is ``True`` or the
        reason it cannot run there: torch is not installed, there is no CUDA device, or the
        backend's own reason.

    Examples
    --------
    >>> from hodlr import backends
    >>> backends.info()["dense"]["ops"]["matmul"]["numpy"]
    True
    """
    here = _environment()
    out = {}
    for name in NAMES:
        module = load(name)
        where = {}
        for key, (library, device) in WHERE.items():
            reason = here[key] if here[key] is not None else module.unavailable_reason(library, device)
            where[key] = True if reason is None else reason
        ops = {op: dict(where) for op in OPS if offers(module, op)}
        out[name] = {"description": module.DESCRIPTION, "ops": ops}
    return out
