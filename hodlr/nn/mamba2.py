"""``LogLinearMamba2``: the Mamba-2 block on log-linear attention (docs/layers.md)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from hodlr.fenwick.arrays import check_bool, check_int
from hodlr.ops import log_linear_attn
from hodlr.nn.modules import LayerCache, LogLinearLayer, RMSNormGated, ShortConvolution, check_positive, scaled_width

__all__ = ["LogLinearMamba2"]


class LogLinearMamba2(LogLinearLayer):
    """Log-linear Mamba-2: the Mamba-2 block whose state-space mixing is log-linear attention
    with level scales ``λ`` computed from the input.

    Per token ``t``, head ``h`` (``x``, ``B``, ``C`` from the short convolution, group
    ``h // (num_heads // n_groups)`` of ``B`` and ``C``):

    ``dt_t = softplus(dt_proj_t + dt_bias)``,  ``g_t = -exp(A_log) · dt_t``,
    ``λ[t, ℓ] = softplus(L[h, ℓ] · dl_proj[t, h, ℓ])``,

    ``y_t = Σ_{s <= t} λ[t, level(t, s)] exp(g_{s+1} + ⋯ + g_t) (C_t · B_s) dt_s x_s + D x_t``

    (:func:`hodlr.log_linear_attn` with ``q = C``, ``k = B``, ``v = dt · x``), then the gated RMS
    norm with the gate ``z``, and ``out_proj``.  With ``hierarchical=False`` there is no ``λ``
    (``λ ≡ 1``): this is Mamba-2 itself, the linear parent.

    Parameters
    ----------
    num_heads : int
    head_dim : int, default 64
        ``num_heads * head_dim`` must equal ``expand * hidden_size``.
    hidden_size : int, default 2048
    state_size : int, default 128
        ``N``, the width of ``B`` and ``C`` (the keys and queries).
    expand : int or float, default 2
    n_groups : int, default 1
        Groups of heads sharing ``B`` and ``C``; must divide ``num_heads``.
    conv_kernel : int, default 4
    conv_init : float, optional
        Initialise the convolution weights uniformly in ``[-conv_init, conv_init]``.
    use_conv_bias : bool, default False
    hidden_act : ``"silu"`` (or ``"swish"``), default ``"silu"``
    rmsnorm : bool, default True
        Gated RMS norm (``norm.weight``) before ``out_proj``; False: ``y · silu(z)``.
    D_has_hdim : bool, default False
        ``D`` per channel (``num_heads * head_dim``) instead of per head.
    norm_before_gate : bool, default False
    dt_limit : (float, float), default ``(0, inf)``
        ``dt`` is clamped into this range.
    dt_min, dt_max, dt_init_floor : float
        ``dt_bias`` is initialised so that ``softplus(dt_bias)`` is log-uniform in
        ``[dt_min, dt_max]``, at least ``dt_init_floor``.
    use_bias : bool, default True
        Biases of ``in_proj`` and ``out_proj``.
    norm_eps : float, default 1e-5
    layer_idx : int, optional
        Kept for the caller's bookkeeping.
    num_levels : int, default 15
        Columns of ``λ`` (``L`` and the ``dl`` projection): positions up to ``2**(num_levels - 1)``
        (15: 16384 tokens, as flash-linear-attention's layer).
    hierarchical : bool, default True
        False: ``λ ≡ 1``, no ``L`` and no ``dl`` projection (Mamba-2; no length limit).
    backend : str, default ``"auto"``
        The backend of :func:`hodlr.log_linear_attn`: ``"auto"`` runs ``chunked`` on the CPU and
        ``triton`` on a GPU.
    A_init_range : (float, float), optional
        ``A = exp(A_log)`` drawn uniformly in this range, as flash-linear-attention's ``Mamba2``
        (its default ``(1, 16)``); None: ``A = 1 … num_heads``, as its ``LogLinearMamba2``.

    Notes
    -----
    Parameter names and shapes are flash-linear-attention's ``LogLinearMamba2`` (and, with
    ``hierarchical=False``, its ``Mamba2``): ``in_proj`` splits into ``z``, ``xBC``, ``dt`` and
    ``dl`` in that order (docs/layers.md).
    """

    OP = "attention"
    """The backend operation of its mixing (which backends keep its recurrent state)."""

    INPUTS = ("in_proj",)
    """The projections of the hidden states (their weights' dtype is the one the input must have)."""

    def __init__(self, num_heads: int, head_dim: int = 64, hidden_size: int = 2048, state_size: int = 128,
                 expand: float = 2, n_groups: int = 1, conv_kernel: int = 4, conv_init: float | None = None,
                 use_conv_bias: bool = False, hidden_act: str = "silu", rmsnorm: bool = True,
                 D_has_hdim: bool = False, norm_before_gate: bool = False,
                 dt_limit: tuple[float, float] = (0.0, float("inf")), dt_min: float = 0.001, dt_max: float = 0.1,
                 dt_init_floor: float = 1e-4, use_bias: bool = True, norm_eps: float = 1e-5,
                 layer_idx: int | None = None, *, num_levels: int = 15, hierarchical: bool = True,
                 backend: str = "auto", A_init_range: tuple[float, float] | None = None):
        super().__init__()
        sizes = {"num_heads": num_heads, "head_dim": head_dim, "hidden_size": hidden_size, "state_size": state_size,
                 "n_groups": n_groups, "conv_kernel": conv_kernel}
        num_heads, head_dim, hidden_size, state_size, n_groups, conv_kernel = (
            check_int(name, value, 1) for name, value in sizes.items())
        inner = scaled_width("hidden_size", hidden_size, "expand", expand)
        if num_heads * head_dim != inner:
            raise ValueError(f"num_heads * head_dim = {num_heads} * {head_dim} = {num_heads * head_dim} must equal "
                             f"expand * hidden_size = {inner}")
        if num_heads % n_groups:
            raise ValueError(f"n_groups={n_groups} must divide num_heads={num_heads}")
        if hidden_act not in ("silu", "swish"):
            raise ValueError(f"hidden_act must be 'silu' (or 'swish', the same), got {hidden_act!r}")
        pair = isinstance(dt_limit, (tuple, list)) and len(dt_limit) == 2 and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) for x in dt_limit)
        lo, hi = dt_limit if pair else (None, None)
        if not pair or not 0 <= lo < hi:
            raise ValueError(f"dt_limit must be a pair (low, high) with 0 <= low < high, got {dt_limit!r}")
        dt_min, dt_max = check_positive("dt_min", dt_min), check_positive("dt_max", dt_max)
        if not dt_min <= dt_max:
            raise ValueError(f"need 0 < dt_min <= dt_max, got dt_min={dt_min!r}, dt_max={dt_max!r}")
        dt_init_floor = check_positive("dt_init_floor", dt_init_floor, zero=True)
        if A_init_range is not None:
            ok = isinstance(A_init_range, (tuple, list)) and len(A_init_range) == 2 and all(
                isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in A_init_range)
            if not ok or not 0 < A_init_range[0] <= A_init_range[1]:
                raise ValueError(f"A_init_range must be None or a pair (low, high) with 0 < low <= high, "
                                 f"got {A_init_range!r}")
        norm_eps = check_positive("norm_eps", norm_eps)
        if conv_init is not None:
            conv_init = check_positive("conv_init", conv_init)
        use_conv_bias, rmsnorm, D_has_hdim, norm_before_gate, use_bias = (check_bool(name, value) for name, value in (
            ("use_conv_bias", use_conv_bias), ("rmsnorm", rmsnorm), ("D_has_hdim", D_has_hdim),
            ("norm_before_gate", norm_before_gate), ("use_bias", use_bias)))

        self.num_heads, self.head_dim, self.hidden_size = num_heads, head_dim, hidden_size
        self.ssm_state_size, self.n_groups = state_size, n_groups
        self.intermediate_size = int(inner)
        self.conv_kernel_size = conv_kernel
        self.activation = hidden_act
        self.rmsnorm, self.D_has_hdim, self.norm_before_gate = rmsnorm, D_has_hdim, norm_before_gate
        self.dt_limit = (float(lo), float(hi))
        self.layer_idx = layer_idx
        self._setup_levels(num_heads, num_levels, hierarchical, backend)

        self.conv_dim = self.intermediate_size + 2 * n_groups * state_size
        self.conv1d = ShortConvolution(self.conv_dim, conv_kernel, bias=use_conv_bias)
        if conv_init is not None:
            nn.init.uniform_(self.conv1d.weight, -conv_init, conv_init)
        levels = num_heads * self.num_levels if hierarchical else 0
        self.in_proj = nn.Linear(hidden_size, self.intermediate_size + self.conv_dim + num_heads + levels,
                                 bias=use_bias)
        dt = torch.exp(torch.rand(num_heads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus(dt_bias) = dt
        if A_init_range is None:  # LogLinearMamba2's: A = 1 … H
            A = torch.arange(1, num_heads + 1, dtype=torch.get_default_dtype())
        else:  # Mamba2's: A ~ U(A_init_range)
            A = torch.empty(num_heads).uniform_(*A_init_range)
        self.A_log = nn.Parameter(torch.log(A))
        self.D = nn.Parameter(torch.ones(self.intermediate_size if D_has_hdim else num_heads))
        for p in (self.dt_bias, self.A_log, self.D):
            p._no_weight_decay = True
        self.norm = (RMSNormGated(self.intermediate_size, eps=norm_eps, norm_before_gate=norm_before_gate,
                                  group_size=self.intermediate_size // n_groups) if rmsnorm else None)
        self.out_proj = nn.Linear(self.intermediate_size, hidden_size, bias=use_bias)

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
            The recurrent state (``states (B, num_heads, S, state_size, head_dim)``) and the
            convolution's last inputs ``(B, conv_dim, conv_kernel)``.
        """
        self._check_call(hidden_states, cache, use_cache, cu_seqlens)
        Bsz, T, _ = hidden_states.shape
        H, P, G, N = self.num_heads, self.head_dim, self.n_groups, self.ssm_state_size
        parts = [self.intermediate_size, self.conv_dim, H] + ([H * self.num_levels] if self.hierarchical else [])
        z, xBC, dt, *dl = torch.split(self.in_proj(hidden_states), parts, dim=-1)
        xBC, conv = self.conv1d(xBC, None if cache is None else cache.conv[0], use_cache, cu_seqlens)
        x, B, C = torch.split(xBC, [self.intermediate_size, G * N, G * N], dim=-1)
        x = x.unflatten(-1, (H, P))
        work = torch.float64 if dt.dtype == torch.float64 else torch.float32
        dt = F.softplus(dt.to(work) + self.dt_bias.to(work))
        if self.dt_limit != (0.0, float("inf")):
            dt = dt.clamp(*self.dt_limit)
        g = -torch.exp(self.A_log.to(dt.dtype)) * dt
        lam = self._level_scales(dl[0] if dl else None, hidden_states, H, cache)
        with torch.autocast(hidden_states.device.type, enabled=False):
            y, state = self._call_op(
                log_linear_attn, C.unflatten(-1, (G, N)), B.unflatten(-1, (G, N)), (x * dt[..., None]).to(x.dtype),
                g, lam, initial_state=None if cache is None else cache.state, output_final_state=use_cache,
                cu_seqlens=cu_seqlens, backend=self.backend)
        D = self.D.view(H, P) if self.D_has_hdim else self.D[:, None]
        y = (y + (x * D).to(y.dtype)).flatten(-2)
        y = self.norm(y, z) if self.rmsnorm else y * F.silu(z)
        out = self.out_proj(y)
        return out, (LayerCache(state, (conv,)) if use_cache else None)

    def _cache_layout(self):
        return (self.num_heads, self.ssm_state_size, self.head_dim), (self.conv1d,)

    def extra_repr(self) -> str:
        return (f"num_heads={self.num_heads}, head_dim={self.head_dim}, hidden_size={self.hidden_size}, "
                f"state_size={self.ssm_state_size}, n_groups={self.n_groups}, num_levels={self.num_levels}, "
                f"hierarchical={self.hierarchical}, backend={self.backend!r}")
