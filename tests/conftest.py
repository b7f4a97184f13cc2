"""Fixtures shared by unit and integration tests: the official AV-HuBERT reference set."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "tests" / "fixtures" / "avhubert_reference"
PREPROCESS = REFERENCE / "preprocess"


def reference_face_frames() -> np.ndarray:
    """The 50 BGR frames of the reference face clip, uint8 [50, 480, 640, 3] (frames 0, 20, 21: no face)."""
    with av.open(str(PREPROCESS / "face_clip_640x480_ffv1.mkv")) as container:
        return np.stack([f.to_ndarray(format="bgr24") for f in container.decode(video=0)])


def reference_source(inputs: dict[str, np.ndarray], utt: str, mod: str) -> dict[str, np.ndarray | None]:
    """The model inputs of fixture utterance `utt` for modality `mod` (video, audio or av) from `inputs.npz`."""
    video = inputs[f"{utt}__video"]
    audio = inputs[f"{utt}__audio"].transpose(0, 2, 1)  # official [B, F, T] -> model [B, T, F]
    return {"video": video if mod != "audio" else None, "audio": audio if mod != "video" else None}


@pytest.fixture(scope="session")
def frames() -> np.ndarray:
    return reference_face_frames()


@pytest.fixture(scope="session")
def ref() -> dict[str, np.ndarray]:
    """The official preparation's outputs for that clip (`preprocess_reference.npz`)."""
    return dict(np.load(PREPROCESS / "preprocess_reference.npz"))


@pytest.fixture
def single_torch_thread():
    """One intra-op thread: the fixture models gain nothing from more, and on a busy 2-core box
    spinning OpenMP threads make runs up to 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
