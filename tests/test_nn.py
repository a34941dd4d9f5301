"""hodlr.nn: the log-linear Mamba-2 and Gated DeltaNet layers against float64 references written
here from the formulas (no code of the layers reused), their caches (token-by-token generation,
any split, beam reordering), gradients to every parameter, torch.compile, bf16 autocast, and
the refusal of bad configurations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import hodlr
from hodlr.nn import LayerCache, LogLinearGatedDeltaNet, LogLinearMamba2, RMSNormGated, ShortConvolution
from hodlr.testing import relative_error


DT = torch.float64

MAMBA = dict(num_heads=4, head_dim=3, hidden_size=6, state_size=5, n_groups=2, conv_kernel=3, num_levels=6)
GDN = dict(hidden_size=6, head_dim=3, num_heads=2, num_v_heads=4, expand_v=4 / 3, conv_size=3, num_levels=6)


def make(cls, hierarchical=True, seed=0, **extra):
    """A float64 layer with every parameter random (none at its special initial value)."""
    torch.manual_seed(seed)
    layer = cls(**{**(MAMBA if cls is LogLinearMamba2 else GDN), **extra}, hierarchical=hierarchical).to(DT)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name in ("A_log", "dt_bias"):
                p.add_(0.3 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * (0.5 if p.dim() > 1 else 1.0))
    return layer


def inputs(B, T, width, seed=1):
    return torch.randn(B, T, width, generator=torch.Generator().manual_seed(seed), dtype=DT)


def levels(T):
    """``level(t, s)`` for ``s <= t`` as a ``(T, T)`` long tensor (0 above the diagonal)."""
    t, s = torch.meshgrid(torch.arange(T), torch.arange(T), indexing="ij")
    return torch.as_tensor(hodlr.level(t.numpy(), s.numpy()) * (s <= t).numpy())


def causal_conv(x, conv):
    """Depthwise causal convolution then SiLU, by zero padding on the left."""
    W = conv.weight.shape[-1]
    return F.silu(F.conv1d(F.pad(x.transpose(1, 2), (W - 1, 0)), conv.weight, conv.bias,
                           groups=x.shape[-1])).transpose(1, 2)


def gated_rmsnorm(x, z, weight, group, eps, before_gate, act=F.silu):
    if not before_gate:
        x = x * act(z)
    xg = x.unflatten(-1, (-1, group))
    y = (xg / torch.sqrt(xg.square().mean(-1, keepdim=True) + eps)).flatten(-2) * weight
    return y * act(z) if before_gate and z is not None else y


def lambdas(layer, dl, B, T, H):
    if not layer.hierarchical:
        return torch.ones(B, T, H, layer.num_levels, dtype=DT)
    return F.softplus(layer.L * dl.reshape(B, T, H, layer.num_levels))


def mamba2_reference(layer, x):
    """Mamba-2 with level scales, pair by pair: ``y_t = Σ_s λ[t, level(t, s)] exp(G_t - G_s)
    (C_t · B_s) dt_s x_s + D x_t``."""
    B_, T, _ = x.shape
    H, P, G, N, I = layer.num_heads, layer.head_dim, layer.n_groups, layer.ssm_state_size, layer.intermediate_size
    proj = F.linear(x, layer.in_proj.weight, layer.in_proj.bias)
    z, xBC, dt, dl = proj[..., :I], proj[..., I:I + layer.conv_dim], proj[..., I + layer.conv_dim:][..., :H], \
        proj[..., I + layer.conv_dim + H:]
    xBC = causal_conv(xBC, layer.conv1d)
    xs = xBC[..., :I].reshape(B_, T, H, P)
    Bm = xBC[..., I:I + G * N].reshape(B_, T, G, N).repeat_interleave(H // G, 2)
    Cm = xBC[..., I + G * N:].reshape(B_, T, G, N).repeat_interleave(H // G, 2)
    dt = F.softplus(dt + layer.dt_bias).clamp(*layer.dt_limit)
    G_ = torch.cumsum(-torch.exp(layer.A_log) * dt, 1)  # (B, T, H)
    lam = lambdas(layer, dl, B_, T, H)
    lev = levels(T)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    mask = torch.stack([lam[:, t][:, :, lev[t]] for t in range(T)], 2)  # (B, H, T, T): λ[t, level(t, s)]
    decay = torch.exp(G_.transpose(1, 2)[..., :, None] - G_.transpose(1, 2)[..., None, :])
    scores = torch.einsum("bthn,bshn->bhts", Cm, Bm) * decay * mask * causal
    y = torch.einsum("bhts,bshp->bthp", scores, xs * dt[..., None])
    D = layer.D.reshape(H, P) if layer.D_has_hdim else layer.D[:, None]
    y = (y + xs * D).reshape(B_, T, I)
    if layer.rmsnorm:
        y = gated_rmsnorm(y, z, layer.norm.weight, I // G, layer.norm.eps, layer.norm_before_gate)
    else:
        y = y * F.silu(z)
    return F.linear(y, layer.out_proj.weight, layer.out_proj.bias)


def gdn_reference(layer, x):
    """Gated DeltaNet with level scales, pair by pair: ``P[t, s] = scale β_s q_tᵀ A_t ⋯ A_{s+1} k_s``
    with the transitions multiplied out one by one."""
    B_, T, _ = x.shape
    Hk, Hv, Dk, Dv = layer.num_heads, layer.num_v_heads, layer.head_k_dim, layer.head_v_dim
    q, k, v = (F.linear(x, p.weight) for p in (layer.q_proj, layer.k_proj, layer.v_proj))
    if layer.use_short_conv:
        q, k, v = causal_conv(q, layer.q_conv1d), causal_conv(k, layer.k_conv1d), causal_conv(v, layer.v_conv1d)
    else:
        q, k, v = F.silu(q), F.silu(k), F.silu(v)
    unit = lambda y: y / torch.sqrt(y.square().sum(-1, keepdim=True) + 1e-6)  # noqa: E731
    q = unit(q.reshape(B_, T, Hk, Dk)).repeat_interleave(Hv // Hk, 2)
    k = unit(k.reshape(B_, T, Hk, Dk)).repeat_interleave(Hv // Hk, 2)
    v = v.reshape(B_, T, Hv, Dv)
    beta = torch.sigmoid(F.linear(x, layer.b_proj.weight)) * (2 if layer.allow_neg_eigval else 1)
    g = -torch.exp(layer.A_log) * F.softplus(F.linear(x, layer.a_proj.weight) + layer.dt_bias)
    lam = lambdas(layer, F.linear(x, layer.l_proj.weight) if layer.hierarchical else None, B_, T, Hv)
    lev = levels(T)
    eye = torch.eye(Dk, dtype=DT)
    o = torch.zeros(B_, T, Hv, Dv, dtype=DT)
    for t in range(T):
        for s in range(t + 1):
            w = beta[:, s, :, None] * k[:, s]  # (B, H, Dk)
            for u in range(s + 1, t + 1):
                A = torch.exp(g[:, u])[..., None, None] * (eye - beta[:, u, :, None, None]
                                                          * k[:, u, :, :, None] * k[:, u, :, None, :])
                w = torch.einsum("bhij,bhj->bhi", A, w)
            pair = Dk ** -0.5 * (q[:, t] * w).sum(-1) * lam[:, t, :, lev[t, s]]
            o[:, t] += pair[..., None] * v[:, s]
    gate = F.linear(x, layer.g_proj.weight).reshape(B_, T, Hv, Dv) if layer.use_gate else None
    act = torch.sigmoid if layer.o_norm.activation == "sigmoid" else F.silu  # fla's output_gate_activation
    o = gated_rmsnorm(o, gate, layer.o_norm.weight, Dv, layer.o_norm.eps, True, act)
    return F.linear(o.flatten(-2), layer.o_proj.weight)


# -- values against the references ------------------------------------------------------------------
@pytest.mark.parametrize("hierarchical", [True, False])
@pytest.mark.parametrize("extra", [{}, dict(D_has_hdim=True, norm_before_gate=True, use_conv_bias=True),
                                   dict(rmsnorm=False, n_groups=1, dt_limit=(0.05, 0.9))])
def test_mamba2_equals_reference(hierarchical, extra):
    layer = make(LogLinearMamba2, hierarchical, **extra)
    for T in (1, 2, 3, 17):
        x = inputs(2, T, layer.hidden_size, seed=T)
        y, cache = layer(x)
        assert cache is None and y.shape == x.shape
        assert relative_error(y, mamba2_reference(layer, x)) <= 1e-12


@pytest.mark.parametrize("hierarchical", [True, False])
@pytest.mark.parametrize("extra", [{}, dict(use_gate=False, use_short_conv=False, allow_neg_eigval=True,
                                            num_v_heads=2, expand_v=1, conv_bias=True),
                                   dict(output_gate_activation="sigmoid")])
def test_gated_deltanet_equals_reference(hierarchical, extra):
    layer = make(LogLinearGatedDeltaNet, hierarchical, **extra)
    for T in (1, 2, 3, 9):
        x = inputs(2, T, layer.hidden_size, seed=T)
        y, _ = layer(x)
        assert relative_error(y, gdn_reference(layer, x)) <= 1e-12


@pytest.mark.parametrize("cls", [LogLinearMamba2, LogLinearGatedDeltaNet])
def test_unread_level_parameters_never_matter(cls):
    """Columns of L beyond num_levels(T) are never read: NaN there leaves the output as it is."""
    layer = make(cls)
    x = inputs(2, 5, layer.hidden_size)
    want = layer(x)[0]
    with torch.no_grad():
        layer.L[:, hodlr.num_levels(5):] = float("nan")
    assert relative_error(layer(x)[0], want) == 0


# -- the cache ------------------------------------------------------------------------------------------
def run_in_pieces(layer, x, cuts, cache=None):
    outs = []
    for a, b in zip([0] + cuts, cuts + [x.shape[1]]):
        y, cache = layer(x[:, a:b], cache=cache, use_cache=True)
        outs.append(y)
    return torch.cat(outs, 1), cache


@settings(max_examples=6)
@given(T=st.integers(1, 20), data=st.data())
@pytest.mark.parametrize("cls", [LogLinearMamba2, LogLinearGatedDeltaNet])
@pytest.mark.parametrize("hierarchical", [True, False])
def test_cached_pieces_equal_one_pass(cls, hierarchical, T, data):
    """Any cut of the sequence into pieces (single tokens included), each continuing from the
    previous piece's cache, gives the one-pass outputs and the one-pass final cache."""
    layer = make(cls, hierarchical)
    cuts = sorted(data.draw(st.sets(st.integers(1, T - 1), max_size=T - 1))) if T > 1 else []
    x = inputs(3, T, layer.hidden_size, seed=T)
    want, full = layer(x, use_cache=True)
    got, cache = run_in_pieces(layer, x, cuts)
    assert relative_error(got, want) <= 1e-12
    assert torch.equal(cache.state.positions, torch.full((3,), T))
    assert relative_error(cache.state.states, full.state.states) <= 1e-12
    for a, b in zip(cache.conv, full.conv):
        assert relative_error(a, b) <= 1e-12


