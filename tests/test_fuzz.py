"""Fuzzing the public API: arbitrary, often invalid shapes, dtypes, values and backends.

Each example draws raw inputs, predicts independently (the oracle below, written from
docs/mathematics.md and docs/bad-input.md, not from the implementation) whether they are valid, and
calls the API:

* valid inputs must give the float64 reference computed here from the definition, row by
  row (relative error <= 1e-12 for float64, 1e-5 for float32); for log-linear Gated DeltaNet
  the definition is the product of explicit ``Dk x Dk`` transitions of docs/mathematics.md §13;
* invalid inputs must raise ``ValueError`` or ``TypeError`` (the documented errors and
  their subclasses) -- never ``IndexError``, a bare ``RuntimeError``, or a result.

``HYPOTHESIS_PROFILE=thorough`` (500 examples per test) or ``HODLR_FUZZ_EXAMPLES=N`` runs more
examples; the counts are in docs/reliability.md.
"""

import math
import os

import numpy as np
import pytest
from hypothesis import event, given, settings, strategies as st

from hodlr import fenwick
import hodlr
from hodlr import backends as registry

torch = pytest.importorskip("torch")

NUMPY_DTYPES = {"float64": np.float64, "float32": np.float32, "float16": np.float16, "int64": np.int64,
                "bool": np.bool_, "complex128": np.complex128}
TORCH_DTYPES = {"float64": torch.float64, "float32": torch.float32, "int64": torch.int64, "bool": torch.bool,
                "complex128": torch.complex128}
FLOAT = ("float64", "float32")
BACKENDS = registry.NAMES + ("auto", "bogus")
CHUNK_WISE = ("chunked", "triton")
"""Backends that run Gated DeltaNet in the chunk-wise (UT) form."""
TOL = {"float64": 1e-12, "float32": 1e-5}


EXAMPLES = os.environ.get("HODLR_FUZZ_EXAMPLES")
"""Examples per fuzz test; default: the active hypothesis profile's ``max_examples``."""
examples = settings(max_examples=int(EXAMPLES)) if EXAMPLES else (lambda f: f)


class Invalid(Exception):
    """The oracle's verdict: these inputs must be refused."""


# -- drawing -------------------------------------------------------------------------
# Each example applies a few "faults" (often none) to otherwise valid inputs, so that about
# half the calls are valid and most invalid ones have one thing wrong.
MASK_FAULTS = ("scales rank", "T = 0", "too few levels", "scales dtype", "non-finite read scale",
               "decay rank", "decay length", "decay dtype", "decay batch", "non-finite decay")
X_FAULTS = ("X rank", "X length", "X dtype", "X library", "X batch", "unknown backend", "unavailable backend")
ATTENTION_FAULTS = ("q rank", "k length", "v length", "Dk mismatch", "k dtype", "v dtype", "bad scale",
                    "operand batch", "unknown backend", "unavailable backend")


def draw_faults(data, faults):
    return data.draw(st.one_of(st.just(frozenset()), st.frozensets(st.sampled_from(faults), min_size=1, max_size=2)),
                     label="faults")


def bad_dtype(data, library):
    names = [n for n in (NUMPY_DTYPES if library == "numpy" else TORCH_DTYPES) if n not in FLOAT]
    return data.draw(st.sampled_from(names), label="bad dtype")


def to_library(a, library, dtype):
    """float64 numpy values as an array of ``library`` and dtype name ``dtype``."""
    with np.errstate(invalid="ignore", over="ignore"):
        if library == "numpy":
            return np.asarray(a) > 0 if dtype == "bool" else np.asarray(a).astype(NUMPY_DTYPES[dtype])
        t = torch.as_tensor(np.asarray(a, dtype=np.float64))
        return t > 0 if dtype == "bool" else t.to(TORCH_DTYPES[dtype])


def draw_batch(data, label):
    return tuple(data.draw(st.lists(st.integers(0, 3), max_size=2), label=label))


def conflicting(batch):
    """A batch shape that does not broadcast with ``batch`` (``batch`` itself if none can)."""
    for i, n in enumerate(batch):
        if n != 1:
            return batch[:i] + (n + 1 if n else 2,) + batch[i + 1:]
    return batch


