"""Pauses of a whole process, which every stream it carries sees as one stall: garbage collections
and a blocked event loop.

A full collection walks every tracked object of the heap while it holds the GIL; in a process that
streams hundreds of requests it stops all of them at once. Two things here: after start-up, the
objects that live as long as the process (model config, tokenizer, routes, compiled kernels'
Python side) are moved out of the collector's reach (`gc.freeze`, `PDSERVE_GC_FREEZE`), so a full
collection walks only what requests allocated since; and a monitor counts collections and their
pauses by generation and samples the event loop's lag, logging any pause long enough to be seen.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from pdserve import envs

logger = logging.getLogger(__name__)

# A pause from this long is logged: at 10-50 ms per token a client sees it as a stall.
VISIBLE_PAUSE_S = 0.05
LOOP_PROBE_S = 0.01
# With PDSERVE_GC_REPORT, at most one heap census per this many seconds.
REPORT_EVERY_S = 10.0


def freeze_startup_heap() -> bool:
    """Collect once, then exempt every object alive now from later collections (if enabled)."""
    if not envs.gc_freeze():
        return False
    gc.collect()
    gc.freeze()
    logger.info("garbage collector: %d start-up objects frozen", gc.get_freeze_count())
    return True


@dataclass
class PauseStats:
    collections: list[int] = field(default_factory=lambda: [0, 0, 0])  # by generation
    seconds: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    max_seconds: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    loop_lag_max_s: float = 0.0
    loop_lags_visible: int = 0  # event-loop lags of VISIBLE_PAUSE_S or more


class PauseMonitor:
    """Counts garbage collections (through gc.callbacks) and, once `watch_loop` runs (`watch`
    starts it as a task), the lag of the event loop it runs on. One per process; `close` stops
    the task and unhooks it."""

    def __init__(self, process: str) -> None:
        self.process = process
        self.stats = PauseStats()
        self._started: float | None = None
        self._report = envs.gc_report()
        self._census_due = False
        self._last_census = 0.0
        self._watch: asyncio.Task[None] | None = None
        gc.callbacks.append(self._on_gc)

    def watch(self) -> None:
        """Sample the running event loop's lag from a task of its own until `close`."""
        self._watch = asyncio.get_running_loop().create_task(self.watch_loop())

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        if self._started is None:
            return
        seconds = time.perf_counter() - self._started
        self._started = None
        gen = int(info.get("generation", 2))
        s = self.stats
        s.collections[gen] += 1
        s.seconds[gen] += seconds
        s.max_seconds[gen] = max(s.max_seconds[gen], seconds)
        if seconds >= VISIBLE_PAUSE_S:
            logger.warning(
                "%s: generation-%d garbage collection paused the process for %.0f ms (%d objects freed)",
                self.process, gen, seconds * 1e3, info.get("collected", 0),
            )  # fmt: skip
            self._census_due = self._report and gen == 2

    async def watch_loop(self, interval_s: float = LOOP_PROBE_S) -> None:
        """Sleep `interval_s` at a time and record how late each wake-up is (until cancelled)."""
        s = self.stats
        while True:
            t0 = time.perf_counter()
            await asyncio.sleep(interval_s)
            lag = time.perf_counter() - t0 - interval_s
            s.loop_lag_max_s = max(s.loop_lag_max_s, lag)
            if lag >= VISIBLE_PAUSE_S:
                s.loop_lags_visible += 1
                logger.warning("%s: event loop blocked for %.0f ms", self.process, lag * 1e3)
            if self._census_due and time.monotonic() - self._last_census >= REPORT_EVERY_S:
                self._census_due = False
                self._last_census = time.monotonic()
                logger.warning("%s: objects a full collection walks: %s", self.process, heap_census())

    def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)


def heap_census(top: int = 10) -> str:
    """The most common types among the objects the collector tracks (frozen ones excluded)."""
    counts = Counter(type(o).__name__ for o in gc.get_objects())
    total = sum(counts.values())
    return f"{total} in all; " + ", ".join(f"{name} {n}" for name, n in counts.most_common(top))
