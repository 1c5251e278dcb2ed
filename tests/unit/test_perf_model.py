from __future__ import annotations

import json
from pathlib import Path

import pytest

from pdserve.bench.client import RequestResult
from pdserve.planner.fidelity import compare, format_rows, load_runs
from pdserve.planner.perf_model import FABRICS_GBPS, PerfModel, attention_pairs
from pdserve.planner.profile import fit_nonnegative
from pdserve.planner.simulator import Deployment, SimRequest, simulate

PERF = PerfModel(
    name="toy", source="measured", kv_bytes_per_token=2048, num_layers=4, overhead_s=0.02,
    prefill_token_s=0.001, attn_pair_s=1e-7, decode_seq_s=0.003, decode_ctx_s=1e-5,
    links_gbps={"shm": 2.0},
)  # fmt: skip


def test_save_load_roundtrip_and_links(tmp_path: Path) -> None:
    path = tmp_path / "perf.json"
    PERF.save(path)
    assert PerfModel.load(path) == PERF
    assert PERF.link_bytes_per_s("shm") == 2e9
    assert PERF.link_bytes_per_s("nvlink") == FABRICS_GBPS["nvlink"] * 1e9
    with pytest.raises(ValueError, match="unknown fabric"):
        PERF.link_bytes_per_s("carrier-pigeon")
    with pytest.raises(ValueError):
        PerfModel("x", "guessed", 1, 1, 0, 0, 0, 0, 0)


def test_roofline_floor_for_memory_bound_steps() -> None:
    gpu = PerfModel("g", "modelled", 1, 1, 0.001, 1e-5, 0.0, 1e-5, 0.0, weights_read_s=0.005)
    assert gpu.decode_step_s(1, 0) == pytest.approx(0.006)  # weights dominate a small batch
    assert gpu.prefill_s(4000) == pytest.approx(0.041)  # compute dominates a long prompt


def test_fit_recovers_coefficients_from_noiseless_steps() -> None:
    rows, times = [], []
    for t in (32, 128, 512, 1024):
        rows.append([1.0, t, attention_pairs(t), 0.0, 0.0])
        times.append(PERF.prefill_s(t))
    for b in (1, 8, 32):
        for c in (128, 512):
            rows.append([1.0, 0.0, 0.0, b, b * c])
            times.append(PERF.decode_step_s(b, b * c))
    got = fit_nonnegative(rows, times)
    want = [PERF.overhead_s, PERF.prefill_token_s, PERF.attn_pair_s, PERF.decode_seq_s, PERF.decode_ctx_s]
    assert got == pytest.approx(want, rel=1e-6)


def test_fidelity_of_the_simulator_against_itself_is_exact(tmp_path: Path) -> None:
    reqs = [SimRequest(i, i * 0.7, 100 + 37 * i % 400, 20) for i in range(20)]
    dep = Deployment(colocated=1)
    measured = simulate(PERF, dep, reqs)
    (tmp_path / "colocated@1.4.requests.json").write_text(json.dumps([r.__dict__ for r in measured]))
    (tmp_path / "report.json").write_text("{}")
    runs = load_runs(tmp_path)
    assert list(runs) == [("colocated", 1.4)]
    rows = compare(runs[("colocated", 1.4)], PERF, dep, "colocated", 1.4)
    assert [r.metric for r in rows] == ["ttft_p50", "ttft_p99", "itl_p50", "itl_p99"]
    assert all(abs(r.error) < 1e-9 for r in rows)
    assert "colocated@1.4" in format_rows(rows)
    assert isinstance(runs[("colocated", 1.4)][0], RequestResult)


def test_calibration_recovers_a_serving_cost_hidden_from_the_profile() -> None:
    from pdserve.planner.fidelity import calibrate_serving_seq_s

    served = PerfModel(**{**PERF.to_dict(), "serving_seq_s": 0.01})
    reqs = [SimRequest(i, i * 0.05, 64, 40) for i in range(12)]
    measured = simulate(served, Deployment(colocated=1), reqs)
    assert calibrate_serving_seq_s(measured, PERF) == pytest.approx(0.01, rel=0.15)
