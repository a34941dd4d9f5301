"""The fla-compatible ops: ``log_linear_attn`` and ``log_linear_gated_delta_rule`` on
``(B, T, H, D)`` tensors, with recurrent state hand-off, packed sequences and ``torch.compile``
support; ``log_linear_attn_step`` and ``log_linear_gated_delta_step`` for decoding.

A layout and state wrapper over the backends of :mod:`hodlr.backends` (the mathematics is
``hodlr.attention``'s and ``hodlr.gated_delta_attention``'s, see docs/models.md): inputs are
validated here, viewed as ``(B, H, T, D)`` (no copies), and handed to the backend's
``attention_state`` (or ``attention`` for calls without state), or ``gated_delta_attention``.
Under ``torch.compile`` a call goes through the custom operator ``torch.ops.hodlr.log_linear_attn``
or ``torch.ops.hodlr.log_linear_gated_delta_rule`` (fake implementation and autograd registered),
so that a compiled model keeps the op in its graph.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import warnings
from typing import Optional

import numpy as np
import torch

from hodlr import _checks, backends as registry
from hodlr import fenwick
from hodlr._transfer import to_device
from hodlr.errors import BackendUnavailableError, LevelsExceededError
from hodlr.fenwick.arrays import check_bool
from hodlr.options import flag
from hodlr.state import LogLinearState, segments

__all__ = ["log_linear_attn", "log_linear_attn_step", "log_linear_gated_delta_rule", "log_linear_gated_delta_step"]


# ---------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------
def _tensor(name, x, ndim, layout):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {layout}, got {_checks.describe(x)}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have shape {layout}, got shape {tuple(x.shape)}")
    if not x.dtype.is_floating_point or x.dtype.itemsize < 2:  # float8 formats: no arithmetic on them
        raise TypeError(f"{name} must have a floating dtype (float16, bfloat16, float32, float64), got {x.dtype}")


def work_dtype(dtype) -> torch.dtype:
    """The dtype the op computes and keeps its state in: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_static(q, k, v, g, level_scales, initial_state, output_final_state, cu_seqlens, scale,
                  state_name="initial_state"):
    """Every check that needs shapes, dtypes and devices only (no host read); returns
    ``(scale, Nseq, output_final_state)``, the last a Python bool (numpy's taken too).
    ``state_name``: the argument that holds ``initial_state`` (in messages)."""
    _tensor("q", q, 4, "(B, T, Hqk, Dk)")
    _tensor("k", k, 4, "(B, T, Hqk, Dk)")
    _tensor("v", v, 4, "(B, T, H, Dv)")
    _tensor("level_scales", level_scales, 4, "(B, T, H, L)")
    if g is not None:
        _tensor("g", g, 3, "(B, T, H)")
    B, T, Hqk, Dk = q.shape
    H, Dv = v.shape[2], v.shape[3]
    if tuple(k.shape) != tuple(q.shape):
        raise ValueError(f"k must have the shape of q, (B, T, Hqk, Dk) = {tuple(q.shape)}, got {tuple(k.shape)}")
    if tuple(v.shape[:2]) != (B, T):
        raise ValueError(f"v must have shape (B, T, H, Dv) with (B, T) = {(B, T)} (from q), got {tuple(v.shape)}")
    if Hqk < 1 or H < 1:
        raise ValueError(f"q, k and v must have at least one head, got {Hqk} heads of q and k and {H} of v "
                         f"(q: {tuple(q.shape)}, v: {tuple(v.shape)})")
    if H % Hqk:
        raise ValueError(f"the {Hqk} heads of q and k must divide the {H} heads of v "
                         f"(q: {tuple(q.shape)}, v: {tuple(v.shape)})")
    if tuple(level_scales.shape[:3]) != (B, T, H):
        raise ValueError(f"level_scales must have shape (B, T, H, L) with (B, T, H) = {(B, T, H)}, "
                         f"got {tuple(level_scales.shape)}")
    if g is not None and tuple(g.shape) != (B, T, H):
        raise ValueError(f"g must have shape (B, T, H) = {(B, T, H)}, got {tuple(g.shape)}")
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {x.dtype} but q has {q.dtype}; they must match")
    named = {"q": q, "k": k, "v": v, "level_scales": level_scales, "g": g}
    _checks.check_same_home(named)
    if not isinstance(output_final_state, (bool, np.bool_)):
        raise TypeError(f"output_final_state must be a bool, got {_checks.describe(output_final_state)}")
    if scale is None:
        scale = Dk ** -0.5 if Dk else 1.0
    scale = _checks.check_scale(scale)
    Nseq = B if cu_seqlens is None else check_cu_seqlens(cu_seqlens, q, "q")
    if initial_state is not None:
        if not isinstance(initial_state, LogLinearState):
            raise TypeError(f"{state_name} must be a hodlr.LogLinearState, got {type(initial_state).__name__}")
        s = initial_state.states
        want = (Nseq, H, Dk, Dv)
        got = (s.shape[0], s.shape[1], s.shape[3], s.shape[4])
        if got != want:
            raise ValueError(f"{state_name} must have (N, H, Dk, Dv) = {want} "
                             f"({'sequences of cu_seqlens' if cu_seqlens is not None else 'batch of q'}, heads of v, "
                             f"widths of k and v), got states of shape {tuple(s.shape)}")
        if s.dtype != work_dtype(v.dtype):
            raise TypeError(f"{state_name} has dtype {s.dtype} but {v.dtype} inputs need a "
                            f"{work_dtype(v.dtype)} state")
        if s.device != q.device:
            raise ValueError(f"{state_name} is on device {s.device} but q is on {q.device}")
    if initial_state is None and cu_seqlens is None:
        _warn_if_head_first(q)
    return scale, Nseq, bool(output_final_state)


def _warn_if_head_first(q) -> None:
    """Warn (``UserWarning``, as fla's chunked ops do) when ``q (B, T, H, Dk)`` has fewer tokens than
    heads (and at least one): what head-first ``(B, H, T, Dk)`` tensors passed by mistake look like.
    Only calls from outside hodlr are checked (hodlr's layers and context parallelism lay the
    tensors out themselves), and calls that carry a state or packed sequences (decoding steps, short
    continuations) not at all.  The warning names the caller's line."""
    if torch.compiler.is_compiling() or not 0 < q.shape[1] < q.shape[2]:  # (no shape guard while tracing)
        return
    frame, level = sys._getframe(), 1
    while frame.f_back is not None and frame.f_globals.get("__name__", "").partition(".")[0] == "hodlr":
        if frame.f_globals["__name__"] not in ("hodlr.ops", "hodlr._checks"):
            return  # called by another part of hodlr
        frame, level = frame.f_back, level + 1
    warnings.warn(f"q has shape {tuple(q.shape)}: read in the (B, T, H, D) layout that is T={q.shape[1]} tokens "
                  f"of H={q.shape[2]} heads, fewer tokens than heads, as head-first (B, H, T, D) tensors passed "
                  "by mistake would be; pass q.transpose(1, 2) (and k, v, g, beta, level_scales alike) if they "
                  "are head-first", UserWarning, stacklevel=level)


