"""Map fairseq AV-HuBERT parameter names onto :class:`.model.AVHubertModel`.

fairseq names (``encoder.w2v_model.feature_extractor_video.resnet.trunk.layer1.0.conv1.weight``,
``decoder.layers.0.encoder_attn.q_proj.weight`` ...) are rewritten by an ordered list of regex
rules; the positional convolution's weight norm (``weight_g``/``weight_v``, norm over dims 0 and 1)
is folded into a plain weight. Any missing, unexpected or shape-mismatched key is a
:class:`~.checkpoint.CheckpointError` that names it.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor, nn

from .checkpoint import CheckpointError

# keys that only serve pretraining / training (encoder: the AV-HuBERT pretraining head, which the
# official fine-tuned files keep as encoder.w2v_model.*) or are empty buffers (decoder), no role at
# inference; matched on the key without its encoder./decoder. prefix, each on its own side only
_IGNORED_ENCODER = re.compile(r"^(mask_emb|label_embs_concat|final_proj\..*|target_glu\..*)$")
_IGNORED_DECODER = re.compile(r"^embed_positions\._float_tensor$")

# Name fragments (fairseq, ours); "^" anchors a fragment at the start of the key, "$" at its end.
# Both directions are derived from these tables (`_rules`): load = fairseq -> ours, and the
# inverse (`fairseq_name`, `to_fairseq_state`) for error messages and random checkpoints.
_ENCODER_NAMES = [
    ("^feature_extractor_video.resnet.frontend3D.0.", "^video_frontend.backbone.stem_conv."),
    ("^feature_extractor_video.resnet.frontend3D.1.", "^video_frontend.backbone.stem_bn."),
    ("^feature_extractor_video.resnet.frontend3D.2.", "^video_frontend.backbone.stem_act."),
    ("^feature_extractor_audio.proj.", "^audio_frontend.proj."),
    ("^feature_extractor_video.proj.", "^video_frontend.proj."),
    ("^feature_extractor_audio.encoder.", "^audio_frontend.transformer."),
    ("^feature_extractor_video.encoder.", "^video_frontend.transformer."),
    ("^layer_norm.", "^fusion_norm."),
    ("^encoder.", "^transformer."),
]
_DECODER_NAMES = [
    ("^embed_out$", "^output_projection$"),
    ("^embed_positions.weight$", "^learned_pos.weight$"),
]
_LAYER_NAMES = [
    (".pos_conv.0.", ".pos_conv.conv."),
    (".self_attn_layer_norm.", ".self_attention_norm."),
    (".self_attn.", ".self_attention."),
    (".encoder_attn_layer_norm.", ".cross_attention_norm."),
    (".encoder_attn.", ".cross_attention."),
    (".fc1.", ".feed_forward.fc1."),
    (".fc2.", ".feed_forward.fc2."),
    (".final_layer_norm.", ".ffn_norm."),
]


def _rules(names: list[tuple[str, str]], inverse: bool = False) -> list[tuple[str, str]]:
    """Regex substitutions for a name table, fairseq -> ours (or ours -> fairseq)."""
    rules = []
    for fairseq, ours in names:
        source, target = (ours, fairseq) if inverse else (fairseq, ours)
        pattern = re.escape(source.strip("^$"))
        rules.append((("^" if source.startswith("^") else "") + pattern + ("$" if source.endswith("$") else ""),
                      target.strip("^$")))
    return rules


_ENCODER_RULES, _INVERSE_ENCODER_RULES = _rules(_ENCODER_NAMES), _rules(_ENCODER_NAMES, inverse=True)
_DECODER_RULES, _INVERSE_DECODER_RULES = _rules(_DECODER_NAMES), _rules(_DECODER_NAMES, inverse=True)
_LAYER_RULES, _INVERSE_LAYER_RULES = _rules(_LAYER_NAMES), _rules(_LAYER_NAMES, inverse=True)


def _trunk_rule(key: str) -> str:
    """``...resnet.trunk.layerN.`` -> ``...backbone.layers.{N-1}.``."""
    return re.sub(
        r"^feature_extractor_video\.resnet\.trunk\.layer(\d)\.",
        lambda m: f"video_frontend.backbone.layers.{int(m[1]) - 1}.",
        key,
    )


def _apply(key: str, rules: list[tuple[str, str]]) -> str:
    for pattern, repl in rules:
        key = re.sub(pattern, repl, key)
    return key


def rename_fairseq_state(
    state: dict[str, Tensor], seq2seq: bool
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """fairseq state dict -> our names (weight norm folded, training-only keys dropped), plus the
    original checkpoint key of every renamed entry (for error messages)."""
    encoder_prefix = "encoder.w2v_model." if seq2seq else ""
    out: dict[str, Tensor] = {}
    origin: dict[str, str] = {}
    for key, value in state.items():
        if key.startswith(encoder_prefix) and not (seq2seq and key.startswith("decoder.")):
            local, rules, target, ignored = key[len(encoder_prefix):], _ENCODER_RULES, "encoder.", _IGNORED_ENCODER
            local = _trunk_rule(local)
        elif seq2seq and key.startswith("decoder."):
            local, rules, target, ignored = key[len("decoder."):], _DECODER_RULES, "decoder.", _IGNORED_DECODER
        else:
            raise CheckpointError(f"unexpected key in checkpoint: {key}")
        if ignored.match(local):
            continue
        new = target + _apply(_apply(local, rules), _LAYER_RULES)
        out[new], origin[new] = value, key
    for g_key in [k for k in out if k.endswith(".weight_g")]:
        base, v_key = g_key[: -len("_g")], g_key[: -len("_g")] + "_v"
        if v_key not in out:
            raise CheckpointError(f"checkpoint has {origin[g_key]} but lacks its weight_v")
        g, v = out.pop(g_key).float(), out.pop(v_key).float()
        out[base] = v * (g / v.pow(2).sum(dim=(0, 1), keepdim=True).sqrt())  # weight_norm(dim=2)
        origin[base] = origin.pop(g_key)[: -len("_g")] + "_g/_v"
    return out, origin


def load_fairseq_weights(model: nn.Module, state: dict[str, Tensor], seq2seq: bool) -> None:
    """Copy a fairseq state dict into ``model``; float16/bfloat16 tensors are upcast.

    Raises :class:`CheckpointError` naming (with the checkpoint's fairseq names) every missing,
    unexpected or mis-shaped parameter.
    """
    renamed, origin = rename_fairseq_state(state, seq2seq)
    expected = model.state_dict()
    problems = [
        f"missing key: {fairseq_name(k, seq2seq)} (model parameter {k})" for k in sorted(set(expected) - set(renamed))
    ]
    problems += [f"unexpected key: {origin[k]}" for k in sorted(set(renamed) - set(expected))]
    for key in sorted(set(expected) & set(renamed)):
        if tuple(expected[key].shape) != tuple(renamed[key].shape):
            problems.append(
                f"shape mismatch for {origin[key]}: checkpoint {tuple(renamed[key].shape)}, "
                f"model {tuple(expected[key].shape)}"
            )
    if problems:
        raise CheckpointError("checkpoint does not fit the model config:\n  " + "\n  ".join(problems))
    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(renamed[key].to(target.dtype))


def fairseq_name(key: str, seq2seq: bool) -> str:
    """The fairseq name of our parameter ``key`` (the positional conv as ``...pos_conv.0.weight``)."""
    if key.startswith("encoder."):
        local = re.sub(
            r"^video_frontend\.backbone\.layers\.(\d)\.",
            lambda m: f"feature_extractor_video.resnet.trunk.layer{int(m[1]) + 1}.",
            key[len("encoder."):],
        )
        prefix = "encoder.w2v_model." if seq2seq else ""
        return prefix + _apply(_apply(local, _INVERSE_ENCODER_RULES), _INVERSE_LAYER_RULES)
    return "decoder." + _apply(_apply(key[len("decoder."):], _INVERSE_DECODER_RULES), _INVERSE_LAYER_RULES)


def to_fairseq_state(state: dict[str, Tensor], seq2seq: bool) -> dict[str, Tensor]:
    """Inverse of :func:`rename_fairseq_state`: our state dict -> fairseq names, the positional
    convolution split into ``weight_g``/``weight_v`` as ``weight_norm(dim=2)`` stores it."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        name = fairseq_name(key, seq2seq)
        if name.endswith(".pos_conv.0.weight"):
            out[name + "_g"] = value.pow(2).sum(dim=(0, 1), keepdim=True).sqrt()
            out[name + "_v"] = value
        else:
            out[name] = value
    return out
