"""Intra-op threads for a model on CPU that shares its cores with other processes (the local stack, one
small host): as many as the other processes left idle in the last second, on the cores this process may
run on (its CPU affinity), at least one and at most what the process started with.

Why: while a CPU worker's preprocessing keeps the cores busy, a 2-thread model waits at every one of a
beam step's parallel regions for its second thread to be scheduled again: on 2 cores a one-segment
decode took 11 s beside preprocessing with 2 threads and 4.3 s with 1 (about 2 s alone with 2). Once
the cores are free again, 2 threads decode about 1.8x faster than 1. The thread count does not change
a result (each parallel op splits its outputs, not its sums, over the threads: a test compares them).
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections import deque
from pathlib import Path

PROC_STAT = Path("/proc/stat")


def _machine_busy_s() -> tuple[float, int] | None:
    """Seconds of CPU time the cores this process may run on (its CPU affinity: a container's cpuset, a
    `taskset`) spent busy since boot, and how many such cores; None where /proc/stat cannot be read (not
    Linux). Cores outside the affinity set are not counted: other containers' work there leaves ours idle."""
    try:
        lines = PROC_STAT.read_text().splitlines()
    except OSError:
        return None
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    busy, cores = 0, 0
    for line in lines[1:]:
        name, *values = line.split()
        if not (name.startswith("cpu") and name[3:].isdigit()):
            continue
        if allowed is not None and int(name[3:]) not in allowed:
            continue
        busy += _busy_ticks(values)
        cores += 1
    if cores == 0:  # no per-core lines (or none of ours): the machine-wide first line
        busy = _busy_ticks(lines[0].split()[1:])
        cores = max(1, len(allowed) if allowed else os.cpu_count() or 1)
    return busy / os.sysconf("SC_CLK_TCK"), cores


def _busy_ticks(values: list[str]) -> int:
    """Busy clock ticks of a /proc/stat `cpu` line's values (user nice system idle iowait irq softirq steal ...):
    all but idle and iowait; guest time is already counted in user."""
    fields = [int(v) for v in values]
    return sum(fields[:8]) - fields[3] - (fields[4] if len(fields) > 4 else 0)


def _own_busy_s() -> float:
    times = os.times()
    return times.user + times.system


class CoreShare:
    """`threads()`: the intra-op threads to use now (see the module docstring), from the last `window_s` of a
    sampler thread's looks at the machine (every `period_s`)."""

    def __init__(self, max_threads: int, *, window_s: float = 1.0, period_s: float = 0.25) -> None:
        self.max_threads = max(1, max_threads)
        self.window_s, self.period_s = window_s, period_s
        samples = max(2, int(window_s / period_s) + 1)
        self._samples: deque[tuple[float, float, tuple[float, int]]] = deque(maxlen=samples)
        self._lock = threading.Lock()
        self._sampler: threading.Thread | None = None

    def _look(self) -> bool:
        machine = _machine_busy_s()
        if machine is None:
            return False
        with self._lock:
            self._samples.append((time.monotonic(), _own_busy_s(), machine))
        return True

    def threads(self) -> int:
        """The cores the other processes left idle lately, between 1 and `max_threads` (`max_threads` until
        there is a window to judge by, or where /proc/stat cannot be read)."""
        if self._sampler is None:
            self._sampler = threading.Thread(target=_sample_while_used, args=(weakref.ref(self),),
                                             name="avsr-core-share", daemon=True)
            self._sampler.start()
        with self._lock:
            if len(self._samples) < 2:
                return self.max_threads
            (t0, own0, machine0), (t1, own1, machine1) = self._samples[0], self._samples[-1]
        if t1 - t0 < self.period_s:
            return self.max_threads
        others = max(0.0, (machine1[0] - machine0[0]) - (own1 - own0)) / (t1 - t0)  # cores busy with others
        return max(1, min(self.max_threads, int(machine1[1] - others + 0.5)))


def _sample_while_used(ref: weakref.ref[CoreShare]) -> None:
    """The sampler thread: looks every `period_s` until its `CoreShare` is gone or /proc/stat unreadable."""
    while (share := ref()) is not None and share._look():
        period = share.period_s
        del share  # the thread must not keep its CoreShare alive
        time.sleep(period)
