"""The computer-algebra proof of the HODLR form, and its agreement with the numeric mask."""

import numpy as np
import pytest
import sympy

from hodlr import fenwick
import hodlr
from hodlr import symbolic


@pytest.mark.parametrize("T", [1, 2, 3, 4, 5, 7, 8])
@pytest.mark.parametrize("decay", [True, False])
def test_proof_passes(T, decay):
    proof = symbolic.prove_block_factorisation(T, decay=decay)
    assert proof.ok and bool(proof)
    assert proof.blocks == sum(1 for _ in fenwick.offdiag_blocks(T))
    assert proof.entries == T * (T - 1) // 2
    assert proof.reconstructs
    assert "PROVED" in repr(proof)


def test_proof_in_log_form_and_for_T16():
    assert symbolic.prove_block_factorisation(8, log_form=True)
    proof = symbolic.prove_block_factorisation(16)
    assert proof.ok and proof.minors > 0


def test_proof_detects_a_wrong_anchor(monkeypatch):
    """The proof is not vacuous: factors anchored one step off are rejected."""
    right = symbolic.block_factors

    def shifted(T, blk, **kw):
        u, v = right(T, blk, **kw)
        if blk.level >= 2:
            u = u * symbolic.decay_symbol(blk.col_stop)
        return u, v

    monkeypatch.setattr(symbolic, "block_factors", shifted)
    proof = symbolic.prove_block_factorisation(8)
    assert not proof.ok and proof.failures
    assert "FAILED" in repr(proof)


def test_symbolic_mask_matches_numeric_mask(rng):
    T = 11
    L = fenwick.num_levels(T)
    lam = rng.uniform(0.5, 1.5, (T, L))
    g = np.log(rng.uniform(0.6, 1.0, T))
    M = symbolic.symbolic_mask(T)
    subs = {symbolic.scale_symbol(t, l): lam[t, l] for t in range(T) for l in range(L)}
    subs.update({symbolic.decay_symbol(k): np.exp(g[k]) for k in range(T)})
    numeric = np.array(M.subs(subs).evalf(), dtype=np.float64)
    dense = hodlr.LogLinearMask(lam, g).to_dense()
    np.testing.assert_allclose(numeric, dense, rtol=1e-13, atol=0)
    logM = symbolic.symbolic_mask(T, log_form=True)
    subs_log = {sympy.Symbol(f"g_{k}", real=True): g[k] for k in range(T)}
    subs_log.update({symbolic.scale_symbol(t, l): lam[t, l] for t in range(T) for l in range(L)})
    np.testing.assert_allclose(np.array(logM.subs(subs_log).evalf(), dtype=np.float64), dense, rtol=1e-13)


def test_block_factors_match_mask_block_factors(rng):
    T = 8
    L = fenwick.num_levels(T)
    lam = rng.uniform(0.5, 1.5, (T, L))
    g = np.log(rng.uniform(0.6, 1.0, T))
    mask = hodlr.LogLinearMask(lam, g)
    subs = {symbolic.scale_symbol(t, l): lam[t, l] for t in range(T) for l in range(L)}
    subs.update({symbolic.decay_symbol(k): np.exp(g[k]) for k in range(T)})
    for blk in fenwick.offdiag_blocks(T):
        u, v = symbolic.block_factors(T, blk)
        nu, nv = mask.block_factors(blk.level)
        rows = blk.row_stop - blk.row_start
        np.testing.assert_allclose(np.array(u.subs(subs).evalf(), dtype=float).ravel(), nu[blk.index, :rows], rtol=1e-13)
        np.testing.assert_allclose(np.array(v.subs(subs).evalf(), dtype=float).ravel(), nv[blk.index], rtol=1e-13)


def test_factor_formulas():
    f = symbolic.factor_formulas()
    assert f.verify()
    latex = f._repr_latex_()
    assert latex.startswith("$$\\begin{aligned}") and "u_{t} v_{s}" in latex
    assert len(f.equations) == 6 and all(isinstance(eq, sympy.Eq) for eq in f.equations)
    assert "Eq(u[t]" in repr(f)


def test_exposed_lazily_and_validates():
    assert hodlr.symbolic is symbolic
    with pytest.raises(ValueError, match="T must be in 1..64"):
        symbolic.symbolic_mask(0)
    with pytest.raises(ValueError, match="T must be in 1..64"):
        symbolic.prove_block_factorisation(65)
    with pytest.raises(TypeError, match="T must be an integer"):
        symbolic.symbolic_mask(2.0)


@pytest.mark.parametrize("T, error, message", [
    (2.0, TypeError, "^T must be an integer, got float$"),
    (True, TypeError, "^T must be an integer, got bool$"),
    (np.bool_(True), TypeError, "^T must be an integer, got bool"),
    (sympy.Float(2), TypeError, "^T must be an integer, got Float$"),
    ("2", TypeError, "^T must be an integer, got str$"),
    (-1, ValueError, r"^T must be in 1\.\.64 for symbolic work \(T x T symbolic entries\), got T=-1$"),
])
def test_T_is_checked_as_every_integer_argument(T, error, message):
    """``T`` goes through ``check_int``: a wrong type is a TypeError naming ``T``, a value out of
    range a ValueError."""
    for call in (symbolic.symbolic_mask, symbolic.prove_block_factorisation):
        with pytest.raises(error, match=message):
            call(T)


def test_T_may_be_a_numpy_or_sympy_integer():
    want = symbolic.symbolic_mask(3)
    for T in (np.int64(3), sympy.Integer(3)):
        assert symbolic.symbolic_mask(T) == want
        assert bool(symbolic.prove_block_factorisation(T))