def check_cu_seqlens(cu_seqlens, x, name: str) -> int:
    """The checks of packed sequences that need no host read, against the packed input ``x``
    (``(1, T, ...)``, named ``name`` in messages); returns their number ``N``."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be an integer torch.Tensor of shape (N + 1,), "
                        f"got {_checks.describe(cu_seqlens)}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must be an int32 or int64 tensor, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
        raise ValueError(f"cu_seqlens must have shape (N + 1,) with N >= 1 sequences, "
                         f"got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != x.device:
        raise ValueError(f"cu_seqlens is on device {cu_seqlens.device} but {name} is on {x.device}")
    if x.shape[0] != 1:
        raise ValueError(f"with cu_seqlens the batch size must be 1 (sequences packed along T), got B={x.shape[0]} "
                         f"({name} of shape {tuple(x.shape)})")
    return cu_seqlens.shape[0] - 1


def check_cu_seqlens_values(cu_seqlens, T: int, name: str = "q") -> None:
    """The checks of packed sequences that read ``cu_seqlens`` on the host (a tensor, or the list a
    caller read already): from 0, non-decreasing, to the ``T`` tokens of ``name``."""
    cu = cu_seqlens.tolist() if isinstance(cu_seqlens, torch.Tensor) else list(cu_seqlens)
    if cu[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got cu_seqlens[0]={cu[0]}")
    for i in range(1, len(cu)):
        if cu[i] < cu[i - 1]:
            raise ValueError(f"cu_seqlens must be non-decreasing, got cu_seqlens[{i - 1}]={cu[i - 1]} > "
                             f"cu_seqlens[{i}]={cu[i]}")
    if cu[-1] != T:
        raise ValueError(f"cu_seqlens must end at T={T} (the tokens of {name}), got cu_seqlens[-1]={cu[-1]}")


def _check_values(N, T, L, cu_seqlens, initial_positions, num_slots=None, state_name="initial_state"):
    """The checks that read ``cu_seqlens`` (a tensor, or its values read once by the caller as a
    list) and the state's positions on the host (``N`` rows of ``T`` tokens); returns the largest
    end position."""
    if cu_seqlens is not None:
        check_cu_seqlens_values(cu_seqlens, T)
    if cu_seqlens is None and initial_positions is None:  # N rows from position 0 (no host work)
        return _check_end(T if N else 0, L, None, 0)
    _, _, length, start = segments(N, T, cu_seqlens, initial_positions)
    if start.size and start.min() < 0:
        raise ValueError(f"{state_name}.positions must be >= 0, got {int(start.min())}")
    if num_slots is not None and start.size and fenwick.num_slots(int(start.max())) > num_slots:
        raise ValueError(f"{state_name} has {num_slots} slots but position {int(start.max())} needs "
                         f"{fenwick.num_slots(int(start.max()))}")
    # only sequences with tokens read level scales (an empty one passes its state through)
    reading = length > 0
    _check_end(int((start + length)[reading].max(initial=0)), L, initial_positions,
               int(start[reading].max()) if reading.any() else 0)
    return int((start + length).max(initial=0))


def _check_end(end, L, initial_positions, continued):
    """``end`` (the largest end position), after refusing level scales with too few columns for it
    (``continued``: the largest position a state continues from, for the message)."""
    if end >= 1:
        need = fenwick.num_levels(end)
        if L < need:
            where = "" if initial_positions is None else f" (the state continues from position {continued})"
            raise LevelsExceededError(f"level_scales has L={L} levels but absolute position {end - 1}{where} needs at "
                                      f"least num_levels({end})={need}", end=end, need=need, levels=L,
                                      continued=None if initial_positions is None else continued)
    return end


# ---------------------------------------------------------------------------------------
# the computation on the (N, H, T, D) layout
# ---------------------------------------------------------------------------------------
def _triton_or_chunked(device, dtype=None):
    """What ``"auto"`` runs where only the chunked algorithms will do: ``triton`` on a GPU where it
    is available and takes ``dtype``, else ``chunked`` (a backend module)."""
    return registry.load("triton" if _kernels_on(device, dtype) else "chunked")


def _kernels_on(device, dtype=None) -> bool:
    """Whether ``device`` is a GPU on which the Triton kernels are available (what ``"auto"``
    runs them on), for inputs of ``dtype`` (None: not checked).  While ``torch.compile`` traces
    (the decoding steps), no module is looked up: a GPU there has Triton (inductor needs it), and
    the kernels take every dtype but float64."""
    if device.type != "cuda":
        return False
    if torch.compiler.is_compiling():
        return dtype != torch.float64
    triton_backend = registry.load("triton")
    return triton_backend.unavailable_reason("torch", device) is None and registry.takes_dtype(triton_backend, dtype)


def _resolve(backend, device, T, needs_state, masks=1, dtype=None):
    """The backend module of :func:`log_linear_attn` for ``masks`` masks (rows times query/key
    heads, the same count in the forward and the backward) of length ``T``, inputs of ``dtype``."""
    if backend != "auto":
        return registry.get(backend, "torch", device, op="attention")
    if needs_state:
        return _triton_or_chunked(device, dtype)
    return registry.get(registry.auto_backend("torch", device, T, op="attention", masks=masks, dtype=dtype), "torch",
                        device, op="attention")


def _plain(module, q, k, v, level_scales, g, scale, cu_seqlens):
    """A backend's ``attention`` on grouped-head views; packed sequences one call each."""
    N, H, T, Dv = v.shape
    if T == 0:
        return v.new_zeros((N, H, 0, Dv))
    if cu_seqlens is None:
        return module.attention(*registry.grouped_heads(q, k, v, level_scales, g), scale).flatten(1, 2)
    cu = cu_seqlens.tolist()
    outs = []
    for i in range(len(cu) - 1):
        sl = slice(cu[i], cu[i + 1])
        if cu[i + 1] > cu[i]:
            parts = [None if x is None else x[..., sl, :] for x in (q, k, v, level_scales)]
            views = registry.grouped_heads(*parts, None if g is None else g[..., sl])
            outs.append(module.attention(*views, scale).flatten(1, 2))
    return torch.cat(outs, 2) if outs else v.new_zeros((N, H, 0, Dv))


def _forward(q, k, v, g, level_scales, scale, init_states, init_positions, cu_seqlens, output_final_state,
             final_slots, backend):
    """``(o, states, positions)`` on the ``(N, H, T, D)`` layout (``level_scales`` and ``g``
    already in the work dtype); ``states`` padded or cut to ``final_slots`` slots (cut slots are
    empty: the caller checked the end positions); empty tensors without ``output_final_state``."""
    T = q.shape[2]
    needs_state = init_states is not None or output_final_state
    module = _resolve(backend, q.device, T, needs_state or cu_seqlens is not None, q.shape[0] * q.shape[1], v.dtype)
    if registry.has_state(module) and (needs_state or cu_seqlens is not None):
        out = module.attention_state(q, k, v, level_scales, g, scale, init_states, init_positions, cu_seqlens,
                                     output_final_state)
    elif needs_state:
        raise BackendUnavailableError(
            f"backend {module.__name__.rsplit('.', 1)[-1]!r} has no recurrent state "
            f"(initial_state / output_final_state); use one of the backends with state: "
            f"{', '.join(registry.stateful('attention'))}")
    else:
        out = _plain(module, q, k, v, level_scales, g, scale, cu_seqlens)
    if not output_final_state:
        empty = q.new_zeros((0,), dtype=level_scales.dtype)
        return out, empty, empty.new_zeros((0,), dtype=torch.int64)
    o, (states, positions) = out
    S = states.shape[2]
    if S < final_slots:
        states = torch.nn.functional.pad(states, (0, 0, 0, 0, 0, final_slots - S))
    elif S > final_slots:
        states = states[:, :, :final_slots]
    return o, states, positions


# ---------------------------------------------------------------------------------------
# the custom operator (what torch.compile sees)
# ---------------------------------------------------------------------------------------
@torch.library.custom_op("hodlr::log_linear_attn", mutates_args=())
def _op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: Optional[torch.Tensor], level_scales: torch.Tensor,
        scale: float, initial_states: Optional[torch.Tensor], initial_positions: Optional[torch.Tensor],
        cu_seqlens: Optional[torch.Tensor], output_final_state: bool, final_slots: int,
        backend: str, keep: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``log_linear_attn`` on the ``(N, H, T, D)`` layout with flat arguments:
    ``(o, states, positions, kept, kept_logdec)``: ``states, positions`` empty without
    ``output_final_state``; ``kept, kept_logdec`` the chunk states that the backward reads instead
    of recomputing them (:func:`_keeper`; ``keep``: ``hodlr.options.attention_save_states`` where a
    gradient is wanted, False otherwise, an argument so that a compiled graph is traced, guarded and
    cached with it), else empty."""
    _check_values(q.shape[0], q.shape[2], level_scales.shape[-1], cu_seqlens, initial_positions,
                  None if initial_states is None else initial_states.shape[2])
    keeper = _keeper(q, initial_states, cu_seqlens, output_final_state, backend, keep)
    if keeper is not None:
        o, kept, kept_logdec = keeper.attention_keeping_states(q, k, v, level_scales, g, scale)
        empty = q.new_zeros((0,), dtype=level_scales.dtype)
        return o.contiguous(), empty, empty.new_zeros((0,), dtype=torch.int64), kept, kept_logdec
    o, states, positions = _forward(q, k, v, g, level_scales, scale, initial_states, initial_positions,
                                    cu_seqlens, output_final_state, final_slots, backend)
    if output_final_state:
        _check_final_slots(states, positions, final_slots)
    nothing = q.new_zeros((0,), dtype=level_scales.dtype)
    return o.contiguous(), states.contiguous(), positions.contiguous(), nothing, nothing.clone()


def _keeper(q, initial_states, cu_seqlens, output_final_state, backend, keep):
    """The backend module whose forward keeps its chunk states for the operator's backward
    (``attention_keeping_states``: the ``triton`` backend) when ``keep``, on the common path (no
    state, no packed sequences, tokens), or None."""
    if not _plain_path(q, initial_states, cu_seqlens, output_final_state):
        return None
    module = _resolve(backend, q.device, q.shape[2], False, q.shape[0] * q.shape[1], q.dtype)
    if not keep or not hasattr(module, "attention_keeping_states"):
        return None
    return module


def _check_final_slots(states, positions, final_slots):
    """Refuse a final state whose positions need more than ``final_slots`` slots."""
    need = fenwick.num_slots(int(positions.max())) if states.shape[2] else 0
    if need > final_slots:
        raise ValueError(f"the final state needs {need} slots but has "
                         f"{final_slots} (under torch.compile it keeps the initial state's slots: make the state "
                         f"with more, LogLinearState.zeros(..., max_position=...) or state.with_slots(S))")


def _fake_outputs(q, v, level_scales, cu_seqlens, output_final_state, final_slots):
    """``(o, states, positions)`` as the operators return them, on the ``(N, H, T, D)`` layout."""
    N, Hqk, T, Dk = q.shape
    H, Dv = v.shape[1], v.shape[3]
    o = v.new_empty((N, H, T, Dv))
    if not output_final_state:
        return o, level_scales.new_empty((0,)), q.new_empty((0,), dtype=torch.int64)
    Nseq = N if cu_seqlens is None else cu_seqlens.shape[0] - 1
    return (o, level_scales.new_empty((Nseq, H, final_slots, Dk, Dv)),
            q.new_empty((Nseq,), dtype=torch.int64))


@_op.register_fake
def _op_fake(q, k, v, g, level_scales, scale, initial_states, initial_positions, cu_seqlens, output_final_state,
             final_slots, backend, keep):
    outs = _fake_outputs(q, v, level_scales, cu_seqlens, output_final_state, final_slots)
    keeper = _keeper(q, initial_states, cu_seqlens, output_final_state, backend, keep)
    if keeper is None:
        nothing = level_scales.new_empty((0,))
        return (*outs, nothing, level_scales.new_empty((0,)))
    (shape, dtype), (log_shape, log_dtype) = keeper.kept_state_shapes(q, v)
    return (*outs, q.new_empty(shape, dtype=dtype), q.new_empty(log_shape, dtype=log_dtype))


def _autograd_on():
    """Autograd back on inside a custom operator's implementation, which the dispatcher runs
    below autograd (the autograd keys excluded): the backward recomputes the forward under it."""
    import contextlib

    keys = torch._C.DispatchKey
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for name in ("AutogradFunctionality", "AutogradOther", "AutogradNestedTensor", "ADInplaceOrView"):
        exclude = exclude.remove(getattr(keys, name))
    stack = contextlib.ExitStack()
    stack.enter_context(torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude))
    stack.enter_context(torch.enable_grad())
    return stack


@torch.library.custom_op("hodlr::log_linear_attn_backward", mutates_args=())
def _op_backward(do: torch.Tensor, dstates: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 g: Optional[torch.Tensor], level_scales: torch.Tensor, scale: float,
                 initial_states: Optional[torch.Tensor], initial_positions: Optional[torch.Tensor],
                 cu_seqlens: Optional[torch.Tensor], output_final_state: bool, final_slots: int,
                 backend: str, kept: torch.Tensor, kept_logdec: torch.Tensor) -> tuple[
                     torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(dq, dk, dv, dg, dlevel_scales, dinitial_states)`` of :func:`_op` (empty for
    an absent ``g`` / initial state): straight from the backend's backward where it has one
    (``attention_state_vjp``: triton, reading the forward's ``kept`` states where it kept them),
    else the backend's forward recomputed under autograd."""
    module = _resolve(backend, q.device, q.shape[2],
                      initial_states is not None or output_final_state or cu_seqlens is not None, q.shape[0] * q.shape[1],
                      v.dtype)
    vjp = getattr(module, "attention_state_vjp", None)
    if vjp is not None and q.shape[2] > 0:
        saved = (kept, kept_logdec) if kept.numel() else None
        dq, dk, dv, dlam, dg, dinit = vjp(q, k, v, level_scales, g, scale, initial_states, initial_positions,
                                          cu_seqlens, do, dstates if output_final_state else None, saved=saved)
        grads = (dq, dk, dv, dg, dlam, dinit)
        return tuple(_gradient(do, x, d) for x, d in zip((q, k, v, g, level_scales, initial_states), grads))

    def forward(q, k, v, g, lam, init):
        return _forward(q, k, v, g, lam, scale, init, initial_positions, cu_seqlens, output_final_state, final_slots,
                        backend)[:2]

    return _recompute_grads(forward, [q, k, v, g, level_scales, initial_states], do, dstates, output_final_state)


