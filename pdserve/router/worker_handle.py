"""The router's view of one worker: what it registered, its last polled load, its health; and how
that view becomes a Candidate for the routing policies (router/policy.py, router/whole_policy.py)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from pdserve.protocol import WorkerInfo, WorkerLoad
from pdserve.router.policy import Candidate


@dataclass
class WorkerHandle:
    info: WorkerInfo
    load: WorkerLoad | None = None
    healthy: bool = True
    failures: int = 0
    last_answer: float = field(default_factory=time.monotonic)
    incompatible: str | None = None  # why this prefill worker may not serve the decode pool

    @property
    def worker_id(self) -> str:
        return self.info.worker_id

    def candidate(self, cached_tokens: int, num_streams: int) -> Candidate:
        """Running = the streams the router has open on the worker, counted the moment it routes
        one: polled loads are up to a poll interval old, and at tens of requests per second every
        request of that interval would go to the same worker. Waiting and KV usage as polled."""
        load = self.load
        if load is None:
            return Candidate(self.worker_id, cached_tokens, num_streams, 0, 0.0)
        usage = 1 - load.num_free_blocks / max(load.num_total_blocks, 1)
        return Candidate(
            self.worker_id, cached_tokens, num_streams, load.num_waiting + load.num_reserved, usage
        )