@pytest.mark.parametrize("cls", [LogLinearMamba2, LogLinearGatedDeltaNet])
def test_no_tokens_is_not_an_error(cls):
    """A call on T = 0 tokens returns an empty output and, continuing a cache, the same cache."""
    layer = make(cls)
    x = inputs(2, 5, layer.hidden_size)
    _, cache = layer(x, use_cache=True)
    empty = x[:, :0]
    y, none = layer(empty)
    assert tuple(y.shape) == (2, 0, layer.hidden_size) and none is None
    y, after = layer(empty, cache=cache, use_cache=True)
    assert tuple(y.shape) == (2, 0, layer.hidden_size)
    assert torch.equal(after.state.positions, cache.state.positions)
    assert relative_error(after.state.states, cache.state.states) == 0
    assert all(torch.equal(a, b) for a, b in zip(after.conv, cache.conv))


@pytest.mark.parametrize("cls", [LogLinearMamba2, LogLinearGatedDeltaNet])
def test_token_by_token_generation_equals_full_pass(cls):
    layer = make(cls)
    x = inputs(2, 12, layer.hidden_size)
    got, cache = run_in_pieces(layer, x, list(range(1, 12)), layer.new_cache(2, max_position=12))
    assert relative_error(got, layer(x)[0]) <= 1e-12
    assert cache.state.num_slots == 4  # a preallocated cache keeps its slots