def _gradient(like, x, d):
    """The gradient ``d`` of the input ``x`` as the backward operators return it: in ``x``'s
    dtype and memory layout (a transposed view's gradient is the same transposed view of a
    tensor laid out as ``x``'s base, so the graph's transpose back gives a contiguous gradient;
    with contiguous gradients instead, ``aot_eager`` graphs that reshape them after a pointwise op
    fail on the strides), zeros for None, an empty tensor for an absent (None) input."""
    if x is None:
        return like.new_empty((0,))
    if d is None:
        return torch.zeros_like(x)
    if d.dtype == x.dtype and d.shape == x.shape and d.stride() == x.stride():
        return d  # (a backward kernel wrote it in place)
    return torch.empty_like(x).copy_(d)


def _recompute_grads(forward, inputs, do, dstates, output_final_state):
    """The gradients of ``(o, states) = forward(*inputs)`` with respect to ``inputs``, by
    recomputing ``forward`` under autograd (see :func:`_gradient` for their form).  In a call
    without tokens (``inputs[0]``, the queries, empty) an output that depends on no input (``o``;
    ``states`` without an initial state, which a carried one passes through) contributes nothing."""
    with _autograd_on():
        leaves = [None if x is None else x.detach().requires_grad_(True) for x in inputs]
        o, states = forward(*leaves)
        pairs = [(o, do)] + ([(states, dstates)] if output_final_state else [])
        if inputs[0].numel() == 0:
            pairs = [(out, d) for out, d in pairs if out.requires_grad]
        wrt = [x for x in leaves if x is not None]
        got = iter(torch.autograd.grad([out for out, _ in pairs], wrt, [d for _, d in pairs], allow_unused=True)
                   if pairs else [None] * len(wrt))
    return tuple(_gradient(do, x, None if x is None else next(got)) for x in leaves)


def _fake_grads(like, inputs):
    return tuple(like.new_empty((0,)) if x is None else torch.empty_like(x) for x in inputs)


@_op_backward.register_fake
def _op_backward_fake(do, dstates, q, k, v, g, level_scales, scale, initial_states, initial_positions, cu_seqlens,
                      output_final_state, final_slots, backend, kept, kept_logdec):
    return _fake_grads(do, (q, k, v, g, level_scales, initial_states))


def _setup_context(ctx, inputs, output):
    q, k, v, g, lam, scale, init, pos, cu, final, slots, backend, _ = inputs
    ctx.mark_non_differentiable(output[2], output[3], output[4])
    ctx.save_for_backward(q, k, v, g, lam, init, pos, cu, output[3], output[4])
    ctx.args = (scale, final, slots, backend)


def _dstates(dstates, q, v, lam, cu, final, slots):
    """The final state's incoming gradient as a tensor: zeros when autograd gives none, empty
    without a final state."""
    if not final:
        return lam.new_zeros((0,))
    if dstates is None:
        return lam.new_zeros((cu.shape[0] - 1 if cu is not None else q.shape[0], v.shape[1], slots, q.shape[3],
                              v.shape[3]))
    return dstates


@_checks.without_autocast  # (a backward called under autocast computes as the forward did)
def _backward(ctx, do, dstates, dpositions, dkept, dkept_logdec):
    q, k, v, g, lam, init, pos, cu, kept, kept_logdec = ctx.saved_tensors
    scale, final, slots, backend = ctx.args
    dq, dk, dv, dg, dlam, dinit = torch.ops.hodlr.log_linear_attn_backward(
        do, _dstates(dstates, q, v, lam, cu, final, slots), q, k, v, g, lam, scale, init, pos, cu, final, slots,
        backend, kept, kept_logdec)
    return (dq, dk, dv, None if g is None else dg, dlam, None, None if init is None else dinit,
            None, None, None, None, None, None)


_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------
# the public functions
# ---------------------------------------------------------------------------------------
def _bhtd(x):
    """``(B, T, H, ...)`` -> the view ``(B, H, T, ...)``."""
    return None if x is None else x.transpose(1, 2)


@_checks.without_autocast
def log_linear_attn(q, k, v, g, level_scales, initial_state=None, output_final_state=False, cu_seqlens=None,
                    scale=1.0, *, backend: str = "auto"):
    """Log-linear attention on flash-linear-attention's layout, with state hand-off and packed
    sequences: a drop-in for fla's ``chunk_log_linear_attn`` (same argument order and defaults
    as fla-core 0.6.0).

    ``o_t = scale * sum_{s <= t} level_scales[t, level(t, s)] exp(G_t - G_s) (q_t . k_s) v_s`` with
    ``G`` the cumulative sum of ``g`` and positions absolute (docs/models.md).

    Parameters
    ----------
    q, k : torch.Tensor, shape ``(B, T, Hqk, Dk)``
    v : torch.Tensor, shape ``(B, T, H, Dv)``
        ``Hqk`` divides ``H``; head ``h`` of ``v`` reads head ``h // (H // Hqk)`` of ``q`` and ``k``
        (grouped heads, read in place).  One floating dtype; any strides.
    g : torch.Tensor, shape ``(B, T, H)``, or None
        Per-token log-decay (``None``: no decay).  ``g`` of an absolute position 0 has no effect.
    level_scales : torch.Tensor, shape ``(B, T, H, L)``
        Row ``t`` reads level 0 and level ``l >= 1`` iff bit ``l - 1`` of its absolute position is
        set; ``L >= num_levels(largest end position)``.  Other entries are never read (NaN allowed).
        ``g`` and ``level_scales`` are used in float32 (float64 for float64 inputs).
    initial_state : hodlr.LogLinearState, optional
        One row per sequence (``B``, or ``len(cu_seqlens) - 1``), the heads and widths of ``v`` and
        ``k``, float32 (float64 for float64 inputs), on the inputs' device.  Sequence ``n`` starts at
        absolute position ``initial_state.positions[n]``.  Gradients flow into ``initial_state.states``.
    output_final_state : bool
        Also return the state after the last token of every sequence.
    cu_seqlens : torch.Tensor, shape ``(N + 1,)``, int32 or int64, optional
        Packed sequences: ``B == 1``, sequence ``n`` is ``[cu_seqlens[n], cu_seqlens[n + 1])`` along
        ``T``, its own Fenwick tree (positions restart at 0, or at its state's position).  Empty
        sequences pass their state through.
    scale : float or None, default 1.0
        Multiplies ``q . k``; ``None`` means ``Dk ** -0.5``.
    backend : str, default ``"auto"``
        One of ``hodlr.backends.NAMES`` that runs on torch here; calls with a state need one with
        state support (``chunked``, ``fenwick``, ``triton``); ``auto`` picks ``triton`` then ``chunked``
        on a GPU, ``chunked`` (``dense`` for short stateless calls) on the CPU.

    Returns
    -------
    o : torch.Tensor, shape ``(B, T, H, Dv)``, the dtype of ``v``
    final_state : hodlr.LogLinearState or None
        With ``max(S, bit_length(largest end position))`` slots (``S`` those of the initial state).
        Under ``torch.compile`` the slot count cannot depend on values: it is the initial state's
        (``bit_length(T)`` without one), and a call whose end positions need more raises.

    Raises
    ------
    ValueError, TypeError
        Shapes, dtypes, devices or ``cu_seqlens`` that do not fit (the message names the argument);
        ``hodlr.LevelsExceededError`` for ``level_scales`` with fewer columns than the call's last
        absolute position needs; ``hodlr.BackendUnavailableError`` for a backend that cannot run
        here or keeps no state (``dense``, ``sparse``, ``recursive``) for a call with one.

    Examples
    --------
    >>> import torch, hodlr
    >>> B, T, H, D = 2, 10, 3, 4
    >>> q, k, v = (torch.randn(B, T, H, D, dtype=torch.float64) for _ in range(3))
    >>> g = -torch.rand(B, T, H, dtype=torch.float64)
    >>> lam = torch.rand(B, T, H, hodlr.num_levels(T), dtype=torch.float64)
    >>> o, _ = hodlr.log_linear_attn(q, k, v, g, lam)
    >>> o1, state = hodlr.log_linear_attn(q[:, :6], k[:, :6], v[:, :6], g[:, :6], lam[:, :6],
    ...                                   output_final_state=True)
    >>> o2, _ = hodlr.log_linear_attn(q[:, 6:], k[:, 6:], v[:, 6:], g[:, 6:], lam[:, 6:], initial_state=state)
    >>> bool(torch.allclose(torch.cat([o1, o2], 1), o)), state.positions.tolist()
    (True, [6, 6])
    """
    scale, Nseq, output_final_state = _check_static(q, k, v, g, level_scales, initial_state, output_final_state,
                                                    cu_seqlens, scale)
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, one of {('auto',) + registry.NAMES}, got {type(backend).__name__}")
    work = work_dtype(v.dtype)
    B, T, Hqk, Dk = q.shape
    L = level_scales.shape[-1]
    lam = _bhtd(level_scales).to(work)
    g_ = None if g is None else _bhtd(g).to(work)
    init = None if initial_state is None else initial_state.states
    pos = None if initial_state is None else initial_state.positions
    S_in = 0 if initial_state is None else initial_state.num_slots
    if torch.compiler.is_compiling():
        # no host read while tracing: the slot count comes from shapes (int(T) specialises T)
        final_slots = 0 if not output_final_state else S_in if initial_state is not None else fenwick.num_slots(int(T))
        # a graph that differentiates nothing keeps nothing (grad mode and requires_grad are guarded)
        keep = flag("attention_save_states") and _checks.wants_grad(q, k, v, g, level_scales, init)
        o, states, positions, _, _ = _op(_bhtd(q), _bhtd(k), _bhtd(v), g_, lam, scale, init, pos, cu_seqlens,
                                         output_final_state, final_slots, backend, keep)
    else:
        cu = None if cu_seqlens is None else cu_seqlens.tolist()  # one host read for the checks and the rows
        end = _check_values(B, T, L, cu, pos, S_in if initial_state is not None else None)
        final_slots = max(S_in, fenwick.num_slots(end))
        rows = _kernel_decoding_rows(T, initial_state, cu, backend, q, k, v, g, level_scales)
        if rows:
            state = initial_state.with_slots(final_slots)  # new tensors: the step updates them in place
            o = rows(log_linear_attn_step, q, k, v, g, level_scales, state, scale=scale, backend="triton",
                     validate=False)
            return o, (state if output_final_state else None)
        o, states, positions = _forward(_bhtd(q), _bhtd(k), _bhtd(v), g_, lam, scale, init, pos, cu_seqlens,
                                        output_final_state, final_slots, backend)
        o = _joined(o, q, k, v, g, level_scales)
    o = o.transpose(1, 2)
    if not output_final_state:
        return o, None
    return o, LogLinearState(states, positions, validate=False)


