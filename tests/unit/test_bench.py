"""The load generator against a mock OpenAI-compatible server with known timings: TTFT 200 ms,
then a token every 20 ms. What the client reports must recover them."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from pdserve.bench.client import run, run_sharded
from pdserve.bench.report import summarize
from pdserve.bench.timeline import segments
from pdserve.bench.workload import LengthSampler, synthetic
from pdserve.cli import main

TTFT_S, ITL_S, TOKENS = 0.2, 0.02, 10


async def _models(request: Request) -> JSONResponse:
    return JSONResponse({"object": "list", "data": [{"id": "mock", "object": "model"}]})


async def _completions(request: Request) -> StreamingResponse:
    body = await request.json()
    n = min(int(body["max_tokens"]), TOKENS)

    def event(payload: dict[str, object]) -> str:
        return f"data: {json.dumps(payload)}\n\n"

    async def stream() -> AsyncIterator[str]:
        t0 = time.monotonic()
        await asyncio.sleep(TTFT_S)
        for i in range(n):
            if i:
                await asyncio.sleep(ITL_S)
            yield event({"choices": [{"index": 0, "text": f"t{i}", "finish_reason": None}]})
        # pdserve's router adds its phase timestamps to the last chunk; this mock pretends to.
        phases = {"arrival": 0.0, "routed": 0.001, "enqueued": 0.002, "pulled": 0.05,
                  "first_token": TTFT_S, "end": time.monotonic() - t0, "prefill_path": "remote",
                  "kv_seconds": 0.03}  # fmt: skip
        yield event({"choices": [{"index": 0, "text": "", "finish_reason": "length"}], "pdserve": phases})
        yield event(
            {"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": n, "total_tokens": n + 1}}
        )
        yield "data: [DONE]\n\n"

    return StreamingResponse(stream(), media_type="text/event-stream")


@pytest.fixture(scope="module")
def mock_url() -> Iterator[str]:
    app = Starlette(
        routes=[Route("/v1/models", _models), Route("/v1/completions", _completions, methods=["POST"])]
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "mock server did not start"
        time.sleep(0.01)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(5)


def test_client_recovers_injected_ttft_and_itl(mock_url: str) -> None:
    specs = synthetic(LengthSampler("fixed", prompt_len=8, output_len=TOKENS), 6, 20.0, 1000)
    results = asyncio.run(run(mock_url, specs, "mock"))
    s = summarize(results)
    assert s["errors"] == 0
    # Loopback and event-loop scheduling add a few ms; sleeps never finish early.
    assert TTFT_S <= s["ttft_s"]["p50"] < TTFT_S + 0.05
    assert ITL_S <= s["itl_s"]["p50"] < ITL_S + 0.01
    assert ITL_S * 0.95 <= s["tpot_s"]["mean"] < ITL_S + 0.01
    assert all(r.output_tokens == TOKENS and len(r.chunk_times) == TOKENS for r in results)
    # The server's phases come back, and the timeline splits each request by them.
    phases = [name for name, _, _ in segments(results[0])]
    assert phases == ["queue", "prefill", "transfer", "decode"]


def test_sharded_client_keeps_every_request_and_the_shared_clock(mock_url: str) -> None:
    # 12 requests at 20 req/s over 3 processes: each process sends its share at the common times.
    specs = synthetic(LengthSampler("fixed", prompt_len=8, output_len=TOKENS), 12, 20.0, 1000, seed=3)
    results = run_sharded(mock_url, specs, "mock", procs=3)
    assert [r.index for r in results] == list(range(12))
    s = summarize(results)
    assert s["errors"] == 0
    assert TTFT_S <= s["ttft_s"]["p50"] < TTFT_S + 0.05
    assert ITL_S <= s["itl_s"]["p50"] < ITL_S + 0.01
    # Start offsets follow the arrival schedule, whichever process sent the request.
    for r, spec in zip(results, specs, strict=True):
        assert spec.arrival_s - 0.001 <= r.start < spec.arrival_s + 0.1


def test_bench_cli_sweep_goodput_json_and_plots(mock_url: str, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    argv = ["bench", "--base-url", mock_url, "--workload", "fixed", "--prompt-len", "8",
            "--output-len", str(TOKENS), "--num-requests", "4", "--sweep", "5,10",
            "--slo-ttft-ms", "600", "--slo-tpot-ms", "60", "--json", str(out),
            "--plots", str(tmp_path / "plots"), "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    report = json.loads(out.read_text())
    assert report["model"] == "mock"
    # Every request meets both SLOs at both rates (targets 3x the injected timings: a loaded CI
    # machine delays the mock's sleeps by tens of ms).
    assert report["goodput_req_s"] == 10.0
    assert [r["slo_attainment"] for r in report["runs"]] == [1.0, 1.0]
    assert {p.name for p in (tmp_path / "plots").iterdir()} >= {"cdf.png", "attainment.png", "timeline-0.png"}
    # A TTFT target below the injected 200 ms: nothing meets it, goodput 0.
    argv[argv.index("600")] = "150"
    assert main(argv) == 0
    assert json.loads(out.read_text())["goodput_req_s"] == 0.0


def test_duration_bound_run_stops_launching(mock_url: str, tmp_path: Path) -> None:
    out = tmp_path / "d.json"
    argv = ["bench", "--base-url", mock_url, "--model", "mock", "--workload", "short", "--rate", "20",
            "--duration", "0.3", "--json", str(out), "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    n = json.loads(out.read_text())["runs"][0]["requests"]
    assert 1 <= n <= 15  # ~6 arrivals expected in 0.3 s at 20 req/s


def test_a_run_shorter_than_a_few_request_lifetimes_is_flagged_as_a_burst() -> None:
    from pdserve.bench.client import RequestResult
    from pdserve.bench.report import burst_warning

    def requests(window_s: float, e2e_s: float) -> list[RequestResult]:
        n = 50
        return [
            RequestResult(
                i,
                10,
                4,
                start=window_s * i / (n - 1),
                ttft_s=0.1,
                chunk_times=[0.1],
                e2e_s=e2e_s,
                output_tokens=4,
            )
            for i in range(n)
        ]

    sustained = summarize(requests(window_s=30.0, e2e_s=6.0))
    assert sustained["arrival_window_s"] == pytest.approx(30.0)
    assert sustained["lifetimes_in_window"] == pytest.approx(5.0)
    assert burst_warning(sustained) is None
    burst = summarize(requests(window_s=8.0, e2e_s=8.0))
    assert burst["lifetimes_in_window"] == pytest.approx(1.0)
    warning = burst_warning(burst)
    assert warning is not None and "burst" in warning and "8.0 s" in warning
    assert burst_warning(summarize([])) is None  # nothing to judge
