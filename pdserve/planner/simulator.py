"""Discrete-event simulation of the router and its worker pools, driven by a PerfModel.

Each simulated worker runs the engine's step loop: the same policy as engine/scheduler.py
(running requests first — a decode token or the next prompt chunk — then admission of waiting
requests while the token budget and sequence slots last), and a step lasts what the perf model
says for what it computed. KV memory is not modelled (no preemption): plans are for loads a
cache holds.

Deployments: `colocated` (k workers, chunked prefill), and disaggregated xPyD where each decode
worker applies `choose_prefill_path` (workers/disagg_policy.py) per request; prefill workers pull
from one shared FIFO queue when their own waiting queue is empty (as workers/prefill.py does),
KV moves over a link of the given fabric, streamed layer by layer behind the prefill, and the
request then queues at the front of its decode worker. With a WholePolicy (`--prefill-serves-whole`)
the router first asks `choose_whole_target` (router/whole_policy.py) whether an idle prefill worker
serves a short request whole, which it then runs like a co-located worker. Results are RequestResults, so
bench/report.py computes the percentiles and goodput; each carries the phase timestamps the
router would send (`phases`), so a measurement can be compared with its prediction phase by phase.

A decode worker touches its engine only between steps (AsyncLLM drains its call queue between
`engine.step()`s): its local-or-remote decision, and so the job's entry into the prefill queue,
waits for the step it is running to end, and so does a request whose KV has landed before its
first token goes out. The simulator defers those two the same way.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from pdserve.bench.client import RequestResult
from pdserve.planner.perf_model import PerfModel
from pdserve.router.policy import Candidate
from pdserve.router.whole_policy import PrefillCandidate, WholePolicy, choose_whole_target
from pdserve.workers.disagg_policy import DisaggPolicy, choose_prefill_path


@dataclass(frozen=True)
class SimRequest:
    index: int
    arrival_s: float
    prompt_len: int
    output_len: int


@dataclass(frozen=True)
class Deployment:
    colocated: int = 0
    prefill: int = 0
    decode: int = 0
    max_num_batched_tokens: int = 512
    max_num_seqs: int = 64
    fabric: str = "tcp"
    # The decode workers' policy; None = always remote (pure xPyD) when prefill workers exist.
    policy: DisaggPolicy | None = None
    # The decode worker's starting estimate of its local prefill speed (it then learns it).
    local_prefill_tokens_per_s: float = 1500.0
    # The router's rule for idle prefill workers serving short requests whole; None: they only prefill.
    whole: WholePolicy | None = None

    def __post_init__(self) -> None:
        if self.colocated and (self.prefill or self.decode):
            raise ValueError("a deployment is either co-located or prefill/decode, not both")
        if not self.colocated and not self.decode:
            raise ValueError("a deployment needs at least one decode or colocated worker")
        if self.prefill < 0 or self.decode < 0 or self.colocated < 0:
            raise ValueError("worker counts must be >= 0")

    @property
    def gpus(self) -> int:
        return self.colocated + self.prefill + self.decode

    @property
    def label(self) -> str:
        if self.colocated:
            return f"colocated x{self.colocated}"
        kind = "conditional " if self.policy is not None else ""
        whole = " (prefill serves whole)" if self.whole is not None else ""
        return f"{kind}{self.prefill}P{self.decode}D{whole}"


@dataclass(eq=False)
class _Req:
    spec: SimRequest
    num_computed: int = 0  # prompt tokens whose KV exists
    num_output: int = 0
    token_times: list[float] = field(default_factory=list)
    remote: bool = False
    whole: bool = False  # served end to end by a prefill worker
    decode_worker: _Worker | None = None
    # Phase timestamps (absolute), as the router records them.
    enqueued: float | None = None
    pulled: float | None = None
    kv_seconds: float = 0.0

    @property
    def num_tokens(self) -> int:
        """Known tokens: the prompt and every sampled token (the last one not yet computed)."""
        return self.spec.prompt_len + self.num_output

    @property
    def uncomputed(self) -> int:
        return self.num_tokens - self.num_computed

    @property
    def decoding(self) -> bool:
        return self.num_output > 0 and self.num_computed >= self.spec.prompt_len


class _Sim:
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


class _Worker:
    """One engine: a step loop over its waiting and running requests."""

    def __init__(self, sim: _Sim, perf: PerfModel, dep: Deployment, role: str, name: str) -> None:
        self.sim, self.perf, self.dep, self.role, self.name = sim, perf, dep, role, name
        self.waiting: deque[_Req] = deque()
        self.running: list[_Req] = []
        self.busy = False
        self.on_prefilled: Callable[[_Worker, _Req, float, float], None] | None = None  # prefill role
        self.on_idle_room: Callable[[_Worker], None] | None = None  # prefill role: pull more
        self.prefill_started: dict[int, float] = {}  # prefill role: request index -> first chunk
        self.pending: list[Callable[[], None]] = []  # engine calls waiting for the step to end
        self.streams = 0  # requests it streams to clients, counted from routing to the last token

    @property
    def load(self) -> int:
        return len(self.running) + len(self.waiting)

    def add(self, req: _Req, front: bool = False) -> None:
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

    def _step(self) -> None:
        budget = self.dep.max_num_batched_tokens
        batch: list[tuple[_Req, int]] = []
        for req in self.running:
            if budget <= 0:
                break
            n = min(req.uncomputed, budget)
            batch.append((req, n))
            budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.dep.max_num_seqs:
            req = self.waiting.popleft()
            self.running.append(req)
            n = min(req.uncomputed, budget)
            batch.append((req, n))
            budget -= n
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
        if self.role == "prefill":
            for r, _ in batch:
                if not r.whole:
                    self.prefill_started.setdefault(r.spec.index, self.sim.now)
        self.busy = True
        self.sim.at(self.sim.now + dt, lambda: self._finish_step(batch))
        if self.on_idle_room is not None and not self.waiting:
            self.on_idle_room(self)

    def _finish_step(self, batch: list[tuple[_Req, int]]) -> None:
        now = self.sim.now
        for req, n in batch:
            req.num_computed += n
            if req.num_computed < req.num_tokens:
                continue  # mid-prompt chunk: nothing sampled
            if self.role == "prefill" and not req.whole:
                self.running.remove(req)
                req.num_output = 1  # the prefill worker samples the first token
                assert self.on_prefilled is not None
                self.on_prefilled(self, req, self.prefill_started.pop(req.spec.index), now)
                continue
            req.num_output += 1
            req.token_times.append(now)
            if req.num_output >= req.spec.output_len:
                self.running.remove(req)
                self.streams -= 1
        while self.pending:  # calls made during the step, and any they make in turn
            calls, self.pending = self.pending, []
            for fn in calls:
                fn()
        self.busy = False
        self.kick()
        if self.on_idle_room is not None and not self.waiting:
            self.on_idle_room(self)


class _Cluster:
    def __init__(self, perf: PerfModel, dep: Deployment) -> None:
        self.sim = _Sim()
        self.perf, self.dep = perf, dep
        if dep.colocated:
            self.decoders = [_Worker(self.sim, perf, dep, "colocated", f"c{i}") for i in range(dep.colocated)]
        else:
            self.decoders = [_Worker(self.sim, perf, dep, "decode", f"d{i}") for i in range(dep.decode)]
        self.prefillers = [_Worker(self.sim, perf, dep, "prefill", f"p{i}") for i in range(dep.prefill)]
        for p in self.prefillers:
            p.on_prefilled = self._prefilled
            p.on_idle_room = self._pull
        self.queue: deque[_Req] = deque()
        self.link_free: dict[str, float] = {p.name: 0.0 for p in self.prefillers}
        self.prefill_speed = dep.local_prefill_tokens_per_s
        self.decisions: dict[str, int] = {"local": 0, "remote": 0}
        if dep.whole is not None:
            self.decisions["whole"] = 0

    def arrive(self, req: _Req) -> None:
        d = min(self.decoders, key=lambda w: w.load)
        target = self._whole_target(req, d) or d
        req.decode_worker = target
        target.streams += 1
        if target is not d:
            req.whole = True
            self.decisions["whole"] += 1
            target.add(req)
            return
        if self.dep.colocated or not self.prefillers:
            self.decisions["local"] += 1
            d.add(req)
            return
        depth = len(self.queue)  # the router sends the depth it sees on arrival
        d.call(lambda: self._admit(req, d, depth))

    def _whole_target(self, req: _Req, d: _Worker) -> _Worker | None:
        """The router's whole-request choice. No prefix caching or KV memory here: nothing is cached
        and usage is nil; loads are the streams routed to each worker, counted as the router does."""
        if self.dep.whole is None:
            return None
        cands = [
            PrefillCandidate(
                p.name, 0, p.streams, 0, 0.0, num_jobs=sum(not r.whole for r in [*p.running, *p.waiting])
            )
            for p in self.prefillers
        ]
        decode = Candidate(d.name, 0, d.streams, 0, 0.0)
        target = choose_whole_target(req.spec.prompt_len, decode, len(self.queue), cands, self.dep.whole)
        return next((p for p in self.prefillers if p.name == target.worker_id), None)

    def _admit(self, req: _Req, d: _Worker, queue_depth: int) -> None:
        """The decode worker's engine thread: prefill here, or reserve blocks and enqueue a job."""
        remote = True
        if self.dep.policy is not None:
            decision = choose_prefill_path(
                req.spec.prompt_len,
                queue_depth,
                len(self.prefillers),
                self.prefill_speed,
                self.dep.policy,
            )
            remote = decision.remote
        self.decisions["remote" if remote else "local"] += 1
        if not remote:
            # The worker learns its local speed from local prefills (workers/common.PrefillSpeed).
            if req.spec.prompt_len >= 64:
                t = self.perf.prefill_s(req.spec.prompt_len)
                self.prefill_speed = 0.8 * self.prefill_speed + 0.2 * req.spec.prompt_len / t
            d.add(req)
            return
        req.remote = True
        req.enqueued = self.sim.now
        self.queue.append(req)
        for p in self.prefillers:
            self._pull(p)

    def _pull(self, p: _Worker) -> None:
        if self.queue and not p.waiting and len(p.running) < self.dep.max_num_seqs:
            req = self.queue.popleft()
            req.pulled = self.sim.now
            p.add(req)

    def _prefilled(self, p: _Worker, req: _Req, started: float, done: float) -> None:
        # Layer-wise streaming: layer i's KV leaves as soon as it is computed, so the link is busy
        # from the prefill's start and the last layer lands one layer's share after the prefill.
        p_name = p.name
        xfer = self.perf.transfer_s(req.spec.prompt_len, self.dep.fabric)
        link_start = max(started, self.link_free.get(p_name, 0.0))
        arrival = max(done + xfer / self.perf.num_layers, link_start + xfer)
        self.link_free[p_name] = arrival
        req.kv_seconds = arrival - started
        assert req.decode_worker is not None
        d = req.decode_worker
        self.sim.at(arrival, lambda: d.call(lambda: self._kv_arrived(req, d)))

    def _kv_arrived(self, req: _Req, d: _Worker) -> None:
        req.token_times.append(self.sim.now)  # the first token comes with the KV
        if req.num_output < req.spec.output_len:
            d.add(req, front=True)
        else:
            d.streams -= 1


