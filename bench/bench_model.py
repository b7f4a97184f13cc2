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

Usage: ``python -m bench.bench_model [--sizes base large] [--batch 1 8 32] [--device cpu|cuda|auto] [--dtype bf16]``
(``--batch``: that many clips of the same length decoded at once; ``clips/s`` is the throughput).

Side by side with the official implementation (``--official-venv VENV --official-src SRC``: a
virtual environment and the fairseq/av_hubert source trees built as a benchmark baseline outside
the project; never a dependency): the official model runs in a worker process started with that
venv's python (this file, ``--official-worker``), which turns the random checkpoint into one the
official code loads strictly (fairseq ``Dictionary``/``SentencepieceBPE`` objects in
``task_state``) and writes it as ``official.pt``; both sides load that file, use the same number of
threads and are timed alternately (official, ours) per item, after one warm-up round:

- ``encoder``: the encoder on the clip (official ``model.encoder`` as its generator calls it);
- ``beam``: beam search only, on a precomputed encoder output (official ``SequenceGenerator``
  with ``forward_encoder`` returning the cached output);
- ``end to end``: encoder + beam search (official ``SequenceGenerator.generate``; ours
  ``AVHubert.generate``);

and the outputs are compared (encoder max abs diff, identical tokens of every hypothesis, score
and teacher-forced log-prob differences). ``--precisions bf16 int8`` adds our reduced-precision
variants (CPU): their times and deviation from fp32 (encoder relative error, teacher-forced
log-prob error on the bench clip, best-text agreement with fp32 on the fixture utterances of
``tests/fixtures/avhubert_reference``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

if "--official-worker" not in sys.argv:  # the worker runs in the official venv, without the project
    from gpu_worker.avhubert import GenerationConfig, load_model
    from gpu_worker.avhubert.random_checkpoint import make_random_checkpoint
    from gpu_worker.avhubert.search import beam_search

FPS = 25
FIXTURES = ROOT / "tests" / "fixtures" / "avhubert_reference"


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
    video = torch.randn(args.batch, 1, args.frames, 88, 88, generator=torch.Generator().manual_seed(0)).to(device)
    net = model.network
    with torch.inference_mode(), model.autocast():
        memory, mask = net.encoder(video.to(model._input_dtype))
    caps = [args.tokens] * args.batch
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
        "batch": args.batch,
        "params M": info["num_parameters"] / 1e6,
        "encoder ms": encoder_ms,
        "beam ms": beam_ms,
        "tok/s": args.batch * (args.tokens + 1) / (beam_ms / 1000),
        "clips/s": args.batch / ((encoder_ms + beam_ms) / 1000),
        "baseline ms": baseline_ms,
        "speed-up": baseline_ms / beam_ms,
        "peak MB": peak,
        "RTF": (encoder_ms + beam_ms) / 1000 / (args.batch * args.frames / FPS),
    }


# --------------------------------------------------------------------------- official side


