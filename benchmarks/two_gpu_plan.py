"""`pdserve plan`'s prediction beside the two-GPU measurement of benchmarks/gpu_serving.py compare.

The perf model is the engine profile measured on one GPU of the same kind (`pdserve profile
--decode-batches 1,16,64,128`, its raw step timings refitted with the current fit), plus the
serving terms (per step, per streamed token, per prompt, the wake-up of an idle deployment: what
`pdserve calibrate` fits) calibrated on ONE measured run, the lowest-rate short-only run of the
disaggregated deployment; where that run's requests were split between the decode worker and,
served whole, the prefill worker, each engine's batch counts its own streams. Every other run is
out of sample. For each measured run, the simulator replays the same requests (same send times and
lengths); the goodput the planner searches for is printed beside the measured one.

    python benchmarks/two_gpu_plan.py --measured results/two_gpu/final \\
        --perf results/two_gpu/perf-gpu.json --perf-raw results/two_gpu/perf-gpu.raw.json \\
        --calibrate 1P1D-whole_short@16.0 --out results/two_gpu/plan.json

The refit takes the profile's mixed steps (a prompt chunk beside running decodes) too, when it
timed them. The deployments run 2,048-token steps. A profile timed with smaller chunks prices those steps by
extrapolation (the script warns); `--prefill-step 4096:0.1083` adds a prompt step timed elsewhere
on the same kind of GPU (gpu_suite.py's 4,096-token prefill) before the refit.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

from gpu_serving import WORKLOADS, load_runs

from pdserve.bench.client import RequestResult
from pdserve.bench.report import SLO, goodput, summarize
from pdserve.planner.calibrate import calibrate
from pdserve.planner.fidelity import engine_by_path, replay
from pdserve.planner.perf_fit import PrefillStep, fit_steps, steps_from_raw
from pdserve.planner.perf_model import PerfModel
from pdserve.planner.planner import PlanWorkload, goodput_of, serve_command
from pdserve.planner.simulator import Deployment, simulate
from pdserve.router.whole_policy import WholePolicy
from pdserve.workers.disagg_policy import DisaggPolicy


def perf_model(perf: Path, raw: Path | None, extra_prefill: list[PrefillStep] | None = None) -> PerfModel:
    """The profile, refitted from its raw steps (plus `extra_prefill`, prompt steps timed elsewhere
    on the same kind of GPU) when they are given."""
    model = PerfModel.load(perf)
    if raw is not None:
        prefill, decode, mixed = steps_from_raw(json.loads(raw.read_text()))
        terms = fit_steps([*prefill, *(extra_prefill or [])], decode, mixed)
        model = dataclasses.replace(model, **terms)
    return model


def prefill_step(spec: str) -> PrefillStep:
    """`TOKENS:SECONDS`: one prompt of TOKENS computed in one step in SECONDS (e.g. gpu_suite.py's
    4,096-token prefill)."""
    tokens, seconds = spec.split(":")
    return PrefillStep(int(tokens), 0, float(seconds))


def deployments(perf: PerfModel, threshold: int) -> dict[str, Deployment]:
    """The two deployments gpu_serving.py compares, as the simulator sees them."""
    base = {"max_num_batched_tokens": 2048, "max_num_seqs": 256}
    policy = DisaggPolicy(
        threshold_tokens=threshold,
        max_queue_per_prefill_worker=4,
        link_bytes_per_s=100e9,
        kv_bytes_per_token=perf.kv_bytes_per_token,
        max_local_prefill_tokens=threshold,
    )
    # Early prefill: the router queues a long prompt's job as it routes it (the serving default).
    disagg = Deployment(prefill=1, decode=1, fabric="nvlink", policy=policy, early_prefill=True, **base)  # type: ignore[arg-type]
    return {
        "1P1D": disagg,
        # gpu_serving.py's 1P1D-whole: idle prefill worker serving short requests whole, up to 128.
        "1P1D-whole": dataclasses.replace(disagg, whole=WholePolicy(threshold, 128)),
        "2xcolocated": Deployment(colocated=2, **base),  # type: ignore[arg-type]
        # gpu_serving.py's 2xcolocated-cap512: one request's prompt at most 512 tokens a step.
        "2xcolocated-cap512": Deployment(colocated=2, prefill_chunk_cap=512, **base),  # type: ignore[arg-type]
        # gpu_serving.py's 1P1D-whole-jobs: whole requests also beside prefill jobs.
        "1P1D-whole-jobs": dataclasses.replace(disagg, whole=WholePolicy(threshold, 128, job_streams=32)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--measured", type=Path, required=True)
    ap.add_argument("--perf", type=Path, required=True)
    ap.add_argument("--perf-raw", type=Path, default=None)
    ap.add_argument(
        "--prefill-step", type=prefill_step, action="append", default=[],
        help="TOKENS:SECONDS, a prompt step timed elsewhere, added to the profile's before the refit",
    )  # fmt: skip
    ap.add_argument("--calibrate", default="1P1D_short@8.0", help="the one run the serving cost is fit on")
    ap.add_argument("--threshold", type=int, default=512)
    ap.add_argument("--slo-ttft-ms", type=float, default=1000.0)
    ap.add_argument("--slo-tpot-ms", type=float, default=50.0)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    slo = SLO(args.slo_ttft_ms / 1e3, args.slo_tpot_ms / 1e3)
    runs = load_runs(args.measured)
    cal = args.measured / f"{args.calibrate}.requests.json"
    engine = perf_model(args.perf, args.perf_raw, args.prefill_step)
    deps = deployments(engine, args.threshold)
    coverage = engine.chunk_coverage_warning(deps["1P1D"].max_num_batched_tokens)
    if coverage:
        print(f"warning: {coverage}")
    # Every serving term (per step, per streamed token, per prompt, wake-up) fitted on one run; a
    # 1PxD run's requests are split between the decode worker and, served whole, the prefill worker.
    calibrate_on = [RequestResult(**r) for r in json.loads(cal.read_text())]
    perf = calibrate(calibrate_on, engine, deps[args.calibrate.split("_")[0]], engine_by_path)
    perf_path = args.out.with_suffix(".perf.json")
    perf.save(perf_path)
    deps = deployments(perf, args.threshold)
    report: dict[str, Any] = {
        "perf": {k: v for k, v in dataclasses.asdict(perf).items() if k != "notes"},
        "calibrated_on": args.calibrate,
        "extra_prefill_steps": [dataclasses.astuple(p) for p in args.prefill_step],
        "warnings": [coverage] if coverage else [],
        "runs": {},
        "goodput": {},
    }
    print(f"{'run':<28}{'attain m/p':>12}{'TTFT p50 m/p':>16}{'TTFT p99 m/p':>16}{'ITL p99 m/p ms':>18}")
    curves: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for (config, workload, rate), measured in sorted(runs.items()):
        predicted = simulate(perf, deps[config], replay(measured))
        m, p = summarize(measured, slo), summarize(predicted, slo)
        row = {
            k: {"measured": m[key][q] if key else m[q], "predicted": p[key][q] if key else p[q]}
            for k, key, q in (
                ("attainment", None, "slo_attainment"),
                ("ttft_p50_s", "ttft_s", "p50"),
                ("ttft_p99_s", "ttft_s", "p99"),
                ("itl_p50_s", "itl_s", "p50"),
                ("itl_p99_s", "itl_s", "p99"),
            )
        }
        report["runs"][f"{config}/{workload}@{rate}"] = row
        curves.setdefault((config, workload), []).append((rate, p["slo_attainment"]))
        print(
            f"{config + '/' + workload + '@' + str(rate):<28}"
            f"{m['slo_attainment']:>6.2f}/{p['slo_attainment']:.2f}"
            f"{m['ttft_s']['p50']:>9.3f}/{p['ttft_s']['p50']:.3f}"
            f"{m['ttft_s']['p99']:>9.3f}/{p['ttft_s']['p99']:.3f}"
            f"{m['itl_s']['p99'] * 1e3:>10.1f}/{p['itl_s']['p99'] * 1e3:.1f}"
        )
    for (config, workload), curve in sorted(curves.items()):
        # The planner's own search (as `pdserve plan` runs it) on the workload's distribution.
        wl = PlanWorkload.from_sampler(WORKLOADS[workload], 400, seed=7)
        searched, _ = goodput_of(perf, deps[config], wl, slo)
        report["goodput"][f"{config}/{workload}"] = {
            "predicted_at_measured_rates": goodput(curve),
            "predicted_search": searched,
            "serve_command": serve_command(deps[config], "dummy:llama-3-8b", "cuda_ipc"),
        }
        print(f"goodput {config}/{workload}: replayed rates {goodput(curve)}, planner search {searched:.1f}")
    args.out.write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
