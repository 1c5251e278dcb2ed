from __future__ import annotations

import math
from dataclasses import replace

import pytest

from pdserve.bench.report import summarize
from pdserve.planner.perf_model import PerfModel
from pdserve.planner.simulator import Deployment, SimRequest, simulate, simulate_with_stats
from pdserve.router.whole_policy import WholePolicy
from pdserve.workers.disagg_policy import DisaggPolicy

# Round numbers: 10 ms per step, 1 ms per prompt token, 2 ms per decode sequence, no attention term.
PERF = PerfModel(
    name="toy", source="modelled", kv_bytes_per_token=1000, num_layers=10, overhead_s=0.010,
    prefill_token_s=0.001, attn_pair_s=0.0, decode_seq_s=0.002, decode_ctx_s=0.0,
    links_gbps={"slow": 0.001}, transfer_overhead_s=0.005,
)  # fmt: skip


def test_one_request_colocated_ttft_is_its_prefill_and_itl_a_decode_step() -> None:
    [r] = simulate(PERF, Deployment(colocated=1), [SimRequest(0, 1.0, 100, 5)])
    assert r.ttft_s == pytest.approx(PERF.prefill_s(100))
    assert r.itls_s == pytest.approx([PERF.decode_step_s(1, 100)] * 4)
    assert r.output_tokens == 5


def test_one_request_disaggregated_pays_the_transfer() -> None:
    dep = Deployment(prefill=1, decode=1, fabric="slow")  # 1 MB/s: the transfer dominates
    [r] = simulate(PERF, dep, [SimRequest(0, 0.0, 100, 3)])
    transfer = PERF.transfer_s(100, "slow")
    assert transfer == pytest.approx(0.105)
    # Layer-wise streaming starts with the prefill, so the KV lands a transfer after the start.
    assert r.ttft_s == pytest.approx(max(PERF.prefill_s(100) + transfer / 10, transfer))
    assert r.itls_s == pytest.approx([PERF.decode_step_s(1, 101)] * 2)


def test_chunked_prefill_splits_a_long_prompt_by_the_token_budget() -> None:
    [r] = simulate(PERF, Deployment(colocated=1, max_num_batched_tokens=256), [SimRequest(0, 0.0, 600, 2)])
    chunks = 3 * PERF.overhead_s + 600 * PERF.prefill_token_s
    assert r.ttft_s == pytest.approx(chunks)


def test_decode_only_load_itl_is_the_batched_step_time() -> None:
    reqs = [SimRequest(i, 0.0, 1, 50) for i in range(8)]
    results = simulate(PERF, Deployment(colocated=1), reqs)
    itl = summarize(results)["itl_s"]
    assert itl["p50"] == pytest.approx(PERF.decode_step_s(8, 8))


def test_queueing_grows_ttft_past_saturation() -> None:
    # Capacity: one 100-token prompt + 10 tokens out ~ 0.11 + 9 * 0.012 s alone; arrivals faster
    # than that pile up.
    def p99_ttft(rate: float) -> float:
        reqs = [SimRequest(i, i / rate, 100, 10) for i in range(200)]
        return float(summarize(simulate(PERF, Deployment(colocated=1), reqs))["ttft_s"]["p99"])

    light, heavy = p99_ttft(1.0), p99_ttft(40.0)
    assert light < 0.2
    assert heavy > 10 * light


def test_conditional_disaggregation_uses_the_decode_workers_policy() -> None:
    policy = DisaggPolicy(threshold_tokens=256, max_queue_per_prefill_worker=4,
                          link_bytes_per_s=1e9, kv_bytes_per_token=1000)  # fmt: skip
    dep = Deployment(prefill=1, decode=1, policy=policy, fabric="slow")
    reqs = [SimRequest(0, 0.0, 100, 2), SimRequest(1, 5.0, 1000, 2)]
    _, decisions = simulate_with_stats(PERF, dep, reqs)
    assert decisions == {"local": 1, "remote": 1}


def test_a_deployment_is_colocated_or_disaggregated() -> None:
    with pytest.raises(ValueError):
        Deployment(colocated=1, decode=1)
    with pytest.raises(ValueError):
        Deployment(prefill=1)
    assert Deployment(prefill=2, decode=3).gpus == 5


