"""The router holds one worker stream per request; it must not cap how many are open at once.

An HTTP client pool with a connection limit (httpx's default is 100) would make request 101 wait
for a stream to finish before it even reaches a worker: its TTFT then includes a whole request's
generation while the worker has free sequence slots. Here every request's first token must arrive
before the first request is done.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from pdserve.bench.client import run
from pdserve.bench.workload import LengthSampler, synthetic

from .deploy import deployment

pytestmark = pytest.mark.slow
NUM_REQUESTS = 130  # more than any default connection-pool limit


def test_more_concurrent_streams_than_a_default_pool_holds(tmp_path: Path) -> None:
    flags = ["--model", "dummy:tiny-llama", "--prefill", "0", "--decode", "0", "--colocated", "1"]
    with deployment(tmp_path, *flags, "--max-num-seqs", "256", "--device", "cpu") as dep:
        specs = synthetic(
            LengthSampler("fixed", prompt_len=8, output_len=300), NUM_REQUESTS, None, 256, seed=5
        )
        results = asyncio.run(run(dep.url, specs, "dummy:tiny-llama", concurrency=NUM_REQUESTS))
        dep.wait_idle()
    assert all(r.ok for r in results), [r.error for r in results if not r.ok][:3]
    first_done = min(r.start + (r.e2e_s or 0.0) for r in results)
    last_first_token = max(r.start + (r.ttft_s or 0.0) for r in results)
    assert last_first_token < first_done, (
        f"a request got its first token {last_first_token:.2f} s in, after the first request "
        f"finished at {first_done:.2f} s: its stream waited for another to end"
    )
