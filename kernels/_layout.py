"""Host-side helpers shared by the launchers: batch collapsing, block sizes, dtypes.

The kernels index every tensor through two batch indices ``(b0, b1)`` with per-tensor
strides, so broadcast views (stride 0, e.g. grouped-head ``q: (B, 1, T, Dk)`` expanded
against ``v: (B, H, T, Dv)``) are read in place, never materialised.
"""

from __future__ import annotations

import functools
import itertools
import math

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction
from triton.tools.tensor_descriptor import TensorDescriptor

from hodlr import fenwick
from hodlr.fenwick.arrays import check_int

DEFAULT_CHUNK = {"attention": 64, "matmul": 16, "gated_delta": 32}
"""Chunk size ``C`` per operation when the caller passes ``chunk=None`` (H200-tuned: ``docs/kernels.md`` §3);
``"attention"``: its forward and backward (states the forward keeps fit the backward's chunk).
``"gated_delta"``: the Gated DeltaNet forward and the backward's recomputation."""

NUM_WARPS = {"attention_state": 4, "attention_output": 4, "attention_backward": 4,
             "attention_span": 8, "matmul_state": 4,
             "matmul_output": 1, "hierarchy": 4, "gated_delta": 4, "gated_delta_hierarchy": 8,
             "gated_delta_output": 2, "gated_delta_output_wide": 4,
             "gated_delta_reader": 4, "gated_delta_reader_wide": 8, "gated_delta_reverse_hierarchy": 4,
             "gated_delta_backward": 4, "gated_delta_backward_wide": 8}
"""Warps per program of each kernel (H200-tuned: ``docs/kernels.md`` §3)."""

MAX_REGISTERS = {"matmul_output": 64, "gated_delta": 96, "gated_delta_reader": 168}
"""Register caps (``maxnreg``), applied to 16-bit tiles of at most 64 columns only (the matmul output
kernel: bfloat16; the Gated DeltaNet reader: bfloat16 and float16; the Gated DeltaNet chunk kernel,
forward: bfloat16 and float16 with 64-wide key tiles; H200-tuned: ``docs/kernels.md`` §3)."""

USE_TMA = True
"""Matmul ``x`` / ``y`` tiles through TMA where :func:`tma_descriptor` allows; False: pointers (docs/kernels.md §3)."""

MIN_BLOCK = 16
"""Smallest tile side ``tl.dot`` accepts; narrower heads are zero-padded in registers."""


@functools.lru_cache(maxsize=None)
def _compute_capability(index):
    return torch.cuda.get_device_capability(index)


def tma_descriptor(tensor: torch.Tensor, B0: int, B1: int, batch_strides, block_rows: int, block_cols: int):
    """A ``TensorDescriptor`` of the ``(B0, B1, T, D)`` view of ``tensor`` (batch strides
    from :func:`collapse_batch`) with ``(1, 1, block_rows, block_cols)`` tiles, for
    :func:`kernels._device.load_tile` / ``store_tile``; None where the copy engine cannot
    serve it (then the kernels use pointers): :data:`USE_TMA` off, a GPU before Hopper
    (sm_90), a last stride other than 1, another stride or the base address not a multiple
    of 16 bytes, or a broadcast (stride-0) batch dim of size > 1.  The interpreter takes
    descriptors too, so the CPU tests run this path."""
    if not USE_TMA or (not interpreting() and _compute_capability(tensor.device.index)[0] < 9):
        return None
    T, D = tensor.shape[-2:]
    size = tensor.element_size()
    s0, s1 = batch_strides
    s0 = s0 if B0 > 1 else s1 * B1 or T * tensor.stride(-2)  # a size-1 dim: any aligned stride
    s1 = s1 if B1 > 1 else T * tensor.stride(-2)
    strides = (s0, s1, tensor.stride(-2))
    if tensor.stride(-1) != 1 or tensor.data_ptr() % 16 or any(s <= 0 or s * size % 16 for s in strides):
        return None
    return TensorDescriptor(tensor, [B0, B1, T, D], [*strides, 1], [1, 1, block_rows, block_cols])


@triton.jit
def _probe():
    pass


_INTERPRETED = isinstance(_probe, InterpretedFunction)


