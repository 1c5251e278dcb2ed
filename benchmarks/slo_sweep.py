"""Goodput of each deployment of a `gpu_serving.py compare` run under other SLOs, from its saved
per-request results: which deployment wins depends on how tight the TPOT target is.

    python benchmarks/slo_sweep.py --measured results/two_gpu --ttft-ms 1000 \\
        --tpot-ms 15 20 25 30 40 50 --out results/two_gpu/slo_sweep.json

Goodput is DistServe's: the highest swept rate with >= 90% of requests meeting both targets. A
rate the run skipped (it stops a sweep once attainment falls under 0.5) counts as failing.
`--max-gap-ms` adds a stall target to every cell: no wait between two streamed chunks longer than
that.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from gpu_serving import load_runs

from pdserve.bench.client import RequestResult
from pdserve.bench.report import SLO, goodput, summarize


def sweep(
    runs: dict[tuple[str, str, float], list[RequestResult]],
    ttft_s: float,
    tpots_s: list[float],
    max_gap_s: float | None = None,
) -> dict[str, dict[str, float]]:
    """{"config/workload": {"tpot_ms": goodput req/s}}, from gpu_serving.load_runs."""
    grouped: dict[tuple[str, str], dict[float, list[RequestResult]]] = {}
    for (config, workload, rate), results in runs.items():
        grouped.setdefault((config, workload), {})[rate] = results
    out: dict[str, dict[str, float]] = {}
    for (config, workload), by_rate in sorted(grouped.items()):
        row = out.setdefault(f"{config}/{workload}", {})
        for tpot in tpots_s:
            slo = SLO(ttft_s, tpot, max_gap_s)
            curve = [(rate, summarize(r, slo)["slo_attainment"]) for rate, r in sorted(by_rate.items())]
            row[f"{tpot * 1e3:g}"] = goodput(curve)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--measured", type=Path, required=True)
    ap.add_argument("--ttft-ms", type=float, default=1000.0)
    ap.add_argument("--tpot-ms", type=float, nargs="+", default=[15, 20, 25, 30, 40, 50])
    ap.add_argument("--max-gap-ms", type=float, default=None, help="also: longest stall between chunks")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    gap_s = args.max_gap_ms / 1e3 if args.max_gap_ms is not None else None
    table = sweep(load_runs(args.measured), args.ttft_ms / 1e3, [t / 1e3 for t in args.tpot_ms], gap_s)
    header = "".join(f"{f'TPOT<={t:g}ms':>14}" for t in args.tpot_ms)
    print(f"{'deployment/workload':<26}{header}")
    for name, row in table.items():
        print(f"{name:<26}" + "".join(f"{v:>14g}" for v in row.values()))
    args.out.write_text(
        json.dumps({"ttft_ms": args.ttft_ms, "max_gap_ms": args.max_gap_ms, "goodput_req_s": table}, indent=2)
    )


if __name__ == "__main__":
    main()
