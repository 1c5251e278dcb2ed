"""Discrete-event simulation of the router and its worker pools, driven by a PerfModel.

Each simulated worker runs the engine's step loop (sim_engine.py: the policy of
engine/scheduler.py, with preemption by recompute when a KV capacity is given), and a step lasts
what the perf model says for what it computed. Plans use no KV capacity: they are for loads a
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

A request that finds the whole deployment idle pays the perf model's wake-up cost (a step after the
machine idled runs slower, the longer the idle the slower, up to a bound) on the first step that
computes its prompt.

A decode worker touches its engine only between steps (AsyncLLM drains its call queue between
`engine.step()`s): its local-or-remote decision, and so the job's entry into the prefill queue,
waits for the step it is running to end, and so does a request whose KV has landed before its
first token goes out. The simulator defers those two the same way. With `kv_timeout_s`, a decode
worker gives a remote prefill up at its deadline (as workers/decode.py does) and prefills it
itself, in the blocks it holds; a prefill worker drops a job whose deadline passed before it
pulled it, and stops one it is running.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from pdserve.bench.client import RequestResult
from pdserve.planner.perf_model import PerfModel
from pdserve.planner.sim_engine import Engine, EventLoop, Req
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
    # --prefill-chunk-cap: one request's prompt tokens per step while others wait (0: no cap).
    prefill_chunk_cap: int = 0
    fabric: str = "tcp"
    # The decode workers' policy; None = always remote (pure xPyD) when prefill workers exist.
    policy: DisaggPolicy | None = None
    # The decode worker's starting estimate of its local prefill speed (it then learns it).
    local_prefill_tokens_per_s: float = 1500.0
    # The router's rule for idle prefill workers serving short requests whole; None: they only prefill.
    whole: WholePolicy | None = None
    # Each worker's KV cache in blocks of block_size tokens; None: unlimited (nothing is preempted).
    kv_blocks: int | None = None
    block_size: int = 16
    # A decode worker gives a remote prefill up kv_timeout_s (+ kv_grace_s, for transports that
    # write into its blocks) after deciding it; None: never.
    kv_timeout_s: float | None = None
    kv_grace_s: float = 0.0
    # The router queues a remote prefill as it routes the request, by the decode worker's policy
    # (router/early_prefill.py, `pdserve serve`'s default); False: once the decode worker, between
    # two of its steps, has decided and reserved blocks.
    early_prefill: bool = False

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
        whole = (
            f" (prefill serves up to {self.whole.max_whole_per_worker} whole)"
            if self.whole is not None
            else ""
        )
        return f"{kind}{self.prefill}P{self.decode}D{whole}"


class _Cluster:
    def __init__(self, perf: PerfModel, dep: Deployment) -> None:
        self.sim = EventLoop()
        self.perf, self.dep = perf, dep
        if dep.colocated:
            self.decoders = [Engine(self.sim, perf, dep, "colocated", f"c{i}") for i in range(dep.colocated)]
        else:
            self.decoders = [Engine(self.sim, perf, dep, "decode", f"d{i}") for i in range(dep.decode)]
        self.prefillers = [Engine(self.sim, perf, dep, "prefill", f"p{i}") for i in range(dep.prefill)]
        for p in self.prefillers:
            p.on_prefilled = self._prefilled
            p.on_idle_room = self._pull
        self.queue: deque[Req] = deque()
        self.prefilling: dict[int, Engine] = {}  # remote request index -> the prefill worker that pulled it
        self.link_free: dict[str, float] = {p.name: 0.0 for p in self.prefillers}
        self.prefill_speed = dep.local_prefill_tokens_per_s
        self.decisions: dict[str, int] = {"local": 0, "remote": 0}
        if dep.whole is not None:
            self.decisions["whole"] = 0

    def arrive(self, req: Req) -> None:
        workers = [*self.decoders, *self.prefillers]
        if not any(w.streams for w in workers):
            req.wake = self.perf.wake_cost_s(self.sim.now - max(w.last_end for w in workers))
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
        if self.dep.early_prefill and self._remote(req, depth):
            self._enqueue(req)  # now; the decode worker reserves blocks between its steps
            d.call(lambda: self._reserve(req, d))
            return
        d.call(lambda: self._admit(req, d, depth))

    def _remote(self, req: Req, queue_depth: int) -> bool:
        if self.dep.policy is None:
            return True
        decision = choose_prefill_path(
            req.spec.prompt_len, queue_depth, len(self.prefillers), self.prefill_speed, self.dep.policy
        )
        return decision.remote

    def _enqueue(self, req: Req) -> None:
        self.decisions["remote"] += 1
        req.remote = True
        req.enqueued = self.sim.now
        self.queue.append(req)
        for p in self.prefillers:
            self._pull(p)

    def _reserve(self, req: Req, d: Engine) -> None:
        """The decode worker's engine thread, for a prefill started early: blocks for its KV, or
        (none to spare) the job withdrawn and the prompt prefilled here."""
        if not d.allocate(req, req.spec.prompt_len):
            self.decisions["remote"] -= 1
            self.decisions["local"] += 1
            req.remote, req.enqueued, req.pulled = False, None, None
            if req in self.queue:
                self.queue.remove(req)
            p = self.prefilling.pop(req.spec.index, None)
            if p is not None:
                p.drop(req)
            req.num_computed = req.num_output = 0
            req.parked = None
            d.add(req)
            return
        self._reserved(req, d)
        if req.parked is not None:  # its prefill ended first: the KV and first token waited
            p, started = req.parked
            req.parked = None
            self._ship(p, req, started, self.sim.now)

    def _reserved(self, req: Req, d: Engine) -> None:
        req.reserved_at = self.sim.now
        if self.dep.kv_timeout_s is not None:
            give_up = self.sim.now + self.dep.kv_timeout_s + self.dep.kv_grace_s
            self.sim.at(give_up, lambda: d.call(lambda: self._give_up(req, d)))

    def _whole_target(self, req: Req, d: Engine) -> Engine | None:
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

    def _admit(self, req: Req, d: Engine, queue_depth: int) -> None:
        """The decode worker's engine thread: prefill here, or reserve blocks and enqueue a job."""
        if not self._remote(req, queue_depth):
            self.decisions["local"] += 1
            # The worker learns its local speed from local prefills (workers/common.PrefillSpeed).
            if req.spec.prompt_len >= 64:
                t = self.perf.prefill_s(req.spec.prompt_len)
                self.prefill_speed = 0.8 * self.prefill_speed + 0.2 * req.spec.prompt_len / t
            d.add(req)
            return
        if not d.allocate(req, req.spec.prompt_len):  # blocks the prefill worker writes the KV into
            self.decisions["local"] += 1
            d.add(req)
            return
        self._reserved(req, d)
        self._enqueue(req)

    def _expired(self, req: Req) -> bool:
        timeout = self.dep.kv_timeout_s
        return timeout is not None and req.enqueued is not None and self.sim.now > req.enqueued + timeout

    def _pull(self, p: Engine) -> None:
        while self.queue and not p.waiting and len(p.running) < self.dep.max_num_seqs:
            req = self.queue.popleft()
            if self._expired(req):
                continue  # the prefill worker drops a job whose deadline has passed
            req.pulled = self.sim.now
            self.prefilling[req.spec.index] = p
            p.add(req)
            return

    def _give_up(self, req: Req, d: Engine) -> None:
        """The decode worker's deadline for a remote prefill: no KV yet, so it prefills it itself."""
        if req.token_times or req.fallback:
            return  # the KV came in time
        req.fallback = True
        if req in self.queue:
            self.queue.remove(req)
        p = self.prefilling.pop(req.spec.index, None)
        if p is not None:
            p.drop(req)  # its next layer's KV is refused: the prefill worker stops the job
        req.num_computed = req.num_output = 0
        d.add(req, front=True)

    def _prefilled(self, p: Engine, req: Req, started: float, done: float) -> None:
        if req.reserved_at is None:  # started early, and no destination yet: wait for it
            req.parked = (p, started)
            return
        self._ship(p, req, started, done)

    def _ship(self, p: Engine, req: Req, started: float, done: float) -> None:
        # Layer-wise streaming: layer i's KV leaves as soon as it is computed (and its destination
        # is known), so the link is busy from then and the last layer lands one layer's share after
        # the prefill.
        assert req.reserved_at is not None
        p_name = p.name
        xfer = self.perf.transfer_s(req.spec.prompt_len, self.dep.fabric)
        link_start = max(started, req.reserved_at, self.link_free.get(p_name, 0.0))
        arrival = max(done + xfer / self.perf.num_layers, link_start + xfer)
        self.link_free[p_name] = arrival
        req.kv_seconds = arrival - started
        assert req.decode_worker is not None
        d = req.decode_worker
        self.sim.at(arrival, lambda: d.call(lambda: self._kv_arrived(req, d)))

    def _kv_arrived(self, req: Req, d: Engine) -> None:
        self.prefilling.pop(req.spec.index, None)
        if req.fallback:
            return  # given up before it landed
        req.token_times.append(self.sim.now)  # the first token comes with the KV
        if req.num_output < req.spec.output_len:
            d.add(req, front=True)
        else:
            d.streams -= 1
            d.last_end = self.sim.now