def official_worker(args: argparse.Namespace) -> None:
    """Runs under the official venv: load the official model, then answer one JSON command per
    stdin line (``enc``/``srch``/``e2e``: run once, reply the seconds; ``save``: write the last
    outputs to a file; ``quit``)."""
    # (avhubert switches to non-relative imports when sys.argv has one element: here it has more)
    sys.path.insert(0, str(Path(args.official_src) / "fairseq"))
    from fairseq import checkpoint_utils, utils
    from fairseq.data import Dictionary, encoders
    from fairseq.dataclass.configs import GenerationConfig as FairseqGeneration
    from omegaconf import OmegaConf

    utils.import_user_module(argparse.Namespace(user_dir=str(Path(args.official_src) / "av_hubert" / "avhubert")))
    torch.set_num_threads(args.threads)
    src = Path(args.checkpoint)
    state = torch.load(src, map_location="cpu", weights_only=False)
    # the project writes plain-data task_state; the official task wants the fairseq objects
    km = Dictionary()
    for symbol in state["task_state"]["dictionaries"][0]["symbols"][km.nspecial:]:
        km.add_symbol(symbol)
    target = Dictionary.load(str(src.parent / "dict.wrd.txt"))
    spm = next(src.parent.glob("spm_unigram*.model"))
    bpe = encoders.build_bpe(argparse.Namespace(bpe="sentencepiece", sentencepiece_model=str(spm)))
    state["task_state"] = {"dictionaries": [km], "target_dictionary": target, "s2s_tokenizer": bpe}
    state["cfg"]["task"].update(tokenizer_bpe_model=str(spm), label_dir=str(src.parent), data=str(src.parent))
    official_path = src.parent / "official.pt"
    torch.save(state, official_path, pickle_protocol=2)

    models, _, task = checkpoint_utils.load_model_ensemble_and_task([str(official_path)], strict=True)
    model = models[0].eval()
    model.prepare_for_inference_(OmegaConf.create({"generation": {"beam": args.beam, "print_alignment": False}}))
    gen_cfg = FairseqGeneration()
    gen_cfg.beam, gen_cfg.max_len_a, gen_cfg.max_len_b, gen_cfg.min_len = args.beam, 0, args.tokens, args.tokens
    generator = task.build_generator([model], gen_cfg)
    video = torch.load(args.video)
    sample = {"net_input": {"source": {"audio": None, "video": video},
                            "padding_mask": torch.zeros(video.size(0), video.size(2), dtype=torch.bool)}}
    with torch.no_grad():
        cached = model.encoder(**sample["net_input"])

    def encoder() -> object:
        with torch.no_grad():
            return model.encoder(**sample["net_input"])

    def search() -> object:
        forward_encoder = generator.model.forward_encoder
        generator.model.forward_encoder = lambda net_input: [dict(cached)]
        try:
            return generator.generate([model], sample)
        finally:
            generator.model.forward_encoder = forward_encoder

    items = {"enc": encoder, "srch": search, "e2e": lambda: generator.generate([model], sample)}
    last: dict[str, object] = {}
    print(json.dumps({"ready": str(official_path)}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "quit":
            break
        if cmd["cmd"] == "save":
            prev = torch.tensor(cmd["prev"])
            with torch.no_grad():
                lprobs = torch.log_softmax(model.decoder(prev, encoder_out=cached)[0].float(), -1)
            torch.save({
                "encoder_out": last["enc"]["encoder_out"].transpose(0, 1).contiguous(),
                "teacher_forced": lprobs,
                **{k: [(h["tokens"].tolist(), float(h["score"]), h["positional_scores"].tolist()) for h in last[k][0]]
                   for k in ("srch", "e2e")},
            }, cmd["path"])
            print(json.dumps({"saved": cmd["path"]}), flush=True)
            continue
        start = time.perf_counter()
        last[cmd["cmd"]] = items[cmd["cmd"]]()
        print(json.dumps({"s": time.perf_counter() - start}), flush=True)


class OfficialProcess:
    """The official model in a worker process (see :func:`official_worker`)."""

    def __init__(self, args: argparse.Namespace, checkpoint: Path, video: Path) -> None:
        python = Path(args.official_venv) / "bin" / "python"
        cmd = [str(python), str(Path(__file__).resolve()), "--official-worker",
               "--official-src", str(args.official_src), "--checkpoint", str(checkpoint), "--video", str(video),
               "--threads", str(torch.get_num_threads()),
               "--beam", str(args.beam), "--tokens", str(args.tokens)]
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                                     cwd=str(checkpoint.parent))
        self.checkpoint = Path(self._reply()["ready"])

    def _reply(self) -> dict:
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"official worker exited with {self.proc.wait()}")
            if line.startswith("{"):
                return json.loads(line)

    def call(self, cmd: str, **kw: object) -> dict:
        self.proc.stdin.write(json.dumps({"cmd": cmd, **kw}) + "\n")
        self.proc.stdin.flush()
        return self._reply()

    def close(self) -> None:
        with contextlib.suppress(BrokenPipeError, OSError):
            self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
            self.proc.stdin.close()
        self.proc.wait(timeout=60)


