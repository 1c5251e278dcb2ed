"""The shared remote-prefill queue, hosted by the router.

Decode workers' jobs go in; prefill workers pull them out (long poll) when they have room, so
load balances itself across the prefill pool, and the queue's depth is the scaling signal for
that pool. The queue also remembers which prefill worker holds each job, so an abort reaches it.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass

from pdserve.protocol import PrefillJob


@dataclass
class _Entry:
    job: PrefillJob
    enqueued: float  # monotonic
    worker_id: str | None = None  # set once pulled
    pulled: float | None = None


class PrefillQueue:
    def __init__(self) -> None:
        self._queued: OrderedDict[str, _Entry] = OrderedDict()
        self._in_flight: dict[str, _Entry] = {}
        self._cond = asyncio.Condition()
        self.wait_seconds: list[float] = []  # queue wait of each pulled job, drained by the metrics

    @property
    def depth(self) -> int:
        return len(self._queued)

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def in_flight_by_worker(self) -> Counter[str]:
        """Jobs each prefill worker holds now: exact at once, where its polled load lags."""
        return Counter(e.worker_id for e in self._in_flight.values() if e.worker_id is not None)

    async def put(self, job: PrefillJob) -> None:
        async with self._cond:
            self._queued[job.request_id] = _Entry(job, time.monotonic())
            self._cond.notify()

    async def pull(self, worker_id: str, timeout_s: float) -> PrefillJob | None:
        """The oldest live job, or None after timeout_s. Jobs past their deadline are dropped:
        their decode worker has already fallen back to local prefill."""
        deadline = time.monotonic() + timeout_s
        async with self._cond:
            while True:
                while self._queued:
                    rid, entry = self._queued.popitem(last=False)
                    if time.time() >= entry.job.deadline:
                        continue
                    entry.worker_id, entry.pulled = worker_id, time.monotonic()
                    self._in_flight[rid] = entry
                    self.wait_seconds.append(entry.pulled - entry.enqueued)
                    return entry.job
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                try:
                    await asyncio.wait_for(self._cond.wait(), remaining)
                except TimeoutError:
                    return None

    def cancel(self, request_id: str) -> tuple[str, str | None]:
        """Withdraw a job. Returns ("queued", None) if no prefill worker ever saw it,
        ("in_flight", worker_id) if one holds it, ("unknown", None) otherwise."""
        if self._queued.pop(request_id, None) is not None:
            return "queued", None
        entry = self._in_flight.pop(request_id, None)
        if entry is not None:
            return "in_flight", entry.worker_id
        return "unknown", None

    def set_destination(self, job: PrefillJob) -> tuple[str, str | None]:
        """The decode worker's job for a request queued early (router/early_prefill.py). Still
        queued: it takes the early job's place, ("queued", None). Already taken: ("in_flight",
        worker_id), and the destination must reach that worker. ("unknown", None) if neither."""
        entry = self._queued.get(job.request_id)
        if entry is not None:
            entry.job = job
            return "queued", None
        entry = self._in_flight.get(job.request_id)
        if entry is not None:
            return "in_flight", entry.worker_id
        return "unknown", None

    def pulled_at(self, request_id: str) -> float | None:
        """When a prefill worker took this job (monotonic), while it is in flight."""
        entry = self._in_flight.get(request_id)
        return entry.pulled if entry is not None else None

    def done(self, request_id: str) -> None:
        """The decode worker got the KV (or fell back): the job is over."""
        self._queued.pop(request_id, None)
        self._in_flight.pop(request_id, None)

    def forget_worker(self, worker_id: str) -> list[str]:
        """A prefill worker died: its in-flight jobs are lost (their decode workers fall back)."""
        lost = [rid for rid, e in self._in_flight.items() if e.worker_id == worker_id]
        for rid in lost:
            del self._in_flight[rid]
        return lost
