"""Checkpoint safety and errors, random checkpoints and configuration switches of gpu_worker.avhubert."""

from __future__ import annotations

import argparse
import io
import os
import pickle
import sys
import types
import typing
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from gpu_worker.avhubert import CheckpointError, TokenizerError, load_checkpoint, load_model
from gpu_worker.avhubert.config import config_from_checkpoint
from gpu_worker.avhubert.random_checkpoint import make_random_checkpoint


@pytest.fixture(autouse=True)
def _one_thread(single_torch_thread):
    """Every test here runs with one torch thread (see tests/conftest.py)."""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_random_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny.pt", size="tiny", seed=3)


def _resave(state: dict, path: Path) -> Path:
    torch.save(state, path, pickle_protocol=2)
    return path


def _inputs(frames: int = 12, batch: int = 1, seed: int = 0, audio: bool = True) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    inputs = {"video": torch.randn(batch, 1, frames, 88, 88, generator=g)}
    if audio:
        inputs["audio"] = torch.randn(batch, frames, 104, generator=g)
    return inputs


# ---------------------------------------------------------------- malicious files


class _Payload:
    def __init__(self, func, arg) -> None:
        self.func, self.arg = func, arg

    def __reduce__(self):
        return self.func, (self.arg,)


@pytest.mark.parametrize("kind", ["os.system", "builtins.eval", "builtins.exec"])
def test_malicious_checkpoint_is_refused_and_runs_nothing(tmp_path: Path, kind: str) -> None:
    marker = tmp_path / "pwned"
    code = f"open({str(marker)!r}, 'w').write('x')"
    func, arg = {
        "os.system": (os.system, f"touch {marker}"),
        "builtins.eval": (eval, code),
        "builtins.exec": (exec, code),
    }[kind]
    path = _resave({"model": {}, "cfg": _Payload(func, arg)}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match=r"global '(posix|os|builtins|__builtin__)\.(system|eval|exec)'"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError):
        load_model(path)
    assert not marker.exists()
    # the payload is live: a plain unpickler would have run it
    with zipfile.ZipFile(path) as archive:
        data = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))

    class _Plain(pickle.Unpickler):
        def persistent_load(self, pid):
            return None

    _Plain(io.BytesIO(data)).load()
    assert marker.exists()


def test_unknown_class_is_refused(tmp_path: Path) -> None:
    path = _resave({"model": {}, "x": argparse.ArgumentParser}, tmp_path / "cls.pt")
    with pytest.raises(CheckpointError, match=r"argparse\.ArgumentParser"):
        load_checkpoint(path)


def test_non_zip_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "old.pt"
    path.write_bytes(pickle.dumps({"model": {}}, protocol=2))
    with pytest.raises(CheckpointError, match="not a torch zip checkpoint"):
        load_checkpoint(path)