def compare_size(size: str, args: argparse.Namespace, workdir: Path) -> list[dict[str, object]]:
    """Official vs ours (fp32 and ``--precisions``) on one random checkpoint, alternating."""
    path = make_random_checkpoint(workdir / size / "model.pt", size=size, seed=0)
    video = torch.randn(1, 1, args.frames, 88, 88, generator=torch.Generator().manual_seed(0))
    video_path = workdir / size / "video.pt"
    torch.save(video, video_path)
    official = OfficialProcess(args, path, video_path)
    try:
        variants = {"fp32": load_model(official.checkpoint)}
        for precision in args.precisions:
            variants[precision] = load_model(official.checkpoint, dtype=precision)
        d = variants["fp32"].tokenizer.dictionary
        cfg = GenerationConfig(beam_size=args.beam, max_len_a=0.0, max_len_b=args.tokens, min_len=args.tokens)
        gen = {"beam_size": args.beam, "max_len_a": 0.0, "max_len_b": args.tokens, "min_len": args.tokens}

        def ours_items(model) -> dict[str, Callable[[], object]]:
            with torch.inference_mode():
                memory, mask = model.network.encoder(video.to(model._input_dtype))
            return {
                "enc": lambda: model.encode(video=video),
                "srch": lambda: beam_search(model.network.decoder, memory, mask, [args.tokens], cfg,
                                            d.eos_index, d.pad_index, d.unk_index),
                "e2e": lambda: model.generate(video=video, **gen),
            }

        ours = {name: ours_items(m) for name, m in variants.items()}
        times: dict[tuple[str, str], list[float]] = {}
        last: dict[tuple[str, str], object] = {}
        for rep in range(args.repeats + 1):
            for item in ("enc", "srch", "e2e"):
                seconds = {"official": official.call(item)["s"]}
                for name, fns in ours.items():
                    start = time.perf_counter()
                    last[(name, item)] = fns[item]()
                    seconds[name] = time.perf_counter() - start
                if rep:  # the first round is the warm-up
                    for name, sec in seconds.items():
                        times.setdefault((name, item), []).append(sec)
        prev = torch.cat([torch.tensor([[d.eos_index]]),
                          torch.randint(4, len(d), (1, 39), generator=torch.Generator().manual_seed(3))], 1)
        ref_path = workdir / size / "official_outputs.pt"
        official.call("save", path=str(ref_path), prev=prev.tolist())
        ref = torch.load(ref_path)
    finally:
        official.close()

    fp32 = variants["fp32"]
    rows = []
    medians = {k: statistics.median(v) for k, v in times.items()}
    for name, model in variants.items():
        enc = last[(name, "enc")]
        lprobs = model.decoder_log_probs(prev, video=video)
        row: dict[str, object] = {"size": size, "variant": name}
        for item, label in (("enc", "encoder"), ("srch", "beam"), ("e2e", "end to end")):
            row[f"{label} off ms"] = medians[("official", item)] * 1000
            row[f"{label} ours ms"] = medians[(name, item)] * 1000
            row[f"{label} off/ours"] = medians[("official", item)] / medians[(name, item)]
        row["enc max|diff|"] = float((enc - ref["encoder_out"]).abs().max())
        row["enc rel err"] = float((enc - ref["encoder_out"]).norm() / ref["encoder_out"].norm())
        row["tf lprob max|diff|"] = float((lprobs - ref["teacher_forced"]).abs().max())
        srch, e2e = last[(name, "srch")][0], last[(name, "e2e")][0]
        row["tokens equal"] = ([list(h.tokens) for h in srch] == [t for t, _, _ in ref["srch"]]
                               and [h.tokens for h in e2e] == [t for t, _, _ in ref["e2e"]])
        row["score max|diff|"] = max(abs(h.score - s) for h, (_, s, _) in zip(e2e, ref["e2e"], strict=True))
        if name != "fp32":
            row["fixture text agreement"] = fixture_text_agreement(model, fp32)
        rows.append(row)
    return rows


