"""What the router saw of one request, for metrics and the per-request timeline."""

from __future__ import annotations

from dataclasses import dataclass, field

from pdserve.trace import Trace, on_monotonic_clock


@dataclass
class RequestEvents:
    """Set as the request goes; `phases` is what a finished request reports to the client."""

    decode_worker: str  # the worker that streams the tokens (a prefill worker for a whole request)
    prefill_path: str | None = None
    kv_bytes: int = 0
    kv_seconds: float = 0.0
    enqueued: float | None = None
    # Phase timestamps (time.monotonic()) for the per-request timeline a benchmark client draws.
    arrival: float = 0.0
    routed: float = 0.0
    pulled: float | None = None
    first_token: float | None = None
    # Who the client got the first token from: the worker serving the request, or the prefill worker
    # straight (router/direct_first_token.py); and whether the serving worker then disagreed with it.
    first_token_from: str = "serving_worker"
    first_token_disagreed: bool = False
    # The workers' marks along the control path (pdserve/trace.py), wall clock.
    trace: Trace = field(default_factory=dict)

    def phases(self, end: float) -> dict[str, float | str]:
        out: dict[str, float | str] = {"arrival": self.arrival, "routed": self.routed, "end": end}
        optional = {"enqueued": self.enqueued, "pulled": self.pulled, "first_token": self.first_token}
        out.update({name: t for name, t in optional.items() if t is not None})
        out.update(on_monotonic_clock(self.trace))
        if self.prefill_path is not None:
            out["prefill_path"] = self.prefill_path
            out["kv_seconds"] = self.kv_seconds
        return out
