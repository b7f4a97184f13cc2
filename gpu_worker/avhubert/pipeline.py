"""Public inference object: :func:`load_model` -> :class:`AVHubert`."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from .checkpoint import CheckpointError, load_checkpoint
from .config import ModelConfig, config_from_checkpoint
from .importer import load_fairseq_weights
from .model import AVHubertModel, ConvPositionalEmbedding, TransformerDecoder
from .packed import packing_available
from .search import GenerationConfig, RawHypothesis, beam_search, length_caps
from .tokenizer import Tokenizer, TokenizerError, build_tokenizer

ArrayLike = Tensor | np.ndarray
_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
Precision = Literal["fp32", "fp16", "bf16", "int8"]


@dataclass
class Hypothesis:
    """One decoded hypothesis.

    ``tokens``: dictionary ids ending with ``</s>``; ``score``: official hypothesis score (sum of
    ``token_logprobs``, divided by ``len(tokens) ** len_penalty`` when ``normalize_scores``, the
    default); ``token_logprobs``: natural-log
    probability of each token given the prefix (``</s>`` included); ``confidence``:
    ``exp(mean(token_logprobs))``, the geometric-mean token probability, in [0, 1]; ``text``: the
    detokenised string as ``infer_s2s.py`` prints it.
    """

    tokens: list[int]
    score: float
    token_logprobs: list[float]
    confidence: float
    text: str


class AVHubert:
    """A loaded AV-HuBERT checkpoint (fine-tuned seq2seq or pretraining).

    Inputs: ``video`` ``float32 [B, 1, T, 88, 88]`` normalised as the official dataset does,
    ``audio`` ``float32 [B, T, F]`` (F = 104 stacked filterbanks, layer-normed per frame when
    ``info['normalize']``), ``padding_mask`` ``bool [B, T]`` (True = padded frame). Either modality
    may be omitted (replaced by zeros after its front end, as the official model does). See
    :mod:`.inputs` for building them. All methods run under ``torch.inference_mode``.
    """

    def __init__(
        self,
        network: AVHubertModel,
        config: ModelConfig,
        tokenizer: Tokenizer | None,
        tokenizer_error: TokenizerError | None,
        checkpoint: Path,
        device: torch.device,
        dtype: torch.dtype | None,
        precision: str,
        num_parameters: int,
    ) -> None:
        self.network = network
        self.num_parameters = num_parameters  # as loaded: the inference rewrites fuse, view and pack weights
        self.config = config
        self.tokenizer = tokenizer
        self._tokenizer_error = tokenizer_error
        self.checkpoint = checkpoint
        self.device = device
        self.dtype = dtype  # CUDA autocast dtype (None: no autocast)
        self.precision = precision
        # what the network computes in: bf16 on CPU runs bf16 weights natively
        self._input_dtype = torch.bfloat16 if precision == "bf16" and device.type != "cuda" else torch.float32

    # ------------------------------------------------------------------ metadata
    @property
    def pads_batches(self) -> bool:
        """Whether `generate` encodes a batch padded to its longest item (a GPU: one launch), or each item
        at its own length, the padded frames never computed (CPU: `AVHubertEncoder.forward_items`)."""
        return self.device.type != "cpu"

    @property
    def info(self) -> dict[str, Any]:
        """Model metadata for a service (sizes, device, dtype, input normalisation ...)."""
        enc, dec, task = self.config.encoder, self.config.decoder, self.config.task
        return {
            "checkpoint": str(self.checkpoint),
            "kind": self.config.kind,
            "encoder_layers": enc.encoder_layers,
            "encoder_embed_dim": enc.encoder_embed_dim,
            "encoder_ffn_embed_dim": enc.encoder_ffn_embed_dim,
            "encoder_attention_heads": enc.encoder_attention_heads,
            "decoder_layers": dec.decoder_layers if dec else 0,
            "decoder_embed_dim": dec.decoder_embed_dim if dec else None,
            "vocab_size": self.network.decoder.embed_tokens.num_embeddings if self.network.decoder else None,
            "modality_fuse": enc.modality_fuse,
            "audio_feat_dim": enc.audio_feat_dim,
            "num_parameters": self.num_parameters,
            "device": str(self.device),
            "dtype": self.precision,
            "has_tokenizer": self.tokenizer is not None,
            "trained_modalities": list(task.modalities),
            "normalize": task.normalize,
            "stack_order_audio": task.stack_order_audio,
            "pad_audio": task.pad_audio,
            "max_sample_size": task.max_sample_size,
            "image_mean": task.image_mean,
            "image_std": task.image_std,
            "image_crop_size": task.image_crop_size,
        }

    # ------------------------------------------------------------------ helpers
    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """CUDA autocast context for the configured ``dtype`` (no-op for fp32)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type="cuda", dtype=self.dtype)

    def _prepare(
        self, video: ArrayLike | None, audio: ArrayLike | None, padding_mask: ArrayLike | None
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        def to_device(x: ArrayLike | None, dtype: torch.dtype) -> Tensor | None:
            if x is None:
                return None
            x = torch.from_numpy(np.asarray(x)) if not isinstance(x, Tensor) else x
            return x.to(self.device, dtype)

        video, audio = to_device(video, self._input_dtype), to_device(audio, self._input_dtype)
        padding_mask = to_device(padding_mask, torch.bool)
        if video is None and audio is None:
            raise ValueError("give video and/or audio")
        if video is not None and (video.dim() != 5 or video.size(1) != 1):
            raise ValueError(f"video must be [B, 1, T, H, W], got {tuple(video.shape)}")
        feat_dim = self.config.encoder.audio_feat_dim
        if audio is not None and (audio.dim() != 3 or audio.size(-1) != feat_dim):
            raise ValueError(f"audio must be [B, T, {feat_dim}], got {tuple(audio.shape)}")
        if video is not None and audio is not None and (
            video.size(0) != audio.size(0) or video.size(2) != audio.size(1)
        ):
            raise ValueError(f"video {tuple(video.shape)} and audio {tuple(audio.shape)} disagree on B or T")
        bsz, frames = _batch_shape(video, audio)
        if padding_mask is not None and tuple(padding_mask.shape) != (bsz, frames):
            raise ValueError(f"padding_mask must be [{bsz}, {frames}], got {tuple(padding_mask.shape)}")
        return video, audio, padding_mask

    # ------------------------------------------------------------------ public API
    @torch.inference_mode()
    def encode(
        self, video: ArrayLike | None = None, audio: ArrayLike | None = None, padding_mask: ArrayLike | None = None
    ) -> Tensor:
        """Encoder output ``float32 [B, T, D]``, what the decoder attends to (final encoder
        LayerNorm applied for ``layer_norm_first`` models)."""
        video, audio, padding_mask = self._prepare(video, audio, padding_mask)
        with self.autocast():
            out, _ = self.network.encoder(video, audio, padding_mask)
        result: Tensor = out.float()
        return result

    @torch.inference_mode()
    def extract_features(
        self,
        video: ArrayLike | None = None,
        audio: ArrayLike | None = None,
        padding_mask: ArrayLike | None = None,
        layer: int | None = None,
        ret_conv: bool = False,
    ) -> Tensor:
        """Official ``extract_features`` / ``extract_finetune`` output ``float32 [B, T, D]``.

        ``layer`` is 1-based like the official ``output_layer``: the output of that Transformer
        layer, *without* the final encoder LayerNorm; None: all layers + final LayerNorm (for
        ``layer_norm_first`` models). ``ret_conv=True`` returns the Transformer input instead
        (fused front-end features -> LayerNorm -> ``post_extract_proj``; padded frames zeroed).
        """
        video, audio, padding_mask = self._prepare(video, audio, padding_mask)
        encoder = self.network.encoder
        with self.autocast():
            if ret_conv:
                x, mask = encoder.fused_features(video, audio, padding_mask)
                out = x if mask is None else x.masked_fill(mask.unsqueeze(-1), 0.0)
            else:
                if layer is not None and not 1 <= layer <= len(encoder.transformer.layers):
                    raise ValueError(f"layer must be in 1..{len(encoder.transformer.layers)}, got {layer}")
                out, _ = encoder(video, audio, padding_mask, None if layer is None else layer - 1)
        return out.float()

    def _require_decoder(self) -> TransformerDecoder:
        if self.network.decoder is None:
            raise RuntimeError(f"{self.checkpoint} is a pretraining checkpoint: it has no decoder")
        return self.network.decoder

    @torch.inference_mode()
    def decoder_log_probs(
        self,
        prev_output_tokens: ArrayLike,
        video: ArrayLike | None = None,
        audio: ArrayLike | None = None,
        padding_mask: ArrayLike | None = None,
    ) -> Tensor:
        """Teacher-forced ``log_softmax`` of the decoder, ``float32 [B, L, V]`` for
        ``prev_output_tokens`` ``[B, L]`` (``</s>`` first, as the official collater builds them)."""
        decoder = self._require_decoder()
        video, audio, padding_mask = self._prepare(video, audio, padding_mask)
        if not isinstance(prev_output_tokens, Tensor):
            prev_output_tokens = torch.from_numpy(np.asarray(prev_output_tokens))
        tokens = prev_output_tokens.to(self.device, torch.long)
        with self.autocast():
            memory, mask = self.network.encoder(video, audio, padding_mask)
            logits = decoder(tokens, memory, mask)
        return torch.log_softmax(logits.float(), dim=-1)

    @torch.inference_mode()
    def generate(
        self,
        video: ArrayLike | None = None,
        audio: ArrayLike | None = None,
        padding_mask: ArrayLike | None = None,
        beam_size: int = 5,
        prefix_tokens: ArrayLike | None = None,
        on_step: Callable[[], None] | None = None,
        **generation: Any,
    ) -> list[list[Hypothesis]]:
        """Beam search (``beam_size=1``: greedy) for each item; per item a list of hypotheses,
        best first. ``generation`` takes the :class:`~.search.GenerationConfig` fields
        (``max_len_a``, ``max_len_b``, ``min_len``, ``len_penalty``, ``normalize_scores``,
        ``unk_penalty``, ``temperature``, ``no_repeat_ngram_size``, ``match_source_len``,
        ``max_len``, ``max_len_from`` = ``"padded"`` (official default) | ``"item"`` |
        ``"frames"``, ``incremental``). ``prefix_tokens`` ``[B, P]`` forces the first tokens as the
        official ``prefix_size`` does (``target[:, :prefix_size]``, ``<pad>`` = unconstrained).
        ``on_step`` is called before each decoder step, and on CPU before each item is encoded."""
        decoder = self._require_decoder()
        tokenizer = self.tokenizer
        if tokenizer is None:
            raise self._tokenizer_error or TokenizerError("no tokenizer")
        cfg = GenerationConfig(beam_size=beam_size, **generation)
        video, audio, padding_mask = self._prepare(video, audio, padding_mask)
        bsz, frames = _batch_shape(video, audio)
        valid = [frames] * bsz if padding_mask is None else (frames - padding_mask.sum(1)).tolist()
        if cfg.max_len_from == "padded":
            # official quirk: src_len is source['audio'].size(1) of the [B, F, T] batch = F
            src_lens = [audio.size(-1) if audio is not None else frames] * bsz
        elif cfg.max_len_from == "item":
            src_lens = [audio.size(-1)] * bsz if audio is not None else valid
        elif cfg.max_len_from == "frames":
            src_lens = valid
        else:
            raise ValueError(f"max_len_from must be 'padded', 'item' or 'frames', got {cfg.max_len_from!r}")
        if cfg.match_source_len:  # official: max_len = longest item's frame count (padding mask)
            caps = [max(valid)] * bsz if cfg.max_len_from == "padded" else list(valid)
            if cfg.min_len > min(caps):
                raise ValueError(f"min_len {cfg.min_len} cannot be larger than max_len {min(caps)}")
        else:
            caps = length_caps(src_lens, cfg, decoder.max_positions())
        prefix = None
        if prefix_tokens is not None:
            prefix = prefix_tokens if isinstance(prefix_tokens, Tensor) else torch.from_numpy(np.asarray(prefix_tokens))
            prefix = prefix.to(self.device, torch.long)
            if prefix.dim() != 2 or prefix.size(0) != bsz:
                raise ValueError(f"prefix_tokens must be [{bsz}, P], got {tuple(prefix.shape)}")
        d = tokenizer.dictionary
        eos, pad, unk = d.eos_index, d.pad_index, d.unk_index
        with self.autocast():
            if self.pads_batches:
                memory, mask = self.network.encoder(video, audio, padding_mask)
            else:
                memory, mask = self.network.encoder.forward_items(video, audio, padding_mask, before_item=on_step)
            raw = beam_search(decoder, memory, mask, caps, cfg, eos, pad, unk, valid, prefix, on_step)
        return [[self._hypothesis(h, tokenizer) for h in hyps] for hyps in raw]

    @staticmethod
    def _hypothesis(raw: RawHypothesis, tokenizer: Tokenizer) -> Hypothesis:
        mean = sum(raw.positional_scores) / len(raw.positional_scores)
        return Hypothesis(
            tokens=raw.tokens,
            score=raw.score,
            token_logprobs=raw.positional_scores,
            confidence=math.exp(mean) if math.isfinite(mean) else 0.0,
            text=tokenizer.decode(raw.tokens),
        )


def _batch_shape(video: Tensor | None, audio: Tensor | None) -> tuple[int, int]:
    """(B, T) of video ``[B, 1, T, H, W]`` or else audio ``[B, T, F]``."""
    if video is not None:
        return video.size(0), video.size(2)
    if audio is None:
        raise ValueError("give video and/or audio")
    return audio.size(0), audio.size(1)


def _resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles (oneDNN then runs bf16 convolutions on them, faster than fp32)."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private in torch 2.x
    return bool(probe()) if probe is not None else False


def load_model(
    checkpoint: str | Path,
    spm_path: str | Path | None = None,
    dict_path: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: Precision | None = None,
) -> AVHubert:
    """Load an official-format AV-HuBERT checkpoint (``*.pt``) without fairseq.

    ``spm_path`` / ``dict_path`` override the sentencepiece model / target dictionary pickled in the
    checkpoint; a path that does not exist is an error. Without any tokenizer the model still
    loads (``encode``/``extract_features`` work) and ``generate`` raises a :class:`TokenizerError`
    naming the missing file. ``device="auto"`` picks CUDA when available.

    ``dtype`` (default None = ``"fp32"``, the reference precision; on CPU its Linears run on
    weights prepacked by oneDNN, see :mod:`.packed`): on CUDA ``"fp16"``/``"bf16"``
    run the network under autocast (weights stay fp32). On CPU, opt-in reduced precision:
    ``"bf16"`` stores the weights in bfloat16 and computes in it (AVX512-BF16/AMX), except the
    positional convolution, and on a CPU without AMX the ResNet front end, which stay fp32;
    log-probabilities, scores and returned features are float32; ``"int8"`` replaces every
    Linear by a dynamically quantised int8 one (``torch.ao.quantization.quantize_dynamic``,
    per-tensor weights, activations quantised per call; convolutions stay fp32). Both change the
    numbers (see the deviation bounds in ``tests/unit/test_avhubert_speed.py``).
    """
    checkpoint = Path(checkpoint)
    torch_device = _resolve_device(device)
    precision = dtype or "fp32"
    if precision not in ("fp32", "fp16", "bf16", "int8"):
        raise ValueError(f"dtype must be None, 'fp32', 'fp16', 'bf16' or 'int8', got {dtype!r}")
    if precision == "fp16" and torch_device.type != "cuda":
        raise ValueError(f"dtype 'fp16' (autocast) is only supported on CUDA, not {torch_device}")
    if precision == "int8" and torch_device.type != "cpu":
        raise ValueError(f"dtype 'int8' (dynamic quantisation) is only supported on CPU, not {torch_device}")
    state = load_checkpoint(checkpoint)
    config = config_from_checkpoint(state)
    tokenizer: Tokenizer | None = None
    tokenizer_error: TokenizerError | None = None
    vocab_size, padding_idx = 0, 1
    if config.kind == "seq2seq":
        try:
            tokenizer = build_tokenizer(state.get("task_state"), spm_path, dict_path)
        except TokenizerError as exc:
            if spm_path is not None or dict_path is not None:
                raise
            tokenizer_error = exc
        embed = state["model"].get("decoder.embed_tokens.weight")
        if embed is None:
            raise CheckpointError("missing key: decoder.embed_tokens.weight")
        vocab_size = embed.shape[0]
        if tokenizer is not None:
            if len(tokenizer.dictionary) != vocab_size:
                raise TokenizerError(
                    f"dictionary has {len(tokenizer.dictionary)} symbols but the decoder {vocab_size}"
                )
            padding_idx = tokenizer.dictionary.pad_index
    network = AVHubertModel(config.encoder, config.decoder, vocab_size, padding_idx)
    load_fairseq_weights(network, state["model"], seq2seq=config.kind == "seq2seq")
    network.eval().to(torch_device)
    num_parameters = sum(p.numel() for p in network.parameters())
    autocast_dtype = _DTYPES[precision] if torch_device.type == "cuda" and precision in _DTYPES else None
    if precision == "bf16" and torch_device.type == "cpu":
        network.to(torch.bfloat16)
        for module in network.modules():
            # oneDNN's bf16 grouped convolution on AMX is wrong when a group has few channels (6 or
            # 12 in the tiny fixture model: relative error about 1); the positional conv stays fp32
            if isinstance(module, ConvPositionalEmbedding):
                module.float()
        if not cpu_has_amx():
            backbone = network.encoder.video_frontend.backbone
            assert backbone is not None  # the video front end always has its ResNet
            backbone.float()  # without AMX, bf16 convolutions are slower than fp32 ones
    network.prepare_for_inference()
    if precision == "int8":
        network.quantize_linear_int8()
    elif precision == "fp32" and torch_device.type == "cpu" and packing_available():
        network.pack_weights()
    return AVHubert(
        network, config, tokenizer, tokenizer_error, checkpoint, torch_device, autocast_dtype, precision, num_parameters
    )

