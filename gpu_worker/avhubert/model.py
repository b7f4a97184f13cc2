"""Pure-PyTorch AV-HuBERT: visual/audio front ends, fusion, wav2vec2 Transformer encoder and the
fairseq Transformer decoder of the fine-tuned seq2seq model.

Layouts (batch first everywhere): video ``[B, 1, T, H, W]``, audio ``[B, T, F]``, features
``[B, T, D]``, ``padding_mask`` ``[B, T]`` bool (True = padded frame). Parameter names are our own;
:mod:`.importer` maps the fairseq names onto them.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ACTIVATIONS, DecoderConfig, EncoderConfig


def _gelu_accurate(x: Tensor) -> Tensor:
    """fairseq ``gelu_accurate`` written out as fairseq computes it (tanh approximation, in the
    input dtype)."""
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def activation_fn(name: str) -> Callable[[Tensor], Tensor]:
    """fairseq ``utils.get_activation_fn`` (``gelu_fast`` is the deprecated alias of
    ``gelu_accurate``)."""
    if name == "relu":
        return F.relu
    if name == "gelu":
        return lambda x: F.gelu(x.float()).type_as(x)
    if name in ("gelu_accurate", "gelu_fast"):
        return _gelu_accurate
    if name == "tanh":
        return torch.tanh
    if name == "linear":
        return lambda x: x
    raise ValueError(f"unsupported activation_fn {name!r}: expected one of {list(ACTIVATIONS)}")


def _relu(kind: str, channels: int) -> nn.Module:
    if kind == "prelu":
        return nn.PReLU(num_parameters=channels)
    if kind == "relu":
        return nn.ReLU()
    raise ValueError(f"unsupported resnet_relu_type {kind!r}: expected 'prelu' or 'relu'")


# --------------------------------------------------------------------------- visual front end


class BasicBlock(nn.Module):
    """ResNet basic block (two 3x3 convs + BN, PReLU/ReLU, optional 1x1 downsample)."""

    def __init__(self, inplanes: int, planes: int, stride: int, relu_type: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = _relu(relu_type, planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = _relu(relu_type, planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: Tensor) -> Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + residual)


class VideoResNet(nn.Module):
    """Official ``ResEncoder``: 3-D conv stem (5x7x7, stride 1x2x2) + BN + act + max-pool, then a
    ResNet-18 trunk applied per frame and global average pooling.

    ``[B, 1, T, H, W]`` -> ``[B, T, 512]``.
    """

    out_dim = 512

    def __init__(self, relu_type: str) -> None:
        super().__init__()
        self.stem_conv = nn.Conv3d(1, 64, (5, 7, 7), (1, 2, 2), (2, 3, 3), bias=False)
        self.stem_bn = nn.BatchNorm3d(64)
        # the official stem uses PReLU only for 'prelu' and ReLU for anything else
        self.stem_act = nn.PReLU(64) if relu_type == "prelu" else nn.ReLU()
        self.stem_pool = nn.MaxPool3d((1, 3, 3), (1, 2, 2), (0, 1, 1))
        planes = [64, 128, 256, 512]
        self.layers = nn.ModuleList()
        inplanes = 64
        for i, p in enumerate(planes):
            stride = 1 if i == 0 else 2
            self.layers.append(
                nn.Sequential(BasicBlock(inplanes, p, stride, relu_type), BasicBlock(p, p, 1, relu_type))
            )
            inplanes = p
        self.layers.to(memory_format=torch.channels_last)  # faster 2-D convs; copy_ keeps the layout

    def forward(self, video: Tensor) -> Tensor:
        b = video.size(0)
        x = self.stem_pool(self.stem_act(self.stem_bn(self.stem_conv(video))))
        t = x.size(2)
        x = x.transpose(1, 2).reshape(b * t, x.size(1), x.size(3), x.size(4))
        x = x.contiguous(memory_format=torch.channels_last)
        for layer in self.layers:
            x = layer(x)
        x = x.mean(dim=(2, 3))
        return x.view(b, t, -1)


class Frontend(nn.Module):
    """Official ``SubModel``: optional backbone, linear projection to D, optional sub-encoder.

    ``[B, ...]`` -> ``[B, T, D]``.
    """

    def __init__(self, backbone: nn.Module | None, input_dim: int, cfg: EncoderConfig) -> None:
        super().__init__()
        self.backbone = backbone
        self.proj = nn.Linear(input_dim, cfg.encoder_embed_dim)
        self.transformer = (
            TransformerEncoder(cfg, cfg.sub_encoder_layers) if cfg.sub_encoder_layers > 0 else None
        )

    def forward(self, x: Tensor) -> Tensor:
        if self.backbone is not None:
            x = self.backbone(x)
        x = self.proj(x)
        if self.transformer is not None:
            x = self.transformer(x)  # the official sub-encoder sees no padding mask
        return x


# --------------------------------------------------------------------------- attention


def _heads(x: Tensor, num_heads: int) -> Tensor:
    """``[N, L, D]`` -> ``[N, H, L, D/H]``."""
    n, length, d = x.shape
    return x.view(n, length, num_heads, d // num_heads).transpose(1, 2)


def _merge(x: Tensor) -> Tensor:
    """``[N, H, L, d]`` -> ``[N, L, H*d]``."""
    n, h, length, d = x.shape
    return x.transpose(1, 2).reshape(n, length, h * d)


class MultiheadAttention(nn.Module):
    """fairseq ``MultiheadAttention`` parameters (separate q/k/v/out projections with bias)."""

    def __init__(self, embed_dim: int, num_heads: int) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)

    def project_kv(self, memory: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values ``[N, H, S, d]`` of ``memory`` ``[N, S, D]``."""
        return _heads(self.k_proj(memory), self.num_heads), _heads(self.v_proj(memory), self.num_heads)

    def attend(self, query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None) -> Tensor:
        """``query`` ``[N, L, D]``, ``key``/``value`` ``[N, H, S, d]``, ``mask`` broadcastable to
        ``[N, H, L, S]`` (bool, True = may attend) -> ``[N, L, D]``."""
        q = _heads(self.q_proj(query), self.num_heads)
        out = F.scaled_dot_product_attention(q, key, value, attn_mask=mask)
        return self.out_proj(_merge(out))

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        """Self-attention over ``x`` ``[B, T, D]`` ignoring padded keys."""
        mask = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]
        return self.attend(x, *self.project_kv(x), mask)