def _decoding_rows(T, initial_state, cu):
    """Whether an eager call with a state is one decoding step: one token a row of the batch, or
    packed sequences of one token each (``cu``: the values of ``cu_seqlens`` as the call's checks
    read them, a list, or None).  Returns None, or ``run(step, *inputs, state, **kw)`` calling a
    decoding step on the inputs with each sequence a row (packed tokens moved to the batch axis
    and back)."""
    if initial_state is None:
        return None
    if cu is None:
        return None if T != 1 else (lambda step, *xs, **kw: step(*xs, **kw))
    if T != initial_state.batch_size or not (np.diff(np.asarray(cu)) == 1).all():
        return None

    def packed(step, *xs, **kw):
        *inputs, state = xs
        moved = [None if x is None else x.transpose(0, 1) for x in inputs]  # (1, N, ...) -> (N, 1, ...)
        return step(*moved, state, **kw).transpose(0, 1)

    return packed


def _kernel_decoding_rows(T, initial_state, cu, backend, q, *inputs):
    """:func:`_decoding_rows` where the decode kernel runs the step: on a GPU, a float32 state,
    ``backend`` ``"triton"`` or ``"auto"`` with the kernels available, no gradient wanted of
    ``q``, ``inputs`` (None entries allowed) or the state; else None."""
    rows = _decoding_rows(T, initial_state, cu)
    if (rows and q.device.type == "cuda" and initial_state.states.dtype != torch.float64
            and (backend == "triton" or backend == "auto" and _kernels_on(q.device, q.dtype))
            and not _checks.wants_grad(q, *inputs, initial_state.states)):
        return rows
    return None


def _joined(o, *inputs):
    """An empty output ``o`` (no token, or an empty batch) joined to the autograd graph of the empty
    inputs that require a gradient (each adds its sum over nothing, exactly 0), so that a backward
    through the call gives them empty gradients instead of failing for want of a graph."""
    if o.numel() or not torch.is_grad_enabled():
        return o
    for x in inputs:
        if x is not None and x.requires_grad and x.numel() == 0:
            o = o + x.sum()
    return o


def _check_step(name, q, k, v, g, level_scales, state, scale, validate, state_indices=None):
    """The checks of a decoding step (``T = 1``, a state, the rows ``state_indices`` of it or all);
    with ``validate`` also the host-side ones on the positions and the indices.  Returns the
    scale."""
    validate = check_bool("validate", validate)
    if not isinstance(state, LogLinearState):
        raise TypeError(f"state must be a hodlr.LogLinearState (LogLinearState.zeros(...) for a new cache), got "
                        f"{_checks.describe(state)}")
    for part in ("states", "positions"):
        x = getattr(state, part)
        if 0 in x.stride() and x.numel() > 1:
            raise ValueError(f"state.{part} is updated in place, so it must not be an expanded (stride 0) view; got "
                             f"strides {x.stride()} for shape {tuple(x.shape)} (pass a copy: .clone())")
    positions, checked = state.positions, state
    if state_indices is not None:
        _tensor("q", q, 4, "(B, T, Hqk, Dk)")  # its rows count the indices
        N = q.shape[0]
        if not isinstance(state_indices, torch.Tensor) or state_indices.dtype != torch.int64:
            raise TypeError(f"state_indices must be an int64 tensor, got {_checks.describe(state_indices)}")
        if tuple(state_indices.shape) != (N,) or state_indices.device != state.states.device:
            raise ValueError(f"state_indices must have shape ({N},) (one state row for each row of q) and lie on "
                             f"{state.states.device} (the state's device), got {_checks.describe(state_indices)}")
        if validate and N:
            rows = state_indices.tolist()
            bad = [r for r in rows if not 0 <= r < state.batch_size]
            if bad or len(set(rows)) != N:
                what = f"{bad[0]} outside [0, {state.batch_size})" if bad else "a row twice"
                raise ValueError(f"state_indices must name distinct rows of the state's {state.batch_size}, got {what}")
        if N and not state.batch_size:
            raise ValueError("state_indices names rows of a state that has none")
        # (the checks of shapes see the state's rows as many as q's; its values are not read)
        checked = LogLinearState(state.states[:1].expand((N,) + tuple(state.states.shape[1:])),
                                 positions[:1].expand(N), validate=False)
        positions = positions.index_select(0, state_indices) if validate else None
    scale, _, _ = _check_static(q, k, v, g, level_scales, checked, False, None, scale, "state")
    if q.shape[1] != 1:
        raise ValueError(f"{name} takes one token per sequence (T = 1), got q of shape {tuple(q.shape)}")
    if validate:
        end = _check_values(q.shape[0], 1, level_scales.shape[-1], None, positions, state.num_slots, "state")
        if fenwick.num_slots(end) > state.num_slots:
            raise ValueError(f"the step takes position {end - 1} to {end}, which needs {fenwick.num_slots(end)} slots but "
                             f"the state has {state.num_slots}; make it with more (state.with_slots(S), or "
                             f"LogLinearState.zeros(..., max_position=...))")
    elif level_scales.shape[-1] < 1 and q.shape[0]:  # (a shape: refused without a host read)
        raise LevelsExceededError("level_scales has L=0 levels; every token reads level 0 (L >= 1)", end=1, need=1,
                                  levels=0)
    return scale


@_checks.without_autocast
def log_linear_attn_step(q, k, v, g, level_scales, state, *, scale=1.0, backend: str = "auto",
                         validate: bool = True, state_indices=None):
    """One decoding step for a batch of sequences, each at its own position: consumes one token
    per sequence and updates ``state`` in place (its ``states`` and ``positions`` tensors; what a
    preallocated decoding cache and CUDA graphs need).

    Parameters
    ----------
    q, k : torch.Tensor, shape ``(B, 1, Hqk, Dk)``
    v : torch.Tensor, shape ``(B, 1, H, Dv)``
    g : torch.Tensor, shape ``(B, 1, H)``, or None
    level_scales : torch.Tensor, shape ``(B, 1, H, L)``
        The layout of :func:`log_linear_attn` with ``T = 1``.
    state : hodlr.LogLinearState
        ``B`` sequences, float32 (float64 for float64 inputs); each must stay below ``2**S``
        (``S`` its slots) after the step.
    scale : float or None, default 1.0
        Multiplies ``q kᵀ`` (as :func:`log_linear_attn`); None is ``Dk ** -0.5``.
    backend : ``"auto"``, ``"triton"`` or ``"torch"``
        ``triton``: the decode kernel (``hodlr.kernels.decode.decode_step``: two launches, no host
        synchronisation, capturable in a CUDA graph; on the CPU under ``TRITON_INTERPRET=1``; float64
        only there);
        ``torch``: torch operations on the state's slots, shared with
        :func:`log_linear_gated_delta_step` (no host read with ``validate=False``: capturable, and
        it compiles with ``fullgraph=True``).  ``auto`` picks ``triton`` on a GPU, ``torch`` for a
        float64 state and on the CPU.
    validate : bool, default True
        Read the positions on the host and refuse a step that would overflow the state's slots or
        read past ``level_scales``.  Pass False inside CUDA-graph capture (no host read); the
        step then leaves such rows untouched and writes NaN outputs for them (either backend).
    state_indices : torch.Tensor, shape ``(B,)``, int64, optional
        Row ``n`` of the inputs steps row ``state_indices[n]`` of ``state`` (which may hold more
        rows: a preallocated cache whose active sequences decode now), in place; the other rows are
        left alone.  Distinct rows, on the state's device; checked on the host with ``validate``.
        The kernel reads them itself; the torch form gathers the rows, steps and scatters them.

    Returns
    -------
    o : torch.Tensor, shape ``(B, 1, H, Dv)``, the dtype of ``v``.  No gradients: the step is for
        inference.

    Examples
    --------
    >>> import torch, hodlr
    >>> B, T, H, D = 2, 5, 2, 4
    >>> q, k, v = (torch.randn(B, T, H, D, dtype=torch.float64) for _ in range(3))
    >>> g = -torch.rand(B, T, H, dtype=torch.float64)
    >>> lam = torch.rand(B, T, H, hodlr.num_levels(T), dtype=torch.float64)
    >>> cache = hodlr.LogLinearState.zeros(B, H, D, D, max_position=T, dtype=torch.float64)
    >>> steps = [hodlr.log_linear_attn_step(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], g[:, t:t + 1],
    ...                                     lam[:, t:t + 1], cache) for t in range(T)]
    >>> bool(torch.allclose(torch.cat(steps, 1), hodlr.log_linear_attn(q, k, v, g, lam)[0])), cache.positions.tolist()
    (True, [5, 5])
    """
    scale = _check_step("log_linear_attn_step", q, k, v, g, level_scales, state, scale, validate, state_indices)
    if q.shape[0] == 0:  # no sequence: nothing to step (level scales of any width)
        _step_backend(backend, q, state, "attention")
        return v.new_empty(v.shape)
    return _step(q, k, v, g, None, level_scales, state, scale, state_indices, backend)


