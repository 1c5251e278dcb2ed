"""Serving costs a profile of the engine alone cannot see, fitted on one served run.

`pdserve profile` times engine steps in one process. A served request also pays for what runs
around them: streaming tokens out (the worker's event loop, the router and the client share the
cores on a CPU), a prompt step's extra work in a served worker (a prefill worker ships each
layer's KV from the same core), and the hops from the client to the worker and back. Each term
is read off the run where it shows, in this order, each fit using the ones before it:

1. `serving_step_s`, `serving_seq_s`: decode-only inter-token gaps against the profiled step
   (`fidelity.calibrate_serving`).
2. `serving_prompt_s`: the steps that computed a short prompt while other requests were being
   served, against the modelled step. A remote prefill's step is its `kv_seconds` (from its
   first layer's KV to the first token, on the prefill worker). A local one shows in the gap of a
   request decoding next to it, the gap that ends with the new request's first token.
3. `serving_latency_s` and the wake-up cost (`wake_s`, `wake_tau_s`): what the client waited
   for its first token beyond the simulated steps, over the short requests that found the
   deployment empty and had it to themselves (so no queueing error enters), as a constant (HTTP
   hops client → router → worker and back, a remote prefill's hand-offs) plus a cost that grows
   with how long the deployment had idled: on the 2-core VM of docs/planner.md, after a few idle
   seconds the client's and router's hops and the worker's next step all ran slower. Least squares
   over a grid of time constants. A run under load has no such requests (every GPU run here);
   then the constant comes from the router's phase marks: the hops in and out of the serving
   worker, per request (`hop_latencies`).

Medians for the step terms: one stalled step moves no term.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
import statistics

from pdserve.bench.client import RequestResult
from pdserve.planner.fidelity import EngineOf, calibrate_serving, replay
from pdserve.planner.perf_model import PerfModel
from pdserve.planner.simulator import Deployment, simulate

# Two tokens of one step reach the client this close together (one hand-off, one SSE flush each).
_SAME_STEP_S = 0.015
# Time constants (s) tried for the wake-up cost.
_WAKE_TAUS_S = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0)


def prompt_step_excess(results: list[RequestResult], perf: PerfModel, budget: int) -> list[float]:
    """Seconds each observed one-chunk prompt step took beyond `perf`'s step."""
    ok = [r for r in results if r.ok]
    out = []
    for r in ok:
        path = (r.phases or {}).get("prefill_path", "local")
        if r.prompt_len > budget:
            continue
        if path == "remote":
            out += _remote_excess(r, perf, ok)
        elif path == "local":
            out += _local_excess(r, perf, ok)
    return out


def _local_excess(r: RequestResult, perf: PerfModel, ok: list[RequestResult]) -> list[float]:
    """The step that computed r's prompt, seen in the gap of a request decoding beside it."""
    tokens = {q.index: [q.start + t for t in q.chunk_times] for q in ok}
    first = tokens[r.index][0]
    # Nothing else prefilling while r waits and runs: the step holds r's chunk and decodes only.
    if any(q.start < first and q.start + (q.ttft_s or 0.0) > r.start for q in ok if q is not r):
        return []
    for q in ok:
        t = tokens[q.index]
        j = bisect.bisect_left(t, first - _SAME_STEP_S)
        if q is r or not 0 < j < len(t) or abs(t[j] - first) > _SAME_STEP_S or t[j - 1] <= r.start:
            continue
        gap_start = t[j - 1]
        dec = [
            p for p in ok if p is not r and tokens[p.index][0] <= gap_start and tokens[p.index][-1] >= first
        ]
        ctx = [p.prompt_len + bisect.bisect_right(tokens[p.index], gap_start) - 1 for p in dec]
        model = perf.step_s(len(dec), sum(ctx), [(r.prompt_len, 0)], max(ctx), streamed=len(dec) + 1)
        return [t[j] - gap_start - model]
    return []


def _remote_excess(r: RequestResult, perf: PerfModel, ok: list[RequestResult]) -> list[float]:
    """A remote prefill that arrived while the deployment served others, pulled by a prefill
    worker that ran nothing else meanwhile: its kv_seconds against the modelled step."""
    ph = r.phases or {}
    if "pulled" not in ph or "kv_seconds" not in ph:
        return []

    def span(q: RequestResult) -> tuple[float, float]:
        p = q.phases or {}
        base = q.start + (q.ttft_s or 0.0) - float(p.get("first_token", 0.0))  # router clock → client's
        return base + float(p.get("pulled", 0.0)), base + float(p.get("first_token", 0.0))

    if not any(q.start < r.start < q.start + (q.e2e_s or 0.0) for q in ok if q is not r):
        return []  # it found the deployment idle: its step paid the wake-up (fitted below)
    a, b = span(r)
    others = [q for q in ok if q is not r and (q.phases or {}).get("prefill_path") == "remote"]
    if any(span(q)[0] < b and span(q)[1] > a for q in others if "pulled" in (q.phases or {})):
        return []
    return [float(ph["kv_seconds"]) - perf.prefill_s(r.prompt_len)]