def interpreting() -> bool:
    """True when this package's kernels are Triton interpreter functions (they run on the
    CPU), False when they are compiled for the GPU.

    ``@triton.jit`` reads ``TRITON_INTERPRET`` when a kernel is defined, that is when
    ``hodlr.kernels`` is imported, so the answer is fixed then: setting or clearing the
    variable afterwards changes nothing.
    """
    return _INTERPRETED


def check_chunk(chunk, op: str) -> int:
    """Validate the chunk size: a power of two in ``[16, 256]`` (``None``: the default of ``op``)."""
    if chunk is None:
        return DEFAULT_CHUNK[op]
    chunk = check_int("chunk", chunk)
    if chunk < MIN_BLOCK or chunk > 256 or chunk & (chunk - 1):
        raise ValueError(f"chunk must be a power of two in [16, 256], got {chunk}")
    return chunk


def check_flag(flag, device) -> None:
    """Refuse a validation flag (the ``check`` argument of the output launchers) that is not None
    or a one-element int32 tensor on ``device``."""
    if flag is None:
        return
    if not isinstance(flag, torch.Tensor) or flag.dtype != torch.int32 or flag.numel() != 1 \
            or flag.device != device:
        what = (f"a {type(flag).__name__}" if not isinstance(flag, torch.Tensor)
                else f"a {flag.dtype} tensor of shape {tuple(flag.shape)} on {flag.device}")
        raise TypeError(f"check must be None or a one-element torch.int32 tensor on {device}, got {what}")


def check_tensor(name: str, x, dims: str, *, optional: bool = False):
    """``x`` checked to be a floating torch tensor with at least the trailing dims ``dims`` names
    (e.g. ``"T, D"``); None passes where ``optional``.  ``TypeError`` / ``ValueError`` naming
    ``name``."""
    if x is None and optional:
        return None
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (*batch, {dims}), got {type(x).__name__}")
    if x.dim() < dims.count(",") + 1:
        raise ValueError(f"{name} must have shape (*batch, {dims}), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {x.dtype}")
    return x


def check_same_dtype(**named) -> None:
    """Refuse operands (``{name: tensor}``) of different dtypes, naming the first that differs."""
    (first, x), *rest = named.items()
    for name, y in rest:
        if y.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {y.dtype} but {first} has {x.dtype}; they must match")


def integer_tensor(x) -> bool:
    """Whether ``x`` is a torch tensor of an integer dtype (not bool, floating or complex)."""
    return isinstance(x, torch.Tensor) and not (x.is_floating_point() or x.is_complex() or x.dtype == torch.bool)


def memory_span(x: torch.Tensor) -> tuple:
    """``(device, first byte, one past the last byte)`` of the memory ``x``'s elements occupy."""
    lo = hi = x.data_ptr()
    for size, stride in zip(x.shape, x.stride()):
        reach = (size - 1) * stride * x.element_size()
        lo, hi = (lo + reach, hi) if reach < 0 else (lo, hi + reach)
    return x.device, lo, hi + x.element_size()


def check_disjoint(buffers: dict, reads: dict) -> None:
    """Refuse output buffers (``{name: tensor}``) whose memory meets that of an input of ``reads``
    (``{name: tensor or None}``: it would be overwritten while it is read) or of another buffer.
    Tensors of different storages never meet, so spans are compared only within a storage (inputs
    may share one with each other: a fused ``qkv`` read as three views)."""
    storages = {}
    for name, x in {**reads, **buffers}.items():
        if x is not None and x.numel():
            storages.setdefault((x.device, x.untyped_storage().data_ptr()), []).append((name, x))
    for group in storages.values():
        spans = [(name, memory_span(x)[1:]) for name, x in group] if len(group) > 1 else ()
        for i, (a, (lo, hi)) in enumerate(spans):
            for b, (other_lo, other_hi) in spans[i + 1:]:
                if (a in buffers or b in buffers) and lo < other_hi and other_lo < hi:
                    first, second = (a, b) if a in buffers else (b, a)
                    raise ValueError(f"{first} overlaps {second} in memory: an output buffer must not share memory "
                                     f"with an input or another output")


def check_block(T: int, flag) -> int:
    """The ``BL`` of an output kernel that validates the mask (``flag`` not None): a power of two
    covering ``fenwick.num_levels(T)``, the columns any row reads; 1 when it does not validate."""
    return 1 if flag is None else next_power_of_2(fenwick.num_levels(T))