def test_the_decode_worker_decides_and_takes_the_kv_only_between_its_steps() -> None:
    perf = replace(PERF, links_gbps={"fast": 1e6}, transfer_overhead_s=0.0)
    dep = Deployment(prefill=1, decode=1, fabric="fast")
    # A keeps the decode worker busy with 12 ms steps; B arrives in the middle of one.
    a, b = simulate(perf, dep, [SimRequest(0, 0.0, 100, 60), SimRequest(1, 0.3055, 20, 3)])
    step = perf.decode_step_s(1, 0)
    assert a.itls_s[:5] == pytest.approx([step] * 5)
    boundaries = [a.start + t for t in a.chunk_times]
    # B's job enters the prefill queue when A's running step ends, not when B arrives ...
    decided = b.start + float(b.phases["enqueued"])
    assert decided == pytest.approx(min(t for t in boundaries if t >= b.start))
    assert decided > b.start
    # ... and its first token leaves at the end of the step running when its KV landed.
    kv_landed = decided + perf.prefill_s(20)
    first = b.start + (b.ttft_s or 0.0)
    assert first == pytest.approx(min(t for t in boundaries if t >= kv_landed))
    assert first > kv_landed


def test_simulated_requests_carry_the_routers_phases() -> None:
    [local] = simulate(PERF, Deployment(colocated=1), [SimRequest(0, 2.0, 100, 3)])
    assert local.phases is not None and local.phases["prefill_path"] == "local"
    assert local.phases["first_token"] == pytest.approx(local.ttft_s)
    [remote] = simulate(PERF, Deployment(prefill=1, decode=1, fabric="slow"), [SimRequest(0, 2.0, 100, 3)])
    ph = remote.phases
    assert ph is not None and ph["prefill_path"] == "remote"
    assert (
        0
        <= float(ph["enqueued"])
        <= float(ph["pulled"])
        < float(ph["first_token"])
        == pytest.approx(remote.ttft_s)
    )
    assert float(ph["kv_seconds"]) == pytest.approx(remote.ttft_s)  # idle workers: all of it is prefill + KV


def test_a_short_request_decoding_beside_a_long_one_pays_for_the_padding() -> None:
    padded = replace(PERF, decode_pad_s=5e-6)
    reqs = [SimRequest(0, 0.0, 2000, 30), SimRequest(1, 0.0, 10, 30)]
    itl = {}
    for name, perf in (("exact", PERF), ("padded", padded)):
        short = simulate(perf, Deployment(colocated=1), reqs)[1]
        itl[name] = short.itls_s[-1]  # both decoding, no prompt left
    # The gather reads the short sequence up to the long one's length: ~1,990 positions more.
    assert itl["padded"] - itl["exact"] == pytest.approx(5e-6 * 1990, rel=0.02)


def test_streamed_tokens_pay_the_serving_cost_and_the_prefill_worker_none() -> None:
    served = replace(PERF, serving_step_s=0.004, serving_seq_s=0.001)
    reqs = [SimRequest(i, 0.0, 1, 50) for i in range(8)]
    itl = summarize(simulate(served, Deployment(colocated=1), reqs))["itl_s"]
    assert itl["p50"] == pytest.approx(PERF.decode_step_s(8, 8) + 0.004 + 8 * 0.001)
    dep = Deployment(prefill=1, decode=1, fabric="slow")
    [plain] = simulate(PERF, dep, [SimRequest(0, 0.0, 100, 2)])
    [with_serving] = simulate(served, dep, [SimRequest(0, 0.0, 100, 2)])
    assert with_serving.ttft_s == pytest.approx(plain.ttft_s)  # the first token goes with the KV


