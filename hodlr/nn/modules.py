"""The pieces the log-linear layers are built from: a short causal convolution that carries its
inputs from one call to the next, a gated RMS norm, the per-layer cache, and the level scales
``λ`` computed from the input.

Parameter names and shapes follow flash-linear-attention's modules (``ShortConvolution``,
``RMSNormGated`` / ``FusedRMSNormGated``), so that weights port by name (docs/layers.md).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hodlr import backends as registry, fenwick, ops
from hodlr._transfer import to_device
from hodlr.errors import BackendUnavailableError, LevelsExceededError
from hodlr.fenwick.arrays import check_bool, check_int
from hodlr.state import LogLinearState, batch_index

# the backends that keep each layer op's recurrent state, by name (a constant: compiled calls read it
# without importing the backend modules)
_STATEFUL = {op: tuple(registry.stateful(op)) for op in ("attention", "gated_delta_attention")}
# and those that take and return a Gated DeltaNet state without gradient only (hodlr.backends: gated_delta_with_state)
_STATEFUL_WITHOUT_GRADIENT = tuple(name for name in registry.NAMES
                                   if hasattr(registry.load(name), "gated_delta_with_state"))

__all__ = ["LayerCache", "RMSNormGated", "ShortConvolution", "level_scales"]


def check_hidden_states(layer, x) -> None:
    """``x`` must be a floating tensor ``(B, T, hidden_size)``."""
    name = type(layer).__name__
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: hidden_states must be a torch.Tensor of shape (B, T, {layer.hidden_size}), "
                        f"got {type(x).__name__}")
    if x.dim() != 3 or x.shape[-1] != layer.hidden_size:
        raise ValueError(f"{name}: hidden_states must have shape (B, T, hidden_size={layer.hidden_size}), "
                         f"got shape {tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name}: hidden_states must have a floating dtype, got {x.dtype}")
    # the projections that take x decide (the others, e.g. A_log or L, may be kept in float32)
    for part in layer.INPUTS:
        module = getattr(layer, part, None)
        if module is None:
            continue
        w = module.weight.dtype
        if torch.is_autocast_enabled(x.device.type):
            if x.dtype == torch.float64 and w != torch.float64:  # autocast leaves float64 as it is
                raise TypeError(f"{name}: float64 hidden_states meet {part}.weight in {w}, which autocast does not "
                                f"cast float64 to; pass hidden_states in {w} (or make the layer float64)")
        elif x.dtype != w:
            advice = "" if x.dtype == torch.float64 else " or run under torch.autocast"
            raise TypeError(f"{name}: hidden_states has dtype {x.dtype} but {part}.weight is {w}; convert one to the "
                            f"other (layer.to({x.dtype})){advice}")


def check_positive(name: str, value, *, zero: bool = False) -> float:
    """A layer's real setting must be a finite number > 0 (>= 0 with ``zero``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a finite number {'>=' if zero else '>'} 0, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero):
        raise ValueError(f"{name} must be a finite number {'>=' if zero else '>'} 0, got {value!r}")
    return float(value)


def scaled_width(base_name: str, base: int, factor_name: str, factor) -> int:
    """``base * factor`` as a positive integer width, allowing a float factor's rounding error
    (relative 1e-5, as flash-linear-attention's layers do: ``50 * 1.1`` is 55)."""
    if isinstance(factor, bool) or not isinstance(factor, (int, float)):
        raise TypeError(f"{factor_name} must be a number, got {type(factor).__name__}")
    width = base * factor if math.isfinite(factor) else math.nan
    n = round(width) if math.isfinite(width) else 0
    if n < 1 or not math.isclose(width, n, rel_tol=1e-5):
        raise ValueError(f"{base_name} * {factor_name} must be a positive integer, got {base_name}={base}, "
                         f"{factor_name}={factor!r}")
    return n


