"""``LogLinearGatedDeltaNet``: the Gated DeltaNet block on log-linear Gated DeltaNet
(docs/layers.md)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from hodlr.fenwick.arrays import check_bool, check_int
from hodlr.nn.modules import (GATE_ACTIVATIONS, LayerCache, LogLinearLayer, RMSNormGated, ShortConvolution,
                              check_positive, l2norm, scaled_width)
from hodlr.ops import log_linear_gated_delta_rule

__all__ = ["LogLinearGatedDeltaNet"]


class LogLinearGatedDeltaNet(LogLinearLayer):
    """Log-linear Gated DeltaNet: the Gated DeltaNet block whose delta-rule mixing is weighed per
    Fenwick level by scales ``λ`` computed from the input.

    Per token ``t`` and value head ``h`` (query/key head ``h // (num_v_heads // num_heads)``):
    ``q, k, v`` are projected, short-convolved (SiLU), ``q`` and ``k`` L2-normalised;

    ``β_t = sigmoid(b_proj_t)`` (times 2 with ``allow_neg_eigval``),
    ``g_t = -exp(A_log) · softplus(a_proj_t + dt_bias)``,
    ``λ[t, ℓ] = softplus(L[h, ℓ] · l_proj[t, h, ℓ])``,

    ``o_t = head_dim^-½ Σ_{s <= t} λ[t, level(t, s)] β_s (q_tᵀ A_t ⋯ A_{s+1} k_s) v_s``,
    ``A_t = exp(g_t) (I − β_t k_t k_tᵀ)`` (:func:`hodlr.log_linear_gated_delta_rule`), then a
    per-head RMS norm gated by ``g_proj`` and ``o_proj``.  With ``hierarchical=False`` there is
    no ``λ`` (``λ ≡ 1``): Gated DeltaNet itself, the linear parent.

    Parameters
    ----------
    hidden_size : int, default 2048
    expand_v : float, default 2
        ``head_v_dim = head_dim * expand_v`` (must be an integer).
    head_dim : int, default 256
        Width of the query/key heads.
    num_heads : int, default 6
        Query/key heads.
    num_v_heads : int, optional
        Value heads (default ``num_heads``); a multiple of ``num_heads`` (grouped value heads).
    use_gate : bool, default True
        Output gate ``g_proj``; False: a plain per-head RMS norm.
    use_short_conv : bool, default True
        Short convolutions on ``q, k, v`` (False: SiLU of the projections).
    allow_neg_eigval : bool, default False
        ``β`` in ``[0, 2]`` (transitions with negative eigenvalues).
    conv_size : int, default 4
    conv_bias : bool, default False
    layer_idx : int, optional
        Kept for the caller's bookkeeping.
    norm_eps : float, default 1e-5
    output_gate_activation : {"swish", "silu", "sigmoid"}, default "swish"
        Of the output gate (with ``use_gate``); ``swish`` and ``silu`` are the same function.
    num_levels : int, default 15
        Columns of ``λ`` (``L`` and ``l_proj``): positions up to ``2**(num_levels - 1)``.
    hierarchical : bool, default True
        False: ``λ ≡ 1``, no ``L`` and no ``l_proj`` (Gated DeltaNet).
    backend : str, default ``"auto"``
        The backend of :func:`hodlr.log_linear_gated_delta_rule`: ``"auto"`` runs ``triton`` on a
        GPU for calls without a cache and for those with one and no gradient wanted (under
        ``torch.no_grad``, or parameters that require none) with ``head_dim <= 128``, else
        ``chunked``; one-token decoding from a cache runs the decode kernel at any ``head_dim``.
        ``"triton"`` takes a cache only while grad mode is off.

    Notes
    -----
    Parameter names and shapes are flash-linear-attention's ``GatedDeltaNet`` plus ``l_proj`` and
    ``L`` (the paper's log-linear Gated DeltaNet) (docs/layers.md).
    """

    OP = "gated_delta_attention"
    """The backend operation of its mixing (which backends keep its recurrent state)."""

    INPUTS = ("q_proj", "k_proj", "v_proj", "a_proj", "b_proj", "l_proj", "g_proj")
    """The projections of the hidden states (their weights' dtype is the one the input must have)."""

    def __init__(self, hidden_size: int = 2048, expand_v: float = 2, head_dim: int = 256, num_heads: int = 6,
                 num_v_heads: int | None = None, use_gate: bool = True, use_short_conv: bool = True,
                 allow_neg_eigval: bool = False, conv_size: int = 4, conv_bias: bool = False,
                 layer_idx: int | None = None, norm_eps: float = 1e-5, output_gate_activation: str = "swish", *,
                 num_levels: int = 15, hierarchical: bool = True, backend: str = "auto"):
        super().__init__()
        num_v_heads = num_heads if num_v_heads is None else num_v_heads
        sizes = {"hidden_size": hidden_size, "head_dim": head_dim, "num_heads": num_heads, "num_v_heads": num_v_heads,
                 "conv_size": conv_size}
        hidden_size, head_dim, num_heads, num_v_heads, conv_size = (
            check_int(name, value, 1) for name, value in sizes.items())
        use_gate, use_short_conv, allow_neg_eigval, conv_bias = (check_bool(name, value) for name, value in (
            ("use_gate", use_gate), ("use_short_conv", use_short_conv), ("allow_neg_eigval", allow_neg_eigval),
            ("conv_bias", conv_bias)))
        norm_eps = check_positive("norm_eps", norm_eps)
        if not isinstance(output_gate_activation, str) or output_gate_activation not in GATE_ACTIVATIONS:
            raise ValueError(f"output_gate_activation must be one of {', '.join(map(repr, GATE_ACTIVATIONS))}, got "
                             f"{output_gate_activation!r}")
        if num_v_heads % num_heads:
            raise ValueError(f"num_heads={num_heads} (query/key heads) must divide num_v_heads={num_v_heads}")
        head_v_dim = scaled_width("head_dim", head_dim, "expand_v", expand_v)  # the value head width
        self.hidden_size, self.expand_v, self.head_dim = hidden_size, expand_v, head_dim
        self.num_heads, self.num_v_heads = num_heads, num_v_heads
        self.head_k_dim, self.head_v_dim = head_dim, head_v_dim
        self.key_dim, self.value_dim = num_heads * head_dim, num_v_heads * self.head_v_dim
        self.use_gate, self.use_short_conv, self.allow_neg_eigval = use_gate, use_short_conv, allow_neg_eigval
        self.conv_size, self.conv_bias = conv_size, conv_bias
        self.layer_idx = layer_idx
        self._setup_levels(num_v_heads, num_levels, hierarchical, backend)

        self.q_proj = nn.Linear(hidden_size, self.key_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, self.key_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, self.value_dim, bias=False)
        self.a_proj = nn.Linear(hidden_size, num_v_heads, bias=False)
        self.b_proj = nn.Linear(hidden_size, num_v_heads, bias=False)
        if hierarchical:
            self.l_proj = nn.Linear(hidden_size, num_v_heads * self.num_levels, bias=False)
        self.A_log = nn.Parameter(torch.log(torch.empty(num_v_heads).uniform_(0, 16)))
        dt_min, dt_max, dt_floor = 0.001, 0.1, 1e-4
        dt = torch.exp(torch.rand(num_v_heads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_floor)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus(dt_bias) = dt
        self.A_log._no_weight_decay = self.dt_bias._no_weight_decay = True
        if use_short_conv:
            self.q_conv1d = ShortConvolution(self.key_dim, conv_size, bias=conv_bias)
            self.k_conv1d = ShortConvolution(self.key_dim, conv_size, bias=conv_bias)
            self.v_conv1d = ShortConvolution(self.value_dim, conv_size, bias=conv_bias)
        if use_gate:
            self.g_proj = nn.Linear(hidden_size, self.value_dim, bias=False)
        self.o_norm = RMSNormGated(self.head_v_dim, eps=norm_eps, norm_before_gate=True,
                                   activation=output_gate_activation)
        self.o_proj = nn.Linear(self.value_dim, hidden_size, bias=False)

    def forward(self, hidden_states: torch.Tensor, cache: LayerCache | None = None, use_cache: bool = False,
                cu_seqlens: torch.Tensor | None = None):
        """Mix ``hidden_states (B, T, hidden_size)`` along the sequence.

        Parameters
        ----------
        hidden_states : torch.Tensor, shape ``(B, T, hidden_size)``
        cache : hodlr.nn.LayerCache, optional
            Continue the ``B`` sequences from this cache (returned by an earlier call with
            ``use_cache=True``): their tokens are positions ``p .. p + T - 1``, ``p`` the
            cache's positions.  Not modified.
        use_cache : bool, default False
            Also return the cache after these tokens.
        cu_seqlens : torch.Tensor, shape ``(N + 1,)``, int32 or int64, optional
            Packed sequences (fla's convention): ``hidden_states`` is ``(1, T, hidden_size)`` and
            sequence ``n`` its tokens ``cu_seqlens[n] .. cu_seqlens[n + 1] - 1``; nothing crosses
            from one to the next (the short convolutions included), and a cache holds one row per
            sequence.  Equal to running the sequences one by one.

        Returns
        -------
        output : torch.Tensor, shape ``(B, T, hidden_size)``
        cache : hodlr.nn.LayerCache or None
            The recurrent state (``states (B, num_v_heads, S, head_k_dim, head_v_dim)``) and the
            three convolutions' last inputs, ``(B, key_dim, conv_size)`` for q and k and
            ``(B, value_dim, conv_size)`` for v (none without short convolutions).
        """
        self._check_call(hidden_states, cache, use_cache, cu_seqlens)
        x = hidden_states
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        convs = ()
        if self.use_short_conv:
            old = (None,) * 3 if cache is None else cache.conv
            (q, cq), (k, ck), (v, cv) = (conv(y, c, use_cache, cu_seqlens) for conv, y, c in
                                         zip((self.q_conv1d, self.k_conv1d, self.v_conv1d), (q, k, v), old))
            convs = (cq, ck, cv)
        else:
            q, k, v = F.silu(q), F.silu(k), F.silu(v)
        q, k = (l2norm(y.unflatten(-1, (self.num_heads, self.head_k_dim))) for y in (q, k))
        v = v.unflatten(-1, (self.num_v_heads, self.head_v_dim))
        a, b = self.a_proj(x), self.b_proj(x)
        work = torch.float64 if a.dtype == torch.float64 else torch.float32
        beta = torch.sigmoid(b.to(work)) * (2 if self.allow_neg_eigval else 1)
        g = -torch.exp(self.A_log.to(work)) * F.softplus(a.to(work) + self.dt_bias.to(work))
        lam = self._level_scales(self.l_proj(x) if self.hierarchical else None, x, self.num_v_heads, cache)
        with torch.autocast(x.device.type, enabled=False):
            o, state = self._call_op(
                log_linear_gated_delta_rule, q, k.to(q.dtype), v.to(q.dtype), g, beta, lam,
                initial_state=None if cache is None else cache.state, output_final_state=use_cache,
                cu_seqlens=cu_seqlens, backend=self.backend)
        gate = self.g_proj(x).unflatten(-1, (self.num_v_heads, self.head_v_dim)) if self.use_gate else None
        out = self.o_proj(self.o_norm(o, gate).flatten(-2))
        return out, (LayerCache(state, convs) if use_cache else None)

    def _cache_layout(self):
        convs = (self.q_conv1d, self.k_conv1d, self.v_conv1d) if self.use_short_conv else ()
        return (self.num_v_heads, self.head_k_dim, self.head_v_dim), convs

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, head_dim={self.head_dim}, num_heads={self.num_heads}, "
                f"num_v_heads={self.num_v_heads}, head_v_dim={self.head_v_dim}, num_levels={self.num_levels}, "
                f"hierarchical={self.hierarchical}, backend={self.backend!r}")
