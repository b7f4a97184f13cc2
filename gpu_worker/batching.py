"""Group segments into padded batches for decoding, bounded by a memory budget: one job's segments
(`batch_segments`), or several running jobs' segments together, fairly (`next_batch`)."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass


def batch_frames(size: int, longest: int, total: int, padded: bool) -> int:
    """The frames a batch costs against the budget: ``size × longest`` when the encoder runs on the padded
    batch (GPU), the segments' own frames (``total``) when it runs each segment at its length (CPU)."""
    return size * longest if padded else total


def batch_segments(lengths: Sequence[int], max_batch_frames: int, max_batch_size: int,
                   padded: bool = True) -> list[list[int]]:
    """Group segment indices by similar length for batched decoding.

    Indices are taken shortest first (ties by index) and added to the current batch while its frames
    (`batch_frames`) stay ``<= max_batch_frames`` and the size ``<= max_batch_size``.
    Every index appears exactly once; a segment over the budget on its own gets its own batch.
    """
    if max_batch_frames <= 0 or max_batch_size <= 0:
        raise ValueError("max_batch_frames and max_batch_size must be > 0")
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches: list[list[int]] = []
    total = 0
    for i in order:
        batch = batches[-1] if batches else None
        if (batch and len(batch) < max_batch_size
                and batch_frames(len(batch) + 1, lengths[i], total + lengths[i], padded) <= max_batch_frames):
            batch.append(i)
            total += lengths[i]
        else:
            batches.append([i])
            total = lengths[i]
    return batches


@dataclass(frozen=True)
class Waiting:
    """One job's segments not yet decoded, as the cross-job scheduler sees them: the `group` they decode
    in (only segments of one group share a forward pass: same modality and beam size) and their lengths
    in frames, in the order they are to be decoded."""

    group: Hashable
    lengths: Sequence[int]


@dataclass(frozen=True)
class NextBatch:
    """`take[j]`: how many of job j's first waiting segments the batch holds; `full`: the budget or the
    size cap (not a lack of segments) stopped it, so waiting longer would not make it bigger."""

    take: list[int]
    full: bool


def next_batch(waiting: Sequence[Waiting], max_batch_frames: int, max_batch_size: int,
               padded: bool = True) -> NextBatch:
    """The next forward pass over several jobs' segments, fair and bounded like `batch_segments`.

    `waiting[0]` leads: the batch is of its group and holds its first segment (the caller moves the
    lead to the back afterwards, so every job leads in turn and none waits behind a long one). The
    other jobs of that group then take turns, one segment each per round, each in its own order,
    while its frames (`batch_frames`) stay ``<= max_batch_frames`` and the size ``<= max_batch_size``;
    a job whose next segment does not fit takes no more. A segment over the budget alone is a batch.
    """
    if max_batch_frames <= 0 or max_batch_size <= 0:
        raise ValueError("max_batch_frames and max_batch_size must be > 0")
    take = [0] * len(waiting)
    if not waiting or not waiting[0].lengths:
        return NextBatch(take, False)
    turns = [j for j, w in enumerate(waiting) if w.group == waiting[0].group and w.lengths]
    size, longest, total, full = 0, 0, 0, False
    while turns:
        for j in list(turns):
            length = waiting[j].lengths[take[j]]
            fits = (size < max_batch_size
                    and batch_frames(size + 1, max(longest, length), total + length, padded) <= max_batch_frames)
            if size and not fits:
                turns.remove(j)
                full = True
                continue
            take[j] += 1
            size, longest, total = size + 1, max(longest, length), total + length
            if take[j] == len(waiting[j].lengths):
                turns.remove(j)
    return NextBatch(take, full or size == max_batch_size)
