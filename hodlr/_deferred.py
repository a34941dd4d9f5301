"""Checks that run on the GPU without stopping the host, reported once their verdict is in.

A check is a one-element int32 device tensor (1: failed).  :func:`submit` queues an asynchronous
copy of it to pinned host memory and records an event (a CPU tensor, from kernels run by Triton's
interpreter, is its own verdict, complete at once); :func:`report` raises the check's
``ValueError`` when the event has completed (without waiting, or waiting for one given check).
``LogLinearMask(...)``, ``matmul``, ``attention``, ``gated_delta_attention``,
``gated_delta_matrix`` and the mask's methods that compute with it call :func:`report` first, so a
failed check surfaces at the latest at the next of those calls once the GPU has got that far;
``LogLinearMask.check()`` waits for its own.  A failed check raises again whenever it is finished
again: the mask whose check failed raises it at every later use.
"""

from __future__ import annotations

import collections

_pending: collections.deque = collections.deque()


class Check:
    """One queued device check: the event after its copy (None for a CPU verdict), the verdict
    (pinned host memory, or the CPU flag itself), and the message of its error (a string, or a
    callable that makes it: formatted only if the check fails)."""

    __slots__ = ("event", "verdict", "message", "done", "failed")

    def __init__(self, event, verdict, message):
        self.event, self.verdict, self.message, self.done, self.failed = event, verdict, message, False, False

    def finish(self) -> None:
        """Mark the check reported; raise its error if it failed (at every call: a failed check
        stays failed)."""
        if not self.done:
            self.failed, self.done = bool(self.verdict.item()), True
        if self.failed:
            raise ValueError(self.message() if callable(self.message) else self.message)


def capturing() -> bool:
    """Whether the current CUDA stream is capturing a graph (False while CUDA is not initialised:
    nothing can be captured before)."""
    import torch

    return torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()


def submit(flag, message):
    """Queue the device verdict ``flag`` (one int32, non-zero: failed); returns its :class:`Check`,
    or None while a CUDA graph is being captured (no host copy can be queued then)."""
    import torch

    if flag.device.type == "cpu":
        check = Check(None, flag, message)
        _pending.append(check)
        return check
    if capturing():
        return None
    verdict = torch.empty(1, dtype=torch.int32, pin_memory=True)
    verdict.copy_(flag, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    check = Check(event, verdict, message)
    _pending.append(check)
    return check


def report(wait_for: Check = None) -> None:
    """Raise the ``ValueError`` of the first completed check that failed (in submission order).

    Checks still running on the GPU stay queued, unless ``wait_for`` is given: that one is waited
    for (and everything queued before it)."""
    if not _pending or capturing():  # no event may be queried while a graph is captured
        return
    if wait_for is not None and not wait_for.done and wait_for.event is not None:
        wait_for.event.synchronize()
    while _pending and (_pending[0].done or _pending[0].event is None or _pending[0].event.query()):
        check = _pending.popleft()
        if not check.done:
            check.finish()