@pytest.mark.parametrize("cls", [LogLinearMamba2, LogLinearGatedDeltaNet])
def test_cache_reorders_for_beam_search(cls):
    """Reordering the cache along the batch (repeats allowed) and continuing equals running the
    reordered sequences from the start."""
    layer = make(cls)
    x = inputs(3, 11, layer.hidden_size)
    _, cache = layer(x[:, :6], use_cache=True)
    beams = torch.tensor([2, 0, 0, 1])
    tail = inputs(4, 5, layer.hidden_size, seed=7)
    got, _ = layer(tail, cache=cache.index_select(beams))
    want, _ = layer(torch.cat([x[beams, :6], tail], 1))
    assert relative_error(got, want[:, 6:]) <= 1e-12
    assert relative_error(layer(tail[1:2], cache=cache[0])[0], want[1:2, 6:]) <= 1e-12
    assert relative_error(layer(tail[:1], cache=cache[-1])[0], want[:1, 6:]) <= 1e-12


def test_cache_moves_copies_and_is_not_modified():
    layer = make(LogLinearGatedDeltaNet)
    x = inputs(2, 7, layer.hidden_size)
    _, cache = layer(x, use_cache=True)
    before = cache.clone()
    layer(x[:, :3], cache=cache, use_cache=True)
    assert torch.equal(cache.state.states, before.state.states) and torch.equal(cache.conv[0], before.conv[0])
    moved = cache.to(torch.float32)
    assert moved.state.dtype == torch.float32 and all(c.dtype == torch.float32 for c in moved.conv)
    assert moved.state.positions.dtype == torch.int64
    assert not cache.detach().state.states.requires_grad
    assert len(cache) == 2 and "LayerCache" in repr(cache)


def test_layer_cache_refuses_bad_parts():
    state = hodlr.LogLinearState.zeros(2, 1, 3, 3, slots=2)
    with pytest.raises(TypeError, match="state must be a hodlr.LogLinearState"):
        LayerCache(state.states)
    with pytest.raises(ValueError, match=r"conv\[0\] must be a tensor of shape \(N, D, W\) with N = 2"):
        LayerCache(state, (torch.zeros(3, 4, 2),))
    with pytest.raises(TypeError, match=r"conv must be a tuple of tensors \(N, D, W\), one per short convolution "
                       r"\(empty for none\), got NoneType"):
        LayerCache(state, None)


# -- the building blocks ------------------------------------------------------------------------------------
@pytest.mark.parametrize("activation", ["silu", "swish", None])
def test_short_convolution_is_a_causal_depthwise_conv_that_carries_its_inputs(activation):
    """``ShortConvolution`` is ``F.conv1d`` with ``groups = D`` over the inputs zero-padded on the left
    (then SiLU, ``"swish"`` the same), and a call split anywhere, the cache handed on, equals one call."""
    torch.manual_seed(0)
    conv = ShortConvolution(5, 4, bias=True, activation=activation).double()
    x = inputs(2, 11, 5)
    want = F.conv1d(F.pad(x.transpose(1, 2), (3, 0)), conv.weight, conv.bias, groups=5).transpose(1, 2)
    want = want if activation is None else F.silu(want)
    y, _ = conv(x)
    assert relative_error(y, want) <= 1e-15
    for cut in (0, 1, 3, 11):
        y1, cache = conv(x[:, :cut], output_final_state=True)
        y2, end = conv(x[:, cut:], cache, output_final_state=True)
        assert relative_error(torch.cat([y1, y2], 1), want) <= 1e-15
        assert torch.equal(end, F.pad(x.transpose(1, 2), (4, 0))[..., -4:])
    with pytest.raises(ValueError, match="activation must be 'silu'"):
        ShortConvolution(5, 4, activation="gelu")
    with pytest.raises(ValueError, match=r"the convolution cache must have shape \(B, D, W\) = \(2, 5, 4\), "
                                         r"got \(2, 5, 3\)"):
        conv(x, torch.zeros(2, 5, 3, dtype=x.dtype))


def test_rms_norm_gated_groups_and_gate():
    """``RMSNormGated``: the reference per group of ``group_size`` channels, the gate before or after
    the norm, no gate a plain RMS norm; bad settings named."""
    torch.manual_seed(0)
    x, z = inputs(2, 3, 8), inputs(2, 3, 8, seed=2)
    for group, before in ((None, False), (4, False), (2, True)):
        norm = RMSNormGated(8, eps=1e-6, group_size=group, norm_before_gate=before).double()
        with torch.no_grad():
            norm.weight.copy_(torch.linspace(0.5, 1.5, 8))
        want = gated_rmsnorm(x, z, norm.weight, group or 8, 1e-6, before)
        assert relative_error(norm(x, z), want) <= 1e-15
    plain = RMSNormGated(8, eps=1e-6).double()
    assert relative_error(plain(x), x * torch.rsqrt(x.square().mean(-1, keepdim=True) + 1e-6)) <= 1e-15
    with pytest.raises(ValueError, match="group_size=3 must divide hidden_size=8"):
        RMSNormGated(8, group_size=3)
    with pytest.raises(ValueError, match="eps must be a finite number > 0, got -1"):
        RMSNormGated(8, eps=-1)
    with pytest.raises(TypeError, match="norm_before_gate must be a bool, got str"):
        RMSNormGated(8, norm_before_gate="yes")
    with pytest.raises(ValueError, match="activation must be one of 'swish', 'silu', 'sigmoid', got 'relu'"):
        RMSNormGated(8, activation="relu")
    with pytest.raises(ValueError, match="output_gate_activation must be one of 'swish', 'silu', 'sigmoid', got 'tanh'"):
        LogLinearGatedDeltaNet(**GDN, output_gate_activation="tanh")


