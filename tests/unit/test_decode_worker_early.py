"""A decode worker told the router started a prompt's prefill early (router/early_prefill.py): it
answers with the job's destination (the blocks it reserved), or, with no blocks to reserve, declines
and prefills the prompt itself — the same tokens a co-located worker gives (tiny model, CPU)."""

from __future__ import annotations

from pdserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig, WorkerConfig
from pdserve.protocol import (
    AbortRequest,
    FrameReader,
    GenerateRequest,
    PrefillDeclined,
    PrefillJob,
    TokenChunk,
    params_to_dict,
)
from pdserve.sampling_params import SamplingParams
from pdserve.workers.decode import DecodeWorker

PROMPT = [5, 17, 33, 9, 100, 41, 7, 12, 88, 3, 61, 29, 45, 71, 2, 19, 54, 30, 8, 77]
PARAMS = params_to_dict(SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))


def _config() -> EngineConfig:
    return EngineConfig(
        model=ModelConfig(model="dummy:tiny-llama", device="cpu"),
        cache=CacheConfig(num_blocks=64),
        scheduler=SchedulerConfig(max_num_seqs=8),
    )


async def _free_blocks(worker: DecodeWorker) -> int:
    """Read on the engine thread (the polled stats lag it)."""
    return await worker.llm.call(lambda eng: eng.block_manager.num_free_blocks)


async def _frames(worker: DecodeWorker, req: GenerateRequest, limit: int | None = None) -> list[object]:
    reader = FrameReader()
    out: list[object] = []
    async for data in worker.generate(req):
        out += reader.feed(data)
        if limit is not None and len(out) >= limit:
            break
    return out


async def test_with_blocks_it_answers_with_the_destination() -> None:
    worker = DecodeWorker(WorkerConfig(role="decode", kv_transport="local"), _config(), b"s", "http://d")
    worker.start()
    try:
        free = await _free_blocks(worker)
        [job] = await _frames(worker, GenerateRequest("r1", PROMPT, PARAMS, prefill_started=True), limit=1)
        assert isinstance(job, PrefillJob) and job.has_destination
        assert len(job.dst_block_ids) == -(-len(PROMPT) // worker.layout.block_size)
        assert await _free_blocks(worker) == free - len(job.dst_block_ids)
        assert "worker.admitted" in job.trace  # the decode side's marks travel with the destination
        await worker.abort(AbortRequest("r1", "client", writer_stopped=True))
        assert await _free_blocks(worker) == free
    finally:
        await worker.shutdown()


async def test_without_blocks_it_declines_and_serves_the_prompt_itself() -> None:
    colocated = DecodeWorker(WorkerConfig(role="colocated"), _config(), b"s", "http://c")
    colocated.start()
    try:
        want = await _frames(colocated, GenerateRequest("r0", PROMPT, PARAMS))
    finally:
        await colocated.shutdown()
    worker = DecodeWorker(WorkerConfig(role="decode", kv_transport="local"), _config(), b"s", "http://d")
    worker.llm.engine.reserve_remote = lambda *args: None  # type: ignore[method-assign]  # no blocks to spare
    worker.start()
    try:
        got = await _frames(worker, GenerateRequest("r2", PROMPT, PARAMS, prefill_started=True))
    finally:
        await worker.shutdown()
    assert isinstance(got[0], PrefillDeclined) and got[0].request_id == "r2"
    chunks = [c for c in got[1:] if isinstance(c, TokenChunk)]
    assert len(chunks) == len(got) - 1
    tokens = [t for c in chunks for t in c.new_token_ids]
    assert tokens == [t for c in want if isinstance(c, TokenChunk) for t in c.new_token_ids]
    assert len(tokens) == 6 and chunks[0].prefill_path == "local"


async def test_a_prompt_it_has_cached_since_the_routers_view_is_its_own_to_prefill() -> None:
    """The router's view of the cache lags by a load poll: a follow-up sent as its previous turn
    ends may be started early elsewhere although its prefix sits here. The worker declines it then,
    and prefills it from its cache; with nothing cached it follows the router (test above)."""
    worker = DecodeWorker(WorkerConfig(role="decode", kv_transport="local"), _config(), b"s", "http://d")
    worker.start()
    try:
        await _frames(worker, GenerateRequest("turn1", PROMPT, PARAMS))  # short: prefilled here, cached
        follow_up = [*PROMPT, 4, 6]
        got = await _frames(worker, GenerateRequest("turn2", follow_up, PARAMS, prefill_started=True))
    finally:
        await worker.shutdown()
    assert isinstance(got[0], PrefillDeclined) and got[0].request_id == "turn2"
    chunks = [c for c in got[1:] if isinstance(c, TokenChunk)]
    assert chunks[0].prefill_path == "local" and sum(len(c.new_token_ids) for c in chunks) == 6
