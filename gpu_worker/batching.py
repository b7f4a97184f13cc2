"""Group segments into padded batches for decoding, bounded by a memory budget."""

from __future__ import annotations

from collections.abc import Sequence


def batch_segments(lengths: Sequence[int], max_batch_frames: int, max_batch_size: int) -> list[list[int]]:
    """Group segment indices by similar length for padded batched decoding.

    Indices are taken shortest first (ties by index) and added to the current batch while
    ``batch size × longest length <= max_batch_frames`` and the size stays ``<= max_batch_size``.
    Every index appears exactly once; a segment over the budget on its own gets its own batch.
    """
    if max_batch_frames <= 0 or max_batch_size <= 0:
        raise ValueError("max_batch_frames and max_batch_size must be > 0")
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches: list[list[int]] = []
    for i in order:
        batch = batches[-1] if batches else None
        if batch and len(batch) < max_batch_size and (len(batch) + 1) * lengths[i] <= max_batch_frames:
            batch.append(i)
        else:
            batches.append([i])
    return batches
