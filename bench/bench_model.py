"""Benchmark the pure-PyTorch AV-HuBERT on random-weight models of the official sizes.

For each size (``base``: 12x768 encoder + 6x768 decoder, ``large``: 24x1024 + 9x1024) a random
checkpoint in the official format is written with ``make_random_checkpoint`` and loaded with
``load_model``; input is one video-only clip (default 250 frames = 10 s at 25 fps).

Measured (median of ``--repeats`` runs after one warm-up):

- ``encoder ms``: ResNet front end + Transformer encoder;
- ``beam ms``: beam search (``--beam``) on the encoder output with a fixed output length: EOS is
  blocked until and forced at ``--tokens`` (``min_len = max_len_b = tokens``, ``max_len_a = 0``), so
  every run makes exactly ``tokens + 1`` decoder steps, comparable across models;
- ``tok/s``: output tokens (incl. ``</s>``) per second of beam search;
- ``baseline ms`` / ``speed-up``: the same search recomputing the whole prefix at every step
  (no incremental state, ``incremental=False``), measured in the same run;
- ``peak MB``: peak RSS of the process during inference (CPU; reset with /proc/self/clear_refs when
  the kernel allows it, otherwise the process peak incl. loading) or
  ``torch.cuda.max_memory_allocated`` (CUDA);
- ``RTF``: (encoder + beam) time / clip duration.

Usage: ``python bench/bench_model.py [--sizes base large] [--device cpu|cuda|auto] [--dtype bf16]``
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_worker.avhubert import GenerationConfig, load_model
from gpu_worker.avhubert.random_checkpoint import make_random_checkpoint
from gpu_worker.avhubert.search import beam_search

FPS = 25


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median wall time in ms of ``fn`` after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (peak RSS)


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def bench_size(size: str, args: argparse.Namespace, workdir: Path) -> dict[str, float | str]:
    path = make_random_checkpoint(workdir / size / "model.pt", size=size, seed=0)
    model = load_model(path, device=args.device, dtype=args.dtype)
    device = model.device
    video = torch.randn(1, 1, args.frames, 88, 88, generator=torch.Generator().manual_seed(0)).to(device)
    net = model.network
    with torch.inference_mode(), model.autocast():
        memory, mask = net.encoder(video)
    caps = [args.tokens]
    dictionary = model.tokenizer.dictionary
    special = (dictionary.eos_index, dictionary.pad_index, dictionary.unk_index)

    def search(incremental: bool) -> Callable[[], object]:
        cfg = GenerationConfig(beam_size=args.beam, max_len_a=0.0, max_len_b=args.tokens, min_len=args.tokens,
                               incremental=incremental)

        def run() -> object:
            with model.autocast():
                return beam_search(net.decoder, memory, mask, caps, cfg, *special)

        return run

    hyps = search(True)()
    assert all(len(h.tokens) == args.tokens + 1 for h in hyps[0])
    _reset_peak(device)
    encoder_ms = _timed(lambda: model.encode(video=video), device, args.repeats)
    beam_ms = _timed(search(True), device, args.repeats)
    peak = _peak_mb(device)
    baseline_ms = _timed(search(False), device, max(1, args.repeats // 2)) if args.baseline else float("nan")
    info = model.info
    return {
        "size": size,
        "params M": info["num_parameters"] / 1e6,
        "encoder ms": encoder_ms,
        "beam ms": beam_ms,
        "tok/s": (args.tokens + 1) / (beam_ms / 1000),
        "baseline ms": baseline_ms,
        "speed-up": baseline_ms / beam_ms,
        "peak MB": peak,
        "RTF": (encoder_ms + beam_ms) / 1000 / (args.frames / FPS),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["base", "large"], choices=["tiny", "base", "large"])
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--dtype", default=None, choices=["fp16", "bf16"], help="CUDA autocast dtype")
    parser.add_argument("--frames", type=int, default=250, help="clip length in video frames (25 fps)")
    parser.add_argument("--beam", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=30, help="output tokens before the forced </s>")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-baseline", dest="baseline", action="store_false",
                        help="skip the non-incremental baseline search")
    parser.add_argument("--workdir", type=Path, default=None, help="where to write the random checkpoints")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        rows = [bench_size(size, args, workdir) for size in args.sizes]

    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    print(f"\nAV-HuBERT random weights, video only, {args.frames} frames ({args.frames / FPS:.1f} s), "
          f"beam {args.beam}, {args.tokens}+1 output tokens, device {device}, dtype {args.dtype or 'fp32'}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    columns = list(rows[0])
    print(" | ".join(f"{c:>12}" for c in columns))
    print("-+-".join("-" * 12 for _ in columns))
    for row in rows:
        print(" | ".join(f"{v:>12.2f}" if isinstance(v, float) else f"{v:>12}" for v in row.values()))
    print("baseline = the same beam search without incremental decoder state (full prefix every step)")


if __name__ == "__main__":
    main()
