"""One simulated engine: the step loop of engine/scheduler.py, timed by a PerfModel.

A step schedules running requests first (a decode token each, or the next chunk of a prompt still
being prefilled), then admits waiting requests while the token budget, the sequence slots and the
KV blocks last. With a KV capacity (`Deployment.kv_blocks`), a running request that cannot grow
preempts the most recently admitted running request, which frees its blocks and goes back to the
front of the queue to be computed again, prompt and output so far (preemption by recompute); and
a step that had to preempt admits nothing new. Without one (the planner's default) memory never
runs out. A decode worker also holds blocks for the prompts being prefilled remotely for it.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pdserve.engine.chunking import prompt_chunk
from pdserve.planner.perf_model import PerfModel

if TYPE_CHECKING:
    from pdserve.planner.simulator import Deployment, SimRequest


@dataclass(eq=False)
class Req:
    spec: SimRequest
    num_computed: int = 0  # tokens whose KV exists
    num_output: int = 0
    token_times: list[float] = field(default_factory=list)
    remote: bool = False
    fallback: bool = False  # its remote prefill timed out: prefilled where it decodes
    whole: bool = False  # served end to end by a prefill worker
    decode_worker: Engine | None = None
    # Phase timestamps (absolute), as the router records them.
    enqueued: float | None = None
    pulled: float | None = None
    kv_seconds: float = 0.0
    wake: float = 0.0  # extra seconds of the first step computing its prompt (an idle deployment woke)
    # Remote prefill: when the decode worker reserved its blocks (the KV's destination), and, for a
    # prefill the router started early that ended before then, (prefill worker, started) to ship later.
    reserved_at: float | None = None
    parked: tuple[Engine, float] | None = None

    @property
    def num_tokens(self) -> int:
        """Known tokens: the prompt and every sampled token (the last one not yet computed)."""
        return self.spec.prompt_len + self.num_output

    @property
    def uncomputed(self) -> int:
        return self.num_tokens - self.num_computed

    @property
    def decoding(self) -> bool:
        """One token left to compute after a sampled one (not a prompt, nor a recompute)."""
        return self.num_output > 0 and self.num_computed >= self.spec.prompt_len + self.num_output - 1


class EventLoop:
    def __init__(self) -> None:
        self.now = 0.0
        self._events: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()

    def at(self, t: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self._events, (t, next(self._seq), fn))

    def run(self) -> None:
        while self._events:
            self.now, _, fn = heapq.heappop(self._events)
            fn()


class Engine:
    """One worker's engine: a step loop over its waiting and running requests."""

    def __init__(self, sim: EventLoop, perf: PerfModel, dep: Deployment, role: str, name: str) -> None:
        self.sim, self.perf, self.dep, self.role, self.name = sim, perf, dep, role, name
        self.waiting: deque[Req] = deque()
        self.running: list[Req] = []
        self.busy = False
        self.on_prefilled: Callable[[Engine, Req, float, float], None] | None = None  # prefill role
        self.on_idle_room: Callable[[Engine], None] | None = None  # prefill role: pull more
        self.prefill_started: dict[int, float] = {}  # prefill role: request index -> first chunk
        self.pending: list[Callable[[], None]] = []  # engine calls waiting for the step to end
        self.streams = 0  # requests it streams to clients, counted from routing to the last token
        self.last_end = 0.0  # when its last stream ended (a run starts right after a warm-up)
        self.free_blocks = dep.kv_blocks if dep.kv_blocks is not None else math.inf
        self.held: dict[int, int] = {}  # request index -> KV blocks it holds here
        self.dropped: set[int] = set()  # requests given up while a step computing them ran
        self.preemptions = 0

    @property
    def load(self) -> int:
        return len(self.running) + len(self.waiting)

    def add(self, req: Req, front: bool = False) -> None:
        (self.waiting.appendleft if front else self.waiting.append)(req)
        self.kick()

    def call(self, fn: Callable[[], None]) -> None:
        """Run fn on the engine thread: now if it idles, else once the running step ends."""
        if self.busy:
            self.pending.append(fn)
        else:
            fn()

    def kick(self) -> None:
        if not self.busy and (self.waiting or self.running):
            self._step()

    # ---- KV blocks ----

    def allocate(self, req: Req, tokens: int) -> bool:
        """Blocks for `req`'s first `tokens` tokens; False (and nothing taken) if too few are free."""
        if self.dep.kv_blocks is None:
            return True
        need = -(-tokens // self.dep.block_size) - self.held.get(req.spec.index, 0)
        if need > self.free_blocks:
            return False
        if need > 0:
            self.free_blocks -= need
            self.held[req.spec.index] = self.held.get(req.spec.index, 0) + need
        return True

    def release(self, req: Req) -> None:
        self.free_blocks += self.held.pop(req.spec.index, 0)

    def drop(self, req: Req) -> None:
        """Forget a request (given up): out of the queues, its blocks freed."""
        if req in self.waiting:
            self.waiting.remove(req)
        if req in self.running:
            self.running.remove(req)
            if self.busy:
                self.dropped.add(req.spec.index)
        self.release(req)
        self.prefill_started.pop(req.spec.index, None)
        self.kick()

    def _preempt(self, req: Req) -> None:
        self.release(req)
        req.num_computed = 0
        self.waiting.appendleft(req)
        self.preemptions += 1

    # ---- the step ----

    def _schedule(self) -> list[tuple[Req, int]]:
        budget, cap = self.dep.max_num_batched_tokens, self.dep.prefill_chunk_cap
        batch: list[tuple[Req, int]] = []
        if cap:  # decodes before prompt chunks, as the engine's scheduler orders them then
            self.running.sort(key=lambda r: r.uncomputed > 1)
        if self.dep.kv_blocks is None:  # memory never runs out: the running requests, in order
            for req in self.running:
                if budget <= 0:
                    break
                n = prompt_chunk(req.uncomputed, budget, cap, bool(self.waiting))
                batch.append((req, n))
                budget -= n
        preempted = False
        i = len(batch) if self.dep.kv_blocks is None else 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = prompt_chunk(req.uncomputed, budget, cap, bool(self.waiting))
            while not self.allocate(req, req.num_computed + n):
                victim = self.running.pop()  # never one already scheduled: those sit before i
                self._preempt(victim)
                preempted = True
                if victim is req:
                    break
            else:
                batch.append((req, n))
                budget -= n
                i += 1
        while self.waiting and budget > 0 and not preempted and len(self.running) < self.dep.max_num_seqs:
            req = self.waiting[0]
            n = prompt_chunk(req.uncomputed, budget, cap, len(self.waiting) > 1)
            if not self.allocate(req, req.num_computed + n):
                break
            self.running.append(self.waiting.popleft())
            batch.append((req, n))
            budget -= n
        return batch

    def _step(self) -> None:
        batch = self._schedule()
        if not batch:
            return
        decodes = [r for r, _ in batch if r.decoding]
        chunks = [(n, r.num_computed) for r, n in batch if not r.decoding]
        ctx = sum(r.num_computed for r in decodes)
        max_ctx = max((r.num_computed for r in decodes), default=0)
        # Tokens this step sends to clients; a prefill job's first token goes with the KV.
        streamed = sum(
            self.role != "prefill" or r.whole for r, n in batch if r.num_computed + n >= r.num_tokens
        )
        dt = self.perf.step_s(len(decodes), ctx, chunks, max_ctx, streamed)
        if self.perf.wake_s:
            dt += max((r.wake for r, _ in batch), default=0.0)
            for r, _ in batch:
                r.wake = 0.0
        if self.role == "prefill":
            for r, _ in batch:
                if not r.whole:
                    self.prefill_started.setdefault(r.spec.index, self.sim.now)
        self.busy = True
        self.sim.at(self.sim.now + dt, lambda: self._finish_step(batch))
        if self.on_idle_room is not None and not self.waiting:
            self.on_idle_room(self)

    def _finish_step(self, batch: list[tuple[Req, int]]) -> None:
        now = self.sim.now
        for req, n in batch:
            if self.dropped and req.spec.index in self.dropped:
                continue  # given up while its step ran: the step's work is dropped
            req.num_computed += n
            if req.num_computed < req.num_tokens:
                continue  # mid-prompt chunk: nothing sampled
            if self.role == "prefill" and not req.whole:
                self.running.remove(req)
                self.release(req)
                req.num_output = 1  # the prefill worker samples the first token
                assert self.on_prefilled is not None
                self.on_prefilled(self, req, self.prefill_started.pop(req.spec.index), now)
                continue
            req.num_output += 1
            req.token_times.append(now)
            if req.num_output >= req.spec.output_len:
                self.running.remove(req)
                self.release(req)
                self.streams -= 1
                self.last_end = now
        self.dropped.clear()
        while self.pending:  # calls made during the step, and any they make in turn
            calls, self.pending = self.pending, []
            for fn in calls:
                fn()
        self.busy = False
        self.kick()
        if self.on_idle_room is not None and not self.waiting:
            self.on_idle_room(self)
