"""Random-weight AV-HuBERT checkpoints in the official fairseq format (demos, benchmarks, tests).

:func:`make_random_checkpoint` writes ``<path>`` (torch zip archive, pickle protocol 2, top-level
dict ``args/cfg/model/criterion/optimizer_history/task_state/extra_state``, ``cfg`` a plain nested
dict with ``cfg['model']['w2v_args']`` holding the pretraining config, fairseq parameter names,
positional-conv weight norm as ``weight_g``/``weight_v``) plus a sentencepiece unigram model
``spm_unigram<V>.model`` and the matching fairseq ``dict.wrd.txt`` next to it.

Like the official fine-tuned files, the seq2seq checkpoint carries the pretraining-only
``encoder.w2v_model.mask_emb`` and ``encoder.w2v_model.label_embs_concat`` ``[len(km dict), final_dim]``.

Difference from a fairseq-written file: ``task_state`` carries plain data instead of pickled
fairseq objects, i.e. ``{'dictionaries': [{...}], 'target_dictionary': {'symbols': [...],
'count': [...], 'bos_index': 0, 'pad_index': 1, 'eos_index': 2, 'unk_index': 3, ...},
's2s_tokenizer': {'sp': <serialized sentencepiece model proto>}}``, which :func:`.load_model`
reads like the pickled classes.
"""

from __future__ import annotations

import io
import random
from collections import OrderedDict
from pathlib import Path
from typing import Any, Literal

import sentencepiece
import torch

from .config import DecoderConfig, EncoderConfig
from .importer import to_fairseq_state
from .model import AVHubertModel

Size = Literal["tiny", "base", "large"]

# encoder: conf/pretrain/{base,large}_vox_iter5.yaml; decoder: conf/finetune/{base,large}_*_433h.yaml
SIZES: dict[str, dict[str, dict[str, int]]] = {
    "tiny": {
        "encoder": {"encoder_layers": 2, "encoder_embed_dim": 64, "encoder_ffn_embed_dim": 128,
                    "encoder_attention_heads": 4, "final_dim": 32},
        "decoder": {"decoder_layers": 2, "decoder_embed_dim": 64, "decoder_ffn_embed_dim": 128,
                    "decoder_attention_heads": 4},
    },
    "base": {
        "encoder": {"encoder_layers": 12, "encoder_embed_dim": 768, "encoder_ffn_embed_dim": 3072,
                    "encoder_attention_heads": 12, "final_dim": 256},
        "decoder": {"decoder_layers": 6, "decoder_embed_dim": 768, "decoder_ffn_embed_dim": 3072,
                    "decoder_attention_heads": 4},
    },
    "large": {
        "encoder": {"encoder_layers": 24, "encoder_embed_dim": 1024, "encoder_ffn_embed_dim": 4096,
                    "encoder_attention_heads": 16, "final_dim": 256},
        "decoder": {"decoder_layers": 9, "decoder_embed_dim": 1024, "decoder_ffn_embed_dim": 4096,
                    "decoder_attention_heads": 8},
    },
}

_WORDS = [
    "the", "a", "one", "every", "some", "student", "teacher", "farmer", "child", "violin",
    "garden", "river", "storm", "letter", "window", "remembered", "found", "painted", "carried",
    "opened", "watched", "strange", "quiet", "bright", "heavy", "little", "after", "before",
    "during", "near", "under", "again", "today", "slowly", "early", "later", "music", "morning",
    "evening", "city", "road",
]


