"""Text and HTML summaries of masks and trees (cheap: nothing large is materialised)."""

from __future__ import annotations

import html

__all__ = ["mask_repr", "mask_repr_html"]


def mask_repr(mask) -> str:
    return (
        f"LogLinearMask(T={mask.T}, levels={mask.num_levels}, batch_shape={mask.batch_shape}, "
        f"dtype={mask.dtype}, device={mask.device}, decay={'yes' if mask.log_decay is not None else 'no'})"
    )


def mask_repr_html(mask) -> str:
    return f"<pre>{html.escape(mask_repr(mask))}</pre>"
