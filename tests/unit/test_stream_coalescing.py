"""Outputs that pile up while a decode worker's HTTP side lags go out as one frame: every token in
order, the same text, and the router sees what it would have merged itself."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from pdserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig, WorkerConfig
from pdserve.engine.async_llm import AsyncLLM
from pdserve.engine.engine import LLMEngine
from pdserve.outputs import RequestOutput, TokenLogprob
from pdserve.protocol import FrameReader, GenerateRequest, TokenChunk, frame, params_to_dict
from pdserve.router.streams import merge_outputs
from pdserve.sampling_params import SamplingParams
from pdserve.workers.decode import DecodeWorker


def _engine_config() -> EngineConfig:
    return EngineConfig(
        model=ModelConfig(model="dummy:tiny-llama", device="cpu"),
        cache=CacheConfig(num_blocks=256),
        scheduler=SchedulerConfig(max_num_seqs=8),
    )


PROMPTS = [[5 + i, 17, 33 + i, 9, 100 + 3 * i] for i in range(3)]


@pytest.fixture(scope="module")
def reference() -> list[tuple[list[int], str]]:
    """Greedy ids and text of each prompt, from the engine stepped directly."""
    engine = LLMEngine(_engine_config())
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"r{i}", prompt, params)
    ids: dict[str, list[int]] = {f"r{i}": [] for i in range(len(PROMPTS))}
    text = dict.fromkeys(ids, "")
    while engine.has_unfinished():
        for out in engine.step():
            ids[out.request_id] += out.new_token_ids
            text[out.request_id] += out.new_text
    return [(ids[f"r{i}"], text[f"r{i}"]) for i in range(len(PROMPTS))]


def _out(token: int, finished: bool = False, logprob: bool = True) -> RequestOutput:
    lp = [TokenLogprob(token, -0.5 * token, [(token, -0.5 * token), (1, -3.0)])] if logprob else None
    return RequestOutput(
        "r", [token], f" t{token}", finished, finish_reason="length" if finished else None,
        logprobs=lp, num_prompt_tokens=4, num_output_tokens=token,
    )  # fmt: skip


def test_from_outputs_joins_in_order_and_matches_the_routers_merge() -> None:
    outs = [_out(1), _out(2), _out(3, finished=True)]
    chunk = TokenChunk.from_outputs(outs)
    assert chunk.new_token_ids == [1, 2, 3]
    assert chunk.new_text == " t1 t2 t3"
    assert [lp[0] for lp in chunk.logprobs or []] == [1, 2, 3]
    assert (chunk.finished, chunk.finish_reason, chunk.num_output_tokens) == (True, "length", 3)
    # Over the wire, the router gets what it would have built by merging one chunk per output.
    (received,) = FrameReader().feed(frame(chunk))
    merged = outs[0]
    for out in outs[1:]:
        merged = merge_outputs(merged, out)
    assert received.to_output() == TokenChunk.from_output(merged).to_output()
    assert received.to_output().logprobs == merged.logprobs


def test_from_outputs_of_one_output_is_from_output() -> None:
    out = _out(7, logprob=False)
    assert TokenChunk.from_outputs([out]) == TokenChunk.from_output(out)
    assert TokenChunk.from_outputs([_out(1, logprob=False), _out(2)]).logprobs == [
        [2, -1.0, [[2, -1.0], [1, -3.0]]]
    ]


async def _drain(llm: AsyncLLM, rid: str, prompt: list[int], lag_s: float) -> list[list[RequestOutput]]:
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    llm.open_stream(rid)
    llm.submit(lambda eng: eng.add_request(rid, prompt, params))
    batches = []
    async for batch in llm.stream_batches(rid):
        batches.append(batch)
        await asyncio.sleep(lag_s)  # a slow consumer: the engine runs ahead
    return batches


async def test_lagging_stream_gets_batches_with_every_output_in_order(
    reference: list[tuple[list[int], str]],
) -> None:
    llm = AsyncLLM(_engine_config())
    loop = asyncio.get_running_loop()
    calls = 0
    real_call_soon_threadsafe = loop.call_soon_threadsafe

    def counting(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        return real_call_soon_threadsafe(*args, **kwargs)

    loop.call_soon_threadsafe = counting  # type: ignore[method-assign]
    llm.start()
    try:
        results = await asyncio.gather(*(_drain(llm, f"r{i}", p, 0.02) for i, p in enumerate(PROMPTS)))
    finally:
        loop.call_soon_threadsafe = real_call_soon_threadsafe  # type: ignore[method-assign]
        await llm.shutdown()
    num_outputs = 0
    for batches, (ids, text) in zip(results, reference, strict=True):
        outs = [out for batch in batches for out in batch]
        num_outputs += len(outs)
        assert [t for out in outs for t in out.new_token_ids] == ids
        assert "".join(out.new_text for out in outs) == text
        assert outs[-1].finished and not any(out.finished for out in outs[:-1])
        assert len(batches) < len(outs)  # the lag made some batches carry several outputs
    # The three streams' outputs of one step crossed threads in one call.
    assert calls < num_outputs


async def test_worker_frames_carry_every_token_once_in_order(
    reference: list[tuple[list[int], str]],
) -> None:
    worker = DecodeWorker(WorkerConfig(role="colocated"), _engine_config(), b"secret", "http://w")
    worker.start()
    try:
        params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
        request = GenerateRequest("r0", PROMPTS[0], params_to_dict(params))
        reader = FrameReader()
        chunks: list[TokenChunk] = []
        async for data in worker.generate(request):
            chunks += reader.feed(data)
            await asyncio.sleep(0.02)  # the HTTP side lags behind the engine
    finally:
        await worker.shutdown()
    ids, text = reference[0]
    assert [t for c in chunks for t in c.new_token_ids] == ids
    assert "".join(c.new_text for c in chunks) == text
    assert len(chunks) < len(ids)  # coalesced
    assert chunks[0].prefill_path == "local" and all(c.prefill_path is None for c in chunks[1:])
    assert chunks[-1].finished and chunks[-1].num_output_tokens == len(ids)


def test_merge_keeps_every_field_of_the_last_output() -> None:
    """Merging joins tokens, text and logprobs; every other field comes from the last output (a
    field added to RequestOutput later must not be dropped by the merge)."""
    import dataclasses

    from pdserve.outputs import RequestOutput, TokenLogprob

    first = RequestOutput("r", [1], "a", False, logprobs=[TokenLogprob(1, -0.1)])
    last = RequestOutput(
        "r", [2, 3], "bc", True, finish_reason="stop", stop_reason=7, logprobs=[TokenLogprob(2, -0.2)],
        num_prompt_tokens=5, num_cached_tokens=4, num_output_tokens=3, error=None, phases={"end": 1.0},
    )  # fmt: skip
    merged = merge_outputs(first, last)
    joined = {"new_token_ids": [1, 2, 3], "new_text": "abc"}
    for f in dataclasses.fields(RequestOutput):
        if f.name in joined:
            assert getattr(merged, f.name) == joined[f.name]
        elif f.name == "logprobs":
            assert [lp.token_id for lp in merged.logprobs or []] == [1, 2]
        else:
            assert getattr(merged, f.name) == getattr(last, f.name), f.name
