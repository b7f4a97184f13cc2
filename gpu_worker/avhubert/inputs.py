"""Model inputs exactly as av_hubert's ``AVHubertDataset`` + collater build them.

- video: uint8 grey mouth ROIs ``[T, 96, 96]`` -> ``float32 [T, 88, 88]``: ``x / 255``, centre crop,
  ``(x - mean) / std``, computed in float64 by numpy and only then cast (bit-exact);
- audio: stacked log filterbanks ``float32 [T, 104]`` (``cpu_worker.audio.audio_features``) -> cut or
  zero-padded to the video length, then per-frame ``layer_norm`` over the features when the task
  config says ``normalize``;
- :func:`collate` zero-pads items of different lengths at the end and builds ``padding_mask``
  (True = padded); with the task's ``pad_audio`` false it instead crops every item to the
  shortest one, and ``max_sample_size`` caps the batch length, as the official collater does.
  The batch layouts are the model's: video ``[B, 1, T, H, W]``, audio ``[B, T, F]``
  (the official collater hands ``[B, F, T]``; the model takes frames first).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def video_from_rois(
    frames: np.ndarray, crop_size: int = 88, mean: float = 0.421, std: float = 0.165
) -> np.ndarray:
    """``uint8 [T, H, W]`` grey ROIs -> normalised ``float32 [T, crop_size, crop_size]``."""
    frames = np.asarray(frames)
    if frames.ndim != 3:
        raise ValueError(f"expected grey frames [T, H, W], got shape {frames.shape}")
    h, w = frames.shape[1:]
    if h < crop_size or w < crop_size:
        raise ValueError(f"frames {h}x{w} are smaller than the {crop_size}x{crop_size} crop")
    x = (frames - 0.0) / 255.0
    top, left = int(round(h - crop_size) / 2.0), int(round(w - crop_size) / 2.0)
    x = x[:, top : top + crop_size, left : left + crop_size]
    return ((x - mean) / std).astype(np.float32)


def audio_from_features(
    features: np.ndarray, num_frames: int | None = None, normalize: bool = True
) -> np.ndarray:
    """Stacked filterbanks ``float32 [T_a, F]`` -> model audio ``float32 [T, F]``.

    ``num_frames`` (the video length, when both modalities are used) cuts or zero-pads the end as
    ``AVHubertDataset.load_feature`` does; ``normalize`` applies ``F.layer_norm`` over each frame's
    features (eps 1e-5, no affine), the task's ``normalize`` flag.
    """
    feats = np.asarray(features, dtype=np.float32)
    if feats.ndim != 2:
        raise ValueError(f"expected audio features [T, F], got shape {feats.shape}")
    if num_frames is not None:
        diff = len(feats) - num_frames
        if diff < 0:
            feats = np.concatenate([feats, np.zeros([-diff, feats.shape[1]], dtype=feats.dtype)])
        elif diff > 0:
            feats = feats[:-diff]
    if normalize:
        tensor = torch.from_numpy(np.ascontiguousarray(feats))
        with torch.no_grad():
            feats = F.layer_norm(tensor, tensor.shape[1:]).numpy()
    return feats


@dataclass
class Batch:
    """Collated inputs: ``video`` ``[B, 1, T, H, W]``, ``audio`` ``[B, T, F]`` (either may be None),
    ``padding_mask`` ``[B, T]`` (True = padded) and the per-item frame counts."""

    video: Tensor | None
    audio: Tensor | None
    padding_mask: Tensor
    lengths: list[int]


def _pad_stack(items: Sequence[np.ndarray], length: int) -> Tensor:
    out = np.zeros((len(items), length, *items[0].shape[1:]), dtype=np.float32)
    for i, item in enumerate(items):
        out[i, : len(item)] = item
    return torch.from_numpy(out)


def collate(
    videos: Sequence[np.ndarray] | None = None,
    audios: Sequence[np.ndarray] | None = None,
    pad_audio: bool = True,
    max_sample_size: int | None = None,
) -> Batch:
    """Zero-pad per-item ``videos`` (``[T_i, H, W]`` float32 from :func:`video_from_rois`) and/or
    ``audios`` (``[T_i, F]`` from :func:`audio_from_features`) to the longest item.

    ``pad_audio`` / ``max_sample_size`` are the task switches (``info['pad_audio']``,
    ``info['max_sample_size']``) read by ``AVHubertDataset.collater``: the batch length is
    ``min(max(T_i) if pad_audio else min(T_i), max_sample_size)`` and longer items are cut to it
    from their first frame (``random_crop`` false; the released fine-tuning configs set
    ``pad_audio`` true). ``lengths`` are the kept frame counts.
    """
    if not videos and not audios:
        raise ValueError("collate needs videos and/or audios")
    if videos and audios:
        if len(videos) != len(audios):
            raise ValueError(f"{len(videos)} videos but {len(audios)} audios")
        for i, (v, a) in enumerate(zip(videos, audios, strict=True)):
            if len(v) != len(a):
                raise ValueError(
                    f"item {i}: video has {len(v)} frames, audio {len(a)}; "
                    "align with audio_from_features(..., num_frames=len(video))"
                )
    lengths = [len(x) for x in (videos or audios or [])]
    longest = max(lengths) if pad_audio else min(lengths)
    if max_sample_size is not None:
        longest = min(longest, max_sample_size)
    if longest < max(lengths):
        videos = [v[:longest] for v in videos] if videos else videos
        audios = [a[:longest] for a in audios] if audios else audios
        lengths = [min(n, longest) for n in lengths]
    padding_mask = torch.arange(longest).unsqueeze(0) >= torch.tensor(lengths).unsqueeze(1)
    video = _pad_stack(videos, longest).unsqueeze(1) if videos else None
    audio = _pad_stack(audios, longest) if audios else None
    return Batch(video, audio, padding_mask, lengths)
