"""Batching across jobs: one thread of the GPU worker owns the engine and decodes the segments of every
job in inference together.

The worker runs `AVSR_GPU_CONCURRENT_JOBS` `avsr.infer` tasks at once (Celery threads pool). Each hands
its segments to the process's `Batcher` and waits; the batcher thread gathers waiting segments for up
to `AVSR_BATCH_LINGER_MS` (less when the frame budget is already filled), picks the next batch with
`batching.next_batch` (fair: jobs lead in turn and take turns inside a batch; only segments of the
same modality and beam size together) and decodes it in one forward pass. Per-item length caps make
every segment's result exactly what it gives alone. A batch that fails is decoded again job by job,
so an error fails only the job whose segments raise it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from gpu_worker.batching import Waiting, batch_frames, next_batch
from gpu_worker.engine import Engine, SegmentInput, segment_inputs
from tasks.errors import JobError
from tasks.logs import current_job_id
from tasks.records import DecodedSegment, SegmentSpan

log = logging.getLogger(__name__)

Progress = Callable[[list[DecodedSegment | None]], None]
"""Called in the submitting thread after each batch that decoded some of its segments: every segment's
result so far (None: not yet decoded), in segment order. It may raise to stop (e.g. job cancelled)."""


@dataclass(eq=False)
class _Job:
    """One `transcribe` call: its segments, those not yet in a batch (`items[next:]`), the results."""

    number: int  # submissions to this batcher before it (`on_batch` names jobs by it)
    job_id: str  # the submitting task's job (for the batch log line)
    items: list[SegmentInput]
    beam_size: int
    group: tuple[str, int]  # (modality, beam size): only segments of one group share a forward pass
    results: list[DecodedSegment | None]
    next: int = 0  # items[next:] wait for a batch
    done: int = 0  # results stored (a prefix: a job's segments are batched in order)
    seen: int = 0  # results the submitting thread has reported
    error: BaseException | None = None


Part = tuple[_Job, int, int]
"""A batch's segments of one job: `job.items[start:stop]`."""


