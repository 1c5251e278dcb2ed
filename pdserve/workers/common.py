"""What every worker role shares: its KV layout, its load report, the engine it wraps."""

from __future__ import annotations

import torch

from pdserve.engine.async_llm import AsyncLLM
from pdserve.engine.engine import LLMEngine
from pdserve.kv_transfer.codec import dtype_name
from pdserve.protocol import KVLayout, WorkerLoad


def kv_layout(engine: LLMEngine) -> KVLayout:
    arch = engine.arch
    return KVLayout(
        model=engine.model_name,
        dtype=dtype_name(engine.kv_dtype),
        block_size=engine.block_manager.block_size,
        num_layers=arch.num_layers,
        num_kv_heads=arch.num_kv_heads,
        head_dim=arch.head_dim,
    )


def worker_load(
    worker_id: str, llm: AsyncLLM, num_reserved: int, kv_events: list[tuple[str, int]]
) -> WorkerLoad:
    stats = llm.stats()
    return WorkerLoad(
        worker_id=worker_id,
        num_running=stats.num_running,
        num_waiting=stats.num_waiting,
        num_free_blocks=stats.num_free_blocks,
        num_total_blocks=stats.num_total_blocks,
        num_reserved=num_reserved,
        kv_events=kv_events,
        prefix_cache_hit_tokens=stats.prefix_cache_hit_tokens,
        num_preemptions=stats.num_preemptions,
        engine_counters=(stats.engine_counters or {}).get("local", {}),
    )


class PrefillSpeed:
    """Running estimate of this engine's prefill tokens/s, for the local-or-remote decision."""

    def __init__(self, initial: float) -> None:
        self.tokens_per_s = initial

    def observe(self, tokens: int, seconds: float) -> None:
        if tokens >= 64 and seconds > 0:
            self.tokens_per_s = 0.8 * self.tokens_per_s + 0.2 * tokens / seconds


def set_cpu_affinity(spec: str | None) -> None:
    """Pin this process (and torch's thread pool size) to the CPUs in spec, e.g. '0' or '0-3,6'."""
    if not spec:
        return
    import os

    cpus: set[int] = set()
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    os.sched_setaffinity(0, cpus)
    torch.set_num_threads(len(cpus))