def draw_mask_inputs(data, rng, library, faults=frozenset()):
    """Raw mask inputs (float64 numpy values plus the dtype names to convert to)."""
    T = 0 if "T = 0" in faults else data.draw(st.integers(1, 40), label="T")
    need = fenwick.num_levels(max(T, 1))
    L = need - data.draw(st.integers(1, 2)) if "too few levels" in faults else need + data.draw(st.integers(0, 2))
    batch = draw_batch(data, "mask batch")
    if "decay batch" in faults:
        batch = (2,) + batch
    shape = batch + (T, max(L, 0))
    if "scales rank" in faults:
        shape = shape[len(shape) - data.draw(st.integers(0, 1)):] if len(shape) > 1 else ()
    lam_dtype = bad_dtype(data, library) if "scales dtype" in faults else data.draw(st.sampled_from(FLOAT))
    lam = rng.uniform(0.2, 2.0, shape) * rng.choice([-1.0, 1.0], shape) * 10.0 ** data.draw(st.integers(-3, 3))
    if len(shape) >= 2 and T >= 1 and L >= 1:
        read = fenwick.read_levels(T, L)
        lam[..., ~read] = data.draw(st.sampled_from([np.nan, np.inf, 0.0, 1e300]), label="unread value")
        if "non-finite read scale" in faults:
            t = data.draw(st.integers(0, T - 1))
            cols = np.flatnonzero(read[t])
            lam[..., t, cols[data.draw(st.integers(0, cols.size - 1))]] = data.draw(
                st.sampled_from([np.nan, np.inf, -np.inf]))
    decay_faults = {f for f in faults if "decay" in f}
    g, g_dtype = None, lam_dtype
    if decay_faults or data.draw(st.booleans(), label="has decay"):
        g_batch = tuple(1 if data.draw(st.booleans()) else n for n in batch)
        g_batch = g_batch[data.draw(st.integers(0, len(g_batch))):]
        if "decay batch" in faults:
            g_batch = conflicting(batch)
        g_T = T + data.draw(st.sampled_from([-1, 1])) if "decay length" in faults else T
        g_shape = () if "decay rank" in faults else g_batch + (max(g_T, 0),)
        if "decay dtype" in faults:
            g_dtype = data.draw(st.sampled_from([d for d in FLOAT if d != lam_dtype] + [bad_dtype(data, library)]))
        low, high = {"mild": (-1.0, 0.0), "strong": (-50.0, 0.0), "positive": (0.0, 0.5), "zero": (0.0, 0.0)}[
            data.draw(st.sampled_from(["mild", "strong", "positive", "zero"]), label="decay kind")]
        g = rng.uniform(low, high, g_shape)
        if "non-finite decay" in faults and g.size:
            g.flat[data.draw(st.integers(0, g.size - 1))] = data.draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    return lam, lam_dtype, g, g_dtype


def draw_operand(data, rng, batch, T, D, faults, name):
    """An operand ``(*b, T, D)`` whose batch ``b`` broadcasts with ``batch`` unless faulted."""
    b = tuple(1 if data.draw(st.booleans()) else n for n in batch)
    b = b[data.draw(st.integers(0, len(b))):]
    if data.draw(st.integers(0, 3)) == 0:
        b = (data.draw(st.integers(1, 2)),) + b  # an extra dim: valid or not, the oracle decides
    if f"{name} batch" in faults:
        b = conflicting(batch)
    if f"{name} length" in faults:
        T = T + data.draw(st.sampled_from([-1, 1]))
    shape = b + (max(T, 0), D)
    if f"{name} rank" in faults:
        shape = shape[len(shape) - 1:] if data.draw(st.booleans()) else ()
    return rng.standard_normal(shape)


# -- the oracle ------------------------------------------------------------------------
def check_array(a, dtype, ndim, library=None):
    if dtype not in FLOAT:
        raise Invalid(f"dtype {dtype}")
    if np.ndim(a) < ndim:
        raise Invalid("rank")


def broadcast(*shapes):
    try:
        return np.broadcast_shapes(*shapes)
    except ValueError:
        raise Invalid("batch does not broadcast") from None


def oracle_mask(lam, lam_dtype, g, g_dtype):
    """Validate like docs/mathematics.md §3 and §9 say; return the float64 (lam, g) as the mask will hold them."""
    check_array(lam, lam_dtype, 2)
    T, L = lam.shape[-2:]
    if T < 1 or L < fenwick.num_levels(T):
        raise Invalid("T / L")
    with np.errstate(over="ignore"):
        lam = np.asarray(lam).astype(lam_dtype).astype(np.float64)
    shapes = [lam.shape[:-2]]
    if g is not None:
        check_array(g, g_dtype, 1)
        if g_dtype != lam_dtype or g.shape[-1] != T:
            raise Invalid("decay dtype / length")
        shapes.append(g.shape[:-1])
        g = np.asarray(g).astype(g_dtype).astype(np.float64)
    batch = broadcast(*shapes)
    read = fenwick.read_levels(T, L)
    if not np.isfinite(lam[..., read]).all() or (g is not None and not np.isfinite(g).all()):
        raise Invalid("non-finite")
    return lam, g, batch


