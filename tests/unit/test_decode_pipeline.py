"""Decode steps launched ahead (async_decode): the engine must produce exactly what the step-by-step
engine produces, finish requests at the same token, and free every block, also when a request
stops, is aborted or runs out of blocks while the next step is already queued. On CPU the steps run
synchronously, but the bookkeeping is the same one a GPU runs."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from pdserve import LLM, SamplingParams
from pdserve.engine.decode_pipeline import finishes_by_length, plan_continuation
from pdserve.engine.engine import LLMEngine
from pdserve.engine.request import Request, RequestStatus
from tests.unit.tiny_models import make_tiny_hf_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_hf_model("llama", tmp_path_factory.mktemp("tiny"))


def prompts(lengths: list[int], seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 300) for _ in range(n)] for n in lengths]


def run(llm: LLM, ps: list[list[int]], params: list[SamplingParams]) -> list[tuple[list[int], str | None]]:
    return [(r.outputs[0].token_ids, r.outputs[0].finish_reason) for r in llm.generate(ps, params)]


def make_llm(tiny: Path, async_decode: bool, **kw: int) -> LLM:
    return LLM(str(tiny), block_size=4, num_blocks=kw.pop("num_blocks", 256), async_decode=async_decode, **kw)


# ---- the pure planning function ----


def req(rid: str, n_prompt: int = 4, n_out: int = 0, max_tokens: int = 8) -> Request:
    r = Request(rid, list(range(3, 3 + n_prompt)), SamplingParams(max_tokens=max_tokens), max_tokens)
    r.all_token_ids += [5] * n_out
    r.status = RequestStatus.RUNNING
    return r


def test_continuation_is_the_whole_next_step_or_nothing() -> None:
    a, b, c = req("a"), req("b"), req("c")
    assert plan_continuation([a, b], [a, b], False, 100) == [0, 1]
    # Someone waits for admission, or a running request is not in the batch: the scheduler plans.
    assert plan_continuation([a, b], [a, b], True, 100) is None
    assert plan_continuation([a, b], [a, b, c], False, 100) is None
    # Aborted meanwhile: no row; nothing left: no continuation.
    b.status = RequestStatus.FINISHED_ABORTED
    assert plan_continuation([a, b], [a], False, 100) == [0]
    a.status = RequestStatus.FINISHED_STOPPED
    assert plan_continuation([a, b], [], False, 100) is None


def test_the_last_token_by_length_gets_no_next_step() -> None:
    # 7 of 8 tokens out: the one in flight is the last.
    assert finishes_by_length(req("a", n_out=7, max_tokens=8), 100)
    assert not finishes_by_length(req("a", n_out=6, max_tokens=8), 100)
    # The context: 4 prompt + 5 out, one in flight = 10 = max_model_len.
    assert finishes_by_length(req("a", n_out=5, max_tokens=50), 10)
    assert not finishes_by_length(req("a", n_out=4, max_tokens=50), 10)
    a, b = req("a", n_out=7), req("b", n_out=2)
    assert plan_continuation([a, b], [a, b], False, 100) == [1]


# ---- the engine, side by side with and without launching ahead ----


def test_same_tokens_and_finish_reasons_as_step_by_step(tiny: Path) -> None:
    ps = prompts([5, 13, 2, 21, 8, 30])
    reference = run(make_llm(tiny, False), ps, [SamplingParams(temperature=0.0, max_tokens=12)] * 6)
    # A stop token the greedy output of prompt 1 reaches at its 4th token; min_tokens defers
    # another stop past its first occurrence (suppression must count the token still in flight).
    stop = reference[1][0][3]
    params = [
        SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=40, stop_token_ids=[stop], ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=17, ignore_eos=True, logprobs=3),
        SamplingParams(temperature=0.9, top_p=0.8, max_tokens=23, seed=11, ignore_eos=True),
        SamplingParams(
            temperature=0.0, max_tokens=30, stop_token_ids=[reference[4][0][0]], min_tokens=5, ignore_eos=True
        ),
        SamplingParams(temperature=0.0, max_tokens=9),
    ]
    sync, ahead = make_llm(tiny, False), make_llm(tiny, True)
    want, got = sync.generate(ps, params), ahead.generate(ps, params)
    for w, g in zip(want, got, strict=True):
        assert g.outputs[0].token_ids == w.outputs[0].token_ids
        assert g.outputs[0].finish_reason == w.outputs[0].finish_reason
    assert got[1].outputs[0].token_ids[-1] == stop and got[1].outputs[0].finish_reason == "stop"
    assert len(got[4].outputs[0].token_ids) >= 6  # min_tokens held the stop back
    assert [len(r.outputs[0].token_ids) for r in got[:1]] == [1]
    # Logprobs travel with the samples they belong to.
    lp_want = [(x.token_id, round(x.logprob, 5)) for x in want[2].outputs[0].logprobs or []]
    lp_got = [(x.token_id, round(x.logprob, 5)) for x in got[2].outputs[0].logprobs or []]
    assert lp_got == lp_want and len(lp_got) == 17
    for llm in (sync, ahead):
        assert llm.engine.block_manager.num_free_blocks == 256
        assert not llm.engine.has_unfinished()
    assert sync.engine.step_stats.ahead_steps == 0
    assert ahead.engine.step_stats.ahead_steps > 20


def test_short_of_blocks_falls_back_to_the_scheduler(tiny: Path) -> None:
    # 24 blocks of 4 tokens for four 20-token prompts growing by 24 tokens: the pool runs dry
    # mid-decode, the continuation cannot grow and the scheduler preempts.
    ps = prompts([20, 20, 20, 20], seed=3)
    params = [SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)] * 4
    sync, ahead = make_llm(tiny, False, num_blocks=24), make_llm(tiny, True, num_blocks=24)
    assert run(ahead, ps, params) == run(sync, ps, params)
    assert ahead.engine.scheduler.num_preemptions > 0
    assert ahead.engine.block_manager.num_free_blocks == 24


def engine_with(tiny: Path, async_decode: bool) -> LLMEngine:
    return make_llm(tiny, async_decode).engine


def drain(engine: LLMEngine, tokens: dict[str, list[int]]) -> None:
    while engine.has_unfinished():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)


def test_abort_while_its_next_step_is_queued_frees_blocks_after_that_step(tiny: Path) -> None:
    engine = engine_with(tiny, True)
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    for i, p in enumerate(prompts([9, 14, 6], seed=5)):
        engine.add_request(f"r{i}", p, params)
    tokens: dict[str, list[int]] = {}
    while len(tokens.get("r1", [])) < 5:
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    inflight = engine._inflight
    assert inflight is not None and inflight.holds(engine.scheduler.requests["r1"])
    free_before = engine.block_manager.num_free_blocks
    out = engine.abort_request("r1")
    assert out is not None and out.finish_reason == "abort"
    # The queued step still writes r1's next slot: its blocks wait for it.
    assert engine.block_manager.num_free_blocks == free_before
    n_r1 = len(tokens["r1"])
    for out in engine.step():
        tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    assert engine.block_manager.num_free_blocks > free_before
    drain(engine, tokens)
    assert len(tokens["r1"]) == n_r1  # nothing after the abort
    assert len(tokens["r0"]) == len(tokens["r2"]) == 30
    assert engine.block_manager.num_free_blocks == 256


def test_arrivals_during_decode_match_step_by_step(tiny: Path) -> None:
    """New requests arriving while decode steps are queued ahead: the pipeline drains, admits
    them, and every request gets the tokens it gets from the step-by-step engine."""
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    ps = prompts([7, 18, 3, 11, 25], seed=9)
    results = {}
    for async_decode in (False, True):
        engine = engine_with(tiny, async_decode)
        tokens: dict[str, list[int]] = {}
        for i, p in enumerate(ps):
            engine.add_request(f"r{i}", p, params)
            for _ in range(3):  # a few steps between arrivals
                for out in engine.step():
                    tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
        drain(engine, tokens)
        assert engine.block_manager.num_free_blocks == 256
        results[async_decode] = tokens
    assert results[True] == results[False]
    assert all(len(t) == 16 for t in results[True].values())
