"""The router's per-request phase timestamps reach the client on the last SSE chunk."""

from __future__ import annotations

import json
import time

from pdserve.outputs import RequestOutput
from pdserve.protocol import PrefillJob
from pdserve.router.disagg_client import RequestEvents
from pdserve.router.prefill_queue import PrefillQueue
from pdserve.router.streams import with_phases


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
