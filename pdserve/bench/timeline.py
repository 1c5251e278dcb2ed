"""Per-request timeline (a Gantt-like chart): one bar per request, split into its phases.

With the server's phase timestamps (pdserve's router sends them): queue (arrival until a prefill
worker pulled the job), prefill, KV transfer, decode; a local prefill shows as one "prefill
(local)" segment, since its wait and compute happen inside the decode worker. Without them (any
other server): "TTFT" (queue + prefill, as the client saw it) and decode.
"""

from __future__ import annotations

from pathlib import Path

from pdserve.bench.client import RequestResult

COLORS = {
    "queue": "#bbbbbb",
    "prefill": "#4c72b0",
    "prefill (local)": "#8172b2",
    "transfer": "#dd8452",
    "TTFT": "#4c72b0",
    "decode": "#55a868",
}


def segments(r: RequestResult) -> list[tuple[str, float, float]]:
    """(phase, start, end) in seconds since the run started."""
    if not r.ok:
        return []
    assert r.ttft_s is not None and r.e2e_s is not None
    t0, first, end = r.start, r.start + r.ttft_s, r.start + r.e2e_s
    ph = r.phases
    if not ph or not isinstance(ph.get("first_token"), float):
        return [("TTFT", t0, first), ("decode", first, end)]
    # Server offsets are from its own receipt of the request; the client's send time is close
    # enough (loopback) that we anchor them there and keep the client's own first-token time.
    pulled = ph.get("pulled")
    kv_s = float(ph.get("kv_seconds", 0.0))
    if ph.get("prefill_path") == "remote" and isinstance(pulled, float):
        transfer_start = max(first - kv_s, t0 + pulled)
        return [
            ("queue", t0, t0 + pulled),
            ("prefill", t0 + pulled, transfer_start),
            ("transfer", transfer_start, first),
            ("decode", first, end),
        ]
    return [("prefill (local)", t0, first), ("decode", first, end)]


def plot_timeline(results: list[RequestResult], path: Path, max_requests: int = 200) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = sorted((r for r in results if r.ok), key=lambda r: r.start)[:max_requests]
    fig, ax = plt.subplots(figsize=(11, max(3.0, 0.12 * len(shown) + 1.5)))
    used: set[str] = set()
    for row, r in enumerate(shown):
        for phase, a, b in segments(r):
            ax.barh(
                row, b - a, left=a, height=0.8, color=COLORS[phase], label=None if phase in used else phase
            )
            used.add(phase)
    ax.set(
        xlabel="time since the run started (s)", ylabel="request (by arrival)", title="Per-request timeline"
    )
    ax.invert_yaxis()
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
