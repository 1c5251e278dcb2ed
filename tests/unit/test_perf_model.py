from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from pdserve.bench.client import RequestResult
from pdserve.planner.fidelity import calibrate_serving, compare, engine_by_path, format_rows, load_runs
from pdserve.planner.perf_fit import (
    DecodeStep,
    MixedStep,
    PrefillStep,
    fit_nonnegative,
    fit_steps,
    steps_from_raw,
)
from pdserve.planner.perf_model import FABRICS_GBPS, PerfModel, attention_pairs
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


def test_calibration_recovers_serving_costs_hidden_from_the_profile() -> None:
    served = replace(PERF, serving_step_s=0.01, serving_seq_s=0.002)
    reqs = [SimRequest(i, i * 0.05, 64, 40 + 7 * i) for i in range(12)]
    measured = simulate(served, Deployment(colocated=1), reqs)
    step, seq = calibrate_serving(measured, PERF)
    assert step == pytest.approx(0.01, abs=1e-6)
    assert seq == pytest.approx(0.002, abs=1e-6)


def test_calibration_counts_each_engines_batch_in_a_split_run() -> None:
    """A 1P1D run whose short requests went half to the decode worker and half, whole, to the
    prefill worker: two engines streaming at once, each with its own batch."""
    served = replace(PERF, serving_step_s=0.01, serving_seq_s=0.002)
    decode = simulate(
        served, Deployment(colocated=1), [SimRequest(i, i * 0.05, 64, 40 + 7 * i) for i in range(12)]
    )
    whole = simulate(
        served,
        Deployment(colocated=1),
        [SimRequest(100 + i, 0.02 + i * 0.05, 64, 45 + 5 * i) for i in range(12)],
    )
    for r in decode:
        r.phases = {"prefill_path": "local"}
    for r in whole:
        r.phases = {"prefill_path": "whole"}
    step, seq = calibrate_serving(decode + whole, PERF, engine_by_path)
    assert step == pytest.approx(0.01, abs=1e-6)
    assert seq == pytest.approx(0.002, abs=1e-6)
    # Counted as one engine, every batch is the sum of both: the per-token cost comes out wrong.
    _, seq_as_one = calibrate_serving(decode + whole, PERF)
    assert seq_as_one != pytest.approx(0.002, abs=1e-4)


def test_old_perf_files_load_with_the_new_terms_off(tmp_path: Path) -> None:
    newer = (
        "decode_pad_s", "decode_batch_s", "decode_gather_s", "serving_step_s", "mixed_decode_s", "prefill_overhead_s",
        "serving_prompt_s", "serving_latency_s", "wake_s", "wake_tau_s",
    )  # fmt: skip
    old = {k: v for k, v in PERF.to_dict().items() if k not in newer}
    path = tmp_path / "old.json"
    path.write_text(json.dumps(old))
    perf = PerfModel.load(path)
    assert (
        perf.decode_batch_s == perf.decode_gather_s == () and perf.decode_pad_s == perf.serving_step_s == 0.0
    )
    assert perf.mixed_decode_s is None and perf.prefill_overhead_s == perf.serving_prompt_s == 0.0
    assert perf.serving_latency_s == perf.wake_s == 0.0 and perf.wake_cost_s(100.0) == 0.0
    # A plain linear model, as before those terms existed.
    assert perf.decode_step_s(8, 8 * 300, 1000) == pytest.approx(0.02 + 8 * 0.003 + 2400 * 1e-5)


def test_decode_step_follows_the_measured_batch_table() -> None:
    perf = replace(PERF, decode_batch_s=((1, 0.001), (4, 0.040)))
    assert perf.decode_batch_cost_s(4) == pytest.approx(0.040)
    assert perf.decode_batch_cost_s(2) == pytest.approx(0.001 + 0.039 / 3)  # between measured sizes
    assert perf.decode_batch_cost_s(6) == pytest.approx(0.040 + 2 * PERF.decode_seq_s)  # past them
    assert perf.decode_step_s(4, 0) == pytest.approx(PERF.overhead_s + 0.040)
    # In a mixed step the decodes ride along in the prompt's matrix products: no table.
    assert perf.step_s(4, 0, [(16, 0)]) == pytest.approx(PERF.step_s(4, 0, [(16, 0)]))
    # JSON gives the table back as lists.
    assert PerfModel.from_dict(json.loads(json.dumps(perf.to_dict()))) == perf
    with pytest.raises(ValueError, match="ascending"):
        replace(PERF, decode_batch_s=((4, 0.04), (2, 0.01)))


