"""Whole `pdserve serve` deployments on GPUs, measured from the client side (streamed tokens).

Two experiments, each starting real deployments (router + worker processes) one after another:

`exposed` — what remote prefill costs a request in time to first token. The same 1P1D deployment
(cuda_ipc, layer-wise streaming) is started four times: sending every long prompt to the prefill
worker as the router routes it (early prefill, the default, with the first token streamed from the
prefill worker), the same with `--no-first-token-from-prefill` (the first token comes through the
decode worker), with `--no-early-prefill` as well (the job reaches the queue after the decode
worker's decision), and with the remote threshold above the prompt length so the decode worker
prefills it itself. Same prompts (fresh ones each repeat, so the prefix cache never helps), one at a time.
Exposed transfer time = TTFT(remote) - TTFT(local); the transfer's own time is the request's KV
bytes over the cuda_ipc copy bandwidth measured by `gpu_suite.py` (`--copy-gbps`).

    python benchmarks/gpu_serving.py exposed --gpus 0 --prompt-len 4096 --copy-gbps 1500 --out results/exposed

`compare` — 1 prefill + 1 decode worker against co-located replicas with chunked prefill, on the
same GPUs behind the same router, on the same requests at several Poisson rates. Reports TTFT /
TPOT / ITL percentiles, SLO attainment, goodput (per GPU), KV transfer time per remote request,
and how many prompts were prefilled where.

    python benchmarks/gpu_serving.py compare --gpus 0,1 --rates 4 8 12 16 --duration-s 15 \\
        --workloads bimodal short --out results/two_gpu

Both use a Llama-3-8B shape with random bf16 weights (`--model`), and token-id prompts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import statistics
import time
from pathlib import Path
from typing import Any

from serve_proc import ScrapesAt, Server, cores_busy, decisions, engine_reports

from pdserve.bench.client import RequestResult, run, run_sharded, sharded_start_at
from pdserve.bench.report import SLO, burst_warning, goodput, plot_attainment, plot_cdfs, stats, summarize
from pdserve.bench.workload import LengthSampler, RequestSpec, random_prompt, synthetic
from pdserve.engine.shapes import get_shape

MODEL = "dummy:llama-3-8b"
# Every worker of every deployment: a 2,048-token step budget (prefill chunks of that size between
# decode steps when co-located), up to 256 running sequences. `--transport auto` below is cuda_ipc
# on GPUs (shm on CPUs).
COMMON = ["--max-num-batched-tokens", "2048", "--max-num-seqs", "256"]

WORKLOADS = {
    # The chat mix: 80% 100-300 prompt tokens, 20% 3,000-6,000; 128-512 output tokens.
    "bimodal": LengthSampler(
        "bimodal", long_share=0.2, short_range=(100, 300), long_range=(3000, 6000), output_range=(128, 512)
    ),
    "short": LengthSampler("short", short_range=(100, 300), output_range=(128, 512)),
}


def compare_configs(n: int, threshold: int, prefill: int = 0) -> dict[str, list[str]]:
    """n workers either way: `prefill` prefill + the rest decode (default n/2 each), or n co-located
    replicas."""
    p = prefill or n // 2
    disagg = ["--prefill", str(p), "--decode", str(n - p), "--colocated", "0"]
    # Prompts from `threshold` uncached tokens go to the prefill worker; shorter ones the decode
    # worker prefills itself (conditional disaggregation), so short-only traffic never waits for a
    # transfer.
    disagg += ["--transport", "auto", "--remote-prefill-threshold", str(threshold)]
    disagg += ["--max-local-prefill-tokens", str(threshold)]
    # The decision compares transfer time with local prefill time: cuda_ipc moves 100+ GB/s (see
    # gpu_suite.py), not the 4 GB/s default that suits a network link.
    disagg += ["--link-gbps", "100"]
    # Idle prefill workers also serve short requests whole, up to half of a worker's 256 sequence
    # slots: a short-only load then uses both pools' GPUs (router/whole_policy.py).
    whole = [*disagg, "--prefill-serves-whole", "--max-whole-per-prefill-worker", "128"]
    return {
        f"{p}P{n - p}D": disagg,
        f"{p}P{n - p}D-whole": whole,
        # The same, and a prefill worker holding prompts' jobs still takes short requests whole while
        # its whole requests + 32 per job are fewer than the decode worker's streams (only with --configs).
        f"{p}P{n - p}D-whole-jobs": [*whole, "--whole-job-streams", "32"],
        # The decode worker decides and reserves before the prefill is queued (only with --configs).
        f"{p}P{n - p}D-after-decision": [*disagg, "--no-early-prefill"],
        f"{n}xcolocated": ["--prefill", "0", "--decode", "0", "--colocated", str(n)],
        # Smaller prefill chunks: each decode step that carries one is shorter, for tight TPOT
        # targets, at the cost of more steps per prompt (only with --configs).
        f"{n}xcolocated-chunk512": ["--prefill", "0", "--decode", "0", "--colocated", str(n)]
        + ["--max-num-batched-tokens", "512"],
        # 2,048-token steps, one request's prompt at most 512 of them while others wait: short
        # prompts are admitted beside a long one's chunks (only with --configs).
        f"{n}xcolocated-cap512": ["--prefill", "0", "--decode", "0", "--colocated", str(n)]
        + ["--prefill-chunk-cap", "512"],
        # One engine inside the API server, no router and no worker hop: what the HTTP-side
        # architecture costs, next to 1xcolocated (only with --configs, only for one GPU).
        "inprocess": ["--inprocess"],
    }


def kv_seconds(results: list[RequestResult]) -> dict[str, float]:
    """KV transfer time per remote request, as the decode worker saw it (first chunk to done)."""
    return stats(
        [
            float(r.phases["kv_seconds"])
            for r in results
            if r.ok and r.phases and r.phases.get("prefill_path") == "remote" and "kv_seconds" in r.phases
        ]
    )


def busy_shares(engines: dict[str, dict[str, float]]) -> dict[str, float]:
    return {w: r["busy_share"] for w, r in engines.items()}


def vocab_size(model: str) -> int:
    return int(get_shape(model.removeprefix("dummy:"))["vocab_size"])


def placement(args: argparse.Namespace) -> list[str]:
    """`--gpus cpu` runs the same experiment on CPU workers (to check the script, not to time)."""
    return ["--device", "cpu"] if args.gpus == "cpu" else ["--gpus", args.gpus]


def header(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] or ["none"]
    return {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, GPUs: {', '.join(names)}",
        "date": time.strftime("%Y-%m-%d"),
        "model": args.model,
        "common_flags": COMMON,
    }


def warm_up(url: str, model: str) -> None:
    """Compile and capture before timing: one short and one long prompt (two chunks)."""
    vocab = vocab_size(model)
    warm = synthetic(LengthSampler("fixed", prompt_len=3000, output_len=8), 2, None, vocab, seed=99)
    warm += synthetic(LengthSampler("fixed", prompt_len=64, output_len=8), 4, None, vocab, seed=98)
    asyncio.run(run(url, warm, model, concurrency=4))


# ---- exposed transfer time ----


def exposed(args: argparse.Namespace) -> dict[str, Any]:
    report = header(args) | {
        "prompt_len": args.prompt_len,
        "repeats": args.repeats,
        "transport": args.transport,
        "runs": {},
    }
    base = ["--model", args.model, *placement(args), "--prefill", "1", "--decode", "1"]
    base += ["--transport", args.transport, "--max-num-batched-tokens", str(max(8192, args.prompt_len))]
    base += ["--kv-layers-per-chunk", str(args.layers_per_chunk)]
    # remote: the router queues the prefill as it routes and streams the first token from the
    # prefill worker (the defaults); remote-via-decode: the first token comes through the decode
    # worker; remote-after-decision: the decode worker reserves blocks first and the job reaches the
    # queue through it.
    via_decode = ["--no-first-token-from-prefill"]
    paths = {
        "remote": ["--remote-prefill-threshold", "1"],
        "remote-via-decode": ["--remote-prefill-threshold", "1", *via_decode],
        "remote-after-decision": ["--remote-prefill-threshold", "1", "--no-early-prefill", *via_decode],
        "local": ["--remote-prefill-threshold", str(10 * args.prompt_len)],
    }
    for path, flags in paths.items():
        server = Server([*base, *flags], args.out / f"exposed-{path}.log")
        try:
            warm_up(server.url, args.model)
            ttfts, seconds, phases = [], [], []
            for i in range(args.repeats):
                spec = RequestSpec(
                    0, random_prompt(random.Random(1000 + i), args.prompt_len, vocab_size(args.model)), 2, 0.0
                )
                res = asyncio.run(run(server.url, [spec], args.model))[0]
                if not res.ok:
                    raise RuntimeError(f"{path} request failed: {res.error}")
                ttfts.append(res.ttft_s)
                seconds.append(res.chunk_times[1] if len(res.chunk_times) > 1 else float("nan"))
                phases.append(res.phases)
            report["runs"][path] = {
                "ttft_s": ttfts,
                "ttft_p50_s": statistics.median(ttfts),
                # The second token: where a first token streamed ahead of the KV's completion
                # leaves that completion's cost.
                "second_token_s": seconds,
                "second_token_p50_s": statistics.median(seconds),
                "phase_p50_ms": phase_medians(phases),
                "phases": phases,
                "decisions": decisions(server.metrics()),
            }
        finally:
            server.stop()
    kv_bytes = args.prompt_len * 32 * 2 * 8 * 128 * 2  # layers x (K, V) x kv heads x head dim x bf16
    own_s = kv_bytes / (args.copy_gbps * 1e9) if args.copy_gbps else float("nan")
    gap = report["runs"]["remote"]["ttft_p50_s"] - report["runs"]["local"]["ttft_p50_s"]
    local = report["runs"]["local"]
    for path in ("remote-via-decode", "remote-after-decision"):
        report[f"exposed_{path}_s"] = report["runs"][path]["ttft_p50_s"] - local["ttft_p50_s"]
    report["second_token_exposed_s"] = {
        path: run_["second_token_p50_s"] - local["second_token_p50_s"]
        for path, run_ in report["runs"].items()
    }
    report["kv_bytes"] = kv_bytes
    report["transfer_own_s"] = own_s
    report["exposed_s"] = gap
    report["exposed_over_own"] = gap / own_s if own_s == own_s else None
    for path, run_ in report["runs"].items():
        print(f"{path}: control-path marks, ms after the router got the request (p50 of {args.repeats})")
        for name, ms in run_["phase_p50_ms"].items():
            print(f"  {name:22s} {ms:9.2f}")
    return report


def phase_medians(phases: list[dict[str, Any] | None]) -> dict[str, float]:
    """Median of each timed mark across requests (ms since arrival), in the order they happen."""
    names = {k for p in phases if p for k, v in p.items() if isinstance(v, float) and k != "kv_seconds"}
    medians = {
        k: 1e3 * statistics.median(p[k] for p in phases if p and isinstance(p.get(k), float)) for k in names
    }
    return dict(sorted(medians.items(), key=lambda kv: kv[1]))


# ---- 1PxD vs co-located replicas ----


def compare(args: argparse.Namespace) -> dict[str, Any]:
    slo = SLO(args.slo_ttft_ms / 1e3, args.slo_tpot_ms / 1e3)
    num_gpus = 1 if args.gpus == "cpu" else len(args.gpus.split(","))
    every = compare_configs(args.workers or num_gpus, args.threshold, args.prefill_workers)
    names = args.configs or [
        name
        for name in every
        if name != "inprocess" and not name.endswith(("after-decision", "chunk512", "cap512", "jobs"))
    ]
    configs = {name: every[name] for name in names}
    report = header(args) | {
        "slo": {"ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s},
        "configs": configs,
        "runs": {},
    }
    curves: dict[str, dict[str, list[tuple[float, float]]]] = {w: {} for w in args.workloads}
    for cfg, flags in configs.items():
        try:
            server = Server(
                ["--model", args.model, *placement(args), *COMMON, *flags], args.out / f"{cfg}.log"
            )
        except (RuntimeError, TimeoutError) as exc:
            report["runs"][cfg] = {"error": str(exc)}
            continue
        try:
            warm_up(server.url, args.model)
            for w_i, workload in enumerate(args.workloads):
                curve = curves[workload].setdefault(cfg, [])
                for r_i, rate in enumerate(args.rates):
                    n = max(int(rate * args.duration_s), 16)
                    # Same requests for every config; fresh prompts for every (workload, rate).
                    specs = synthetic(
                        WORKLOADS[workload], n, rate, vocab_size(args.model), seed=100 * w_i + r_i
                    )
                    metrics_before, cpu_before = server.metrics(), server.cpu_seconds()
                    wall = time.monotonic()
                    # The engines' counters also over the arrival window (first to last send): over
                    # the whole run the drain after the last arrival reads as idle time.
                    start_at = sharded_start_at(args.client_procs)
                    arrivals_s = max(s.arrival_s for s in specs)
                    window = ScrapesAt(server, [start_at, start_at + arrivals_s])
                    results = run_sharded(
                        server.url, specs, args.model, args.client_procs,
                        timeout_s=args.timeout_s, start_at=start_at,
                    )  # fmt: skip
                    wall = time.monotonic() - wall
                    metrics_after, cpu_after = server.metrics(), server.cpu_seconds()
                    before, after = decisions(metrics_before), decisions(metrics_after)
                    summary = summarize(results, slo)
                    # Per second of the requests' own span (first send to last token), not of the
                    # call: the call also waits ~3 s for the client processes to start and exit, in
                    # which the deployment idles (rates and busy shares ~20% low otherwise).
                    span, summary["wall_s"] = summary["duration_s"], wall
                    # Cores busy per process over the run (router near 1.0: it is the bottleneck).
                    summary["cpu_cores"] = cores_busy(cpu_before, cpu_after, span)
                    summary["prefill_paths"] = {k: after.get(k, 0) - before.get(k, 0) for k in after}
                    summary["kv_seconds"] = kv_seconds(results)
                    # Is each engine thread busy (and with what) or waiting for work?
                    summary["engines"] = engine_reports(metrics_before, metrics_after, span)
                    if window.join() and arrivals_s > 0:
                        summary["engines_arrivals"] = engine_reports(*window.texts, arrivals_s)
                        summary["cpu_cores_arrivals"] = cores_busy(*window.cpu, arrivals_s)
                    key = f"{cfg}/{workload}@{rate}"
                    report["runs"][key] = summary
                    curve.append((rate, summary["slo_attainment"]))
                    requests_file(args.out, cfg, workload, rate).write_text(
                        json.dumps([r.__dict__ for r in results])
                    )
                    print(
                        f"{key}: attainment {summary['slo_attainment']:.2f} "
                        f"ttft p50/p99 {summary['ttft_s']['p50']:.3f}/{summary['ttft_s']['p99']:.3f} s "
                        f"tpot p50 {summary['tpot_s']['p50'] * 1e3:.1f} ms "
                        f"tok/s {summary['output_tok_s']:.0f} cores {summary['cpu_cores']}\n"
                        f"  engines {summary['engines']}\n"
                        f"  busy while requests arrive {busy_shares(summary.get('engines_arrivals', {}))}",
                        flush=True,
                    )
                    if (warning := burst_warning(summary)) is not None:
                        print(f"  warning: {warning}", flush=True)
                    # Past saturation every higher rate fails too: save the device time.
                    if summary["slo_attainment"] < 0.5:
                        break
                (args.out / "report.json").write_text(json.dumps(report, indent=2))
        finally:
            server.stop()
    for workload, by_cfg in curves.items():
        for cfg, curve in by_cfg.items():
            g = goodput(curve)
            report[f"goodput/{workload}/{cfg}"] = {"req_s": g, "per_gpu_req_s": g / num_gpus}
    return report


def requests_file(out: Path, cfg: str, workload: str, rate: float) -> Path:
    """Where a run's per-request results go (read back by plots, two_gpu_plan.py, slo_sweep.py)."""
    return out / f"{cfg}_{workload}@{rate}.requests.json"


