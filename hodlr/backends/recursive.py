"""Recursive backend: the HODLR matvec, unrolled level by level.

The classic recursion on the tree (docs/mathematics.md §6)::

    y1 = A11 x1
    y2 = A22 x2 + u (v^T x1)

unrolls into one pass per level ``l = 1 .. num_levels(T) - 1``: every tree node
``[a, a + 2^l)`` (the sequence padded with zeros to ``N = 2^(num_levels(T) - 1)``) adds
``u (v^T x[a : m])`` to ``y[m : a + 2^l]``, with ``m = a + 2^(l-1)`` and the anchored rank-1
factors of :meth:`hodlr.LogLinearMask.block_factors`.  All nodes of a level are done at
once (a reshape of the padded sequence to ``(nodes, 2, 2^(l-1), D)``), plus the diagonal
term ``level_scales[:, 0] * x``.

Matmul gets the column sums ``v^T x[a : m]`` from an up-sweep, as nested-basis HODLR codes
do: the column range of a level-``l`` block is the left child of its node, and a node's
decay-weighted sum ``W = sum_s exp(G[end - 1] - G[s]) x_s`` is
``exp(sum of g over the right child) W_left + W_right``.  So every level reads ``O(T D / 2^l)``
numbers for its sums and ``O(T D)`` only to update its rows.  Attention forms every node's
state ``S = K_cols^T diag(v) V_cols`` (``Dk x Dv``) and its rows read it as
``u * (Q_rows S)``.  Nodes of the low levels, whose blocks are smaller than a state
(``2^(l-1) (Dk + Dv) < Dk Dv``), compute ``u * ((Q_rows K_cols^T diag(v)) V_cols)``
instead, so no level holds more than ``O(T (Dk + Dv))`` numbers.  Work is
``O(T log T D)`` for matmul and ``O(T log T Dk Dv)`` for attention.

The formula is written once against :func:`fenwick.arrays.namespace`: it runs on numpy
arrays and on torch tensors (any device), and torch autograd differentiates through it.
float16 / bfloat16 operands are computed in the mask's dtype (float32) and cast back.
"""

from __future__ import annotations

from hodlr import fenwick
from hodlr._formulas import block_col_factors, block_row_factors, tie_decay
from hodlr.fenwick.arrays import cast, namespace, zeros

DESCRIPTION = "HODLR matvec, level by level over all tree nodes; numpy or torch, autograd, O(T log T)"


def unavailable_reason(library, device):
    return None


def _pad(x, N: int):
    """``x (..., T, D)`` padded with zeros to ``(..., N, D)`` (``x`` itself if ``N == T``)."""
    T = x.shape[-2]
    if N == T:
        return x
    pad = zeros(tuple(x.shape[:-2]) + (N - T, x.shape[-1]), x)
    return namespace(x).concatenate([x, pad], -2)


def _nodes(x, n: int, half: int):
    """View of the first ``n 2 half`` rows of ``x (..., N, D)`` as ``(..., n, 2, half, D)``:
    ``[..., j, 0]`` are the columns of node ``j``'s off-diagonal block, ``[..., j, 1]`` its
    rows."""
    return x[..., : n * 2 * half, :].reshape(tuple(x.shape[:-2]) + (n, 2, half, x.shape[-1]))


def _levels(level_scales, log_decay, rows_only=False):
    """Yield ``(u, v)`` of every level, shapes ``(*batch, n, half)`` (``v`` is ``None`` with
    ``rows_only``; without decay ``v`` has no batch dimensions).  The factors of
    :meth:`hodlr.LogLinearMask.block_factors`, from their formulas: no mask is built, so the
    computation reports no deferred check of its own (its public call has)."""
    for lev in range(1, fenwick.num_levels(level_scales.shape[-2])):
        u = block_row_factors(level_scales, log_decay, lev)
        yield (u, None) if rows_only else (u, block_col_factors(level_scales, log_decay, lev))


def matmul(level_scales, log_decay, x):
    out_dtype = x.dtype
    x = cast(x, level_scales.dtype)
    xp = namespace(x)
    batch, (T, D) = tuple(x.shape[:-2]), tuple(x.shape[-2:])
    N = 1 << (fenwick.num_levels(T) - 1)
    y = _pad(level_scales[..., 0, None] * x, N)  # a fresh array: updated in place below
    # Up-sweep: W[i] = sum over node i (size 2^(l-1)) of exp(G[node end - 1] - G[s]) x[s];
    # the left node of each pair is the column range of its parent's block, anchored as
    # block_factors anchors v, and gsum[i] is the node's sum of log-decays.
    W = _pad(x, N)
    gsum = None if log_decay is None else _pad(log_decay[..., None], N)[..., 0]
    for u, _ in _levels(level_scales, log_decay, rows_only=True):
        n, half = u.shape[-2:]
        pairs = W.reshape(batch + (N // (2 * half), 2, D))
        _nodes(y, n, half)[..., 1, :, :] += u[..., :, None] * pairs[..., :n, None, 0, :]
        if gsum is None:
            W = pairs[..., 0, :] + pairs[..., 1, :]
        else:
            gpairs = gsum.reshape(batch + (N // (2 * half), 2))
            W = xp.exp(gpairs[..., 1])[..., None] * pairs[..., 0, :] + pairs[..., 1, :]
            gsum = gpairs[..., 0] + gpairs[..., 1]
    return cast(tie_decay(y[..., :T, :], log_decay), out_dtype)


def attention(q, k, v, level_scales, log_decay, scale):
    out_dtype = v.dtype
    q, k, v = (cast(a, level_scales.dtype) for a in (q, k, v))
    xp = namespace(q)
    T = q.shape[-2]
    N = 1 << (fenwick.num_levels(T) - 1)
    q = q * scale
    diag = level_scales[..., 0] * (q * k).sum(-1)
    y = _pad(diag[..., None] * v, N)
    qp, kp, vp = _pad(q, N), _pad(k, N), _pad(v, N)
    Dk, Dv = q.shape[-1], v.shape[-1]
    for uf, vf in _levels(level_scales, log_decay):
        n, half = uf.shape[-2:]
        q_rows = _nodes(qp, n, half)[..., 1, :, :]
        k_cols = _nodes(kp, n, half)[..., 0, :, :] * vf[..., :, None]
        v_cols = _nodes(vp, n, half)[..., 0, :, :]
        if half * (Dk + Dv) < Dk * Dv:
            # small blocks: their (half x half) scores are smaller than a Dk x Dv state
            rows = xp.matmul(xp.matmul(q_rows, xp.swapaxes(k_cols, -1, -2)), v_cols)
        else:
            rows = xp.matmul(q_rows, xp.matmul(xp.swapaxes(k_cols, -1, -2), v_cols))
        _nodes(y, n, half)[..., 1, :, :] += uf[..., :, None] * rows
    return cast(tie_decay(y[..., :T, :], log_decay), out_dtype)