def oracle_backend(backend, library, op="attention"):
    if not isinstance(backend, str) or backend not in BACKENDS[:-1]:
        raise Invalid("unknown backend")
    if backend == "auto":
        return
    module = registry.load(backend)
    if not registry.offers(module, op) or module.unavailable_reason(library, "cpu") is not None:
        raise Invalid("unavailable backend")


def row_weights(lam, g, t):
    s = np.arange(t + 1)
    w = lam[t, fenwick.level(t, s)]
    if g is not None:
        w = w * np.exp(np.concatenate([np.cumsum(g[t:0:-1])[::-1], [0.0]]))
    return w


def reference(lam, g, batch, op, operands, scale=1.0):
    """float64 result from the definition, row by row (segment sums of the decay)."""
    T = lam.shape[-2]
    shapes = [batch] + [a.shape[:-2] for a in operands]
    full = np.broadcast_shapes(*shapes)
    lam = np.broadcast_to(lam, full + lam.shape[-2:])
    g = None if g is None else np.broadcast_to(g, full + (T,))
    ops = [np.broadcast_to(a, full + a.shape[-2:]) for a in operands]
    width = ops[-1].shape[-1]
    out = np.zeros(full + (T, width))
    for b in np.ndindex(*full):
        for t in range(T):
            w = row_weights(lam[b], None if g is None else g[b], t)
            if op == "matmul":
                out[b + (t,)] = w @ ops[0][b][: t + 1]
            else:
                q, k, v = (a[b] for a in ops)
                if q.shape[-1]:
                    out[b + (t,)] = (w * (scale * (k[: t + 1] @ q[t]))) @ v[: t + 1]
    return out


def gdn_reference(lam, g, beta, q, k, v, scale):
    """Log-linear Gated DeltaNet from its definition (docs/mathematics.md §13), float64: for
    every batch entry (the arguments broadcast to one batch shape) and row ``t``,
    ``o_t = Σ_{s<=t} λ[t, level(t, s)] scale β_s (q_tᵀ A_t ⋯ A_{s+1} k_s) v_s`` with the explicit
    transitions ``A_t = exp(g_t) (I − β_t k_t k_tᵀ)`` (``g`` None: no gate)."""
    batch, (T, Dk), Dv = q.shape[:-2], q.shape[-2:], v.shape[-1]
    nb = math.prod(batch)
    lam, q, k, v = (a.reshape((nb,) + a.shape[-2:]) for a in (lam, q, k, v))
    beta = beta.reshape(nb, T)
    gate = np.ones_like(beta) if g is None else np.exp(g.reshape(nb, T))
    A = gate[..., None, None] * (np.eye(Dk) - beta[..., None, None] * k[..., :, None] * k[..., None, :])
    out = np.zeros(q.shape[:1] + (T, Dv))
    for t in range(T):
        prod = np.broadcast_to(np.eye(Dk), A.shape[:1] + (Dk, Dk))
        for s in range(t, -1, -1):
            coef = scale * beta[:, s] * np.einsum("bi,bij,bj->b", q[:, t], prod, k[:, s])
            out[:, t] += (lam[:, t, fenwick.level(t, s)] * coef)[:, None] * v[:, s]
            prod = prod @ A[:, s]
    return out.reshape(batch + (T, Dv))


def compare(got, want, dtype, library, want_dtype, values=True):
    """``got`` has the library's type, ``want_dtype`` and ``want``'s shape, and (``values``) its
    values to the dtype's tolerance."""
    got_np = got.detach().numpy() if library == "torch" else got
    assert type(got) is (torch.Tensor if library == "torch" else np.ndarray)
    assert str(got.dtype).replace("torch.", "") == want_dtype, (got.dtype, want_dtype)
    got_np = np.asarray(got_np, dtype=np.float64)
    assert got_np.shape == want.shape, (got_np.shape, want.shape)
    if want.size == 0 or not values:
        return
    assert np.isfinite(got_np).all() == np.isfinite(want).all()
    finite = np.isfinite(want).all()
    if finite:
        # results below the dtype's smallest normal number (a scale of 1e-41 in float32, say)
        # carry no relative precision: they may differ by that much absolutely
        tiny = float(np.finfo(np.dtype(dtype)).tiny) * np.sqrt(want.size)
        diff, denom = np.linalg.norm(got_np - want), np.linalg.norm(want)
        bound = TOL[dtype] * denom + tiny if denom > 0 else TOL[dtype]
        assert diff <= bound, f"relative error {diff / max(denom, tiny):.3e} > {TOL[dtype]}"


