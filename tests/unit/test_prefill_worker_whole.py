"""A prefill worker serving a whole request: the same frames a co-located worker sends for it, and an
abort from the router ends the stream and frees every block; a failed step ends its jobs with their
decode workers told (tiny random-weight model, CPU)."""

from __future__ import annotations

import asyncio
import time

from pdserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig, WorkerConfig
from pdserve.protocol import (
    AbortRequest,
    FrameReader,
    GenerateRequest,
    PrefillDestination,
    PrefillJob,
    TokenChunk,
    params_to_dict,
)
from pdserve.sampling_params import SamplingParams
from pdserve.workers.decode import DecodeWorker
from pdserve.workers.prefill import PrefillWorker

PROMPT = [5, 17, 33, 9, 100, 41, 7]


def _engine_config(num_blocks: int = 64) -> EngineConfig:
    return EngineConfig(
        model=ModelConfig(model="dummy:tiny-llama", device="cpu"),
        cache=CacheConfig(num_blocks=num_blocks),
        scheduler=SchedulerConfig(max_num_seqs=8),
    )


def _prefill_worker(num_blocks: int = 64) -> PrefillWorker:
    # Nothing listens at the router URL: the job puller retries in the background, which is fine here.
    cfg = WorkerConfig(role="prefill", router_url="http://127.0.0.1:9", kv_transport="local")
    return PrefillWorker(cfg, _engine_config(num_blocks), b"secret", "http://p", "token")


async def _frames(stream: object, limit: int | None = None) -> list[TokenChunk]:
    reader = FrameReader()
    chunks: list[TokenChunk] = []
    async for data in stream:  # type: ignore[attr-defined]
        chunks += reader.feed(data)
        if limit is not None and len(chunks) >= limit:
            break
    return chunks


async def test_prefill_worker_streams_what_a_colocated_worker_streams() -> None:
    params = params_to_dict(SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    colocated = DecodeWorker(WorkerConfig(role="colocated"), _engine_config(), b"secret", "http://c")
    colocated.start()
    try:
        want = await _frames(colocated.generate(GenerateRequest("r0", PROMPT, params)))
    finally:
        await colocated.shutdown()
    worker = _prefill_worker()
    worker.start()
    try:
        got = await _frames(worker.generate(GenerateRequest("r0", PROMPT, params, allow_remote=False)))
        await asyncio.sleep(0.05)
        stats = worker.llm.stats()
    finally:
        await worker.shutdown()
    assert [t for c in got for t in c.new_token_ids] == [t for c in want for t in c.new_token_ids]
    assert "".join(c.new_text for c in got) == "".join(c.new_text for c in want)
    assert len([t for c in got for t in c.new_token_ids]) == 12
    assert got[0].prefill_path == "whole" and want[0].prefill_path == "local"
    assert got[-1].finished and got[-1].finish_reason == "length"
    assert stats.num_free_blocks == stats.num_total_blocks and stats.num_running == 0


async def test_router_abort_ends_a_whole_request_and_frees_its_blocks() -> None:
    params = params_to_dict(SamplingParams(max_tokens=500, temperature=0.0, ignore_eos=True))
    worker = _prefill_worker()
    worker.start()
    try:
        total = worker.llm.stats().num_total_blocks
        stream = worker.generate(GenerateRequest("r1", PROMPT, params, allow_remote=False))
        reader = FrameReader()
        chunks: list[TokenChunk] = []
        async with asyncio.timeout(10):  # the stream must end by itself: no hang
            async for data in stream:
                chunks += reader.feed(data)
                if len(chunks) == 2:
                    assert worker.llm.stats().num_free_blocks < total  # the request holds blocks
                    await worker.abort(AbortRequest("r1", "client"))
        await asyncio.sleep(0.05)
        stats = worker.llm.stats()
    finally:
        await worker.shutdown()
    # The stream ended by itself, with the abort as its last chunk.
    assert chunks[-1].finished and chunks[-1].finish_reason == "abort"
    assert sum(len(c.new_token_ids) for c in chunks) < 500
    assert stats.num_free_blocks == total and stats.num_running == 0 and stats.num_waiting == 0


async def test_a_request_refused_at_admission_leaves_no_stream_behind() -> None:
    # Fits the model's context but not a 16-block cache: refused on the engine thread.
    worker = _prefill_worker(num_blocks=16)
    worker.start()
    try:
        room = worker.llm.max_model_len - len(PROMPT)
        assert room > 16 * worker.llm.engine.block_manager.block_size
        params = params_to_dict(SamplingParams(max_tokens=room, temperature=0.0))
        chunks = await _frames(worker.generate(GenerateRequest("big", PROMPT, params, allow_remote=False)))
        assert chunks[-1].finish_reason == "error" and "KV blocks" in (chunks[-1].error or "")
        assert "big" not in worker.llm._streams
    finally:
        await worker.shutdown()


async def test_a_failed_engine_step_ends_every_job_with_its_decode_side_told() -> None:
    """A step that raises fails the jobs in it: a job with a destination tells its decode worker at
    once (it prefills locally instead of waiting for its deadline); one queued early, without a
    destination yet, tells it when the destination arrives."""
    worker = _prefill_worker()
    told: list[tuple[str, str, int]] = []
    worker.sender.send_failed = lambda job, error: told.append((job.request_id, error, job.kv_port))  # type: ignore[method-assign]

    def broken(*args: object, **kwargs: object) -> object:
        raise RuntimeError("device fault")

    worker.llm.engine.runner.launch = broken  # type: ignore[method-assign]
    worker.start()
    try:
        params = params_to_dict(SamplingParams(max_tokens=4))
        total = worker.llm.stats().num_total_blocks
        deadline = time.time() + 30
        await worker._start_job(
            PrefillJob("with-dest", PROMPT, params, "d0", "127.0.0.1", 5, [0], 0, deadline)
        )
        await worker._start_job(PrefillJob("early", PROMPT, params, "d0", "", 0, [], 0, deadline))
        async with asyncio.timeout(5):
            while not told or worker.llm.stats().num_free_blocks < total:
                await asyncio.sleep(0.01)
        assert [(rid, port) for rid, _, port in told] == [("with-dest", 5)]
        worker.set_destination(PrefillDestination("early", "d0", "127.0.0.1", 6, [1], 0, deadline))
        async with asyncio.timeout(5):
            while len(told) < 2:
                await asyncio.sleep(0.01)
        assert [(rid, port) for rid, _, port in told] == [("with-dest", 5), ("early", 6)]
        assert worker.llm.stats().num_free_blocks == total
    finally:
        await worker.shutdown()