def simulate(perf: PerfModel, dep: Deployment, requests: list[SimRequest]) -> list[RequestResult]:
    """Per-request results (times relative to each arrival), in request order."""
    return simulate_with_stats(perf, dep, requests)[0]


def simulate_with_stats(
    perf: PerfModel, dep: Deployment, requests: list[SimRequest]
) -> tuple[list[RequestResult], dict[str, int]]:
    """`simulate`, and how many requests were prefilled locally and remotely."""
    cluster = _Cluster(perf, dep)
    reqs = [Req(s) for s in requests]
    for r in reqs:
        cluster.sim.at(r.spec.arrival_s, lambda r=r: cluster.arrive(r))  # type: ignore[misc]
    cluster.sim.run()
    out = []
    for r in reqs:
        # Token times as the client sees them; the phases stay on the router's clock.
        times = [t - r.spec.arrival_s + perf.serving_latency_s for t in r.token_times]
        res = RequestResult(r.spec.index, r.spec.prompt_len, r.spec.output_len, r.spec.arrival_s)
        if times:
            res.ttft_s, res.chunk_times, res.e2e_s, res.output_tokens = times[0], times, times[-1], len(times)
            res.phases = _phases(r, [t - r.spec.arrival_s for t in r.token_times])
        else:
            res.error = "not finished"
        out.append(res)
    return out, cluster.decisions


def _phases(r: Req, times: list[float]) -> dict[str, float | str]:
    """The router's phase record of a finished request, in seconds since its arrival."""
    out: dict[str, float | str] = {"arrival": 0.0, "routed": 0.0, "first_token": times[0], "end": times[-1]}
    for name, t in (("enqueued", r.enqueued), ("pulled", r.pulled)):
        if t is not None:
            out[name] = t - r.spec.arrival_s
    out["prefill_path"] = (
        "fallback" if r.fallback else "remote" if r.remote else "whole" if r.whole else "local"
    )
    out["kv_seconds"] = r.kv_seconds
    return out
