"""Starting a remote prefill before the decode worker has decided on it.

Without this, a long prompt's prefill waits for a round trip: the router sends the request to its
decode worker, whose engine thread decides (between two of its steps) and reserves blocks, and the
job comes back to the router's queue; only then may a prefill worker take it. The router can make
the same decision itself, from the policy each decode worker publishes (its threshold, its prefill
speed estimate) and its own prefix index for that worker's cache, and queue the job at once,
without a destination. The decode worker, told the prefill has started, reserves blocks and answers
with them (or declines, when it has none to reserve); the router passes the destination on to
whichever prefill worker holds the job, which has been computing all along (engine/kv_output.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import httpx

from pdserve import envs
from pdserve.protocol import AbortRequest, PrefillDestination, PrefillJob, WorkerInfo, WorkerLoad, encode
from pdserve.router.prefill_queue import PrefillQueue
from pdserve.router.prefix_index import PrefixIndex
from pdserve.router.worker_handle import WorkerHandle
from pdserve.workers.disagg_policy import DisaggPolicy, choose_prefill_path

logger = logging.getLogger(__name__)


def decide_early(
    info: WorkerInfo,
    load: WorkerLoad | None,
    uncached_tokens: int,
    queue_depth: int,
    num_prefill_workers: int,
) -> bool:
    """Whether the decode worker would send this prompt to the prefill pool, by its own policy."""
    if info.role != "decode" or info.disagg_policy is None or load is None:
        return False
    if load.prefill_tokens_per_s <= 0:
        return False
    policy = DisaggPolicy(**info.disagg_policy)
    return choose_prefill_path(
        uncached_tokens, queue_depth, num_prefill_workers, load.prefill_tokens_per_s, policy
    ).remote


def early_job(
    request_id: str, prompt_token_ids: list[int], params: dict[str, object], info: WorkerInfo
) -> PrefillJob:
    """The job as queued before its destination exists (kv_port 0: see PrefillJob.has_destination)."""
    return PrefillJob(
        request_id=request_id, prompt_token_ids=prompt_token_ids, params=params,
        decode_worker_id=info.worker_id, kv_host="", kv_port=0, dst_block_ids=[], skip_tokens=0,
        deadline=time.time() + info.kv_timeout_s, layout=info.layout,
    )  # fmt: skip


class EarlyPrefills:
    """The router's side: which requests' prefills it started, and whose destinations it sent."""

    def __init__(
        self,
        queue: PrefillQueue,
        http: httpx.AsyncClient,
        workers: dict[str, WorkerHandle],
        post_abort: Callable[[WorkerHandle, AbortRequest], Awaitable[None]],
    ) -> None:
        self.queue = queue
        self._http = http
        self._workers = workers
        self._post_abort = post_abort
        self._started: set[str] = set()
        self._destined: set[str] = set()  # a prefill worker may know where to write

    def job_for(
        self,
        request_id: str,
        prompt: list[int],
        params: dict[str, object],
        decoder: WorkerHandle,
        prefix_index: PrefixIndex,
        num_prefill_workers: int,
    ) -> PrefillJob | None:
        """The job to queue now for this request, if its decode worker would send it remote."""
        if num_prefill_workers == 0 or decoder.info.role != "decode":
            return None
        cached = prefix_index.overlap(prompt, [decoder.worker_id])[decoder.worker_id]
        if not decide_early(
            decoder.info, decoder.load, len(prompt) - cached, self.queue.depth, num_prefill_workers
        ):
            return None
        self._started.add(request_id)
        return early_job(request_id, prompt, params, decoder.info)

    def may_write(self, request_id: str) -> bool:
        """Whether a prefill worker may be writing this request's KV: not before its destination."""
        return request_id not in self._started or request_id in self._destined

    def forget(self, request_id: str) -> None:
        self._started.discard(request_id)
        self._destined.discard(request_id)

    async def route_destination(
        self, job: PrefillJob, decoder: WorkerHandle, num_prefill_workers: int
    ) -> None:
        """The decode worker reserved blocks for a job queued early: the destination goes wherever
        the job is now."""
        delay = envs.fault_destination_delay_s()
        if delay:
            await asyncio.sleep(delay)
        rid = job.request_id
        state, holder = self.queue.set_destination(job)
        if state != "unknown":
            self._destined.add(rid)
        if state == "queued":
            return
        if state == "unknown":  # its prefill worker died, or it expired: an ordinary job now
            if num_prefill_workers:
                self._destined.add(rid)
                await self.queue.put(job)
            else:
                await self._post_abort(decoder, AbortRequest(rid, "no prefill worker", fall_back=True))
            return
        assert holder is not None
        try:
            resp = await self._http.post(
                f"{self._workers[holder].info.url}/worker/prefill/destination",
                content=encode(PrefillDestination.of(job)), timeout=5.0,
            )  # fmt: skip
            if resp.status_code != 200:
                raise ConnectionError(f"HTTP {resp.status_code}")
        except (httpx.HTTPError, ConnectionError) as e:
            logger.warning("[%s] destination to %s failed (%s): prefilling locally", rid, holder, e)
            self.queue.cancel(rid)
            await self._post_abort(decoder, AbortRequest(rid, "prefill worker unreachable", fall_back=True))

    async def withdraw(self, request_id: str) -> None:
        """The decode worker prefills it after all: the early job is not needed."""
        state, holder = self.queue.cancel(request_id)
        if state == "in_flight" and holder in self._workers:
            await self._post_abort(
                self._workers[holder], AbortRequest(request_id, "declined by the decode worker")
            )