def level_scales(L: torch.Tensor, dl: torch.Tensor) -> torch.Tensor:
    """The per-head, per-level scales of the log-linear layers, ``λ = softplus(L · dl)``.

    ``L (H, num_levels)`` is a learned parameter (initialised to 1), ``dl (B, T, H, num_levels)``
    the projection of the input; ``λ`` is positive.  Computed in float32 (float64 for float64
    inputs): ``(B, T, H, num_levels)``.
    """
    work = torch.float64 if dl.dtype == torch.float64 else torch.float32
    return F.softplus(L.to(work) * dl.to(work))


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``x / sqrt(|x|² + eps)`` along the last dim, computed in float32 (the normalisation
    flash-linear-attention's Gated DeltaNet applies to its queries and keys)."""
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = x.to(work)
    return (y * torch.rsqrt(y.square().sum(-1, keepdim=True) + eps)).to(x.dtype)


class ShortConvolution(nn.Conv1d):
    """Depthwise causal convolution along the sequence, then the activation (SiLU by default),
    that carries its last ``kernel_size`` inputs from one call to the next.

    Parameters
    ----------
    hidden_size : int
        Channels ``D``.
    kernel_size : int
        Width ``W`` of the filter: output ``t`` sees inputs ``t - W + 1 .. t``.
    bias : bool, default False
    activation : ``"silu"`` or None, default ``"silu"``

    The parameters are ``weight (D, 1, W)`` and ``bias (D,)``, those of ``nn.Conv1d`` with
    ``groups = D`` (and of flash-linear-attention's ``ShortConvolution``).
    """

    def __init__(self, hidden_size: int, kernel_size: int, bias: bool = False, activation: str | None = "silu"):
        hidden_size, kernel_size = check_int("hidden_size", hidden_size, 1), check_int("kernel_size", kernel_size, 1)
        if activation not in ("silu", "swish", None):
            raise ValueError(f"activation must be 'silu' (or 'swish', the same) or None, got {activation!r}")
        super().__init__(hidden_size, hidden_size, kernel_size, groups=hidden_size, bias=bias)
        self.hidden_size = hidden_size
        self.activation = activation

    def forward(self, x: torch.Tensor, cache: torch.Tensor | None = None, output_final_state: bool = False,
                cu_seqlens: torch.Tensor | None = None):
        """Convolve ``x (B, T, D)`` after the inputs held in ``cache``.

        Parameters
        ----------
        x : torch.Tensor, shape ``(B, T, D)``
        cache : torch.Tensor, shape ``(B, D, W)`` (``(N, D, W)`` with ``cu_seqlens``), optional
            The last ``W`` inputs of the previous call, oldest first (zeros before the start);
            None: the sequence starts here.  Not modified.
        output_final_state : bool
            Also return the cache after ``x``.
        cu_seqlens : torch.Tensor, shape ``(N + 1,)``, optional
            Packed sequences (``B = 1``): sequence ``n`` is tokens ``cu_seqlens[n] ..
            cu_seqlens[n + 1] - 1``, convolved after row ``n`` of ``cache`` and nothing else
            (checked by the layers that pass it).

        Returns
        -------
        y : torch.Tensor, shape ``(B, T, D)``
        cache : torch.Tensor, shape ``(B, D, W)`` (``(N, D, W)``), or None
        """
        if cu_seqlens is not None:
            return self._packed(x, cache, output_final_state, cu_seqlens)
        D = self.in_channels
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != D:
            got = f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be a tensor of shape (B, T, D) with D = {D} (the channels), got {got}")
        B, T, _ = x.shape
        W = self.kernel_size[0]
        xt = x.transpose(1, 2)
        if cache is None:
            cache = xt.new_zeros((B, D, W))
        elif tuple(cache.shape) != (B, D, W):
            raise ValueError(f"the convolution cache must have shape (B, D, W) = {(B, D, W)}, "
                             f"got {tuple(cache.shape)}")
        full = torch.cat([cache.to(xt.dtype), xt], -1)
        if T == 0:  # no tokens: nothing to convolve, the cache passes through
            return x.new_zeros((B, 0, D)), (full[..., -W:] if output_final_state else None)
        y = F.conv1d(full[..., 1:], self.weight, self.bias, groups=D)
        if self.activation is not None:
            y = F.silu(y)
        return y.transpose(1, 2), (full[..., -W:] if output_final_state else None)

    def _packed(self, x, cache, output_final_state, cu_seqlens):
        """:meth:`forward` over packed sequences: each token's window gathered from its own
        sequence's inputs and, before its first token, from that sequence's cache row."""
        D, W, T = self.in_channels, self.kernel_size[0], x.shape[1]
        N = cu_seqlens.shape[0] - 1
        if cache is None:
            cache = x.new_zeros((N, D, W))
        elif tuple(cache.shape) != (N, D, W):
            raise ValueError(f"the convolution cache must have shape (N, D, W) = {(N, D, W)} (one row per "
                             f"sequence of cu_seqlens), got {tuple(cache.shape)}")
        cu = cu_seqlens.to(device=x.device, dtype=torch.long)
        seq = torch.searchsorted(cu[1:], torch.arange(T, device=x.device), right=True)  # each token's sequence
        # one buffer: the caches' W columns a sequence, then the tokens; the input at lag j of a token at
        # offset r of sequence n is token t - j, or (r < j) column W + r - j of cache row n
        buffer = torch.cat([cache.to(x.dtype).transpose(1, 2).reshape(N * W, D), x[0]], 0)  # (N W + T, D)

        def window(n, r, t):
            lag = torch.arange(W - 1, -1, -1, device=x.device)  # the kernel's taps, oldest first
            inside = r[:, None] >= lag
            return torch.where(inside, N * W + t[:, None] - lag, n[:, None] * W + W + r[:, None] - lag)

        t = torch.arange(T, device=x.device)
        taps = buffer[window(seq, t - cu[seq], t)]  # (T, W, D)
        y = (taps * self.weight[:, 0].t().to(taps.dtype)).sum(1)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        if self.activation is not None:
            y = F.silu(y)
        final = None
        if output_final_state:  # the W inputs ending at each sequence's last token (its cache if empty)
            n = torch.arange(N, device=x.device)
            final = buffer[window(n, cu[1:] - cu[:-1] - 1, cu[1:] - 1)].transpose(1, 2)  # (N, D, W)
        return y[None], final


GATE_ACTIVATIONS = {"swish": F.silu, "silu": F.silu, "sigmoid": torch.sigmoid}
"""The gate activations :class:`RMSNormGated` takes (flash-linear-attention's names: ``swish`` and
``silu`` are one function)."""


class RMSNormGated(nn.Module):
    """RMS norm with an optional gate, computed in float32 and returned in the input's dtype.

    ``norm_before_gate=False``: ``rmsnorm(x · act(z)) · weight``; ``True``:
    ``rmsnorm(x) · weight · act(z)``; without ``z`` a plain RMS norm.  ``act`` is ``silu`` (or
    ``sigmoid``: ``activation``).  With ``group_size`` the mean square is taken over groups of that
    many channels.

    Parameters
    ----------
    hidden_size : int
    eps : float, default 1e-5
    group_size : int, optional
        Must divide ``hidden_size``; None: one group.
    norm_before_gate : bool, default False
    activation : {"swish", "silu", "sigmoid"}, default "silu"
        Of the gate (``swish`` and ``silu`` are the same function).
    """

    def __init__(self, hidden_size: int, eps: float = 1e-5, group_size: int | None = None,
                 norm_before_gate: bool = False, activation: str = "silu"):
        super().__init__()
        hidden_size = check_int("hidden_size", hidden_size, 1)
        group_size = hidden_size if group_size is None else check_int("group_size", group_size, 1)
        if hidden_size % group_size:
            raise ValueError(f"group_size={group_size} must divide hidden_size={hidden_size}")
        if not isinstance(activation, str) or activation not in GATE_ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(map(repr, GATE_ACTIVATIONS))}, got {activation!r}")
        self.hidden_size, self.eps, self.group_size = hidden_size, check_positive("eps", eps), group_size
        self.norm_before_gate = check_bool("norm_before_gate", norm_before_gate)
        self.activation = activation
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        """Normalise ``x (..., hidden_size)`` per group, gated by ``act(z)`` (``z`` of ``x``'s shape, or
        None: no gate); the result has ``x``'s shape and dtype."""
        if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] != self.hidden_size:
            got = f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be a tensor of shape (..., {self.hidden_size}), got {got}")
        if z is not None and (not isinstance(z, torch.Tensor) or z.shape != x.shape):
            got = f"shape {tuple(z.shape)}" if isinstance(z, torch.Tensor) else type(z).__name__
            raise ValueError(f"z (the gate) must be None or a tensor of x's shape {tuple(x.shape)}, got {got}")
        work = torch.float64 if x.dtype == torch.float64 else torch.float32
        y = x.to(work)
        gate = None if z is None else GATE_ACTIVATIONS[self.activation](z.to(work))
        if gate is not None and not self.norm_before_gate:
            y = y * gate
        groups = y.unflatten(-1, (-1, self.group_size))
        y = (groups * torch.rsqrt(groups.square().mean(-1, keepdim=True) + self.eps)).flatten(-2)
        y = y * self.weight.to(work)
        if gate is not None and self.norm_before_gate:
            y = y * gate
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"{self.hidden_size}, eps={self.eps}, group_size={self.group_size}, "
                f"norm_before_gate={self.norm_before_gate}, activation={self.activation!r}")