def simulate(perf: PerfModel, dep: Deployment, requests: list[SimRequest]) -> list[RequestResult]:
    """Per-request results (times relative to each arrival), in request order."""
    return simulate_with_stats(perf, dep, requests)[0]


def simulate_with_stats(
    perf: PerfModel, dep: Deployment, requests: list[SimRequest]
) -> tuple[list[RequestResult], dict[str, int]]:
    """`simulate`, and how many requests were prefilled locally and remotely."""
    cluster = _Cluster(perf, dep)
    reqs = [_Req(s) for s in requests]
    for r in reqs:
        cluster.sim.at(r.spec.arrival_s, lambda r=r: cluster.arrive(r))  # type: ignore[misc]
    cluster.sim.run()
    out = []
    for r in reqs:
        times = [t - r.spec.arrival_s for t in r.token_times]
        res = RequestResult(r.spec.index, r.spec.prompt_len, r.spec.output_len, r.spec.arrival_s)
        if times:
            res.ttft_s, res.chunk_times, res.e2e_s, res.output_tokens = times[0], times, times[-1], len(times)
            res.phases = _phases(r, times)
        else:
            res.error = "not finished"
        out.append(res)
    return out, cluster.decisions


def _phases(r: _Req, times: list[float]) -> dict[str, float | str]:
    """The router's phase record of a finished request, in seconds since its arrival."""
    out: dict[str, float | str] = {"arrival": 0.0, "routed": 0.0, "first_token": times[0], "end": times[-1]}
    for name, t in (("enqueued", r.enqueued), ("pulled", r.pulled)):
        if t is not None:
            out[name] = t - r.spec.arrival_s
    out["prefill_path"] = "remote" if r.remote else "whole" if r.whole else "local"
    out["kv_seconds"] = r.kv_seconds
    return out