# -- bad calls and configurations ---------------------------------------------------------------------------
def test_bad_cache_and_state_arguments_are_named():
    state = hodlr.LogLinearState.zeros(2, 1, 2, 2, slots=3)
    cache = make(LogLinearMamba2)(inputs(2, 3, 6), use_cache=True)[1]
    for indices in ([5], [-1]):
        with pytest.raises(ValueError, match=r"indices must lie in \[0, 2\) \(the state's sequences\), got"):
            cache.index_select(indices)
    with pytest.raises(TypeError, match="slots must be an integer >= 0, got float"):
        state.with_slots(1.5)
    with pytest.raises(ValueError, match="slots must be an integer >= 0, got -1"):
        state.with_slots(-1)


def test_bad_calls_are_refused():
    mamba, gdn = make(LogLinearMamba2), make(LogLinearGatedDeltaNet)
    x = inputs(2, 4, 6)
    with pytest.raises(ValueError, match=r"hidden_states must have shape \(B, T, hidden_size=6\), got shape \(2, 4\)"):
        mamba(x[..., 0])
    with pytest.raises(TypeError, match="hidden_states must be a torch.Tensor"):
        mamba(x.numpy())
    with pytest.raises(TypeError, match="cache must be a hodlr.nn.LayerCache"):
        mamba(x, cache=hodlr.LogLinearState.zeros(2, 4, 5, 3, slots=3))
    _, cache = gdn(x, use_cache=True)
    with pytest.raises(ValueError, match="the cache does not fit this layer"):
        mamba(x, cache=cache)
    with pytest.raises(ValueError, match="the cache holds 2 sequences but hidden_states has a batch of 1"):
        gdn(x[:1], cache=cache)
    with pytest.raises(hodlr.LevelsExceededError, match=r"num_levels=6: sequences up to 32 tokens .* got 33; make "
                       r"the layer with num_levels >= 7"):
        mamba(inputs(1, 33, 6))
    for cls, have in ((LogLinearMamba2, "fenwick, chunked, triton"), (LogLinearGatedDeltaNet, "fenwick, chunked")):
        dense_layer = make(cls, backend="dense")
        with pytest.raises(hodlr.BackendUnavailableError, match=rf"{cls.__name__} has backend='dense', which keeps no "
                           rf"recurrent state: it takes no cache .* or one of {have}"):
            dense_layer(x, use_cache=True)
        assert dense_layer(x)[1] is None  # without a cache the dense backend serves the layer
    triton_gdn = make(LogLinearGatedDeltaNet, backend="triton")
    with pytest.raises(hodlr.BackendUnavailableError, match=r"LogLinearGatedDeltaNet has backend='triton', which "
                       r"takes and returns a cache only without gradient: call it under torch.no_grad\(\)"):
        triton_gdn(x, use_cache=True)
    with pytest.raises(TypeError, match="LogLinearMamba2: use_cache must be a bool, got str"):
        mamba(x, use_cache="yes")
    with pytest.raises(TypeError, match="LogLinearGatedDeltaNet: use_cache must be a bool, got NoneType"):
        gdn(x, use_cache=None)
    with pytest.raises(TypeError, match=r"LogLinearMamba2: hidden_states has dtype torch.float32 but in_proj.weight "
                       r"is torch.float64; convert one to the other \(layer.to\(torch.float32\)\) or "
                       r"run under torch.autocast"):
        mamba(x.float())
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(
            TypeError, match=r"LogLinearGatedDeltaNet: float64 hidden_states meet q_proj.weight in torch.float32, "
                             r"which autocast does not cast float64 to"):
        make(LogLinearGatedDeltaNet).float()(x)
    assert mamba(x, use_cache=np.True_)[1] is not None  # a numpy bool is a bool
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast: the projections run in bfloat16
        assert make(LogLinearMamba2).float()(x.float())[0].shape == x.shape
    with pytest.raises(TypeError, match=r"LogLinearGatedDeltaNet: cache.state has dtype torch.float32 but "
                       r"torch.float64 hidden_states need a torch.float64 state; convert it \(cache.to\(torch.float64"):
        gdn(x, cache=cache.to(torch.float32))
    with pytest.raises(ValueError, match=r"LogLinearGatedDeltaNet: cache.conv\[1\] is on meta but hidden_states is "
                       r"on cpu; move the cache"):
        gdn(x, cache=LayerCache(cache.state, (cache.conv[0], cache.conv[1].to("meta"), cache.conv[2])))
    with pytest.raises(TypeError, match=r"LogLinearGatedDeltaNet: cache.conv\[0\] must have a floating dtype, got "
                       r"torch.int64"):
        gdn(x, cache=LayerCache(cache.state, (cache.conv[0].long(), *cache.conv[1:])))
    for layer in (mamba, gdn):  # a cache continued past 2**(num_levels - 1): the layer's terms, not the op's
        _, cache = layer(inputs(1, 30, 6), use_cache=True)
        with pytest.raises(hodlr.LevelsExceededError, match=rf"{type(layer).__name__} has num_levels=6: positions "
                           r"up to 31 .* continues a cache from position 30 and reaches position 32; make the layer "
                           r"with num_levels >= 7") as caught:
            layer(inputs(1, 3, 6), cache=cache)
        assert (caught.value.end, caught.value.need, caught.value.levels, caught.value.continued) == (33, 7, 6, 30)


