"""pdserve profile's machinery that needs no model: the engine thread and refitting saved timings."""

from __future__ import annotations

import json
import threading
from dataclasses import replace
from pathlib import Path

import pytest

from pdserve.planner.perf_model import PerfModel
from pdserve.planner.profile import _on_engine_thread

TRUTH = PerfModel(
    name="toy", source="measured", kv_bytes_per_token=2048, num_layers=4, overhead_s=0.02,
    prefill_token_s=0.001, attn_pair_s=1e-7, decode_seq_s=0.003, decode_ctx_s=1e-5,
    decode_batch_s=((1, 0.0), (2, 0.004), (4, 0.03)), prefill_overhead_s=0.04, mixed_decode_s=0.01,
    decode_gather_s=((1024, 0.01), (2048, 0.02), (4000, 0.05)),
    links_gbps={"shm": 2.0}, serving_step_s=0.005,
)  # fmt: skip


def test_steps_are_timed_on_a_thread_of_their_own_as_a_worker_runs_them() -> None:
    assert _on_engine_thread(lambda: threading.current_thread().name) == "pdserve-engine"
    assert _on_engine_thread(lambda: threading.current_thread()) is not threading.current_thread()

    def fails() -> None:
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        _on_engine_thread(fails)


def test_refit_fits_the_saved_timings_again_and_keeps_the_rest(tmp_path: Path) -> None:
    from pdserve.cli import main

    old = replace(TRUTH, overhead_s=0.5, prefill_overhead_s=0.0, mixed_decode_s=None)  # an earlier fit
    old.save(tmp_path / "perf.json")
    engine = replace(TRUTH, serving_step_s=0.0)  # what a profile times
    raw = {
        "prefill": [[n, c, engine.prefill_s(n, c)] for n, c in ((64, 0), (256, 0), (512, 0), (512, 512))],
        "decode": [[b, b * c, c, engine.decode_step_s(b, b * c)] for b in (1, 2, 4) for c in (128, 512)]
        + [
            [b, 1000 + 128 * (b - 1), 1000, engine.decode_step_s(b, 1000 + 128 * (b - 1), 1000)]
            for b in (2, 4)
        ],
        "mixed": [
            [b, b * c, 128, 0, engine.step_s(b, b * c, [(128, 0)])] for b in (1, 2, 4) for c in (130, 520)
        ],
    }
    (tmp_path / "perf.raw.json").write_text(json.dumps(raw))
    assert (
        main(["profile", "--refit", str(tmp_path / "perf.json"), "--json", str(tmp_path / "new.json")]) == 0
    )
    new = PerfModel.load(tmp_path / "new.json")
    for name in ("overhead_s", "prefill_overhead_s", "prefill_token_s", "mixed_decode_s", "decode_ctx_s"):
        assert getattr(new, name) == pytest.approx(getattr(TRUTH, name), rel=1e-6), name
    assert [p for p, _ in new.decode_gather_s] == [1024, 2048, 4000]
    assert [s for _, s in new.decode_gather_s] == pytest.approx([0.01, 0.02, 0.05], rel=1e-6)
    assert new.links_gbps == TRUTH.links_gbps and new.serving_step_s == 0.005  # not the fit's business
    assert "refitted" in new.notes


def test_mixed_steps_carry_their_prompt_beside_the_largest_batch() -> None:
    """The largest timed decode batch leaves room for the mixed step's new prompt: a step that ran
    the decodes alone was once timed as mixed and taught the fit that the chunk was free."""
    from pdserve.planner.profile import ProfileSpec, _engine, _time_mixed

    spec = ProfileSpec(
        model="dummy:tiny-llama", device="cpu", decode_batches=[1, 4], chunk_batches=[1, 4],
        chunk_tokens=48, max_num_batched_tokens=64, repeats=1, transports=[],
    )  # fmt: skip
    engine = _engine(spec)
    steps = _on_engine_thread(lambda: _time_mixed(engine, 32, [1, 4], 48, 2, "t", lambda: 0.0))
    assert sorted({s.batch for s in steps}) == [1, 4] and all(s.tokens == 48 for s in steps)
    assert not engine.scheduler.waiting and not engine.scheduler.running  # every prompt computed and done


def test_unset_profile_steps_follow_the_device() -> None:
    from pdserve.planner.profile import profile_defaults

    cpu, gpu = profile_defaults("cpu", {}), profile_defaults("cuda", {})
    assert (cpu["max_num_batched_tokens"], cpu["chunk_tokens"], cpu["chunk_batches"]) == (
        512,
        128,
        [1, 2, 4, 8],
    )
    # On a GPU the mixed steps are the size `pdserve serve` runs there: a chunk filling the budget
    # beside the largest batch.
    assert (gpu["max_num_batched_tokens"], gpu["chunk_tokens"], max(gpu["chunk_batches"])) == (
        2048,
        1920,
        128,
    )
    assert 4096 in gpu["prefill_tokens"] and gpu["decode_contexts"] == [512, 2048]
    mine = profile_defaults("cuda", {"max_num_batched_tokens": 1024, "chunk_batches": [1, 8]})
    assert (mine["chunk_tokens"], mine["decode_batches"]) == (1016, [1, 16, 64, 128])


def test_profile_cli_times_a_tiny_model_on_cpu(tmp_path: Path) -> None:
    from pdserve.cli import main

    out = tmp_path / "perf.json"
    argv = ["profile", "--model", "dummy:tiny-llama", "--device", "cpu", "--prefill-tokens", "16,32,64",
            "--decode-batches", "1,2", "--decode-contexts", "16,32", "--chunk-batches", "1,2", "--chunk-tokens", "24",
            "--mixed-context", "0", "--transports", "", "--repeats", "1", "--json", str(out)]  # fmt: skip
    assert main(argv) == 0
    raw = json.loads(out.with_suffix(".raw.json").read_text())
    assert {m[2] for m in raw["mixed"]} == {24} and {m[0] for m in raw["mixed"]} == {1, 2}
    assert PerfModel.load(out).max_prefill_chunk == 64