# --------------------------------------------------------------------------- encoder


class ConvPositionalEmbedding(nn.Module):
    """wav2vec2 convolutional relative position embedding (weight norm folded at import):
    grouped Conv1d, drop the last step for even kernels (``SamePad``), exact GELU."""

    def __init__(self, dim: int, kernel: int, groups: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(dim, dim, kernel, padding=kernel // 2, groups=groups)
        self.trim = 1 if kernel % 2 == 0 else 0

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(x.transpose(1, 2))
        if self.trim:
            y = y[:, :, : -self.trim]
        return F.gelu(y).transpose(1, 2)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int, activation: str) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.act = activation_fn(activation)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(nn.Module):
    """fairseq ``TransformerSentenceEncoderLayer`` (pre- or post-LayerNorm)."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        d = cfg.encoder_embed_dim
        self.layer_norm_first = cfg.layer_norm_first
        self.self_attention = MultiheadAttention(d, cfg.encoder_attention_heads)
        self.self_attention_norm = nn.LayerNorm(d)
        self.feed_forward = FeedForward(d, cfg.encoder_ffn_embed_dim, cfg.activation_fn)
        self.ffn_norm = nn.LayerNorm(d)

    def forward(self, x: Tensor, padding_mask: Tensor | None) -> Tensor:
        if self.layer_norm_first:
            x = x + self.self_attention(self.self_attention_norm(x), padding_mask)
            return x + self.feed_forward(self.ffn_norm(x))
        x = self.self_attention_norm(x + self.self_attention(x, padding_mask))
        return self.ffn_norm(x + self.feed_forward(x))


class TransformerEncoder(nn.Module):
    """wav2vec2 ``TransformerEncoder``: ``[B, T, D]`` -> ``[B, T, D]``."""

    def __init__(self, cfg: EncoderConfig, num_layers: int) -> None:
        super().__init__()
        d = cfg.encoder_embed_dim
        self.layer_norm_first = cfg.layer_norm_first
        self.pos_conv = ConvPositionalEmbedding(d, cfg.conv_pos, cfg.conv_pos_groups)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(num_layers))
        self.layer_norm = nn.LayerNorm(d)

    def forward(self, x: Tensor, padding_mask: Tensor | None = None, layer: int | None = None) -> Tensor:
        """``layer`` (0-based) stops after that layer and then skips the final LayerNorm of
        ``layer_norm_first`` models, as the official ``output_layer`` does."""
        if padding_mask is not None:
            x = x.masked_fill(padding_mask.unsqueeze(-1), 0.0)
        x = x + self.pos_conv(x)
        if not self.layer_norm_first:
            x = self.layer_norm(x)
        for i, block in enumerate(self.layers):
            x = block(x, padding_mask)
            if i == layer:
                break
        if self.layer_norm_first and layer is None:
            x = self.layer_norm(x)
        return x


class AVHubertEncoder(nn.Module):
    """AV-HuBERT encoder (``AVHubertModel.extract_finetune`` / ``extract_features``).

    A missing modality is replaced by zeros ``[B, T, D]`` after the present front end, exactly as
    the official ``extract_finetune``; fusion is ``concat`` (audio first) or ``add``.
    """

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        if cfg.audio_feat_dim <= 0:
            raise ValueError(f"audio_feat_dim must be positive, got {cfg.audio_feat_dim}")
        if cfg.modality_fuse not in ("concat", "add"):
            raise ValueError(f"unsupported modality_fuse {cfg.modality_fuse!r}")
        d = cfg.encoder_embed_dim
        self.embed_dim = d
        self.audio_feat_dim = cfg.audio_feat_dim
        self.modality_fuse = cfg.modality_fuse
        self.audio_frontend = Frontend(None, cfg.audio_feat_dim, cfg)
        self.video_frontend = Frontend(VideoResNet(cfg.resnet_relu_type), VideoResNet.out_dim, cfg)
        fused = 2 * d if cfg.modality_fuse == "concat" else d
        self.fusion_norm = nn.LayerNorm(fused)
        self.post_extract_proj = nn.Linear(fused, d) if fused != d else None
        self.transformer = TransformerEncoder(cfg, cfg.encoder_layers)

    def fused_features(
        self, video: Tensor | None, audio: Tensor | None, padding_mask: Tensor | None
    ) -> tuple[Tensor, Tensor | None]:
        """Transformer input ``[B, T, D]`` (fusion LayerNorm + ``post_extract_proj``) and the
        frame-level padding mask."""
        if video is None and audio is None:
            raise ValueError("at least one of video or audio is required")
        feats_video = self.video_frontend(video) if video is not None else None
        feats_audio = self.audio_frontend(audio) if audio is not None else None
        if feats_audio is None:
            feats_audio = feats_video.new_zeros(feats_video.shape[0], feats_video.shape[1], self.embed_dim)
        if feats_video is None:
            feats_video = feats_audio.new_zeros(feats_audio.shape[0], feats_audio.shape[1], self.embed_dim)
        if self.modality_fuse == "concat":
            x = torch.cat([feats_audio, feats_video], dim=-1)
        else:
            x = feats_audio + feats_video
        x = self.fusion_norm(x)
        if padding_mask is not None:
            padding_mask = frame_padding_mask(padding_mask, x.size(1))
        if self.post_extract_proj is not None:
            x = self.post_extract_proj(x)
        return x, padding_mask

    def forward(
        self,
        video: Tensor | None = None,
        audio: Tensor | None = None,
        padding_mask: Tensor | None = None,
        layer: int | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """``video`` ``[B, 1, T, H, W]`` and/or ``audio`` ``[B, T, F]`` -> (``[B, T, D]``, mask).

        ``layer`` is the 0-based index of the last Transformer layer to run (None: all + final LN).
        """
        x, padding_mask = self.fused_features(video, audio, padding_mask)
        return self.transformer(x, padding_mask, layer), padding_mask


def frame_padding_mask(padding_mask: Tensor, frames: int) -> Tensor:
    """Official ``forward_padding_mask``: fold a sample-level mask onto ``frames`` steps."""
    extra = padding_mask.size(1) % frames
    if extra > 0:
        padding_mask = padding_mask[:, :-extra]
    return padding_mask.view(padding_mask.size(0), frames, -1).all(-1)


# --------------------------------------------------------------------------- decoder


def sinusoidal_table(num_positions: int, dim: int, padding_idx: int) -> Tensor:
    """fairseq ``SinusoidalPositionalEmbedding.get_embedding`` (float32, padding row zero)."""
    half = dim // 2
    scale = math.log(10000) / (half - 1)
    freqs = torch.exp(torch.arange(half, dtype=torch.float) * -scale)
    angles = torch.arange(num_positions, dtype=torch.float).unsqueeze(1) * freqs.unsqueeze(0)
    table = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1).view(num_positions, -1)
    if dim % 2 == 1:
        table = torch.cat([table, torch.zeros(num_positions, 1)], dim=1)
    table[padding_idx, :] = 0
    return table


class DecoderCache:
    """Incremental decoding state of :class:`TransformerDecoder`.

    Self-attention keys/values per layer ``[N, H, t, d]`` (one row per hypothesis) and the
    encoder-attention keys/values per layer ``[B, H, S, d]`` (one row per source item, shared by
    that item's ``N / B`` hypotheses, so beam reordering never copies them).
    """

    def __init__(self) -> None:
        self.self_kv: list[tuple[Tensor, Tensor] | None] = []
        self.cross_kv: list[tuple[Tensor, Tensor]] = []

    def reorder(self, rows: Tensor) -> None:
        """Keep/duplicate hypothesis rows (``index_select`` on the self-attention caches)."""
        self.self_kv = [None if kv is None else (kv[0][rows], kv[1][rows]) for kv in self.self_kv]

    def select_items(self, items: Tensor) -> None:
        """Keep only the source ``items`` (finished sentences removed from the batch)."""
        self.cross_kv = [(k[items], v[items]) for k, v in self.cross_kv]


class DecoderLayer(nn.Module):
    """fairseq ``TransformerDecoderLayer`` as the seq2seq model builds it (ReLU FFN, since
    ``AVHubertSeq2SeqConfig`` has no ``activation_fn``)."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        d = cfg.decoder_embed_dim
        self.normalize_before = cfg.decoder_normalize_before
        self.self_attention = MultiheadAttention(d, cfg.decoder_attention_heads)
        self.self_attention_norm = nn.LayerNorm(d)
        self.cross_attention = MultiheadAttention(d, cfg.decoder_attention_heads)
        self.cross_attention_norm = nn.LayerNorm(d)
        self.feed_forward = FeedForward(d, cfg.decoder_ffn_embed_dim, "relu")
        self.ffn_norm = nn.LayerNorm(d)

    def _pre(self, x: Tensor, norm: nn.LayerNorm) -> Tensor:
        return norm(x) if self.normalize_before else x

    def _post(self, x: Tensor, norm: nn.LayerNorm) -> Tensor:
        return x if self.normalize_before else norm(x)

    def forward(
        self,
        x: Tensor,
        self_kv: tuple[Tensor, Tensor] | None,
        cross_kv: tuple[Tensor, Tensor],
        cross_mask: Tensor | None,
        causal: bool,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """``x`` ``[N, L, D]``; ``self_kv`` keys/values of earlier steps ``[N, H, t, d]`` or None;
        ``cross_kv`` ``[B, H, S, d]`` with ``N = B * G``; ``cross_mask`` ``[B, 1, 1, S]`` (True =
        attend). Returns the output and the self-attention keys/values including this call's."""
        h = self._pre(x, self.self_attention_norm)
        k, v = self.self_attention.project_kv(h)
        if self_kv is not None:
            k, v = torch.cat([self_kv[0], k], dim=2), torch.cat([self_kv[1], v], dim=2)
        mask = None
        if causal and h.size(1) > 1:
            mask = torch.ones(h.size(1), h.size(1), dtype=torch.bool, device=h.device).tril()
        x = self._post(x + self.self_attention.attend(h, k, v, mask), self.self_attention_norm)

        h = self._pre(x, self.cross_attention_norm)
        n, length, d = h.shape
        b = cross_kv[0].size(0)
        grouped = h.reshape(b, (n // b) * length, d)  # the hypotheses of one item share its memory
        h = self.cross_attention.attend(grouped, cross_kv[0], cross_kv[1], cross_mask).reshape(n, length, d)
        x = self._post(x + h, self.cross_attention_norm)

        h = self.feed_forward(self._pre(x, self.ffn_norm))
        return self._post(x + h, self.ffn_norm), (k, v)


class TransformerDecoder(nn.Module):
    """av_hubert's ``TransformerDecoder`` (fairseq semantics): token embedding x scale, sinusoidal or
    learned positions (padding-aware), pre/post-norm layers, optional final LayerNorm, output
    projection tied to the input embedding or separate."""

    def __init__(self, cfg: DecoderConfig, vocab_size: int, padding_idx: int) -> None:
        super().__init__()
        d = cfg.decoder_embed_dim
        self.padding_idx = padding_idx
        self.embed_tokens = nn.Embedding(vocab_size, d, padding_idx=padding_idx)
        self.embed_scale = 1.0 if cfg.no_scale_embedding else math.sqrt(d)
        self.max_target_positions = cfg.max_target_positions
        self.learned_pos = None
        self.sinusoidal = not cfg.no_token_positional_embeddings and not cfg.decoder_learned_pos
        if not cfg.no_token_positional_embeddings and cfg.decoder_learned_pos:
            self.learned_pos = nn.Embedding(cfg.max_target_positions + padding_idx + 1, d, padding_idx)
        self.register_buffer(
            "sin_table",
            sinusoidal_table(cfg.max_target_positions + padding_idx + 1, d, padding_idx)
            if self.sinusoidal else torch.empty(0),
            persistent=False,
        )
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.decoder_layers))
        self.layer_norm = nn.LayerNorm(d) if cfg.decoder_normalize_before else None
        self.output_projection = (
            None if cfg.share_decoder_input_output_embed else nn.Parameter(torch.empty(vocab_size, d))
        )

    def max_positions(self) -> int:
        """fairseq ``max_positions``: the sinusoidal table is unbounded (1e5)."""
        return min(self.max_target_positions, int(1e5)) if self.sinusoidal else self.max_target_positions

    def _positions(self, tokens: Tensor, incremental: bool) -> Tensor | None:
        if incremental:  # position of the last token of an unpadded prefix
            positions = torch.full_like(tokens[:, -1:], self.padding_idx + tokens.size(1))
        else:
            mask = tokens.ne(self.padding_idx).int()
            positions = (torch.cumsum(mask, dim=1).type_as(mask) * mask).long() + self.padding_idx
        if self.learned_pos is not None:
            return self.learned_pos(positions)
        if not self.sinusoidal:
            return None
        needed = int(positions.max()) + 1
        if needed > self.sin_table.size(0):
            self.sin_table = sinusoidal_table(needed, self.sin_table.size(1), self.padding_idx).to(
                self.sin_table.device
            )
        return self.sin_table[positions]

    def init_cache(self, encoder_out: Tensor) -> DecoderCache:
        """Cache with the encoder-attention keys/values of ``encoder_out`` ``[B, S, D]``."""
        cache = DecoderCache()
        cache.cross_kv = [layer.cross_attention.project_kv(encoder_out) for layer in self.layers]
        cache.self_kv = [None] * len(self.layers)
        return cache

    def forward(
        self,
        tokens: Tensor,
        encoder_out: Tensor,
        encoder_padding_mask: Tensor | None = None,
        cache: DecoderCache | None = None,
    ) -> Tensor:
        """Logits ``[N, L, V]`` for ``tokens`` ``[N, L]`` (teacher forcing, causal), or ``[N, 1, V]``
        for the last token only when ``cache`` is given (incremental decoding; ``tokens`` is then
        the whole unpadded prefix). ``encoder_out`` is ``[B, S, D]`` with ``N`` a multiple of ``B``:
        rows ``b*G .. b*G+G-1`` belong to item ``b``."""
        incremental = cache is not None
        positions = self._positions(tokens, incremental)
        if incremental:
            tokens = tokens[:, -1:]
        x = self.embed_scale * self.embed_tokens(tokens)
        if positions is not None:
            x = x + positions.to(x.dtype)
        cross_mask = None
        if encoder_padding_mask is not None:
            cross_mask = ~encoder_padding_mask[:, None, None, :]
        if cache is None:
            cross = [layer.cross_attention.project_kv(encoder_out) for layer in self.layers]
            self_kv: list = [None] * len(self.layers)
        else:
            cross, self_kv = cache.cross_kv, cache.self_kv
        for i, layer in enumerate(self.layers):
            x, kv = layer(x, self_kv[i], cross[i], cross_mask, causal=not incremental)
            if cache is not None:
                cache.self_kv[i] = kv
        if self.layer_norm is not None:
            x = self.layer_norm(x)
        weight = self.embed_tokens.weight if self.output_projection is None else self.output_projection
        return torch.matmul(x, weight.t())


class AVHubertModel(nn.Module):
    """The network: :class:`AVHubertEncoder` plus, for fine-tuned seq2seq checkpoints, the
    :class:`TransformerDecoder` (``decoder`` is None for pretraining checkpoints)."""

    def __init__(
        self, encoder_cfg: EncoderConfig, decoder_cfg: DecoderConfig | None, vocab_size: int, padding_idx: int
    ) -> None:
        super().__init__()
        self.encoder = AVHubertEncoder(encoder_cfg)
        self.decoder = None
        if decoder_cfg is not None:
            if decoder_cfg.decoder_embed_dim != encoder_cfg.encoder_embed_dim:
                raise ValueError(
                    f"decoder_embed_dim {decoder_cfg.decoder_embed_dim} != encoder_embed_dim "
                    f"{encoder_cfg.encoder_embed_dim} (the official model cannot run this either)"
                )
            self.decoder = TransformerDecoder(decoder_cfg, vocab_size, padding_idx)
