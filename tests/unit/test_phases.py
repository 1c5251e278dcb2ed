"""The router's per-request phase timestamps reach the client on the last SSE chunk."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from pdserve.config import ServerConfig
from pdserve.outputs import RequestOutput
from pdserve.protocol import PrefillJob
from pdserve.router.app import build_app
from pdserve.router.disagg_client import RequestEvents
from pdserve.router.prefill_queue import PrefillQueue
from pdserve.router.streams import with_phases
from pdserve.sampling_params import SamplingParams
from tests.unit.fake_engine import FakeEngine


def test_phases_of_a_remote_prefill() -> None:
    ev = RequestEvents("decode-1", arrival=100.0, routed=100.001, enqueued=100.002)
    ev.pulled, ev.first_token, ev.prefill_path, ev.kv_seconds = 100.5, 101.0, "remote", 0.1
    assert ev.phases(end=102.0) == {
        "arrival": 100.0, "routed": 100.001, "enqueued": 100.002, "pulled": 100.5,
        "first_token": 101.0, "end": 102.0, "prefill_path": "remote", "kv_seconds": 0.1,
    }  # fmt: skip


def test_with_phases_adds_offsets_from_arrival_to_the_last_chunk() -> None:
    out = RequestOutput("r", [], "", True, "length")
    out.phases = {"arrival": 10.0, "pulled": 10.25, "end": 11.0, "prefill_path": "remote", "kv_seconds": 0.05}
    event = 'data: {"id":"r","choices":[{"index":0,"text":"","finish_reason":"length"}]}\n\n'
    body = json.loads(with_phases(event, out, arrival=9.5)[len("data: ") :])
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["pdserve"] == {
        "arrival": 0.5,
        "pulled": 0.75,
        "end": 1.5,
        "prefill_path": "remote",
        "kv_seconds": 0.05,
    }
    plain = RequestOutput("r", [], "", True, "length")
    assert with_phases(event, plain, arrival=9.5) == event  # servers without phases: unchanged


async def test_prefill_queue_knows_when_a_job_was_pulled() -> None:
    q = PrefillQueue()
    await q.put(PrefillJob("r1", [1, 2, 3], {}, "d0", "127.0.0.1", 1, [0], 0, time.time() + 30))
    assert q.pulled_at("r1") is None
    assert await q.pull("p0", 1.0) is not None
    assert q.pulled_at("r1") is not None
    q.done("r1")
    assert q.pulled_at("r1") is None


class _PhasedEngine(FakeEngine):
    """Stamps the last output with phases, as the disaggregated client does."""

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        arrival = time.monotonic()
        first: float | None = None
        async for out in super().generate(request_id, prompt_token_ids, params):
            first = first or time.monotonic()
            if out.finished:
                out.phases = {"arrival": arrival, "routed": arrival, "first_token": first,
                              "end": time.monotonic(), "prefill_path": "local", "kv_seconds": 0.0}  # fmt: skip
            yield out


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/completions", {"prompt": "hi"}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
    ],
)
async def test_phases_ride_on_the_last_chunk_of_both_streaming_endpoints(
    path: str, body: dict[str, Any]
) -> None:
    app = build_app(_PhasedEngine(), ServerConfig())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
        r = await c.post(path, json={**body, "max_tokens": 3, "stream": True})
    events = [json.loads(b[len("data: ") :]) for b in r.text.split("\n\n") if b and b != "data: [DONE]"]
    with_phases = [e for e in events if "pdserve" in e]
    assert len(with_phases) == 1 and with_phases[0] is events[-1]  # the finish chunk, no other
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    phases = events[-1]["pdserve"]
    # Offsets from the router's arrival: the engine saw the request after it, in order.
    assert 0 <= phases["arrival"] <= phases["first_token"] <= phases["end"] < 5
    assert phases["prefill_path"] == "local" and phases["kv_seconds"] == 0.0
