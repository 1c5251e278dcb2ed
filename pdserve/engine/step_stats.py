"""Where an engine thread's time goes, as lifetime counters.

A serving run that saturates below what the GPU can do leaves one question open: is the engine
thread busy (and with what: scheduling, the forward pass, bookkeeping of outputs, calls from the
HTTP side, handing outputs back) or is it starved by what feeds it? These counters answer it
from outside: scrape them twice and divide the differences by the wall time between scrapes.
They cost a few `perf_counter` calls per step.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

# Time phases of the engine thread, in the order a step runs them.
PHASES = ("calls", "schedule", "forward", "postprocess", "deliver")


@dataclass
class StepStats:
    steps: int = 0
    graph_steps: int = 0  # decode-only steps that replayed a captured CUDA graph
    ahead_steps: int = 0  # decode steps launched before the previous step's samples were read
    seqs: int = 0  # sum over steps of the requests scheduled (mean batch = seqs / steps)
    prefill_tokens: int = 0  # prompt tokens computed (chunks of several tokens)
    decode_tokens: int = 0  # one-token chunks
    calls_s: float = 0.0  # engine calls from other threads: admissions, reservations, aborts
    schedule_s: float = 0.0
    forward_s: float = 0.0  # input preparation, the model, sampling and the wait for the GPU
    postprocess_s: float = 0.0  # stop checks, detokenization, output objects
    deliver_s: float = 0.0  # handing outputs to the HTTP side's event loops

    def record_step(self, num_seqs: int, prefill_tokens: int, decode_tokens: int, graph: bool) -> None:
        self.steps += 1
        self.graph_steps += graph
        self.seqs += num_seqs
        self.prefill_tokens += prefill_tokens
        self.decode_tokens += decode_tokens

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


class Stopwatch:
    """Laps of one thread: each lap() returns the seconds since the previous lap (or creation)."""

    __slots__ = ("_last",)

    def __init__(self) -> None:
        self._last = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        elapsed, self._last = now - self._last, now
        return elapsed


def busy_seconds(counters: dict[str, float]) -> float:
    """Engine-thread seconds spent working, from an `as_dict()` (or a difference of two)."""
    return sum(counters.get(f"{phase}_s", 0.0) for phase in PHASES)


def per_step_report(before: dict[str, float], after: dict[str, float], wall_s: float) -> dict[str, float]:
    """What happened between two scrapes of one engine's counters: steps per second, mean batch,
    milliseconds per step in each phase, and the fraction of wall time the thread was busy."""
    diff = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    steps = diff.get("steps", 0.0)
    report = {
        "steps_per_s": steps / wall_s if wall_s > 0 else 0.0,
        "graph_step_share": diff.get("graph_steps", 0.0) / steps if steps else 0.0,
        "ahead_step_share": diff.get("ahead_steps", 0.0) / steps if steps else 0.0,
        "mean_batch": diff.get("seqs", 0.0) / steps if steps else 0.0,
        "prefill_tok_s": diff.get("prefill_tokens", 0.0) / wall_s if wall_s > 0 else 0.0,
        "decode_tok_s": diff.get("decode_tokens", 0.0) / wall_s if wall_s > 0 else 0.0,
        "busy_share": busy_seconds(diff) / wall_s if wall_s > 0 else 0.0,
    }
    for phase in PHASES:
        report[f"{phase}_ms_per_step"] = 1e3 * diff.get(f"{phase}_s", 0.0) / steps if steps else 0.0
    return report