def _step_backend(backend, q, state, op):
    """``"triton"`` or ``"torch"``: what a decoding step with ``backend`` runs for ``q`` and
    ``state``; ``auto`` is the kernel on a GPU for a float32 state (the kernel takes float64 under
    the interpreter only)."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, 'auto', 'triton' or 'torch', got {type(backend).__name__}")
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    if backend == "auto":
        return "triton" if _kernels_on(q.device, q.dtype) and state.states.dtype != torch.float64 else "torch"
    if backend == "triton":
        registry.get("triton", "torch", q.device, op=op)  # BackendUnavailableError saying why not
        from hodlr.kernels import interpreting

        if state.states.dtype == torch.float64 and not interpreting():
            raise TypeError("backend='triton' steps float32 states on the GPU (float64 only under TRITON_INTERPRET=1); "
                            "got a float64 state: use backend='torch' (or 'auto', which picks it)")
    return backend


def _step(q, k, v, g, beta, level_scales, state, scale, state_indices, backend):
    """Both decoding steps (checked arguments, ``B > 0``): the decode kernel or :func:`_torch_step`
    (``beta`` None: log-linear attention's)."""
    if _step_backend(backend, q, state, "attention" if beta is None else "gated_delta_attention") == "triton":
        from hodlr.kernels.decode import decode_step

        o = decode_step(q[:, 0], k[:, 0], v[:, 0], None if g is None else g[:, 0], level_scales[:, 0], state.states,
                        state.positions, scale, beta=None if beta is None else beta[:, 0],
                        state_indices=state_indices)
        return o[:, None]
    with _rows_of(state, state_indices) as state:
        return _torch_step(q, k, v, g, beta, level_scales, state, scale)


@contextlib.contextmanager
def _rows_of(state, state_indices):
    """``state``, or its rows ``state_indices`` gathered, stepped in the block and scattered back."""
    if state_indices is None:
        yield state
        return
    rows = LogLinearState(state.states.index_select(0, state_indices), state.positions.index_select(0, state_indices),
                          validate=False)
    yield rows
    with torch.no_grad():
        state.states.index_copy_(0, state_indices, rows.states)
        state.positions.index_copy_(0, state_indices, rows.positions)


def _torch_step(q, k, v, g, beta, level_scales, state, scale):
    """The torch form of both decoding steps (checked arguments), in place: log-linear Gated DeltaNet,
    whose token moves every live state by ``A = exp(g) (I - beta k kᵀ)`` and writes ``beta k vᵀ``,
    or, with ``beta`` None, log-linear attention, the same with no correction and a unit write
    (``A = exp(g)``, ``k vᵀ``).  On the slots of ``state`` (slot ``l - 1`` the level-``l`` bucket):
    the live slots (the set bits of each row's position) are moved by ``A``, the query reads them
    with the level scales ``λ[l]``, the slots of the position's trailing one-bits merge with the
    token's write into slot ``bit_length(p XOR (p + 1)) - 1`` and are cleared, and the rows whose
    step fits (:func:`_step_fits`) move on; the others are left as they were.  Returns
    ``o (B, 1, H, Dv)``, NaN for the rows whose step does not fit."""
    X, p = state.states, state.positions
    S, L, work = X.shape[2], level_scales.shape[-1], X.dtype
    grp = v.shape[2] // q.shape[2]
    with torch.no_grad():
        qh, kh = (x[:, 0].to(work).repeat_interleave(grp, 1) for x in (q, k))  # (B, H, Dk)
        vh, lam = v[:, 0].to(work), level_scales[:, 0].to(work)  # (B, H, Dv), (B, H, L)
        bh = None if beta is None else beta[:, 0].to(work)  # (B, H)
        decay = None if g is None else torch.exp(  # the log-decay of absolute position 0 multiplies no pair
            torch.where((p == 0)[:, None], 0.0, g[:, 0].to(work)))
        if bh is None:
            write, diag = kh[..., :, None] * vh[..., None, :], lam[..., 0] * (qh * kh).sum(-1)
        else:
            write = bh[..., None, None] * kh[..., :, None] * vh[..., None, :]
            diag = lam[..., 0] * bh * (qh * kh).sum(-1)
        slot = torch.arange(S, device=p.device)
        live = ((p[:, None] >> slot) & 1) == 1  # (B, S): slot l - 1 holds level l
        carry = p ^ (p + 1)  # bits 0 .. D - 1: the slots that merge, then the slot they merge into
        merge = live & (((carry[:, None] >> slot) & 1) == 1)
        target = ((carry + 1)[:, None] >> (slot + 1)) == 1  # slot D - 1 (carry + 1 = 2**D)
        fits = _step_fits(p, S, L)
        zero = torch.zeros((), dtype=work, device=X.device)
        held = torch.where(live[:, None, :, None, None], X, zero)  # empty slots are never read, NaN or not
        moved = fenwick.delta.apply_transition(held, kh, bh, decay)
        scales = torch.nn.functional.pad(lam[..., 1:], (0, max(0, S + 1 - L)))[..., :S]  # level l at slot l - 1
        w = torch.where(live[:, None, :], scales, zero)
        read = torch.einsum("nhs,nhd,nhsdv->nhv", w, qh, moved)
        merged = torch.where(merge[:, None, :, None, None], moved, zero).sum(2) + write
        new = torch.where(merge[:, None, :, None, None], zero, moved)
        new = torch.where(target[:, None, :, None, None], merged[:, :, None], new)
        X.copy_(torch.where(fits[:, None, None, None, None], new, X))
        p.add_(fits.to(p.dtype))
        o = scale * (diag[..., None] * vh + read)
        o = torch.where(fits[:, None, None], o, torch.full((), float("nan"), dtype=work, device=o.device))
    return o[:, None].to(v.dtype)


def _step_fits(positions, num_slots, L):
    """``(B,)`` bool: the rows whose step fits, those at a position ``p >= 0`` whose next
    position ``p + 1`` needs at most ``num_slots`` slots and whose reads need at most ``L`` level
    scales (``p < 2^(L-1)``).  A step leaves the other rows unchanged and gives them NaN outputs."""
    p = positions
    return (p >= 0) & (((p + 1) >> num_slots) == 0) & ((p >> (L - 1)) == 0)


# ---------------------------------------------------------------------------------------
# log-linear Gated DeltaNet
# ---------------------------------------------------------------------------------------
def _resolve_gated_delta(backend, device, stateful, key_width, inference=False, dtype=None):
    """The backend module for :func:`log_linear_gated_delta_rule` on keys ``key_width`` wide;
    ``"auto"`` is ``triton`` on a GPU where its kernels take the keys for calls without state and,
    with ``inference`` (no gradient wanted: :func:`_stateful_inference`), for those with state,
    for inputs of ``dtype`` it takes, else ``chunked``."""
    if backend == "auto":
        module = _triton_or_chunked(device, dtype)
        plain = not stateful or (inference and hasattr(module, "gated_delta_with_state"))
        backend = "chunked" if not plain or not registry.takes_keys(
            module, "gated_delta_attention", key_width) else module.__name__.rsplit(".", 1)[-1]
    return registry.get(backend, "torch", device, op="gated_delta_attention")


def _stateful_inference(stateful, *inputs) -> bool:
    """Whether a Gated DeltaNet call with state wants no gradient of any input (``inputs``, None
    entries allowed): a backend that differentiates no state runs it with its
    ``gated_delta_with_state`` (the ``triton`` backend)."""
    return stateful and not _checks.wants_grad(*inputs)


def _check_gated_delta_state(module, stateful, inference):
    """Refuse a stateful call on a backend that keeps no state (one with ``gated_delta_with_state``
    takes those without gradient)."""
    if not stateful or registry.keeps_state(module, "gated_delta_attention"):
        return
    name = module.__name__.rsplit(".", 1)[-1]
    if not hasattr(module, "gated_delta_with_state"):
        raise BackendUnavailableError(f"backend {name!r} has no recurrent state (initial_state / output_final_state); "
                                      f"use one of {', '.join(registry.stateful('gated_delta_attention'))}")
    if not inference:
        raise BackendUnavailableError(f"backend {name!r} takes and returns states only without gradient (under "
                                      f"torch.no_grad, or of inputs that require none); use one of "
                                      f"{', '.join(registry.stateful('gated_delta_attention'))} for calls with state "
                                      f"and a gradient")


def _gated_delta_forward(q, k, v, beta, g, level_scales, scale, init_states, init_positions, cu_seqlens,
                         output_final_state, final_slots, backend):
    """``(o, states, positions)`` of :func:`log_linear_gated_delta_rule` on the ``(N, H, T, D)``
    layout (``level_scales`` and ``g`` in the work dtype; ``states`` and ``positions`` ``None``
    without ``output_final_state``).  Sequences that start at one position (the rows of a batch
    without ``cu_seqlens``) run as one batched backend call; packed sequences without state as one
    call over an aligned stream on a backend with ``PACKED_AS_ONE_STREAM`` (:func:`_as_one_stream`),
    else one call each."""
    N, Hqk, T, Dk = q.shape
    H, Dv = v.shape[1], v.shape[3]
    grp = H // Hqk
    stateful = init_states is not None or output_final_state
    inference = _stateful_inference(stateful, q, k, v, beta, g, level_scales, init_states)
    module = _resolve_gated_delta(backend, q.device, stateful, Dk, inference, v.dtype)
    _check_gated_delta_state(module, stateful, inference)
    inference = inference and not registry.keeps_state(module, "gated_delta_attention")
    if N == 0:  # an empty batch: nothing to run
        o = v.new_zeros(v.shape)
        if not output_final_state:
            return o, None, None
        return o, level_scales.new_zeros((0, H, final_slots, Dk, Dv)), torch.zeros(0, dtype=torch.int64,
                                                                                 device=q.device)
    seq_batch, offset, length, start = segments(N, T, cu_seqlens, init_positions)
    if cu_seqlens is not None and np.count_nonzero(length) > 1:
        if not stateful and getattr(module, "PACKED_AS_ONE_STREAM", False):
            return _as_one_stream(module, q, k, v, beta, g, level_scales, scale, offset, length), None, None
        if inference and init_states is None and hasattr(module, "gated_delta_packed_prefill"):  # prompts' prefill
            o, finals = _as_one_stream(module, q, k, v, beta, g, level_scales, scale, offset, length, final_slots)
            return o, finals, to_device(length, q.device, torch.int64)
    if cu_seqlens is None:
        groups = [(np.nonzero(start == a)[0], slice(0, T), int(a)) for a in np.unique(start)]
    else:
        groups = [(np.array([n]), slice(int(offset[n]), int(offset[n] + length[n])), int(start[n]))
                  for n in range(start.size)]
    work = level_scales.dtype
    outs, finals = [], []
    for seqs, sl, a in groups:
        pick = functools.partial(_pick, rows=seq_batch[seqs], sl=sl)
        q5, k5, v5, beta5, lam5, g5 = registry.grouped_delta_heads(pick(q), pick(k), pick(v), pick(beta),
                                                                   pick(level_scales), pick(g))
        init5 = None
        if init_states is not None:
            init5 = _pick(init_states, seqs).to(work)
            init5 = init5.unflatten(1, (Hqk, grp))
        Tn = sl.stop - sl.start
        if Tn == 0:  # the state passes through, in new tensors (a later step updates them in place),
            o5 = v5.new_zeros(v5.shape)  # with its empty buckets' slots 0
            if init5 is None:
                fin5 = v5.new_zeros(v5.shape[:3] + (0, Dk, Dv), dtype=work)
            else:
                fin5 = init5.clone()
                fin5[:, :, :, [j for j in range(fin5.shape[3]) if not (a >> j) & 1]] = 0
        elif inference:
            o5, fin5 = module.gated_delta_with_state(q5, k5, v5, beta5, lam5, g5, scale, state=init5, position=a,
                                                     final_state=output_final_state)
        elif stateful:
            o5, fin5 = module.gated_delta_attention(q5, k5, v5, beta5, lam5, g5, scale, state=init5, position=a,
                                                    final_state=True)
        else:
            o5, fin5 = module.gated_delta_attention(q5, k5, v5, beta5, lam5, g5, scale), None
        outs.append((seqs, o5.flatten(1, 2)))
        if output_final_state:
            fin = fin5.flatten(1, 2)
            if fin.shape[2] != final_slots:  # (a zero pad would still copy)
                fin = torch.nn.functional.pad(fin, (0, 0, 0, 0, 0, final_slots - fin.shape[2]))
            finals.append((seqs, fin))
    if cu_seqlens is not None:
        o = outs[0][1] if len(outs) == 1 else torch.cat([x for _, x in outs], 2)
    else:
        o = _in_order(outs, N)
    if not output_final_state:
        return o, None, None
    states = _in_order(finals, start.size)
    return o, states, to_device(start + length, q.device, torch.int64)


def stream_layout(lengths):
    """``(starts, T_s, K)``: where each of the sequences of ``lengths`` begins in one stream of
    ``T_s`` positions in which each starts at a multiple of ``2^K``, ``2^K`` the least power of two
    covering its length (``K`` per sequence; the longest placed first, so the gaps stay below the
    next one's ``2^K``; empty sequences get no room).  Inside such a block the levels between two of its tokens are
    those of the sequence from position 0 (the higher bits, equal, cancel), and every pair with an
    earlier token is at a level above ``K``: a token that reads only levels ``<= K`` sees its own
    sequence, exactly as a call of its own."""
    lengths = np.asarray(lengths, dtype=np.int64)
    starts = np.zeros(lengths.size, dtype=np.int64)
    K = np.array([int(n - 1).bit_length() if n else 0 for n in lengths], dtype=np.int64)
    end = 0
    for n in np.argsort(-lengths, kind="stable"):
        if lengths[n] == 0:
            continue
        block = 1 << int(K[n])
        starts[n] = -(-end // block) * block
        end = int(starts[n] + lengths[n])
    return starts, end, K


def _as_one_stream(module, q, k, v, beta, g, level_scales, scale, offset, length, final_slots=None):
    """Packed sequences without state (``q (1, Hqk, T, Dk)`` ... on the operator's layout) by one
    call of ``module`` over the aligned stream of :func:`stream_layout`: the tokens gathered to
    their stream positions (zeros between), each token's level scales above its sequence's ``K``
    set to 0 (the levels that would reach an earlier sequence) and its sequence's first log-decay
    to -inf (a zero transition between sequences; it multiplies no pair of its own, as at
    position 0); the outputs gathered back.  One launch set
    instead of one per sequence, on at most twice the tokens; differentiable (the gathers are).
    With ``final_slots`` (a backend with ``gated_delta_packed_prefill``, no gradient) also each
    sequence's final bucket states, ``(N, H, final_slots, Dk, Dv)`` in the work dtype:
    ``(o, states)``."""
    T = q.shape[2]
    starts, Ts, K = stream_layout(length)
    dev = q.device
    # per packed row, formed on the device from one copy of the per-sequence values: its sequence,
    # its position in it, its stream position and its sequence's highest level
    starts_t, offset_t, K_t, length_t = to_device(np.stack([starts, offset, K, length]).astype(np.int64), dev)
    seq = torch.repeat_interleave(torch.arange(length.size, device=dev), length_t, output_size=T)
    rel = torch.arange(T, device=dev) - offset_t[seq]
    dst_t = starts_t[seq] + rel

    def gather(x):  # the packed rows at their stream positions, zeros between (x's memory order)
        return None if x is None else registry.scatter_rows(x, 2, dst_t, Ts)

    L = fenwick.num_levels(Ts)
    lam = level_scales[..., :L]
    lam = torch.nn.functional.pad(lam, (0, L - lam.shape[-1])) if lam.shape[-1] < L else lam
    keep = torch.arange(L, device=dev)[None, :] <= K_t[seq][:, None]
    lam = gather(torch.where(keep, lam, torch.zeros((), dtype=lam.dtype, device=dev)))
    # each sequence's first log-decay -inf: its token's transition is 0, so no product of transitions
    # runs across sequences (a growing gate could overflow one, and 0 · inf is NaN), and no gradient
    # reaches that log-decay (it multiplies no pair at position 0); the stream's zero rows keep
    # log-decay 0 (identity transitions)
    g = g if g is not None else level_scales.new_zeros((1, v.shape[1], T))
    gs = gather(torch.where(rel == 0, torch.full((), float("-inf"), dtype=g.dtype, device=dev), g))
    views = registry.grouped_delta_heads(gather(q), gather(k), gather(v), gather(beta), lam, gs)
    if final_slots is None:
        return module.gated_delta_attention(*views, scale).flatten(1, 2).index_select(2, dst_t)
    o, finals = module.gated_delta_packed_prefill(*views, scale, starts, length, final_slots)
    return o.flatten(1, 2).index_select(2, dst_t), finals.flatten(0, 1).flatten(1, 2)


def _pick(x, rows, sl=slice(None)):
    """Rows ``rows`` (an index array) of ``x`` along dim 0, positions ``sl`` along dim 2: ``x``
    itself when they cover it (a slice, even a whole one, would cost the backward a zero fill and
    a copy of the gradient), a view when the rows are consecutive (every row of an unpacked batch,
    one packed sequence), a copy otherwise."""
    if x is None:
        return None
    if rows.size and np.array_equal(rows, np.arange(rows[0], rows[0] + rows.size)):
        if rows.size != x.shape[0]:
            x = x.narrow(0, int(rows[0]), rows.size)
    else:
        x = x.index_select(0, to_device(rows, x.device))
    start, stop, step = sl.indices(x.shape[2])
    if (start, stop, step) == (0, x.shape[2], 1):
        return x
    return x[:, :, sl]


def _in_order(parts, n):
    """Concatenate ``[(indices, x)]`` along dim 0 and put row ``indices[i]`` at ``i``."""
    x = parts[0][1] if len(parts) == 1 else torch.cat([p for _, p in parts])
    order = np.concatenate([i for i, _ in parts])
    if np.array_equal(order, np.arange(n)):
        return x
    return x.index_select(0, to_device(np.argsort(order), x.device))


KEPT_CHUNKS = ("X", "W", "states", "trans", "decays")
"""The forward's intermediates the Gated DeltaNet operator keeps for its backward (the triton
backend's ``gated_delta_keeping_chunks``), as extra outputs, empty where it keeps none."""


@torch.library.custom_op("hodlr::log_linear_gated_delta_rule", mutates_args=())
def _gd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: Optional[torch.Tensor], beta: torch.Tensor,
           level_scales: torch.Tensor, scale: float, initial_states: Optional[torch.Tensor],
           initial_positions: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor], output_final_state: bool,
           final_slots: int, backend: str, keep: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                torch.Tensor, torch.Tensor, torch.Tensor,
                                                                torch.Tensor, torch.Tensor]:
    """:func:`log_linear_gated_delta_rule` on the ``(N, H, T, D)`` layout with flat arguments, what
    ``torch.compile`` sees: ``(o, states, positions, *kept)``, ``states, positions`` empty without
    ``output_final_state``; ``kept`` the forward's :data:`KEPT_CHUNKS` that the backward reads instead
    of recomputing them (:func:`_gd_keeper`; ``keep``: ``hodlr.options.gated_delta_save_states`` where
    a gradient is wanted, False otherwise, an argument so that a compiled graph is traced, guarded and
    cached with it), else empty."""
    _check_values(q.shape[0], q.shape[2], level_scales.shape[-1], cu_seqlens, initial_positions,
                  None if initial_states is None else initial_states.shape[2])
    nothing = level_scales.new_empty((0,))
    no_positions = q.new_empty((0,), dtype=torch.int64)
    keeper = _gd_keeper(q, initial_states, cu_seqlens, output_final_state, backend, keep)
    if keeper is not None:
        o, *kept = keeper.gated_delta_keeping_chunks(q, k, v, beta, level_scales, g, scale)
        kept = [nothing.clone() if x is None else x for x in kept]
        return (o.contiguous(), nothing, no_positions, *kept)
    o, states, positions = _gated_delta_forward(q, k, v, beta, g, level_scales, scale, initial_states,
                                                initial_positions, cu_seqlens, output_final_state, final_slots,
                                                backend)
    none_kept = tuple(nothing.clone() for _ in KEPT_CHUNKS)
    if not output_final_state:
        return (o.contiguous(), nothing, no_positions, *none_kept)
    _check_final_slots(states, positions, final_slots)
    return (o.contiguous(), states.contiguous(), positions.contiguous(), *none_kept)


