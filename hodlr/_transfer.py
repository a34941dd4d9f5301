"""Host values (numpy arrays, lists) onto a device without stalling the host."""

from __future__ import annotations

import numpy as np


def to_device(x, device, dtype=None):
    """``x`` (numpy array, list, scalar) as a tensor on ``device`` (``dtype`` if given, else
    numpy's).  On CUDA through pinned memory without blocking: a copy from pageable memory waits
    for the work already queued on the stream, so a call that ends with one (the positions of
    its final states, an index of packed rows) would hold the host until the GPU drained instead
    of letting it queue what follows.  While a CUDA graph is captured the copy is the plain one,
    which the capture refuses: a captured copy from a pinned buffer would replay from memory that
    PyTorch's cache has since handed out again."""
    import torch

    if isinstance(x, torch.Tensor):
        return x.to(device, dtype)
    if isinstance(x, (list, tuple)) and any(isinstance(e, torch.Tensor) for e in x):  # torch reads those itself
        return torch.as_tensor(x, dtype=dtype, device=device)
    t = torch.as_tensor(np.asarray(x), dtype=dtype)
    if torch.device(device).type == "cuda" and not torch.cuda.is_current_stream_capturing():
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