class LayerCache:
    """What one log-linear layer carries from one call to the next, one row per sequence.

    Parameters
    ----------
    state : hodlr.LogLinearState
        The recurrent state (the Fenwick bucket states and the positions).
    conv : tuple of torch.Tensor, each ``(N, D, W)``
        The short convolutions' last inputs (:class:`ShortConvolution`): one tensor for
        ``LogLinearMamba2``, three (q, k, v) for ``LogLinearGatedDeltaNet``, none without short
        convolutions.

    Supports ``.to(...)``, ``.detach()``, ``.clone()`` and batch selection / reordering
    (``cache[idx]``, :meth:`index_select`: beam search).
    """

    __slots__ = ("state", "conv")

    def __init__(self, state: LogLinearState, conv=()):
        if not isinstance(state, LogLinearState):
            raise TypeError(f"state must be a hodlr.LogLinearState, got {type(state).__name__}")
        if not isinstance(conv, (tuple, list)):
            raise TypeError(f"conv must be a tuple of tensors (N, D, W), one per short convolution (empty for none), "
                            f"got {type(conv).__name__}")
        conv = tuple(conv)
        for i, c in enumerate(conv):
            if not isinstance(c, torch.Tensor) or c.dim() != 3 or c.shape[0] != state.batch_size:
                got = tuple(c.shape) if isinstance(c, torch.Tensor) else type(c).__name__
                raise ValueError(f"conv[{i}] must be a tensor of shape (N, D, W) with N = {state.batch_size} "
                                 f"(the state's sequences), got {got}")
        self.state = state
        self.conv = conv

    @property
    def batch_size(self) -> int:
        return self.state.batch_size

    def __len__(self) -> int:
        return self.batch_size

    def __repr__(self) -> str:
        return f"LayerCache({self.state!r}, conv={[tuple(c.shape) for c in self.conv]})"

    def _map(self, on_state, on_conv) -> "LayerCache":
        return LayerCache(on_state(self.state), tuple(on_conv(c) for c in self.conv))

    def to(self, *args, **kwargs) -> "LayerCache":
        """``.to(*args, **kwargs)`` of the state (see ``LogLinearState.to``) and the convolution
        inputs."""
        return self._map(lambda s: s.to(*args, **kwargs), lambda c: c.to(*args, **kwargs))

    def detach(self) -> "LayerCache":
        return self._map(lambda s: s.detach(), lambda c: c.detach())

    def clone(self) -> "LayerCache":
        return self._map(lambda s: s.clone(), lambda c: c.clone())

    def with_slots(self, num_slots: int) -> "LayerCache":
        """The same cache with its state widened to ``num_slots`` Fenwick slots (see
        ``LogLinearState.with_slots``): room for positions below ``2**num_slots``, which a compiled
        call needs up front (its slot count is its initial state's)."""
        return LayerCache(self.state.with_slots(num_slots), self.conv)

    @classmethod
    def cat(cls, caches) -> "LayerCache":
        """The sequences of ``caches`` (a non-empty list of one layer's caches) one after another:
        prompts of different lengths prefilled apart, then decoded as one batch.  The states are
        joined by ``LogLinearState.cat`` (at the largest slot count), the convolution inputs along
        the batch."""
        caches = list(caches) if isinstance(caches, (list, tuple)) else caches
        if not isinstance(caches, list) or not caches or not all(isinstance(c, cls) for c in caches):
            raise TypeError(f"caches must be a non-empty list or tuple of hodlr.nn.LayerCache, got "
                            f"{type(caches).__name__}")
        if len({len(c.conv) for c in caches}) != 1:
            raise ValueError(f"caches must come from one layer: they hold {sorted({len(c.conv) for c in caches})} "
                             f"short-convolution inputs")
        state = LogLinearState.cat([c.state for c in caches])
        return cls(state, tuple(torch.cat(parts) for parts in zip(*(c.conv for c in caches))))

    def index_select(self, indices) -> "LayerCache":
        """The sequences ``indices`` (integers, repeats allowed), in that order: what beam search
        does to a cache."""
        state = self.state.index_select(indices)
        idx = to_device(indices, state.device)
        return LayerCache(state, tuple(c.index_select(0, idx.to(c.device)) for c in self.conv))

    def __getitem__(self, index) -> "LayerCache":
        """Batch selection as ``LogLinearState[index]`` (an int keeps the batch dim)."""
        index = batch_index(index, self.batch_size)
        return LayerCache(self.state[index], tuple(c[index] for c in self.conv))


