"""Inference overlapping preprocessing: what a job's early decodes share in Redis.

    preprocess_chunk (cpu) ── chunk done → `cpu_worker/early.py` plans the segments the chunks so far
        settle (`segmentation.settled_segments`) → `early/NNNN.npz` + `avsr.infer_early` (gpu)
    infer_early (gpu)      decodes them through the batcher; each result stored under the digest of
                           its exact model inputs; `partial_segments` shows them in order
    infer (gpu)            the whole clip's plan as always; a segment whose inputs have a stored
                           result reuses it, the others are decoded

A result is reused only for byte-identical inputs (ROIs, audio features, modality, beam, model), so
the job's result is the one-piece result by construction: a wrong plan, a lost early task or a
worker that died costs time, never a different text. Every key lives as long as the job record.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypedDict

from tasks import jobs
from tasks.records import DecodedSegment, SegmentSpan
from tasks.settings import get_settings

QUEUED, DONE, FAILED = "queued", "done", "failed"
_STATE, _CHUNKS, _LOCK = "avsr:early:{}", "avsr:early:{}:chunks", "avsr:early:{}:lock"
_SPANS, _BATCHES, _DECODED = "avsr:early:{}:spans", "avsr:early:{}:batches", "avsr:early:{}:decoded"
_SPAN_DIGESTS = "avsr:early:{}:span_digests"  # early span id → the digest its result is stored under
LOCK_TTL_S = 120  # a publisher that died frees the job's lock after this long


class EarlyState(TypedDict):
    """Where a job's early planning stands: segments before frame `origin` are published (ids below
    `next_id`) from the first `chunks` chunks, in `batches` early batches."""

    origin: int
    next_id: int
    chunks: int
    batches: int


def _key(pattern: str, job_id: str) -> str:
    return pattern.format(job_id)


def _expire(pipe: Any, *keys: str) -> None:
    for key in keys:
        pipe.expire(key, get_settings().job_ttl_s)


def chunk_done(job_id: str, index: int) -> int:
    """Record chunk `index` as preprocessed; returns how many chunks from the first are all done."""
    key = _key(_CHUNKS, job_id)
    pipe = jobs.connection().pipeline()
    pipe.sadd(key, index)
    pipe.smembers(key)
    _expire(pipe, key)
    done = {int(i) for i in pipe.execute()[1]}
    prefix = 0
    while prefix in done:
        prefix += 1
    return prefix


@contextmanager
def publisher_lock(job_id: str) -> Iterator[bool]:
    """The job's publisher lock (one chunk task plans at a time); yields whether it was taken."""
    r = jobs.connection()
    key = _key(_LOCK, job_id)
    taken = bool(r.set(key, 1, nx=True, ex=LOCK_TTL_S))
    try:
        yield taken
    finally:
        if taken:
            r.delete(key)


def state(job_id: str) -> EarlyState:
    raw = jobs.connection().hgetall(_key(_STATE, job_id))
    return {"origin": int(raw.get("origin", 0)), "next_id": int(raw.get("next_id", 0)),
            "chunks": int(raw.get("chunks", 0)), "batches": int(raw.get("batches", 0))}


def record_batch(job_id: str, new: EarlyState, spans: Sequence[SegmentSpan]) -> None:
    """Save the planning state; when `spans` is not empty they are batch `new["batches"] - 1`, queued."""
    r = jobs.connection()
    keys = [_key(_STATE, job_id), _key(_SPANS, job_id), _key(_BATCHES, job_id)]
    pipe = r.pipeline()
    pipe.hset(keys[0], mapping={k: str(v) for k, v in new.items()})
    if spans:
        pipe.hset(keys[1], mapping={str(s["id"]): json.dumps({"span": s, "batch": new["batches"] - 1}) for s in spans})
        pipe.hset(keys[2], str(new["batches"] - 1), QUEUED)
    _expire(pipe, *keys)
    pipe.execute()


def set_batch(job_id: str, batch: int, status: str) -> None:
    jobs.connection().hset(_key(_BATCHES, job_id), str(batch), status)


def in_flight(job_id: str) -> set[tuple[int, int]]:
    """`(start_frame, end_frame)` of the early spans whose batch is still queued or decoding."""
    r = jobs.connection()
    queued = {int(b) for b, status in r.hgetall(_key(_BATCHES, job_id)).items() if status == QUEUED}
    if not queued:
        return set()
    entries = [json.loads(v) for v in r.hvals(_key(_SPANS, job_id))]
    return {(e["span"]["start_frame"], e["span"]["end_frame"]) for e in entries if e["batch"] in queued}


def published_spans(job_id: str) -> list[SegmentSpan]:
    """Every span published early, in order."""
    spans: list[SegmentSpan] = [json.loads(v)["span"] for v in jobs.connection().hvals(_key(_SPANS, job_id))]
    return sorted(spans, key=lambda s: s["id"])


def input_digest(video: Any, audio: Any, *, modality: str, beam_size: int, model: str) -> str:
    """The identity of one decode: its exact model inputs (arrays with the buffer protocol, e.g. uint8
    ROIs [T,96,96] and float32 features [T,104], or None), the modality, the beam and the model."""
    h = hashlib.blake2b(digest_size=20)
    h.update(json.dumps([modality, beam_size, model]).encode())
    for array in (video, audio):
        if array is None:
            h.update(b"-")
        else:
            h.update(f"{array.dtype.str}{array.shape}".encode())
            h.update(memoryview(array.tobytes() if not array.flags.c_contiguous else array).cast("B"))
    return h.hexdigest()


def store_decoded(job_id: str, results: dict[str, DecodedSegment], span_digests: dict[int, str] | None = None) -> None:
    """Store results by input digest (and, for early spans, which digest each span's result has)."""
    if not results:
        return
    keys = [_key(_DECODED, job_id), _key(_SPAN_DIGESTS, job_id)]
    pipe = jobs.connection().pipeline()
    pipe.hset(keys[0], mapping={digest: json.dumps(result) for digest, result in results.items()})
    if span_digests:
        pipe.hset(keys[1], mapping={str(k): v for k, v in span_digests.items()})
    _expire(pipe, *keys)
    pipe.execute()


def decoded_prefix(job_id: str) -> list[tuple[SegmentSpan, DecodedSegment]]:
    """The early spans decoded so far from the first, up to the first that is not, with their results."""
    r = jobs.connection()
    digests = {str(k): str(v) for k, v in r.hgetall(_key(_SPAN_DIGESTS, job_id)).items()}
    out: list[tuple[SegmentSpan, DecodedSegment]] = []
    spans = published_spans(job_id)
    found = stored_decodes(job_id, [digests.get(str(s["id"]), "") for s in spans])
    for expected, (span, result) in enumerate(zip(spans, found, strict=True)):
        if span["id"] != expected or result is None:
            break
        out.append((span, result))
    return out


def stored_decodes(job_id: str, digests: Sequence[str]) -> list[DecodedSegment | None]:
    """The stored result of each digest, or None."""
    if not digests:
        return []
    raw = jobs.connection().hmget(_key(_DECODED, job_id), list(digests))
    return [json.loads(v) if v else None for v in raw]


def forget(job_id: str) -> None:
    """Drop the job's early state (after its result is stored)."""
    patterns = (_STATE, _CHUNKS, _LOCK, _SPANS, _BATCHES, _DECODED, _SPAN_DIGESTS)
    jobs.connection().delete(*(_key(p, job_id) for p in patterns))
