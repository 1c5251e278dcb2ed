"""Decode-worker selection: prefix overlap (tokens we need not prefill again) minus load.
A pure function of numbers; round-robin is kept for comparison."""

from __future__ import annotations

import itertools
from dataclasses import dataclass


@dataclass(frozen=True)
class Candidate:
    worker_id: str
    cached_tokens: int  # prompt tokens this worker already holds (prefix index)
    num_running: int
    num_waiting: int
    kv_usage: float  # 0..1


def kv_aware_score(c: Candidate, prompt_tokens: int, load_weight: float = 1.0) -> float:
    """Higher is better. Overlap counts as the fraction of the prompt saved; load as queue length
    (running + 2 x waiting, normalised) plus KV pressure, so a hit on a saturated worker can lose."""
    overlap = c.cached_tokens / max(prompt_tokens, 1)
    load = (c.num_running + 2 * c.num_waiting) / 32 + c.kv_usage
    return overlap - load_weight * load


def pick_kv_aware(candidates: list[Candidate], prompt_tokens: int) -> str:
    if not candidates:
        raise LookupError("no healthy decode worker")
    return max(
        candidates, key=lambda c: (kv_aware_score(c, prompt_tokens), -c.num_running, c.worker_id)
    ).worker_id


class RoundRobin:
    def __init__(self) -> None:
        self._counter = itertools.count()

    def pick(self, candidates: list[Candidate]) -> str:
        if not candidates:
            raise LookupError("no healthy decode worker")
        ordered = sorted(c.worker_id for c in candidates)
        return ordered[next(self._counter) % len(ordered)]