def _plain_path(q, initial_states, cu_seqlens, output_final_state) -> bool:
    """Whether an operator's call takes its backend's plain path: no state, no packed sequences,
    tokens (where the backward kernels read what the forward kept)."""
    return (initial_states is None and cu_seqlens is None and not output_final_state and q.shape[0] > 0
            and q.shape[2] > 0)


def _gd_keeper(q, initial_states, cu_seqlens, output_final_state, backend, keep):
    """The backend module whose Gated DeltaNet forward keeps its chunks for the operator's backward
    (``gated_delta_keeping_chunks``: the ``triton`` backend) when ``keep``, on the plain path of its
    ``gated_delta_vjp``, or None."""
    if not _plain_path(q, initial_states, cu_seqlens, output_final_state):
        return None
    module = _resolve_gated_delta(backend, q.device, False, q.shape[-1], dtype=q.dtype)
    if not keep or not hasattr(module, "gated_delta_keeping_chunks"):
        return None
    return module if module.keeps_chunks() else None


@_gd_op.register_fake
def _gd_op_fake(q, k, v, g, beta, level_scales, scale, initial_states, initial_positions, cu_seqlens,
                output_final_state, final_slots, backend, keep):
    outs = _fake_outputs(q, v, level_scales, cu_seqlens, output_final_state, final_slots)
    keeper = _gd_keeper(q, initial_states, cu_seqlens, output_final_state, backend, keep)
    if keeper is None:
        return (*outs, *(level_scales.new_empty((0,)) for _ in KEPT_CHUNKS))
    shapes = keeper.kept_chunk_shapes(q, v, g is not None)
    return (*outs, *(q.new_empty(shapes[name][0], dtype=shapes[name][1]) if name in shapes
                     else level_scales.new_empty((0,)) for name in KEPT_CHUNKS))


