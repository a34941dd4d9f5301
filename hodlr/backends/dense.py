"""Dense backend: materialise the ``T x T`` mask and multiply.

The reference every other backend is checked against.  Runs natively on numpy and on
torch (any device, autograd included).  ``O(T^2)`` memory: refuses, before allocating,
masks over ``hodlr.options.dense_max_bytes``.  float16 / bfloat16 operands are computed in
the mask's dtype (float32) and cast back, as in the other backends.

Log-linear Gated DeltaNet is ``(P ⊙ M) V`` with ``M`` the log-linear mask (level scales and
decay) and ``P`` the pairwise matrix of the ungated delta rule (:func:`_delta_matrix`): the
scalar gates ``exp(g)`` commute with everything, so the gated transitions' products split
into the decay ``exp(G[t] - G[s])`` of the mask and the products of ``I - beta k kᵀ``.
"""

from __future__ import annotations

import numpy as np

from hodlr._formulas import dense_mask, tie_decay
from hodlr.fenwick.arrays import as_like, cast, is_torch, namespace, zeros

DESCRIPTION = "materialised T x T mask (the reference); numpy or torch, autograd"


def unavailable_reason(library, device):
    return None


def _mask(level_scales, log_decay, op: str, arrays: int):
    """The dense mask, checked against the budget for ``arrays`` dense arrays at once."""
    return dense_mask(level_scales, log_decay, f"backend 'dense' {op}", arrays)


def matmul(level_scales, log_decay, x):
    return cast(namespace(x).matmul(_mask(level_scales, log_decay, "matmul", 1), cast(x, level_scales.dtype)), x.dtype)


def attention(q, k, v, level_scales, log_decay, scale):
    xp = namespace(q)
    out_dtype = v.dtype
    q, k, v = (cast(a, level_scales.dtype) for a in (q, k, v))
    mask = _mask(level_scales, log_decay, "attention", 3)  # the mask, the scores, their product
    scores = xp.matmul(q, xp.swapaxes(k, -1, -2)) * scale
    return cast(xp.matmul(mask * scores, v), out_dtype)


def _delta_matrix(q, k, beta, scale):
    """The pairwise matrix of the (ungated) delta rule, shape ``(*batch, T, T)``:

    ``P[t, s] = scale * beta_s * q_tᵀ (I - beta_t k_t k_tᵀ) ... (I - beta_{s+1} k_{s+1} k_{s+1}ᵀ) k_s``
    for ``s <= t`` (``P[t, t] = scale * beta_t * q_t . k_t``), 0 above the diagonal.

    Built row by row from ``W_t = (I - beta_t k_t k_tᵀ) W_{t-1} + beta_t k_t e_tᵀ`` (column
    ``s`` of ``W_t`` is the transported key of token ``s``), ``P[t] = scale * q_tᵀ W_t``:
    ``O(T^2 Dk)`` work.  ``q, k (*batch, T, Dk)``, ``beta (*batch, T)``, one dtype; numpy or
    torch (autograd: every update is out of place).
    """
    xp = namespace(q)
    batch, T, Dk = tuple(q.shape[:-2]), int(q.shape[-2]), int(q.shape[-1])
    eye = as_like(np.eye(T), q, dtype=q.dtype)
    bk = beta[..., None] * k
    W = zeros(batch + (Dk, T), q)
    rows = []
    for t in range(T):
        kt, bkt = k[..., t, None, :], bk[..., t, :, None]  # (..., 1, Dk), (..., Dk, 1)
        W = W - bkt * xp.matmul(kt, W) + bkt * eye[t]
        rows.append(xp.matmul(q[..., t, None, :], W)[..., 0, :])
    return xp.stack(rows, -2) * scale


def gated_delta_matrix(q, k, beta, level_scales, log_decay, scale, *,
                       what: str = "backend 'dense' gated_delta_attention", instead="'fenwick' or 'chunked'"):
    """``P ⊙ Mλ = P_δ ⊙ M`` of log-linear Gated DeltaNet, shape ``(*batch, T, T)`` (see the
    module docstring).  Refuses, before allocating, sizes over the dense budget: ``P_δ``, the
    mask and their product, and while autograd records the ``T`` saved ``(Dk, T)`` steps of
    :func:`_delta_matrix` (``what`` names the call in the refusal, ``instead`` the backends it
    suggests, None for none)."""
    recording = is_torch(q) and namespace(q).is_grad_enabled() and any(a.requires_grad for a in (q, k, beta))
    arrays = 3 + (int(q.shape[-1]) if recording else 0)
    mask = dense_mask(level_scales, log_decay, what, arrays, instead=instead)
    return _delta_matrix(q, k, beta, scale) * mask


def gated_delta_attention(q, k, v, beta, level_scales, log_decay, scale):
    out_dtype = v.dtype
    q, k, v, beta = (cast(a, level_scales.dtype) for a in (q, k, v, beta))
    xp = namespace(v)
    out = xp.matmul(gated_delta_matrix(q, k, beta, level_scales, log_decay, scale), v)
    return cast(tie_decay(out, log_decay), out_dtype)
