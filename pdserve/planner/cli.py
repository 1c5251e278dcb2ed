"""`pdserve plan` and `pdserve profile`.

    pdserve profile --model smollm2 --threads 1 --json perf.json
    pdserve plan --perf perf.json --workload bimodal --long-share 0.2 --slo-ttft-ms 1000 \\
        --slo-tpot-ms 50 --gpus 4 --fabric nvlink --json plan.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from pdserve.bench.cli import add_workload_args, build_specs, sampler_from_args
from pdserve.bench.report import SLO
from pdserve.planner.perf_model import FABRICS_GBPS, PerfModel
from pdserve.planner.planner import TIE_MARGIN, Plan, PlanWorkload, plan
from pdserve.planner.simulator import Deployment
from pdserve.workers.disagg_policy import DisaggPolicy


def add_plan_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "plan",
        help="should I disaggregate, and with what xPyD? (simulated from a perf model)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--perf", type=Path, required=True, help="perf model JSON (pdserve profile, or modelled)")
    p.add_argument("--slo-ttft-ms", type=float, required=True)
    p.add_argument("--slo-tpot-ms", type=float, required=True)
    p.add_argument("--gpus", type=int, required=True, help="workers to spend (one engine per GPU)")
    p.add_argument(
        "--fabric", default="nvlink", help=f"KV link: {' | '.join(FABRICS_GBPS)} or a measured one"
    )
    p.add_argument("--num-requests", type=int, default=200, help="distinct requests in the simulated trace")
    p.add_argument(
        "--max-num-batched-tokens", type=int, default=None,
        help="token budget of the planned deployments (default: the one the profile was timed with)",
    )  # fmt: skip
    p.add_argument("--max-num-seqs", type=int, default=128)
    p.add_argument(
        "--prefill-chunk-cap", type=int, default=0,
        help="plan deployments whose engines cap one request's prompt chunk while others wait",
    )  # fmt: skip
    p.add_argument("--remote-prefill-threshold", type=int, default=256)
    p.add_argument("--max-queue-per-prefill-worker", type=int, default=4)
    p.add_argument(
        "--conditional", action=argparse.BooleanOptionalAction, default=True,
        help="also consider conditional disaggregation (decode workers decide per request)",
    )  # fmt: skip
    p.add_argument(
        "--tie-margin", type=float, default=TIE_MARGIN,
        help="co-located wins unless a split serves this share more per GPU (default: %(default)s)",
    )  # fmt: skip
    p.add_argument("--served-model", default="MODEL", help="--model in the printed serve command")
    p.add_argument("--json", type=Path, default=None)
    add_workload_args(p)
    p.set_defaults(handler=lambda args: run_plan(p, args))


def workload_from_args(args: argparse.Namespace) -> PlanWorkload:
    sampler = sampler_from_args(args)
    if sampler is None:
        return PlanWorkload.from_specs(build_specs(args, None, args.num_requests, 32000))
    return PlanWorkload.from_sampler(sampler, args.num_requests, args.seed, args.burstiness)


def plan_to_dict(result: Plan) -> dict[str, Any]:
    def cand(c: Any) -> dict[str, Any]:
        return {
            "deployment": c.deployment.label,
            "gpus": c.deployment.gpus,
            "goodput_req_s": c.goodput_req_s,
            "goodput_per_gpu": c.goodput_per_gpu,
            "p99_ttft_s": c.p99_ttft_s,
            "p99_tpot_s": c.p99_tpot_s,
            "remote_share": c.remote_share,
        }

    return {
        "disaggregate": result.disaggregate,
        "best": cand(result.best),
        "reasons": result.reasons,
        "command": result.command,
        "warnings": result.warnings,
        "candidates": [cand(c) for c in result.candidates],
    }


def run_plan(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    try:
        perf = PerfModel.load(args.perf)
        link = perf.link_bytes_per_s(args.fabric)
        wl = workload_from_args(args)
        # As `pdserve serve` runs it: remote prefills queued by the router as it routes (early prefill).
        budget = args.max_num_batched_tokens or perf.max_prefill_chunk or 2048
        base = Deployment(
            colocated=1, max_num_batched_tokens=budget, max_num_seqs=args.max_num_seqs, early_prefill=True,
            prefill_chunk_cap=args.prefill_chunk_cap,
        )  # fmt: skip
    except (ValueError, OSError) as exc:
        parser.error(str(exc))
    policy = (
        DisaggPolicy(
            args.remote_prefill_threshold, args.max_queue_per_prefill_worker, link, perf.kv_bytes_per_token
        )
        if args.conditional
        else None
    )
    slo = SLO(args.slo_ttft_ms / 1e3, args.slo_tpot_ms / 1e3)
    result = plan(
        perf, wl, slo, args.gpus, args.fabric, base=base, policy=policy, model=args.served_model,
        tie_margin=args.tie_margin,
    )  # fmt: skip
    print(f"perf model: {perf.name} ({perf.source})")
    print(
        f"{'deployment':<22}{'goodput req/s':>14}{'per GPU':>10}{'p99 TTFT s':>12}{'p99 TPOT ms':>13}{'remote':>8}"
    )
    for c in result.candidates:
        print(
            f"{c.deployment.label:<22}{c.goodput_req_s:>14.3g}{c.goodput_per_gpu:>10.3g}"
            f"{c.p99_ttft_s:>12.3f}{c.p99_tpot_s * 1e3:>13.1f}{c.remote_share:>8.0%}"
        )
    print(f"\ndisaggregate: {'yes' if result.disaggregate else 'no'} -> {result.best.deployment.label}")
    for r in result.reasons:
        print(f"  - {r}")
    print(f"\n{result.command}")
    for w in result.warnings:
        print(f"warning: {w}", file=sys.stderr)
    if args.json is not None:
        out = plan_to_dict(result) | {"perf": perf.name, "fabric": args.fabric, "gpus": args.gpus}
        args.json.write_text(json.dumps(out, indent=2, default=str))
    return 0


def add_profile_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "profile",
        help="measure this engine's cost model on this machine (perf model JSON for pdserve plan)",
    )
    p.add_argument("--model", default="smollm2")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", type=Path, required=True)
    p.add_argument(
        "--refit", type=Path, default=None, metavar="PERF",
        help="time nothing: fit PERF's engine terms again from its PERF.raw.json timings",
    )  # fmt: skip
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--cpus", default=None, help="pin to these CPUs first, e.g. '0' or '0-1'")
    # Unset: by device (profile.py, PROFILE_DEFAULTS): on a GPU, the steps `pdserve serve` runs there.
    p.add_argument("--prefill-tokens", default=None, help="prompt lengths to time (CPU: 64,256,512,2048)")
    p.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=None,
        help="token budget (prompt chunk size; CPU: 512, GPU: 2048)",
    )
    p.add_argument(
        "--decode-batches", default=None,
        help="decode batch sizes to time (the step is interpolated between them; CPU: 1-6,8,12,16,24,32, "
        "GPU: 1,16,64,128)",
    )  # fmt: skip
    p.add_argument(
        "--decode-contexts",
        default=None,
        help="context per sequence for decode steps (CPU: 128,512; GPU: 512,2048)",
    )
    p.add_argument(
        "--max-decode-tokens", type=int, default=None,
        help="largest batch x context timed per decode context (each is prefilled first; "
        "default: 8192 on a CPU, 262144 on a GPU)",
    )  # fmt: skip
    p.add_argument(
        "--mixed-context", type=int, default=1920,
        help="one sequence this long among short ones, to time attention's padding (0: skip)",
    )  # fmt: skip
    p.add_argument(
        "--chunk-batches", default=None,
        help="running decodes timed next to a new prompt chunk (mixed steps; empty: skip; CPU: 1,2,4,8; "
        "GPU: 1,16,64,128)",
    )  # fmt: skip
    p.add_argument(
        "--chunk-tokens", type=int, default=None,
        help="the new prompt of a timed mixed step (CPU: 128; GPU: the budget less the largest chunk batch)",
    )  # fmt: skip
    p.add_argument("--transports", default="local,shm,tcp", help="KV transports to time")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--clock", choices=("wall", "cpu"), default="wall",
        help="cpu: time steps by the engine thread's CPU time, unaffected by other processes on "
        "the core (one thread on a CPU only)",
    )  # fmt: skip
    p.set_defaults(handler=lambda args: run_profile(args))


def run_profile(args: argparse.Namespace) -> int:
    from pdserve.planner.profile import ProfileSpec, profile

    if args.refit is not None:
        return _refit(args.refit, args.json)
    from pdserve.config import ModelConfig
    from pdserve.planner.profile import profile_defaults

    chosen = {
        "prefill_tokens": args.prefill_tokens, "decode_batches": args.decode_batches,
        "decode_contexts": args.decode_contexts, "chunk_batches": args.chunk_batches,
        "chunk_tokens": args.chunk_tokens, "max_num_batched_tokens": args.max_num_batched_tokens,
    }  # fmt: skip
    device_type = ModelConfig(args.model, device=args.device).resolved_device().type
    steps = profile_defaults(device_type, {k: _parsed(v) for k, v in chosen.items() if v is not None})
    spec = ProfileSpec(
        model=args.model, dtype=args.dtype, device=args.device, threads=args.threads, cpus=args.cpus,
        max_decode_tokens=args.max_decode_tokens, mixed_long_context=args.mixed_context,
        transports=[x for x in args.transports.split(",") if x], repeats=args.repeats, clock=args.clock,
        **steps,
    )  # fmt: skip
    perf, raw = profile(spec)
    perf.save(args.json)
    args.json.with_suffix(".raw.json").write_text(json.dumps(raw, indent=1))
    print(json.dumps(perf.to_dict() | {"notes": "..."}, indent=2))
    return 0


def _parsed(value: str | int) -> list[int] | int:
    """A comma-separated flag as its list of ints (empty: none); an int flag as it is."""
    return value if isinstance(value, int) else [int(x) for x in value.split(",") if x]


def _refit(source: Path, out: Path) -> int:
    """A perf file whose engine terms are fitted again (with this version's fit) from the timings
    its profile saved; what the fit does not touch (links, serving costs) is kept."""
    import dataclasses

    from pdserve.planner.perf_fit import fit_steps, steps_from_raw
    from pdserve.planner.perf_model import PerfModel

    perf = PerfModel.load(source)
    raw = json.loads(source.with_suffix(".raw.json").read_text())
    refitted = dataclasses.replace(
        perf, **fit_steps(*steps_from_raw(raw)), notes=f"{perf.notes}; refitted from {source.name}'s timings"
    )
    refitted.save(out)
    print(json.dumps(refitted.to_dict(), indent=2))
    return 0
