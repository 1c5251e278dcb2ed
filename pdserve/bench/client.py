"""Async load generator against any OpenAI-compatible `/v1/completions` endpoint (streaming).

Each request streams; the client stamps the first token and every later chunk, so TTFT, TPOT and
inter-token latency come from what a user would see. Prompts are sent as token ids.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from pdserve.bench.workload import RequestSpec


@dataclass
class RequestResult:
    index: int
    prompt_len: int
    output_len: int  # requested
    start: float  # seconds since the run started
    ttft_s: float | None = None
    chunk_times: list[float] = field(default_factory=list)  # seconds since this request's start
    e2e_s: float | None = None
    output_tokens: int = 0
    error: str | None = None
    # The server's phase timestamps (seconds since it received the request), when it sends them
    # (pdserve's router does, as `"pdserve": {...}` on the last chunk).
    phases: dict[str, float | str] | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.ttft_s is not None and self.e2e_s is not None

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first."""
        if not self.ok or self.output_tokens < 2:
            return None
        assert self.e2e_s is not None and self.ttft_s is not None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)

    @property
    def itls_s(self) -> list[float]:
        return [b - a for a, b in zip(self.chunk_times, self.chunk_times[1:], strict=False)]


async def _one(
    client: httpx.AsyncClient, model: str, spec: RequestSpec, t0: float, extra: dict[str, object]
) -> RequestResult:
    start = time.monotonic()
    res = RequestResult(spec.index, len(spec.prompt), spec.output_len, start - t0)
    body = {
        "model": model, "prompt": spec.prompt, "max_tokens": spec.output_len, "temperature": 0.0,
        "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True, **extra,
    }  # fmt: skip
    try:
        async with client.stream("POST", "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                res.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
                return res
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                now = time.monotonic() - start
                data = json.loads(line[6:])
                if "error" in data:
                    res.error = str(data["error"])
                    return res
                # Only chunks that carry text are tokens: the finish chunk (empty text) is not.
                if any(c.get("text") for c in data.get("choices", [])):
                    if res.ttft_s is None:
                        res.ttft_s = now
                    res.chunk_times.append(now)
                if "pdserve" in data:
                    res.phases = data["pdserve"]
                if data.get("usage"):
                    res.output_tokens = int(data["usage"]["completion_tokens"])
        res.e2e_s = time.monotonic() - start
        if res.output_tokens == 0:
            res.output_tokens = len(res.chunk_times)
    except httpx.HTTPError as e:
        res.error = f"{type(e).__name__}: {e}"
    return res


async def run(
    base_url: str,
    specs: list[RequestSpec],
    model: str,
    concurrency: int | None = None,
    api_key: str | None = None,
    timeout_s: float = 600.0,
    extra_body: dict[str, object] | None = None,
    progress: bool = False,
    stop_after_s: float | None = None,
    start_at: float | None = None,
) -> list[RequestResult]:
    """Send every request at its arrival time (or keep `concurrency` in flight) and wait for all.
    stop_after_s: launch nothing after that many seconds (a duration-bound run); requests not
    launched are left out of the results. start_at: wall-clock time (time.time()) of the run's
    start, so that several client processes share one clock."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    sem = asyncio.Semaphore(concurrency) if concurrency else None
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(specs), desc="requests", unit="req")
    async with httpx.AsyncClient(
        base_url=base_url, headers=headers, timeout=timeout_s, limits=limits
    ) as client:
        if start_at is not None:
            await asyncio.sleep(max(start_at - time.time(), 0.0))
        t0 = time.monotonic()

        def too_late() -> bool:
            return stop_after_s is not None and time.monotonic() - t0 >= stop_after_s

        async def launch(spec: RequestSpec) -> RequestResult | None:
            delay = spec.arrival_s - (time.monotonic() - t0)
            if delay > 0:
                await asyncio.sleep(delay)
            if too_late():
                return None
            if sem is None:
                res = await _one(client, model, spec, t0, extra_body or {})
            else:
                async with sem:
                    if too_late():
                        return None
                    res = await _one(client, model, spec, t0, extra_body or {})
            if bar is not None:
                bar.update(1)
            return res

        results = await asyncio.gather(*(launch(s) for s in specs))
    if bar is not None:
        bar.close()
    return [r for r in results if r is not None]


def _shard(
    base_url: str, specs: list[RequestSpec], model: str, kwargs: dict[str, Any]
) -> list[RequestResult]:
    return asyncio.run(run(base_url, specs, model, **kwargs))


def sharded_start_at(procs: int) -> float:
    """When `procs` client processes started now can all send their first request: time to start
    and import (time.time())."""
    return time.time() + 2.0 + 0.25 * procs


def run_sharded(
    base_url: str,
    specs: list[RequestSpec],
    model: str,
    procs: int,
    concurrency: int | None = None,
    **kwargs: Any,
) -> list[RequestResult]:
    """`run` split over `procs` client processes (round-robin over the requests, one shared start
    time). A single Python client parses every streamed token; past a few thousand tokens/s it
    would measure its own lag, not the server's."""
    if procs <= 1:
        return asyncio.run(run(base_url, specs, model, concurrency=concurrency, **kwargs))
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # Time for the processes to start and import before the first arrival (unless the caller chose).
    kwargs.setdefault("start_at", sharded_start_at(procs))
    shards = [specs[i::procs] for i in range(procs)]
    with ProcessPoolExecutor(procs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [
            pool.submit(
                _shard, base_url, shard, model,
                kwargs | {"concurrency": -(-concurrency // procs) if concurrency else None},
            )
            for shard in shards
        ]  # fmt: skip
        results = [r for f in futures for r in f.result()]
    return sorted(results, key=lambda r: r.index)
