"""The inference rewrites (folded BatchNorm, fused projections, preallocated decoder cache) and
the opt-in reduced precisions (CPU ``dtype="bf16"`` / ``"int8"``) against the fp32 model and the
official fixtures."""

from __future__ import annotations

import json
from pathlib import Path
from typing import cast

import numpy as np
import pytest
import torch
from torch import nn

from gpu_worker.avhubert import AVHubert, load_model
from gpu_worker.avhubert.checkpoint import load_checkpoint
from gpu_worker.avhubert.config import config_from_checkpoint
from gpu_worker.avhubert.importer import load_fairseq_weights
from gpu_worker.avhubert.model import AVHubertModel
from gpu_worker.avhubert.packed import PackedLinear, packing_available
from gpu_worker.avhubert.pipeline import cpu_has_amx
from tests.conftest import reference_source as _source

REF = Path(__file__).resolve().parents[1] / "fixtures" / "avhubert_reference"
UTTS = ["rand29", "face50", "rand75"]
MODS = ["video", "audio", "av"]

# measured on the fixture model (tiny 96-d, random weights: near-uniform, near-tied outputs, the
# audio front end amplifies rounding), torch 2.13 CPU: bf16 9.7e-3 / 0.93 / 4 of 9 best texts equal,
# int8 3.3e-2 / 1.30 / 2 of 9; bounds about 2-3x the errors, agreement at the measured value
BOUNDS = {
    # precision: (encoder relative error, teacher-forced log-prob max abs error, min best-text agreement)
    "bf16": (0.03, 2.0, 0.3),
    "int8": (0.08, 3.0, 0.2),
}


@pytest.fixture(autouse=True)
def _one_thread(single_torch_thread):
    """Every test here runs with one torch thread (see tests/conftest.py)."""


@pytest.fixture(scope="module")
def fp32() -> AVHubert:
    return load_model(REF / "checkpoints" / "finetune_s2s.pt")


@pytest.fixture(scope="module")
def inputs() -> dict[str, np.ndarray]:
    return dict(np.load(REF / "inputs" / "inputs.npz"))


@pytest.fixture(scope="module")
def outputs() -> dict[str, np.ndarray]:
    return dict(np.load(REF / "outputs" / "s2s_outputs.npz"))


def _plain_network() -> AVHubertModel:
    state = load_checkpoint(REF / "checkpoints" / "finetune_s2s.pt")
    config = config_from_checkpoint(state)
    network = AVHubertModel(config.encoder, config.decoder, 160, 1)
    load_fairseq_weights(network, state["model"], seq2seq=True)
    return network.eval()


@pytest.mark.parametrize("packed", [False, True], ids=["fused", "fused+packed"])
def test_prepared_network_equals_plain_network(inputs, packed: bool) -> None:
    """The rewritten network (folded BatchNorm, fused q/k/v, input-major weights, per-frame stem;
    then, as CPU fp32 loads it, oneDNN-packed Linears) computes what the module-by-module network
    computes, teacher-forced and step by step with the cache."""
    plain, prepared = _plain_network(), _plain_network()
    prepared.prepare_for_inference()
    if packed:
        prepared.pack_weights()
        assert isinstance(prepared.decoder.layers[0].feed_forward.fc1, PackedLinear)
        assert prepared.decoder.layers[0].self_attention.k_proj is None  # superseded by the fused qkv
    video = torch.from_numpy(inputs["rand29__video"])
    audio = torch.from_numpy(inputs["rand29__audio"]).transpose(1, 2)
    with torch.inference_mode():
        ref, _ = plain.encoder(video, audio)
        out, _ = prepared.encoder(video, audio)
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=0)
        tokens = torch.tensor([[2, 5, 9, 11, 7]])
        expected = plain.decoder(tokens, ref)
        torch.testing.assert_close(prepared.decoder(tokens, out), expected, atol=1e-4, rtol=0)
        cache = prepared.decoder.init_cache(out)
        steps = [prepared.decoder(tokens[:, : i + 1], out, cache=cache) for i in range(tokens.size(1))]
        torch.testing.assert_close(torch.cat(steps, dim=1), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("relu_type", ["prelu", "relu"])
@pytest.mark.parametrize("folded", [True, False], ids=["folded", "with-batchnorm"])
def test_video_resnet_in_runs_of_frames_equals_all_frames_at_once(monkeypatch: pytest.MonkeyPatch,
                                                                  relu_type: str, folded: bool) -> None:
    """The ResNet front end takes frames in runs (``frames_per_chunk`` through the stem and layer 1,
    ``trunk_frames_per_chunk`` through layers 2-4): the same numbers, bit for bit, as one pass over
    every frame, for run lengths that do and do not divide B*T or each other, and across clips."""
    from gpu_worker.avhubert.model import VideoResNet

    torch.manual_seed(0)
    net = VideoResNet(relu_type).eval()
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, (nn.BatchNorm2d, nn.BatchNorm3d)):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
            if isinstance(module, nn.PReLU):
                module.weight.uniform_(-0.3, 0.3)  # negative slopes: the activation before the max-pool
    if folded:
        net.fold_batchnorm()
    video = torch.randn(2, 1, 23, 44, 44)
    with torch.inference_mode():
        monkeypatch.setattr(VideoResNet, "frames_per_chunk", 10_000)
        monkeypatch.setattr(VideoResNet, "trunk_frames_per_chunk", 10_000)
        whole = net(video)
        # 45: runs of 23 + 23 frames, not 45 + 1; (7, 20): trunk runs of 16 in stem runs of 6, 5, 5
        for run, trunk_run in ((1, 10_000), (2, 10_000), (7, 10_000), (23, 10_000), (45, 10_000), (46, 10_000),
                               (1, 1), (7, 20), (23, 7), (10_000, 23), (5, 45)):
            monkeypatch.setattr(VideoResNet, "frames_per_chunk", run)
            monkeypatch.setattr(VideoResNet, "trunk_frames_per_chunk", trunk_run)
            assert torch.equal(net(video), whole), (run, trunk_run)
    assert whole.shape == (2, 23, 512)