def _training_text(seed: int, sentences: int = 3000) -> list[str]:
    """Template sentences plus random pseudo-words, so that a unigram model of ~1000 pieces fits."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    extra = ["".join(rng.choice(letters) for _ in range(rng.randint(3, 9))) for _ in range(1500)]
    return [
        " ".join(rng.choice(_WORDS if rng.random() < 0.6 else extra) for _ in range(rng.randint(4, 12)))
        for _ in range(sentences)
    ]


def train_sentencepiece(vocab_size: int, seed: int = 0) -> bytes:
    """Serialized unigram sentencepiece model with the official ids (bos 0, pad 1, eos 2, unk 3)."""
    writer = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(_training_text(seed)),
        model_writer=writer,
        vocab_size=vocab_size,
        model_type="unigram",
        character_coverage=1.0,
        bos_id=0,
        pad_id=1,
        eos_id=2,
        unk_id=3,
        hard_vocab_limit=False,
        num_threads=1,
        minloglevel=2,
    )
    return writer.getvalue()


def _plain_dictionary(symbols: list[str]) -> dict[str, Any]:
    """The attributes of a pickled fairseq ``Dictionary``, as plain data."""
    return {
        "bos_word": "<s>", "unk_word": "<unk>", "pad_word": "<pad>", "eos_word": "</s>",
        "symbols": symbols, "count": [1] * len(symbols),
        "indices": {s: i for i, s in enumerate(symbols)},
        "bos_index": 0, "pad_index": 1, "eos_index": 2, "unk_index": 3, "nspecial": 4,
    }


def _randomise(model: AVHubertModel, generator: torch.Generator) -> None:
    """Module inits plus non-trivial norms/biases and fairseq-like embedding scales."""
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if not tensor.is_floating_point():
                continue
            if name.endswith("running_var"):
                tensor.uniform_(0.5, 2.0, generator=generator)
            elif name.endswith("running_mean") or name.endswith("bias"):
                tensor.normal_(0.0, 0.05, generator=generator)
            elif name.endswith("embed_tokens.weight") or name.endswith("output_projection"):
                tensor.normal_(0.0, tensor.size(1) ** -0.5, generator=generator)
            elif tensor.dim() >= 2:
                bound = (3.0 / tensor[0].numel()) ** 0.5
                tensor.uniform_(-bound, bound, generator=generator)
        if model.decoder is not None:
            model.decoder.embed_tokens.weight[model.decoder.padding_idx] = 0


def make_random_checkpoint(
    path: str | Path,
    size: Size = "tiny",
    seed: int = 0,
    kind: Literal["seq2seq", "pretrain"] = "seq2seq",
    vocab_size: int | None = None,
    encoder_overrides: dict[str, Any] | None = None,
    decoder_overrides: dict[str, Any] | None = None,
) -> Path:
    """Write a random-weight checkpoint of the official ``size`` and return its path.

    ``vocab_size`` (sentencepiece pieces incl. the 4 specials) defaults to 160 for ``tiny`` and
    1000 otherwise (the released models' unigram size). ``encoder_overrides`` /
    ``decoder_overrides`` change any ``AVHubertConfig`` / ``AVHubertSeq2SeqConfig`` switch (e.g.
    ``{"layer_norm_first": False, "modality_fuse": "add"}``); they are written into ``cfg`` like
    command-line overrides.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    preset = SIZES[size]
    encoder_cfg = {
        "_name": "av_hubert", "label_rate": 25, "modality_fuse": "concat", "masking_type": "input",
        "untie_final_proj": True, "layer_norm_first": True, "audio_feat_dim": 104,
        **preset["encoder"], **(encoder_overrides or {}),
    }
    decoder_cfg = {
        "_name": "av_hubert_seq2seq", "w2v_path": "/checkpoint/pretrain.pt",
        "share_decoder_input_output_embed": True, "decoder_normalize_before": True,
        **preset["decoder"], **(decoder_overrides or {}),
    }
    task_cfg = {
        "_name": "av_hubert_pretraining", "data": "/data", "label_dir": "/data", "normalize": True,
        "labels": ["km"], "stack_order_audio": 4, "max_sample_size": 500, "modalities": ["audio", "video"],
        "image_aug": True, "pad_audio": False, "random_crop": True, "fine_tuning": False,
    }
    pretrain_cfg = {"_name": None, "common": {"seed": seed}, "model": encoder_cfg, "task": task_cfg}

    generator = torch.Generator().manual_seed(seed)
    encoder = EncoderConfig(**{k: v for k, v in encoder_cfg.items() if k in EncoderConfig.__dataclass_fields__})
    km_symbols = ["<s>", "<pad>", "</s>", "<unk>", *(str(i) for i in range(100))]
    task_state: dict[str, Any] = {"dictionaries": [_plain_dictionary(km_symbols)]}
    mask_dim = encoder.audio_feat_dim if encoder.masking_type == "input" else encoder.encoder_embed_dim

    if kind == "seq2seq":
        proto = train_sentencepiece(vocab_size or (160 if size == "tiny" else 1000), seed)
        spm = sentencepiece.SentencePieceProcessor()
        spm.LoadFromSerializedProto(proto)
        symbols = [spm.IdToPiece(i) for i in range(spm.GetPieceSize())]
        symbols[:4] = ["<s>", "<pad>", "</s>", "<unk>"]
        (path.parent / f"spm_unigram{len(symbols)}.model").write_bytes(proto)
        (path.parent / "dict.wrd.txt").write_text("".join(f"{s} 1\n" for s in symbols[4:]), encoding="utf-8")
        decoder = DecoderConfig(
            **{k: v for k, v in decoder_cfg.items() if k in DecoderConfig.__dataclass_fields__}
        )
        network = AVHubertModel(encoder, decoder, len(symbols), padding_idx=1)
        _randomise(network, generator)
        state = to_fairseq_state(network.state_dict(), seq2seq=True)
        state["encoder.w2v_model.mask_emb"] = torch.rand(mask_dim, generator=generator)
        # the pretraining label embeddings the official fine-tuned model keeps (AVHubertModel builds
        # them from the km dictionaries of the nested task; its strict load fails without them;
        # unused at inference, ignored by our importer)
        final_dim = encoder.final_dim if encoder.final_dim > 0 else encoder.encoder_embed_dim
        state["encoder.w2v_model.label_embs_concat"] = torch.rand(len(km_symbols), final_dim, generator=generator)
        if decoder.decoder_learned_pos is False and not decoder.no_token_positional_embeddings:
            state["decoder.embed_positions._float_tensor"] = torch.zeros(1)
        model_cfg = {**decoder_cfg, "w2v_args": pretrain_cfg}
        task = {**task_cfg, "labels": ["wrd"], "is_s2s": True, "fine_tuning": True, "modalities": ["video"],
                "tokenizer_bpe_name": "sentencepiece", "tokenizer_bpe_model": "/data/spm.model",
                "single_target": True, "pad_audio": True, "random_crop": False}
        task_state.update(target_dictionary=_plain_dictionary(symbols), s2s_tokenizer={"sp": proto})
    else:
        network = AVHubertModel(encoder, None, 0, padding_idx=1)
        _randomise(network, generator)
        state = to_fairseq_state(network.state_dict(), seq2seq=False)
        final_dim = encoder.final_dim if encoder.final_dim > 0 else encoder.encoder_embed_dim
        state["mask_emb"] = torch.rand(mask_dim, generator=generator)
        state["label_embs_concat"] = torch.rand(len(km_symbols), final_dim, generator=generator)
        state["final_proj.weight"] = torch.zeros(final_dim, encoder.encoder_embed_dim)
        state["final_proj.bias"] = torch.zeros(final_dim)
        model_cfg, task = encoder_cfg, task_cfg

    checkpoint = {
        "args": None,
        "cfg": {"_name": None, "common": {"seed": seed}, "model": model_cfg, "task": task},
        "model": OrderedDict((k, v.contiguous()) for k, v in state.items()),
        "criterion": None,
        "optimizer_history": [{"criterion_name": "random", "optimizer_name": "none",
                               "lr_scheduler_state": {}, "num_updates": 0}],
        "task_state": task_state,
        "extra_state": {"train_iterator": {"version": 2, "epoch": 1, "iterations_in_epoch": 0, "shuffle": True}},
    }
    torch.save(checkpoint, path, pickle_protocol=2)
    return path
