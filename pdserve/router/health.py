"""The router's view of its workers' health and load: the pools, the stats they add up to, and a
poll every 100 ms of each worker's `/worker/load` that keeps its load, KV events (for the prefix
index) and health fresh; a worker that stops answering is routed around, and a dead prefill
worker's jobs fall back to local prefill at once."""

from __future__ import annotations

import asyncio
import logging
import time

import httpx

from pdserve.engine.client import EngineStats
from pdserve.protocol import AbortRequest, ProtocolError, WorkerLoad, decode
from pdserve.router.prefill_queue import PrefillQueue
from pdserve.router.prefix_index import PrefixIndex
from pdserve.router.whole_policy import WholePolicy
from pdserve.router.worker_handle import WorkerHandle

logger = logging.getLogger(__name__)

POLL_INTERVAL_S = 0.1
UNHEALTHY_AFTER_FAILURES = 3
# A worker that accepts connections but answers slowly is busy, not dead: under load its HTTP thread
# waits for the engine thread. Only this long without an answer makes it unhealthy.
UNRESPONSIVE_AFTER_S = 15.0


class WorkerHealth:
    """Mixed into the router's client (router/disagg_client.py), whose state it reads and updates."""

    workers: dict[str, WorkerHandle]
    queue: PrefillQueue
    prefix_index: PrefixIndex | None
    whole: WholePolicy | None
    _http: httpx.AsyncClient
    _streams: dict[str, str]

    async def _post_abort(self, worker: WorkerHandle, msg: AbortRequest) -> None:
        raise NotImplementedError

    # ---- the pools, and what they report ----

    def decode_workers(self, healthy_only: bool = True) -> list[WorkerHandle]:
        return [
            w for w in self.workers.values()
            if w.info.role in ("decode", "colocated") and (w.healthy or not healthy_only)
        ]  # fmt: skip

    def prefill_workers(self, healthy_only: bool = True) -> list[WorkerHandle]:
        return [
            w for w in self.workers.values()
            if w.info.role == "prefill" and not w.incompatible and (w.healthy or not healthy_only)
        ]  # fmt: skip

    def stats(self) -> EngineStats:
        loads = [w.load for w in self.decode_workers() if w.load is not None]
        every = self.worker_loads()
        # A prefill worker's own count mixes in its prefill jobs: count the whole requests it serves
        # by the streams open on it.
        whole = sum(self.workers[wid].info.role == "prefill" for wid in self._streams.values())
        return EngineStats(
            num_running=sum(x.num_running for x in loads) + whole,
            num_waiting=sum(x.num_waiting + x.num_reserved for x in loads) + self.queue.depth,
            num_free_blocks=sum(x.num_free_blocks for x in loads),
            num_total_blocks=sum(x.num_total_blocks for x in loads),
            num_preemptions=sum(x.num_preemptions for x in loads),
            prefix_cache_hit_tokens=sum(x.prefix_cache_hit_tokens for x in loads),
            worker_kv_usage={
                wid: 1 - load.num_free_blocks / max(load.num_total_blocks, 1) for wid, load in every.items()
            },
            engine_counters={wid: load.engine_counters for wid, load in every.items()},
        )

    def worker_loads(self) -> dict[str, WorkerLoad]:
        return {w.worker_id: w.load for w in self.workers.values() if w.load is not None and w.healthy}

    async def _poll_loop(self) -> None:
        while True:
            await asyncio.gather(*(self._poll(w) for w in list(self.workers.values())))
            await asyncio.sleep(POLL_INTERVAL_S)

    async def _poll(self, w: WorkerHandle) -> None:
        try:
            resp = await self._http.get(f"{w.info.url}/worker/load", timeout=2.0)
            if resp.status_code != 200:
                raise ConnectionError(f"HTTP {resp.status_code}")
            load = decode(resp.content, WorkerLoad)
        except httpx.TimeoutException:
            silent = time.monotonic() - w.last_answer
            if w.healthy and silent >= UNRESPONSIVE_AFTER_S:
                await self._mark_dead(w, f"no answer for {silent:.0f} s")
            return
        except (httpx.HTTPError, ConnectionError, ProtocolError) as e:
            w.failures += 1  # refused or broken connections: the process is gone
            if w.healthy and w.failures >= UNHEALTHY_AFTER_FAILURES:
                await self._mark_dead(w, str(e) or type(e).__name__)
            return
        if not w.healthy:
            logger.info("worker %s is healthy again", w.worker_id)
        w.failures, w.healthy, w.load, w.last_answer = 0, True, load, time.monotonic()
        # A prefill worker's prefix cache matters only where it may serve a request whole.
        if (w.info.role != "prefill" or self.whole is not None) and self.prefix_index is not None:
            self.prefix_index.apply(w.worker_id, load.kv_events)

    async def _mark_dead(self, w: WorkerHandle, reason: str) -> None:
        logger.error("worker %s is unhealthy (%s): routing around it", w.worker_id, reason)
        w.healthy = False
        if self.prefix_index is not None:
            self.prefix_index.remove_worker(w.worker_id)
        if w.info.role == "prefill":
            # Its jobs will never finish: their decode workers prefill locally now, not at the deadline.
            lost = self.queue.forget_worker(w.worker_id)
            for rid in lost:
                wid = self._streams.get(rid)
                if wid is not None:
                    await self._post_abort(
                        self.workers[wid],
                        AbortRequest(rid, f"prefill worker {w.worker_id} died", fall_back=True),
                    )