@torch.library.custom_op("hodlr::log_linear_gated_delta_rule_backward", mutates_args=())
def _gd_op_backward(do: torch.Tensor, dstates: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    g: Optional[torch.Tensor], beta: torch.Tensor, level_scales: torch.Tensor, scale: float,
                    initial_states: Optional[torch.Tensor], initial_positions: Optional[torch.Tensor],
                    cu_seqlens: Optional[torch.Tensor], output_final_state: bool, final_slots: int,
                    backend: str, kept: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                     torch.Tensor, torch.Tensor, torch.Tensor,
                                                                     torch.Tensor]:
    """Gradients ``(dq, dk, dv, dg, dbeta, dlevel_scales, dinitial_states)`` of :func:`_gd_op`
    (empty for an absent ``g`` / initial state): straight from the backend's backward kernels where
    it has them (``gated_delta_vjp``: triton, calls without state, packed sequences or final
    state; reading the forward's ``kept`` chunks where it kept them), else the backend's forward
    recomputed under autograd."""
    stateful = initial_states is not None or output_final_state
    module = _resolve_gated_delta(backend, q.device, stateful, q.shape[-1], dtype=q.dtype)
    vjp = getattr(module, "gated_delta_vjp", None)
    inputs = (q, k, v, g, beta, level_scales, initial_states)
    if vjp is not None and _plain_path(q, initial_states, cu_seqlens, output_final_state):
        X, W, states, trans, decays = kept  # (KEPT_CHUNKS)
        saved = (X, W, states, trans, None if g is None else decays) if X.numel() else None
        dq, dk, dv, dbeta, dlam, dg = vjp(q, k, v, beta, level_scales, g, scale, do, saved=saved)
        grads = (dq, dk, dv, dg, dbeta, dlam, None)
        return tuple(_gradient(do, x, d) for x, d in zip(inputs, grads))

    if stateful and not registry.keeps_state(module, "gated_delta_attention"):
        backend = "chunked"  # a backend that differentiates no state ran the forward (without autograd)

    def forward(q, k, v, g, beta, lam, init):
        return _gated_delta_forward(q, k, v, beta, g, lam, scale, init, initial_positions, cu_seqlens,
                                    output_final_state, final_slots, backend)[:2]

    return _recompute_grads(forward, list(inputs), do, dstates, output_final_state)


@_gd_op_backward.register_fake
def _gd_op_backward_fake(do, dstates, q, k, v, g, beta, level_scales, scale, initial_states, initial_positions,
                         cu_seqlens, output_final_state, final_slots, backend, kept):
    return _fake_grads(do, (q, k, v, g, beta, level_scales, initial_states))


def _gd_setup_context(ctx, inputs, output):
    q, k, v, g, beta, lam, scale, init, pos, cu, final, slots, backend, _ = inputs
    ctx.mark_non_differentiable(*output[2:])
    ctx.save_for_backward(q, k, v, g, beta, lam, init, pos, cu, *output[3:])
    ctx.args = (scale, final, slots, backend)


@_checks.without_autocast
def _gd_backward(ctx, do, dstates, dpositions, *_):
    q, k, v, g, beta, lam, init, pos, cu, *kept = ctx.saved_tensors
    scale, final, slots, backend = ctx.args
    dq, dk, dv, dg, dbeta, dlam, dinit = torch.ops.hodlr.log_linear_gated_delta_rule_backward(
        do, _dstates(dstates, q, v, lam, cu, final, slots), q, k, v, g, beta, lam, scale, init, pos, cu, final,
        slots, backend, kept)
    return (dq, dk, dv, None if g is None else dg, dbeta, dlam, None, None if init is None else dinit,
            None, None, None, None, None, None)


_gd_op.register_autograd(_gd_backward, setup_context=_gd_setup_context)


