"""Audio features vs the official AV-HuBERT intermediates."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from python_speech_features import logfbank

from cpu_worker.audio import audio_features, frame_energy_db, log_filterbank
from gpu_worker.avhubert import audio_from_features

ROOT = Path(__file__).resolve().parents[2]

INP = ROOT / "tests/fixtures/avhubert_reference/inputs"
UTTS = ("rand29", "face50", "rand75")


@pytest.fixture(scope="module")
def raw() -> dict[str, np.ndarray]:
    return dict(np.load(INP / "raw_inputs.npz"))


@pytest.fixture(scope="module")
def inter() -> dict[str, np.ndarray]:
    return dict(np.load(INP / "preprocessing_intermediates.npz"))


@pytest.mark.parametrize("utt", UTTS)
def test_logfbank_and_stacked_match_official(utt: str, raw: dict, inter: dict) -> None:
    wav = raw[f"{utt}__wav_int16"]
    np.testing.assert_allclose(log_filterbank(wav, 16000), inter[f"{utt}__logfbank"], atol=1e-5, rtol=0)
    feats = audio_features(wav, 16000)
    t = len(wav) // 640
    assert feats.shape == (t, 104) and feats.dtype == np.float32
    np.testing.assert_allclose(feats, inter[f"{utt}__audio_stacked"], atol=1e-5, rtol=0)
    assert np.array_equal(feats, inter[f"{utt}__audio_stacked"])  # bit-exact on the float64 path


@pytest.mark.parametrize("utt", UTTS)
def test_layer_norm_matches_model_input(utt: str, raw: dict) -> None:
    model_in = np.load(INP / "inputs.npz")[f"{utt}__audio"][0].T  # (T, 104)
    # CPU worker features → GPU worker alignment + normalisation = the official model input
    feats = audio_from_features(audio_features(raw[f"{utt}__wav_int16"]), num_frames=model_in.shape[0])
    np.testing.assert_allclose(feats, model_in, atol=1e-5, rtol=0)


def test_stacking_pads_with_zero_rows() -> None:
    rng = np.random.default_rng(1)
    wav = (rng.normal(0, 3000, 16000 * 1 + 123)).astype(np.int16)
    fb = log_filterbank(wav)
    feats = audio_features(wav)
    assert feats.shape[0] == -(-fb.shape[0] // 4)
    np.testing.assert_array_equal(feats[1, :26], fb[4])
    np.testing.assert_array_equal(feats[1, 78:], fb[7])
    tail = fb.shape[0] % 4
    if tail:
        assert (feats[-1, tail * 26 :] == 0).all()


def test_align_pads_and_trims() -> None:
    feats = np.ones((10, 104), np.float32)
    assert audio_from_features(feats, 12, normalize=False).shape == (12, 104)
    assert (audio_from_features(feats, 12, normalize=False)[10:] == 0).all()
    np.testing.assert_array_equal(audio_from_features(feats, 7, normalize=False), feats[:7])
    assert audio_from_features(feats[10:], 3, normalize=False).shape == (3, 104)  # a segment past the sound


def test_resampling_other_rates() -> None:
    t = np.arange(48000) / 48000.0
    wav48 = (8000 * np.sin(2 * np.pi * 440 * t)).astype(np.int16)
    wav16 = (8000 * np.sin(2 * np.pi * 440 * np.arange(16000) / 16000.0)).astype(np.int16)
    a, b = audio_features(wav48, 48000), audio_features(wav16, 16000)
    assert a.shape == b.shape == (25, 104)
    assert np.abs(a[2:-2] - b[2:-2]).max() < 0.5  # same tone, same bands (log energies)


def test_frame_energy_db() -> None:
    wav = np.zeros(16000, np.int16)
    wav[8000:] = 16384  # second half: constant at half full scale → -6 dB
    e = frame_energy_db(wav, 16000)
    assert e.shape == (25,) and e.dtype == np.float32
    assert (e[:12] == -100.0).all()
    np.testing.assert_allclose(e[13:], 20 * np.log10(0.5), atol=1e-4)
    assert frame_energy_db(np.zeros(650, np.int16)).shape == (2,)


@pytest.mark.parametrize("length", [1, 2, 399, 400, 401, 559, 560, 561, 16000 * 20 + 37, 160 * 4096 + 241])
def test_filterbank_is_the_libraries_bits_at_every_length(length: int) -> None:
    """The strided framing gives python_speech_features.logfbank's exact float64 result, at the edge
    lengths of its frame count (one frame, a frame plus one hop, ...), on a 20-s clip and on one
    that crosses a block of the power spectrum."""
    rng = np.random.default_rng(length)
    wav = rng.normal(0, 3000, length).clip(-32768, 32767).astype(np.int16)
    wav[: length // 3] = 0  # digital silence: the eps branch of the log
    expected = logfbank(wav, samplerate=16000).astype(np.float32)
    got = log_filterbank(wav, 16000)
    assert got.shape == expected.shape
    assert np.array_equal(got, expected)