def test_an_idle_prefill_worker_serving_short_requests_whole_adds_decode_capacity() -> None:
    policy = DisaggPolicy(threshold_tokens=256, max_queue_per_prefill_worker=4,
                          link_bytes_per_s=1e9, kv_bytes_per_token=1000)  # fmt: skip
    # A burst of short prompts, then one long prompt while the short ones still decode.
    reqs = [SimRequest(i, 0.0, 50, 40) for i in range(32)] + [SimRequest(32, 0.5, 1000, 2)]
    plain = Deployment(prefill=1, decode=1, policy=policy, fabric="slow")
    whole = replace(plain, whole=WholePolicy(256, max_whole_per_worker=12))
    (plain_res, plain_dec), (whole_res, whole_dec) = (
        simulate_with_stats(PERF, dep, reqs) for dep in (plain, whole)
    )
    assert plain_dec == {"local": 32, "remote": 1}
    # The burst alternates until the prefill worker holds its cap; the long prompt still goes remote.
    assert whole_dec == {"local": 20, "remote": 1, "whole": 12}
    assert sum(r.phases is not None and r.phases["prefill_path"] == "whole" for r in whole_res) == 12
    assert all(r.ok and r.output_tokens == r.output_len for r in whole_res)
    # The decode worker's batch shrinks from 32 to 20: every short request finishes sooner.
    last = max(r.e2e_s or 0.0 for r in whole_res[:32])
    assert last < 0.8 * max(r.e2e_s or 0.0 for r in plain_res[:32])
    # The long prompt shares its prefill steps with at most the cap of decodes: a little later only.
    assert whole_res[32].ttft_s is not None and plain_res[32].ttft_s is not None
    assert whole_res[32].ttft_s < 1.1 * plain_res[32].ttft_s


def test_a_request_to_an_idle_deployment_pays_the_wake_up_and_every_token_the_latency() -> None:
    served = replace(PERF, wake_s=0.1, wake_tau_s=1.0, serving_latency_s=0.05)
    reqs = [SimRequest(0, 30.0, 100, 3), SimRequest(1, 35.0, 100, 30), SimRequest(2, 35.05, 100, 3)]
    first, second, third = simulate(served, Deployment(colocated=1), reqs)
    plain = simulate(PERF, Deployment(colocated=1), reqs)
    # The first request finds the deployment idle since the run began (30 s): the whole wake-up.
    assert first.ttft_s == pytest.approx(PERF.prefill_s(100) + 0.1 * (1 - math.exp(-30)) + 0.05)
    assert first.itls_s == pytest.approx(plain[0].itls_s)  # the latency shifts every token alike
    assert first.phases is not None and float(first.phases["first_token"]) == pytest.approx(
        first.ttft_s - 0.05
    )
    # The second finds it idle since the first ended; the third arrives while the second runs.
    idle = 5.0 - (first.e2e_s - 0.05)  # the second arrives 5 s after the first
    assert second.ttft_s == pytest.approx(PERF.prefill_s(100) + 0.1 * (1 - math.exp(-idle)) + 0.05)
    assert third.ttft_s is not None and plain[2].ttft_s is not None
    assert third.ttft_s - 0.05 < plain[2].ttft_s + 0.1 * (1 - math.exp(-idle)) + 1e-9  # no wake of its own


def test_a_full_kv_cache_preempts_the_latest_request_and_recomputes_it() -> None:
    reqs = [SimRequest(0, 0.0, 60, 40), SimRequest(1, 0.0, 60, 40)]
    roomy = simulate(PERF, Deployment(colocated=1), reqs)
    # 10 blocks of 16 tokens: each request grows to 100 tokens (7 blocks), both cannot fit.
    tight = simulate(PERF, Deployment(colocated=1, kv_blocks=10, block_size=16), reqs)
    assert all(r.ok and r.output_tokens == 40 for r in tight)
    assert tight[0].e2e_s == pytest.approx(roomy[0].e2e_s, rel=0.2)  # the first keeps running
    # The second was preempted when the first needed its 7th block, and computed again after it.
    assert tight[1].e2e_s is not None and roomy[1].e2e_s is not None
    assert tight[1].e2e_s > tight[0].e2e_s + 20 * PERF.decode_step_s(1, 100)
    assert tight[1].ttft_s == pytest.approx(roomy[1].ttft_s)  # its first token came before


def test_a_remote_prefill_past_its_deadline_is_prefilled_where_it_decodes() -> None:
    slow = replace(PERF, prefill_token_s=0.01)  # a 100-token prompt: ~1 s
    dep = Deployment(prefill=1, decode=1, fabric="slow", kv_timeout_s=0.5, kv_grace_s=0.2)
    [r] = simulate(slow, dep, [SimRequest(0, 0.0, 100, 3)])
    assert r.phases is not None and r.phases["prefill_path"] == "fallback"
    # Given up 0.7 s after its decision (the prefill worker's step is dropped), then prefilled by
    # the idle decode worker.
    assert r.ttft_s == pytest.approx(0.7 + slow.prefill_s(100))
    assert r.ok and r.output_tokens == 3


