"""A remote prefill's first token, streamed from the prefill worker instead of after the decode worker.

Through the decode worker, the first token of a remote prefill takes five hand-offs after it is
sampled: the KV channel's send thread, the decode worker's receiver thread (which checks that all
the KV has landed), its engine thread, its event loop, and the HTTP stream to the router. The
prefill worker also sends the token to the router the moment it is sampled (workers/first_token.py
builds it), as a frame on a feed the router keeps open to each prefill worker (one long-lived
stream: `GET /worker/prefill/first_tokens`, router/worker_calls.py), and the router streams it at
once: the request's time to first token no longer waits
for the KV's completion, which then overlaps the token's way to the client and the decode worker's
first step instead of coming before them.

The decode worker's first chunk repeats the token; the router strips it (`strip_first`). Should the
two disagree (the decode worker prefilled the prompt itself after a failed transfer and sampled a
different token), the client already has the prefill worker's token, so the router serves the rest
as a continuation of prompt + that token (`continuation_params`, DisaggClient) and the stream stays
one consistent sequence.

While its first token may still come from either side, a request's decode stream is read by a task
of its own into an inbox that the fed token joins (`relay`); the router then takes whichever
comes first from one place.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator
from typing import TypeVar

from pdserve.outputs import RequestOutput
from pdserve.protocol import PrefillFirstToken, TokenChunk, logprob_from_wire
from pdserve.sampling_params import SamplingParams

T = TypeVar("T")
_END = object()


class FirstTokenInboxes:
    """Requests whose first token the router accepts from a prefill worker, by request id."""

    def __init__(self) -> None:
        self._inboxes: dict[str, asyncio.Queue[object]] = {}

    def open(self, request_id: str) -> asyncio.Queue[object]:
        inbox: asyncio.Queue[object] = asyncio.Queue()
        self._inboxes[request_id] = inbox
        return inbox

    def close(self, request_id: str) -> None:
        self._inboxes.pop(request_id, None)

    def deliver(self, msg: PrefillFirstToken) -> bool:
        """False if no request waits for it (it ended, or the decode worker's token came first)."""
        inbox = self._inboxes.get(msg.request_id)
        if inbox is None:
            return False
        inbox.put_nowait(msg)
        return True

    def __len__(self) -> int:
        return len(self._inboxes)


async def _pump(stream: AsyncIterator[T], inbox: asyncio.Queue[object]) -> None:
    try:
        async for msg in stream:
            inbox.put_nowait(msg)
    except Exception as e:  # re-raised where the stream is consumed
        inbox.put_nowait(e)
        return
    inbox.put_nowait(_END)


async def relay(stream: AsyncIterator[T], inbox: asyncio.Queue[object]) -> AsyncIterator[object]:
    """The stream's messages and whatever else is delivered to the inbox, in arrival order. The
    stream is read (and, when this generator closes, closed) by one task of its own."""
    pump = asyncio.get_running_loop().create_task(_pump(stream, inbox))
    try:
        while True:
            item = await inbox.get()
            if item is _END:
                return
            if isinstance(item, Exception):
                raise item
            yield item
    finally:
        pump.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pump


def direct_output(msg: PrefillFirstToken) -> RequestOutput:
    """What the client gets from the prefill worker's message: the decode worker's first output,
    less what only the decode worker knows (its prefix-cache hits)."""
    return RequestOutput(
        request_id=msg.request_id,
        new_token_ids=[msg.token_id],
        new_text=msg.text,
        finished=False,
        logprobs=None if msg.logprob is None else [logprob_from_wire(msg.logprob)],
        num_prompt_tokens=msg.num_prompt_tokens,
        num_output_tokens=1,
    )


def strip_first(chunk: TokenChunk, first: PrefillFirstToken) -> TokenChunk | None:
    """The decode worker's first chunk without the token the client already has, or None if the
    chunk starts with another token or text. A chunk without tokens (an error) passes as it is."""
    if not chunk.new_token_ids:
        return chunk
    if chunk.new_token_ids[0] != first.token_id or not chunk.new_text.startswith(first.text):
        return None
    return dataclasses.replace(
        chunk,
        new_token_ids=chunk.new_token_ids[1:],
        new_text=chunk.new_text[len(first.text) :],
        logprobs=chunk.logprobs[1:] if chunk.logprobs is not None else None,
    )


def continuation_params(params: SamplingParams) -> SamplingParams:
    """Sampling for the rest of a request whose first token is already out."""
    return dataclasses.replace(
        params,
        max_tokens=None if params.max_tokens is None else params.max_tokens - 1,
        min_tokens=max(params.min_tokens - 1, 0),
    )


def as_original(out: RequestOutput, request_id: str) -> RequestOutput:
    """A continuation's output as the original request's: its prompt was one token longer."""
    out.request_id = request_id
    out.num_prompt_tokens -= 1
    out.num_output_tokens += 1
    return out
