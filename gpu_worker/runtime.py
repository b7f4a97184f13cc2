"""The GPU worker process's one inference engine: loaded once, warmed up, reported by its heartbeat,
and driven by one `Batcher` thread that decodes the segments of every job in inference together.

`load_engine` runs from `worker_init` (the threads pool runs tasks in the worker process itself, so
CUDA never meets a fork), before any task. A model that fails to load is reported by `/health` and
by every inference task (`model_unavailable`, retried).

Every torch op of the process runs on the batcher's thread, but loading and the warm-up, which run on a
thread of their own that ends before the batcher starts. On CPU this matters: PyTorch's OpenMP (libgomp)
keeps a team of threads for each thread that ran a parallel op, and once those outnumber the cores it
stops spinning between parallel regions, so each of a beam step's small ops waits for a wake-up. Loading
on the main thread (which keeps its team) made the batcher decode 17 % slower on 2 cores (16.7 against
14.3 s a batch of 16 segments; small ops 2.2x slower).
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from gpu_worker.batcher import Batcher
from gpu_worker.engine import Engine
from tasks.errors import JobError, public_model_error
from tasks.settings import get_settings

log = logging.getLogger(__name__)

_engine: Engine | None = None
_batcher: Batcher | None = None
_engine_error: str | None = None
_engine_lock = threading.Lock()
_state: dict[str, Any] = {}


def load_engine() -> None:
    """Load and warm up the AV-HuBERT engine in this process (GPU worker start-up)."""
    global _engine, _batcher, _engine_error
    settings = get_settings()
    with _engine_lock:
        if _engine is not None:
            return
        started = time.time()
        try:
            if not settings.model_path:
                raise FileNotFoundError("AVHUBERT_MODEL_PATH is not set")
            with ThreadPoolExecutor(1, thread_name_prefix="avsr-model-load") as loader:  # see the module docstring
                engine, loaded = loader.submit(_load_and_warm_up).result()
            batcher = Batcher(engine, linger_s=settings.batch_linger_ms / 1000,
                              max_batch_frames=engine.max_batch_frames, max_batch_size=engine.max_batch_size,
                              stall_limit_s=settings.task_soft_time_limit_s)
        except Exception as exc:  # reported by /health and by every inference task
            _engine_error = f"{type(exc).__name__}: {exc}"
            log.exception("model failed to load")
            return
        _batcher = batcher
        _batcher.start()
        _engine, _engine_error = engine, None
        _state.update(loaded_at=loaded, load_seconds=round(loaded - started, 3),
                      warmup_seconds=round(time.time() - loaded, 3))
        log.info("model loaded", extra={"checkpoint": settings.model_path, **engine.describe()})


def _load_and_warm_up() -> tuple[Engine, float]:
    """The engine of the settings, warmed up, and when its load ended."""
    settings = get_settings()
    engine = Engine(settings.model_path, spm_path=settings.spm_path or None, dict_path=settings.dict_path or None,
                    device=settings.device, precision=settings.precision, max_batch_frames=settings.max_batch_frames)
    loaded = time.time()
    engine.warm_up()
    return engine, loaded


def engine() -> Engine:
    """This process's engine; loads it on first use (e.g. a worker started without the signal)."""
    if _engine is None:
        load_engine()
    if _engine is None:
        raise JobError("model_unavailable", f"the model is not loaded: {public_model_error(_engine_error or '')}",
                       retryable=True)
    return _engine


def batcher() -> Batcher:
    """This process's batcher (its engine loaded as `engine()` does)."""
    engine()
    assert _batcher is not None  # set with the engine
    return _batcher


def model_state() -> dict[str, Any]:
    """What the GPU worker's heartbeat adds: model loaded, device, GPU name and memory, load times."""
    state: dict[str, Any] = {"model_loaded": _engine is not None, "model_error": _engine_error,
                             "checkpoint": get_settings().model_path, **_state}
    if _engine is not None:
        state.update(_engine.describe())
        state.update(_engine.memory())
    return state