def test_a_decode_worker_without_blocks_for_a_remote_prompt_prefills_it_itself() -> None:
    dep = Deployment(prefill=1, decode=1, fabric="slow", kv_blocks=10, block_size=16)
    # The first holds 4-7 blocks while it decodes; the second's 100 tokens need 7 at once.
    reqs = [SimRequest(0, 0.0, 60, 50), SimRequest(1, 0.5, 100, 2)]
    (first, second), decisions = simulate_with_stats(PERF, dep, reqs)
    assert decisions == {"local": 1, "remote": 1}
    assert second.phases is not None and second.phases["prefill_path"] == "local"
    assert first.ok and second.ok


FAST = replace(PERF, links_gbps={"fast": 100.0})


def test_early_prefill_starts_before_the_decode_workers_step_ends() -> None:
    """A decode worker busy with a long batch decides only between its steps (90 ms here). Started
    by the router, the prefill runs meanwhile: here it lands before the step boundary the late one
    misses, so the first token comes a whole step sooner."""
    busy = [SimRequest(i, 0.0, 10, 40) for i in range(40)]  # 40 sequences: 90 ms decode steps
    late = SimRequest(40, 1.5, 180, 3)  # the prefill worker is idle again by then
    out = {}
    for early in (False, True):
        dep = Deployment(prefill=1, decode=1, fabric="fast", max_num_seqs=64, early_prefill=early)
        results, decisions = simulate_with_stats(FAST, dep, [*busy, late])
        assert decisions == {"local": 0, "remote": 41}
        assert all(r.output_tokens == r.output_len for r in results)
        out[early] = results[-1]
    assert out[True].phases is not None and out[True].phases["enqueued"] == 0.0  # queued at routing
    assert out[False].ttft_s - out[True].ttft_s == pytest.approx(FAST.decode_step_s(40, 50), abs=0.02)


def test_early_prefill_done_before_the_reservation_waits_for_it() -> None:
    """A 5-token prompt's prefill (15 ms) ends before the decode worker's step does: its KV leaves
    only once the blocks are reserved, at the step boundary (parked), and the request completes."""
    busy = [SimRequest(i, 0.0, 10, 40) for i in range(40)]
    dep = Deployment(prefill=1, decode=1, fabric="fast", max_num_seqs=64, early_prefill=True)
    results = simulate(FAST, dep, [*busy, SimRequest(40, 1.5, 5, 3)])
    r = results[-1]
    assert r.output_tokens == 3 and r.phases is not None
    late = simulate(FAST, replace(dep, early_prefill=False), [*busy, SimRequest(40, 1.5, 5, 3)])[-1]
    assert late.phases is not None
    # The transfer ends after the reservation the late path waited for before even enqueueing.
    reserved = float(late.phases["enqueued"])
    assert float(r.phases["kv_seconds"]) > reserved > FAST.prefill_s(5)
    assert r.ttft_s is not None and late.ttft_s is not None and r.ttft_s <= late.ttft_s


def test_a_prefill_chunk_cap_takes_short_prompts_out_from_behind_a_long_one() -> None:
    """A 2,000-token prompt, then four 50-token ones a moment later, 512-token steps. Uncapped, the
    short ones wait for the long prompt's remaining chunks; capped at 256 tokens while others wait,
    they are prefilled beside its next chunk, as the engine's scheduler does (chunking.py)."""
    reqs = [SimRequest(0, 0.0, 2000, 4)] + [SimRequest(i, 0.001, 50, 4) for i in range(1, 5)]

    def ttfts(cap: int) -> list[float]:
        dep = Deployment(colocated=1, max_num_batched_tokens=512, prefill_chunk_cap=cap)
        return [r.ttft_s or math.inf for r in sorted(simulate(PERF, dep, reqs), key=lambda r: r.index)]

    plain, capped = ttfts(0), ttfts(256)
    # Uncapped: the short ones start after the long prompt's 4 chunks (0.5 s of prefill and more).
    assert min(plain[1:]) > 4 * PERF.overhead_s + 2000 * PERF.prefill_token_s - 0.01
    # Capped: the first short prompt is done within the step after the first chunk; the long one
    # pays a little (its chunks shrink while the others wait).
    assert max(capped[1:]) < 0.5 * min(plain[1:])
    assert plain[0] <= capped[0] < 1.5 * plain[0]
