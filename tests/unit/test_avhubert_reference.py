"""gpu_worker.avhubert against the official AV-HuBERT outputs in tests/fixtures/avhubert_reference."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from gpu_worker.avhubert import AVHubert, audio_from_features, collate, load_model, video_from_rois
from tests.conftest import reference_source as _source

REF = Path(__file__).resolve().parents[1] / "fixtures" / "avhubert_reference"
UTTS = ["rand29", "face50", "rand75"]
MODS = ["video", "audio", "av"]
BEAMS = [5, 1]
TOL = 1e-4



@pytest.fixture(autouse=True)
def _one_thread(single_torch_thread):
    """Every test here runs with one torch thread (see tests/conftest.py)."""


@pytest.fixture(scope="module")
def s2s() -> AVHubert:
    return load_model(REF / "checkpoints" / "finetune_s2s.pt")


@pytest.fixture(scope="module")
def pretrain() -> AVHubert:
    return load_model(REF / "checkpoints" / "pretrain.pt")


@pytest.fixture(scope="module")
def inputs() -> dict[str, np.ndarray]:
    return dict(np.load(REF / "inputs" / "inputs.npz"))


@pytest.fixture(scope="module")
def outputs() -> dict[str, np.ndarray]:
    return dict(np.load(REF / "outputs" / "s2s_outputs.npz"))


@pytest.fixture(scope="module")
def beams() -> dict:
    return json.loads((REF / "outputs" / "s2s_beam.json").read_text())


def _max_diff(a: torch.Tensor, b: np.ndarray) -> float:
    assert tuple(a.shape) == b.shape
    return float(np.abs(a.numpy() - b).max())


@pytest.mark.parametrize("mod", MODS)
@pytest.mark.parametrize("utt", UTTS)
def test_encoder_output(s2s: AVHubert, inputs, outputs, utt: str, mod: str) -> None:
    out = s2s.encode(**_source(inputs, utt, mod))
    assert _max_diff(out, outputs[f"{utt}__{mod}__encoder_out"]) < TOL


@pytest.mark.parametrize("mod", MODS)
@pytest.mark.parametrize("utt", UTTS)
def test_teacher_forced_decoder_log_probs(s2s: AVHubert, inputs, outputs, utt: str, mod: str) -> None:
    lprobs = s2s.decoder_log_probs(outputs[f"{utt}__prev_output_tokens"], **_source(inputs, utt, mod))
    assert _max_diff(lprobs, outputs[f"{utt}__{mod}__decoder_lprobs"]) < TOL


def test_pretrain_features(pretrain: AVHubert, inputs) -> None:
    ref = np.load(REF / "outputs" / "pretrain_features.npz")
    checked = set()
    encoder = pretrain.network.encoder
    for utt in UTTS:
        av = _source(inputs, utt, "av")
        variants = {f"{mod}__extract_finetune": pretrain.extract_features(**_source(inputs, utt, mod)) for mod in MODS}
        variants["av__extract_features_output_layer_none"] = variants["av__extract_finetune"]
        variants["av__extract_features_output_layer_last"] = pretrain.extract_features(**av, layer=3)
        # the front ends are the slow part: run them once for the other variants
        with torch.inference_mode():
            x, _ = encoder.fused_features(torch.from_numpy(av["video"]), torch.from_numpy(av["audio"]), None)
            variants["av__extract_features_ret_conv"] = x
            variants["av__extract_features_output_layer_first"] = encoder.transformer(x, None, layer=0)
        for name, value in variants.items():
            assert _max_diff(value, ref[f"{utt}__{name}"]) < TOL, name
            checked.add(f"{utt}__{name}")
    assert checked == set(ref.files)
    ret_conv = pretrain.extract_features(**_source(inputs, "rand29", "av"), ret_conv=True)
    assert _max_diff(ret_conv, ref["rand29__av__extract_features_ret_conv"]) < TOL


def _assert_same_hypotheses(hyps, expected: dict) -> None:
    ref = expected["hypotheses"]
    assert [h.tokens for h in hyps] == [r["tokens"] for r in ref]
    assert [h.text for h in hyps] == [r["text"] for r in ref]
    for h, r in zip(hyps, ref, strict=True):
        assert abs(h.score - r["score"]) < TOL
        assert np.abs(np.array(h.token_logprobs) - np.array(r["positional_scores"])).max() < TOL
        assert 0.0 <= h.confidence <= 1.0
        assert h.confidence == pytest.approx(math.exp(np.mean(h.token_logprobs)))
    assert hyps[0].text == expected["best_text_as_infer_s2s"]


@pytest.mark.parametrize("beam", BEAMS)
@pytest.mark.parametrize("mod", MODS)
@pytest.mark.parametrize("utt", UTTS)
def test_beam_search(s2s: AVHubert, inputs, outputs, beams, utt: str, mod: str, beam: int) -> None:
    key = f"{utt}__{mod}__beam{beam}"
    hyps = s2s.generate(**_source(inputs, utt, mod), beam_size=beam)[0]
    _assert_same_hypotheses(hyps, beams["beam"][key])
    # the npz copy of the same run: scores and token ids
    np.testing.assert_allclose([h.score for h in hyps], outputs[f"{key}__scores"], atol=TOL)
    assert [len(h.tokens) for h in hyps] == outputs[f"{key}__lengths"].tolist()


def test_non_incremental_search_gives_the_same_result(s2s: AVHubert, inputs) -> None:
    src = _source(inputs, "face50", "av")
    fast = s2s.generate(**src, beam_size=5)[0]
    slow = s2s.generate(**src, beam_size=5, incremental=False)[0]
    assert [h.tokens for h in fast] == [h.tokens for h in slow]
    np.testing.assert_allclose([h.score for h in fast], [h.score for h in slow], atol=1e-5)


BATCHES = {"rand75+face50": 2, "rand29": 1}


def _batched_source(batch: str, mod: str, padding_mask: np.ndarray) -> dict:
    raw = np.load(REF / "inputs" / "batched_inputs.npz")
    n = BATCHES[batch]
    video = np.concatenate([raw[f"{batch}__b{i}__video"] for i in range(n)])
    audio = np.concatenate([raw[f"{batch}__b{i}__audio"] for i in range(n)]).transpose(0, 2, 1)
    return {
        "video": video if mod != "audio" else None,
        "audio": audio if mod != "video" else None,
        "padding_mask": padding_mask,
    }


@pytest.mark.parametrize("mod", MODS)
@pytest.mark.parametrize("batch", BATCHES)
def test_batched_run_official_padded_length(s2s: AVHubert, batch: str, mod: str) -> None:
    out = np.load(REF / "outputs" / "batched_s2s_outputs.npz")
    ref = json.loads((REF / "outputs" / "batched_s2s_beam.json").read_text())["beam"]
    src = _batched_source(batch, mod, out[f"{batch}__{mod}__padding_mask"])
    assert _max_diff(s2s.encode(**src), out[f"{batch}__{mod}__encoder_out"]) < TOL
    lprobs = s2s.decoder_log_probs(out[f"{batch}__prev_output_tokens"], **src)
    assert _max_diff(lprobs, out[f"{batch}__{mod}__decoder_lprobs"]) < TOL
    for beam in BEAMS:
        hyps = s2s.generate(**src, beam_size=beam)  # max_len_from="padded" is the default
        for i in range(BATCHES[batch]):
            _assert_same_hypotheses(hyps[i], ref[f"{batch}__{mod}__beam{beam}__b{i}"])


@pytest.mark.parametrize("mod", ["video", "av"])  # audio has the same cap (104) in every mode
def test_batched_equals_unbatched_in_item_mode(s2s: AVHubert, mod: str) -> None:
    out = np.load(REF / "outputs" / "batched_s2s_outputs.npz")
    mask = out[f"rand75+face50__{mod}__padding_mask"]
    src = _batched_source("rand75+face50", mod, mask)
    for beam in BEAMS:
        batched = s2s.generate(**src, beam_size=beam, max_len_from="item")
        for i in range(2):
            n = int((~mask[i]).sum())
            alone = s2s.generate(
                video=None if src["video"] is None else src["video"][i : i + 1, :, :n],
                audio=None if src["audio"] is None else src["audio"][i : i + 1, :n],
                beam_size=beam,
                max_len_from="item",
            )[0]
            assert [h.tokens for h in batched[i]] == [h.tokens for h in alone]
            np.testing.assert_allclose([h.score for h in batched[i]], [h.score for h in alone], atol=TOL)


def test_padded_mode_keeps_the_official_batch_quirk(s2s: AVHubert) -> None:
    """face50 visual-only greedy runs to the padded length (75 + 1) in the batch, 50 + 1 alone."""
    out = np.load(REF / "outputs" / "batched_s2s_outputs.npz")
    src = _batched_source("rand75+face50", "video", out["rand75+face50__video__padding_mask"])
    assert len(s2s.generate(**src, beam_size=1)[1][0].tokens) == 76
    assert len(s2s.generate(**src, beam_size=1, max_len_from="item")[1][0].tokens) == 51


def test_video_helper_is_bit_exact(inputs) -> None:
    raw = np.load(REF / "inputs" / "raw_inputs.npz")
    inter = np.load(REF / "inputs" / "preprocessing_intermediates.npz")
    for utt in UTTS:
        video = video_from_rois(raw[f"{utt}__video_uint8"])
        np.testing.assert_array_equal(video, inputs[f"{utt}__video"][0, 0])
        np.testing.assert_array_equal(video, inter[f"{utt}__video_transformed_float64"].astype(np.float32))


def test_audio_helper_reproduces_the_official_features(inputs) -> None:
    inter = np.load(REF / "inputs" / "preprocessing_intermediates.npz")
    for utt in UTTS:
        frames = inputs[f"{utt}__video"].shape[2]
        audio = audio_from_features(inter[f"{utt}__audio_stacked"], num_frames=frames, normalize=True)
        assert np.abs(audio - inputs[f"{utt}__audio"][0].T).max() < 1e-6


def test_audio_helper_aligns_to_the_video_length() -> None:
    feats = np.arange(12, dtype=np.float32).reshape(3, 4)
    np.testing.assert_array_equal(audio_from_features(feats, num_frames=2, normalize=False), feats[:2])
    padded = audio_from_features(feats, num_frames=5, normalize=False)
    np.testing.assert_array_equal(padded[:3], feats)
    assert not padded[3:].any()


def test_collate_reproduces_the_official_batch() -> None:
    raw = np.load(REF / "inputs" / "raw_inputs.npz")
    inter = np.load(REF / "inputs" / "preprocessing_intermediates.npz")
    out = np.load(REF / "outputs" / "batched_s2s_outputs.npz")
    batched = np.load(REF / "inputs" / "batched_inputs.npz")
    videos = [video_from_rois(raw[f"{u}__video_uint8"]) for u in ("rand75", "face50")]
    audios = [
        audio_from_features(inter[f"{u}__audio_stacked"], len(v))
        for u, v in zip(("rand75", "face50"), videos, strict=True)
    ]
    batch = collate(videos, audios)
    assert batch.lengths == [75, 50]
    np.testing.assert_array_equal(batch.padding_mask.numpy(), out["rand75+face50__av__padding_mask"])
    for i in range(2):
        np.testing.assert_array_equal(batch.video[i : i + 1].numpy(), batched[f"rand75+face50__b{i}__video"])
        expected_audio = batched[f"rand75+face50__b{i}__audio"].transpose(0, 2, 1)
        assert np.abs(batch.audio[i : i + 1].numpy() - expected_audio).max() < 1e-6


def test_tokenizer_files_match_the_pickled_tokenizer(s2s: AVHubert, outputs) -> None:
    ckpt = REF / "checkpoints"
    from_files = load_model(
        ckpt / "finetune_s2s.pt", spm_path=ckpt / "spm_unigram160.model", dict_path=ckpt / "dict.wrd.txt"
    )
    assert from_files.tokenizer.dictionary.symbols == s2s.tokenizer.dictionary.symbols
    texts = json.loads((REF / "inputs" / "reference_texts.json").read_text())
    for utt in UTTS:
        target = outputs[f"{utt}__target"][0].tolist()
        assert s2s.tokenizer.encode(texts[utt].lower()) == target
        assert from_files.tokenizer.encode(texts[utt].lower()) == target
        assert s2s.tokenizer.decode(target) == texts[utt].lower()


def test_info(s2s: AVHubert, pretrain: AVHubert) -> None:
    info = s2s.info
    assert info["kind"] == "seq2seq" and info["has_tokenizer"] and info["normalize"]
    assert (info["encoder_layers"], info["encoder_embed_dim"], info["decoder_layers"]) == (3, 96, 2)
    assert (info["image_mean"], info["image_std"], info["image_crop_size"]) == (0.421, 0.165, 88)
    assert info["device"] == "cpu" and info["dtype"] == "fp32" and info["vocab_size"] == 160
    assert pretrain.info["kind"] == "pretrain" and pretrain.info["decoder_layers"] == 0
    with pytest.raises(RuntimeError, match="no decoder"):
        pretrain.generate(video=np.zeros((1, 1, 5, 88, 88), np.float32))
