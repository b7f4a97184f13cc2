"""Pure-PyTorch AV-HuBERT (no fairseq) that loads the official fairseq checkpoints.

>>> from gpu_worker.avhubert import load_model
>>> model = load_model("base_vox_433h.pt", device="auto")
>>> hyps = model.generate(video=video, padding_mask=mask, beam_size=5)
>>> hyps[0][0].text, hyps[0][0].confidence
"""

from .checkpoint import CheckpointError, load_checkpoint
from .inputs import Batch, audio_from_features, collate, video_from_rois
from .pipeline import AVHubert, Hypothesis, load_model
from .search import GenerationConfig
from .tokenizer import TokenizerError

__all__ = [
    "AVHubert",
    "Batch",
    "CheckpointError",
    "GenerationConfig",
    "Hypothesis",
    "TokenizerError",
    "audio_from_features",
    "collate",
    "load_checkpoint",
    "load_model",
    "video_from_rois",
]