def expect(call, verdict):
    """Run ``call``; with an Invalid verdict it must raise a documented error."""
    if isinstance(verdict, Invalid):
        event(f"invalid: {verdict}")
        with pytest.raises((ValueError, TypeError)) as info:  # anything else (IndexError, ...) propagates
            call()
        event(f"raised {type(info.value).__name__}")
        return None
    event("valid")
    return call()


def make_mask(lam, lam_dtype, g, g_dtype, library):
    lam_a = to_library(lam, library, lam_dtype) if np.ndim(lam) else float(lam)
    g_a = None if g is None else to_library(g, library, g_dtype) if np.ndim(g) else float(g)
    return hodlr.LogLinearMask(lam_a, g_a)


# -- the fuzz tests ---------------------------------------------------------------------
def draw_library_and_rng(data):
    library = data.draw(st.sampled_from(["numpy", "torch"]), label="library")
    return library, np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))


def draw_backend(data, rng, faults, library, op="attention"):
    """A backend name; picked by the seeded generator (hypothesis would favour the first)."""
    if "unknown backend" in faults:
        return data.draw(st.sampled_from(["bogus", "Dense", "", 3, None]), label="backend")
    if "unavailable backend" in faults:
        unavailable = [n for n in registry.NAMES if not registry.offers(registry.load(n), op)
                       or registry.load(n).unavailable_reason(library, "cpu") is not None]
        if unavailable:
            return unavailable[rng.integers(len(unavailable))]
    names = ("auto",) + tuple(n for n in registry.NAMES if registry.offers(registry.load(n), op))
    return names[rng.integers(len(names))]


def valid_mask(data, rng, library):
    lam, lam_dtype, g, g_dtype = draw_mask_inputs(data, rng, library)
    lam64, g64, batch = oracle_mask(lam, lam_dtype, g, g_dtype)
    return make_mask(lam, lam_dtype, g, g_dtype, library), lam64, g64, batch, lam_dtype


@examples
@given(st.data())
def test_fuzz_mask_and_to_dense(data):
    library, rng = draw_library_and_rng(data)
    faults = draw_faults(data, MASK_FAULTS)
    lam, lam_dtype, g, g_dtype = draw_mask_inputs(data, rng, library, faults)
    try:
        verdict = oracle_mask(lam, lam_dtype, g, g_dtype)
    except Invalid as err:
        verdict = err
    M = expect(lambda: make_mask(lam, lam_dtype, g, g_dtype, library), verdict)
    if M is None:
        return
    lam64, g64, batch = verdict
    T = lam64.shape[-2]
    eye = np.broadcast_to(np.eye(T), batch + (T, T))
    compare(M.to_dense(), reference(lam64, g64, batch, "matmul", [eye]), lam_dtype, library, lam_dtype)


@examples
@given(st.data())
def test_fuzz_matmul(data):
    library, rng = draw_library_and_rng(data)
    M, lam64, g64, batch, dtype = valid_mask(data, rng, library)
    faults = draw_faults(data, X_FAULTS)
    x = draw_operand(data, rng, batch, M.T, data.draw(st.integers(0, 4), label="D"), faults, "X")
    x_library = {"numpy": "torch", "torch": "numpy"}[library] if "X library" in faults else library
    x_dtype = (data.draw(st.sampled_from([d for d in FLOAT if d != dtype] + [bad_dtype(data, x_library)]))
               if "X dtype" in faults else dtype)
    backend = draw_backend(data, rng, faults, library)
    try:
        check_array(x, x_dtype, 2)
        if x_library != library or x_dtype != dtype or x.shape[-2] != M.T:
            raise Invalid("X library / dtype / T")
        broadcast(batch, x.shape[:-2])
        oracle_backend(backend, library)
        verdict = None
    except Invalid as err:
        verdict = err
    X = to_library(x, x_library, x_dtype) if np.ndim(x) else float(x)
    Y = expect(lambda: hodlr.matmul(M, X, backend=backend), verdict)
    if Y is not None:
        event(f"ran backend {backend}")
        compare(Y, reference(lam64, g64, batch, "matmul", [x.astype(x_dtype).astype(np.float64)]), dtype,
                library, x_dtype)


