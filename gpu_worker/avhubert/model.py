"""Pure-PyTorch AV-HuBERT: visual/audio front ends, fusion, wav2vec2 Transformer encoder and the
fairseq Transformer decoder of the fine-tuned seq2seq model.

Layouts (batch first everywhere): video ``[B, 1, T, H, W]``, audio ``[B, T, F]``, features
``[B, T, D]``, ``padding_mask`` ``[B, T]`` bool (True = padded frame). Parameter names are our own;
:mod:`.importer` maps the fairseq names onto them.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ACTIVATIONS, DecoderConfig, EncoderConfig
from .packed import PackedLinear, pack_linears
from .winograd import WinogradConv2d


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

_Conv = TypeVar("_Conv", nn.Conv2d, nn.Conv3d)


class BasicBlock(nn.Module):
    """ResNet basic block (two 3x3 convs + BN, PReLU/ReLU, optional 1x1 downsample)."""

    # BatchNorms become Identity and the downsample Sequential one Conv2d in fold_batchnorm
    bn1: nn.Module
    bn2: nn.Module
    downsample: nn.Module | None

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
        result: Tensor = self.relu2(out + residual)
        return result

    def fold_batchnorm(self) -> None:
        """Inference: fold every BatchNorm into the convolution before it (eval statistics)."""
        self.conv1, self.bn1 = fold_conv_bn(self.conv1, self.bn1), nn.Identity()
        self.conv2, self.bn2 = fold_conv_bn(self.conv2, self.bn2), nn.Identity()
        if self.downsample is not None:
            downsample = cast(nn.Sequential, self.downsample)
            self.downsample = fold_conv_bn(cast(nn.Conv2d, downsample[0]), downsample[1])


def fold_conv_bn(conv: _Conv, bn: nn.Module) -> _Conv:
    """``bn(conv(x))`` as one convolution (eval-mode BatchNorm; computed in float64). The new
    convolution keeps the memory format of the old weight."""
    if isinstance(bn, nn.Identity):
        return conv
    norm = cast("nn.BatchNorm2d | nn.BatchNorm3d", bn)
    running_mean, running_var = norm.running_mean, norm.running_var
    assert running_mean is not None and running_var is not None, "BatchNorm without running statistics"
    with torch.no_grad():
        scale = norm.weight.double() / torch.sqrt(running_var.double() + norm.eps)
        shape = (-1,) + (1,) * (conv.weight.dim() - 1)
        weight = (conv.weight.double() * scale.view(shape)).to(conv.weight.dtype)
        bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(scale)
        bias = ((bias - running_mean.double()) * scale + norm.bias.double()).to(conv.weight.dtype)
        conv.weight.copy_(weight)  # copy_ keeps the layout (channels-last trunk)
        conv.bias = nn.Parameter(bias, requires_grad=False)
    return conv


class VideoResNet(nn.Module):
    """Official ``ResEncoder``: 3-D conv stem (5x7x7, stride 1x2x2) + BN + act + max-pool, then a
    ResNet-18 trunk applied per frame and global average pooling.

    ``[B, 1, T, H, W]`` -> ``[B, T, 512]``.
    """

    out_dim = 512
    # on CPU, frames go through in runs (see forward): at most this many through the stem and layer 1,
    # whose activations are large (a 64-frame run's stem output: 32 MB) ...
    frames_per_chunk = 64
    # ... and at most this many through layers 2-4, whose activations are small and weights large
    # (layer 4: 9.4 MB a convolution, read again for every run)
    trunk_frames_per_chunk = 256
    stem_bn: nn.Module  # Identity after fold_batchnorm

    def __init__(self, relu_type: str) -> None:
        super().__init__()
        self.stem_conv = nn.Conv3d(1, 64, (5, 7, 7), (1, 2, 2), (2, 3, 3), bias=False)
        self.stem_bn = nn.BatchNorm3d(64)
        # the official stem uses PReLU only for 'prelu' and ReLU for anything else
        self.stem_act = nn.PReLU(64) if relu_type == "prelu" else nn.ReLU()
        # the official MaxPool3d((1, 3, 3), (1, 2, 2), (0, 1, 1)) runs per frame (max_pool2d below)
        planes = [64, 128, 256, 512]
        self.layers = nn.ModuleList()
        inplanes = 64
        for i, p in enumerate(planes):
            stride = 1 if i == 0 else 2
            self.layers.append(
                nn.Sequential(BasicBlock(inplanes, p, stride, relu_type), BasicBlock(p, p, 1, relu_type))
            )
            inplanes = p
        # faster 2-D convs; copy_ keeps the layout. Module.to accepts memory_format at runtime
        # (torch._C._nn._parse_to), torch's overload stubs omit it
        self.layers.to(memory_format=torch.channels_last)  # type: ignore[call-overload]

    def fold_batchnorm(self) -> None:
        """Inference: fold the stem and trunk BatchNorms into their convolutions."""
        self.stem_conv, self.stem_bn = fold_conv_bn(self.stem_conv, self.stem_bn), nn.Identity()
        for layer in self.layers:
            for block in cast(nn.Sequential, layer):
                cast(BasicBlock, block).fold_batchnorm()

    def use_small_map_convs(self) -> None:
        """CPU fp32 inference, after :meth:`fold_batchnorm`: the 3x3 convolutions of the last two layers
        (on the 6x6 and 3x3 maps of 88x88 crops), where oneDNN's direct convolution runs below its rate
        elsewhere: the stride-1 ones as Winograd F(3x3, 3x3) (:class:`WinogradConv2d`: 25 products a tile
        where the direct one has up to 81), layer 4's strided one as :class:`TapConv2d`."""
        for layer in list(self.layers)[2:]:
            for block in cast(nn.Sequential, layer):
                basic = cast(BasicBlock, block)
                # the same call contract as the nn.Conv2d they replace
                basic.conv2 = WinogradConv2d(basic.conv2)  # type: ignore[assignment]
                if basic.conv1.stride == (1, 1):
                    basic.conv1 = WinogradConv2d(basic.conv1)  # type: ignore[assignment]
                elif layer is self.layers[-1]:
                    basic.conv1 = TapConv2d(basic.conv1)  # type: ignore[assignment]

    def _stem_chunks(self, video: Tensor, runs: list[int]) -> Iterator[Tensor]:
        """The 3-D stem convolution (+ BatchNorm) as a per-frame 2-D convolution whose 5 input
        channels are the 5 frames of the temporal kernel: ``[B, 1, T, H, W]`` -> ``[n, 64, H/2, W/2]``
        channels-last for consecutive ``runs`` of the ``B*T`` frames (lengths summing to ``B*T``),
        without the 5-D layout the official code permutes afterwards."""
        conv = self.stem_conv
        padding = cast("tuple[int, ...]", conv.padding)  # built with a tuple, never a string
        kt, ph = conv.kernel_size[0], padding[0]
        if not isinstance(self.stem_bn, nn.Identity) or ph * 2 + 1 != kt or conv.stride[0] != 1:
            x: Tensor = self.stem_bn(conv(video))
            b, c, t, h, w = x.shape
            x = x.permute(0, 2, 3, 4, 1).contiguous().view(b * t, h, w, c).permute(0, 3, 1, 2)
            yield from torch.split(x, runs)
            return
        b, _, t, h, w = video.shape
        taps = F.pad(video[:, 0], (0, 0, 0, 0, ph, ph)).unfold(1, kt, 1)  # [B, T, H, W, kt]
        taps = taps.reshape(b * t, h, w, kt).permute(0, 3, 1, 2)  # channels-last [B*T, kt, H, W]
        weight = conv.weight.flatten(1, 2).contiguous(memory_format=torch.channels_last)
        for chunk in torch.split(taps, runs):
            yield F.conv2d(chunk, weight, conv.bias, conv.stride[1:], padding[1:])

    def run_plan(self, frames: int, device: torch.device) -> list[list[int]]:
        """How ``frames`` frames go through the network: runs of at most ``trunk_frames_per_chunk``
        frames through layers 2-4, each made of runs of at most ``frames_per_chunk`` through the stem
        and layer 1; on a GPU, one run (it wants every frame in one launch). Runs have near-equal
        lengths, never a lone frame beside longer runs (oneDNN's one-image convolution rounds
        differently, ~1e-7)."""
        if device.type != "cpu":
            return [[frames]]
        trunk_runs = _near_equal_runs(frames, self.trunk_frames_per_chunk)
        return [_near_equal_runs(n, self.frames_per_chunk) for n in trunk_runs]

    def forward(self, video: Tensor) -> Tensor:
        """Runs in the dtype of its weights (fp32 in the CPU ``bf16`` mode on CPUs without AMX,
        where bf16 convolutions are slower); returns the input's dtype.  Frames go through in the
        runs of :meth:`run_plan` (every op after the stem's taps is per frame, so the result is the
        same bit for bit): the stem's and layer 1's activations then stay in cache and in the
        allocator's reused heap (glibc maps every block over 32 MiB afresh; the 250-frame stem
        output is 124 MB), while layers 2-4 read their weights once for many frames."""
        b, out_dtype = video.size(0), video.dtype
        video = video.to(self.stem_conv.weight.dtype)
        act = self.stem_act
        # the activation commutes with the max-pool when it is non-decreasing (ReLU, PReLU with
        # slopes >= 0): then it runs on the 4x smaller pooled map, with identical results
        non_monotone = isinstance(act, nn.PReLU) and not bool((act.weight >= 0).all())
        plan = self.run_plan(video.size(0) * video.size(2), video.device)
        stem = self._stem_chunks(video, [n for trunk_run in plan for n in trunk_run])
        pooled = []
        for trunk_run in plan:
            heads = []
            for _ in trunk_run:
                x = next(stem)  # [n, C, H, W] channels-last
                x = F.max_pool2d(act(x), 3, 2, 1) if non_monotone else act(F.max_pool2d(x, 3, 2, 1))
                heads.append(self.layers[0](x))
            x = heads[0] if len(heads) == 1 else torch.cat(heads)
            for layer in self.layers[1:]:
                x = layer(x)
            pooled.append(x.mean(dim=(2, 3)))
        x = torch.cat(pooled)
        return x.view(b, -1, x.size(-1)).to(out_dtype)