class Batcher:
    """The process's decoding thread over `engine` (see the module docstring)."""

    def __init__(self, engine: Engine, *, linger_s: float, max_batch_frames: int, max_batch_size: int,
                 on_batch: Callable[[list[tuple[int, int]]], None] | None = None,
                 stall_limit_s: float | None = None) -> None:
        if max_batch_frames <= 0 or max_batch_size <= 0 or linger_s < 0:
            raise ValueError("the batch frame budget and size must be > 0 and the linger window >= 0")
        self.engine = engine
        self.stall_limit_s = stall_limit_s  # a job whose segments make no progress this long fails `timeout`
        self.linger_s = linger_s
        self.max_batch_frames, self.max_batch_size = max_batch_frames, max_batch_size
        self.on_batch = on_batch  # each batch as (job number, segments of it), for tests and logs
        self._cond = threading.Condition()
        self._waiting: list[_Job] = []  # jobs with segments not yet batched, in lead order
        self._active: list[_Job] = []  # every job handed in and not yet returned
        self._submitted = 0
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the decoding thread (once)."""
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="avsr-batcher", daemon=True)
                self._thread.start()

    def transcribe(self, *, rois: np.ndarray | None, audio: np.ndarray | None, segments: Sequence[SegmentSpan],
                   modality: str, beam_size: int, on_progress: Progress | None = None) -> list[DecodedSegment]:
        """`Engine.transcribe`, but decoded in batches shared with the other jobs of this process."""
        return self.decode_items(segment_inputs(rois, audio, segments, modality), modality=modality,
                                 beam_size=beam_size, on_progress=on_progress)

    def decode_items(self, items: Sequence[SegmentInput], *, modality: str, beam_size: int,
                     on_progress: Progress | None = None) -> list[DecodedSegment]:
        """Decode `items` (`engine.segment_inputs`, of `modality`) in batches shared with the other jobs."""
        items = list(items)
        if not items:
            return []
        with self._cond:
            job = _Job(self._submitted, current_job_id.get() or "", items, beam_size, (modality, beam_size),
                       [None] * len(items))
            self._submitted += 1
            self._waiting.append(job)
            self._active.append(job)
            self._cond.notify_all()
        try:
            while True:
                with self._cond:
                    stalled_at = time.monotonic() + (self.stall_limit_s or float("inf"))
                    while job.error is None and job.done == job.seen:
                        if self._thread is None or not self._thread.is_alive():
                            raise JobError("model_unavailable", "the GPU worker's decoding thread is not running",
                                           retryable=True)
                        if time.monotonic() > stalled_at:  # e.g. a forward pass hung in the driver
                            raise JobError("timeout", f"no segment decoded in {self.stall_limit_s:g} s")
                        self._cond.wait(5.0)
                    if job.error is not None:
                        raise job.error
                    job.seen, snapshot = job.done, list(job.results)
                if on_progress is not None:
                    on_progress(snapshot)
                if job.seen == len(items):
                    return [r for r in snapshot if r is not None]
        finally:  # cancelled or failed: its segments not yet in a batch are dropped
            with self._cond:
                if job in self._waiting:
                    self._waiting.remove(job)
                self._active.remove(job)

    def working_for(self, job_id: str) -> bool:
        """Whether segments handed in for job `job_id` are waiting here or being decoded (its early batches)."""
        with self._cond:
            return any(job.job_id == job_id and job.done < len(job.items) and job.error is None
                       for job in self._active)

    # -- the decoding thread ------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            try:
                batch = self._take()
            except Exception as exc:  # the thread must live on: fail the jobs it could not plan
                log.exception("batch planning failed")
                with self._cond:  # no batch is in flight while the one thread plans: fail every job waiting
                    failed = [(job, job.next, len(job.items)) for job in self._active if job.done < len(job.items)]
                self._finish(failed, exc)
                time.sleep(0.1)
                continue
            try:
                self._decode(batch)
            except Exception as exc:  # never leave a job waiting on a batch that died
                log.exception("batch failed")
                self._finish(batch, exc)
            del batch  # an idle thread keeps no job's arrays alive

    def _take(self) -> list[Part]:
        """Wait for segments, linger for more (unless the budget is already full), take the next batch."""
        with self._cond:
            deadline = None
            while True:
                if not self._waiting:  # nothing, or every waiting job was cancelled while lingering
                    deadline = None
                    self._cond.wait()
                    continue
                deadline = deadline or time.monotonic() + self.linger_s
                plan = next_batch([Waiting(j.group, [i.frames for i in j.items[j.next:]]) for j in self._waiting],
                                  self.max_batch_frames, self.max_batch_size, self.engine.pads_batches)
                remaining = deadline - time.monotonic()
                if plan.full or remaining <= 0:
                    break
                self._cond.wait(remaining)
            batch = [(job, job.next, job.next + n) for job, n in zip(self._waiting, plan.take, strict=True) if n]
            for job, _, stop in batch:
                job.next = stop
            self._waiting.append(self._waiting.pop(0))  # the lead goes to the back: every job leads in turn
            self._waiting = [j for j in self._waiting if j.next < len(j.items)]
        if self.on_batch is not None:
            self.on_batch([(job.number, stop - start) for job, start, stop in batch])
        return batch

    def _decode(self, batch: list[Part]) -> None:
        """One forward pass over the batch; if it fails, each job's part alone, so only the job whose
        segments raise fails."""
        beam_size = batch[0][0].beam_size
        items = [item for job, a, b in batch for item in job.items[a:b]]
        started = time.perf_counter()
        try:
            decoded = self.engine.decode(items, beam_size)
        except Exception:
            if len(batch) == 1:
                raise
            log.warning("a batch of %d jobs failed: decoding each job's segments alone", len(batch))
            for part in batch:
                job, a, b = part
                try:
                    self._store(part, self.engine.decode(job.items[a:b], beam_size))
                except Exception as exc:
                    self._finish([part], exc)
            return
        log.info("batch decoded", extra={
            "jobs": len(batch), "segments": len(items),
            "frames": batch_frames(len(items), max(i.frames for i in items), sum(i.frames for i in items),
                                   self.engine.pads_batches),
            "seconds": round(time.perf_counter() - started, 4), "threads": self.engine.threads,
            "job_ids": ",".join(job.job_id for job, _, _ in batch)})
        offset = 0
        for part in batch:
            self._store(part, decoded[offset:offset + part[2] - part[1]])
            offset += part[2] - part[1]

    def _store(self, part: Part, decoded: list[DecodedSegment]) -> None:
        job, start, stop = part
        with self._cond:
            job.results[start:stop] = decoded
            job.done += stop - start
            self._cond.notify_all()

    def _finish(self, batch: list[Part], exc: BaseException) -> None:
        with self._cond:
            for job, _, _ in batch:
                job.error = exc
                if job in self._waiting:
                    self._waiting.remove(job)
            self._cond.notify_all()
