"""Exposed transfer time, paired: remote and local prefills alternating in ONE deployment.

`gpu_serving.py exposed` starts a deployment per path, one after another, so the difference of
their TTFTs carries the run-to-run spread of whole deployments (GC state, where the processes
landed, a few ms). Here one 1P1D deployment (cuda_ipc, the KV pushed after the first token, early
prefill, the first token streamed from the prefill worker: every default) has its remote threshold at
`--prompt-len`: a prompt of that length goes to the prefill worker, one a token shorter is
prefilled by the decode worker. The two alternate (which comes first flips every pair), fresh
prompts each time, one request at a time, so both paths see the same machine. Reported: the mean
and median of the per-pair differences (remote − local) in client TTFT and in the router's own
first-token mark (less noise: no SSE serialisation or client), with a 95% interval of the mean.

    python benchmarks/exposed_paired.py --gpus 0 --prompt-len 4096 --pairs 40 --out results/paired
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import statistics
from pathlib import Path
from typing import Any

from gpu_serving import MODEL, header, placement, vocab_size, warm_up
from serve_proc import Server

from pdserve.bench.client import run
from pdserve.bench.workload import RequestSpec, random_prompt


def summary(diffs_s: list[float]) -> dict[str, float]:
    """Mean, median and the 95% interval of the mean (normal approximation), in ms."""
    ms = [1e3 * d for d in diffs_s]
    mean = statistics.fmean(ms)
    half = 1.96 * statistics.stdev(ms) / math.sqrt(len(ms)) if len(ms) > 1 else float("nan")
    return {
        "mean_ms": mean,
        "median_ms": statistics.median(ms),
        "ci95_low_ms": mean - half,
        "ci95_high_ms": mean + half,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=MODEL)
    ap.add_argument("--gpus", default="0")
    ap.add_argument("--prompt-len", type=int, default=4096)
    ap.add_argument("--pairs", type=int, default=40)
    ap.add_argument("--transport", default="cuda_ipc")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    flags = ["--model", args.model, *placement(args), "--prefill", "1", "--decode", "1"]
    flags += ["--transport", args.transport, "--max-num-batched-tokens", str(max(8192, args.prompt_len))]
    # The decode worker learns its own prefill speed from the local half, and weighs it against
    # the transfer at --link-gbps: cuda_ipc moves 100+ GB/s, not the network-link default.
    flags += ["--remote-prefill-threshold", str(args.prompt_len), "--link-gbps", "100"]
    vocab = vocab_size(args.model)
    samples: dict[str, list[dict[str, Any]]] = {"remote": [], "local": []}
    server = Server(flags, args.out / "paired.log")
    try:
        warm_up(server.url, args.model)
        rng = random.Random(2024)
        # One remote prompt first, not counted: warm_up's prompts are all below the threshold, and a
        # fresh process compiles the KV copy kernel at its first push. Then the pairs, one request at
        # a time on one kept-alive connection (a new one per request adds client-side spread).
        paths = ["remote"]
        for i in range(args.pairs):
            paths += ["remote", "local"] if i % 2 == 0 else ["local", "remote"]
        specs = [
            RequestSpec(k, random_prompt(rng, args.prompt_len - (path == "local"), vocab), 2, 0.0)
            for k, path in enumerate(paths)
        ]
        results = asyncio.run(run(server.url, specs, args.model, concurrency=1))
        for path, res in sorted(zip(paths, results, strict=True), key=lambda pr: pr[1].index)[1:]:
            if not res.ok or res.phases is None:
                raise RuntimeError(f"{path} request failed: {res.error}")
            if res.phases.get("prefill_path") != path:
                raise RuntimeError(f"a {path} prompt was prefilled {res.phases.get('prefill_path')}")
            samples[path].append(
                {
                    "ttft_s": res.ttft_s,
                    "router_first_token_s": res.phases["first_token"],
                    "phases": res.phases,
                }
            )
    finally:
        server.stop()
    report: dict[str, Any] = header(args) | {
        "flags": flags,
        "prompt_len": args.prompt_len,
        "pairs": args.pairs,
    }
    report.pop("common_flags")
    for key in ("ttft_s", "router_first_token_s"):
        diffs = [r[key] - loc[key] for r, loc in zip(samples["remote"], samples["local"], strict=True)]
        report[f"exposed_{key}"] = summary(diffs)
        report[f"p50_{key}"] = {p: 1e3 * statistics.median(s[key] for s in samples[p]) for p in samples}
    report["samples"] = samples
    (args.out / "report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "samples"}, indent=2))


if __name__ == "__main__":
    main()
