"""Inference batches: similar lengths together, under a frame budget."""

from __future__ import annotations

import numpy as np
import pytest

from gpu_worker.batching import NextBatch, Waiting, batch_segments, next_batch


def test_batches_respect_budget_and_group_similar_lengths() -> None:
    rng = np.random.default_rng(4)
    lengths = [int(x) for x in rng.integers(25, 500, 200)]
    batches = batch_segments(lengths, max_batch_frames=2000, max_batch_size=8)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(200))
    assert [lengths[i] for i in flat] == sorted(lengths)
    for b in batches:
        assert len(b) <= 8 and len(b) * max(lengths[i] for i in b) <= 2000
    # similar lengths: padding waste is small
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    assert padded <= 1.15 * sum(lengths)


def test_batch_examples() -> None:
    assert batch_segments([10, 500, 12, 490], 1000, 4) == [[0, 2], [3, 1]]
    assert batch_segments([10, 12, 14], 1000, 2) == [[0, 1], [2]]
    assert batch_segments([600, 50], 500, 4) == [[1], [0]]  # over budget alone
    assert batch_segments([], 500, 4) == []
    with pytest.raises(ValueError):
        batch_segments([1], 0, 1)


def batch_of(waiting: list[tuple[str, list[int]]], frames: int = 1000, size: int = 8) -> tuple[list[int], bool]:
    plan = next_batch([Waiting(group, lengths) for group, lengths in waiting], frames, size)
    return plan.take, plan.full


def test_jobs_take_turns_so_a_long_job_does_not_starve_a_short_one() -> None:
    long_job = ("video", [100] * 50)
    # the long job leads, yet the short job that arrived after it is in the very next batch
    assert batch_of([long_job, ("video", [75])], frames=1000, size=8) == ([7, 1], True)
    # three jobs share a batch of 6 two segments each, whatever their lengths
    assert batch_of([long_job, ("video", [100] * 9), ("video", [100] * 3)], size=6) == ([2, 2, 2], True)


def test_each_job_keeps_its_order_and_a_segment_that_does_not_fit_stops_its_job_only() -> None:
    # job 0's second segment (900 frames) would make 2 × 900 > 1000: job 0 stops, job 1 goes on
    assert batch_of([("video", [50, 900, 50]), ("video", [60, 60, 60])]) == ([1, 3], True)
    # a segment over the budget on its own is a batch of one
    assert batch_of([("video", [1500, 10]), ("video", [10])]) == ([1, 0], True)


def test_only_the_lead_jobs_group_shares_the_batch() -> None:
    waiting = [("audio", [50, 50]), ("video", [50]), ("audio", [50])]
    assert batch_of(waiting) == ([2, 0, 1], False)  # not full: more segments could still join
    # the batcher then moves the lead to the back: the video job leads the next batch
    assert batch_of([waiting[1], waiting[2], ("audio", [])]) == ([1, 0, 0], False)


def test_rotating_the_lead_serves_every_group() -> None:
    waiting = [["a", 40], ["b", 40], ["a", 40]]  # (group, segments left) per job, in lead order
    served = []
    while waiting:
        take, _ = batch_of([(g, [25] * n) for g, n in waiting], frames=10_000, size=16)
        served.append(waiting[0][0])
        for job, n in zip(waiting, take, strict=True):
            job[1] -= n
        waiting = [job for job in waiting[1:] + waiting[:1] if job[1]]
    assert served[:2] == ["a", "b"]  # group b is served second, not after both long "a" jobs
    # and no batch is smaller than it must be: 80 "a" segments in 5 batches of 16, 40 "b" ones in 3
    assert (served.count("a"), served.count("b")) == (5, 3)


def test_next_batch_edges() -> None:
    assert batch_of([]) == ([], False)
    with pytest.raises(ValueError):
        next_batch([Waiting("video", [1])], 0, 1)


@pytest.mark.parametrize(("batch", "count", "groups"), [
    (0, 0, []),
    (0, 1, [[0]]),
    (0, 5, [[0], [1, 2], [3, 4]]),
    (0, 9, [[0], [1, 2], [3, 4, 5, 6], [7, 8]]),
    (1, 9, [list(range(9))]),
    (7, 3, [[0, 1, 2]]),
    (3, 0, []),
])
def test_early_batches_go_whole_but_the_first_starts_with_one_segment(batch, count, groups):
    """The job's first early batch reaches the batcher in groups of 1, 2, 4, ... (the first text soon);
    a later one in one group (the biggest batch), every segment once, in order."""
    from gpu_worker.tasks import decode_groups

    assert [list(g) for g in decode_groups(batch, count)] == groups


def test_unpadded_batches_count_each_segments_own_frames() -> None:
    """Where the encoder runs each segment at its own length (CPU), a batch costs the segments' frames,
    not size × longest: a long segment no longer crowds out short ones."""
    lengths = [100, 100, 100, 400]
    assert batch_segments(lengths, max_batch_frames=800, max_batch_size=8) == [[0, 1, 2], [3]]
    assert batch_segments(lengths, max_batch_frames=800, max_batch_size=8, padded=False) == [[0, 1, 2, 3]]
    assert batch_segments(lengths, max_batch_frames=600, max_batch_size=8, padded=False) == [[0, 1, 2], [3]]
    waiting = [Waiting("g", [400]), Waiting("g", [100, 100, 100])]
    assert next_batch(waiting, 800, 8) == NextBatch([1, 1], True)  # 2 × 400
    assert next_batch(waiting, 800, 8, padded=False) == NextBatch([1, 3], False)
    assert next_batch(waiting, 650, 8, padded=False) == NextBatch([1, 2], True)
