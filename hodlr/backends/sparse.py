"""Sparse backend: ``M = diag(level_scales[:, 0]) + U V^T`` with scipy sparse factors.

See :mod:`hodlr.sparse` for the layout.  Matmul is ``Y = lam0 * X + U (V^T X)``;
attention forms one state per off-diagonal block, ``S_b = K[cols]^T diag(v_b) V[cols]``,
as the sparse product ``V^T (k ⊗ v)`` (rows ``k_t ⊗ v_t`` flattened to ``Dk Dv``), spreads
it to the rows with ``U``, and lets every query read it:
``O[t] = q_t^T (U S)[t] + lam0[t] (q_t . k_t) v_t``.  A batch becomes one block-diagonal
sparse product (no Python loop over blocks or batch elements).

scipy computes in numpy: torch tensors are copied to the CPU and to numpy (float64 stays
float64; float32, float16 and bfloat16 are computed in float32) and the result is
converted back to the input's library, dtype and device.  No autograd: a torch input that
requires grad (with grad mode on) raises :class:`hodlr.errors.BackendUnavailableError`.
"""

from __future__ import annotations

import importlib.util

import numpy as np

from hodlr._formulas import as_numpy, numpy_dtype
from hodlr.errors import BackendUnavailableError
from hodlr.fenwick.arrays import as_like, is_torch

STATE_WIDTH = 256
"""Attention forms the block states ``Dk x w`` columns of ``v`` at a time, with
``w = max(1, STATE_WIDTH // Dk)``, so its temporaries hold ``O(T max(Dk, STATE_WIDTH))``
numbers rather than ``O(T Dk Dv)``."""

DESCRIPTION = "scipy sparse diag(lam0) + U V^T (numpy inside: torch is converted, no autograd)"


def unavailable_reason(library, device):
    if importlib.util.find_spec("scipy") is None:
        return "scipy is not installed (pip install scipy)"
    if str(device) == "meta":
        return "scipy needs the values, which meta tensors do not hold"
    return None


def _check_no_grad(*arrays):
    if not any(is_torch(a) and a.requires_grad for a in arrays if a is not None):
        return
    import torch

    if torch.is_grad_enabled():
        raise BackendUnavailableError(
            "backend 'sparse' computes in numpy via scipy and cannot propagate gradients, but an input "
            "requires grad; use backend='recursive' or 'dense' (or 'chunked' / 'triton' where available), "
            "or call it under torch.no_grad()"
        )


def _factors(level_scales, log_decay):
    """``(dtype, batch, T, lam0 (B, T), U (B T, B K) CSR, V (B T, B K) CSC)``."""
    from hodlr.sparse import block_diagonal, sparse_data, sparse_structure

    dtype = numpy_dtype(level_scales.dtype)
    batch = tuple(level_scales.shape[:-2])
    T = level_scales.shape[-2]
    structure = sparse_structure(T)
    diagonal, U_data, V_data = sparse_data(level_scales, log_decay)
    B = int(np.prod(batch, dtype=np.int64))
    shape = (T, structure.K)
    U = block_diagonal("csr", structure.U_indptr, structure.U_cols, U_data.reshape(B, U_data.shape[-1]), shape)
    V = block_diagonal("csc", structure.V_indptr, structure.V_rows, V_data.reshape(B, V_data.shape[-1]), shape)
    return dtype, batch, T, diagonal.reshape(B, T), U, V


def _back(out, like):
    """``out`` (numpy) in the library, dtype and device of ``like``."""
    return as_like(out, like, dtype=like.dtype) if is_torch(like) else out.astype(like.dtype, copy=False)


def matmul(level_scales, log_decay, x):
    _check_no_grad(level_scales, log_decay, x)
    dtype, batch, T, lam0, U, V = _factors(level_scales, log_decay)
    D = x.shape[-1]
    rows = lam0.size  # (explicit sizes: an empty batch or D = 0 leaves nothing to infer a -1 from)
    flat = as_numpy(x, dtype).reshape(rows, D)
    y = lam0.reshape(rows, 1) * flat + U @ (V.T @ flat)
    return _back(y.reshape(batch + (T, D)), x)


def attention(q, k, v, level_scales, log_decay, scale):
    _check_no_grad(level_scales, log_decay, q, k, v)
    dtype, batch, T, lam0, U, V = _factors(level_scales, log_decay)
    Dk, Dv = q.shape[-1], v.shape[-1]
    n = lam0.size  # rows of all batch entries (explicit sizes: an empty batch or a zero width infers no -1)
    qn = as_numpy(q, dtype).reshape(n, Dk) * dtype.type(scale)
    kn = as_numpy(k, dtype).reshape(n, Dk)
    vn = as_numpy(v, dtype).reshape(n, Dv)
    out = (lam0.reshape(n) * np.einsum("tk,tk->t", qn, kn))[:, None] * vn
    width = max(1, STATE_WIDTH // max(Dk, 1))
    for c in range(0, Dv, width):
        vc = vn[:, c : c + width]
        kv = (kn[:, :, None] * vc[:, None, :]).reshape(n, Dk * vc.shape[1])
        rows = (U @ (V.T @ kv)).reshape(n, Dk, vc.shape[1])
        out[:, c : c + width] += np.einsum("tk,tkv->tv", qn, rows)
    return _back(out.reshape(batch + (T, Dv)), v)