BAD_MAMBA = [  # on top of a valid (num_heads=4, head_dim=3, hidden_size=6)
    (dict(head_dim=4), ValueError, r"num_heads \* head_dim = 4 \* 4 = 16 must equal expand \* hidden_size = 12"),
    (dict(n_groups=3), ValueError, "n_groups=3 must divide num_heads=4"),
    (dict(num_heads=0), ValueError, "num_heads must be an integer >= 1, got 0"),
    (dict(expand=1.3), ValueError, "hidden_size \\* expand must be a positive integer"),
    (dict(expand="2"), TypeError, "expand must be a number, got str"),
    (dict(hidden_act="gelu"), ValueError, "hidden_act must be 'silu'"),
    (dict(dt_limit=(1.0, 0.5)), ValueError, "dt_limit must be a pair"),
    (dict(dt_limit=("0", 1)), ValueError, "dt_limit must be a pair"),
    (dict(num_levels=0), ValueError, "num_levels must be an integer >= 1"),
    (dict(conv_kernel=2.5), TypeError, "conv_kernel must be an integer >= 1, got float"),
    (dict(backend=None), TypeError, "backend must be a string"),
    (dict(backend="nope"), ValueError, "backend must be 'auto' or one of dense, .*, got 'nope'"),
    (dict(expand=float("inf")), ValueError, "hidden_size \\* expand must be a positive integer"),
    (dict(hierarchical=1), TypeError, "hierarchical must be a bool"),
    (dict(dt_min=0.0), ValueError, "dt_min must be a finite number > 0, got 0.0"),
    (dict(dt_min=True), TypeError, "dt_min must be a finite number > 0, got bool"),
    (dict(dt_max=float("inf")), ValueError, "dt_max must be a finite number > 0, got inf"),
    (dict(dt_min=0.5, dt_max=0.1), ValueError, "need 0 < dt_min <= dt_max, got dt_min=0.5, dt_max=0.1"),
    (dict(dt_init_floor=-1), ValueError, "dt_init_floor must be a finite number >= 0, got -1"),
    (dict(dt_init_floor=float("nan")), ValueError, "dt_init_floor must be a finite number >= 0, got nan"),
    (dict(norm_eps=-1.0), ValueError, "norm_eps must be a finite number > 0, got -1.0"),
    (dict(norm_eps="x"), TypeError, "norm_eps must be a finite number > 0, got str"),
    (dict(conv_init=-0.1), ValueError, "conv_init must be a finite number > 0, got -0.1"),
    (dict(conv_init=float("nan")), ValueError, "conv_init must be a finite number > 0, got nan"),
    (dict(rmsnorm="no"), TypeError, "rmsnorm must be a bool, got str"),
    (dict(D_has_hdim=1), TypeError, "D_has_hdim must be a bool, got int"),
    (dict(use_bias=None), TypeError, "use_bias must be a bool, got NoneType"),
    (dict(use_conv_bias="yes"), TypeError, "use_conv_bias must be a bool, got str"),
    (dict(norm_before_gate=0), TypeError, "norm_before_gate must be a bool, got int"),
]
BAD_GDN = [
    (dict(expand_v=float("nan")), ValueError, "head_dim \\* expand_v must be a positive integer"),
    (dict(num_heads=3, num_v_heads=4), ValueError, r"num_heads=3 \(query/key heads\) must divide num_v_heads=4"),
    (dict(head_dim=3, expand_v=0.5), ValueError, "head_dim \\* expand_v must be a positive integer"),
    (dict(expand_v="2"), TypeError, "expand_v must be a number, got str"),
    (dict(hidden_size=-2), ValueError, "hidden_size must be an integer >= 1, got -2"),
    (dict(conv_size=0), ValueError, "conv_size must be an integer >= 1"),
    (dict(norm_eps=float("nan")), ValueError, "norm_eps must be a finite number > 0, got nan"),
    (dict(norm_eps=0), ValueError, "norm_eps must be a finite number > 0, got 0"),
    (dict(use_gate="no"), TypeError, "use_gate must be a bool, got str"),
    (dict(use_short_conv=1), TypeError, "use_short_conv must be a bool, got int"),
    (dict(allow_neg_eigval=None), TypeError, "allow_neg_eigval must be a bool, got NoneType"),
    (dict(conv_bias="x"), TypeError, "conv_bias must be a bool, got str"),
]


@pytest.mark.parametrize("kwargs, error, message", BAD_MAMBA)
def test_bad_mamba2_configurations(kwargs, error, message):
    with pytest.raises(error, match=message):
        LogLinearMamba2(**{**dict(num_heads=4, head_dim=3, hidden_size=6), **kwargs})


@pytest.mark.parametrize("kwargs, error, message", BAD_GDN)
def test_bad_gated_deltanet_configurations(kwargs, error, message):
    with pytest.raises(error, match=message):
        LogLinearGatedDeltaNet(**{**dict(hidden_size=6, head_dim=4, num_heads=2), **kwargs})


# -- parameters, gradients, precision, compilation -----------------------------------------------------------
FLA_MAMBA2 = {"in_proj.weight", "in_proj.bias", "conv1d.weight", "dt_bias", "A_log", "D", "norm.weight",
              "out_proj.weight", "out_proj.bias"}
FLA_GDN = {"q_proj.weight", "k_proj.weight", "v_proj.weight", "a_proj.weight", "b_proj.weight", "A_log", "dt_bias",
           "q_conv1d.weight", "k_conv1d.weight", "v_conv1d.weight", "g_proj.weight", "o_norm.weight",
           "o_proj.weight"}


def test_parameter_names_and_shapes_follow_fla():
    """The names of flash-linear-attention's Mamba2 / GatedDeltaNet, plus L and the level
    projection with the hierarchy (docs/layers.md)."""
    m = LogLinearMamba2(num_heads=4, head_dim=3, hidden_size=6, state_size=5, n_groups=2)
    assert set(dict(m.named_parameters())) == FLA_MAMBA2 | {"L"}
    assert m.in_proj.weight.shape == (12 + (12 + 2 * 2 * 5) + 4 + 4 * 15, 6) and m.L.shape == (4, 15)
    assert m.conv1d.weight.shape == (12 + 20, 1, 4) and m.D.shape == (4,) and m.norm.weight.shape == (12,)
    linear = LogLinearMamba2(num_heads=4, head_dim=3, hidden_size=6, state_size=5, hierarchical=False)
    assert set(dict(linear.named_parameters())) == FLA_MAMBA2 and linear.in_proj.out_features == 12 + 22 + 4
    g = LogLinearGatedDeltaNet(hidden_size=6, head_dim=4, num_heads=2, num_v_heads=4)
    assert set(dict(g.named_parameters())) == FLA_GDN | {"L", "l_proj.weight"}
    assert g.l_proj.weight.shape == (4 * 15, 6) and g.v_proj.weight.shape == (4 * 8, 6)
    assert set(dict(LogLinearGatedDeltaNet(hidden_size=6, head_dim=4, num_heads=2,
                                           hierarchical=False).named_parameters())) == FLA_GDN