_REQUESTS_FILE = re.compile(r"^(?P<config>[^_]+)_(?P<workload>[a-z]+)@(?P<rate>[0-9.]+)\.requests\.json$")


def load_runs(out: Path) -> dict[tuple[str, str, float], list[RequestResult]]:
    """Every saved run of a compare folder: (config, workload, rate) -> its per-request results."""
    runs = {}
    for path in sorted(out.iterdir()):
        if m := _REQUESTS_FILE.match(path.name):
            results = [RequestResult(**r) for r in json.loads(path.read_text())]
            runs[(m["config"], m["workload"], float(m["rate"]))] = results
    return runs


def plots(out: Path) -> None:
    """Attainment against rate and latency CDFs from a finished run's files (no GPU needed)."""
    report = json.loads((out / "report.json").read_text())
    for workload in WORKLOADS:
        curves: dict[str, list[tuple[float, float]]] = {}
        for key, run_ in report["runs"].items():
            cfg, _, rest = key.partition("/")
            wl, _, rate = rest.partition("@")
            if wl == workload and "slo_attainment" in run_:
                curves.setdefault(cfg, []).append((float(rate), run_["slo_attainment"]))
        if len(curves) < 2:
            continue
        plot_attainment(curves, out / f"attainment_{workload}.png")
        rates = sorted({r for c in curves.values() for r, _ in c})
        for rate in rates:
            runs = {
                cfg: [RequestResult(**r) for r in json.loads(path.read_text())]
                for cfg in curves
                if (path := requests_file(out, cfg, workload, rate)).is_file()
            }
            if len(runs) > 1:
                plot_cdfs(runs, out / f"cdf_{workload}@{rate}.png")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="experiment", required=True)
    sub.add_parser("plots").add_argument("--out", type=Path, required=True)
    for name in ("exposed", "compare"):
        p = sub.add_parser(name)
        p.add_argument("--model", default=MODEL)
        p.add_argument("--gpus", default="0")
        p.add_argument("--out", type=Path, required=True)
    e = sub.choices["exposed"]
    e.add_argument("--prompt-len", type=int, default=4096)
    e.add_argument("--repeats", type=int, default=5)
    e.add_argument("--layers-per-chunk", type=int, default=1)
    e.add_argument("--transport", default="auto", help="KV transport (auto: cuda_ipc on GPUs)")
    e.add_argument("--copy-gbps", type=float, default=0.0, help="measured cuda_ipc copy bandwidth, GB/s")
    c = sub.choices["compare"]
    c.add_argument("--rates", type=float, nargs="+", default=[4.0, 8.0, 12.0, 16.0])
    c.add_argument(
        "--duration-s",
        type=float,
        default=30.0,
        help="arrivals per rate (requests = rate x this); a few request lifetimes, or the run measures a burst",
    )
    c.add_argument("--workloads", nargs="+", default=["bimodal", "short"], choices=list(WORKLOADS))
    c.add_argument("--workers", type=int, default=0, help="workers per deployment (default: one per GPU)")
    c.add_argument(
        "--prefill-workers",
        type=int,
        default=0,
        help="prefill workers of the xPyD deployments (default: half)",
    )
    c.add_argument("--threshold", type=int, default=512, help="remote prefill from this many tokens (1PxD)")
    c.add_argument("--slo-ttft-ms", type=float, default=1000.0)
    c.add_argument("--slo-tpot-ms", type=float, default=50.0)
    c.add_argument("--timeout-s", type=float, default=120.0)
    c.add_argument("--client-procs", type=int, default=4, help="load-generator processes")
    c.add_argument("--configs", nargs="+", help="deployments to run by name (default: xPyD and co-located)")
    args = ap.parse_args()
    if args.experiment == "plots":
        plots(args.out)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    report = exposed(args) if args.experiment == "exposed" else compare(args)
    (args.out / "report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k not in ("runs",)}, indent=2, default=str))


if __name__ == "__main__":
    main()
