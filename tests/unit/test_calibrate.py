"""The serving terms calibrate.py fits are the ones a simulated "served" run was made with."""

from __future__ import annotations

import math
import random
from dataclasses import replace

import pytest

from pdserve.planner.calibrate import calibrate, calibrate_prompt, calibrate_wake, fit_wake, idle_requests
from pdserve.planner.perf_model import PerfModel
from pdserve.planner.simulator import Deployment, SimRequest, simulate

ENGINE = PerfModel(
    name="toy", source="measured", kv_bytes_per_token=2048, num_layers=4, overhead_s=0.02,
    prefill_token_s=0.001, attn_pair_s=1e-7, decode_seq_s=0.003, decode_ctx_s=1e-5,
    links_gbps={"shm": 2.0},
)  # fmt: skip


def _busy_run() -> list[SimRequest]:
    """Short prompts arriving while earlier ones decode, then a few after long idle gaps."""
    rng = random.Random(3)
    reqs, t = [], 0.0
    for i in range(40):
        t += rng.uniform(0.2, 0.6) if i % 8 else rng.choice([1.0, 3.0, 6.0, 12.0, 24.0])
        reqs.append(SimRequest(i, t, rng.randrange(40, 200), rng.randrange(20, 40)))
    return reqs


def test_every_serving_term_is_recovered_from_a_colocated_run() -> None:
    served = replace(
        ENGINE, serving_step_s=0.004, serving_seq_s=0.001, serving_prompt_s=0.03,
        serving_latency_s=0.012, wake_s=0.09, wake_tau_s=4.0,
    )  # fmt: skip
    dep = Deployment(colocated=1)
    measured = simulate(served, dep, _busy_run())
    got = calibrate(measured, ENGINE, dep)
    assert got.serving_step_s == pytest.approx(0.004, abs=1e-6)
    assert got.serving_seq_s == pytest.approx(0.001, abs=1e-6)
    assert got.serving_prompt_s == pytest.approx(0.03, abs=1e-6)
    assert got.serving_latency_s == pytest.approx(0.012, abs=2e-3)
    assert got.wake_s == pytest.approx(0.09, rel=0.05)
    assert got.wake_tau_s == 4.0


def test_a_remote_prefill_step_is_read_off_its_kv_seconds() -> None:
    served = replace(ENGINE, serving_prompt_s=0.05)
    dep = Deployment(prefill=1, decode=1, fabric="shm")
    measured = simulate(served, dep, _busy_run())
    # KV lands a layer's share of the transfer after the step: 100 tokens x 2 KB at 2 GB/s / 4 layers.
    assert calibrate_prompt(measured, ENGINE, dep.max_num_batched_tokens) == pytest.approx(0.05, abs=1e-4)


def test_only_requests_that_found_the_deployment_idle_fit_the_wake_up() -> None:
    dep = Deployment(colocated=1)
    reqs = [SimRequest(i, 10.0 * i + (0.1 if i % 2 else 0.0), 100, 5) for i in range(6)]
    reqs.append(SimRequest(6, 50.2, 100, 5))  # arrives while request 5 is prefilling
    measured = simulate(ENGINE, dep, reqs)
    lone = idle_requests(measured, dep.max_num_batched_tokens)
    assert [r.index for r, _ in lone] == [0, 1, 2, 3, 4]
    assert lone[1][1] == pytest.approx(10.1 - measured[0].e2e_s)  # since the previous one ended
    fitted = calibrate_wake(measured, ENGINE, dep)  # nothing to find: the run has no wake-up
    assert fitted.wake_s == pytest.approx(0.0, abs=1e-9) and fitted.serving_latency_s == pytest.approx(
        0.0, abs=1e-9
    )


def test_wake_fit_is_least_squares_with_nonnegative_terms() -> None:
    points = [(g, 0.01 + 0.2 * -math.expm1(-g / 2.0)) for g in (0.1, 0.5, 1, 2, 4, 8, 30)]
    assert fit_wake(points) == pytest.approx((0.01, 0.2, 2.0))
    # Residuals that shrink with idle time would need a negative wake-up: a constant instead.
    assert fit_wake([(1.0, 0.05), (10.0, 0.03)]) == pytest.approx((0.04, 0.0, 0.5))
    assert fit_wake([]) == (0.0, 0.0, 0.0)