def fixture_text_agreement(model, fp32) -> str:
    """Best hypotheses of ``model`` equal to fp32's on the fixture utterances of the reference set
    (3 utterances x video/audio/av x beam 5 and 1), on the fixture checkpoint."""
    import numpy as np

    ckpt = FIXTURES / "checkpoints" / "finetune_s2s.pt"
    if not ckpt.exists():
        return "n/a"
    small, small_ref = load_model(ckpt, dtype=model.precision), load_model(ckpt)
    inputs = dict(np.load(FIXTURES / "inputs" / "inputs.npz"))
    same = total = 0
    for utt in ("rand29", "face50", "rand75"):
        audio = inputs[f"{utt}__audio"].transpose(0, 2, 1)
        for mod in ("video", "audio", "av"):
            src = {"video": inputs[f"{utt}__video"] if mod != "audio" else None,
                   "audio": audio if mod != "video" else None}
            for beam in (5, 1):
                a = small.generate(**src, beam_size=beam)[0][0].text
                same += a == small_ref.generate(**src, beam_size=beam)[0][0].text
                total += 1
    return f"{same}/{total}"


def print_comparison(rows: list[dict[str, object]], args: argparse.Namespace) -> None:
    print(f"\nOfficial AV-HuBERT vs ours, random weights, video only, {args.frames} frames, beam {args.beam}, "
          f"{args.tokens}+1 decoder steps, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"median of {args.repeats} alternating runs; off/ours > 1: ours faster")
    head = ["size", "variant"] + [f"{item} {col}" for item in ("enc", "beam", "e2e")
                                  for col in ("off ms", "ours ms", "off/ours")]
    print(" | ".join(f"{h:>10}" for h in head))
    for row in rows:
        values = list(row.values())[:11]
        print(" | ".join(f"{v:>10.2f}" if isinstance(v, float) else f"{v!s:>10}" for v in values))
    print("agreement with the official outputs:")
    for row in rows:
        extra = {k: v for k, v in list(row.items())[11:]}
        print(f"  {row['size']} {row['variant']}: " + ", ".join(
            f"{k} {v:.2e}" if isinstance(v, float) else f"{k} {v}" for k, v in extra.items()))



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["base", "large"], choices=["tiny", "base", "large"])
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--dtype", default=None, choices=["fp16", "bf16", "int8"],
                        help="load_model dtype (CUDA: fp16/bf16 autocast; CPU: bf16 weights, int8 Linears)")
    parser.add_argument("--frames", type=int, default=250, help="clip length in video frames (25 fps)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1],
                        help="clips decoded at once (one row per value; not with --official-venv)")
    parser.add_argument("--beam", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=30, help="output tokens before the forced </s>")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-baseline", dest="baseline", action="store_false",
                        help="skip the non-incremental baseline search")
    parser.add_argument("--workdir", type=Path, default=None, help="where to write the random checkpoints")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--official-venv", type=Path, default=None,
                        help="venv of the official AV-HuBERT (benchmark baseline): compare side by side")
    parser.add_argument("--official-src", type=Path, default=None,
                        help="folder holding the official fairseq/ and av_hubert/ source trees")
    parser.add_argument("--precisions", nargs="*", default=[], choices=["bf16", "int8"],
                        help="with --official-venv: also time our CPU reduced-precision variants")
    parser.add_argument("--official-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--video", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.official_worker:
        official_worker(args)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    if (args.official_venv is None) != (args.official_src is None):
        parser.error("--official-venv and --official-src go together")
    if args.official_venv is not None:
        if args.batch != [1]:
            parser.error("--batch is for our model alone (the comparison decodes one clip)")
        with tempfile.TemporaryDirectory() as tmp:
            workdir = args.workdir or Path(tmp)
            rows = [row for size in args.sizes for row in compare_size(size, args, workdir)]
        print_comparison(rows, args)
        return

    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        rows = [bench_size(size, argparse.Namespace(**{**vars(args), "batch": batch}), workdir)
                for size in args.sizes for batch in args.batch]

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