class TapConv2d(nn.Module):
    """A zero-padded ``k x k`` convolution (+ bias) for small feature maps, CPU fp32: per kernel tap, one
    oneDNN inner product (:class:`PackedLinear`) of the input positions the tap sees onto the
    output positions it feeds, added up centre tap first, so the padding's zero taps are skipped (a 3x3
    map with padding 1: 49 of 81). The ResNet's layer 4 (512 channels on 3x3 maps, 6x6 into its first,
    strided convolution) runs oneDNN's direct convolution at half its rate on larger maps; this takes 14.1
    against 30.4 ms for that strided one for 250 frames on 2 cores (19.6 against 59.9 for a stride-1 one,
    now :class:`WinogradConv2d`), with fp32 rounding differences only (about 2.5e-6 relative), and the
    same numbers at any thread count.

    ``[N, C, H, W]`` (best channels-last) -> ``[N, C_out, OH, OW]`` channels-last.
    """

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        cout, cin, kh, kw = conv.weight.shape
        if (conv.groups != 1 or conv.dilation != (1, 1) or conv.padding_mode != "zeros" or kh % 2 == 0
                or kw % 2 == 0 or conv.padding != (kh // 2, kw // 2)):
            raise ValueError("TapConv2d takes a plain convolution with an odd kernel, zero-padded by half of it")
        self.kernel = (kh, kw)
        self.stride, self.padding = conv.stride, (kh // 2, kw // 2)  # the padding checked above
        self.centre = (kh // 2) * kw + kw // 2
        weight = conv.weight.detach().float()
        bias = (conv.bias.detach() if conv.bias is not None else weight.new_zeros(cout)).float()
        # tap d's [C_out, C] weight; the centre tap, which feeds every output position, adds the bias
        self.taps = nn.ModuleList(PackedLinear(weight[:, :, d // kw, d % kw], bias if d == self.centre else None)
                                  for d in range(kh * kw))
        self.out_channels, self.in_channels = cout, cin

    def _span(self, out: int, size: int, tap: int, axis: int) -> tuple[int, int, int] | None:
        """For kernel offset ``tap`` along ``axis``: the output range ``[o0, o1)`` it feeds inside a map of
        ``size`` input positions and the first input position it reads; None if it only meets padding."""
        stride, pad = self.stride[axis], self.padding[axis]
        valid = [o for o in range(out) if 0 <= o * stride - pad + tap < size]
        return (valid[0], valid[-1] + 1, valid[0] * stride - pad + tap) if valid else None

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        (kh, kw), (sh, sw), (ph, pw) = self.kernel, self.stride, self.padding
        oh, ow = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
        cols = x.permute(0, 2, 3, 1)  # [N, H, W, C]
        out: Tensor | None = None
        for d in [self.centre] + [d for d in range(kh * kw) if d != self.centre]:
            rows, columns = self._span(oh, h, d // kw, 0), self._span(ow, w, d % kw, 1)
            if rows is None or columns is None:
                continue
            (i0, i1, r0), (j0, j1, c0) = rows, columns
            seen = cols[:, r0 : r0 + (i1 - i0 - 1) * sh + 1 : sh, c0 : c0 + (j1 - j0 - 1) * sw + 1 : sw]
            part = self.taps[d](seen.reshape(-1, c))
            if out is None:  # the centre tap feeds every output position (odd kernel, same-size padding)
                out = part.view(n, oh, ow, self.out_channels)
            else:
                out[:, i0:i1, j0:j1] += part.view(n, i1 - i0, j1 - j0, self.out_channels)
        assert out is not None
        return out.permute(0, 3, 1, 2)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel}, stride={self.stride}, "
                f"padding={self.padding}")


def _near_equal_runs(total: int, longest: int) -> list[int]:
    """``total`` split into the fewest runs of at most ``longest`` (at least 2), lengths differing by
    at most one."""
    runs = max(1, -(-total // max(2, longest)))
    return [total // runs + (i < total % runs) for i in range(runs)]


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


def _attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """Scaled dot-product attention ``[N, H, L, d]`` x ``[N, H, S, d]`` (``mask`` bool, True =
    attend). Short queries (incremental decoding) use two batched matmuls: ``scaled_dot_product_attention``
    costs more in set-up than in arithmetic there."""
    if q.size(-2) * k.size(-2) > 4096 or q.is_cuda:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    scores = torch.matmul(q * (q.size(-1) ** -0.5), k.transpose(-1, -2))
    if mask is not None:
        scores = scores.masked_fill(~mask, -math.inf)
    return torch.matmul(torch.softmax(scores, dim=-1), v)


def _linear_of(weight_t: Tensor, bias: Tensor) -> nn.Linear:
    """An ``nn.Linear`` computing ``x @ weight_t + bias`` for an ``[in, out]`` ``weight_t`` (its
    weight is the ``[out, in]`` transposed view: no copy)."""
    linear = nn.Linear(weight_t.size(0), weight_t.size(1), device="meta")  # parameters replaced below
    linear.weight = nn.Parameter(weight_t.t(), requires_grad=False)
    linear.bias = nn.Parameter(bias, requires_grad=False)
    return linear


class MultiheadAttention(nn.Module):
    """fairseq ``MultiheadAttention`` parameters (separate q/k/v/out projections with bias).

    :meth:`fuse_projections` (inference) puts the q/k/v weights side by side in one fused Linear
    ``qkv`` (``[D, 3D]`` input-major in memory; the three parameters become views of it) and its
    key/value rows in ``kv``, so self-attention projects with one matmul and encoder attention
    its keys/values with one. ``encoder_decoder_attention`` (fairseq's flag) says which of the two
    the module is: :meth:`drop_unfused` keeps only what that one calls."""

    qkv: nn.Module | None
    kv: nn.Module | None

    def __init__(self, embed_dim: int, num_heads: int, encoder_decoder_attention: bool = False) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} not divisible by {num_heads} heads")
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.encoder_decoder_attention = encoder_decoder_attention
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        self.qkv = self.kv = None

    def fuse_projections(self) -> None:
        d = self.embed_dim
        with torch.no_grad():
            projs = (self.q_proj, self.k_proj, self.v_proj)
            weight_t = torch.cat([p.weight.t() for p in projs], dim=1).contiguous()  # [D, 3D]
            bias = torch.cat([p.bias for p in projs])
            for i, p in enumerate(projs):
                p.weight = nn.Parameter(weight_t[:, i * d : (i + 1) * d].t(), requires_grad=False)
                p.bias = nn.Parameter(bias[i * d : (i + 1) * d], requires_grad=False)
        self.qkv = _linear_of(weight_t, bias)
        self.kv = _linear_of(weight_t[:, d:], bias[d:])

    def drop_unfused(self) -> None:
        """After :meth:`fuse_projections`: delete the projections this module no longer calls
        (self-attention: ``kv`` and the separate q/k/v; encoder attention: ``qkv`` and the separate
        k/v), so that nothing holds the weights they view."""
        if self.qkv is None:
            raise RuntimeError("drop_unfused needs fuse_projections first")
        unused = ("qkv", "k_proj", "v_proj") if self.encoder_decoder_attention else ("kv", "q_proj", "k_proj", "v_proj")
        for name in unused:
            setattr(self, name, None)

    def project_qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Queries, keys and values ``[N, H, L, d]`` of ``x`` ``[N, L, D]``."""
        if self.qkv is None:
            return (_heads(self.q_proj(x), self.num_heads), *self.project_kv(x))
        n, length, d = x.shape
        qkv = self.qkv(x).view(n, length, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]

    def project_kv(self, memory: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values ``[N, H, S, d]`` of ``memory`` ``[N, S, D]``."""
        if self.kv is None:
            return _heads(self.k_proj(memory), self.num_heads), _heads(self.v_proj(memory), self.num_heads)
        n, length, d = memory.shape
        kv = self.kv(memory).view(n, length, 2, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        return kv[0], kv[1]

    def attend(self, query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None) -> Tensor:
        """``query`` ``[N, L, D]``, ``key``/``value`` ``[N, H, S, d]``, ``mask`` broadcastable to
        ``[N, H, L, S]`` (bool, True = may attend) -> ``[N, L, D]``."""
        return self.attend_heads(_heads(self.q_proj(query), self.num_heads), key, value, mask)

    def attend_heads(self, q: Tensor, key: Tensor, value: Tensor, mask: Tensor | None) -> Tensor:
        """As :meth:`attend` with projected queries ``q`` ``[N, H, L, d]``."""
        out: Tensor = self.out_proj(_merge(_attention(q, key, value, mask)))
        return out

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        """Self-attention over ``x`` ``[B, T, D]`` ignoring padded keys."""
        mask = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]
        return self.attend_heads(*self.project_qkv(x), mask)


# --------------------------------------------------------------------------- encoder


class ConvPositionalEmbedding(nn.Module):
    """wav2vec2 convolutional relative position embedding (weight norm folded at import):
    grouped Conv1d, drop the last step for even kernels (``SamePad``), exact GELU."""

    def __init__(self, dim: int, kernel: int, groups: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(dim, dim, kernel, padding=kernel // 2, groups=groups)
        self.trim = 1 if kernel % 2 == 0 else 0

    def forward(self, x: Tensor) -> Tensor:
        """``[B, T, D]`` -> ``[B, T, D]``, computed in the dtype of the weights (fp32 in the CPU
        ``bf16`` mode), returned in the input's dtype."""
        y = self.conv(x.transpose(1, 2).to(self.conv.weight.dtype))
        if self.trim:
            y = y[:, :, : -self.trim]
        return F.gelu(y).transpose(1, 2).to(x.dtype)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int, activation: str) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.act = activation_fn(activation)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.fc2(self.act(self.fc1(x)))
        return out


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
        out: Tensor
        if self.layer_norm_first:
            x = x + self.self_attention(self.self_attention_norm(x), padding_mask)
            out = x + self.feed_forward(self.ffn_norm(x))
            return out
        x = self.self_attention_norm(x + self.self_attention(x, padding_mask))
        out = self.ffn_norm(x + self.feed_forward(x))
        return out


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
            assert feats_video is not None  # audio is None, so video is not
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

    def forward_items(
        self,
        video: Tensor | None,
        audio: Tensor | None,
        padding_mask: Tensor | None,
        before_item: Callable[[], None] | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """What the decoder attends to, without computing the padded frames: each item of a batch
        padded at the end is encoded alone at its own length, and the padded frames' outputs are
        zeros, which the decoder's attention masks out (``forward`` computes them: the official
        encoder output, padded frames included). Each item's output is then exactly its output
        alone. A batch without padding, or with a mask that is not end padding, runs as one.
        ``before_item`` is called before each item is encoded (the engine adjusts its CPU threads there)."""
        lengths = _end_padded_lengths(padding_mask)
        if lengths is None:
            if before_item is not None:
                before_item()
            return self.forward(video, audio, padding_mask)
        assert padding_mask is not None  # lengths are only found in a mask
        outs = []
        for b, n in enumerate(lengths):
            if before_item is not None:
                before_item()
            item_video = None if video is None else video[b : b + 1, :, :n]
            outs.append(self.forward(item_video, None if audio is None else audio[b : b + 1, :n])[0])
        memory = outs[0].new_zeros(len(lengths), padding_mask.size(1), outs[0].size(-1))
        for b, out in enumerate(outs):
            memory[b, : out.size(1)] = out[0]
        return memory, padding_mask


def _end_padded_lengths(padding_mask: Tensor | None) -> list[int] | None:
    """The valid lengths of a ``[B, T]`` mask (True = padding) when every row is padded at its end only,
    some row is padded and none is empty; otherwise None."""
    if padding_mask is None or padding_mask.dim() != 2 or not bool(padding_mask.any()):
        return None
    lengths = (~padding_mask).sum(1)
    end_padded = torch.arange(padding_mask.size(1), device=padding_mask.device)[None, :] >= lengths[:, None]
    if not torch.equal(padding_mask, end_padded) or not bool((lengths > 0).all()):
        return None
    return [int(n) for n in lengths.tolist()]


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

    Self-attention keys/values of all layers in one preallocated buffer ``kv`` ``[layers, 2, N,
    H, capacity, d]`` (one row per hypothesis; ``length`` steps filled, each step writes its
    column in place) and the encoder-attention keys/values per layer ``[B, H, S, d]`` (one row per
    source item, shared by that item's ``N / B`` hypotheses, computed once per utterance, so beam
    reordering never copies them).
    """

    def __init__(self, kv: Tensor, cross_kv: list[tuple[Tensor, Tensor]]) -> None:
        self.kv = kv
        self.length = 0
        self.cross_kv = cross_kv

    def layer_kv(self, layer: int, new_k: Tensor, new_v: Tensor) -> tuple[Tensor, Tensor]:
        """Store this step's keys/values ``[N, H, L, d]`` of ``layer``; return all so far."""
        end = self.length + new_k.size(2)
        if end > self.kv.size(4):  # grow (callers that do not know the length in advance)
            grown = self.kv.new_zeros(*self.kv.shape[:4], max(2 * self.kv.size(4), end), self.kv.size(5))
            grown[:, :, :, :, : self.length] = self.kv[:, :, :, :, : self.length]
            self.kv = grown
        self.kv[layer, 0, :, :, self.length : end] = new_k
        self.kv[layer, 1, :, :, self.length : end] = new_v
        return self.kv[layer, 0, :, :, :end], self.kv[layer, 1, :, :, :end]

    def reorder(self, rows: Tensor, same_prefix: Tensor | None = None) -> None:
        """Keep/duplicate hypothesis rows (row ``i`` takes the history of row ``rows[i]``); a
        shrinking batch (finished items removed) is compacted.

        Only what changes is copied, in one gather over all layers: rows whose source is another
        row, and of each such row only the steps from its ``same_prefix`` on, where given:
        ``same_prefix[i]`` = how many leading steps of row ``i``'s history already equal its new
        history (keys and values of a step depend only on the tokens up to it, so equal token
        prefixes mean equal cache entries). The (row, step) pairs are gathered exactly, not a
        rectangle from the earliest difference: in a batch of 16 segments x beam 5 that rectangle
        held 4x the pairs that differ."""
        t = self.length
        if rows.numel() != self.kv.size(2):
            kept = self.kv.new_empty(*self.kv.shape[:2], rows.numel(), *self.kv.shape[3:])
            kept[:, :, :, :, :t] = self.kv[:, :, rows, :, :t]
            self.kv = kept
            return
        moved = rows.ne(torch.arange(rows.numel(), device=rows.device))
        if same_prefix is not None:
            moved &= same_prefix < t
        changed = moved.nonzero().squeeze(1)
        if changed.numel() == 0 or t == 0:
            return
        starts = same_prefix[changed] if same_prefix is not None else torch.zeros_like(changed)
        lengths = t - starts
        total = int(lengths.sum())
        dst = changed.repeat_interleave(lengths, output_size=total)
        src = rows[changed].repeat_interleave(lengths, output_size=total)
        first = (lengths.cumsum(0) - lengths).repeat_interleave(lengths, output_size=total)
        steps = starts.repeat_interleave(lengths, output_size=total) + torch.arange(total, device=rows.device) - first
        self.kv[:, :, dst, :, steps] = self.kv[:, :, src, :, steps]

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
        self.cross_attention = MultiheadAttention(d, cfg.decoder_attention_heads, encoder_decoder_attention=True)
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
        cross_kv: tuple[Tensor, Tensor],
        cross_mask: Tensor | None,
        cache: DecoderCache | None = None,
        index: int = 0,
    ) -> Tensor:
        """``x`` ``[N, L, D]``; ``cross_kv`` ``[B, H, S, d]`` with ``N = B * G``; ``cross_mask``
        ``[B, 1, 1, S]`` (True = attend). Without ``cache``: causal self-attention over ``x``
        (teacher forcing); with it: ``x`` is the next step, attending to the cached steps of
        layer ``index`` (this step's keys/values are added to the cache)."""
        h = self._pre(x, self.self_attention_norm)
        q, k, v = self.self_attention.project_qkv(h)
        mask = None
        if cache is not None:
            k, v = cache.layer_kv(index, k, v)
        elif h.size(1) > 1:
            mask = torch.ones(h.size(1), h.size(1), dtype=torch.bool, device=h.device).tril()
        x = self._post(x + self.self_attention.attend_heads(q, k, v, mask), self.self_attention_norm)

        h = self._pre(x, self.cross_attention_norm)
        n, length, d = h.shape
        b = cross_kv[0].size(0)
        grouped = h.reshape(b, (n // b) * length, d)  # the hypotheses of one item share its memory
        h = self.cross_attention.attend(grouped, cross_kv[0], cross_kv[1], cross_mask).reshape(n, length, d)
        x = self._post(x + h, self.cross_attention_norm)

        h = self.feed_forward(self._pre(x, self.ffn_norm))
        return self._post(x + h, self.ffn_norm)


class TransformerDecoder(nn.Module):
    """av_hubert's ``TransformerDecoder`` (fairseq semantics): token embedding x scale, sinusoidal or
    learned positions (padding-aware), pre/post-norm layers, optional final LayerNorm, output
    projection tied to the input embedding or separate."""

    sin_table: Tensor  # registered buffer (empty without sinusoidal positions)
    _output_t: tuple[Tensor, Tensor, int] | None  # set by prepare_for_inference
    packed_output: PackedLinear | None  # set by pack_output_projection

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
        self.packed_output = None

    def _decoder_layers(self) -> Sequence[DecoderLayer]:
        """``self.layers`` as what it holds (``nn.ModuleList`` items are typed ``Module``)."""
        return cast("Sequence[DecoderLayer]", self.layers)

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
            learned: Tensor = self.learned_pos(positions)
            return learned
        if not self.sinusoidal:
            return None
        needed = int(positions.max()) + 1
        if needed > self.sin_table.size(0):
            self.sin_table = sinusoidal_table(needed, self.sin_table.size(1), self.padding_idx).to(
                self.sin_table.device
            )
        return self.sin_table[positions]

    def init_cache(self, encoder_out: Tensor, rows: int | None = None, capacity: int = 64) -> DecoderCache:
        """Cache with the encoder-attention keys/values of ``encoder_out`` ``[B, S, D]`` and room
        for ``capacity`` steps of ``rows`` hypotheses (default ``B``; it grows if needed)."""
        layers = self._decoder_layers()
        # contiguous once here, not re-laid out by every step's matmuls
        cross = [
            (k.contiguous(), v.contiguous())
            for k, v in (layer.cross_attention.project_kv(encoder_out) for layer in layers)
        ]
        attn = layers[0].self_attention
        heads, d = attn.num_heads, attn.embed_dim
        rows = encoder_out.size(0) if rows is None else rows
        kv = encoder_out.new_empty(len(layers), 2, rows, heads, capacity, d // heads)
        return DecoderCache(kv, cross)

    def prepare_for_inference(self) -> None:
        """Fused self-attention q/k/v (and encoder-attention k/v) projections; Linear weights and
        the output projection stored input-major (``x @ W^T`` then reads W row by row: faster
        for the few rows of a decoding step)."""
        for layer in self._decoder_layers():
            layer.self_attention.fuse_projections()
            layer.cross_attention.fuse_projections()
            for lin in (layer.self_attention.out_proj, layer.cross_attention.q_proj, layer.cross_attention.out_proj,
                        layer.feed_forward.fc1, layer.feed_forward.fc2):
                _input_major(lin)
        self._output_t = None
        self._output_weight_t()

    def pack_output_projection(self) -> None:
        """CPU fp32: the output projection (tied embedding or its own matrix) as a
        :class:`PackedLinear` copy; later changes of that weight are not seen."""
        self.packed_output = PackedLinear(self._output_weight(), None)
        self._output_t = None

    def _output_weight(self) -> Tensor:
        """The output projection ``[vocab, D]``: the tied token embedding or the decoder's own matrix."""
        return self.embed_tokens.weight if self.output_projection is None else self.output_projection

    def _output_weight_t(self) -> Tensor:
        weight = self._output_weight()
        cached: tuple[Tensor, Tensor, int] | None = getattr(self, "_output_t", None)
        if cached is None or cached[0] is not weight or cached[0]._version != cached[2]:
            cached = (weight, weight.t().contiguous(), weight._version)
            self._output_t = cached
        return cached[1]

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
        layers = self._decoder_layers()
        cross = [layer.cross_attention.project_kv(encoder_out) for layer in layers] if cache is None else cache.cross_kv
        for i, layer in enumerate(layers):
            x = layer(x, cross[i], cross_mask, cache, i)
        if cache is not None:
            cache.length += x.size(1)
        if self.layer_norm is not None:
            x = self.layer_norm(x)
        if self.packed_output is not None:
            logits: Tensor = self.packed_output(x)
            return logits
        return torch.matmul(x, self._output_weight_t().to(x.dtype))


def _input_major(linear: nn.Linear) -> None:
    """Store a Linear weight ``[out, in]`` transposed in memory (same values, same shape)."""
    with torch.no_grad():
        linear.weight = nn.Parameter(linear.weight.t().contiguous().t(), requires_grad=False)


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

    @torch.no_grad()
    def prepare_for_inference(self) -> None:
        """Rewrite the weights for fast inference (same function, fp32 rounding differences only):
        BatchNorms of the ResNet folded into its convolutions, fused attention projections,
        decoder weights stored input-major (see :meth:`TransformerDecoder.prepare_for_inference`).
        The model is then for inference only (the folded BatchNorms are gone)."""
        self.eval()
        backbone = self.encoder.video_frontend.backbone
        assert isinstance(backbone, VideoResNet)  # the video front end is always built with one
        backbone.fold_batchnorm()
        for module in self.encoder.modules():
            if isinstance(module, MultiheadAttention):
                module.fuse_projections()
        if self.decoder is not None:
            self.decoder.prepare_for_inference()

    def pack_weights(self) -> None:
        """CPU fp32 inference, after :meth:`prepare_for_inference`: every Linear and the decoder's
        output projection prepacked by oneDNN (:mod:`.packed`: fp32 rounding differences only;
        beam-search steps about 2x faster on a 2-core CPU), and the 3x3 convolutions of the ResNet's last
        two layers as Winograd or tap convolutions (:meth:`VideoResNet.use_small_map_convs`). The
        attention projections that the fused ones replace are dropped. The model then stays on the CPU
        in fp32."""
        for module in self.modules():
            if isinstance(module, MultiheadAttention):
                module.drop_unfused()
        pack_linears(self)
        if self.decoder is not None:
            self.decoder.pack_output_projection()
        backbone = self.encoder.video_frontend.backbone
        if isinstance(backbone, VideoResNet):
            backbone.use_small_map_convs()

    def quantize_linear_int8(self) -> None:
        """Dynamic int8 quantisation of every Linear (CPU, after :meth:`prepare_for_inference`:
        the fused projections are dropped, the quantised q/k/v Linears run separately)."""
        for module in self.modules():
            if isinstance(module, MultiheadAttention):
                module.qkv = module.kv = None
        with warnings.catch_warnings():  # torch 2.13 flags quantised tensor creation as deprecated
            warnings.simplefilter("ignore", UserWarning)
            for name, child in list(self.named_children()):
                # quantize_dynamic has no annotations in torch
                quantized = torch.ao.quantization.quantize_dynamic(  # type: ignore[no-untyped-call]
                    child, {nn.Linear}, dtype=torch.qint8
                )
                setattr(self, name, quantized)