def test_padding_to_the_longest_context_is_paid_in_decode_only_steps() -> None:
    perf = replace(PERF, decode_pad_s=5e-6)
    # One 1,000-token sequence and three of 100: 4 * 1,000 positions read, 1,300 of them real.
    assert perf.decode_step_s(4, 1300, 1000) - perf.decode_step_s(4, 1300) == pytest.approx(2700 * 5e-6)
    assert perf.step_s(4, 1300, [(16, 0)], decode_max_ctx=1000) == pytest.approx(
        perf.step_s(4, 1300, [(16, 0)])
    )


def test_fit_recovers_the_batch_table_gather_curve_and_prompt_terms_from_steps() -> None:
    # A gather cost that bends up past 4k positions (the caches), at the knots the fit uses.
    gather = ((1024, 0.004), (2048, 0.008), (4096, 0.016), (8192, 0.060), (8320, 0.062))
    truth = replace(
        PERF, decode_batch_s=((1, 0.0), (2, 0.004), (4, 0.030), (8, 0.050)), decode_gather_s=gather,
        prefill_overhead_s=0.015, mixed_decode_s=0.006,
    )  # fmt: skip
    prefill = [PrefillStep(n, c, truth.prefill_s(n, c)) for n, c in ((64, 0), (256, 0), (512, 0), (512, 512))]
    decode = []
    for b in (1, 2, 4, 8):
        for c in (128, 512):
            decode.append(DecodeStep(b, b * c, c, truth.decode_step_s(b, b * c)))
        if b > 1:  # one long sequence among short ones: padded to it
            ctx = 1040 + (b - 1) * 128
            decode.append(DecodeStep(b, ctx, 1040, truth.decode_step_s(b, ctx, 1040)))
    mixed = [
        MixedStep(b, b * c, 128, 0, truth.step_s(b, b * c, [(128, 0)]))
        for b in (1, 2, 4, 8)
        for c in (130, 520)
    ]
    got = fit_steps(prefill, decode, mixed)
    for name in (
        "overhead_s",
        "prefill_overhead_s",
        "prefill_token_s",
        "attn_pair_s",
        "decode_ctx_s",
        "mixed_decode_s",
    ):
        assert got[name] == pytest.approx(getattr(truth, name), rel=1e-6), name
    assert [b for b, _ in got["decode_batch_s"]] == [1, 2, 4, 8]
    assert [s for _, s in got["decode_batch_s"]] == pytest.approx(
        [0.0, 0.004, 0.030, 0.050], rel=1e-6, abs=1e-9
    )
    assert [p for p, _ in got["decode_gather_s"]] == [1024, 2048, 4096, 8192, 8320]  # up to 8 x 1,040
    assert [s for _, s in got["decode_gather_s"]] == pytest.approx([s for _, s in gather], rel=1e-6)
    # Without mixed steps their decodes stay unmeasured (decode_seq_s stands in for them).
    assert fit_steps(prefill, decode)["mixed_decode_s"] is None
    # The biggest chunk timed in one step: what the fit knows first-hand.
    assert got["max_prefill_chunk"] == 512
    # A profile's raw file gives the same steps back.
    raw = {
        "prefill": [[s.tokens, s.cached, s.seconds] for s in prefill],
        "decode": [[s.batch, s.ctx_tokens, s.max_ctx, s.seconds] for s in decode],
        "mixed": [[s.batch, s.ctx_tokens, s.tokens, s.cached, s.seconds] for s in mixed],
    }
    assert steps_from_raw(json.loads(json.dumps(raw))) == (prefill, decode, mixed)