def test_cpu_fp32_model_is_packed_and_counts_its_parameters(fp32: AVHubert) -> None:
    assert packing_available()  # every x86 torch wheel has oneDNN
    assert isinstance(fp32.network.decoder.packed_output, PackedLinear)
    assert fp32.info["num_parameters"] == sum(p.numel() for p in _plain_network().parameters())


@pytest.mark.parametrize("shape", [(5, 96), (2, 3, 96), (0, 96)])
@pytest.mark.parametrize("input_major", [False, True])
def test_packed_linear_computes_the_linear(shape: tuple[int, ...], input_major: bool) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(96, 40)
    if input_major:  # the decoder's weights are stored transposed
        linear.weight = nn.Parameter(linear.weight.detach().t().contiguous().t())
    x = torch.randn(*shape)
    with torch.inference_mode():
        out = PackedLinear(linear.weight, linear.bias)(x)
        torch.testing.assert_close(out, linear(x), atol=1e-5, rtol=1e-5)
    assert out.shape == (*shape[:-1], 40)


def test_packed_linear_takes_only_cpu_float32() -> None:
    with pytest.raises(ValueError, match="CPU float32"):
        PackedLinear(torch.ones(8, 8, dtype=torch.bfloat16), None)


@pytest.fixture(scope="module")
def fp32_outputs(fp32: AVHubert, inputs, outputs) -> dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor, str]]:
    """The fp32 model's encoding, teacher-forced log-probs and beam-5 best text per fixture input
    (computed once for every reduced precision)."""
    out = {}
    for utt in UTTS:
        for mod in MODS:
            src = _source(inputs, utt, mod)
            prev = outputs[f"{utt}__prev_output_tokens"]
            out[utt, mod] = (fp32.encode(**src), fp32.decoder_log_probs(prev, **src),
                             fp32.generate(**src, beam_size=5)[0][0].text)
    return out


def _deviation(model: AVHubert, fp32_outputs, inputs, outputs) -> tuple[float, float, float]:
    enc_err, lp_err, same = 0.0, 0.0, 0
    for (utt, mod), (ref, ref_lp, ref_text) in fp32_outputs.items():
        src = _source(inputs, utt, mod)
        enc_err = max(enc_err, float((model.encode(**src) - ref).norm() / ref.norm()))
        lp = model.decoder_log_probs(outputs[f"{utt}__prev_output_tokens"], **src) - ref_lp
        lp_err = max(lp_err, float(lp.abs().max()))
        same += model.generate(**src, beam_size=5)[0][0].text == ref_text
    return enc_err, lp_err, same / len(fp32_outputs)


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_reduced_precision_deviation_is_bounded(fp32_outputs, inputs, outputs, precision: str) -> None:
    model = load_model(REF / "checkpoints" / "finetune_s2s.pt", dtype=precision)
    assert model.info["dtype"] == precision
    if precision == "bf16":
        assert model.network.decoder.embed_tokens.weight.dtype == torch.bfloat16
        resnet = torch.bfloat16 if cpu_has_amx() else torch.float32  # bf16 convolutions only pay on AMX
        assert model.network.encoder.video_frontend.backbone.stem_conv.weight.dtype == resnet
        # oneDNN's bf16 grouped conv on AMX is wrong for few channels per group (this model: 6)
        assert model.network.encoder.transformer.pos_conv.conv.weight.dtype == torch.float32
    else:
        assert ".quantized." in type(model.network.decoder.layers[0].feed_forward.fc1).__module__
    enc_err, lp_err, agreement = _deviation(model, fp32_outputs, inputs, outputs)
    print(json.dumps({"precision": precision, "encoder_rel_err": enc_err, "tf_logprob_max_abs_err": lp_err,
                      "best_text_agreement": agreement}))
    max_enc, max_lp, min_agree = BOUNDS[precision]
    assert enc_err < max_enc
    assert lp_err < max_lp
    assert agreement >= min_agree
    # outputs stay float32 whatever the compute type
    assert model.encode(**_source(inputs, "rand29", "video")).dtype == torch.float32


