"""Running an API request's sub-requests against the engine and getting the results to the
client: concurrent merge of n streams, per-request latency metrics, abort the moment the client
disconnects (streaming or not), and server-sent events."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel
from starlette.types import Receive, Scope, Send

from pdserve.outputs import RequestOutput, merge_outputs
from pdserve.router.metrics import ServerMetrics
from pdserve.router.serving import APIError, ChoiceResult, ServingContext
from pdserve.sampling_params import SamplingParams

logger = logging.getLogger("pdserve.router")

SSE_DONE = "data: [DONE]\n\n"


class ClientDisconnected(Exception):
    """The client went away before its response was ready."""


@dataclass
class SubRequest:
    """One engine request: a (prompt, sample) pair of an API request."""

    index: int  # the choice index in the response
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival: float  # time.monotonic() when the HTTP request arrived


def make_sub_requests(
    request_id: str, prompts: Sequence[list[int]], params: Sequence[SamplingParams], arrival: float
) -> list[SubRequest]:
    """n sub-requests per prompt, ids `{request_id}-{choice index}` (the bare id when there is
    only one), seeds `seed + i` so seeded samples differ from each other yet stay reproducible."""
    subs: list[SubRequest] = []
    for k, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
        for i in range(p.n):
            seed = None if p.seed is None else p.seed + i
            subs.append(
                SubRequest(
                    index=k * p.n + i,
                    request_id="",
                    prompt_token_ids=prompt,
                    params=dataclasses.replace(p, n=1, seed=seed),
                    arrival=arrival,
                )
            )
    for sub in subs:
        sub.request_id = request_id if len(subs) == 1 else f"{request_id}-{sub.index}"
    return subs


class _Timing:
    """Latency metrics of one sub-request."""

    def __init__(self, metrics: ServerMetrics, arrival: float) -> None:
        self.metrics = metrics
        self.arrival = arrival
        self.last: float | None = None

    def on_output(self, out: RequestOutput) -> None:
        now = time.monotonic()
        if out.new_token_ids:
            if self.last is None:
                self.metrics.ttft.observe(now - self.arrival)
            else:
                self.metrics.itl.observe(now - self.last)
            self.last = now
            self.metrics.generation_tokens.inc(len(out.new_token_ids))
        if out.finished:
            self.metrics.e2e.observe(now - self.arrival)


async def _pump(
    ctx: ServingContext, sub: SubRequest, queue: asyncio.Queue[tuple[int, RequestOutput | Exception | None]]
) -> None:
    """Feeds one engine stream into the shared queue; on any early exit, aborts the request."""
    timing = _Timing(ctx.metrics, sub.arrival)
    gen = ctx.engine.generate(sub.request_id, sub.prompt_token_ids, sub.params)
    finished = failed = False
    try:
        async for out in gen:
            timing.on_output(out)
            queue.put_nowait((sub.index, out))
            if out.finished:
                finished = True
                break
    except Exception as exc:
        failed = True  # the engine ended this stream itself (rejected or failed the request)
        queue.put_nowait((sub.index, exc))
    finally:
        ctx.metrics.prompt_tokens.inc(len(sub.prompt_token_ids))
        if isinstance(gen, AsyncGenerator):
            await gen.aclose()
        if not (finished or failed):
            # Closing the stream should abort it already; asking again is idempotent and makes
            # sure the KV blocks are freed now rather than when the generator is collected.
            logger.info("%s: aborting", sub.request_id)
            try:
                await ctx.engine.abort(sub.request_id)
            except Exception:
                logger.exception("%s: engine.abort failed", sub.request_id)
        queue.put_nowait((sub.index, None))


_Item = tuple[int, "RequestOutput | Exception | None"]


def coalesce(batch: list[_Item]) -> list[_Item]:
    """Merge adjacent unfinished deltas of the same choice. When the client reads slower than the
    engine writes, one event carries several tokens instead of queueing one event per token: the
    per-event cost (JSON, HTTP framing) is what limits a streaming router."""
    out: list[_Item] = []
    for index, item in batch:
        if out and isinstance(item, RequestOutput):
            last_index, last = out[-1]
            if (
                last_index == index
                and isinstance(last, RequestOutput)
                and not last.finished
                and last.error is None
            ):
                out[-1] = (index, merge_outputs(last, item))
                continue
        out.append((index, item))
    return out


async def merge_generations(
    ctx: ServingContext, subs: Sequence[SubRequest]
) -> AsyncGenerator[tuple[int, RequestOutput], None]:
    """Runs the sub-requests concurrently and yields (choice index, output) as they come.
    Closing this generator (or cancelling its consumer) aborts every unfinished sub-request."""
    queue: asyncio.Queue[tuple[int, RequestOutput | Exception | None]] = asyncio.Queue()
    tasks = [asyncio.create_task(_pump(ctx, sub, queue)) for sub in subs]
    remaining = len(tasks)
    try:
        while remaining:
            batch = [await queue.get()]
            while not queue.empty():  # outputs that piled up while the consumer was busy
                batch.append(queue.get_nowait())
            for index, item in coalesce(batch):
                if item is None:
                    remaining -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    yield index, item
    finally:
        for task in tasks:
            task.cancel()
        # Shielded: under a cancelled anyio scope (client gone) every await would be cancelled
        # again, and the aborts must still reach the engine.
        with anyio.CancelScope(shield=True):
            await asyncio.gather(*tasks, return_exceptions=True)


async def collect_choices(ctx: ServingContext, subs: Sequence[SubRequest]) -> dict[int, ChoiceResult]:
    results = {sub.index: ChoiceResult(sub.index) for sub in subs}
    async with contextlib.aclosing(merge_generations(ctx, subs)) as outputs:
        async for index, out in outputs:
            results[index].add(out)
    return results


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def run_unless_disconnected(request: Request, work: Awaitable[Any]) -> Any:
    """Awaits `work` while watching the connection; if the client leaves first, cancels the
    work (which aborts its engine requests) and raises ClientDisconnected."""
    work_task = asyncio.ensure_future(work)
    watch_task = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({work_task, watch_task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch_task.cancel()
        if not work_task.done():
            work_task.cancel()
            with anyio.CancelScope(shield=True):
                await asyncio.wait({work_task})
    if work_task.cancelled():
        raise ClientDisconnected
    return work_task.result()


def sse(payload: BaseModel) -> str:
    return f"data: {payload.model_dump_json()}\n\n"


def with_phases(event: str, out: RequestOutput, arrival: float) -> str:
    """Adds the router's phase timestamps to a request's last SSE chunk as `"pdserve": {...}`,
    in seconds since the HTTP request arrived (OpenAI clients ignore unknown fields)."""
    if not out.phases:
        return event
    body = json.loads(event[len("data: ") :])
    # Timestamps become offsets; kv_seconds is already a duration and the path a name.
    body["pdserve"] = {
        k: v - arrival if isinstance(v, float) and k != "kv_seconds" else v for k, v in out.phases.items()
    }
    return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"


def sse_error(err: APIError) -> str:
    return f"data: {err.body().model_dump_json()}\n\n"


class SSEResponse(StreamingResponse):
    """Server-sent events that stop, and close their generator (aborting the engine requests),
    the moment the client disconnects — whatever ASGI version the server speaks."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncGenerator[str, None], headers: dict[str, str] | None = None) -> None:
        super().__init__(events, headers={"Cache-Control": "no-cache", **(headers or {})})
        self._events = events

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as tg:

                async def stream_then_stop() -> None:
                    with contextlib.suppress(OSError):  # the client vanished mid-write
                        await self.stream_response(send)
                    tg.cancel_scope.cancel()

                tg.start_soon(stream_then_stop)
                await self.listen_for_disconnect(receive)
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self._events.aclose()
