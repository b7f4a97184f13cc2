"""The CUDA paths against the official fixtures: fp32 parity, and fp16/bf16 deviation and text agreement.

Not part of `make test` (CI has no GPU): `bench/gpu_check.sh` runs these on a CUDA machine. Without
CUDA they fail at once rather than skip, so a GPU check can never pass by skipping.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from gpu_worker.avhubert import AVHubert, load_model
from tests.conftest import REFERENCE
from tests.conftest import reference_source as _source

UTTS = ["rand29", "face50", "rand75"]
MODS = ["video", "audio", "av"]


@pytest.fixture(scope="module", autouse=True)
def _cuda() -> None:
    assert torch.cuda.is_available(), "no CUDA device: run this module on a GPU machine (bench/gpu_check.sh)"


@pytest.fixture(scope="module")
def inputs() -> dict[str, np.ndarray]:
    return dict(np.load(REFERENCE / "inputs" / "inputs.npz"))


@pytest.fixture(scope="module")
def outputs() -> dict[str, np.ndarray]:
    return dict(np.load(REFERENCE / "outputs" / "s2s_outputs.npz"))


@pytest.fixture(scope="module")
def beams() -> dict:
    return json.loads((REFERENCE / "outputs" / "s2s_beam.json").read_text())


@pytest.fixture(scope="module")
def models() -> dict[str, AVHubert]:
    path = REFERENCE / "checkpoints" / "finetune_s2s.pt"
    return {dtype or "fp32": load_model(path, device="cuda", dtype=dtype) for dtype in (None, "fp16", "bf16")}


@pytest.mark.parametrize("mod", MODS)
@pytest.mark.parametrize("utt", UTTS)
def test_fp32_on_cuda_matches_the_official_outputs(models, inputs, outputs, beams, utt, mod):
    model = models["fp32"]
    encoded = model.encode(**_source(inputs, utt, mod)).cpu().numpy()
    assert np.abs(encoded - outputs[f"{utt}__{mod}__encoder_out"]).max() < 1e-3  # TF32 off: torch's default
    for beam in (5, 1):
        hyps = model.generate(**_source(inputs, utt, mod), beam_size=beam)[0]
        expected = beams["beam"][f"{utt}__{mod}__beam{beam}"]["hypotheses"]
        assert [h.tokens for h in hyps] == [r["tokens"] for r in expected]


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_reduced_precision_deviation_and_text_agreement(models, inputs, dtype, record_property):
    errors, agree, total = [], 0, 0
    for utt in UTTS:
        for mod in MODS:
            src = _source(inputs, utt, mod)
            ref = models["fp32"].encode(**src)
            low = models[dtype].encode(**src)
            errors.append(float((low - ref).norm() / ref.norm()))
            texts = [m.generate(**src, beam_size=5)[0][0].text for m in (models["fp32"], models[dtype])]
            agree += texts[0] == texts[1]
            total += 1
    record_property("encoder_rel_error_max", max(errors))
    record_property("beam5_text_agreement", f"{agree}/{total}")
    print(f"{dtype}: encoder relative error max {max(errors):.2e}, beam-5 text agreement {agree}/{total}")
    assert max(errors) < (2e-2 if dtype == "bf16" else 5e-3)
