"""The decode worker's choice: prefill a prompt here, or have the prefill pool do it.

Remote prefill pays a transfer and a queue wait; it buys the decode worker freedom from a long
prefill that would stall every running decode. A pure function, so tests and the simulator
can call the same thing the worker does.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DisaggPolicy:
    threshold_tokens: int  # uncached prompt tokens from which remote prefill is considered
    max_queue_per_prefill_worker: int
    link_bytes_per_s: float
    kv_bytes_per_token: int
    # A saturated prefill queue sends only prompts up to this long back to the decode worker:
    # a longer one would stall every running decode for its whole prefill.
    max_local_prefill_tokens: int = 1024


@dataclass(frozen=True)
class Decision:
    remote: bool
    reason: str


def choose_prefill_path(
    uncached_tokens: int,
    queue_depth: int,
    num_prefill_workers: int,
    local_prefill_tokens_per_s: float,
    policy: DisaggPolicy,
) -> Decision:
    if num_prefill_workers <= 0:
        return Decision(False, "no healthy prefill worker")
    if uncached_tokens < policy.threshold_tokens:
        return Decision(False, f"{uncached_tokens} uncached tokens < threshold {policy.threshold_tokens}")
    saturated = queue_depth >= policy.max_queue_per_prefill_worker * num_prefill_workers
    if saturated and uncached_tokens <= policy.max_local_prefill_tokens:
        return Decision(
            False, f"prefill queue saturated ({queue_depth} jobs for {num_prefill_workers} workers)"
        )
    transfer_s = uncached_tokens * policy.kv_bytes_per_token / policy.link_bytes_per_s
    saved_s = uncached_tokens / local_prefill_tokens_per_s
    if transfer_s >= saved_s:
        return Decision(False, f"transfer {transfer_s * 1e3:.1f} ms >= local prefill {saved_s * 1e3:.1f} ms")
    if saturated:
        return Decision(True, f"{uncached_tokens} uncached tokens: too long to prefill here, queue or not")
    return Decision(True, f"{uncached_tokens} uncached tokens; transfer {transfer_s * 1e3:.1f} ms")
