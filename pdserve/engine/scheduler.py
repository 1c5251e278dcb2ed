"""Continuous batching with a per-step token budget, chunked prefill and preemption by recompute.

One step schedules running requests first (a decode token each, or the next chunk of a prompt
still being prefilled), then admits waiting requests while budget, sequence slots and KV blocks
last. With `prefill_chunk_cap`, one request's chunk is capped while others wait (chunking.py), and
running requests that decode go before those still prefilling. When a running request cannot
grow, the most recently admitted running request is preempted: its blocks are freed and it goes
back to the front of the queue to be recomputed.
The scheduler moves only request objects; tensors are the runner's business.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field

from pdserve.config import SchedulerConfig
from pdserve.engine.block_manager import BlockManager
from pdserve.engine.chunking import prompt_chunk
from pdserve.engine.request import Request, RequestStatus

logger = logging.getLogger(__name__)


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int
    # Tokens already sampled on the device but not yet appended to the request: a decode step
    # launched before the previous step's tokens reached the host (see decode_pipeline.py).
    ahead: int = 0

    @property
    def samples(self) -> bool:
        """Whether this chunk reaches the end of the known tokens, so a next token is sampled."""
        req = self.request
        return req.num_computed_tokens + self.num_new_tokens == req.num_tokens + self.ahead


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, cfg: SchedulerConfig, block_manager: BlockManager, device_type: str = "cpu") -> None:
        self.cfg = cfg.for_device(device_type)  # the limits set, from now on
        self.block_manager = block_manager
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        # Decode side of a remote prefill: blocks held, KV being written by a prefill worker.
        self.reserved: dict[str, Request] = {}
        self.num_preemptions = 0

    @property
    def max_num_seqs(self) -> int:
        assert self.cfg.max_num_seqs is not None  # set by for_device()
        return self.cfg.max_num_seqs

    @property
    def max_num_batched_tokens(self) -> int:
        assert self.cfg.max_num_batched_tokens is not None  # set by for_device()
        return self.cfg.max_num_batched_tokens

    def add(self, req: Request) -> None:
        if req.request_id in self.requests:
            raise ValueError(f"[{req.request_id}] duplicate request id")
        needed = self.block_manager.blocks_needed(req.num_prompt_tokens + req.max_tokens)
        if needed > self.block_manager.num_blocks:
            raise ValueError(
                f"[{req.request_id}] needs {needed} KV blocks at its longest, but the cache has "
                f"{self.block_manager.num_blocks}"
            )
        if not self.cfg.enable_chunked_prefill and req.num_prompt_tokens > self.max_num_batched_tokens:
            raise ValueError(
                f"[{req.request_id}] prompt of {req.num_prompt_tokens} tokens exceeds the per-step budget of "
                f"{self.max_num_batched_tokens} and chunked prefill is off"
            )
        self.requests[req.request_id] = req
        self.waiting.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        i = 0
        cap = self.cfg.prefill_chunk_cap if self.cfg.enable_chunked_prefill else 0
        if cap:
            # Decodes before prompt chunks (stable: admission order within each), so a short
            # request admitted beside a long prompt's chunk is not skipped by its next one.
            self.running.sort(key=lambda r: r.num_uncomputed_tokens > 1)
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = prompt_chunk(req.num_uncomputed_tokens, budget, cap, bool(self.waiting))
            if not self.cfg.enable_chunked_prefill and n < req.num_uncomputed_tokens:
                i += 1
                continue
            while not self.block_manager.allocate(req, n):
                victim = self.running.pop()  # never one already scheduled: those sit before i
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is req:
                    break
            else:
                out.scheduled.append(ScheduledRequest(req, n))
                budget -= n
                i += 1
        # Admit nothing new in a step that had to preempt: memory is short.
        while self.waiting and budget > 0 and not out.preempted and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            # A request back from a remote prefill (or its fallback) already holds its blocks.
            computed = self.block_manager.get_computed_blocks(req) if not req.block_table else []
            remaining = req.num_uncomputed_tokens - len(computed) * self.block_manager.block_size
            n = prompt_chunk(remaining, budget, cap, len(self.waiting) > 1)
            if not self.cfg.enable_chunked_prefill and n < remaining:
                break
            if not self.block_manager.allocate(req, n, computed):
                break
            self.waiting.popleft()
            if req.status == RequestStatus.WAITING and computed:
                req.num_cached_tokens = len(computed) * self.block_manager.block_size
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.scheduled.append(ScheduledRequest(req, n))
            budget -= n
        return out

    def finish(self, req: Request, status: RequestStatus, free_blocks: bool = True) -> None:
        """Idempotent: a request finished twice (e.g. aborted after stopping) is left alone.
        free_blocks=False leaves the blocks held (the caller frees them later, e.g. once a remote
        writer into them has stopped)."""
        if req.status.finished:
            return
        req.status = status
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.reserved.pop(req.request_id, None)
        if free_blocks:
            self.block_manager.free(req)
        self.requests.pop(req.request_id, None)

    # ---- remote prefill, decode side ----

    def reserve(self, req: Request) -> bool:
        """Hold blocks for the whole prompt (prefix hits included) so a prefill worker can write its
        KV into them. False if memory is short; the caller then prefills locally."""
        if req.request_id in self.requests:
            raise ValueError(f"[{req.request_id}] duplicate request id")
        computed = self.block_manager.get_computed_blocks(req)
        uncached = req.num_tokens - len(computed) * self.block_manager.block_size
        if not self.block_manager.allocate(req, uncached, computed):
            return False
        req.num_cached_tokens = req.num_computed_tokens
        req.status = RequestStatus.WAITING_FOR_KV
        self.requests[req.request_id] = req
        self.reserved[req.request_id] = req
        return True

    def kv_arrived(self, req: Request) -> None:
        """All prompt KV is in the reserved blocks: the request queues for decoding."""
        del self.reserved[req.request_id]
        req.num_computed_tokens = req.num_tokens
        self.block_manager.cache_full_blocks(req)
        req.status = RequestStatus.WAITING
        self.waiting.appendleft(req)

    def fall_back_to_local(self, req: Request) -> None:
        """The remote prefill failed: compute the prompt here, in the blocks already held."""
        del self.reserved[req.request_id]
        req.num_computed_tokens = req.num_cached_tokens
        req.status = RequestStatus.WAITING
        self.waiting.appendleft(req)

    def _preempt(self, req: Request) -> None:
        logger.info("[%s] preempted (recompute): KV blocks exhausted", req.request_id)
        self.block_manager.free(req)
        req.num_computed_tokens = 0
        req.status = RequestStatus.PREEMPTED
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)
