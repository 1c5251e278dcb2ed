"""Decode steps launched ahead: step k+1 is queued on the GPU before the host has read step k's
sampled tokens, so the host's work between steps (reading the samples, stop checks,
detokenizing, streaming, building the next inputs) overlaps the GPU's next step instead of
leaving it idle. Without this a batch-1 step on an H100 spends ~0.5 ms of its ~6.8 ms with the GPU
waiting for the host.

Step k+1 reads its input ids from step k's samples on the device. It can be launched that way only
when it is a plain continuation: the same running requests, one decode token each, nobody waiting
to be admitted. Anything else (a new request, a remote prefill's KV arriving, a preemption) drains
the pipeline: the host reads step k, and the scheduler plans the next step as usual.

What the host learns only after launching step k+1 (a stop token, a stop string, an abort) makes
step k+1's row for that request wasted work, which is dropped. The request's KV blocks stay held
until step k+1 has finished on the device, since it still writes the request's next slot into them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from pdserve.engine.request import Request, RequestStatus
from pdserve.engine.sampler import PendingSamples
from pdserve.engine.scheduler import ScheduledRequest


@dataclass
class InflightStep:
    """A launched step whose samples the host has not read yet."""

    sampled: list[ScheduledRequest]  # the rows of `pending`, in order
    pending: PendingSamples
    # Finished requests whose blocks this step still writes: freed once it completes.
    deferred: list[Request] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._ids = {s.request.request_id for s in self.sampled}

    def holds(self, req: Request) -> bool:
        return req.request_id in self._ids


def finishes_by_length(req: Request, max_model_len: int) -> bool:
    """Whether the token now in flight for `req` is its last by length (max_tokens or context)."""
    return req.num_output_tokens + 1 >= req.max_tokens or req.num_tokens + 1 >= max_model_len


def plan_continuation(
    batch: Sequence[Request], running: Sequence[Request], has_waiting: bool, max_model_len: int
) -> list[int] | None:
    """Rows of the in-flight `batch` whose next decode token can be launched before its samples are
    read; None when the next step must be planned by the scheduler instead.

    The continuation must be the whole next step the scheduler would plan: so nothing may wait for
    admission, and every running request must be in the batch (one still prefilling is not).
    Requests finished meanwhile (aborted) or whose in-flight token is their last by length get no row.
    """
    if has_waiting:
        return None
    in_batch = {r.request_id for r in batch}
    if any(r.request_id not in in_batch for r in running):
        return None
    rows = [
        i
        for i, req in enumerate(batch)
        if req.status == RequestStatus.RUNNING and not finishes_by_length(req, max_model_len)
    ]
    return rows or None