def test_a_backend_that_skips_padding_gets_linear_context_terms() -> None:
    """Split-K decode over each sequence's own length: cost follows the real context, not the
    batch times the longest one. The gather curve cannot express that; the linear terms can."""
    truth = replace(
        PERF, decode_batch_s=((1, 0.0), (16, 0.002), (64, 0.004), (128, 0.009)), decode_ctx_s=4e-8
    )
    prefill = [PrefillStep(n, 0, truth.prefill_s(n, 0)) for n in (64, 256, 1024)]
    decode = []
    for b in (1, 16, 64, 128):
        for c in (160, 650):
            decode.append(DecodeStep(b, b * c, c, truth.decode_step_s(b, b * c)))
        if b > 1:  # one long sequence among short ones: nothing paid for the padding
            ctx = 1950 + (b - 1) * 150
            decode.append(DecodeStep(b, ctx, 1950, truth.decode_step_s(b, ctx)))
    got = fit_steps(prefill, decode)
    assert got["decode_gather_s"] == ()
    assert got["decode_ctx_s"] == pytest.approx(4e-8, rel=1e-4)
    assert got["decode_pad_s"] == pytest.approx(0.0, abs=1e-12)
    fitted = replace(PERF, **got)
    # Far past the timed contexts, a longer context still costs more.
    assert fitted.decode_step_s(100, 200_000, 6000) > fitted.decode_step_s(100, 100_000, 6000)


def test_the_gather_curve_never_falls() -> None:
    """Steps whose cost dips at larger gathers (noise, or a backend the curve does not describe)
    give a flat stretch, not a curve that is cheaper past its last knot."""
    decode = [DecodeStep(8, 8 * c, c, 0.02 + (0.004 if c < 600 else 0.002)) for c in (100, 300, 700, 1000)]
    decode += [DecodeStep(8, 1000 + 7 * 100, 1000, 0.021), DecodeStep(1, 128, 128, 0.02)]
    values = [v for _, v in fit_steps([], decode)["decode_gather_s"]]
    assert values == sorted(values)


def test_a_decode_step_pays_its_gathers_by_the_curve_and_past_it_by_the_last_slope() -> None:
    perf = replace(PERF, decode_gather_s=((1000, 0.01), (4000, 0.07)))
    assert perf.decode_gather_cost_s(500) == pytest.approx(0.005)
    assert perf.decode_gather_cost_s(2500) == pytest.approx(0.04)
    assert perf.decode_gather_cost_s(7000) == pytest.approx(0.13)  # 0.02 ms per position past 4k
    # Padding counts: 4 sequences gathered to the longest, 1,000 tokens: 4,000 positions.
    assert perf.decode_step_s(4, 1300, 1000) == pytest.approx(PERF.overhead_s + 4 * PERF.decode_seq_s + 0.07)
    # Mixed steps keep the per-sequence context term.
    assert perf.step_s(4, 1300, [(16, 0)]) == pytest.approx(PERF.step_s(4, 1300, [(16, 0)]))


def test_a_prompt_step_pays_its_own_overhead_and_its_decodes_the_mixed_cost() -> None:
    perf = replace(PERF, prefill_overhead_s=0.05, mixed_decode_s=0.02)
    assert perf.prefill_s(100) == pytest.approx(PERF.prefill_s(100) + 0.05)
    assert perf.decode_step_s(4, 400) == pytest.approx(PERF.decode_step_s(4, 400))  # decode-only: no
    mixed = perf.step_s(4, 400, [(100, 0)])
    assert mixed - perf.prefill_s(100) == pytest.approx(4 * 0.02 + 400 * PERF.decode_ctx_s)
    # Files from before the term: a mixed step's decodes cost decode_seq_s, as they did.
    assert PERF.mixed_decode_s is None
    assert PERF.step_s(4, 400, [(100, 0)]) - PERF.prefill_s(100) == pytest.approx(
        4 * PERF.decode_seq_s + 400 * PERF.decode_ctx_s
    )