@examples
@given(st.data())
def test_fuzz_attention(data):
    library, rng = draw_library_and_rng(data)
    M, lam64, g64, batch, dtype = valid_mask(data, rng, library)
    faults = draw_faults(data, ATTENTION_FAULTS)
    Dk, Dv = data.draw(st.integers(0, 3), label="Dk"), data.draw(st.integers(0, 3), label="Dv")
    q = draw_operand(data, rng, batch, M.T, Dk, faults, "q")
    k = draw_operand(data, rng, batch, M.T, Dk + 1 if "Dk mismatch" in faults else Dk, faults, "k")
    v = draw_operand(data, rng, batch, M.T, Dv, faults | ({"v batch"} if "operand batch" in faults else set()), "v")
    other = [d for d in FLOAT if d != dtype] + [bad_dtype(data, library)]
    dtypes = [dtype, data.draw(st.sampled_from(other)) if "k dtype" in faults else dtype,
              data.draw(st.sampled_from(other)) if "v dtype" in faults else dtype]
    good_scales = st.one_of(st.none(), st.floats(-4, 4), st.sampled_from([0, 2, np.float32(0.5), np.float64(3.0)]))
    bad_scales = st.sampled_from([math.nan, math.inf, -math.inf, "1", True, 1j, [1.0], np.ones(2)])
    scale = data.draw(bad_scales if "bad scale" in faults else good_scales, label="scale")
    backend = draw_backend(data, rng, faults, library)
    try:
        for a, dt in zip((q, k, v), dtypes):
            check_array(a, dt, 2)
            if dt != dtype or a.shape[-2] != M.T:
                raise Invalid("operand dtype / T")
        if q.shape[-1] != k.shape[-1]:
            raise Invalid("Dk")
        if scale is not None and (isinstance(scale, (bool, str, complex, list, np.ndarray))
                                  or not math.isfinite(scale)):
            raise Invalid("scale")
        broadcast(batch, q.shape[:-2], k.shape[:-2], v.shape[:-2])
        oracle_backend(backend, library)
        verdict = None
    except Invalid as err:
        verdict = err
    args = [to_library(a, library, dt) if np.ndim(a) else float(a) for a, dt in zip((q, k, v), dtypes)]
    O = expect(lambda: hodlr.attention(*args, M, scale=scale, backend=backend), verdict)
    if O is not None:
        event(f"ran backend {backend}")
        ops64 = [a.astype(dt).astype(np.float64) for a, dt in zip((q, k, v), dtypes)]
        s = 1.0 if scale is None else float(scale)
        if dtype == "float32":
            s = float(np.float32(s))
        compare(O, reference(lam64, g64, batch, "attention", ops64, s), dtype, library, dtype)


GDN_FAULTS = ATTENTION_FAULTS + ("beta rank", "beta length", "beta dtype", "beta batch")


def unit_rows(a):
    """Rows of unit norm (the delta rule's keys); rows of width 0 stay empty."""
    if np.ndim(a) == 0 or a.shape[-1] == 0:
        return a
    return a / np.linalg.norm(a, axis=-1, keepdims=True)


def draw_beta(data, rng, batch, T, faults):
    """Write strengths ``(*b, T)`` in ``[0, 1]`` (sometimes ``[0, 2]``), ``b`` broadcasting with
    ``batch`` unless faulted."""
    b = tuple(1 if data.draw(st.booleans()) else n for n in batch)
    b = b[data.draw(st.integers(0, len(b))):]
    if "beta batch" in faults:
        b = conflicting(batch)
    if "beta length" in faults:
        T = T + data.draw(st.sampled_from([-1, 1]))
    shape = () if "beta rank" in faults else b + (max(T, 0),)
    return rng.uniform(0.0, data.draw(st.sampled_from([1.0, 2.0]), label="beta range"), shape)


