"""The one interface the HTTP front end talks to: an in-process engine today, a pool of
remote workers behind the router tomorrow. Both implement `EngineClient`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

from pdserve.outputs import RequestOutput
from pdserve.sampling_params import SamplingParams


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    num_free_blocks: int
    num_total_blocks: int
    num_preemptions: int = 0
    prefix_cache_hit_tokens: int = 0
    prefix_cache_query_tokens: int = 0
    # KV usage (0..1) per worker, when the client fronts several; None for a single engine.
    worker_kv_usage: dict[str, float] | None = None
    # Engine-thread counters (step_stats.StepStats.as_dict()) per engine: "local" for one in-process
    # engine, worker ids behind a router.
    engine_counters: dict[str, dict[str, float]] | None = None

    @property
    def kv_cache_usage(self) -> float:
        return 1.0 - self.num_free_blocks / max(self.num_total_blocks, 1)


class EngineClient(Protocol):
    model_name: str
    max_model_len: int
    tokenizer: Any  # transformers PreTrainedTokenizerBase

    def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        """Stream the request's deltas; the last one has finished=True. Closing the iterator
        early (client gone) aborts the request and frees its KV blocks."""
        ...

    async def abort(self, request_id: str) -> None: ...

    def stats(self) -> EngineStats: ...

    async def shutdown(self) -> None: ...