@pytest.mark.parametrize("cls", [LogLinearMamba2, LogLinearGatedDeltaNet])
def test_linear_parent_takes_any_length(cls):
    """Without the hierarchy (λ ≡ 1: Mamba-2 / Gated DeltaNet itself) ``num_levels`` limits
    nothing: a sequence and a continued cache past ``2**(num_levels - 1)`` tokens equal one call
    of the op with all-ones scales of as many levels as it reads."""
    layer = make(cls, hierarchical=False, num_levels=2)  # the hierarchy would stop at 2 tokens
    x = inputs(2, 11, layer.hidden_size)
    y, _ = layer(x)
    wide = make(cls, hierarchical=False, num_levels=5)
    wide.load_state_dict(layer.state_dict())
    assert torch.allclose(y, wide(x)[0], rtol=0, atol=1e-12)
    head, cache = layer(x[:, :4], use_cache=True)
    for t in range(4, 11):  # and token by token from a cache
        step, cache = layer(x[:, t:t + 1], cache=cache, use_cache=True)
        head = torch.cat([head, step], 1)
    assert torch.allclose(head, y, rtol=0, atol=1e-12)


def test_mixed_precision_layers_check_their_input_projections():
    """The dtype a layer's input must have is its input projections' (the decay and level
    parameters may stay float32 in a bfloat16 layer, as Mamba models keep them)."""
    layer = LogLinearMamba2(num_heads=4, head_dim=3, hidden_size=6, state_size=5).to(torch.bfloat16)
    for name in ("A_log", "dt_bias", "D", "L"):
        getattr(layer, name).data = getattr(layer, name).data.float()
    y, _ = layer(torch.randn(2, 5, 6, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    with pytest.raises(TypeError, match=r"hidden_states has dtype torch.float32 but in_proj.weight is torch.bfloat16"):
        layer(torch.randn(2, 5, 6))


def test_mamba2_a_init_range_follows_fla():
    """``A_init_range`` draws ``A = exp(A_log)`` uniformly in the range (fla Mamba2's init); the
    default is ``A = 1 … H`` (fla LogLinearMamba2's); a bad range is refused by name."""
    torch.manual_seed(0)
    A = LogLinearMamba2(num_heads=64, head_dim=1, hidden_size=32, A_init_range=(1, 16)).A_log.exp()
    assert (A >= 1).all() and (A <= 16).all() and A.std() > 1
    assert torch.allclose(LogLinearMamba2(num_heads=4, head_dim=1, hidden_size=2).A_log.exp(),
                          torch.arange(1.0, 5.0))
    with pytest.raises(ValueError, match=r"A_init_range must be None or a pair \(low, high\) with 0 < low <= high, "
                                         r"got \(0, 16\)"):
        LogLinearMamba2(num_heads=4, head_dim=1, hidden_size=2, A_init_range=(0, 16))


def test_layer_helpers_check_their_inputs_and_widths():
    """The short convolution and the gated norm refuse inputs of other widths by name; a float
    expansion factor may carry its rounding error (fla's rule: 50 * 1.1 is 55); a cache takes a
    0-d index tensor as an int (beam search) and widens its slots."""
    conv, norm = ShortConvolution(4, 3), RMSNormGated(4)
    with pytest.raises(ValueError, match=r"x must be a tensor of shape \(B, T, D\) with D = 4 \(the channels\), got "
                                         r"shape \(5, 4\)"):
        conv(torch.randn(5, 4))
    with pytest.raises(ValueError, match=r"z \(the gate\) must be None or a tensor of x's shape \(2, 4\), got shape "
                                         r"\(2, 1\)"):
        norm(torch.randn(2, 4), torch.randn(2, 1))
    with pytest.raises(ValueError, match=r"x must be a tensor of shape \(\.\.\., 4\), got shape \(2, 3\)"):
        norm(torch.randn(2, 3))
    assert LogLinearGatedDeltaNet(hidden_size=8, head_dim=50, num_heads=1, expand_v=1.1).head_v_dim == 55
    with pytest.raises(TypeError, match="expand_v must be a number, got str"):
        LogLinearGatedDeltaNet(hidden_size=8, head_dim=4, num_heads=1, expand_v="2")
    with pytest.raises(TypeError, match="expand must be a number, got NoneType"):
        LogLinearMamba2(num_heads=4, head_dim=3, hidden_size=6, expand=None)
    with pytest.raises(ValueError, match=r"head_dim \* expand_v must be a positive integer, got head_dim=4, "
                                         r"expand_v=1.3"):
        LogLinearGatedDeltaNet(hidden_size=8, head_dim=4, num_heads=1, expand_v=1.3)
    layer = make(LogLinearMamba2)
    _, cache = layer(inputs(3, 5, layer.hidden_size), use_cache=True)
    one = cache[torch.tensor(1)]
    assert one.batch_size == 1 and torch.equal(one.conv[0], cache.conv[0][1:2])
    assert torch.equal(one.state.states, cache.state.states[1:2])
    wider = cache.with_slots(cache.state.num_slots + 2)
    assert wider.state.num_slots == cache.state.num_slots + 2 and wider.conv is cache.conv


@pytest.mark.parametrize("cls, extra", [(LogLinearMamba2, {}), (LogLinearGatedDeltaNet, {}),
                                        (LogLinearGatedDeltaNet, {"use_short_conv": False})])
def test_packed_sequences_equal_separate_calls(cls, extra):
    """``cu_seqlens`` (fla's packing: one row of sequences back to back, one of them empty) gives
    each sequence's own output, gradients and cache, with and without caches to continue from;
    nothing crosses a boundary, the short convolutions included."""
    layer = make(cls, **extra)
    lengths = (5, 1, 0, 9)
    cu = torch.tensor([0, 5, 6, 6, 15])
    seqs = [inputs(1, n, layer.hidden_size, seed=10 + i) for i, n in enumerate(lengths)]
    x = torch.cat(seqs, 1).requires_grad_()
    y, cache = layer(x, cu_seqlens=cu, use_cache=True)
    parts = [layer(s, use_cache=True) for s in seqs]
    assert relative_error(y, torch.cat([p[0] for p in parts], 1)) <= 1e-12
    want = LayerCache.cat([p[1] for p in parts])
    assert torch.equal(cache.state.positions, torch.tensor(lengths))
    for got, ref in zip(cache.conv, want.conv):
        assert relative_error(got, ref) <= 1e-12
    S = min(cache.state.num_slots, want.state.num_slots)
    assert relative_error(cache.state.states[:, :, :S], want.state.states[:, :, :S]) <= 1e-12
    # gradients: the packed call's equal the separate calls'
    dy = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, dy)
    xs = [s.clone().requires_grad_() for s in seqs]
    ys = [layer(s)[0] for s in xs]
    gs = torch.autograd.grad(ys, xs, list(dy.split(list(lengths), 1)), allow_unused=True)
    assert relative_error(gx, torch.cat([torch.zeros_like(s) if g is None else g for s, g in zip(seqs, gs)], 1)) <= 1e-12
    # continued: 2 more tokens a sequence from the packed cache, against each sequence's continuation
    more = [inputs(1, 2, layer.hidden_size, seed=30 + i) for i in range(len(lengths))]
    y2, _ = layer(torch.cat(more, 1), cache=cache, cu_seqlens=torch.tensor([0, 2, 4, 6, 8]))
    want2 = [layer(m, cache=p[1])[0] for m, p in zip(more, parts)]
    assert relative_error(y2, torch.cat(want2, 1)) <= 1e-12
    with pytest.raises(ValueError, match=r"cu_seqlens must end at T=15 \(the tokens of hidden_states\), got "
                                         r"cu_seqlens\[-1\]=14"):
        layer(x, cu_seqlens=torch.tensor([0, 5, 14]))
    with pytest.raises(ValueError, match=r"the cache holds 4 sequences but hidden_states has 2 packed sequences"):
        layer(x, cache=cache, cu_seqlens=torch.tensor([0, 5, 15]))
    with pytest.raises(ValueError, match=r"with cu_seqlens the batch size must be 1"):
        layer(torch.cat([x, x]), cu_seqlens=cu)


@pytest.mark.parametrize("cls", [LogLinearMamba2, LogLinearGatedDeltaNet])
def test_prompts_of_different_lengths_decode_as_one_batch(cls):
    """Prompts of 3, 17 and 1 tokens prefilled apart, their caches joined (``LayerCache.cat``: the
    states widened to one slot count), then decoded together: each row equals its sequence's own
    full pass."""
    layer = make(cls)
    lengths, steps = (3, 17, 1), 6
    seqs = [inputs(1, n + steps, layer.hidden_size, seed=n) for n in lengths]
    caches = [layer(s[:, :n], use_cache=True)[1] for s, n in zip(seqs, lengths)]
    assert len({c.state.num_slots for c in caches}) > 1
    cache = LayerCache.cat(caches)
    outs = []
    for t in range(steps):
        y, cache = layer(torch.cat([s[:, n + t:n + t + 1] for s, n in zip(seqs, lengths)]), cache=cache, use_cache=True)
        outs.append(y)
    got = torch.cat(outs, 1)
    for row, (s, n) in enumerate(zip(seqs, lengths)):
        assert relative_error(got[row:row + 1], layer(s)[0][:, n:]) <= 1e-12
    with pytest.raises(TypeError, match="caches must be a non-empty list or tuple of hodlr.nn.LayerCache, got list"):
        LayerCache.cat([])
    with pytest.raises(ValueError, match=r"states\[1\] has \(heads, Dk, Dv, dtype, device\)"):
        hodlr.LogLinearState.cat([caches[0].state, caches[1].state.to(torch.float32)])


@pytest.mark.parametrize("cls", [LogLinearMamba2, LogLinearGatedDeltaNet])
@pytest.mark.parametrize("hierarchical", [True, False])
def test_gradients_reach_every_parameter(cls, hierarchical):
    layer = make(cls, hierarchical)
    x = inputs(2, 9, layer.hidden_size).requires_grad_()
    y, _ = layer(x)
    y.square().sum().backward()
    for name, p in [("input", x), *layer.named_parameters()]:
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("cls", [LogLinearMamba2, LogLinearGatedDeltaNet])
def test_bf16_autocast(cls):
    """Under bf16 autocast the projections run in bfloat16, the mixing on bfloat16 inputs with
    float32 state; the output stays near the float32 one and gradients flow."""
    layer = make(cls).float()
    x = inputs(2, 21, layer.hidden_size).float()
    want, _ = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, cache = layer(x, use_cache=True)
    assert got.dtype == torch.bfloat16 and cache.state.dtype == torch.float32
    assert relative_error(got, want) <= 2e-2  # bfloat16 projections as well as the op: measured 5e-3 - 8e-3
    got.float().square().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters())