@_checks.without_autocast
def log_linear_gated_delta_rule(q, k, v, g, beta, level_scales, *, scale=None, initial_state=None,
                                output_final_state=False, cu_seqlens=None, backend: str = "auto"):
    """Log-linear Gated DeltaNet on flash-linear-attention's layout: the arguments of fla's
    ``chunk_gated_delta_rule`` (same order, ``(B, T, H, D)``) plus ``level_scales``, with state
    hand-off and packed sequences.

    Per sequence and head, with ``A_t = exp(g_t) (I - beta_t k_t k_tᵀ)`` and positions absolute:
    ``o_t = scale * sum_{s <= t} level_scales[t, level(t, s)] * beta_s * (q_tᵀ A_t ⋯ A_{s+1} k_s) v_s``
    (:func:`hodlr.gated_delta_attention`); with every level scale 1 it is Gated DeltaNet.

    Parameters
    ----------
    q, k : torch.Tensor, shape ``(B, T, Hqk, Dk)``
    v : torch.Tensor, shape ``(B, T, H, Dv)``
        ``Hqk`` divides ``H``; head ``h`` of ``v`` reads head ``h // (H // Hqk)`` of ``q`` and ``k``.
        The delta rule expects keys of unit norm (normalise them first, as fla's
        ``use_qk_l2norm_in_kernel`` does).
    g : torch.Tensor, shape ``(B, T, H)``, or None
        Per-token log-decay, ``A_t`` carries ``exp(g_t)`` (``None``: no decay).
    beta : torch.Tensor, shape ``(B, T, H)``
        Write strengths (in ``[0, 1]``, or ``[0, 2]`` for negative eigenvalues).
    level_scales : torch.Tensor, shape ``(B, T, H, L)``
        Row ``t`` reads level 0 and level ``l >= 1`` iff bit ``l - 1`` of its absolute position is
        set; ``L >= num_levels(largest end position)``; other entries are never read (NaN allowed).
        ``g``, ``beta`` and ``level_scales`` are used in float32 (float64 for float64 inputs).
    scale : float, optional
        Multiplies every ``q_tᵀ ⋯ k_s``; default ``Dk ** -0.5`` (as fla).
    initial_state : hodlr.LogLinearState, optional
        One row per sequence (``B``, or ``len(cu_seqlens) - 1``): the Fenwick bucket states after
        every transition up to the sequence's position (docs/mathematics.md), float32 (float64 for
        float64 inputs).  Sequence ``n`` starts at absolute position ``initial_state.positions[n]``.
        Gradients flow into ``initial_state.states``.
    output_final_state : bool
        Also return the state after the last token of every sequence.
    cu_seqlens : torch.Tensor, shape ``(N + 1,)``, int32 or int64, optional
        Packed sequences: ``B == 1``, sequence ``n`` is ``[cu_seqlens[n], cu_seqlens[n + 1])`` along
        ``T``, its own Fenwick tree (positions restart at 0, or at its state's position).  Empty
        sequences pass their state through.
    backend : str, default ``"auto"``
        ``"triton"`` (the Triton kernels, forward and backward, ``Dk <= 128``; calls with a state
        only without gradient; one token from a state on the decode kernel, any ``Dk``): what
        ``auto`` picks on a GPU for calls without state or without gradient when ``Dk <= 128``, and
        for one token from a state at any ``Dk``,
        ``"chunked"`` (what ``auto`` picks otherwise), ``"fenwick"``
        (the recurrence) or ``"dense"`` (the reference; no state).  ``g > 0`` (a gate that
        grows) is outside the chunk-wise backends' accuracy (docs/mathematics.md §13, growth
        gates): use ``"fenwick"`` there.

    Returns
    -------
    o : torch.Tensor, shape ``(B, T, H, Dv)``, the dtype of ``v``
    final_state : hodlr.LogLinearState or None
        With ``max(S, bit_length(largest end position))`` slots (``S`` those of the initial state).
        Under ``torch.compile`` (the custom operator ``torch.ops.hodlr.log_linear_gated_delta_rule``)
        the slot count cannot depend on values: it is the initial state's (``bit_length(T)``
        without one), and a call whose end positions need more raises.

    Raises
    ------
    ValueError, TypeError
        As :func:`log_linear_attn`, and for ``beta`` of another shape than ``(B, T, H)``; its
        ``LevelsExceededError`` and ``BackendUnavailableError`` too (the backends that keep a Gated
        DeltaNet state with its gradient: ``chunked``, ``fenwick``; ``triton`` raises it for a call
        with a state where a gradient is wanted, ``dense`` for every call with a state).

    Examples
    --------
    >>> import torch, hodlr
    >>> B, T, H, D = 2, 10, 3, 4
    >>> q, v = (torch.randn(B, T, H, D, dtype=torch.float64) for _ in range(2))
    >>> k = torch.nn.functional.normalize(torch.randn(B, T, H, D, dtype=torch.float64), dim=-1)
    >>> g, beta = -torch.rand(B, T, H, dtype=torch.float64), torch.rand(B, T, H, dtype=torch.float64)
    >>> lam = torch.rand(B, T, H, hodlr.num_levels(T), dtype=torch.float64)
    >>> o, _ = hodlr.log_linear_gated_delta_rule(q, k, v, g, beta, lam)
    >>> o1, state = hodlr.log_linear_gated_delta_rule(q[:, :7], k[:, :7], v[:, :7], g[:, :7], beta[:, :7],
    ...                                               lam[:, :7], output_final_state=True)
    >>> o2, _ = hodlr.log_linear_gated_delta_rule(q[:, 7:], k[:, 7:], v[:, 7:], g[:, 7:], beta[:, 7:],
    ...                                           lam[:, 7:], initial_state=state)
    >>> bool(torch.allclose(torch.cat([o1, o2], 1), o)), state.positions.tolist()
    (True, [7, 7])
    """
    scale, _, output_final_state = _check_static(q, k, v, g, level_scales, initial_state, output_final_state,
                                                 cu_seqlens, scale)
    _tensor("beta", beta, 3, "(B, T, H)")
    if tuple(beta.shape) != tuple(v.shape[:3]):
        raise ValueError(f"beta must have shape (B, T, H) = {tuple(v.shape[:3])}, got {tuple(beta.shape)}")
    _checks.check_same_home({"q": q, "beta": beta})
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, one of {('auto',) + registry.NAMES}, got {type(backend).__name__}")
    work = work_dtype(v.dtype)
    B, T, L = q.shape[0], q.shape[1], level_scales.shape[-1]
    init = None if initial_state is None else initial_state.states
    pos = None if initial_state is None else initial_state.positions
    S_in = 0 if initial_state is None else initial_state.num_slots
    beta_, lam = _bhtd(beta).to(work), _bhtd(level_scales).to(work)
    g_ = None if g is None else _bhtd(g).to(work)
    if torch.compiler.is_compiling():
        # no host read while tracing: the slot count comes from shapes (as log_linear_attn)
        final_slots = 0 if not output_final_state else S_in if initial_state is not None else fenwick.num_slots(int(T))
        keep = flag("gated_delta_save_states") and _checks.wants_grad(q, k, v, g, beta, level_scales, init)
        o, states, positions, *_ = _gd_op(_bhtd(q), _bhtd(k), _bhtd(v), g_, beta_, lam, scale, init, pos,
                                          cu_seqlens, output_final_state, final_slots, backend, keep)
    else:
        cu = None if cu_seqlens is None else cu_seqlens.tolist()  # one host read for the checks and the rows
        end = _check_values(B, T, L, cu, pos, S_in if initial_state is not None else None)
        rows = _kernel_decoding_rows(T, initial_state, cu, backend, q, k, v, g, beta, level_scales)
        if rows:  # decoding: the decode kernel
            state = initial_state.with_slots(max(S_in, fenwick.num_slots(end)))  # new tensors, stepped in place
            o = rows(log_linear_gated_delta_step, q, k, v, g, beta, level_scales, state, scale=scale,
                     backend="triton", validate=False)
            return o, (state if output_final_state else None)
        o, states, positions = _gated_delta_forward(_bhtd(q), _bhtd(k), _bhtd(v), beta_, g_, lam, scale, init, pos,
                                                    cu_seqlens, output_final_state, max(S_in, fenwick.num_slots(end)),
                                                    backend)
        o = _joined(o, q, k, v, g, beta, level_scales)
    o = o.transpose(1, 2)
    if not output_final_state:
        return o, None
    return o, LogLinearState(states, positions, validate=False)


@_checks.without_autocast
def log_linear_gated_delta_step(q, k, v, g, beta, level_scales, state, *, scale=None, backend: str = "auto",
                                validate: bool = True, state_indices=None):
    """One decoding step of log-linear Gated DeltaNet for a batch of sequences, each at its own
    position: consumes one token per sequence and updates ``state`` in place (its ``states`` and
    ``positions`` tensors), with no host read when ``validate`` is False (so the step can be
    captured in a CUDA graph).

    For the token at position ``p`` (docs/mathematics.md §13, the recurrent form): every live
    bucket state is moved by ``A = exp(g) (I - beta k kᵀ)``; the output is
    ``scale * (λ[0] beta (q · k) v + Σ_l λ[l] (A S_l)ᵀ q)`` over the live levels ``l`` (the set bits
    of ``p``); the slots of the trailing one-bits of ``p`` merge with the token's write ``beta k vᵀ``
    into the slot of level ``bit_length(p XOR (p + 1))`` and are cleared.

    Parameters
    ----------
    q, k : torch.Tensor, shape ``(B, 1, Hqk, Dk)``
    v : torch.Tensor, shape ``(B, 1, H, Dv)``
    g : torch.Tensor, shape ``(B, 1, H)``, or None
    beta : torch.Tensor, shape ``(B, 1, H)``
    level_scales : torch.Tensor, shape ``(B, 1, H, L)``
        The layout of :func:`log_linear_gated_delta_rule` with ``T = 1``; level 0 and the levels of
        the live slots are read.
    state : hodlr.LogLinearState
        ``B`` sequences, float32 (float64 for float64 inputs); each must stay below ``2**S`` (``S``
        its slots) after the step.
    scale : float, optional
        Default ``Dk ** -0.5`` (as :func:`log_linear_gated_delta_rule`).
    backend : ``"auto"``, ``"triton"`` or ``"torch"``
        As :func:`log_linear_attn_step`'s: ``triton`` the decode kernel
        (``hodlr.kernels.decode.decode_step`` with ``beta``: two launches, each state tile read and
        written once), ``torch`` torch operations on the state's slots; ``auto`` picks ``triton`` on
        a GPU, ``torch`` for a float64 state and on the CPU.
    validate : bool, default True
        Read the positions on the host and refuse a step that would overflow the state's slots or
        read past ``level_scales``.  Pass False inside CUDA-graph capture; a row whose step would
        overflow is then left unchanged and its output is NaN.
    state_indices : torch.Tensor, shape ``(B,)``, int64, optional
        As :func:`log_linear_attn_step`'s: row ``n`` of the inputs steps row ``state_indices[n]``
        of ``state`` in place (gathered, stepped and scattered back).

    Returns
    -------
    o : torch.Tensor, shape ``(B, 1, H, Dv)``, the dtype of ``v``.  No gradients: the step is for
    inference (it runs under ``torch.no_grad``).

    Examples
    --------
    >>> import torch, hodlr
    >>> B, T, H, D = 2, 5, 2, 4
    >>> q, v = (torch.randn(B, T, H, D, dtype=torch.float64) for _ in range(2))
    >>> k = torch.nn.functional.normalize(torch.randn(B, T, H, D, dtype=torch.float64), dim=-1)
    >>> g, beta = -torch.rand(B, T, H, dtype=torch.float64), torch.rand(B, T, H, dtype=torch.float64)
    >>> lam = torch.rand(B, T, H, hodlr.num_levels(T), dtype=torch.float64)
    >>> o, _ = hodlr.log_linear_gated_delta_rule(q, k, v, g, beta, lam)
    >>> cache = hodlr.LogLinearState.zeros(B, H, D, D, max_position=T, dtype=torch.float64)
    >>> steps = [hodlr.log_linear_gated_delta_step(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], g[:, t:t + 1],
    ...                                            beta[:, t:t + 1], lam[:, t:t + 1], cache) for t in range(T)]
    >>> bool(torch.allclose(torch.cat(steps, 1), o)), cache.positions.tolist()
    (True, [5, 5])
    """
    scale = _check_step("log_linear_gated_delta_step", q, k, v, g, level_scales, state, scale, validate,
                        state_indices)
    _tensor("beta", beta, 3, "(B, 1, H)")
    if tuple(beta.shape) != tuple(v.shape[:3]):
        raise ValueError(f"beta must have shape (B, 1, H) = {tuple(v.shape[:3])}, got {tuple(beta.shape)}")
    _checks.check_same_home({"q": q, "beta": beta})
    if q.shape[0] == 0:  # no sequence: nothing to step (level scales of any width)
        _step_backend(backend, q, state, "gated_delta_attention")
        return v.new_empty(v.shape)
    return _step(q, k, v, g, beta, level_scales, state, scale, state_indices, backend)
