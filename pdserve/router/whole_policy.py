"""Whether an idle prefill worker serves a short request whole (its prefill and its decode).

Conditional disaggregation prefills short prompts on the decode worker, so a load of short prompts
leaves the prefill pool with nothing to do: one prefill and one decode GPU then serve half of what
two co-located replicas would. With `--prefill-serves-whole` the router may send such a prompt to a
prefill worker instead, which runs it end to end as a co-located worker does: an idle prefill GPU
adds decode capacity.

Long prompts keep priority on the prefill pool. A prefill worker takes a whole request only while
it has no prefill work at all (an empty shared queue, no job of its own, nothing waiting in its
engine) -- or, with `job_streams` set, while it holds jobs but its whole requests plus
`job_streams` per job still weigh less than the decode worker's streams (the whole requests'
tokens ride along in the prompts' chunked steps; on two H100s this moved work but not goodput,
docs/benchmarks.md). It holds at most `max_whole_per_worker` of them, with its KV cache at most
`max_kv_usage` full: a long prompt that arrives later finds blocks free, and shares each step with
a bounded decode batch (the scheduler runs running requests first, so at most that many decode
tokens come out of the step's token budget before the prompt's chunk).

A pure function of numbers, like the decode worker's choice (workers/disagg_policy.py), so tests
and the planner's simulator call what the router calls.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from pdserve.router.policy import Candidate, kv_aware_score


@dataclass(frozen=True)
class WholePolicy:
    threshold_tokens: int  # the decode workers' --remote-prefill-threshold
    max_whole_per_worker: int  # whole requests one prefill worker may hold at once
    # A prefill worker whose KV cache is fuller than this takes no more whole requests: the rest is
    # kept for the prompts it exists to prefill.
    max_kv_usage: float = 0.5
    # A prefill job the worker holds counts as this many streams when its load is compared with the
    # decode worker's; None: no whole request while it holds any job.
    job_streams: int | None = None

    def __post_init__(self) -> None:
        if self.threshold_tokens < 0:
            raise ValueError(f"threshold_tokens must be >= 0, got {self.threshold_tokens}")
        if self.max_whole_per_worker < 1:
            raise ValueError(f"max_whole_per_worker must be >= 1, got {self.max_whole_per_worker}")
        if not 0 < self.max_kv_usage <= 1:
            raise ValueError(f"max_kv_usage must be in (0, 1], got {self.max_kv_usage}")


@dataclass(frozen=True)
class PrefillCandidate(Candidate):
    """A prefill worker scored as a decode worker would be: `num_running` counts the whole requests
    the router has open on it, `cached_tokens` its own prefix-cache overlap with the prompt."""

    num_jobs: int = 0  # remote-prefill jobs it holds now (pulled, first token not yet delivered)


@dataclass(frozen=True)
class WholeDecision:
    worker_id: str | None  # the prefill worker that serves the request; None: the decode worker does
    reason: str


def refusal(c: PrefillCandidate, prompt_tokens: int, decode: Candidate, policy: WholePolicy) -> str | None:
    """Why this prefill worker may not take the request whole now; None if it may."""
    if c.num_jobs > 0 and policy.job_streams is None:
        return f"{c.worker_id} holds {c.num_jobs} prefill jobs"
    if c.num_waiting > 0:
        return f"{c.worker_id} has {c.num_waiting} requests waiting"
    if c.num_running >= policy.max_whole_per_worker:
        return f"{c.worker_id} serves {c.num_running} whole requests (cap {policy.max_whole_per_worker})"
    if c.kv_usage > policy.max_kv_usage:
        return f"{c.worker_id} KV usage {c.kv_usage:.2f} > {policy.max_kv_usage:.2f}"
    uncached = prompt_tokens - c.cached_tokens
    if uncached >= policy.threshold_tokens:
        # Short on the decode worker thanks to its prefix cache, long here: computing it again would
        # waste the decode worker's cache and occupy this worker with a long prefill.
        return f"{uncached} uncached tokens on {c.worker_id} >= threshold {policy.threshold_tokens}"
    loaded = replace(c, num_running=c.num_running + (policy.job_streams or 0) * c.num_jobs)
    if kv_aware_score(loaded, prompt_tokens) <= kv_aware_score(decode, prompt_tokens):
        # On a tie the decode worker keeps it: the prefill worker stays free for prompts.
        return f"{c.worker_id} is not less loaded than {decode.worker_id}"
    return None


def choose_whole_target(
    prompt_tokens: int,
    decode: Candidate,
    queue_depth: int,
    prefill: list[PrefillCandidate],
    policy: WholePolicy,
) -> WholeDecision:
    """Where a request goes, given the decode worker the router picked for it (`decode`, with the
    router's own count of streams open on it as `num_running`) and the healthy prefill workers."""
    uncached = prompt_tokens - decode.cached_tokens
    if uncached >= policy.threshold_tokens:
        return WholeDecision(
            None, f"{uncached} uncached tokens >= threshold {policy.threshold_tokens}: decode worker decides"
        )
    if queue_depth > 0:
        return WholeDecision(None, f"prefill queue holds {queue_depth} jobs")
    if not prefill:
        return WholeDecision(None, "no healthy prefill worker")
    refusals = {c.worker_id: refusal(c, prompt_tokens, decode, policy) for c in prefill}
    free = [c for c in prefill if refusals[c.worker_id] is None]
    if not free:
        return WholeDecision(None, "; ".join(r for r in refusals.values() if r is not None))
    best = max(free, key=lambda c: (kv_aware_score(c, prompt_tokens), -c.num_running, c.worker_id))
    return WholeDecision(
        best.worker_id,
        f"{uncached} uncached tokens, prefill queue empty; {best.worker_id} serves {best.num_running} "
        f"whole requests and {best.num_jobs} prefill jobs, {decode.worker_id} has {decode.num_running} streams",
    )