@pytest.mark.parametrize("cls", [LogLinearMamba2, LogLinearGatedDeltaNet])
def test_compile_fullgraph_aot_eager(cls):
    """The layer compiles as one graph (prefill from a preallocated cache, with the cache out) and
    gives the eager values and gradients."""
    layer = make(cls)
    x = inputs(2, 10, layer.hidden_size)

    def loss(fn):
        y, cache = fn(x, cache=layer.new_cache(2, max_position=16), use_cache=True)
        total = y.square().sum() + cache.state.states.sum()
        return total, torch.autograd.grad(total, list(layer.parameters()))

    want, got = loss(layer), loss(torch.compile(layer, fullgraph=True, backend="aot_eager"))
    assert relative_error(got[0], want[0]) <= 1e-12
    for a, b in zip(got[1], want[1]):
        assert relative_error(a, b) <= 1e-10


@pytest.mark.parametrize("cls", [LogLinearMamba2, LogLinearGatedDeltaNet])
def test_compile_dynamic_fullgraph_and_named_backends(cls):
    """One graph (fullgraph) for every length with ``dynamic=True`` (the op's default scale traced
    from a dynamic head width), a compiled prefill with a cache on a named CPU backend, and, past
    ``2**(num_levels - 1)`` tokens, the op's ``LevelsExceededError`` out of a fullgraph compile."""
    from hodlr.errors import LevelsExceededError

    layer = make(cls)
    compiled = torch.compile(layer, fullgraph=True, dynamic=True, backend="eager")
    for T in (5, 9, 13):
        x = inputs(2, T, layer.hidden_size)
        assert relative_error(compiled(x)[0], layer(x)[0]) <= 1e-12, T
    for backend in ("chunked", "fenwick"):
        named = make(cls, backend=backend)
        step = torch.compile(lambda x, c: named(x, cache=c, use_cache=True), fullgraph=True, backend="aot_eager")
        x = inputs(2, 7, named.hidden_size)
        got, want = (f(x, named.new_cache(2, max_position=16))[0] for f in (step, lambda x, c: named(x, cache=c,
                                                                                                       use_cache=True)))
        assert relative_error(got, want) <= 1e-12, backend
    with pytest.raises(LevelsExceededError, match=r"needs at least num_levels\(33\)=7"):
        torch.compile(layer, fullgraph=True, backend="eager")(inputs(1, 33, layer.hidden_size))


