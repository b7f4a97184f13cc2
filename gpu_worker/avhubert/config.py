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


def config_from_checkpoint(state: dict[str, Any]) -> ModelConfig:
    """Build a :class:`ModelConfig` from a loaded checkpoint dict, applying the official defaults."""
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
