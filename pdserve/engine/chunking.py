"""How much of one request's prompt a step computes. A pure function, shared by the engine's
scheduler and the planner's simulated engine."""

from __future__ import annotations


def prompt_chunk(uncomputed: int, budget: int, cap: int, others_waiting: bool) -> int:
    """Tokens of a request to compute in this step: all it has left, up to the step's remaining
    budget; and, while other requests wait to be admitted, at most `cap` (0: no cap). Without the
    cap a long prompt takes every step's whole budget until it is done, and a short prompt that
    arrived behind it waits for all of its chunks (head-of-line blocking); with it, each step has
    room for the short ones too. Alone, a long prompt still takes the whole budget."""
    n = min(uncomputed, budget)
    if cap > 0 and others_waiting:
        n = min(n, cap)
    return n