def compute_types(dtype: torch.dtype):
    """``(accumulator dtype, input_precision for fp32 dots, exact intra decays)`` for inputs
    of ``dtype``.

    float64 (interpreter only) accumulates in float64; float32 uses IEEE dots (no tf32);
    float16 / bfloat16 accumulate in float32, and the dots whose operands are float32
    intermediates (decayed keys, masked scores, chunk states) use tf32, 10 mantissa bits,
    more than the inputs carry.  Exact intra-chunk decays (segment sums from their own terms,
    see :func:`kernels._device.intra_mask`) for float32 / float64.
    """
    if dtype == torch.float64:
        if not interpreting():
            raise TypeError("float64 inputs run only under TRITON_INTERPRET=1; on the GPU use float32 "
                            "(IEEE dots), bfloat16 or float16, or the 'chunked' backend for float64")
        return tl.float64, "ieee", True
    if dtype == torch.float32:
        return tl.float32, "ieee", True
    if dtype in (torch.float16, torch.bfloat16):
        return tl.float32, "tf32", False
    raise TypeError(f"inputs must be float16, bfloat16, float32 or float64, got {dtype}")


def state_dtypes(dtype: torch.dtype, compact: bool = False):
    """``(states, logdec)`` dtypes of the chunk-state hierarchy for inputs of ``dtype``.

    float64 inputs: both float64.  Otherwise ``logdec`` is float32 and so are the states, except
    that with ``compact`` bfloat16 inputs keep bfloat16 states (half the state traffic; the
    matmul's forward).  The attention keeps float32 states and rounds each once when it reads it,
    so their error does not grow with the levels they were summed through (``docs/kernels.md`` §2).
    float16 inputs always keep float32 states: an undecayed sum over ``T / 2`` positions can pass
    float16's largest value, 65504.
    """
    if dtype == torch.float64:
        return torch.float64, torch.float64
    if compact and dtype == torch.bfloat16:
        return torch.bfloat16, torch.float32
    return torch.float32, torch.float32


def scratch(shape, dtype, device) -> torch.Tensor:
    """An uninitialised buffer that the kernels fill (the tests fill these with NaN, so a read of
    anything not written first shows)."""
    return torch.empty(shape, dtype=dtype, device=device)


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for positive ints (host side; ``triton.cdiv`` costs microseconds a call)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two ``>= n`` (1 for ``n <= 1``); host side, like :func:`cdiv`."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def broadcast_shape(*shapes) -> torch.Size:
    """The broadcast of several shapes (``torch.broadcast_shapes``, whose symbolic-shape checks
    cost about 30 µs a call on the host).

    Raises
    ------
    ValueError
        Naming the shapes, when a dim is neither 1 nor the others' size.
    """
    ndim = max((len(shape) for shape in shapes), default=0)
    out = [1] * ndim
    for shape in shapes:
        for axis, size in enumerate(shape, ndim - len(shape)):
            if size != 1:
                if out[axis] not in (1, size):
                    raise ValueError(f"batch shapes {[tuple(s) for s in shapes]} do not broadcast: "
                                     f"dim {axis - ndim} is {out[axis]} in one and {size} in another")
                out[axis] = size
    return torch.Size(out)


def output_buffer(out, shape: torch.Size, like: torch.Tensor, inputs: dict = None) -> torch.Tensor:
    """``out`` checked to be a contiguous tensor of ``shape`` with ``like``'s dtype on its device,
    sharing no memory with ``inputs`` (``{name: tensor}``), or a new one when ``out`` is None."""
    if out is None:
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor or None, got {type(out).__name__}")
    if out.shape != shape or out.dtype != like.dtype or not out.is_contiguous() or out.device != like.device:
        raise ValueError(f"out must be a contiguous {like.dtype} tensor of shape {tuple(shape)} on {like.device}, "
                         f"got {out.dtype} {tuple(out.shape)} on {out.device}"
                         + ("" if out.is_contiguous() else " (not contiguous)"))
    check_disjoint({"out": out}, inputs or {})
    return out