@examples
@given(st.data())
def test_fuzz_gated_delta_attention(data):
    library, rng = draw_library_and_rng(data)
    M, lam64, g64, batch, dtype = valid_mask(data, rng, library)
    faults = draw_faults(data, GDN_FAULTS)
    Dk, Dv = data.draw(st.integers(0, 3), label="Dk"), data.draw(st.integers(0, 3), label="Dv")
    q = draw_operand(data, rng, batch, M.T, Dk, faults, "q")
    k = unit_rows(draw_operand(data, rng, batch, M.T, Dk + 1 if "Dk mismatch" in faults else Dk, faults, "k"))
    v = draw_operand(data, rng, batch, M.T, Dv, faults | ({"v batch"} if "operand batch" in faults else set()), "v")
    beta = draw_beta(data, rng, batch, M.T, faults)
    other = [d for d in FLOAT if d != dtype] + [bad_dtype(data, library)]
    dtypes = [dtype] + [data.draw(st.sampled_from(other)) if f"{name} dtype" in faults else dtype
                        for name in ("k", "v", "beta")]
    good_scales = st.one_of(st.none(), st.floats(-4, 4), st.sampled_from([0, 2, np.float32(0.5), np.float64(3.0)]))
    bad_scales = st.sampled_from([math.nan, math.inf, -math.inf, "1", True, 1j, [1.0], np.ones(2)])
    scale = data.draw(bad_scales if "bad scale" in faults else good_scales, label="scale")
    backend = draw_backend(data, rng, faults, library, "gated_delta_attention")
    try:
        for a, dt, ndim in zip((q, k, v, beta), dtypes, (2, 2, 2, 1)):
            check_array(a, dt, ndim)
            if dt != dtype or a.shape[-ndim] != M.T:
                raise Invalid("operand dtype / T")
        if q.shape[-1] != k.shape[-1]:
            raise Invalid("Dk")
        if scale is not None and (isinstance(scale, (bool, str, complex, list, np.ndarray))
                                  or not math.isfinite(scale)):
            raise Invalid("scale")
        broadcast(batch, q.shape[:-2], k.shape[:-2], v.shape[:-2], beta.shape[:-1])
        oracle_backend(backend, library, "gated_delta_attention")
        verdict = None
    except Invalid as err:
        verdict = err
    args = [to_library(a, library, dt) if np.ndim(a) else float(a) for a, dt in zip((q, k, v, beta), dtypes)]
    O = expect(lambda: hodlr.gated_delta_attention(*args, M, scale=scale, backend=backend), verdict)
    if O is not None:
        event(f"ran backend {backend}")
        q64, k64, v64, beta64 = (a.astype(dt).astype(np.float64) for a, dt in zip((q, k, v, beta), dtypes))
        s = (Dk ** -0.5 if Dk else 1.0) if scale is None else float(scale)
        if dtype == "float32":
            s = float(np.float32(s))
        full = np.broadcast_shapes(batch, q.shape[:-2], k.shape[:-2], v.shape[:-2], beta.shape[:-1])
        bt = lambda a, tail: np.broadcast_to(a, full + a.shape[a.ndim - tail:])  # noqa: E731
        want = gdn_reference(bt(lam64, 2), None if g64 is None else bt(g64, 1), bt(beta64, 1), bt(q64, 2),
                             bt(k64, 2), bt(v64, 2), s)
        ran = (registry.auto_backend(library, "cpu", M.T, op="gated_delta_attention", masks=int(np.prod(full)))
               if backend == "auto" else backend)
        if g64 is not None and (g64 > 0).any() and ran in CHUNK_WISE:
            # a growing gate is outside the chunk-wise form's accuracy (docs/mathematics.md §13):
            # the call must still run and return the right type and shape
            event("growing gate on a chunk-wise backend: type and shape only")
            compare(O, want, dtype, library, dtype, values=False)
        else:
            compare(O, want, dtype, library, dtype)


@examples
@given(st.one_of(st.integers(-5, 2**40), st.floats(allow_nan=True), st.booleans(), st.text(max_size=2),
                 st.none()))
def test_fuzz_index_algebra(T):
    valid = isinstance(T, int) and not isinstance(T, bool) and T >= 1
    if valid:
        assert fenwick.num_levels(T) == (T - 1).bit_length() + 1
        t = T - 1
        assert fenwick.level(t, 0) == (t.bit_length() if t else 0)
    else:
        with pytest.raises((ValueError, TypeError)):
            fenwick.num_levels(T)


# -- log_linear_attn and log_linear_gated_delta_rule: packed sequences and state hand-off ------
OP_FAULTS = ("cu start", "cu decreasing", "cu end", "cu float", "cu batch", "state batch", "state heads",
             "state width", "state dtype", "state device", "narrow scales", "heads not dividing", "bad scale",
             "backend without state")
GDN_OP_FAULTS = ("beta shape",) + OP_FAULTS


def transitions(k, beta, g):
    """``A_t = exp(g_t) (I − β_t k_t k_tᵀ)`` of every position and head: ``(T, H, Dk, Dk)``
    (``k (T, H, Dk)``, ``beta (T, H)``, ``g (T, H)`` or None)."""
    gate = np.ones_like(beta) if g is None else np.exp(g)
    return gate[..., None, None] * (np.eye(k.shape[-1]) - beta[..., None, None] * k[..., :, None] * k[..., None, :])