@pytest.mark.parametrize("mod", MODS)
def test_decoder_memory_skips_padded_frames_and_equals_each_item_alone(fp32: AVHubert, inputs, mod: str) -> None:
    """On CPU the decoder's memory for a batch padded at the end is each item encoded alone (bit for bit)
    with zeros on the padded frames; the mask is the frame mask; a mask that is not end padding, or
    none, gives the plain batched encoder output."""
    src = _source(inputs, "rand75", mod)
    video, audio = src["video"], src["audio"]
    t = 75
    lengths = [75, 50, 29]
    mask = torch.arange(t)[None, :] >= torch.tensor(lengths)[:, None]
    batch_video = None if video is None else torch.from_numpy(video).repeat(3, 1, 1, 1, 1).masked_fill(
        mask[:, None, :, None, None], 0.0)
    batch_audio = None if audio is None else torch.from_numpy(audio).repeat(3, 1, 1).masked_fill(
        mask[:, :, None], 0.0)
    encoder = fp32.network.encoder
    with torch.inference_mode():
        memory, out_mask = encoder.forward_items(batch_video, batch_audio, mask)
        assert out_mask is not None and torch.equal(out_mask, mask)
        for b, n in enumerate(lengths):
            alone, _ = encoder(None if video is None else batch_video[b:b + 1, :, :n],
                               None if audio is None else batch_audio[b:b + 1, :n])
            assert torch.equal(memory[b, :n], alone[0])
            assert not memory[b, n:].any()
        batched, _ = encoder(batch_video, batch_audio, mask)
        assert (memory[1, :50] - batched[1, :50]).abs().max() < 1e-4  # the batch: the same up to rounding
        not_end_padded = mask.flip(1)
        assert torch.equal(encoder.forward_items(batch_video, batch_audio, not_end_padded)[0],
                           encoder(batch_video, batch_audio, not_end_padded)[0])
        no_padding = torch.zeros_like(mask)
        assert torch.equal(encoder.forward_items(batch_video, batch_audio, no_padding)[0],
                           encoder(batch_video, batch_audio, no_padding)[0])


@pytest.mark.parametrize(("size", "stride", "bias"), [(3, 1, True), (6, 2, True), (5, 1, False), (4, 2, False),
                                                      (1, 1, True), (7, 2, True)])
def test_tap_convolution_computes_the_zero_padded_convolution(size: int, stride: int, bias: bool) -> None:
    """`TapConv2d` (the padding's zero taps skipped, one GEMM per output position) is the convolution up to
    fp32 rounding, for map sizes and strides where taps fall off one, both or no edges, any input layout."""
    from gpu_worker.avhubert.model import TapConv2d

    torch.manual_seed(size * 10 + stride)
    conv = nn.Conv2d(24, 40, 3, stride, 1, bias=bias).eval()
    taps = TapConv2d(conv)
    plain = torch.randn(7, 24, size, size)
    for x in (plain, plain.contiguous(memory_format=torch.channels_last)):
        with torch.inference_mode():
            expected, got = conv(x), taps(x)
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_cpu_fp32_resnet_runs_its_small_maps_on_winograd_and_tap_convolutions(fp32: AVHubert) -> None:
    from gpu_worker.avhubert.model import BasicBlock, TapConv2d
    from gpu_worker.avhubert.winograd import WinogradConv2d

    backbone = fp32.network.encoder.video_frontend.backbone
    layer3, layer4 = ([cast(BasicBlock, b) for b in layer] for layer in backbone.layers[2:])
    assert isinstance(layer4[0].conv1, TapConv2d) and isinstance(layer3[0].conv1, nn.Conv2d)  # the strided ones
    assert all(isinstance(c, WinogradConv2d) for c in (*[b.conv2 for b in layer3 + layer4],
                                                        layer3[1].conv1, layer4[1].conv1))
    assert not any(isinstance(m, TapConv2d | WinogradConv2d) for m in backbone.layers[:2].modules())


