"""Model and task configuration read from a fairseq checkpoint's ``cfg`` (or old-style ``args``).

fairseq stores only the keys that were written in the yaml / on the command line; the AV-HuBERT
dataclass defaults (``AVHubertConfig``, ``AVHubertSeq2SeqConfig``, ``AVHubertPretrainingConfig``)
are never written, so the dataclasses below carry them and :func:`config_from_checkpoint` overlays
the stored values. Only the switches that change inference arithmetic are kept.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from .checkpoint import CheckpointError

ACTIVATIONS = ("relu", "gelu", "gelu_fast", "gelu_accurate", "tanh", "linear")
"""fairseq ``utils.get_available_activation_fns()`` at the pinned commit: the choices of
``AVHubertConfig.activation_fn`` (``gelu_fast`` is the deprecated alias of ``gelu_accurate``)."""
RESNET_RELU_TYPES = ("prelu", "relu")  # resnet.BasicBlock asserts relu_type in ['relu', 'prelu']
MODALITY_FUSIONS = ("concat", "add")  # AVHubertModel.__init__ sets self.embed for these only


@dataclass
class EncoderConfig:
    """``AVHubertConfig`` subset: front ends, fusion and the wav2vec2 Transformer encoder."""

    encoder_layers: int = 12
    encoder_embed_dim: int = 768
    encoder_ffn_embed_dim: int = 3072
    encoder_attention_heads: int = 12
    activation_fn: str = "gelu"
    layer_norm_first: bool = False
    conv_pos: int = 128
    conv_pos_groups: int = 16
    resnet_relu_type: str = "prelu"
    sub_encoder_layers: int = 0
    audio_feat_dim: int = -1
    modality_fuse: str = "concat"
    final_dim: int = 0
    masking_type: str = "input"
    # Read by the official code but without effect on inference (listed so that the table of
    # switches is complete): dropout*, encoder_layerdrop, feature_grad_mult, masking switches,
    # final_dim / untie_final_proj / target_glu / logit_temp (pretraining head), label_rate,
    # resnet_weights (ResEncoder would load a file at build time; the checkpoint's weights
    # overwrite it anyway).


@dataclass
class DecoderConfig:
    """``AVHubertSeq2SeqConfig`` decoder subset (fairseq TransformerDecoder semantics)."""

    decoder_embed_dim: int = 768
    decoder_ffn_embed_dim: int = 3072
    decoder_layers: int = 6
    decoder_attention_heads: int = 4
    decoder_learned_pos: bool = False
    decoder_normalize_before: bool = False
    no_token_positional_embeddings: bool = False
    max_target_positions: int = 2048
    share_decoder_input_output_embed: bool = False
    no_scale_embedding: bool = True


@dataclass
class TaskConfig:
    """``AVHubertPretrainingConfig`` subset that defines the model inputs."""

    normalize: bool = False
    stack_order_audio: int = 1
    pad_audio: bool = False
    max_sample_size: int | None = None
    image_crop_size: int = 88
    image_mean: float = 0.421
    image_std: float = 0.165
    modalities: list[str] = field(default_factory=lambda: ["audio", "video"])


@dataclass
class ModelConfig:
    """Everything needed to build the model: ``kind`` is ``seq2seq`` or ``pretrain``."""

    kind: Literal["seq2seq", "pretrain"]
    encoder: EncoderConfig
    task: TaskConfig
    decoder: DecoderConfig | None = None


_SEQ2SEQ_NAMES = {"av_hubert_seq2seq"}
_PRETRAIN_NAMES = {"av_hubert"}


def _as_dict(obj: Any) -> dict[str, Any]:
    if obj is None:
        return {}
    if isinstance(obj, argparse.Namespace):
        return vars(obj)
    if isinstance(obj, dict):
        return obj
    raise CheckpointError(f"unsupported config container {type(obj).__name__}")


def _fill(cls: type, values: dict[str, Any]) -> Any:
    """Dataclass ``cls`` with the stored ``values`` (unknown keys and ``None`` values ignored)."""
    kwargs = {}
    for f in dataclasses.fields(cls):
        value = values.get(f.name)
        if value is None:
            continue
        kwargs[f.name] = list(value) if isinstance(value, tuple | list) else value
    return cls(**kwargs)


def _split_cfg(state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model cfg, task cfg) as dicts, from ``cfg`` or from old argparse ``args``."""
    cfg = state.get("cfg")
    if cfg is not None:
        cfg = _as_dict(cfg)
        return _as_dict(cfg.get("model")), _as_dict(cfg.get("task"))
    args = _as_dict(state.get("args"))
    if not args:
        raise CheckpointError("checkpoint has neither 'cfg' nor 'args'")
    model = dict(args)
    model.setdefault("_name", args.get("arch"))
    return model, args


