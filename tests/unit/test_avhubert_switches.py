"""Configuration switches of the official AV-HuBERT code (av_hubert 258fb50 on fairseq afc77bd) as
gpu_worker.avhubert honours them: structure the official model would build for a switch, the
arithmetic it implies, clear errors for values the official code rejects, and the generator /
collater switches (``no_repeat_ngram_size``, ``match_source_len``, ``prefix_size``, ``pad_audio``,
``max_sample_size``)."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from gpu_worker.avhubert import CheckpointError, collate, load_checkpoint, load_model
from gpu_worker.avhubert.model import activation_fn
from gpu_worker.avhubert.random_checkpoint import make_random_checkpoint
from gpu_worker.avhubert.search import _block_repeated_ngrams


@pytest.fixture(autouse=True)
def _one_thread(single_torch_thread):
    """Every test here runs with one torch thread (see tests/conftest.py)."""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_random_checkpoint(tmp_path_factory.mktemp("sw") / "tiny.pt", size="tiny", seed=5)


def _video(frames: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 1, frames, 88, 88, generator=torch.Generator().manual_seed(seed))


def _patched(src: Path, dst: Path, edit) -> Path:
    """Re-save ``src`` with ``edit(cfg)`` applied, as if the switch had been set at training time."""
    state = torch.load(src, weights_only=False)
    edit(state["cfg"])
    torch.save(state, dst, pickle_protocol=2)
    return dst


# ---------------------------------------------------------------- activations


def test_gelu_accurate_is_fairseqs_formula_bit_for_bit() -> None:
    x = torch.randn(20000, generator=torch.Generator().manual_seed(0)) * 3
    a = math.sqrt(2 / math.pi)
    expected = 0.5 * x * (1 + torch.tanh(a * (x + 0.044715 * torch.pow(x, 3))))
    assert torch.equal(activation_fn("gelu_accurate")(x), expected)
    assert torch.equal(activation_fn("gelu_fast")(x), expected)  # deprecated alias
    assert torch.equal(activation_fn("gelu")(x), torch.nn.functional.gelu(x))


@pytest.mark.parametrize(
    ("where", "key", "value"),
    [
        ("encoder", "activation_fn", "swish"),
        ("encoder", "resnet_relu_type", "swish"),
        ("encoder", "modality_fuse", "mul"),
        ("encoder", "audio_feat_dim", -1),
        ("decoder", "decoder_embed_dim", 32),
    ],
)
def test_unsupported_switch_values_are_refused_naming_the_switch(
    tiny: Path, tmp_path: Path, where: str, key: str, value
) -> None:
    def edit(cfg: dict) -> None:
        target = cfg["model"]["w2v_args"]["model"] if where == "encoder" else cfg["model"]
        target[key] = value

    path = _patched(tiny, tmp_path / "bad.pt", edit)
    with pytest.raises(CheckpointError, match=key):
        load_model(path)


# ---------------------------------------------------------------- structure per switch


def test_official_parameter_names_and_shapes_for_switches(tmp_path: Path) -> None:
    """Names and shapes the official modules have for: learned decoder positions
    (PositionalEmbedding: max_target_positions + padding_idx + 1 rows), untied output embedding
    (embed_out), post-norm decoder (no final decoder LayerNorm), additive fusion (no
    post_extract_proj, fusion LayerNorm of D), per-modality sub-encoders (full wav2vec2
    TransformerEncoders incl. positional conv and LayerNorm) and an even positional-conv kernel."""
    path = make_random_checkpoint(
        tmp_path / "m.pt", size="tiny", seed=2,
        encoder_overrides={"modality_fuse": "add", "sub_encoder_layers": 1, "conv_pos": 16, "conv_pos_groups": 4,
                           "layer_norm_first": False},
        decoder_overrides={"decoder_learned_pos": True, "max_target_positions": 40,
                           "share_decoder_input_output_embed": False, "decoder_normalize_before": False},
    )
    state = load_checkpoint(path)["model"]
    d, vocab = 64, state["decoder.embed_tokens.weight"].shape[0]
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    assert shapes["decoder.embed_positions.weight"] == (40 + 1 + 1, d)
    assert shapes["decoder.embed_out"] == (vocab, d)
    assert not any(k.startswith("decoder.layer_norm.") for k in shapes)
    assert "decoder.embed_positions._float_tensor" not in shapes
    assert shapes["encoder.w2v_model.layer_norm.weight"] == (d,)
    assert not any("post_extract_proj" in k for k in shapes)
    for mod in ("audio", "video"):
        sub = f"encoder.w2v_model.feature_extractor_{mod}.encoder."
        assert shapes[sub + "pos_conv.0.weight_g"] == (1, 1, 16)
        assert shapes[sub + "pos_conv.0.weight_v"] == (d, d // 4, 16)
        assert shapes[sub + "layer_norm.weight"] == (d,)
        assert shapes[sub + "layers.0.fc1.weight"] == (128, d)
        assert sub + "layers.1.fc1.weight" not in shapes
    model = load_model(path)
    assert model.network.decoder.max_positions() == 40
    inputs = {"video": _video(9), "audio": torch.randn(1, 9, 104)}
    assert tuple(model.encode(**inputs).shape) == (1, 9, d)  # even kernel: SamePad trims one step
    hyps = model.generate(**inputs, beam_size=2, max_len_a=0.0, max_len_b=100)
    assert max(len(h.tokens) for h in hyps[0]) <= 40  # cap = max_decoder_positions - 1 (+ </s>)


def test_learned_positions_start_after_padding_idx(tiny: Path, tmp_path: Path) -> None:
    """fairseq ``make_positions``: the first real token gets position padding_idx + 1; <pad> tokens
    get padding_idx (row padding_idx of the learned table)."""
    path = make_random_checkpoint(tmp_path / "l.pt", size="tiny", seed=4,
                                  decoder_overrides={"decoder_learned_pos": True})
    decoder = load_model(path).network.decoder
    with torch.no_grad():
        decoder.learned_pos.weight.copy_(torch.arange(decoder.learned_pos.num_embeddings)[:, None].float())
    tokens = torch.tensor([[2, 7, 9, 1, 1]])
    assert decoder._positions(tokens, incremental=False)[0, :, 0].tolist() == [2, 3, 4, 1, 1]
    assert decoder._positions(tokens[:, :3], incremental=True)[0, :, 0].tolist() == [4]


# ---------------------------------------------------------------- generation switches


def _fairseq_no_repeat_ngram(tokens: torch.Tensor, lprobs: torch.Tensor, step: int, n: int) -> torch.Tensor:
    """Literal port of fairseq ``NGramRepeatBlock._no_repeat_ngram`` (whole token buffer, pads
    included)."""
    gen_ngrams: list[dict[str, list[int]]] = [{} for _ in range(tokens.size(0))]
    for b, gen_tokens in enumerate(tokens.tolist()):
        for ngram in zip(*[gen_tokens[i:] for i in range(n)], strict=False):
            key = ",".join(str(x) for x in ngram[:-1])
            gen_ngrams[b][key] = [*gen_ngrams[b].get(key, []), ngram[-1]]
    lprobs = lprobs.clone()
    for b in range(tokens.size(0)):
        banned = []
        if step + 2 - n >= 0:
            key = ",".join(str(x) for x in tokens[b, step + 2 - n : step + 1].tolist())
            banned = gen_ngrams[b].get(key, [])
        lprobs[b][torch.tensor(banned, dtype=torch.int64)] = -math.inf
    return lprobs


@pytest.mark.parametrize("n", [1, 2, 3])
def test_ngram_blocking_matches_fairseq(n: int) -> None:
    g = torch.Generator().manual_seed(n)
    pad, eos, vocab = 1, 2, 6
    for step in range(7):
        tokens = torch.full((4, 10), pad)
        tokens[:, 0] = eos
        tokens[:, 1 : step + 1] = torch.randint(3, vocab, (4, step), generator=g)
        lprobs = torch.randn(4, vocab, generator=g)
        lprobs[:, pad] = -math.inf
        ours = lprobs.clone()
        _block_repeated_ngrams(tokens, ours, step, n)
        assert torch.equal(ours, _fairseq_no_repeat_ngram(tokens, lprobs, step, n))


def test_no_repeat_ngram_size_in_generation(tiny: Path) -> None:
    model = load_model(tiny)
    gen = {"video": _video(12, seed=1), "beam_size": 3, "max_len_a": 0.0, "max_len_b": 12}
    plain = model.generate(**gen)[0]

    def bigrams(tokens: list[int]) -> list[tuple[int, int]]:
        seq = [2, *tokens[:-1]]
        return list(itertools.pairwise(seq))

    assert any(len(set(bigrams(h.tokens))) < len(bigrams(h.tokens)) for h in plain)  # random models repeat
    blocked = model.generate(**gen, no_repeat_ngram_size=2)[0]
    for h in blocked:
        assert len(set(bigrams(h.tokens))) == len(bigrams(h.tokens))


def test_match_source_len(tiny: Path) -> None:
    """LengthConstrainedBeamSearch(1, 0, 1, 0): </s> blocked before the item's frame count, the
    batch cap is the longest item's count, hypotheses ending later score -inf."""
    model = load_model(tiny)
    # max_len_a / max_len_b are unused then (a cap of 0 from them is no error)
    alone = model.generate(video=_video(6), beam_size=3, match_source_len=True, max_len_a=0.0, max_len_b=0)[0]
    assert all(len(h.tokens) == 6 + 1 and math.isfinite(h.score) for h in alone)
    video = _video(9, batch=2, seed=3)
    video[1, :, 5:] = 0.0
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[1, 5:] = True
    hyps = model.generate(video=video, padding_mask=mask, beam_size=3, match_source_len=True)
    assert all(len(h.tokens) == 9 + 1 for h in hyps[0])
    assert all(len(h.tokens) >= 5 + 1 for h in hyps[1])
    assert all(math.isfinite(h.score) == (len(h.tokens) == 5 + 1) for h in hyps[1])
    assert any(math.isfinite(h.score) for h in hyps[1])


