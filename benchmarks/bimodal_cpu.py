"""Disaggregated (1 prefill + 1 decode, one core each) against co-located (one worker on both cores,
chunked prefill) on a bimodal workload, same requests, same run.

    .venv/bin/python benchmarks/bimodal_cpu.py --rates 0.3 0.5 0.7 --num-requests 60 --out results/bimodal

Workload: 80% prompts of 50-200 tokens, 20% of 1,500-2,000; 64-128 output tokens; Poisson arrivals.
Both deployments serve SmolLM2-135M-Instruct (fp32) behind the same router; the router process is
unpinned in both. Reports TTFT / ITL percentiles, SLO attainment per rate and goodput, with plots.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

from serve_proc import Server, decisions

from pdserve.bench.client import RequestResult, run
from pdserve.bench.report import SLO, goodput, plot_attainment, plot_cdfs, summarize
from pdserve.bench.workload import LengthSampler, synthetic

CONFIGS = {
    # One worker on both cores; long prompts are prefilled in 512-token chunks between decode steps.
    "colocated": ["--prefill", "0", "--decode", "0", "--colocated", "1", "--pin-cpus"],
    # The same with 128-token chunks: smaller stalls for running decodes, longer prefills.
    "colocated-c128": [
        "--prefill",
        "0",
        "--decode",
        "0",
        "--colocated",
        "1",
        "--pin-cpus",
        "--max-num-batched-tokens",
        "128",
    ],
    # 512-token steps, but one request's prompt at most 128 tokens of a step while others wait
    # (--prefill-chunk-cap): short prompts are admitted beside a long one's chunks.
    "colocated-cap128": ["--prefill", "0", "--decode", "0", "--colocated", "1", "--pin-cpus"]
    + ["--prefill-chunk-cap", "128"],
    # One core each. On a CPU every prompt token a decode worker computes stalls its decodes for
    # ~3.5 ms, so nearly every prompt is worth sending to the prefill worker: threshold 32 tokens.
    "1P1D": [
        "--prefill",
        "1",
        "--decode",
        "1",
        "--transport",
        "shm",
        "--pin-cpus",
        "--remote-prefill-threshold",
        "32",
        # With the prefill queue full, only short prompts come back here; long ones wait for the
        # prefill worker rather than stall every decode for seconds.
        "--max-local-prefill-tokens",
        "256",
    ],
}
VOCAB = 49152


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", type=float, nargs="+", default=[0.5], help="Poisson rates to run (req/s)")
    ap.add_argument("--num-requests", type=int, default=60)
    ap.add_argument("--slo-ttft-s", type=float, default=4.0)
    ap.add_argument("--slo-tpot-s", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--configs", nargs="+", default=["colocated", "1P1D"], choices=list(CONFIGS))
    ap.add_argument("--out", type=Path, default=Path("results/bimodal"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    slo = SLO(args.slo_ttft_s, args.slo_tpot_s)
    sampler = LengthSampler("bimodal")
    report: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "date": time.strftime("%Y-%m-%d"),
        "workload": "bimodal: 80% 50-200 / 20% 1500-2000 prompt tokens, 64-128 output tokens, Poisson",
        "slo": {"ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s},
        "runs": {},
    }
    curves: dict[str, list[tuple[float, float]]] = {c: [] for c in args.configs}
    for cfg in args.configs:
        server = Server(CONFIGS[cfg], args.out / f"{cfg}.log")
        try:
            warm = synthetic(LengthSampler("fixed", prompt_len=64, output_len=4), 2, None, VOCAB, seed=99)
            asyncio.run(run(server.url, warm, "smollm2"))
            for i, rate in enumerate(args.rates):
                # Fresh prompts per rate (seeded by position): a later rate must not hit the prefix
                # cache with an earlier rate's prompts. Both deployments see the same requests.
                specs = synthetic(
                    sampler, args.num_requests, rate, VOCAB, seed=args.seed + i, max_model_len=2048
                )
                before = decisions(server.metrics())
                results: list[RequestResult] = asyncio.run(run(server.url, specs, "smollm2", progress=True))
                after = decisions(server.metrics())
                summary = summarize(results, slo)
                summary["prefill_paths"] = {k: after.get(k, 0) - before.get(k, 0) for k in after}
                report["runs"][f"{cfg}@{rate}"] = summary
                curves[cfg].append((rate, summary["slo_attainment"]))
                (args.out / f"{cfg}@{rate}.requests.json").write_text(
                    json.dumps([r.__dict__ for r in results])
                )
                print(
                    f"{cfg} @ {rate} req/s: "
                    + json.dumps({k: summary[k] for k in ("ttft_s", "itl_s", "slo_attainment")})
                )
        finally:
            server.stop()
    for cfg in args.configs:
        report[f"goodput_{cfg}"] = goodput(curves[cfg])
    for rate in args.rates:
        runs = {
            cfg: [
                RequestResult(**r) for r in json.loads((args.out / f"{cfg}@{rate}.requests.json").read_text())
            ]
            for cfg in args.configs
        }
        plot_cdfs(runs, args.out / f"cdf@{rate}.png")
        if {"colocated", "1P1D"} <= set(args.configs):
            co, dis = report["runs"][f"colocated@{rate}"], report["runs"][f"1P1D@{rate}"]
            report[f"ratios@{rate}"] = {
                f"{m}_{q}": dis[m][q] / co[m][q] for m in ("ttft_s", "itl_s") for q in ("p50", "p99")
            }
    if len(args.rates) > 1:
        plot_attainment(curves, args.out / "attainment.png")
    (args.out / "report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "runs"}, indent=2))


if __name__ == "__main__":
    main()