@pytest.mark.parametrize("m", [2, 3, 4])
def test_winograd_transforms_compute_the_correlation(m: int) -> None:
    """F(m, 3): A^T ((G g) * (B^T d)) is the correlation of m + 2 inputs with 3 taps."""
    from gpu_worker.avhubert.winograd import winograd_matrices

    a_t, g, b_t = winograd_matrices(m)
    taps, inputs = torch.randn(3, dtype=torch.float64), torch.randn(m + 2, dtype=torch.float64)
    expected = torch.stack([taps @ inputs[i:i + 3] for i in range(m)])
    torch.testing.assert_close(a_t @ ((g @ taps) * (b_t @ inputs)), expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize(("size", "channels", "bias"), [(3, 32, True), (6, 24, True), (5, 16, False), (1, 8, True),
                                                        (7, 40, True), (11, 16, False)])
def test_winograd_convolution_computes_the_zero_padded_convolution(size: int, channels: int, bias: bool) -> None:
    """`WinogradConv2d` is the stride-1 3x3 convolution up to fp32 rounding, for maps of whole tiles and
    not (3 and 6 in the ResNet), any input layout; each frame's result is its result alone, and the same at
    1 and 2 threads, bit for bit (core sharing and per-segment encoding rely on both)."""
    from gpu_worker.avhubert.winograd import WinogradConv2d

    torch.manual_seed(size * 10 + channels)
    conv = nn.Conv2d(channels, channels + 8, 3, 1, 1, bias=bias).eval()
    fast = WinogradConv2d(conv)
    plain = torch.randn(5, channels, size, size)
    threads = torch.get_num_threads()
    try:
        for x in (plain, plain.contiguous(memory_format=torch.channels_last)):
            with torch.inference_mode():
                expected = conv(x)
                torch.set_num_threads(1)
                got = fast(x)
                torch.set_num_threads(2)
                assert torch.equal(fast(x), got)
                assert torch.equal(fast(x[2:3]), got[2:3])
            assert got.shape == expected.shape and got.is_contiguous(memory_format=torch.channels_last)
            torch.testing.assert_close(got, expected, atol=2e-5, rtol=2e-5)
    finally:
        torch.set_num_threads(threads)


def test_winograd_convolution_refuses_other_convolutions() -> None:
    from gpu_worker.avhubert.winograd import WinogradConv2d

    for conv in (nn.Conv2d(4, 4, 3, 2, 1), nn.Conv2d(4, 4, 5, 1, 2), nn.Conv2d(4, 4, 3, 1, 0), nn.Conv2d(4, 4, 3, 1, 1,
                                                                                                    groups=2)):
        with pytest.raises(ValueError):
            WinogradConv2d(conv)


@pytest.mark.parametrize("with_prefix", [True, False])
def test_decoder_cache_reorder_gives_each_row_its_sources_history(with_prefix: bool) -> None:
    """Row ``i`` ends with the history of ``rows[i]``; only the steps from ``same_prefix[i]`` on are
    copied, which is enough because the steps before it are already equal (the search's contract)."""
    from gpu_worker.avhubert.model import DecoderCache

    g = torch.Generator().manual_seed(0)
    layers, n, heads, capacity, d, t = 2, 10, 3, 12, 4, 9
    rows = torch.tensor([0, 0, 3, 2, 9, 5, 5, 7, 1, 1])
    same_prefix = torch.tensor([9, 2, 0, 7, 4, 9, 3, 8, 5, 0]) if with_prefix else None
    kv = torch.randn(layers, 2, n, heads, capacity, d, generator=g)
    if same_prefix is not None:  # the contract: row i's first same_prefix[i] steps equal its source's
        for i, (src, keep) in enumerate(zip(rows.tolist(), same_prefix.tolist(), strict=True)):
            kv[:, :, i, :, :keep] = kv[:, :, src, :, :keep]
    expected = kv[:, :, rows, :, :t].clone()
    beyond = kv[:, :, :, :, t:].clone()
    cache = DecoderCache(kv, [])
    cache.length = t
    cache.reorder(rows, same_prefix)
    assert torch.equal(cache.kv[:, :, :, :, :t], expected)
    assert torch.equal(cache.kv[:, :, :, :, t:], beyond)  # steps not filled yet are not touched
