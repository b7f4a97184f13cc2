"""`avsr`: the command line.

Remote (a running service; base install):
    avsr upload clip.mp4                         → upload_id
    avsr submit clip.mp4 | --upload-id ID | --url URL | --s3-bucket B --s3-key K   → job_id
        [--speaker largest|center|speaking|all|T,X,Y]  (whom to read when several faces are visible)
    avsr status JOB / avsr wait JOB / avsr result JOB --format srt
Local (in-process, no Redis or S3; needs the cpu and gpu extras):
    avsr transcribe clip.mp4 --format srt --model finetune.pt
The service URL and API key come from --url/--api-key or AVSR_URL/AVSR_API_KEY.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Any, cast, get_args

from avsr_client.client import AvsrError, Client, Job, result_text
from tasks.errors import JobError
from tasks.records import SpeakerHint, SpeakerMode

MODALITIES = ("auto", "video", "audio", "audiovisual")
FORMATS = ("text", "json", "srt", "vtt")
SPEAKER_MODES: tuple[str, ...] = get_args(SpeakerMode)


def speaker_arg(value: str) -> SpeakerMode | SpeakerHint:
    """`--speaker`: a mode, or `T,X,Y` (seconds, source-video pixels) for the face under that point."""
    if value in SPEAKER_MODES:
        return cast(SpeakerMode, value)
    try:
        t, x, y = (float(part) for part in value.split(","))
        valid = all(math.isfinite(n) and n >= 0 for n in (t, x, y))
    except ValueError:  # not three numbers
        valid = False
    if not valid:
        raise argparse.ArgumentTypeError(f"{value!r}: expected one of {', '.join(SPEAKER_MODES)}, or T,X,Y "
                                         "(seconds, and source-video pixels of a point on the face; >= 0)")
    return {"t": t, "x": x, "y": y}


def _client(args: argparse.Namespace) -> Client:
    return Client(args.server, args.api_key)


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2))


def _progress_line(job: Job) -> None:
    total = job.get("segments_total")
    segments = f" segments {job.get('segments_done', 0)}/{total}" if total else ""
    print(f"\r{job['status']:<9} {job['stage']:<13} {100 * job['progress']:5.1f}%{segments}   ",
          end="", file=sys.stderr, flush=True)


def cmd_upload(args: argparse.Namespace) -> int:
    print(_client(args).upload(args.file))
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    client = _client(args)
    upload_id = args.upload_id
    if args.file:
        upload_id = client.upload(args.file)
    job = client.submit(upload_id=upload_id, url=args.input_url, s3_bucket=args.s3_bucket, s3_key=args.s3_key,
                        s3_prefix=args.s3_prefix, modality=args.modality, beam_size=args.beam,
                        callback_url=args.callback_url, idempotency_key=args.idempotency_key,
                        speaker=args.speaker)
    print(job["job_id"])
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    _print_json(_client(args).status(args.job_id))
    return 0


def cmd_wait(args: argparse.Namespace) -> int:
    job = _client(args).wait(args.job_id, timeout=args.timeout, on_update=None if args.quiet else _progress_line)
    if not args.quiet:
        print(file=sys.stderr)
    _print_json(job)
    if job["status"] != "succeeded":
        error = job.get("error") or {"code": "job_cancelled", "message": f"the job was {job['status']}"}
        print(f"error: {error['code']}: {error['message']}", file=sys.stderr)
        return 1
    return 0


def cmd_result(args: argparse.Namespace) -> int:
    client = _client(args)
    if args.format in ("srt", "vtt"):
        sys.stdout.write(client.result(args.job_id, args.format))
    elif args.format == "text":
        print(result_text(client.result(args.job_id)))
    else:
        _print_json(client.result(args.job_id))
    return 0


def cmd_transcribe(args: argparse.Namespace) -> int:
    from avsr_client import local  # lazily: the cpu and gpu extras

    model = args.model or os.environ.get("AVHUBERT_MODEL_PATH", "")
    if not model:
        print("error: no model: give --model PATH or set AVHUBERT_MODEL_PATH to an AV-HuBERT checkpoint (.pt)",
              file=sys.stderr)
        return 2
    try:
        result = local.transcribe(args.file, model=model, modality=args.modality, beam_size=args.beam,
                                  device=args.device, progress=not args.quiet, speaker=args.speaker)
    except JobError as exc:  # what the service would fail the job with: bad_media, no_face_detected, ...
        print(f"\nerror: {exc.code}: {exc.message}", file=sys.stderr)
        return 1
    sys.stdout.write(local.render(result, args.format))
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="avsr", description="Lip reading with AV-HuBERT: against a running "
                                  "avsr-pipeline service, or in-process with `avsr transcribe`.")
    top.add_argument("--url", dest="server", default=os.environ.get("AVSR_URL", "http://127.0.0.1:8000"),
                     help="service URL (default $AVSR_URL or http://127.0.0.1:8000)")
    top.add_argument("--api-key", default=os.environ.get("AVSR_API_KEY"), help="API key (default $AVSR_API_KEY)")
    commands = top.add_subparsers(dest="command", required=True)

    def job_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--modality", choices=MODALITIES, default=None)
        p.add_argument("--beam", type=int, default=None, help="beam size (1-50)")
        p.add_argument("--speaker", type=speaker_arg, default=None, metavar="{" + ",".join(SPEAKER_MODES) + ",T,X,Y}",
                       help="whom to read when several faces are visible (default largest; speaking: the face in "
                            "sync with the audio; all: one transcript per face; T,X,Y: the face under pixel X,Y of "
                            "the video at T seconds)")

    p = commands.add_parser("upload", help="upload a local video; prints its upload_id")
    p.add_argument("file")
    p.set_defaults(run=cmd_upload)

    p = commands.add_parser("submit", help="submit a job; prints its job_id")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("file", nargs="?", help="a local video (uploaded first)")
    source.add_argument("--upload-id")
    source.add_argument("--input-url", help="an http(s) URL of a video the service fetches")
    source.add_argument("--s3-key", help="a video in S3 (with --s3-bucket)")
    source.add_argument("--s3-prefix", help="JPEG/PNG frames in S3 (with --s3-bucket)")
    p.add_argument("--s3-bucket")
    p.add_argument("--callback-url")
    p.add_argument("--idempotency-key")
    job_options(p)
    p.set_defaults(run=cmd_submit)

    p = commands.add_parser("status", help="print a job")
    p.add_argument("job_id")
    p.set_defaults(run=cmd_status)

    p = commands.add_parser("wait", help="wait for a job (progress on stderr), print it; non-zero if it failed")
    p.add_argument("job_id")
    p.add_argument("--timeout", type=float, default=3600.0)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(run=cmd_wait)

    p = commands.add_parser("result", help="print a job's result")
    p.add_argument("job_id")
    p.add_argument("--format", choices=FORMATS, default="json")
    p.set_defaults(run=cmd_result)

    p = commands.add_parser(
        "transcribe", help="transcribe a local video in-process (no service; needs the cpu and gpu extras)",
        description="Run the service's preprocessing and model in this process, on this machine: no Redis, "
                    "no S3. Needs the cpu and gpu extras: pip install 'avsr-pipeline[cpu,gpu]'.")
    p.add_argument("file")
    p.add_argument("--format", choices=FORMATS, default="text")
    p.add_argument("--model", help="AV-HuBERT checkpoint (default $AVHUBERT_MODEL_PATH)")
    p.add_argument("--device", default=os.environ.get("AVSR_DEVICE", "auto"), help="auto, cpu, cuda or cuda:N")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    job_options(p)
    p.set_defaults(run=cmd_transcribe)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return int(args.run(args))
    except AvsrError as exc:
        print(f"error: {exc.code}: {exc.message}", file=sys.stderr)
        return 1
    except TimeoutError as exc:
        print(f"error: timeout: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