def bucket_states(k, v, g, end, slots, beta=None):
    """``(H, slots, Dk, Dv)`` float64: the Fenwick buckets of position ``end`` from their definition
    (``k (end, H, Dk)``, ``v (end, H, Dv)``, ``g (end, H)`` or None, positions from 0):
    ``Σ_{s in bucket} exp(G[end-1] - G[s]) k_s v_sᵀ``, or with ``beta (end, H)`` (Gated DeltaNet)
    ``Σ_{s in bucket} A_{end-1} ⋯ A_{s+1} β_s k_s v_sᵀ``."""
    H, Dk, Dv = v.shape[1], k.shape[2], v.shape[2]
    A = None if beta is None else transitions(k, beta, g)
    out = np.zeros((H, slots, Dk, Dv))
    for lev in range(1, slots + 1):
        start, stop = fenwick.bucket(end, lev)
        for s in range(start, stop):
            if A is None:
                w = np.ones(H) if g is None else np.exp(g[s + 1:end].sum(0))
                out[:, lev - 1] += w[:, None, None] * k[s][:, :, None] * v[s][:, None, :]
                continue
            moved = beta[s][:, None] * k[s]  # (H, Dk), moved to end - 1
            for u in range(s + 1, end):
                moved = np.einsum("hij,hj->hi", A[u], moved)
            out[:, lev - 1] += moved[:, :, None] * v[s][:, None, :]
    return out