def test_mamba2_parameters_follow_the_default_dtype():
    """Every parameter (``A_log`` too) takes the default dtype, so a cache the layer makes is one it takes."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        layer = LogLinearMamba2(**MAMBA)
        assert {p.dtype for p in layer.parameters()} == {torch.float64}
        y, _ = layer(inputs(2, 3, layer.hidden_size), cache=layer.new_cache(2), use_cache=True)
        assert y.dtype == torch.float64
    finally:
        torch.set_default_dtype(before)


# -- the Triton kernels under the interpreter ----------------------------------------------------------------
@pytest.mark.interpreter
def test_gated_delta_generation_on_triton_without_gradient():
    """A Gated DeltaNet layer made with ``backend="triton"`` generates under ``torch.no_grad`` (its
    prefill, continuation and steps from the cache on the Triton kernels): the outputs of one pass."""
    layer = make(LogLinearGatedDeltaNet, backend="triton", num_levels=7)
    x = inputs(2, 40, layer.hidden_size)
    with torch.no_grad():
        want, _ = layer(x)
        got, cache = run_in_pieces(layer, x, [17, 30, 31])
    assert relative_error(got, want) <= 1e-12 and cache.state.positions.tolist() == [40, 40]


# -- on a GPU ------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("cls", [LogLinearMamba2, LogLinearGatedDeltaNet])
def test_gpu_generation_equals_full_pass(cls):
    layer = make(cls, num_levels=8).float().cuda()  # positions up to 128
    x = inputs(3, 70, layer.hidden_size).float().cuda()
    want, _ = layer(x)
    got, cache = run_in_pieces(layer, x, list(range(40, 70)))
    assert relative_error(got, want) <= 1e-4
    beams = torch.tensor([2, 2, 0], device="cuda")
    tail = inputs(3, 4, layer.hidden_size, seed=5).float().cuda()
    assert relative_error(layer(tail, cache=cache.index_select(beams))[0],
                          layer(torch.cat([x[beams], tail], 1))[0][:, 70:]) <= 1e-4


@pytest.mark.gpu
def test_gpu_gated_delta_generation_runs_the_kernels(monkeypatch):
    """Generation with a Gated DeltaNet layer on a GPU under ``torch.no_grad``: the prompt's prefill
    is the Triton forward with its final state (``gated_delta_with_state``) and each token the decode
    kernel (``decode_step`` with ``beta``); the outputs equal one pass (float32, 1e-4)."""
    from hodlr.backends import triton as triton_backend
    from hodlr.kernels import decode

    calls = {"prefill": 0, "decode": 0}
    for module, name, key in ((triton_backend, "gated_delta_with_state", "prefill"), (decode, "decode_step", "decode")):
        original = getattr(module, name)

        def counted(*args, _original=original, _key=key, **kw):
            calls[_key] += 1
            return _original(*args, **kw)

        monkeypatch.setattr(module, name, counted)
    layer = make(LogLinearGatedDeltaNet, num_levels=8).float().cuda()
    x = inputs(3, 70, layer.hidden_size).float().cuda()
    with torch.no_grad():
        want, _ = layer(x)
        got, _ = run_in_pieces(layer, x, list(range(60, 70)))
    assert relative_error(got, want) <= 1e-4
    assert calls == {"prefill": 1, "decode": 10}


@pytest.mark.gpu
def test_gpu_wide_gated_delta_heads_run_chunked():
    """Gated DeltaNet heads wider than the Triton kernels take (the default ``head_dim=256``): on a GPU
    ``backend="auto"`` trains them on ``chunked`` (the same outputs and gradients bit for bit), and
    ``backend="triton"`` refuses them."""
    x = inputs(2, 40, 32).float().cuda()
    results = []
    for backend in ("auto", "chunked"):
        torch.manual_seed(0)
        layer = LogLinearGatedDeltaNet(hidden_size=32, head_dim=256, num_heads=1, expand_v=0.125, num_levels=8,
                                       backend=backend).cuda()
        y = layer(x)[0]
        results.append((y, torch.autograd.grad(y.square().sum(), list(layer.parameters()))))
    (y_auto, g_auto), (y_chunked, g_chunked) = results
    assert torch.equal(y_auto, y_chunked) and all(torch.equal(a, b) for a, b in zip(g_auto, g_chunked))
    with pytest.raises(ValueError, match="take Dk <= 128, got Dk=256"):
        LogLinearGatedDeltaNet(hidden_size=32, head_dim=256, num_heads=1, expand_v=0.125, num_levels=8,
                               backend="triton").cuda()(x)


@pytest.mark.gpu
@pytest.mark.parametrize("cls", [LogLinearMamba2, LogLinearGatedDeltaNet])
def test_gpu_compile_inductor(cls):
    layer = make(cls, num_levels=8).float().cuda()  # positions up to 128
    x = inputs(2, 100, layer.hidden_size).float().cuda()
    want = layer(x)[0]
    got = torch.compile(layer, fullgraph=True)(x)[0]
    assert relative_error(got, want) <= 1e-5
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert relative_error(layer(x)[0], want) <= 5e-2
