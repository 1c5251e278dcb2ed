"""The engine thread's counters: what each step computed and where its time went."""

from __future__ import annotations

from pathlib import Path

import pytest

from pdserve import LLM, SamplingParams
from pdserve.engine.step_stats import PHASES, StepStats, busy_seconds, per_step_report
from pdserve.router.metrics import _engine_counter_metrics
from tests.unit.tiny_models import make_tiny_hf_model


def test_counters_follow_prefill_chunks_and_decode_steps(tmp_path: Path) -> None:
    llm = LLM(
        str(make_tiny_hf_model("llama", tmp_path)), block_size=4, num_blocks=128, max_num_batched_tokens=8
    )
    params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    llm.generate([[5] * 20, [7] * 3], params)
    c = llm.engine.counters()
    # 23 prompt tokens in chunks of at most 8; every output token after the first costs one decode
    # token (the last token sampled is never fed back).
    assert c["prefill_tokens"] == 23
    assert c["decode_tokens"] == 2 * (5 - 1)
    # Step 1: prompt A's first 8 tokens; 2: A's next 8; 3: A's last 4 with B's 3 (A samples) ...
    assert c["steps"] >= 3 + 4 and c["seqs"] >= c["steps"]
    assert c["graph_steps"] == 0  # CPU: no CUDA graphs
    assert c["schedule_s"] > 0 and c["forward_s"] > 0 and c["postprocess_s"] > 0
    assert c["forward_s"] > c["schedule_s"]  # the model costs more than the bookkeeping


def test_per_step_report_divides_differences() -> None:
    before = StepStats(steps=10, seqs=40, decode_tokens=40, forward_s=1.0).as_dict()
    after = StepStats(
        steps=30, graph_steps=10, seqs=120, prefill_tokens=500, decode_tokens=100, forward_s=1.4,
        schedule_s=0.02, postprocess_s=0.04, calls_s=0.01, deliver_s=0.03,
    ).as_dict()  # fmt: skip
    r = per_step_report(before, after, wall_s=2.0)
    assert r["steps_per_s"] == 10 and r["mean_batch"] == 4 and r["graph_step_share"] == 0.5
    assert r["prefill_tok_s"] == 250 and r["decode_tok_s"] == 30
    assert r["forward_ms_per_step"] == pytest.approx(20.0)
    assert r["busy_share"] == pytest.approx((0.4 + 0.02 + 0.04 + 0.01 + 0.03) / 2.0)
    assert busy_seconds(after) == pytest.approx(1.5)


def test_prometheus_families_carry_every_phase_per_worker() -> None:
    c = StepStats(steps=3, graph_steps=2, seqs=9, prefill_tokens=7, decode_tokens=6, forward_s=0.5).as_dict()
    families = {f.name: f for f in _engine_counter_metrics({"decode-1": c, "prefill-2": c})}
    phases = {
        (s.labels["worker"], s.labels["phase"]) for s in families["pdserve_engine_thread_seconds"].samples
    }
    assert phases == {(w, p) for w in ("decode-1", "prefill-2") for p in PHASES}
    steps = {
        (s.labels["worker"], s.labels["kind"]): s.value for s in families["pdserve_engine_steps"].samples
    }
    assert steps[("decode-1", "all")] == 3 and steps[("decode-1", "graph")] == 2


def test_a_scrape_gives_every_counter_back() -> None:
    """What a benchmark reads from the router's /metrics is what each engine counted."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.registry import Collector

    from pdserve.router.metrics import parse_engine_counters

    counters = {
        "decode-1": StepStats(steps=30, graph_steps=25, ahead_steps=21, seqs=90, prefill_tokens=700,
                              decode_tokens=60, forward_s=0.5, deliver_s=0.25).as_dict(),
        "prefill-2": StepStats(steps=4, seqs=4, prefill_tokens=4000, schedule_s=0.125).as_dict(),
    }  # fmt: skip

    class Families(Collector):
        def collect(self):  # type: ignore[no-untyped-def]
            yield from _engine_counter_metrics(counters)

    registry = CollectorRegistry()
    registry.register(Families())
    assert parse_engine_counters(generate_latest(registry).decode()) == counters
