"""The log-linear mask in symbols (sympy), and a computer-algebra proof of its HODLR form.

Scales are the symbols ``lambda_{t,l}``; the per-step decays are positive symbols
``a_k = exp(g_k)`` (or, with ``log_form=True``, ``exp(g_k)`` with real ``g_k``), so

``M[t, s] = lambda_{t, level(t, s)} * a_{s+1} * ... * a_t``  for ``s <= t``, 0 above.

:func:`prove_block_factorisation` has sympy check, for every off-diagonal block of a
length-``T`` mask, that each entry equals ``u_t v_s`` with the anchored factors of
``docs/mathematics.md`` and that the block has rank exactly 1; and that the diagonal
plus the blocks rebuild the whole mask.  :func:`factor_formulas` gives the general
formulas as sympy equations that render as LaTeX in notebooks.

Examples
--------
>>> from hodlr import symbolic
>>> M = symbolic.symbolic_mask(3)
>>> M[2, 0], M[2, 1], M[0, 1]
(a_1*a_2*lambda_2,2, a_2*lambda_2,2, 0)
>>> bool(symbolic.prove_block_factorisation(4))
True
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import combinations

import sympy

from hodlr import fenwick
from hodlr.fenwick.arrays import check_int

__all__ = [
    "BlockProof",
    "FactorFormulas",
    "block_factors",
    "decay_symbol",
    "factor_formulas",
    "prove_block_factorisation",
    "scale_symbol",
    "symbolic_mask",
]

MAX_T = 64
"""Largest ``T`` these functions accept: the matrices are ``T x T`` of symbolic entries."""


def _check_T(T) -> int:
    """``T`` as an ``int`` in ``1..MAX_T``: a Python, numpy or sympy integer (not a bool)."""
    T = check_int("T", int(T) if isinstance(T, sympy.Integer) else T)
    if not 1 <= T <= MAX_T:
        raise ValueError(f"T must be in 1..{MAX_T} for symbolic work (T x T symbolic entries), got T={T}")
    return T


def scale_symbol(t: int, lev: int) -> sympy.Symbol:
    """The scale ``lambda_{t,lev}`` (LaTeX ``\\lambda_{t,lev}``)."""
    return sympy.Symbol(f"lambda_{int(t)},{int(lev)}")


def decay_symbol(k: int, log_form: bool = False):
    """The decay of step ``k``: the positive symbol ``a_k``, or ``exp(g_k)`` with real ``g_k``."""
    if log_form:
        return sympy.exp(sympy.Symbol(f"g_{int(k)}", real=True))
    return sympy.Symbol(f"a_{int(k)}", positive=True)


def _decay(lo: int, hi: int, decay: bool, log_form: bool):
    """``a_lo * ... * a_hi`` (empty product 1), i.e. ``exp(G[hi] - G[lo - 1])``."""
    if not decay:
        return sympy.Integer(1)
    return sympy.Mul(*(decay_symbol(k, log_form) for k in range(lo, hi + 1)))


def symbolic_mask(T: int, *, decay: bool = True, log_form: bool = False) -> sympy.Matrix:
    """The ``T x T`` mask with symbolic scales and decays, built from its definition.

    ``M[t, s] = lambda_{t, level(t, s)} * a_{s+1} * ... * a_t`` for ``s <= t``, else 0.

    Parameters
    ----------
    T : int
        Sequence length, ``1 <= T <= 64``.
    decay : bool, default True
        Include the decays (``False``: log-linear attention without decay).
    log_form : bool, default False
        Write each decay ``a_k`` as ``exp(g_k)``.

    Returns
    -------
    sympy.Matrix, shape ``(T, T)``
    """
    T = _check_T(T)

    def entry(t, s):
        t, s = int(t), int(s)
        if s > t:
            return sympy.Integer(0)
        return scale_symbol(t, fenwick.level(t, s)) * _decay(s + 1, t, decay, log_form)

    return sympy.Matrix(T, T, entry)


def block_factors(T: int, blk, *, decay: bool = True, log_form: bool = False):
    """The anchored factors ``(u, v)`` of one off-diagonal block, as sympy column vectors.

    For the block of level ``l`` with columns ``[a, m)`` and rows ``[m, ...)``:
    ``u_t = lambda_{t,l} * a_m * ... * a_t`` (``= lambda_{t,l} exp(G_t - G_{m-1})``) and
    ``v_s = a_{s+1} * ... * a_{m-1}`` (``= exp(G_{m-1} - G_s)``).

    Parameters
    ----------
    T : int
    blk : fenwick.Block
        One of :func:`fenwick.offdiag_blocks` ``(T)``.
    """
    T = check_int("T", T, 1)
    if not isinstance(blk, fenwick.Block) or blk not in fenwick.offdiag_blocks(T):
        raise ValueError(f"blk must be one of hodlr.fenwick.offdiag_blocks({T}), got {blk!r}")
    m = blk.col_stop
    u = sympy.Matrix([scale_symbol(t, blk.level) * _decay(m, t, decay, log_form) for t in range(blk.row_start, blk.row_stop)])
    v = sympy.Matrix([_decay(s + 1, m - 1, decay, log_form) for s in range(blk.col_start, blk.col_stop)])
    return u, v


def _is_zero(expr) -> bool:
    expr = sympy.expand(expr)
    if expr == 0:
        return True
    return sympy.simplify(sympy.powsimp(expr, force=True)) == 0


@dataclass
class BlockProof:
    """What :func:`prove_block_factorisation` checked; true iff every check held."""

    T: int
    decay: bool
    blocks: int = 0
    entries: int = 0
    minors: int = 0
    reconstructs: bool = False
    failures: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.reconstructs and not self.failures and self.blocks == _count_blocks(self.T)

    def __bool__(self) -> bool:
        return self.ok

    def __repr__(self) -> str:
        verdict = "PROVED" if self.ok else f"FAILED ({len(self.failures)} failures)"
        text = (
            f"BlockProof(T={self.T}, decay={self.decay}): {verdict}\n"
            f"  {self.blocks} off-diagonal blocks: {self.entries} entries equal u_t v_s, "
            f"{self.minors} 2x2 minors vanish, every block has a non-zero entry (rank exactly 1)\n"
            f"  diag(lambda_t,0) + sum of embedded u v^T == mask: {self.reconstructs}"
        )
        for failure in self.failures[:5]:
            text += f"\n  failure: {failure}"
        return text


def _count_blocks(T: int) -> int:
    return sum(fenwick.num_blocks(T, lev) for lev in range(1, fenwick.num_levels(T)))


def prove_block_factorisation(T: int, *, decay: bool = True, log_form: bool = False) -> BlockProof:
    """Have sympy prove that the length-``T`` mask is HODLR with rank-1 blocks.

    For every off-diagonal block (:func:`fenwick.offdiag_blocks`):

    1. each entry of :func:`symbolic_mask` equals ``u_t v_s`` (:func:`block_factors`);
       since the scales are distinct symbols this also proves every entry of the block
       has the block's level;
    2. every ``2 x 2`` minor expands to 0 (rank <= 1) and some entry is non-zero
       (rank >= 1);

    and finally ``diag(lambda_{t,0}) + sum_blocks embed(u v^T)`` equals the mask
    entry by entry, so the blocks and the diagonal cover the lower triangle exactly.

    Parameters
    ----------
    T : int
        ``1 <= T <= 64`` (the work grows like ``T^4`` through the minors; ``T <= 16`` is
        quick).
    decay, log_form : bool
        As in :func:`symbolic_mask`.

    Returns
    -------
    BlockProof
        Truthy iff every check held; its repr says what was checked.
    """
    T = _check_T(T)
    M = symbolic_mask(T, decay=decay, log_form=log_form)
    proof = BlockProof(T=T, decay=decay)
    rebuilt = sympy.diag(*[scale_symbol(t, 0) for t in range(T)])
    for blk in fenwick.offdiag_blocks(T):
        u, v = block_factors(T, blk, decay=decay, log_form=log_form)
        rows = range(blk.row_start, blk.row_stop)
        cols = range(blk.col_start, blk.col_stop)
        block = M[blk.row_start : blk.row_stop, blk.col_start : blk.col_stop]
        outer = u * v.T
        for i, t in enumerate(rows):
            for j, s in enumerate(cols):
                proof.entries += 1
                if not _is_zero(block[i, j] - outer[i, j]):
                    proof.failures.append(f"level {blk.level} block {blk.index}: M[{t},{s}] != u_t v_s")
                rebuilt[t, s] += outer[i, j]
        for (i1, i2) in combinations(range(len(rows)), 2):
            for (j1, j2) in combinations(range(len(cols)), 2):
                proof.minors += 1
                minor = block[i1, j1] * block[i2, j2] - block[i1, j2] * block[i2, j1]
                if not _is_zero(minor):
                    proof.failures.append(f"level {blk.level} block {blk.index}: a 2x2 minor is non-zero")
        if all(_is_zero(x) for x in block):
            proof.failures.append(f"level {blk.level} block {blk.index}: the block is zero")
        proof.blocks += 1
    proof.reconstructs = all(_is_zero(a - b) for a, b in zip(rebuilt, M))
    return proof


class FactorFormulas:
    """The general formulas of the mask and of its block factors, as sympy equations.

    Attributes ``level``, ``cumulative``, ``mask``, ``u``, ``v`` and ``product`` are
    ``sympy.Eq``; :meth:`latex` gives an ``aligned`` LaTeX block and notebooks render the
    object directly (``_repr_latex_``).  :meth:`verify` has sympy check ``u_t v_s = M_{t,s}``
    in general (symbolic positions and anchor).
    """

    def __init__(self):
        t, s, m, k, lev = sympy.symbols("t s m k l", integer=True, nonnegative=True)
        lam = sympy.IndexedBase("lambda")
        G = sympy.IndexedBase("G")
        g = sympy.IndexedBase("g")
        M = sympy.IndexedBase("M")
        u = sympy.IndexedBase("u")
        v = sympy.IndexedBase("v")
        ell = sympy.Function("ell")
        self.symbols = {"t": t, "s": s, "m": m, "l": lev, "lambda": lam, "G": G, "g": g}
        self.cumulative = sympy.Eq(G[t], sympy.Sum(g[k], (k, 0, t)))
        self.level = sympy.Eq(ell(t, s), sympy.Function("bitlength")(sympy.Function("xor")(t, s)))
        self.mask = sympy.Eq(M[t, s], lam[t, ell(t, s)] * sympy.exp(G[t] - G[s]))
        self.u = sympy.Eq(u[t], lam[t, lev] * sympy.exp(G[t] - G[m - 1]))
        self.v = sympy.Eq(v[s], sympy.exp(G[m - 1] - G[s]))
        self.product = sympy.Eq(u[t] * v[s], lam[t, lev] * sympy.exp(G[t] - G[s]))

    @property
    def equations(self) -> list:
        return [self.cumulative, self.level, self.mask, self.u, self.v, self.product]

    def verify(self) -> bool:
        """sympy: ``u_t v_s - lambda_{t,l} exp(G_t - G_s)`` simplifies to 0."""
        return sympy.simplify(self.u.rhs * self.v.rhs - self.product.rhs) == 0

    def latex(self) -> str:
        """The formulas as one LaTeX ``aligned`` block (written in the order a reader expects;
        the sympy equations above are the same formulas)."""
        lines = [
            r"G_{t} &= \sum_{k=0}^{t} g_{k}",
            r"\ell(t, s) &= \operatorname{bitlength}(t \oplus s) \quad (s < t), \qquad \ell(t, t) = 0",
            r"M_{t,s} &= \lambda_{t,\ell(t,s)}\, e^{G_{t} - G_{s}} \quad (s \le t)",
            r"u_{t} &= \lambda_{t,l}\, e^{G_{t} - G_{m-1}} \quad (m \le t < a + 2^{l})",
            r"v_{s} &= e^{G_{m-1} - G_{s}} \quad (a \le s < m = a + 2^{l-1})",
            r"u_{t} v_{s} &= \lambda_{t,l}\, e^{G_{t} - G_{s}} = M_{t,s} \quad \text{since } \ell(t,s) = l",
        ]
        return "\\begin{aligned}\n" + " \\\\\n".join(lines) + "\n\\end{aligned}"

    def _repr_latex_(self) -> str:
        return "$$" + self.latex() + "$$"

    def __repr__(self) -> str:
        return "\n".join(str(eq) for eq in self.equations)


def factor_formulas() -> FactorFormulas:
    """The general formulas of the mask and its anchored rank-1 factors (see
    :class:`FactorFormulas`).

    >>> f = factor_formulas()
    >>> f.verify()
    True
    >>> f.u.rhs == sympy.IndexedBase("lambda")[f.symbols["t"], f.symbols["l"]] * sympy.exp(
    ...     sympy.IndexedBase("G")[f.symbols["t"]] - sympy.IndexedBase("G")[f.symbols["m"] - 1])
    True
    """
    return FactorFormulas()
