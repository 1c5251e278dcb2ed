"""Stalls seen by streaming clients in a `gpu_serving.py compare` run, from its saved per-request
results: every wait over a threshold between two chunks of a request, grouped into moments when
many streams stalled together (a pause of a whole process: router or worker) rather than one.

    python benchmarks/stalls.py --measured results/two_gpu --min-ms 200
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

from gpu_serving import load_runs

from pdserve.bench.client import RequestResult

# Stalls starting within this long of the previous one belong to the same moment.
SAME_MOMENT_S = 0.05


def stall_moments(results: list[RequestResult], min_s: float) -> list[dict[str, float]]:
    """Moments, in run time, when streams stalled for at least min_s: start, streams, longest."""
    stalls = sorted(
        (r.start + a, b - a) for r in results for a, b in itertools.pairwise(r.chunk_times) if b - a >= min_s
    )
    moments: list[dict[str, float]] = []
    for start, length in stalls:
        if moments and start - moments[-1]["last_start_s"] < SAME_MOMENT_S:
            m = moments[-1]
            m["streams"] += 1
            m["longest_s"] = max(m["longest_s"], length)
            m["last_start_s"] = start
        else:
            moments.append({"start_s": start, "streams": 1, "longest_s": length, "last_start_s": start})
    return moments


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--measured", type=Path, required=True)
    ap.add_argument("--min-ms", type=float, default=200.0)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    table = {}
    print(
        f"{'run':<28}{'requests':>9}{'stalls':>8}{'moments':>9}{'streams at once (max)':>23}{'longest ms':>12}"
    )
    for (config, workload, rate), results in sorted(load_runs(args.measured).items()):
        moments = stall_moments(results, args.min_ms / 1e3)
        stalls = sum(int(m["streams"]) for m in moments)
        widest = max((int(m["streams"]) for m in moments), default=0)
        longest = max((m["longest_s"] for m in moments), default=0.0)
        name = f"{config}/{workload}@{rate:g}"
        table[name] = {"requests": len(results), "stalls": stalls, "moments": moments}
        print(f"{name:<28}{len(results):>9}{stalls:>8}{len(moments):>9}{widest:>23}{longest * 1e3:>12.0f}")
    if args.out:
        args.out.write_text(json.dumps({"min_ms": args.min_ms, "runs": table}, indent=1))


if __name__ == "__main__":
    main()
