"""Simulator fidelity: replay measured requests (same arrival times and lengths) through the
simulator and compare latency percentiles with what was measured."""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import json
import math
import re
import statistics
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path

from pdserve.bench.client import RequestResult
from pdserve.bench.report import summarize
from pdserve.planner.perf_model import PerfModel
from pdserve.planner.simulator import Deployment, SimRequest, simulate

_RUN_FILE = re.compile(r"^(?P<config>[\w-]+)@(?P<rate>[\d.]+)\.requests\.json$")


@dataclass(frozen=True)
class Row:
    config: str
    rate: float
    metric: str  # "ttft_p50" | "ttft_p99" | "itl_p50" | "itl_p99"
    measured_s: float
    predicted_s: float

    @property
    def error(self) -> float:
        """Relative error of the prediction (0.1 = 10% off)."""
        return (self.predicted_s - self.measured_s) / self.measured_s if self.measured_s else math.nan


def load_runs(directory: Path) -> dict[tuple[str, float], list[RequestResult]]:
    """{(config, rate): results} from `{config}@{rate}.requests.json` files."""
    runs = {}
    for path in sorted(directory.iterdir()):
        m = _RUN_FILE.match(path.name)
        if m:
            runs[(m["config"], float(m["rate"]))] = [RequestResult(**r) for r in json.loads(path.read_text())]
    return runs


def replay(results: list[RequestResult]) -> list[SimRequest]:
    """The measured requests as the simulator's input: when each was sent, and its lengths
    (the tokens actually produced, so early stops are replayed too)."""
    return [
        SimRequest(r.index, r.start, r.prompt_len, r.output_tokens or r.output_len)
        for r in sorted(results, key=lambda r: r.start)
    ]


def compare(
    measured: list[RequestResult], perf: PerfModel, dep: Deployment, config: str, rate: float
) -> list[Row]:
    predicted = simulate(perf, dep, replay(measured))
    m, p = summarize(measured), summarize(predicted)
    rows = []
    for name, key in (("ttft", "ttft_s"), ("itl", "itl_s")):
        for q in ("p50", "p99"):
            rows.append(Row(config, rate, f"{name}_{q}", float(m[key][q]), float(p[key][q])))
    return rows


# Which engine served a request, where a run's requests were split over several (None: one engine).
EngineOf = Callable[[RequestResult], Hashable]


def engine_by_path(r: RequestResult) -> Hashable:
    """A 1PxD deployment's requests: served whole by a prefill worker, or by the decode worker."""
    return "prefill" if (r.phases or {}).get("prefill_path") == "whole" else "decode"


def decode_gaps(
    results: list[RequestResult], engine_of: EngineOf | None = None
) -> list[tuple[float, int, int, int]]:
    """(seconds, batch, context tokens, longest context) of every inter-token gap during which
    only decodes ran, i.e. no request of the run was between its arrival and its first token.
    The batch is the requests streaming over the whole gap on the same engine."""
    ok = [r for r in results if r.ok]
    engine = {r.index: engine_of(r) if engine_of is not None else None for r in ok}
    tokens = {r.index: [r.start + t for t in r.chunk_times] for r in ok}
    prefilling = [(r.start, r.start + (r.ttft_s or 0.0)) for r in ok]
    gaps = []
    for r in ok:
        for a, b in itertools.pairwise(tokens[r.index]):
            if any(t0 < b and t1 > a for t0, t1 in prefilling):
                continue
            # Context as the perf model counts it: the tokens whose KV exists before the step
            # (the prompt and every token streamed so far but the last).
            ctx = [
                q.prompt_len + bisect.bisect_right(tokens[q.index], a) - 1
                for q in ok
                if tokens[q.index][0] <= a and tokens[q.index][-1] >= b and engine[q.index] == engine[r.index]
            ]
            gaps.append((b - a, len(ctx), sum(ctx), max(ctx)))
    return gaps


def calibrate_serving(
    results: list[RequestResult], perf: PerfModel, engine_of: EngineOf | None = None
) -> tuple[float, float]:
    """(serving_step_s, serving_seq_s): what the measured decode-only gaps cost beyond the profiled
    engine step, as a cost per step plus a cost per streamed token. The median excess at each
    batch size (robust to the odd stall), then least squares over batch sizes weighted by how
    many gaps each has, with neither term below 0. engine_of: where the run's requests were split
    over several engines, which one served each (a batch counts one engine's streams)."""
    engine = dataclasses.replace(perf, serving_step_s=0.0, serving_seq_s=0.0)
    excess: dict[int, list[float]] = {}
    for gap, batch, ctx, longest in decode_gaps(results, engine_of):
        excess.setdefault(batch, []).append(gap - engine.decode_step_s(batch, ctx, longest))
    if not excess:
        return 0.0, 0.0
    pts = [(b, statistics.median(v), len(v)) for b, v in excess.items()]
    w = sum(n for _, _, n in pts)
    mb, mm = sum(n * b for b, _, n in pts) / w, sum(n * m for _, m, n in pts) / w
    var = sum(n * (b - mb) ** 2 for b, _, n in pts)
    seq = sum(n * (b - mb) * (m - mm) for b, m, n in pts) / var if var else 0.0
    step = mm - seq * mb
    if seq < 0:
        return max(mm, 0.0), 0.0
    if step < 0:
        return 0.0, max(sum(n * b * m for b, m, n in pts) / sum(n * b * b for b, _, n in pts), 0.0)
    return step, seq


def phase_medians(results: list[RequestResult]) -> dict[str, float]:
    """Median seconds of each phase of the remote prefills (from the router's phase timestamps):
    decide (arrival to the job's entry in the prefill queue: the decode worker's step boundary),
    queue (to a prefill worker's pull), prefill+kv (to the first token)."""
    spans: dict[str, list[float]] = {"decide": [], "queue": [], "prefill+kv": []}
    for r in results:
        ph = r.phases
        if not r.ok or not ph or ph.get("prefill_path") != "remote" or "pulled" not in ph:
            continue
        enq, pulled, first = float(ph["enqueued"]), float(ph["pulled"]), float(ph["first_token"])
        spans["decide"].append(enq - float(ph["arrival"]))
        spans["queue"].append(pulled - enq)
        spans["prefill+kv"].append(first - pulled)
    return {k: statistics.median(v) for k, v in spans.items() if v}


def format_rows(rows: list[Row], target: float = 0.2) -> str:
    lines = [
        f"{'run':<20}{'metric':<10}{'measured s':>12}{'predicted s':>13}{'error':>9}  within {target:.0%}"
    ]
    for r in rows:
        ok = "yes" if abs(r.error) <= target else "NO"
        lines.append(
            f"{r.config + '@' + str(r.rate):<20}{r.metric:<10}{r.measured_s:>12.3f}{r.predicted_s:>13.3f}"
            f"{r.error:>+9.1%}  {ok}"
        )
    return "\n".join(lines)