def calibrate_prompt(results: list[RequestResult], perf: PerfModel, budget: int) -> float:
    """serving_prompt_s: the median excess of the observed prompt steps (0 if none, or if negative)."""
    excess = prompt_step_excess(results, dataclasses.replace(perf, serving_prompt_s=0.0), budget)
    return max(statistics.median(excess), 0.0) if excess else 0.0


def idle_requests(results: list[RequestResult], budget: int) -> list[tuple[RequestResult, float]]:
    """The one-chunk requests that found the deployment empty and had it to themselves until
    their first token, with how long it had idled (the first of a run: since the run began)."""
    ok = [r for r in results if r.ok]
    out = []
    for r in ok:
        first = r.start + (r.ttft_s or 0.0)
        if r.prompt_len > budget or any(
            q.start < first and q.start + (q.e2e_s or 0.0) > r.start for q in ok if q is not r
        ):
            continue
        ends = [q.start + (q.e2e_s or 0.0) for q in ok if q.start + (q.e2e_s or 0.0) <= r.start]
        out.append((r, r.start - max(ends, default=0.0)))
    return out


def fit_wake(points: list[tuple[float, float]]) -> tuple[float, float, float]:
    """(latency, wake_s, wake_tau_s) fitting residual = latency + wake_s * (1 - exp(-idle / tau))
    to (idle, residual) points: least squares with both terms >= 0, tau from a grid."""
    if not points:
        return 0.0, 0.0, 0.0
    best: tuple[float, float, float, float] | None = None
    for tau in _WAKE_TAUS_S:
        xs = [-math.expm1(-idle / tau) for idle, _ in points]
        ys = [y for _, y in points]
        latency, wake = _nonnegative_line(xs, ys)
        sse = sum((latency + wake * x - y) ** 2 for x, y in zip(xs, ys, strict=True))
        if best is None or sse < best[0]:
            best = (sse, latency, wake, tau)
    assert best is not None
    return best[1], best[2], best[3]


def _nonnegative_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Intercept and slope of y = a + b x by least squares, neither below 0."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var else 0.0
    a = my - b * mx
    if b < 0:
        return max(my, 0.0), 0.0
    if a < 0:
        sxx = sum(x * x for x in xs)
        return 0.0, max(sum(x * y for x, y in zip(xs, ys, strict=True)) / sxx, 0.0) if sxx else 0.0
    return a, b


def hop_latencies(results: list[RequestResult]) -> list[float]:
    """Seconds each locally prefilled request spent outside its serving worker's engine before
    its first token, from the router's phase marks (pdserve's router sends them): from the
    router's receipt to the worker's (routing, the HTTP hop), plus from the worker's event loop
    getting the first output to the client reading it (the hops back). The wait for the engine's
    next step, between the two, is the simulator's own."""
    out = []
    for r in results:
        ph = r.phases or {}
        received, output = ph.get("worker.received"), ph.get("worker.output_received")
        if (
            r.ok
            and ph.get("prefill_path") == "local"
            and isinstance(received, float)
            and isinstance(output, float)
        ):
            out.append(received + (r.ttft_s or 0.0) - output)
    return out


def calibrate_wake(results: list[RequestResult], perf: PerfModel, dep: Deployment) -> PerfModel:
    """`perf` with serving_latency_s, wake_s and wake_tau_s fitted on the idle requests' first
    tokens, measured against the simulation without them. A run without idle requests (a GPU
    run under load) takes serving_latency_s from its requests' phase marks instead."""
    model = dataclasses.replace(perf, serving_latency_s=0.0, wake_s=0.0, wake_tau_s=0.0)
    lone = idle_requests(results, dep.max_num_batched_tokens)
    if not lone:
        hops = hop_latencies(results)
        return dataclasses.replace(model, serving_latency_s=statistics.median(hops)) if hops else model
    predicted = {p.index: p for p in simulate(model, dep, replay([r for r in results if r.ok]))}
    points = [
        (idle, (r.ttft_s or 0.0) - (predicted[r.index].ttft_s or 0.0))
        for r, idle in lone
        if predicted[r.index].ttft_s is not None
    ]
    latency, wake, tau = fit_wake(points)
    return dataclasses.replace(model, serving_latency_s=latency, wake_s=wake, wake_tau_s=tau)


def calibrate(
    results: list[RequestResult], perf: PerfModel, dep: Deployment, engine_of: EngineOf | None = None
) -> PerfModel:
    """`perf` with every serving term fitted on `results`, a run served by deployment `dep`
    (engine_of: which engine served each request, where the run split them; fidelity.py)."""
    step, seq = calibrate_serving(results, perf, engine_of)
    perf = dataclasses.replace(perf, serving_step_s=step, serving_seq_s=seq)
    perf = dataclasses.replace(
        perf, serving_prompt_s=calibrate_prompt(results, perf, dep.max_num_batched_tokens)
    )
    return calibrate_wake(results, perf, dep)