def block(width: int, cap: int) -> int:
    """Tile side for a head of ``width``: the next power of two, at least 16, at most ``cap``."""
    return max(MIN_BLOCK, min(cap, next_power_of_2(int(width))))


def collapse_batch(batch: tuple, tensors: list):
    """Fold the batch dims of several equally-batched tensors into at most two.

    Parameters
    ----------
    batch : tuple of int
        The common batch shape (every tensor has ``tensor.shape[:len(batch)] == batch``).
    tensors : list of torch.Tensor or None

    Returns
    -------
    (B0, B1, strides, tensors)
        ``strides[i] = (s0, s1)`` for tensor ``i`` (``(0, 0)`` for ``None``); batch index
        ``b`` in ``0 .. B0*B1-1`` maps to ``b0 = b // B1``, ``b1 = b % B1``.  Adjacent dims
        merge when every tensor's strides allow it; size-1 dims vanish.  If more than two
        runs of dims remain, they are split into two where the tensors that cannot be viewed
        so hold the fewest elements, and those alone are copied, in the memory order of the
        largest tensor that folds -- the only case that materialises anything
        (:func:`collapse_grouped` reads grouped heads without that copy).
    """
    strides = _stride_tuples(tensors)
    runs = _runs(batch, strides)
    if len(runs) > 2:
        return _fold_in_two(batch, runs, tensors, strides)
    return _fold(batch, runs, tensors, strides)


def collapse_grouped(batch: tuple, tensors: list, grouped):
    """:func:`collapse_batch` where the tensors at the indices ``grouped`` may read the inner index
    divided by a common ``group``: ``b1 // group`` (the kernels' ``GRP``).

    Grouped heads in fla's ``(N, T, H, D)`` layout, read as ``(N, Hqk, G, T, D)`` views with the
    keys broadcast over ``G``, leave three runs of batch dims, ``(N)``, ``(Hqk)``, ``(G)``: the
    values fold as ``(N, Hqk·G)`` and the keys as ``(N, Hqk)`` with ``group = G``, nothing copied.

    Returns
    -------
    (B0, B1, strides, tensors, group)
        As :func:`collapse_batch`; ``group`` is 1 where the tensors fold without it (then it is
        exactly :func:`collapse_batch`'s answer).  A grouped tensor's ``s1`` is its stride per
        ``group`` inner entries.  Used only where the common fold would copy: when the other
        tensors fold into two runs and every grouped tensor is broadcast over the same trailing
        dims of the inner run (and folds over the rest of it), else :func:`collapse_batch`.
    """
    given = _stride_tuples(tensors)
    runs = _runs(batch, given)
    if len(runs) <= 2:
        return (*_fold(batch, runs, tensors, given), 1)
    others = [None if i in grouped else x for i, x in enumerate(tensors)]
    other_strides = [None if i in grouped else st for i, st in enumerate(given)]
    other_runs = _runs(batch, other_strides)
    if len(other_runs) == 2:
        outer, inner = other_runs
        strides, groups = list(_fold(batch, other_runs, others, other_strides)[2]), set()
        for i in grouped:
            st = given[i]
            if st is None:
                continue
            tail = len(inner)
            while tail and st[inner[tail - 1]] == 0:
                tail -= 1
            s0, s1 = _run_stride(st, batch, outer), _run_stride(st, batch, inner[:tail])
            if s0 is None or s1 is None:
                break
            strides[i] = (s0, s1)
            groups.add(math.prod(batch[d] for d in inner[tail:]))
        else:
            if len(groups) == 1 and (group := groups.pop()) > 1:
                return (math.prod(batch[d] for d in outer), math.prod(batch[d] for d in inner), strides, tensors,
                        group)
    return (*_fold_in_two(batch, runs, tensors, given), 1)


def _stride_tuples(tensors):
    """Each tensor's strides (None for None), read once for the fold's many comparisons."""
    return [None if x is None else x.stride() for x in tensors]


def _runs(batch, strides):
    """The runs of adjacent batch dims (size-1 dims left out) that every tensor's strides
    (``strides``, :func:`_stride_tuples`) merge."""
    runs = []
    for d, size in enumerate(batch):
        if size == 1:
            continue
        if runs and all(_run_stride(st, batch, runs[-1] + [d]) is not None for st in strides):
            runs[-1].append(d)
        else:
            runs.append([d])
    return runs