def test_omegaconf_cfg_is_read_as_plain_data(tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cfg pickled as omegaconf containers (classes faked here: omegaconf is not installed)."""
    fake = {}
    monkeypatch.setitem(sys.modules, "omegaconf", types.ModuleType("omegaconf"))
    for module, names in {
        "omegaconf.dictconfig": ["DictConfig"],
        "omegaconf.listconfig": ["ListConfig"],
        "omegaconf.nodes": ["AnyNode"],
        "omegaconf.base": ["ContainerMetadata", "Metadata"],
    }.items():
        mod = types.ModuleType(module)
        for name in names:
            setattr(mod, name, type(name, (), {"__module__": module}))
            fake[name] = getattr(mod, name)
        monkeypatch.setitem(sys.modules, module, mod)

    def make(name: str, **state):
        obj = fake[name]()
        obj.__dict__.update(state)
        return obj

    def to_omegaconf(value, parent=None):
        if isinstance(value, dict | list):
            meta = make("ContainerMetadata", ref_type=typing.Any, key_type=str, element_type=typing.Any)
            node = make("DictConfig" if isinstance(value, dict) else "ListConfig", _metadata=meta, _parent=parent)
            items = value.items() if isinstance(value, dict) else enumerate(value)
            content = {k: to_omegaconf(v, node) for k, v in items}
            node._content = content if isinstance(value, dict) else list(content.values())
            return node
        return make("AnyNode", _val=value, _parent=parent, _metadata=make("Metadata", ref_type=typing.Any))

    state = load_checkpoint(tiny)
    path = _resave(dict(state, cfg=to_omegaconf(state["cfg"])), tmp_path / "omegaconf.pt")
    monkeypatch.undo()
    assert load_checkpoint(path)["cfg"] == state["cfg"]
    assert load_model(path).info["encoder_layers"] == 2


# ---------------------------------------------------------------- keys, dtypes, extra state


def test_missing_unexpected_and_mismatched_keys_are_named(tiny: Path, tmp_path: Path) -> None:
    state = load_checkpoint(tiny)

    def broken(name: str, edit) -> Path:
        model = dict(state["model"])
        edit(model)
        return _resave(dict(state, model=model), tmp_path / f"{name}.pt")

    with pytest.raises(CheckpointError, match=r"missing key: encoder\.w2v_model\.encoder\.layers\.1\.fc1\.bias"):
        load_model(broken("missing", lambda m: m.pop("encoder.w2v_model.encoder.layers.1.fc1.bias")))
    with pytest.raises(CheckpointError, match=r"missing key: .*resnet\.trunk\.layer3\.0\.downsample\.1\.running_var"):
        load_model(
            broken(
                "bn",
                lambda m: m.pop(
                    "encoder.w2v_model.feature_extractor_video.resnet.trunk.layer3.0.downsample.1.running_var"
                ),
            )
        )
    with pytest.raises(CheckpointError, match=r"unexpected key: decoder\.layers\.0\.bogus\.weight"):
        load_model(broken("unexpected", lambda m: m.update({"decoder.layers.0.bogus.weight": torch.zeros(3)})))
    with pytest.raises(CheckpointError, match=r"unexpected key in checkpoint: something\.else"):
        load_model(broken("stray", lambda m: m.update({"something.else": torch.zeros(3)})))
    with pytest.raises(
        CheckpointError, match=r"shape mismatch for decoder\.layers\.1\.fc2\.weight: checkpoint \(5, 5\)"
    ):
        load_model(broken("shaped", lambda m: m.update({"decoder.layers.1.fc2.weight": torch.zeros(5, 5)})))
    with pytest.raises(CheckpointError, match=r"encoder\.pos_conv\.0\.weight_g but lacks its weight_v"):
        load_model(broken("wn", lambda m: m.pop("encoder.w2v_model.encoder.pos_conv.0.weight_v")))


def test_compressed_archive_records_are_read(tiny: Path, tmp_path: Path) -> None:
    """Records are normally memory-mapped; a re-zipped (deflated, unaligned) archive is read instead."""
    path = tmp_path / "deflated.pt"
    with zipfile.ZipFile(tiny) as src, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename.replace(f"{tiny.stem}/", "other_top/"), src.read(info))
    original, deflated = load_checkpoint(tiny), load_checkpoint(path)
    assert original["model"].keys() == deflated["model"].keys()
    for key, value in original["model"].items():
        assert torch.equal(value, deflated["model"][key]), key


def test_device_and_dtype_options(tiny: Path) -> None:
    assert load_model(tiny, device="auto").info["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="only supported on CUDA"):
        load_model(tiny, device="cpu", dtype="fp16")
    with pytest.raises(ValueError, match="dtype must be"):
        load_model(tiny, dtype="int4")
    assert load_model(tiny, dtype="fp32").info["dtype"] == "fp32"


def test_float16_checkpoint_with_optimizer_state_loads(tiny: Path, tmp_path: Path) -> None:
    state = load_checkpoint(tiny)
    half = {k: v.half() if v.is_floating_point() else v for k, v in state["model"].items()}
    rounded = {k: v.float() if v.is_floating_point() else v for k, v in half.items()}
    half_path = _resave(
        dict(state, model=half, last_optimizer_state={"state": {0: {"exp_avg": torch.zeros(3)}}}), tmp_path / "half.pt"
    )
    float_path = _resave(dict(state, model=rounded), tmp_path / "rounded.pt")
    assert load_checkpoint(half_path)["model"]["decoder.embed_tokens.weight"].dtype == torch.float16
    inputs = _inputs()
    a, b = load_model(half_path), load_model(float_path)
    assert next(a.network.parameters()).dtype == torch.float32
    torch.testing.assert_close(a.encode(**inputs), b.encode(**inputs), rtol=0, atol=0)


# ---------------------------------------------------------------- tokenizer availability


def test_missing_tokenizer_is_a_clear_error_but_the_model_loads(tiny: Path, tmp_path: Path) -> None:
    state = load_checkpoint(tiny)
    bare = _resave(dict(state, task_state={"dictionaries": state["task_state"]["dictionaries"]}), tmp_path / "bare.pt")
    model = load_model(bare)
    assert not model.info["has_tokenizer"]
    assert model.encode(**_inputs()).shape == (1, 12, 64)
    with pytest.raises(TokenizerError, match="dict_path"):
        model.generate(**_inputs(audio=False))
    with pytest.raises(TokenizerError, match=r"sentencepiece model file not found: .*nowhere\.model"):
        load_model(bare, spm_path=tmp_path / "nowhere.model", dict_path=tiny.parent / "dict.wrd.txt")
    spm = next(tiny.parent.glob("spm_unigram*.model"))
    with_files = load_model(bare, spm_path=spm, dict_path=tiny.parent / "dict.wrd.txt")
    reference = load_model(tiny)
    video = _inputs(audio=False)
    assert [h.text for h in with_files.generate(**video)[0]] == [h.text for h in reference.generate(**video)[0]]


# ---------------------------------------------------------------- random checkpoints and switches


def test_random_tiny_checkpoint_round_trip(tiny: Path) -> None:
    with zipfile.ZipFile(tiny) as archive:
        assert f"{tiny.stem}/data.pkl" in archive.namelist()
    state = load_checkpoint(tiny)
    assert list(state) == ["args", "cfg", "model", "criterion", "optimizer_history", "task_state", "extra_state"]
    assert "w2v_args" in state["cfg"]["model"]
    assert "encoder.w2v_model.encoder.pos_conv.0.weight_g" in state["model"]
    model = load_model(tiny)
    assert model.info["kind"] == "seq2seq" and model.info["encoder_layers"] == 2
    hyps = model.generate(**_inputs(batch=2, audio=False), beam_size=3)
    assert len(hyps) == 2
    for item in hyps:
        assert len(item) == 3
        assert [h.score for h in item] == sorted((h.score for h in item), reverse=True)
        for h in item:
            assert h.tokens[-1] == 2 and isinstance(h.text, str) and 0.0 <= h.confidence <= 1.0
            assert len(h.token_logprobs) == len(h.tokens)


SWITCHES = {
    "post_ln_add_relu": (
        {"layer_norm_first": False, "modality_fuse": "add", "resnet_relu_type": "relu", "activation_fn": "relu"},
        {"decoder_normalize_before": False, "decoder_learned_pos": True},
    ),
    "sub_encoders_scaled_untied": (
        {"sub_encoder_layers": 1, "conv_pos": 15, "conv_pos_groups": 8},
        {"no_scale_embedding": False, "share_decoder_input_output_embed": False},
    ),
    "no_positions": ({"activation_fn": "gelu_accurate"}, {"no_token_positional_embeddings": True}),
}


@pytest.mark.parametrize("name", SWITCHES)
def test_configuration_switches_are_self_consistent(tmp_path: Path, name: str) -> None:
    encoder_overrides, decoder_overrides = SWITCHES[name]
    path = make_random_checkpoint(
        tmp_path / "m.pt", size="tiny", seed=1, encoder_overrides=encoder_overrides, decoder_overrides=decoder_overrides
    )
    model = load_model(path)
    for key, value in {**encoder_overrides}.items():
        assert getattr(model.config.encoder, key) == value
    for key, value in decoder_overrides.items():
        assert getattr(model.config.decoder, key) == value
    inputs = _inputs(frames=10, batch=2, seed=4)
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[1, 7:] = True
    inputs["video"][1, :, 7:] = 0.0  # the official collater pads with zeros
    inputs["audio"][1, 7:] = 0.0
    gen = {"beam_size": 4, "max_len_a": 0.0, "max_len_b": 8}
    hyps = model.generate(**inputs, padding_mask=mask, **gen)
    slow = model.generate(**inputs, padding_mask=mask, incremental=False, **gen)
    assert [[h.tokens for h in item] for item in hyps] == [[h.tokens for h in item] for item in slow]
    # incremental per-token log-probs == teacher-forced log-probs of the same tokens
    best = hyps[0][0]
    prev = torch.tensor([[2, *best.tokens[:-1]]])
    lprobs = model.decoder_log_probs(prev, video=inputs["video"][:1], audio=inputs["audio"][:1])[0]
    forced = lprobs[torch.arange(len(best.tokens)), torch.tensor(best.tokens)]
    np.testing.assert_allclose(forced.numpy(), best.token_logprobs, atol=1e-4)
    if model.config.encoder.sub_encoder_layers == 0:  # official sub-encoders attend to padded frames
        alone = model.generate(video=inputs["video"][1:, :, :7], audio=inputs["audio"][1:, :7], **gen)[0]
        assert [h.tokens for h in alone] == [h.tokens for h in hyps[1]]


def test_pretrain_random_checkpoint_layers(tmp_path: Path) -> None:
    model = load_model(make_random_checkpoint(tmp_path / "pre.pt", size="tiny", kind="pretrain"))
    assert model.info["kind"] == "pretrain"
    inputs = _inputs(frames=8)
    last = model.extract_features(**inputs, layer=2)
    full = model.extract_features(**inputs)
    norm = model.network.encoder.transformer.layer_norm
    with torch.inference_mode():
        torch.testing.assert_close(norm(last), full)
    assert not torch.allclose(model.extract_features(**inputs, layer=1), last)
    with pytest.raises(ValueError, match=r"layer must be in 1\.\.2"):
        model.extract_features(**inputs, layer=3)


def test_config_defaults_and_old_style_args() -> None:
    cfg = config_from_checkpoint(
        {
            "cfg": {
                "model": {
                    "_name": "av_hubert_seq2seq",
                    "w2v_args": {"model": {"_name": "av_hubert", "audio_feat_dim": 104}, "task": {}},
                },
                "task": {},
            }
        }
    )
    assert (cfg.encoder.encoder_layers, cfg.encoder.encoder_embed_dim, cfg.encoder.layer_norm_first) == (12, 768, False)
    assert (cfg.decoder.decoder_layers, cfg.decoder.decoder_attention_heads, cfg.decoder.no_scale_embedding) == (
        6,
        4,
        True,
    )
    assert (cfg.task.normalize, cfg.task.stack_order_audio, cfg.task.image_mean) == (False, 1, 0.421)
    args = argparse.Namespace(
        arch="av_hubert_seq2seq",
        decoder_layers=3,
        normalize=True,
        w2v_args=argparse.Namespace(arch="av_hubert", encoder_layers=4, audio_feat_dim=104),
    )
    old = config_from_checkpoint({"args": args, "cfg": None})
    assert (old.kind, old.decoder.decoder_layers, old.encoder.encoder_layers, old.task.normalize) == (
        "seq2seq",
        3,
        4,
        True,
    )
    with pytest.raises(CheckpointError, match="unsupported model 'av_hubert_ctc'"):
        config_from_checkpoint({"cfg": {"model": {"_name": "av_hubert_ctc"}, "task": {}}})


def test_random_seq2seq_checkpoint_has_official_pretraining_keys(tiny: Path) -> None:
    """The official fine-tuned model keeps ``label_embs_concat`` [len(km dict), final_dim] (its
    strict load fails without it); our importer ignores it and ``mask_emb``, as training-only."""
    state = torch.load(tiny, map_location="cpu", weights_only=False)
    km = state["task_state"]["dictionaries"][0]["symbols"]
    final_dim = state["cfg"]["model"]["w2v_args"]["model"]["final_dim"]
    assert tuple(state["model"]["encoder.w2v_model.label_embs_concat"].shape) == (len(km), final_dim)
    assert "encoder.w2v_model.mask_emb" in state["model"]
    model = load_model(tiny)
    assert not any("label_embs" in k or "mask_emb" in k for k in model.network.state_dict())
    # a decoder key of that name is not training-only: still refused
    state["model"]["decoder.label_embs_concat"] = torch.zeros(2)
    with pytest.raises(CheckpointError, match=r"unexpected key: decoder\.label_embs_concat"):
        load_model(_resave(state, tiny.parent / "bad.pt"))
