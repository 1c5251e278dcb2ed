"""Simulator fidelity against the CPU disaggregation benchmark (benchmarks/bimodal_cpu.py): replays
each measured run's requests (same send times, same lengths) through pdserve's simulator and prints
predicted vs measured p50/p99 TTFT and ITL with the error (target: within 20%).

    .venv/bin/pdserve profile --model smollm2 --cpus 0 --threads 1 --clock cpu --json perf-1core.json
    .venv/bin/pdserve profile --model smollm2 --cpus 0-1 --threads 2 --json perf-2core.json
    .venv/bin/python benchmarks/sim_fidelity.py --measured results/bimodal results/bimodal_low \\
        --perf perf-1core.json --perf-colocated perf-2core.json \\
        --calibrate colocated@0.15 --calibrate 1P1D@0.15 --phases

The serving costs outside the engine (per step and per streamed token, per prompt step, a
request's latency and the wake-up after the deployment idled; pdserve/planner/calibrate.py) are
fitted per deployment on the `--calibrate` runs, so the other runs are out of sample.

The deployments mirror bimodal_cpu.py: `colocated` is one worker on two cores (chunked prefill,
default scheduler: 512-token budget, 64 sequences); `1P1D` is one prefill and one decode worker on
a core each, the decode worker applying the benchmark's policy (remote from 32 uncached tokens, 4 queued
jobs per prefill worker, at most 256 tokens prefilled locally when the queue is full, 4 GB/s and
1,500 tokens/s starting estimates) and KV moving over shm at the
bandwidth `pdserve profile` measured. Both have the workers' KV capacity (the default 1 GiB CPU
cache: 1,456 blocks of 16 tokens for SmolLM2, so requests are preempted past it) and 1P1D the
decode worker's remote-prefill deadline (30 s, + 1 s for shm, after which it prefills locally).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from pdserve.config import CacheConfig, SchedulerConfig, WorkerConfig
from pdserve.planner.calibrate import calibrate
from pdserve.planner.fidelity import compare, format_rows, load_runs, phase_medians, replay
from pdserve.planner.perf_model import PerfModel
from pdserve.planner.simulator import Deployment, simulate
from pdserve.workers.decode import _IN_PLACE, _SHM_GRACE_S
from pdserve.workers.disagg_policy import DisaggPolicy


def deployments(perf: PerfModel, transport: str, threshold: int, max_local: int) -> dict[str, Deployment]:
    sched, worker, cache = SchedulerConfig(), WorkerConfig(), CacheConfig()
    budget, seqs = sched.max_num_batched_tokens, sched.max_num_seqs
    # What a CPU worker's engine allocates: its cache budget in whole blocks (engine/runner.py).
    blocks = int(cache.kv_cache_memory_gb * 2**30 // (perf.kv_bytes_per_token * cache.block_size))
    kv = {"kv_blocks": blocks, "block_size": cache.block_size}
    policy = DisaggPolicy(
        threshold_tokens=threshold,
        max_queue_per_prefill_worker=worker.max_queue_per_prefill_worker,
        link_bytes_per_s=worker.link_gbps * 1e9,
        kv_bytes_per_token=perf.kv_bytes_per_token,
        max_local_prefill_tokens=max_local,
    )
    return {
        "colocated": Deployment(colocated=1, max_num_batched_tokens=budget, max_num_seqs=seqs, **kv),
        "1P1D": Deployment(
            prefill=1,
            decode=1,
            fabric=transport,
            policy=policy,
            local_prefill_tokens_per_s=worker.prefill_tokens_per_s,
            max_num_batched_tokens=budget,
            max_num_seqs=seqs,
            kv_timeout_s=worker.kv_timeout_s,
            kv_grace_s=_SHM_GRACE_S if transport in _IN_PLACE else 0.0,
            **kv,
        ),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--measured", type=Path, required=True, nargs="+", help="directories of {config}@{rate}.requests.json"
    )
    ap.add_argument("--perf", type=Path, required=True, help="perf model of one worker core (1P1D workers)")
    ap.add_argument("--perf-colocated", type=Path, default=None, help="perf model of the co-located worker")
    ap.add_argument("--transport", default="shm", help="link of the 1P1D run (a measured one in --perf)")
    ap.add_argument(
        "--calibrate",
        action="append",
        default=[],
        metavar="RUN",
        help="fit the serving cost (per step and per streamed token, outside the engine) of RUN's "
        "deployment on RUN's decode-only gaps, e.g. colocated@0.15; once per deployment",
    )
    ap.add_argument("--phases", action="store_true", help="also compare the remote prefills' phase medians")
    # bimodal_cpu.py's 1P1D flags
    ap.add_argument("--remote-prefill-threshold", type=int, default=32)
    ap.add_argument("--max-local-prefill-tokens", type=int, default=256)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    perfs = {"1P1D": PerfModel.load(args.perf)}
    perfs["colocated"] = PerfModel.load(args.perf_colocated) if args.perf_colocated else perfs["1P1D"]
    runs = {key: res for d in args.measured for key, res in load_runs(d).items()}
    deps = deployments(
        perfs["1P1D"], args.transport, args.remote_prefill_threshold, args.max_local_prefill_tokens
    )
    for run in args.calibrate:
        config, _, rate = run.partition("@")
        perfs[config] = p = calibrate(runs[(config, float(rate))], perfs[config], deps[config])
        print(
            f"calibrated on {run}: serving {p.serving_step_s * 1e3:.1f} ms per step + "
            f"{p.serving_seq_s * 1e3:.1f} ms per token + {p.serving_prompt_s * 1e3:.1f} ms per prompt step, "
            f"{p.serving_latency_s * 1e3:.1f} ms latency per request, wake-up after idling "
            f"{p.wake_s * 1e3:.0f} ms x (1 - exp(-idle / {p.wake_tau_s:.1f} s))"
        )
    rows = []
    for (config, rate), results in sorted(runs.items()):
        if config not in deps:
            print(f"skipping {config}@{rate}: no simulated counterpart")
            continue
        rows += compare(results, perfs[config], deps[config], config, rate)
        if args.phases and config == "1P1D":
            predicted = simulate(perfs[config], deps[config], replay(results))
            m, p = phase_medians(results), phase_medians(predicted)
            print(f"{config}@{rate} remote-prefill phase medians (measured / predicted s): "
                  + ", ".join(f"{k} {m[k]:.3f} / {p.get(k, math.nan):.3f}" for k in m))  # fmt: skip
    if not rows:
        raise SystemExit(f"no {{colocated,1P1D}}@RATE.requests.json in {args.measured}")
    print(format_rows(rows))
    within = sum(abs(r.error) <= 0.2 for r in rows)
    print(f"\n{within}/{len(rows)} predictions within 20%")
    if args.json is not None:
        args.json.write_text(json.dumps([r.__dict__ | {"error": r.error} for r in rows], indent=1))


if __name__ == "__main__":
    main()