def fuzz_op(data, gated):
    """One example of ``log_linear_attn`` (or, ``gated``, ``log_linear_gated_delta_rule``): packed
    sequences, states at drawn positions, grouped heads, and faults; outputs and final states
    against the definition."""
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    faults = draw_faults(data, GDN_OP_FAULTS if gated else OP_FAULTS)
    packed = data.draw(st.booleans(), label="packed") or bool({"cu start", "cu decreasing", "cu end", "cu float",
                                                               "cu batch"} & faults)
    with_state = data.draw(st.booleans(), label="state") or any(f.startswith("state") for f in faults)
    n = data.draw(st.integers(1, 3), label="sequences")
    lengths = [data.draw(st.integers(0 if packed else 1, 6)) for _ in range(n)]
    if not packed:
        lengths = [lengths[0]] * n
    starts = [data.draw(st.integers(0, 20)) if with_state else 0 for _ in range(n)]
    Hqk, grp, Dk, Dv = data.draw(st.integers(1, 2)), data.draw(st.integers(1, 2)), data.draw(st.integers(1, 3)), 2
    H = Hqk * grp
    has_g = data.draw(st.booleans(), label="decay")
    end = max(a + x for a, x in zip(starts, lengths))
    L = fenwick.num_levels(max(end, 1)) + data.draw(st.integers(0, 1))
    if "narrow scales" in faults:
        L = fenwick.num_levels(max(end, 2)) - 1
    backend = data.draw(st.sampled_from(["auto", "chunked", "fenwick", "dense"]), label="backend")
    if "backend without state" in faults:
        backend = "dense"
    final = data.draw(st.booleans(), label="final") or "backend without state" in faults
    scale = data.draw(st.sampled_from([math.nan, "1", True]) if "bad scale" in faults else
                      st.sampled_from([1.0, 0.5, None]), label="scale")
    # every sequence drawn from position 0; the call gets its part [a, a + length)
    full = []
    for a, x in zip(starts, lengths):
        e = a + x
        k = rng.standard_normal((e, Hqk, Dk))
        q = rng.standard_normal((e, Hqk, Dk))
        v = rng.standard_normal((e, H, Dv))
        g = -rng.uniform(0, 1, (e, H)) if has_g else None
        lam = rng.uniform(0.3, 1.5, (e, H, L))
        if e:
            lam = np.where(fenwick.read_levels(e, L)[:, None, :], lam, np.nan)
        beta = rng.uniform(0, 1, (e, H)) if gated else None
        full.append((q, unit_rows(k) if gated else k, v, g, lam, beta))
    parts = [[None if x is None else x[a:] for x in seq] for a, seq in zip(starts, full)]
    stack = (lambda xs: np.concatenate(xs)[None]) if packed else np.stack
    arrays = [None if parts[0][j] is None else torch.tensor(stack([p[j] for p in parts])) for j in range(6)]
    q, k, v, g, lam, beta = arrays
    S = max(1, max(starts).bit_length())
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lengths)])) if packed else None
    B = 1 if packed else n
    if "heads not dividing" in faults:
        q, k = (x[:, :, :1].repeat(1, 1, H + 1, 1) for x in (q, k))
    if "beta shape" in faults:
        beta = beta[..., :1] if H > 1 else beta.repeat(1, 1, 2)
    if cu is not None:
        if "cu start" in faults:
            cu = cu + 1
        if "cu decreasing" in faults and n > 1:
            c = cu.tolist()
            c[1], c[2] = c[2] + 1, c[1]
            cu = torch.tensor(c)
        if "cu end" in faults:
            cu[-1] += 1
        if "cu float" in faults:
            cu = cu.double()
        if "cu batch" in faults:
            q, k, v, g, lam, beta = (None if x is None else torch.cat([x, x]) for x in (q, k, v, g, lam, beta))
    state = None
    if with_state:
        states = np.stack([bucket_states(np.repeat(f[1], grp, 1), f[2], f[3], a, S, f[5])
                           for a, f in zip(starts, full)])
        N_, H_, Dk_ = n + ("state batch" in faults), H + ("state heads" in faults), Dk + ("state width" in faults)
        states = np.resize(states, (N_, H_, S, Dk_, Dv)) if (N_, H_, Dk_) != (n, H, Dk) else states
        dtype = torch.float32 if "state dtype" in faults else torch.float64
        device = "meta" if "state device" in faults else "cpu"
        state = hodlr.LogLinearState(torch.tensor(states, dtype=dtype, device=device),
                                     torch.tensor(starts[:N_] + [0] * (N_ - n), device=device), validate=False)
    try:
        if q.shape[2] == 0 or H % q.shape[2]:
            raise Invalid("heads")
        if cu is not None:
            if cu.dtype.is_floating_point or B * (1 + ("cu batch" in faults)) != 1:
                raise Invalid("cu_seqlens type / batch")
            c = cu.tolist()
            if c[0] != 0 or any(y < x for x, y in zip(c, c[1:])) or c[-1] != q.shape[1]:
                raise Invalid("cu_seqlens values")
        if scale is not None and not isinstance(scale, float) or (isinstance(scale, float) and math.isnan(scale)):
            raise Invalid("scale")
        if state is not None and (tuple(state.states.shape) != (n, H, S, Dk, Dv) or state.dtype != torch.float64
                                  or state.device.type != "cpu"):
            raise Invalid("state")
        if end and L < fenwick.num_levels(end):
            raise Invalid("narrow scales")
        if gated and tuple(beta.shape) != tuple(v.shape[:3]):
            raise Invalid("beta shape")
        if backend == "dense" and (with_state or final):
            raise Invalid("backend without state")
        verdict = None
    except Invalid as err:
        verdict = err
    options = dict(initial_state=state, output_final_state=final, cu_seqlens=cu, scale=scale, backend=backend)
    if gated:
        out = expect(lambda: hodlr.log_linear_gated_delta_rule(q, k, v, g, beta, lam, **options), verdict)
    else:
        out = expect(lambda: hodlr.log_linear_attn(q, k, v, g, lam, **options), verdict)
    if out is None:
        return
    o, last = out
    s = Dk ** -0.5 if scale is None else scale
    lo = 0
    for i, (a, x) in enumerate(zip(starts, lengths)):
        fq, fk, fv, fg, flam, fbeta = full[i]
        e = a + x
        got = o[0, lo:lo + x] if packed else o[i]
        lo += x
        if x:
            ops64 = [np.repeat(fq, grp, 1).transpose(1, 0, 2), np.repeat(fk, grp, 1).transpose(1, 0, 2),
                     fv.transpose(1, 0, 2)]
            lam_h, g_h = flam.transpose(1, 0, 2), None if fg is None else fg.T
            if gated:
                want = gdn_reference(lam_h, g_h, fbeta.T, *ops64, s)
            else:
                want = reference(lam_h, g_h, (H,), "attention", ops64, s)
            compare(got.transpose(0, 1), want[:, a:], "float64", "torch", "float64")
        if final:
            assert int(last.positions[i]) == e
            ref = bucket_states(np.repeat(fk, grp, 1), fv, fg, e, last.num_slots, fbeta)
            err = np.abs(last.states[i].numpy() - ref).max(initial=0.0)
            assert err <= 1e-10 * max(1.0, np.abs(ref).max(initial=0.0))


@examples
@given(st.data())
def test_fuzz_log_linear_attn(data):
    fuzz_op(data, gated=False)


@examples
@given(st.data())
def test_fuzz_log_linear_gated_delta_rule(data):
    fuzz_op(data, gated=True)