def test_a_budget_past_the_profiled_chunks_is_flagged() -> None:
    """Steps bigger than any timed chunk are extrapolated: the model says so, naming the fix."""
    timed = replace(PERF, max_prefill_chunk=512)
    warning = timed.chunk_coverage_warning(2048)
    assert (
        warning is not None and "at most 512 tokens" in warning and "--max-num-batched-tokens 2048" in warning
    )
    assert timed.chunk_coverage_warning(512) is None
    assert replace(PERF, max_prefill_chunk=0).chunk_coverage_warning(2048) is None  # unknown: silent
    # Old files without the field load as unknown.
    d = timed.to_dict()
    del d["max_prefill_chunk"]
    assert PerfModel.from_dict(d).max_prefill_chunk == 0


def gpu_like_steps(truth: PerfModel) -> tuple[list[PrefillStep], list[DecodeStep]]:
    prefill = [
        PrefillStep(n, c, truth.prefill_s(n, c))
        for n, c in ((64, 0), (256, 0), (512, 0), (2048, 0), (2048, 2048))
    ]
    decode = [DecodeStep(b, b * 128, 128, truth.decode_step_s(b, b * 128)) for b in (1, 4, 16)]
    return prefill, decode


def test_a_floor_under_the_prompt_part_is_found_and_prices_big_chunks() -> None:
    """Small chunks cost what reading the weights costs, big ones what they compute (an H100
    profile: 64-512 tokens ~14 ms, 2,048 tokens ~52 ms). The fit finds the floor and the slope
    past it; one line through all of them would put 2,048 tokens ~20% low."""
    truth = replace(PERF, overhead_s=0.006, prefill_token_s=2e-5, attn_pair_s=2e-9, prefill_floor_s=0.011)
    prefill, decode = gpu_like_steps(truth)
    assert truth.prefill_s(64) == truth.prefill_s(512) == pytest.approx(0.017)  # all on the floor
    got = replace(PERF, **fit_steps(prefill, decode))
    assert got.prefill_floor_s == pytest.approx(0.011, rel=0.1)
    for n, c in ((64, 0), (512, 0), (2048, 0), (2048, 2048), (4096, 0)):
        assert got.prefill_s(n, c) == pytest.approx(truth.prefill_s(n, c), rel=0.05), (n, c)
    # Without a floor in the steps (a CPU's) the line is kept exactly.
    line = replace(truth, prefill_floor_s=0.0)
    flat = fit_steps(*gpu_like_steps(line))
    assert flat["prefill_floor_s"] == 0.0
    assert flat["prefill_token_s"] == pytest.approx(2e-5, rel=1e-6)


def test_a_loaded_run_takes_its_hop_latency_from_the_routers_phase_marks() -> None:
    """No request of a run under load finds the deployment idle; the hops in and out of the serving
    worker come from the phase marks instead: receipt at the worker, plus first output to client."""
    from pdserve.planner.calibrate import calibrate_wake, hop_latencies

    def req(i: int, received: float, output: float, ttft: float, path: str = "local") -> RequestResult:
        phases: dict[str, float | str] = {"prefill_path": path, "worker.received": received}
        phases["worker.output_received"] = output
        return RequestResult(
            i,
            100,
            8,
            start=0.01 * i,
            ttft_s=ttft,
            chunk_times=[ttft, 2.0],
            e2e_s=2.0,
            output_tokens=8,
            phases=phases,
        )

    results = [req(i, 0.010 + 0.001 * i, 0.080, 0.100) for i in range(5)]  # all overlap: none idle
    results.append(req(5, 0.5, 0.6, 0.9, path="remote"))  # a remote prefill's hops are not these
    assert hop_latencies(results) == pytest.approx([0.030, 0.031, 0.032, 0.033, 0.034])
    perf = PerfModel(
        name="t", source="measured", kv_bytes_per_token=1, num_layers=1, overhead_s=0.01,
        prefill_token_s=1e-4, attn_pair_s=0.0, decode_seq_s=1e-3, decode_ctx_s=0.0,
    )  # fmt: skip
    model = calibrate_wake(results, perf, Deployment(colocated=1))
    assert model.serving_latency_s == pytest.approx(0.032) and model.wake_s == 0.0
