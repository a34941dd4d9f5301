"""``@triton.jit`` helpers shared by the attention and matmul kernels."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def chunk_rows(B1, T, C: tl.constexpr, FULL_CHUNKS: tl.constexpr):
    """``(i, bh, b0, b1, t, tmask)`` of this program: chunk ``i`` (program axis 0), collapsed
    batch entry ``bh`` (axis 1) and its two batch indices ``b0 = bh // B1``, ``b1 = bh % B1``
    (see ``kernels._layout.collapse_batch``), the chunk's positions ``t`` and ``t < T``.

    With ``FULL_CHUNKS`` (the launcher's ``T % C == 0``) ``tmask`` is a constant ``True``, so that
    every mask built from it folds away at compile time."""
    i = tl.program_id(0)
    bh = tl.program_id(1)
    t = i * C + tl.arange(0, C)
    return i, bh.to(tl.int64), (bh // B1).to(tl.int64), (bh % B1).to(tl.int64), t, rows_inside(t, T, C, FULL_CHUNKS)


@triton.jit
def rows_inside(t, T, C: tl.constexpr, FULL_CHUNKS: tl.constexpr):
    """``t < T`` for the ``C`` rows ``t`` of a chunk (or of a program's chunks): a constant ``True``
    with ``FULL_CHUNKS`` (the launcher's guarantee that every such row lies inside ``T``)."""
    if FULL_CHUNKS:
        return tl.full((C,), 1, tl.int1)
    else:
        return t < T


@triton.jit
def level_size(h, n_chunks, span, VARLEN: tl.constexpr):
    """The entries of level ``h`` of a hierarchy: its ``n_chunks >> h`` blocks, or with ``VARLEN``
    its ``(span >> h) + 3`` slots in a sequence's region (:mod:`kernels._sequences`), as int32 (the
    table holds int64: a walk's offset from 0 must keep its loop-carried type)."""
    if VARLEN:
        return ((span >> h) + 3).to(tl.int32)
    else:
        return n_chunks >> h


@triton.jit
def level_start(n_chunks, h, span=0, VARLEN: tl.constexpr = False):
    """Where level ``h`` starts in a batch entry's hierarchy (``kernels._layout.level_offsets(n)[h]``
    on the host): the blocks of the levels below, ``n >> 0`` + ... + ``n >> (h - 1)``; with
    ``VARLEN`` in a sequence's region of chunk span ``span`` (:func:`level_size`)."""
    off = 0
    lv = 0
    while lv < h:
        off += level_size(lv, n_chunks, span, VARLEN)
        lv += 1
    return off


@triton.jit
def next_level(off, h, n_chunks, span, VARLEN: tl.constexpr):
    """Where level ``h + 1`` of a hierarchy starts, given where level ``h`` starts (``off``)."""
    return off + level_size(h, n_chunks, span, VARLEN)


@triton.jit
def block_entry(off, b, h, I0, VARLEN: tl.constexpr):
    """The hierarchy entry of block ``b`` of level ``h`` (which starts at entry ``off``); with
    ``VARLEN`` the level's slot ``0`` holds the block before the sequence's first chunk ``I0`` (the
    carried bucket), so block ``b`` is slot ``b + 1 - (I0 >> h)``."""
    if VARLEN:
        entry = off + b + 1 - (I0 >> h)
    else:
        entry = off + b
    return entry


@triton.jit
def read_entry(off, i, h, I0, VARLEN: tl.constexpr):
    """The hierarchy entry that chunk ``i`` reads at its set bit ``h``: block ``(i >> h) - 1`` of
    level ``h`` (:func:`block_entry`)."""
    return block_entry(off, (i >> h) - 1, h, I0, VARLEN)


@triton.jit
def next_decay(g_row, t, sgt, T, C: tl.constexpr, ACC: tl.constexpr, lo=None):
    """``g[t + 1]`` for the rows ``t`` of one or more whole chunks, 0 past each chunk's end or
    ``T``: the terms of the segment sums ``Σ_{k=s+1..e} g_k`` that the decays are made of.
    With ``lo`` (a sequence's first position, rows ``t`` absolute positions), also 0 where
    ``t + 1 < lo``: positions before the sequence have no decay in the call."""
    if lo is None:
        m = (t % C < C - 1) & (t + 1 < T)
    else:
        m = (t % C < C - 1) & (t + 1 < T) & (t + 1 >= lo)
    return tl.load(g_row + (t + 1) * sgt, mask=m, other=0.0).to(ACC)


@triton.jit
def chunk_decays(g_row, t, tmask, sgt, T, C: tl.constexpr, HAS_G: tl.constexpr, ACC: tl.constexpr, lo=None):
    """``(G, g_next)`` of one chunk: the chunk-local inclusive cumulative log-decay and the
    terms ``g[t + 1]`` of :func:`next_decay` (both zero without decay, ``HAS_G`` false).  Rows
    outside ``tmask`` (and, with ``lo``, before ``lo``) add nothing: a sequence that starts
    inside the chunk accumulates from its first position."""
    if HAS_G:
        G = tl.cumsum(tl.load(g_row + t * sgt, mask=tmask, other=0.0).to(ACC), 0)
        g_next = next_decay(g_row, t, sgt, T, C, ACC, lo)
    else:
        G = tl.zeros((C,), dtype=ACC)
        g_next = G
    return G, g_next


@triton.jit
def bit_length(x):
    """``x.bit_length()`` of non-negative integers below ``2**24`` (int32), read off the float32
    exponent: ``hodlr.fenwick.index.level`` of two positions of one chunk is that of their XOR."""
    return tl.where(x == 0, 0, (x.to(tl.float32).to(tl.int32, bitcast=True) >> 23) - 126)


@triton.jit
def reads_level(t, lev):
    """Whether row ``t`` reads level ``lev``: level 0, or bit ``lev - 1`` of ``t`` set
    (``hodlr.fenwick.read_levels`` on the host); for ``lev >= 1`` also whether a state at position
    ``t`` holds a bucket of level ``lev``.  Broadcasts."""
    return (lev == 0) | (((t >> tl.maximum(lev - 1, 0)) & 1) == 1)


@triton.jit
def nonfinite(x):
    """1 (int32) where ``x`` is NaN or infinite, else 0."""
    return tl.where(tl.abs(x) < float("inf"), 0, 1)


@triton.jit
def rows_nonfinite(l_base, slt, sll, L, g_base, sgt, t, tmask, BL: tl.constexpr, HAS_G: tl.constexpr):
    """Per row ``t`` (where ``tmask``), int32: 1 if a level scale the row reads (:func:`reads_level`,
    columns ``< min(L, BL)``) or its log-decay is NaN or infinite.  ``l_base`` and ``g_base`` point
    at position 0 of one batch entry; ``BL`` covers ``num_levels(T)``.  The validation of a mask:
    the check kernel of ``kernels.checks`` and the output kernels that validate as they run."""
    LS: tl.constexpr = 16 if BL > 16 else BL  # columns a slice: a (rows, 32) tile costs registers
    bad = tl.zeros_like(t)
    t64 = t.to(tl.int64)  # (T - 1) * slt may pass 2**31 (scales sliced out of a wide projection)
    for l0 in tl.static_range(0, BL, LS):
        lev = l0 + tl.arange(0, LS)
        read = tmask[:, None] & (lev[None, :] < L) & reads_level(t[:, None], lev[None, :])
        lam = tl.load(l_base + t64[:, None] * slt + lev[None, :] * sll, mask=read, other=0.0)
        bad = tl.maximum(bad, tl.max(nonfinite(lam), 1))
    if HAS_G:
        bad = tl.maximum(bad, nonfinite(tl.load(g_base + t64 * sgt, mask=tmask, other=0.0)))
    return bad


@triton.jit
def validate_rows(flag_ptr, l_base, slt, sll, L, g_base, sgt, t, tmask, BL: tl.constexpr, HAS_G: tl.constexpr):
    """The validation of a mask inside a kernel: sets ``flag_ptr[0]`` (0 beforehand) to 1 if
    :func:`rows_nonfinite` finds a row whose read level scales or log-decay are NaN or infinite.
    Nothing without a flag (``None``); of the programs along grid axis 2 (value or column tiles of
    the same rows) only the first checks.  Used by the check kernel of ``kernels.checks`` and by
    the forward output kernels."""
    if flag_ptr is not None:
        if tl.program_id(2) == 0:
            if tl.max(rows_nonfinite(l_base, slt, sll, L, g_base, sgt, t, tmask, BL, HAS_G), 0) > 0:
                tl.atomic_max(flag_ptr, 1)


@triton.jit
def intra_scales(l_chunk, slt, sll, L, tmask, C: tl.constexpr):
    """``Λ`` of one chunk: ``Λ[t, s] = λ[t, level(t, s)]`` for ``s <= t`` (0 above the diagonal
    and on rows past ``T``).

    ``l_chunk`` points at ``level_scales[t0, 0]`` of the chunk's first row, ``slt`` / ``sll``
    are the row and level strides.  For ``s <= t`` in one aligned chunk the level is the bit
    length of ``t ^ s`` (``hodlr.fenwick.index.level``), read here off the float32 exponent of
    ``t ^ s``; the scale is gathered in registers (``tl.gather``) from one ``(C, 8)`` tile of the
    chunk's rows, levels ``0..7`` (16 columns for ``C = 256``; columns ``>= L`` not loaded): an
    entry that is not read by definition may be loaded, but is never selected."""
    r = tl.arange(0, C)
    causal = (r[:, None] >= r[None, :]) & tmask[:, None]
    lvl = bit_length(r[:, None] ^ r[None, :])
    LV: tl.constexpr = 8 if C <= 128 else 16
    col = tl.arange(0, LV)
    rows = tl.load(l_chunk + (r[:, None] * slt + col[None, :] * sll), mask=tmask[:, None] & (col[None, :] < L))
    return tl.where(causal, tl.gather(rows, lvl, 1), 0.0)


@triton.jit
def level_sums(W, C: tl.constexpr, LOG_C: tl.constexpr, BL: tl.constexpr):
    """``(C, BL)`` in-chunk level sums of a ``(C, C)`` tile ``W`` that is zero above the diagonal:
    ``[t, l] = Σ_{s: level(t, s) = l} W[t, s]`` for ``l <= c = log2 C`` (0 in the other columns
    and where row ``t`` does not read level ``l``).

    A tree of block sums instead of one masked row sum a level: the keys of level ``l >= 1`` of
    row ``t`` are the aligned block of ``2^(l-1)`` keys just before ``t``'s own (when bit ``l - 1``
    of ``t`` is set), so the tile's columns are summed in aligned pairs, pairs of pairs, ..., and
    each row picks one entry from each tile of block sums, every tile half the size of the one
    before: fewer than ``2 C²`` compares and selects and ``3 C²`` additions for all levels,
    against ``(c + 1) C²`` of each."""
    r = tl.arange(0, C)
    lev = tl.arange(0, BL)
    E, O = tl.split(tl.reshape(W, (C, C // 2, 2)))  # the even and the odd key of each aligned pair
    own = tl.arange(0, C // 2)[None, :] == (r >> 1)[:, None]  # the pair that holds the diagonal
    even = tl.sum(tl.where(own, E, 0.0), 1)
    odd = tl.sum(tl.where(own, O, 0.0), 1)
    t_odd = (r & 1) == 1
    out = tl.where(lev[None, :] == 0, tl.where(t_odd, odd, even)[:, None], 0.0)  # level 0: the diagonal
    out = tl.where(lev[None, :] == 1, tl.where(t_odd, even, 0.0)[:, None], out)
    P = E + O  # the sums of the aligned blocks of 2 keys
    for k in tl.static_range(1, LOG_C):  # level k + 1: the block of 2^k keys before row t's
        before = tl.sum(tl.where(tl.arange(0, C >> k)[None, :] == ((r >> k) - 1)[:, None], P, 0.0), 1)
        out = tl.where(lev[None, :] == k + 1, tl.where(((r >> k) & 1) == 1, before, 0.0)[:, None], out)
        if k + 1 < LOG_C:
            P = tl.sum(tl.reshape(P, (C, C >> (k + 1), 2)), 2)
    return out


@triton.jit
def intra_decay(G, g_next, tmask, C: tl.constexpr, EXACT: tl.constexpr):
    """``(C, C)`` in-chunk decays ``exp(Σ_{k=s+1..t} g_k)`` for ``s <= t`` (0 above the
    diagonal and on rows past ``T``).

    ``G`` is the chunk-local inclusive cumulative log-decay and ``g_next`` its terms shifted by
    one (``g[t + 1]``).  With ``EXACT`` each exponent is summed from its own terms (a masked
    reverse cumulative sum, accurate to rounding even when ``G`` has grown large inside the
    chunk: float32 / float64 inputs); otherwise from ``G_t - G_s`` (its absolute error
    ``~|G| eps`` is far below the bfloat16 / float16 tolerance), as the product
    ``exp(G_t) exp(-G_s)`` -- one exponential per row instead of one per element -- while
    ``|G| < 40`` over the chunk (no product of the two factors can overflow or underflow),
    element by element while ``G`` is finite, and from the terms again in a chunk where it is not
    (a log-decay of ``-inf``, a zero transition, makes ``G_t - G_s`` NaN past it)."""
    r = tl.arange(0, C)
    causal = (r[:, None] >= r[None, :]) & tmask[:, None]
    if EXACT:
        D = tl.exp(tl.cumsum(tl.where(r[None, :] < r[:, None], g_next[None, :], 0.0), 1, reverse=True))
    else:
        G_max = tl.max(tl.abs(G), 0)
        if G_max < 40.0:
            D = tl.exp(G)[:, None] * tl.exp(-G)[None, :]
        elif G_max < 1.0e38:
            D = tl.exp(tl.where(causal, G[:, None] - G[None, :], 0.0))
        else:
            D = tl.exp(tl.cumsum(tl.where(r[None, :] < r[:, None], g_next[None, :], 0.0), 1, reverse=True))
    return tl.where(causal, D, 0.0)


@triton.jit
def causal_decay(G, g_next, tmask, C: tl.constexpr, HAS_G: tl.constexpr, EXACT: tl.constexpr):
    """The in-chunk decays of :func:`intra_decay` with a decay (``HAS_G``), else the causal
    ones-mask (0 above the diagonal and on rows past ``T``), in ``G``'s dtype."""
    if HAS_G:
        D = intra_decay(G, g_next, tmask, C, EXACT)
    else:
        r = tl.arange(0, C)
        D = tl.where((r[:, None] >= r[None, :]) & tmask[:, None], 1.0, 0.0).to(G.dtype)
    return D


@triton.jit
def intra_mask(l_chunk, slt, sll, L, G, g_next, tmask, C: tl.constexpr, HAS_G: tl.constexpr, EXACT: tl.constexpr):
    """The ``(C, C)`` block of the mask inside one chunk (levels ``0..c``): the scales of
    :func:`intra_scales` times the decays of :func:`intra_decay` (``G``'s dtype)."""
    M = intra_scales(l_chunk, slt, sll, L, tmask, C).to(G.dtype)
    if HAS_G:
        M = M * intra_decay(G, g_next, tmask, C, EXACT)
    return M


@triton.jit
def round_tf32(x):
    """float32 ``x`` rounded to the nearest tf32 (10 explicit mantissa bits, ties away from zero).

    The tensor cores read a float32 operand of a tf32 dot by dropping its 13 low mantissa bits,
    a rounding toward zero: its error has a sign, and sums of products of such operands (the
    transitions of a long sequence multiplied together) drift.  Rounded to the nearest first,
    each operand's error is at most half a tf32 unit, of either sign (ties, away from zero, are
    rare)."""
    bits = x.to(tl.uint32, bitcast=True)
    special = (bits & 0x7F800000) == 0x7F800000  # inf and NaN (any payload) pass unchanged
    return tl.where(special, bits, (bits + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)


@triton.jit
def dot(a, b, ACC: tl.constexpr, PREC: tl.constexpr, NATIVE: tl.constexpr, acc=None):
    """``a @ b (+ acc)`` accumulated in ``ACC``.  Two operands of one 16-bit dtype go to the tensor
    cores as they are when ``NATIVE`` (the interpreter's 16-bit dot is wrong: there, and for
    any other pair, both are cast to ``ACC`` and multiplied with ``input_precision=PREC``,
    float32 operands of a tf32 dot rounded to the nearest by :func:`round_tf32`)."""
    if NATIVE and a.dtype == b.dtype and (a.dtype == tl.bfloat16 or a.dtype == tl.float16):
        return tl.dot(a, b, acc=acc, out_dtype=ACC)
    elif PREC == "tf32":
        return tl.dot(_tf32_operand(a, ACC), _tf32_operand(b, ACC), acc=acc, input_precision=PREC, out_dtype=ACC)
    else:
        return tl.dot(a.to(ACC), b.to(ACC), acc=acc, input_precision=PREC, out_dtype=ACC)


@triton.jit
def split_dot(a, b, ACC: tl.constexpr, PREC: tl.constexpr, NATIVE: tl.constexpr, acc=None):
    """``a @ b (+ acc)`` for one float32 and one bfloat16 operand: the float32 operand ``x`` enters as its
    bfloat16 part ``hi`` and its bfloat16 rest ``lo = x - hi``, each multiplied by the other
    operand as it is (exact products, float32 sums), so ``x`` keeps 16 significant bits (a tf32
    operand keeps 11) and the bfloat16 operand takes half the registers and shared memory of a
    float32 one: two bfloat16 dots on the tensor cores when ``NATIVE``, float32 dots of the same
    bfloat16 values under the interpreter.  Other dtypes: :func:`dot`."""
    if a.dtype == tl.float32 and b.dtype == tl.bfloat16:
        hi = a.to(tl.bfloat16)
        return _bf16_dot(_lo_part(a, hi), b, _bf16_dot(hi, b, acc, ACC, NATIVE), ACC, NATIVE)
    elif a.dtype == tl.bfloat16 and b.dtype == tl.float32:
        hi = b.to(tl.bfloat16)
        return _bf16_dot(a, _lo_part(b, hi), _bf16_dot(a, hi, acc, ACC, NATIVE), ACC, NATIVE)
    else:
        return dot(a, b, ACC, PREC, NATIVE, acc)


@triton.jit
def _lo_part(x, hi):
    """The bfloat16 rest ``x - hi`` of a float32 ``x`` past its bfloat16 part ``hi``."""
    return (x - hi.to(tl.float32)).to(tl.bfloat16)


@triton.jit
def _bf16_dot(a, b, acc, ACC: tl.constexpr, NATIVE: tl.constexpr):
    """``a @ b (+ acc)`` of two bfloat16 tiles: on the tensor cores when ``NATIVE``, else as
    float32 dots of the same values (the interpreter's 16-bit dot is wrong)."""
    if NATIVE:
        return tl.dot(a, b, acc=acc, out_dtype=ACC)
    else:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc=acc, input_precision="ieee", out_dtype=ACC)


@triton.jit
def _tf32_operand(x, ACC: tl.constexpr):
    """``x`` in ``ACC``, rounded by :func:`round_tf32` when it is a float32 operand (16-bit values
    are tf32 values already)."""
    if x.dtype == tl.float32:
        return round_tf32(x)
    else:
        return x.to(ACC)


@triton.jit
def _tile_pointers(x, b0, b1, row0, col0, sb0, sb1, st, sd, T, D, R: tl.constexpr, BD: tl.constexpr):
    """Pointers and in-bounds mask of the ``(R, BD)`` tile of :func:`load_tile` (the tile's
    first row in int64, offsets inside it in int32)."""
    r = tl.arange(0, R)
    d = col0 + tl.arange(0, BD)
    base = x + b0 * sb0 + b1 * sb1 + row0.to(tl.int64) * st
    return base + (r[:, None] * st + d[None, :] * sd), ((row0 + r) < T)[:, None] & (d < D)[None, :]


@triton.jit
def load_tile(x, b0, b1, row0, col0, sb0, sb1, st, sd, T, D, R: tl.constexpr, BD: tl.constexpr, TMA: tl.constexpr):
    """The ``(R, BD)`` tile of rows ``row0 ..`` and columns ``col0 ..`` of batch entry
    ``(b0, b1)``, zero past ``T`` and ``D``.  With ``TMA``, ``x`` is a tensor descriptor of
    the ``(B0, B1, T, D)`` view (:func:`kernels._layout.tma_descriptor`: one bulk copy into
    shared memory, bounds applied by the copy engine); otherwise a pointer with strides
    ``sb0, sb1, st, sd``."""
    if TMA:
        return tl.reshape(x.load([b0.to(tl.int32), b1.to(tl.int32), row0, col0]), (R, BD))
    else:
        ptrs, mask = _tile_pointers(x, b0, b1, row0, col0, sb0, sb1, st, sd, T, D, R, BD)
        return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def store_tile(y, value, b0, b1, row0, col0, sb0, sb1, st, sd, T, D, R: tl.constexpr, BD: tl.constexpr,
               TMA: tl.constexpr):
    """Store the ``(R, BD)`` tile ``value`` (in ``y``'s dtype) where :func:`load_tile` reads
    it; nothing past ``T`` or ``D`` is written."""
    if TMA:
        y.store([b0.to(tl.int32), b1.to(tl.int32), row0, col0], tl.reshape(value.to(y.dtype), (1, 1, R, BD)))
    else:
        ptrs, mask = _tile_pointers(y, b0, b1, row0, col0, sb0, sb1, st, sd, T, D, R, BD)
        tl.store(ptrs, value, mask=mask)


# -- sequences: the state-aware kernels (``kernels._sequences``) ------------------------------
@triton.jit
def _table_row(tab_ptr, n):
    """Where sequence ``n``'s row of the sequence table of :mod:`kernels._sequences` starts (eight
    int64 columns a sequence)."""
    return tab_ptr + n.to(tl.int64) * 8


@triton.jit
def sequence_row(tab_ptr, n):
    """``(b0, row0, length, a, hbase, span)`` of sequence ``n`` in the sequence table of
    :mod:`kernels._sequences`: its batch row, the row of its first token, its length, the
    absolute position of its first token, its first hierarchy entry and its chunk span."""
    row = _table_row(tab_ptr, n)
    return tl.load(row), tl.load(row + 1), tl.load(row + 2), tl.load(row + 3), tl.load(row + 4), tl.load(row + 5)


@triton.jit
def sequence_slots(tab_ptr, n):
    """``(slot_base, group_base)`` of sequence ``n`` in the sequence table: its first chunk slot
    and its first group slot (the last two columns; a kernel that reads one of them loads only
    that one)."""
    row = _table_row(tab_ptr, n)
    return tl.load(row + 6), tl.load(row + 7)


@triton.jit
def sequence_chunks(a, length, LOG_C: tl.constexpr):
    """``(e, I0, I1)`` of a sequence of ``length`` tokens from absolute position ``a``: its end and
    its first and last absolute chunks."""
    e = a + length
    return e, a >> LOG_C, (e - 1) >> LOG_C


@triton.jit
def sequence_chunk(tab_ptr, chunk_seq_ptr, C: tl.constexpr, LOG_C: tl.constexpr):
    """The chunk of this program (axis 0: the global chunk slot) in a call over sequences:
    ``(dead, n, b0, shift, a, e, I, I0, I1, hbase, span, t, tmask)``.

    Sequence ``n`` covers positions ``[a, e)``, absolute chunks ``I0 .. I1``; the slot is its
    chunk ``I`` (``dead`` when the sequence has fewer chunks than slots).  ``t`` are the absolute
    positions of the aligned chunk (so in-chunk levels are those of absolute positions), ``tmask``
    those of the sequence, and row ``t + shift`` along ``T`` holds position ``t``."""
    slot = tl.program_id(0)
    n = tl.load(chunk_seq_ptr + slot).to(tl.int64)
    b0, row0, length, a, hbase, span = sequence_row(tab_ptr, n)
    first, _ = sequence_slots(tab_ptr, n)
    e, I0, I1 = sequence_chunks(a, length, LOG_C)
    I = I0 + (slot - first)
    t = I * C + tl.arange(0, C)
    return (length == 0) | (I > I1), n, b0, row0 - a, a, e, I, I0, I1, hbase, span, t, (t >= a) & (t < e)


@triton.jit
def matrix_tile(ptr, index, rows, cols, R, S, ACC: tl.constexpr):
    """The ``(rows, cols)`` tile of the ``R x S`` row-major matrix ``index`` of a stack, in ``ACC``."""
    return tl.load(ptr + index * (R * S) + rows[:, None] * S + cols[None, :],
                   mask=(rows[:, None] < R) & (cols[None, :] < S), other=0.0).to(ACC)


@triton.jit
def store_matrix_tile(ptr, index, value, rows, cols, R, S):
    """Store ``value`` where :func:`matrix_tile` reads it."""
    tl.store(ptr + index * (R * S) + rows[:, None] * S + cols[None, :], value,
             mask=(rows[:, None] < R) & (cols[None, :] < S))


@triton.jit
def token_tile(ptr, b, t, tmask, hd, cols, D, sb, st, sh, sd):
    """The ``(R, BD)`` tile ``x[b, t, hd, cols]`` of a token-major ``(B, T, heads, D)`` tensor with
    strides ``sb, st, sh, sd`` (zero outside ``tmask`` and ``D``)."""
    return tl.load(ptr + b * sb + t[:, None] * st + hd * sh + cols[None, :] * sd,
                   mask=tmask[:, None] & (cols[None, :] < D), other=0.0)