def test_prefix_tokens_are_forced(tiny: Path) -> None:
    model = load_model(tiny)
    prefix = torch.tensor([[40, 41, 42], [50, 1, 1]])  # <pad> (1) = unconstrained, as target padding
    hyps = model.generate(video=_video(8, batch=2, seed=2), beam_size=3, prefix_tokens=prefix,
                          max_len_a=0.0, max_len_b=8)
    assert all(h.tokens[:3] == [40, 41, 42] for h in hyps[0])
    assert all(h.tokens[0] == 50 for h in hyps[1])
    with pytest.raises(ValueError, match="temperature"):
        model.generate(video=_video(4), temperature=0.0)
    with pytest.raises(ValueError, match="no_repeat_ngram_size=1"):
        model.generate(video=_video(4), no_repeat_ngram_size=1)


# ---------------------------------------------------------------- task switches


def test_collate_honours_pad_audio_and_max_sample_size() -> None:
    videos = [np.full((n, 88, 88), i, np.float32) for i, n in enumerate((7, 4, 5))]
    audios = [np.full((n, 104), i, np.float32) for i, n in enumerate((7, 4, 5))]
    padded = collate(videos, audios)
    assert padded.video.shape[2] == 7 and padded.lengths == [7, 4, 5]
    cropped = collate(videos, audios, pad_audio=False)  # official collater: crop to the shortest
    assert cropped.video.shape[2] == 4 and cropped.audio.shape[1] == 4 and cropped.lengths == [4, 4, 4]
    assert not cropped.padding_mask.any()
    capped = collate(videos, audios, pad_audio=True, max_sample_size=6)
    assert capped.video.shape[2] == 6 and capped.lengths == [6, 4, 5]
    assert capped.padding_mask.sum(1).tolist() == [0, 2, 1]


def test_task_switches_are_read(tiny: Path, tmp_path: Path) -> None:
    def edit(cfg: dict) -> None:
        cfg["task"].update(pad_audio=False, max_sample_size=300, image_mean=0.5, image_std=0.2,
                           image_crop_size=80, normalize=False, stack_order_audio=2)

    info = load_model(_patched(tiny, tmp_path / "t.pt", edit)).info
    assert (info["pad_audio"], info["max_sample_size"], info["image_crop_size"]) == (False, 300, 80)
    assert (info["image_mean"], info["image_std"], info["normalize"], info["stack_order_audio"]) == (
        0.5, 0.2, False, 2,
    )