class LogLinearLayer(nn.Module):
    """What the log-linear layers share: the level-scale configuration (``num_levels``,
    ``hierarchical``), the backend, and the checks of the input and the cache.  A layer defines
    ``OP``, the backend operation it mixes with (``hodlr.backends.OPS``), ``INPUTS``, the names of
    its projections of the hidden states (whose weights' dtype the input must have), and
    ``_cache_layout()`` (its state's ``(heads, Dk, Dv)`` and its short convolutions)."""

    def _setup_levels(self, num_heads: int, num_levels: int, hierarchical: bool, backend: str) -> None:
        self.num_levels = check_int("num_levels", num_levels, 1)
        hierarchical = check_bool("hierarchical", hierarchical)
        if not isinstance(backend, str):
            raise TypeError(f"backend must be a string ('auto' or a name of hodlr.backends), "
                            f"got {type(backend).__name__}")
        if backend != "auto" and backend not in registry.NAMES:
            raise ValueError(f"backend must be 'auto' or one of {', '.join(registry.NAMES)}, got {backend!r}")
        self.hierarchical = hierarchical
        self.backend = backend
        if hierarchical:
            self.L = nn.Parameter(torch.ones(num_heads, self.num_levels))
            self.L._no_weight_decay = True

    def _level_scales(self, dl: torch.Tensor | None, x: torch.Tensor, H: int,
                      cache: LayerCache | None = None) -> torch.Tensor:
        """``λ (B, T, H, num_levels)`` from the projection ``dl (B, T, H * num_levels)`` of
        ``x (B, T, hidden_size)``.  Without the hierarchy all ones (a broadcast view), as many
        levels as the call can read, so that the linear parent takes sequences of any length: a
        cache of ``S`` slots holds positions below ``2**S``, so its ``T`` tokens end before
        ``2**S - 1 + T``."""
        if not self.hierarchical:
            end = x.shape[1] + (0 if cache is None else (1 << cache.state.num_slots) - 1)
            return torch.ones((), device=x.device).expand(x.shape[0], x.shape[1], H, fenwick.num_levels(max(end, 1)))
        return level_scales(self.L, dl.unflatten(-1, (H, self.num_levels)))

    def new_cache(self, batch_size: int, *, max_position: int | None = None) -> LayerCache:
        """An empty cache (every sequence at position 0) for ``batch_size`` sequences, on the
        parameters' device: the recurrent state with ``bit_length(max_position)`` slots (default
        ``max_position = 2**(num_levels - 1)``, the most the layer reads) and zero convolution
        inputs.  A cache with enough slots never grows, which ``torch.compile`` needs (the slot
        count of a compiled call is the initial state's)."""
        batch_size = check_int("batch_size", batch_size, 0)
        max_position = 1 << (self.num_levels - 1) if max_position is None else check_int("max_position",
                                                                                        max_position, 0)
        (H, Dk, Dv), convs = self._cache_layout()
        p = self.A_log
        state = LogLinearState.zeros(batch_size, H, Dk, Dv, max_position=max_position,
                                     dtype=torch.float64 if p.dtype == torch.float64 else torch.float32,
                                     device=p.device)
        return LayerCache(state, tuple(p.new_zeros((batch_size, conv.hidden_size, conv.kernel_size[0]))
                                       for conv in convs))

    def _call_op(self, op, *args, **kwargs):
        """``op(*args, **kwargs)`` (the layer's log-linear op), its
        :class:`~hodlr.errors.LevelsExceededError` said in the layer's terms: its ``num_levels`` and
        the cache's position, not the op's ``level_scales`` columns (eager calls: under
        ``torch.compile`` the op's error reaches the caller as it is)."""
        try:
            return op(*args, **kwargs)
        except LevelsExceededError as error:
            reach = 1 << (self.num_levels - 1)
            start = "" if error.continued is None else f"continues a cache from position {error.continued} and "
            raise LevelsExceededError(
                f"{type(self).__name__} has num_levels={self.num_levels}: positions up to {reach - 1} "
                f"(2**(num_levels - 1) tokens a sequence), but this call {start}reaches position {error.end - 1}; "
                f"make the layer with num_levels >= {error.need}, or start a new cache", end=error.end,
                need=error.need, levels=error.levels, continued=error.continued) from None

    def _check_call(self, x, cache, use_cache, cu_seqlens=None) -> None:
        check_hidden_states(self, x)
        name = type(self).__name__
        N = x.shape[0]
        if cu_seqlens is not None:  # the op checks them too, after the convolutions have read them
            N = ops.check_cu_seqlens(cu_seqlens, x, "hidden_states")
            if not torch.compiler.is_compiling():  # (compiled, the op refuses them when it runs)
                ops.check_cu_seqlens_values(cu_seqlens, x.shape[1], "hidden_states")
        if not isinstance(use_cache, (bool, np.bool_)):
            raise TypeError(f"{name}: use_cache must be a bool, got {type(use_cache).__name__}")
        if (use_cache or cache is not None) and self.backend != "auto" and self.backend not in _STATEFUL[self.OP]:
            if self.OP == "gated_delta_attention" and self.backend in _STATEFUL_WITHOUT_GRADIENT:
                if torch.is_grad_enabled():  # the op's inputs come from the layer's parameters
                    raise BackendUnavailableError(
                        f"{name} has backend={self.backend!r}, which takes and returns a cache only without "
                        f"gradient: call it under torch.no_grad() (generation), or make the layer with "
                        f"backend='auto' or one of {', '.join(_STATEFUL[self.OP])}")
            else:
                raise BackendUnavailableError(f"{name} has backend={self.backend!r}, which keeps no recurrent state: "
                                              f"it takes no cache and returns none (use_cache=True, cache=...); make "
                                              f"the layer with backend='auto' or one of {', '.join(_STATEFUL[self.OP])}")
        if cache is None:
            if not self.hierarchical or cu_seqlens is not None:  # λ ≡ 1: no limit; packed: the op checks
                return
            reach = 1 << (self.num_levels - 1)
            # (compiled, the op raises the same error when it runs: a raise in traced code cannot leave a
            # graph compiled with fullgraph=True as itself)
            if x.shape[1] > reach and not torch.compiler.is_compiling():
                need = fenwick.num_levels(x.shape[1])
                raise LevelsExceededError(f"{name} has num_levels={self.num_levels}: sequences up to {reach} tokens "
                                          f"(2**(num_levels - 1)), got {x.shape[1]}; make the layer with "
                                          f"num_levels >= {need}", end=x.shape[1], need=need,
                                          levels=self.num_levels)
            return
        if not isinstance(cache, LayerCache):
            raise TypeError(f"{name}: cache must be a hodlr.nn.LayerCache (returned with use_cache=True, or "
                            f"new_cache()), got {type(cache).__name__}")
        if cache.batch_size != N:
            what = f"{N} packed sequences (cu_seqlens)" if cu_seqlens is not None else f"a batch of {N}"
            raise ValueError(f"{name}: the cache holds {cache.batch_size} sequences but hidden_states has {what}")
        (H, Dk, Dv), convs = self._cache_layout()
        s = cache.state
        want = [(H, Dk, Dv)] + [(c.hidden_size, c.kernel_size[0]) for c in convs]
        got = [(s.num_heads, s.Dk, s.Dv)] + [tuple(c.shape[1:]) for c in cache.conv]
        if got != want:
            raise ValueError(f"{name}: the cache does not fit this layer: state (heads, Dk, Dv) and convolution "
                             f"(channels, width) {want} wanted, got {got}")
        for part, tensor in [("cache.state", s)] + [(f"cache.conv[{i}]", c) for i, c in enumerate(cache.conv)]:
            if tensor.device != x.device:
                raise ValueError(f"{name}: {part} is on {tensor.device} but hidden_states is on {x.device}; "
                                 f"move the cache (cache.to({str(x.device)!r}))")
        work = torch.float64 if x.dtype == torch.float64 else torch.float32
        if s.dtype != work:
            raise TypeError(f"{name}: cache.state has dtype {s.dtype} but {x.dtype} hidden_states need a {work} state; "
                            f"convert it (cache.to({work}))")
        for i, c in enumerate(cache.conv):
            if not c.dtype.is_floating_point:
                raise TypeError(f"{name}: cache.conv[{i}] must have a floating dtype, got {c.dtype}")
