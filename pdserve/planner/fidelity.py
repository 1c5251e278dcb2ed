"""Simulator fidelity: replay measured requests (same arrival times and lengths) through the
simulator and compare latency percentiles with what was measured."""

from __future__ import annotations

import json
import math
import re
import statistics
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


def calibrate_serving_seq_s(results: list[RequestResult], perf: PerfModel) -> float:
    """The per-sequence serving cost that makes the profiled decode step match the measured
    inter-token gaps: for every gap, the requests decoding at that moment (their count and
    context) give the engine's step; the median excess per sequence is the serving cost."""
    spans = [(r.start + (r.ttft_s or 0.0), r.start + (r.e2e_s or 0.0), r.prompt_len) for r in results if r.ok]
    excess = []
    for r in results:
        for a, b in zip(r.chunk_times, r.chunk_times[1:], strict=False):
            t = r.start + b
            active = [p for t0, t1, p in spans if t0 <= t <= t1]
            if len(active) >= 4:  # small batches say little about a per-sequence cost
                step = perf.decode_step_s(len(active), sum(active))
                excess.append(((b - a) - step) / len(active))
    return max(statistics.median(excess), 0.0) if excess else 0.0


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
