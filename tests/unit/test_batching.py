"""Inference batches: similar lengths together, under a frame budget."""

from __future__ import annotations

import numpy as np
import pytest

from gpu_worker.batching import batch_segments


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
