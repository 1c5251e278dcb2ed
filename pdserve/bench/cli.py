"""`pdserve bench`: load an OpenAI-compatible server with a workload and report latencies.

    pdserve bench --base-url http://127.0.0.1:8000 --workload bimodal --rate 2 --num-requests 100 \\
        --slo-ttft-ms 2000 --slo-tpot-ms 100 --json out.json --plots plots/
    pdserve bench ... --sweep 0.5,1,2,4       # a rate sweep: SLO attainment per rate and goodput
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import httpx

from pdserve.bench.client import RequestResult, run_sharded
from pdserve.bench.report import SLO, burst_warning, goodput, plot_attainment, plot_cdfs, summarize
from pdserve.bench.workload import WORKLOADS, LengthSampler, RequestSpec, load_trace, synthetic


def add_workload_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("workload")
    g.add_argument("--workload", default="sharegpt", help=f"{' | '.join(WORKLOADS)} | a JSONL trace file")
    g.add_argument("--prompt-len", type=int, default=512, help="fixed/uniform: prompt tokens (mean)")
    g.add_argument("--output-len", type=int, default=128, help="fixed/uniform: output tokens (mean)")
    g.add_argument("--long-share", type=float, default=0.2, help="bimodal: share of long prompts")
    g.add_argument("--short-range", default="50,200", help="bimodal/short: prompt tokens LO,HI")
    g.add_argument("--long-range", default="1500,2000", help="bimodal: long prompt tokens LO,HI")
    g.add_argument("--output-range", default="64,128", help="bimodal/short: output tokens LO,HI")
    g.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of arrival gaps (1 = Poisson)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--trace-block-tokens", type=int, default=512, help="trace: tokens per hash id (Mooncake)")


def sampler_from_args(args: argparse.Namespace) -> LengthSampler | None:
    """None when --workload names a trace file."""
    if args.workload not in WORKLOADS:
        if not Path(args.workload).is_file():
            raise ValueError(f"--workload: neither {', '.join(WORKLOADS)} nor a file: {args.workload!r}")
        return None
    return LengthSampler(
        args.workload,
        prompt_len=args.prompt_len,
        output_len=args.output_len,
        long_share=args.long_share,
        short_range=_range(args.short_range, "--short-range"),
        long_range=_range(args.long_range, "--long-range"),
        output_range=_range(args.output_range, "--output-range"),
    )


def _range(text: str, flag: str) -> tuple[int, int]:
    lo, _, hi = text.partition(",")
    try:
        out = (int(lo), int(hi))
    except ValueError:
        raise ValueError(f"{flag}: expected LO,HI, got {text!r}") from None
    if not 1 <= out[0] <= out[1]:
        raise ValueError(f"{flag}: need 1 <= LO <= HI, got {text!r}")
    return out


def build_specs(
    args: argparse.Namespace, rate: float | None, num_requests: int, vocab_size: int
) -> list[RequestSpec]:
    sampler = sampler_from_args(args)
    if sampler is None:
        specs = load_trace(Path(args.workload), vocab_size, args.seed, args.trace_block_tokens)
        if rate is not None:  # replay the trace's shape at the asked mean rate
            span = max(s.arrival_s for s in specs) or 1.0
            scale = len(specs) / span / rate
            specs = [RequestSpec(s.index, s.prompt, s.output_len, s.arrival_s * scale) for s in specs]
        return specs[:num_requests]
    return synthetic(sampler, num_requests, rate, vocab_size, args.seed, args.burstiness)


def add_bench_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "bench",
        help="benchmark an OpenAI-compatible server (TTFT, TPOT, ITL, goodput)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--base-url", required=True, help="server root, e.g. http://127.0.0.1:8000")
    p.add_argument("--model", default=None, help="model name (default: the server's first in /v1/models)")
    p.add_argument("--api-key", default=None)
    load = p.add_mutually_exclusive_group()
    load.add_argument("--rate", type=float, default=None, help="request rate (req/s)")
    load.add_argument("--concurrency", type=int, default=None, help="requests kept in flight")
    load.add_argument("--sweep", default=None, help="comma-separated rates: one run each, then goodput")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--num-requests", type=int, default=None, help="requests per run (default 100)")
    size.add_argument("--duration", type=float, default=None, help="seconds of arrivals per run")
    p.add_argument("--slo-ttft-ms", type=float, default=None)
    p.add_argument("--slo-tpot-ms", type=float, default=None)
    p.add_argument("--vocab-size", type=int, default=32000, help="prompt token ids are drawn below this")
    p.add_argument("--json", type=Path, default=None, help="write the report here")
    p.add_argument("--plots", type=Path, default=None, help="write CDF, attainment and timeline plots here")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--client-procs", type=int, default=1,
        help="client processes sharing the load (raise it past a few thousand streamed tokens/s)",
    )  # fmt: skip
    add_workload_args(p)
    p.set_defaults(handler=lambda args: run_bench(p, args))


def _default_model(base_url: str, api_key: str | None) -> str:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    resp = httpx.get(f"{base_url.rstrip('/')}/v1/models", headers=headers, timeout=10)
    resp.raise_for_status()
    return str(resp.json()["data"][0]["id"])


def _one_run(args: argparse.Namespace, model: str, rate: float | None) -> list[RequestResult]:
    if args.duration is not None and rate is not None:
        n = max(1, math.ceil(rate * args.duration * 1.5))  # more than enough; arrivals stop at duration
    elif args.duration is not None:
        n = max(1000, (args.concurrency or 1) * 100)
    else:
        n = args.num_requests or 100
    specs = build_specs(args, rate, n, args.vocab_size)
    return run_sharded(
        args.base_url, specs, model, args.client_procs, concurrency=args.concurrency,
        api_key=args.api_key, progress=not args.no_progress and args.client_procs <= 1,
        stop_after_s=args.duration,
    )  # fmt: skip


def run_bench(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if (args.slo_ttft_ms is None) != (args.slo_tpot_ms is None):
        parser.error("give both --slo-ttft-ms and --slo-tpot-ms, or neither")
    if args.sweep is not None and args.slo_ttft_ms is None:
        parser.error("--sweep needs --slo-ttft-ms and --slo-tpot-ms (goodput is defined by them)")
    try:
        sampler_from_args(args)
        rates = [float(x) for x in args.sweep.split(",")] if args.sweep else [args.rate]
    except ValueError as exc:
        parser.error(str(exc))
    slo = SLO(args.slo_ttft_ms / 1e3, args.slo_tpot_ms / 1e3) if args.slo_ttft_ms is not None else None
    model = args.model or _default_model(args.base_url, args.api_key)
    report: dict[str, Any] = {
        "base_url": args.base_url,
        "model": model,
        "workload": args.workload,
        "runs": [],
    }
    runs: dict[str, list[RequestResult]] = {}
    for rate in rates:
        results = _one_run(args, model, rate)
        label = f"rate {rate}" if rate is not None else f"concurrency {args.concurrency or 'all'}"
        summary = summarize(results, slo)
        summary["rate"] = rate
        report["runs"].append(summary)
        runs[label] = results
        print(f"{label}: " + json.dumps({k: summary[k] for k in ("ttft_s", "tpot_s", "itl_s")}, default=str))
        if (warning := burst_warning(summary)) is not None:
            print(f"{label}: warning: {warning}")
    if slo is not None and all(r is not None for r in rates):
        points = [(float(s["rate"]), float(s["slo_attainment"])) for s in report["runs"]]
        report["goodput_req_s"] = goodput(points)
        print(f"goodput: {report['goodput_req_s']} req/s (>= 90% of requests within both SLOs)")
    if args.json is not None:
        report["requests"] = {label: [r.__dict__ for r in rs] for label, rs in runs.items()}
        args.json.write_text(json.dumps(report, indent=1, default=str))
    if args.plots is not None:
        _plots(args.plots, runs, report, slo is not None and len(rates) > 1)
    return 0


def _plots(out: Path, runs: dict[str, list[RequestResult]], report: dict[str, Any], sweep: bool) -> None:
    from pdserve.bench.timeline import plot_timeline

    out.mkdir(parents=True, exist_ok=True)
    plot_cdfs(runs, out / "cdf.png")
    for i, results in enumerate(runs.values()):
        plot_timeline(results, out / f"timeline-{i}.png")
    if sweep:
        pts = [(float(s["rate"]), float(s["slo_attainment"])) for s in report["runs"]]
        plot_attainment({report["model"]: pts}, out / "attainment.png")
