"""The generate stream every worker that serves a request end to end answers with: admit the
request on the engine thread, then send its outputs as TokenChunk frames until it finishes.

Decode and co-located workers serve every request this way; a prefill worker serves the short
requests a router sends it whole (router/whole_policy.py). Each role says how a request is admitted
(a decode worker may hand its prefill to the prefill pool) and what its first chunk reports.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable

from pdserve.engine.async_llm import AsyncLLM
from pdserve.engine.engine import LLMEngine
from pdserve.outputs import RequestOutput
from pdserve.protocol import GenerateRequest, PrefillDeclined, PrefillJob, TokenChunk, frame
from pdserve.trace import Trace, mark

# Engine thread: queue the request, or return a PrefillJob for the router's queue (or, when the router
# started the prefill early and it stays here after all, PrefillDeclined).
Admit = Callable[[LLMEngine], PrefillJob | PrefillDeclined | None]
# (first chunk with a token, its last output, seconds since admission): sets the chunk's prefill_path
# (and may add marks to chunk.trace).
OnFirstToken = Callable[[TokenChunk, RequestOutput, float], None]


def error_frame(request_id: str, error: str) -> bytes:
    return frame(TokenChunk(request_id, [], "", finished=True, finish_reason="error", error=error))


async def stream_frames(
    llm: AsyncLLM,
    req: GenerateRequest,
    admit: Admit,
    on_first_token: OnFirstToken,
    on_finished: Callable[[str], object] | None = None,
) -> AsyncIterator[bytes]:
    rid = req.request_id
    trace: Trace = {}
    mark(trace, "worker.received")

    def admit_marked(eng: LLMEngine) -> PrefillJob | PrefillDeclined | None:
        job = admit(eng)
        mark(trace, "worker.admitted")
        return job

    try:
        llm.engine.validate(req.prompt_token_ids, req.sampling_params())
        llm.open_stream(rid)
    except ValueError as e:
        yield error_frame(rid, str(e))
        return
    try:
        job = await llm.call(admit_marked)
    except ValueError as e:
        llm.close_stream(rid)
        yield error_frame(rid, str(e))
        return
    if isinstance(job, PrefillJob):
        job.trace = trace  # the prefill worker adds its marks; they come back with the KV
    if job is not None:
        yield frame(job)
    first = True
    t0 = time.monotonic()
    # One frame per wake-up: when the HTTP side falls behind the engine, the outputs that piled up
    # go out together (each frame costs encoding and a socket write). Closed explicitly, so a client
    # that leaves aborts the request now, not when collected.
    async with contextlib.aclosing(llm.stream_batches(rid)) as batches:
        async for outs in batches:
            if first:
                mark(trace, "worker.output_received")
            chunk = TokenChunk.from_outputs(outs)
            out = outs[-1]
            if first and chunk.new_token_ids:
                first = False
                chunk.trace = trace
                on_first_token(chunk, out, time.monotonic() - t0)
                mark(chunk.trace, "worker.first_frame")
            if out.finished and on_finished is not None:
                on_finished(rid)
            yield frame(chunk)