def _fold(batch, runs, tensors, strides):
    """:func:`collapse_batch` for at most two ``runs``: views, nothing copied."""
    outer, inner = [[]] * (2 - len(runs)) + runs
    return (math.prod(batch[d] for d in outer), math.prod(batch[d] for d in inner),
            [(_run_stride(st, batch, outer), _run_stride(st, batch, inner)) for st in strides], tensors)


def _run_stride(strides, batch, run):
    """The stride over the adjacent batch dims ``run`` merged into one (0 for no dims) of a tensor
    with ``strides`` (0 for None: no tensor), or None where its strides do not allow it."""
    if strides is None or not run:
        return 0
    for outer, inner in zip(run, run[1:]):
        if strides[outer] != strides[inner] * batch[inner]:
            return None
    return strides[run[-1]]


def _fold_in_two(batch, runs, tensors, strides):
    """:func:`collapse_batch` for more than two runs of batch dims: the split into two that copies
    the fewest elements, the tensors that do not fold so copied (:func:`_dense_copy`)."""
    best = None
    for split in range(1, len(runs)):
        outer, inner = sum(runs[:split], []), sum(runs[split:], [])
        folds = [_run_stride(st, batch, outer) is not None and _run_stride(st, batch, inner) is not None
                 for st in strides]
        copied = sum(x.numel() for x, ok in zip(tensors, folds) if not ok)
        if best is None or copied < best[0]:
            best = (copied, outer, inner, folds)
    _, outer, inner, folds = best
    dense = [x for x, st, ok in zip(tensors, strides, folds) if ok and st is not None and 0 not in st[:len(batch)]]
    template = max(dense, key=torch.Tensor.numel, default=None)
    out = [x if ok else _dense_copy(x, template, batch, outer, inner) for x, ok in zip(tensors, folds)]
    folded = [(_run_stride(st, batch, outer), _run_stride(st, batch, inner)) for st in _stride_tuples(out)]
    return math.prod(batch[d] for d in outer), math.prod(batch[d] for d in inner), folded, out


def _dense_copy(x, template, batch, outer, inner):
    """``x`` copied into new memory whose dims are ordered as ``template``'s (a tensor of the same
    batch that folds; equal strides keep their order), so that the copy folds as the template does
    and is written in the order it is read -- where the template has other trailing dims (a
    log-decay beside level scales), its batch dims' order and then ``x``'s trailing dims in their
    own; batch-major (``contiguous``) where that order would not fold or there is no template."""
    if template is not None:
        if template.dim() == x.dim():
            order = sorted(range(x.dim()), key=lambda d: (-template.stride(d), d))
        else:
            nb = len(batch)
            order = sorted(range(nb), key=lambda d: (-template.stride(d), d)) + list(range(nb, x.dim()))
        strides, step = [0] * x.dim(), 1
        for d in reversed(order):
            strides[d] = step
            step *= x.shape[d]
        y = torch.empty_strided(tuple(x.shape), strides, dtype=x.dtype, device=x.device)
        if all(_run_stride(y.stride(), batch, run) is not None for run in (outer, inner)):
            return y.copy_(x)
    return x.contiguous()


def chunk_count(T: int, chunk: int) -> int:
    """Number of chunks ``ceil(T / chunk)`` (the last one zero-padded)."""
    return cdiv(T, chunk)


def hierarchy_sizes(n_chunks: int):
    """Sizes of the levels of aligned chunk-block states: ``[n, n >> 1, ..., n >> H]`` with
    ``H = max(0, bit_length(n - 1) - 1)``, the highest level any chunk reads."""
    top = max(0, (n_chunks - 1).bit_length() - 1)
    return [n_chunks >> h for h in range(top + 1)]


def level_offsets(n_chunks: int):
    """Where each level of the hierarchy starts in its layout, and last the number of entries
    ``N``: ``[0, n, n + (n >> 1), ..., N]`` for the levels of :func:`hierarchy_sizes`."""
    return list(itertools.accumulate(hierarchy_sizes(n_chunks), initial=0))


def check_levels(T: int, L: int) -> None:
    need = fenwick.num_levels(T)
    if L < need:
        raise ValueError(f"level_scales has L={L} columns but T={T} needs at least num_levels(T)={need}")
