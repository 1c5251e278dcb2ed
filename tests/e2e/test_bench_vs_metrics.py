"""`pdserve bench`'s client against `pdserve serve --inprocess` (SmolLM2): its TTFT and ITL agree with
the server's own /metrics histograms.

Tolerances, and why: the server stamps the first token when the engine hands it to the HTTP layer,
the client when the SSE line arrives, so client TTFT = server TTFT + serialisation + loopback —
never less, and a few ms more (we allow 30 ms a request on a busy 2-core machine). For ITL we
compare sums, which telescope: per request, the sum of gaps is last minus first token on either
side, so the two differ only by how much the delivery delay of the first and last token differed
(again tens of ms at most), whatever the jitter in between.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from pdserve.bench.client import run
from pdserve.bench.timeline import segments
from pdserve.bench.workload import LengthSampler, synthetic

from .deploy import deployment, metric

pytestmark = pytest.mark.slow
TTFT = "pdserve_time_to_first_token_seconds"
ITL = "pdserve_inter_token_latency_seconds"


def _hist(text: str, name: str) -> tuple[float, float]:
    return metric(text, f"{name}_sum"), metric(text, f"{name}_count")


def test_client_latencies_match_server_metrics(tmp_path: Path) -> None:
    with deployment(tmp_path, "--inprocess") as dep:
        warm = synthetic(LengthSampler("fixed", prompt_len=16, output_len=2), 1, None, 49152, seed=9)
        asyncio.run(run(dep.url, warm, "smollm2"))
        before = dep.metrics()
        specs = synthetic(LengthSampler("fixed", prompt_len=48, output_len=12), 4, 4.0, 49152, seed=1)
        results = asyncio.run(run(dep.url, specs, "smollm2"))
        after = dep.metrics()
    assert all(r.ok for r in results), [r.error for r in results]
    (s0, c0), (s1, c1) = _hist(before, TTFT), _hist(after, TTFT)
    assert c1 - c0 == len(results)
    client_ttft = sum(r.ttft_s or 0.0 for r in results)
    assert 0 <= client_ttft - (s1 - s0) <= 0.03 * len(results)
    (i0, _), (i1, _) = _hist(before, ITL), _hist(after, ITL)
    client_itl = sum(sum(r.itls_s) for r in results)
    assert abs(client_itl - (i1 - i0)) <= 0.03 * len(results) + 0.05 * (i1 - i0)


# Marks taken in another process are converted from the wall clock to the router's: allow for the
# two clocks being read a few microseconds apart.
CLOCKS_S = 1e-3
# The prefill side's way, from the moment the router queued the job (at routing: early prefill).
REMOTE_MARKS = [
    "arrival", "routed", "enqueued", "pulled", "prefill.received", "prefill.admitted",
    "prefill.launched", "prefill.sampled", "prefill.done_sent", "decode.done_received",
    "decode.kv_checked", "decode.completed", "decode.delivered", "worker.output_received",
    "worker.first_frame", "end",
]  # fmt: skip
# The first token streamed by the router: from the prefill worker (router/direct_first_token.py),
# or, where the decode worker's came first (both race on a CPU), through the decode worker.
DIRECT_MARKS = ["prefill.sampled", "prefill.first_token_sent", "first_token", "end"]
VIA_DECODE_MARKS = ["worker.first_frame", "first_token", "end"]
# The decode side's, meanwhile: its decision comes before any KV can reach it.
DECODE_MARKS = ["enqueued", "worker.received", "worker.admitted", "decode.done_received"]
LOCAL_MARKS = [
    "arrival", "routed", "worker.received", "worker.admitted", "worker.output_received",
    "worker.first_frame", "end",
]  # fmt: skip


def _in_order(ph: dict[str, float | str], names: list[str]) -> None:
    times = [float(ph[name]) for name in names]
    steps = zip(names, names[1:], times, times[1:], strict=False)
    late = [(a, b) for a, b, ta, tb in steps if tb < ta - CLOCKS_S]
    assert not late, (late, ph)


def test_router_sends_phase_timestamps_of_a_remote_prefill(tmp_path: Path) -> None:
    with deployment(tmp_path, "--prefill", "1", "--decode", "1", "--transport", "shm") as dep:
        specs = synthetic(LengthSampler("fixed", prompt_len=400, output_len=4), 1, None, 49152, seed=3)
        [r] = asyncio.run(run(dep.url, specs, "smollm2"))
        short = synthetic(LengthSampler("fixed", prompt_len=20, output_len=4), 1, None, 49152, seed=4)
        [local] = asyncio.run(run(dep.url, short, "smollm2"))
    assert r.ok and r.phases is not None, r
    ph = r.phases
    assert ph["prefill_path"] == "remote"
    order = [ph["arrival"], ph["routed"], ph["enqueued"], ph["pulled"], ph["first_token"], ph["end"]]
    assert order == sorted(order)
    assert [name for name, _, _ in segments(r)] == ["queue", "prefill", "transfer", "decode"]
    # Every hop of the control path is stamped, in the order the request passes them.
    _in_order(ph, REMOTE_MARKS)
    _in_order(ph, DECODE_MARKS)
    _in_order(ph, DIRECT_MARKS if "prefill.first_token_sent" in ph else VIA_DECODE_MARKS)
    assert local.ok and local.phases is not None, local
    assert local.phases["prefill_path"] == "local"
    _in_order(local.phases, LOCAL_MARKS)
    assert "prefill.received" not in local.phases