def _choice(section: str, name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise CheckpointError(
            f"unsupported {section} switch {name}={value!r}: the official code accepts {list(choices)}"
        )


def validate(config: ModelConfig) -> ModelConfig:
    """Refuse switch values that the official code rejects or that this implementation does not
    reproduce, with a :class:`CheckpointError` naming the switch (never a silent fallback)."""
    enc, dec = config.encoder, config.decoder
    _choice("encoder", "activation_fn", enc.activation_fn, ACTIVATIONS)
    _choice("encoder", "resnet_relu_type", enc.resnet_relu_type, RESNET_RELU_TYPES)
    _choice("encoder", "modality_fuse", enc.modality_fuse, MODALITY_FUSIONS)
    checks = [
        (enc.audio_feat_dim > 0, f"audio_feat_dim={enc.audio_feat_dim} (must be positive)"),
        (enc.encoder_layers >= 0, f"encoder_layers={enc.encoder_layers}"),
        (enc.sub_encoder_layers >= 0, f"sub_encoder_layers={enc.sub_encoder_layers}"),
        (enc.conv_pos >= 1, f"conv_pos={enc.conv_pos}"),
        (
            enc.encoder_attention_heads > 0 and enc.encoder_embed_dim % enc.encoder_attention_heads == 0,
            f"encoder_embed_dim={enc.encoder_embed_dim} not divisible by "
            f"encoder_attention_heads={enc.encoder_attention_heads}",
        ),
        (
            enc.conv_pos_groups > 0 and enc.encoder_embed_dim % enc.conv_pos_groups == 0,
            f"encoder_embed_dim={enc.encoder_embed_dim} not divisible by conv_pos_groups={enc.conv_pos_groups}",
        ),
    ]
    if dec is not None:
        checks += [
            (
                dec.decoder_attention_heads > 0 and dec.decoder_embed_dim % dec.decoder_attention_heads == 0,
                f"decoder_embed_dim={dec.decoder_embed_dim} not divisible by "
                f"decoder_attention_heads={dec.decoder_attention_heads}",
            ),
            # HubertEncoderWrapper has no projection and the decoder's encoder_attn takes
            # kdim = vdim = decoder_embed_dim (AVHubertSeq2SeqConfig has no encoder_embed_dim),
            # so the official model cannot run with different sizes either.
            (
                dec.decoder_embed_dim == enc.encoder_embed_dim,
                f"decoder_embed_dim={dec.decoder_embed_dim} != encoder_embed_dim={enc.encoder_embed_dim}",
            ),
            (dec.max_target_positions >= 1, f"max_target_positions={dec.max_target_positions}"),
        ]
    for ok, what in checks:
        if not ok:
            raise CheckpointError(f"unsupported configuration switch: {what}")
    return config


def config_from_checkpoint(state: dict[str, Any]) -> ModelConfig:
    """Build a :class:`ModelConfig` from a loaded checkpoint dict, applying the official defaults;
    unsupported switch values are a :class:`CheckpointError` naming the switch (:func:`validate`)."""
    return validate(_config_from_checkpoint(state))


def _config_from_checkpoint(state: dict[str, Any]) -> ModelConfig:
    model_cfg, task_cfg = _split_cfg(state)
    name = model_cfg.get("_name")
    task = _fill(TaskConfig, task_cfg)
    if name in _SEQ2SEQ_NAMES:
        w2v_args = model_cfg.get("w2v_args")
        if w2v_args is None:
            raise CheckpointError(
                "fine-tuned checkpoint lacks cfg['model']['w2v_args'] (the pretraining config); "
                "re-save it with av_hubert's misc/fix_state.py"
            )
        pre_model, _ = _split_cfg({"cfg": w2v_args} if isinstance(w2v_args, dict) else {"args": w2v_args})
        return ModelConfig("seq2seq", _fill(EncoderConfig, pre_model), task, _fill(DecoderConfig, model_cfg))
    if name in _PRETRAIN_NAMES:
        return ModelConfig("pretrain", _fill(EncoderConfig, model_cfg), task)
    raise CheckpointError(
        f"unsupported model '{name}': expected one of {sorted(_SEQ2SEQ_NAMES | _PRETRAIN_NAMES)}"
    )
