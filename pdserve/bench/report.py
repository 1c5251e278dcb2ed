"""Latency statistics, SLO attainment and goodput, JSON and plots."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pdserve.bench.client import RequestResult


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]; NaN for no values."""
    if not values:
        return math.nan
    xs = sorted(values)
    k = (len(xs) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def stats(values: Sequence[float]) -> dict[str, float]:
    return {
        "mean": sum(values) / len(values) if values else math.nan,
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
        "max": max(values) if values else math.nan,
        "count": float(len(values)),
    }


@dataclass(frozen=True)
class SLO:
    ttft_s: float
    tpot_s: float
    # Optional: the longest wait between two streamed chunks after the first (a stall the reader
    # sees, which a mean TPOT hides), in the spirit of time-between-tokens targets.
    max_gap_s: float | None = None

    def met(self, r: RequestResult) -> bool:
        """DistServe's criterion: both the TTFT and the TPOT target, per request (and the longest
        stall, when given)."""
        tpot = r.tpot_s
        return (
            r.ok
            and r.ttft_s is not None
            and r.ttft_s <= self.ttft_s
            and (tpot is None or tpot <= self.tpot_s)
            and (self.max_gap_s is None or longest_gap(r) <= self.max_gap_s)
        )


def longest_gap(r: RequestResult) -> float:
    """Seconds of the longest wait between two consecutive streamed chunks (0 with fewer than two)."""
    return max((b - a for a, b in itertools.pairwise(r.chunk_times)), default=0.0)


# A run whose arrivals last fewer request lifetimes than this measures a burst the deployment
# absorbs (and drains after the last arrival), not a load it sustains: on two H100s, 8 s of
# arrivals (about one lifetime) put two deployments near 40 req/s that sustain 20 over 30 s.
STEADY_LIFETIMES = 3.0


def arrival_window_s(results: list[RequestResult]) -> float:
    """Seconds from the first request sent to the last."""
    starts = [r.start for r in results]
    return max(starts) - min(starts) if starts else 0.0


def summarize(results: list[RequestResult], slo: SLO | None = None) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    span = max((r.start + (r.e2e_s or 0.0) for r in ok), default=0.0) - min(
        (r.start for r in ok), default=0.0
    )
    e2e = stats([r.e2e_s for r in ok if r.e2e_s is not None])
    window = arrival_window_s(results)
    out: dict[str, Any] = {
        "requests": len(results),
        "errors": len(results) - len(ok),
        "duration_s": span,
        "throughput_req_s": len(ok) / span if span > 0 else math.nan,
        "output_tok_s": sum(r.output_tokens for r in ok) / span if span > 0 else math.nan,
        "ttft_s": stats([r.ttft_s for r in ok if r.ttft_s is not None]),
        "tpot_s": stats([t for r in ok if (t := r.tpot_s) is not None]),
        "itl_s": stats([x for r in ok for x in r.itls_s]),
        "e2e_s": e2e,
        "arrival_window_s": window,
        # How many median request lifetimes the arrivals lasted (see STEADY_LIFETIMES).
        "lifetimes_in_window": window / e2e["p50"] if e2e["count"] and e2e["p50"] > 0 else math.nan,
    }
    if slo is not None:
        out["slo"] = {"ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s}
        out["slo_attainment"] = sum(slo.met(r) for r in results) / len(results) if results else math.nan
    return out


def burst_warning(summary: dict[str, Any]) -> str | None:
    """A warning when a run's arrivals were too short to reach a steady state, else None."""
    lifetimes = summary.get("lifetimes_in_window", math.nan)
    if math.isnan(lifetimes) or lifetimes >= STEADY_LIFETIMES:
        return None
    return (
        f"arrivals lasted {summary['arrival_window_s']:.1f} s, {lifetimes:.1f} median request lifetimes "
        f"(< {STEADY_LIFETIMES:g}): this attainment is for a burst, not a sustained rate; run longer"
    )


def goodput(points: Sequence[tuple[float, float]], target: float = 0.9) -> float:
    """The highest request rate whose SLO attainment is >= target (0 if none), from a rate sweep
    of (rate, attainment) points."""
    passing = [rate for rate, attained in points if attained >= target]
    return max(passing, default=0.0)


def plot_cdfs(runs: dict[str, list[RequestResult]], path: Path) -> None:
    """TTFT and inter-token latency CDFs, one line per labelled run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for label, results in runs.items():
        ok = [r for r in results if r.ok]
        for ax, values in (
            (axes[0], sorted(r.ttft_s for r in ok if r.ttft_s is not None)),
            (axes[1], sorted(x for r in ok for x in r.itls_s)),
        ):
            if values:
                ax.plot(values, [(i + 1) / len(values) for i in range(len(values))], label=label)
    axes[0].set(xlabel="time to first token (s)", ylabel="fraction of requests", title="TTFT CDF")
    axes[1].set(xlabel="inter-token latency (s)", ylabel="fraction of tokens", title="ITL CDF", xscale="log")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_attainment(curves: dict[str, list[tuple[float, float]]], path: Path, target: float = 0.9) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, pts in curves.items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.axhline(target, color="grey", linestyle="--", linewidth=1)
    ax.set(
        xlabel="request rate (req/s)", ylabel="SLO attainment", ylim=(0, 1.05), title="SLO attainment vs rate"
    )
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
