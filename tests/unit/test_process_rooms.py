"""Each process imports only its room: the API no preprocessing or model stack, the CPU worker no
torch, the GPU worker no dlib/OpenCV/PyAV/SciPy (checked in a fresh interpreter each)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT

PREPROCESSING = ("dlib", "numba", "cv2", "av", "scipy", "python_speech_features")
MODEL = ("torch", "sentencepiece")

CASES = {
    "api": ("import api; api.create_app()", PREPROCESSING + MODEL),
    "cpu worker": ("import cpu_worker.worker", MODEL),
    "gpu worker": ("import gpu_worker.worker", PREPROCESSING),
    "flower": ("import tasks.celery_app", PREPROCESSING + MODEL),
    # the client and `avsr submit/status/wait/result` (the base install); `avsr transcribe` imports the rest lazily
    "client": ("import avsr_client.cli", PREPROCESSING + MODEL + ("api", "cpu_worker", "gpu_worker", "flask")),
}


@pytest.mark.parametrize("process", sorted(CASES))
def test_process_leaves_other_rooms_unimported(process: str) -> None:
    statement, forbidden = CASES[process]
    probe = f"import json, sys; {statement}; print(json.dumps(sorted(set(sys.modules) & set(sys.argv[1:]))))"
    result = subprocess.run([sys.executable, "-c", probe, *forbidden], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == [], f"{process} imports {result.stdout}"
