"""The inference engine a GPU worker process holds: one loaded model, segments decoded in batches.

    engine = Engine("large_vox_433h.pt", device="auto")
    engine.warm_up()
    engine.transcribe(rois=rois, audio=features, segments=[{"id": 0, "start_frame": 0, "end_frame": 75}],
                      modality="audiovisual", beam_size=5)
    # -> [{"id": 0, "text": "...", "confidence": 0.83, "score": -0.19, "num_tokens": 12}]

Segments of similar length share a forward pass, bounded by a frame budget (batch size × longest
segment; on CPU, where padding is not computed, the segments' frames), and are decoded with per-item
length caps (`max_len_from="item"`) so a batch gives exactly what each segment would give alone — the
official single-utterance result. A batch that still runs out of GPU memory is split in halves and retried.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from gpu_worker.avhubert import Hypothesis, audio_from_features, collate, load_model, video_from_rois
from gpu_worker.batching import batch_segments
from gpu_worker.core_share import CoreShare
from tasks.records import DecodedSegment, SegmentSpan, Word

MODALITIES = ("video", "audio", "audiovisual")


class Engine:
    """An AV-HuBERT model loaded once, with the batching policy of the service."""

    def __init__(self, checkpoint: str | Path, *, spm_path: str | None = None, dict_path: str | None = None,
                 device: str = "auto", precision: str = "fp32", max_batch_frames: int = 3000,
                 max_batch_size: int = 16) -> None:
        dtype: Literal["fp16", "bf16"] | None = None if precision == "fp32" else precision  # type: ignore[assignment]
        self.model = load_model(checkpoint, spm_path=spm_path, dict_path=dict_path, device=device, dtype=dtype)
        self.checkpoint = Path(checkpoint)
        self.max_batch_frames = max_batch_frames
        self.max_batch_size = max_batch_size
        # on CPU, as many intra-op threads as the cores other processes leave idle (`core_share`)
        self._cores = CoreShare(torch.get_num_threads()) if self.model.device.type == "cpu" else None

    def warm_up(self, frames: int = 25) -> float:
        """One short decode so the first request does not pay for lazy initialisation; seconds taken."""
        started = time.perf_counter()
        rng = np.random.default_rng(0)
        rois = rng.integers(0, 256, size=(frames, 96, 96), dtype=np.uint8)
        self.transcribe(rois=rois, audio=None, segments=[{"id": 0, "start_frame": 0, "end_frame": frames}],
                        modality="video", beam_size=1)
        return time.perf_counter() - started

    def transcribe(self, *, rois: np.ndarray | None, audio: np.ndarray | None, segments: Sequence[SegmentSpan],
                   modality: str, beam_size: int = 5,
                   on_progress: Callable[[int], None] | None = None) -> list[DecodedSegment]:
        """Decode each segment (`start_frame`/`end_frame` into `rois` uint8[T,96,96] — or [S,T,96,96], one
        stream per face read, picked by the segment's `stream` — and `audio` float32[T,104] stacked
        filterbanks); returns, in segment order, the best hypothesis of each."""
        items = segment_inputs(rois, audio, segments, modality)
        results: list[DecodedSegment | None] = [None] * len(segments)
        done = 0
        for batch in batch_segments([item.frames for item in items], self.max_batch_frames, self.max_batch_size,
                                    self.pads_batches):
            for i, decoded in zip(batch, self.decode([items[i] for i in batch], beam_size), strict=True):
                results[i] = decoded
            done += len(batch)
            if on_progress is not None:
                on_progress(done)
        return [r for r in results if r is not None]

    def decode(self, items: Sequence[SegmentInput], beam_size: int) -> list[DecodedSegment]:
        """Decode `items` (of one modality) in one forward pass (in halves if it runs out of GPU memory);
        each gives exactly what it gives alone. This is what `gpu_worker/batcher.py` calls across jobs."""
        return [{"id": item.span["id"], "text": best.text, "confidence": float(best.confidence),
                 "score": float(best.score), "num_tokens": len(best.tokens), "words": self.words(best),
                 "end_logprob": float(best.token_logprobs[-1])}
                for item, best in zip(items, self._decode(list(items), beam_size), strict=True)]

    def words(self, hyp: Hypothesis) -> list[Word]:
        """Each word of `hyp` with its confidence: exp(mean log-prob of the pieces that spell it).

        The segment's confidence recombines from them: exp((Σ tokens·ln confidence + ln p(</s>)) / num_tokens).
        """
        tokenizer = self.model.tokenizer
        assert tokenizer is not None  # generate() needs it too
        return [{"word": word, "confidence": math.exp(sum(lps) / len(lps)), "tokens": len(lps)}
                for word, lps in tokenizer.words(hyp.tokens, hyp.token_logprobs)]

    def _decode(self, items: list[SegmentInput], beam_size: int) -> list[Hypothesis]:
        """Best hypothesis of each item. A batch that runs out of GPU memory is decoded in halves
        (results are the same: per-item length caps), down to single segments."""
        self._share_cores()
        info = self.model.info  # the items of a batch use the same modality: all or none have video, audio
        videos = [video_from_rois(item.video, info["image_crop_size"], info["image_mean"], info["image_std"])
                  for item in items if item.video is not None]
        audios = [audio_from_features(item.audio, num_frames=item.frames, normalize=info["normalize"])
                  for item in items if item.audio is not None]
        inputs = collate(videos or None, audios or None)
        try:
            hyps = self.model.generate(video=inputs.video, audio=inputs.audio, padding_mask=inputs.padding_mask,
                                       beam_size=beam_size, max_len_from="item", on_step=self._share_cores)
        except torch.OutOfMemoryError:
            if len(items) == 1:
                raise
            del inputs
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            half = len(items) // 2
            return self._decode(items[:half], beam_size) + self._decode(items[half:], beam_size)
        return [item_hyps[0] for item_hyps in hyps]

    def _share_cores(self) -> None:
        """On CPU: as many intra-op threads as the cores other processes leave idle (`core_share`),
        before a batch, each segment it encodes and each decoder step (a 16-segment batch's encoder pass
        takes about 15 s on one core: a core that the CPU worker frees meanwhile is used at the next segment)."""
        if self._cores is not None:
            threads = self._cores.threads()
            if threads != self.threads:
                torch.set_num_threads(threads)

    @property
    def pads_batches(self) -> bool:
        """Whether a batch is encoded padded (GPU: it costs size x longest frames) or each segment at its own
        length (CPU: it costs its segments' frames); the model's."""
        return self.model.pads_batches

    @property
    def threads(self) -> int:
        """The intra-op threads torch uses now (on the calling thread: the batcher's, in the GPU worker)."""
        return torch.get_num_threads()

    @functools.cached_property
    def identity(self) -> str:
        """What makes two decodes of the same inputs equal: the checkpoint (name, size), dtype, device type."""
        size = self.checkpoint.stat().st_size if self.checkpoint.exists() else -1
        return f"{self.checkpoint.name}:{size}:{self.model.info['dtype']}:{self.model.device.type}"

    def describe(self) -> dict[str, Any]:
        """What `/health` and job results report about the model."""
        info = self.model.info
        device = self.model.device
        return {
            "checkpoint": self.checkpoint.name,
            "kind": info["kind"],
            "device": str(device),
            "gpu_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "dtype": info["dtype"],
            "encoder_layers": info["encoder_layers"],
            "encoder_embed_dim": info["encoder_embed_dim"],
        }

    def memory(self) -> dict[str, int | None]:
        """GPU memory in use (bytes), None on CPU."""
        device = self.model.device
        if device.type != "cuda":
            return {"gpu_memory_allocated": None, "gpu_memory_reserved": None}
        return {"gpu_memory_allocated": torch.cuda.memory_allocated(device),
                "gpu_memory_reserved": torch.cuda.memory_reserved(device)}


@dataclass(frozen=True)
class SegmentInput:
    """One segment's model inputs: its span, and its frames of mouth ROIs (uint8 [T,96,96]) and/or of
    audio features (float32 [T,104]) — None for a modality it does not use."""

    span: SegmentSpan
    video: np.ndarray | None
    audio: np.ndarray | None

    @property
    def frames(self) -> int:
        return self.span["end_frame"] - self.span["start_frame"]


def segment_inputs(rois: np.ndarray | None, audio: np.ndarray | None, segments: Sequence[SegmentSpan],
                   modality: str) -> list[SegmentInput]:
    """Each segment's slice of `rois` (its `stream` when 4-D) and of `audio`, as `modality` uses them."""
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
    use_video, use_audio = modality != "audio", modality != "video"
    if (use_video and rois is None) or (use_audio and audio is None):
        raise ValueError(f"modality {modality} needs {'video' if use_video else 'audio'} input")
    rois, audio = (rois if use_video else None), (audio if use_audio else None)
    return [SegmentInput(s, None if rois is None else _stream(rois, s)[s["start_frame"]:s["end_frame"]],
                         None if audio is None else audio[s["start_frame"]:s["end_frame"]]) for s in segments]


def _stream(rois: np.ndarray, span: SegmentSpan) -> np.ndarray:
    """The ROI stream [T,96,96] a segment reads: `rois` itself, or `rois[span["stream"]]` when 4-D."""
    stream: np.ndarray = rois[span.get("stream", 0)] if rois.ndim == 4 else rois
    return stream
