"""The first token of a remote prefill, streamed from the prefill worker: the message it builds
(only for a token that cannot end the request), and the router's side (the decode worker's repeat
stripped, a disagreement detected, a continuation's numbers, both sources read as one stream)."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator

import pytest

from pdserve.engine.detokenizer import IncrementalDetokenizer
from pdserve.outputs import RequestOutput, TokenLogprob
from pdserve.protocol import PrefillFirstToken, PrefillJob, TokenChunk, params_to_dict
from pdserve.router.direct_first_token import (
    FirstTokenInboxes,
    as_original,
    continuation_params,
    direct_output,
    relay,
    strip_first,
)
from pdserve.sampling_params import SamplingParams
from pdserve.workers.first_token import first_token_message
from tests.unit.test_detokenizer import _byte_level_bpe

TOKENIZER = _byte_level_bpe()
EOS = TOKENIZER.convert_tokens_to_ids("<eos>")
PROMPT = TOKENIZER.encode("Hello wörld, naïve café")
NEXT = TOKENIZER.encode(" crème brûlée")


def job(**params: object) -> PrefillJob:
    p = params_to_dict(SamplingParams(**params))  # type: ignore[arg-type]
    return PrefillJob("r1", PROMPT, p, "d", "h", 1, [0], 0, 0.0, first_token_to_router=True)


def message(token: int, logprob: TokenLogprob | None = None, **params: object) -> PrefillFirstToken | None:
    j = job(**params)
    j.trace["prefill.sampled"] = 1.0
    return first_token_message(j, token, logprob, TOKENIZER, (EOS,))


def test_message_carries_the_decode_workers_text_and_logprob() -> None:
    lp = TokenLogprob(NEXT[0], -0.5, [(NEXT[0], -0.5), (7, -1.5)])
    msg = message(NEXT[0], lp, logprobs=1)
    assert msg is not None
    detok = IncrementalDetokenizer(TOKENIZER, PROMPT, SamplingParams())
    detok.update([NEXT[0]])
    assert msg.text == detok.take_delta(False)
    assert (msg.token_id, msg.num_prompt_tokens, msg.logprob) == (
        NEXT[0],
        len(PROMPT),
        [NEXT[0], -0.5, [[NEXT[0], -0.5], [7, -1.5]]],
    )
    assert msg.trace == {"prefill.sampled": 1.0}
    # The first token's text and the decode worker's later deltas make the whole output's text.
    for token in NEXT[1:]:
        detok.update([token])
    assert msg.text + detok.take_delta(True) == TOKENIZER.decode(NEXT)


def test_no_message_for_a_token_that_may_end_the_request() -> None:
    assert message(EOS) is None
    assert message(EOS, ignore_eos=True) is not None
    assert message(NEXT[0], stop_token_ids=[NEXT[0]]) is None
    assert message(NEXT[0], max_tokens=1) is None
    assert message(NEXT[0], max_tokens=2) is not None
    text = TOKENIZER.decode(NEXT[:1])
    assert message(NEXT[0], stop=[text.strip()[:2]]) is None  # a stop string inside its text
    assert message(NEXT[0], stop=["never in it"]) is not None


def chunk(ids: list[int], text: str, **kw: object) -> TokenChunk:
    return TokenChunk("r1", ids, text, prefill_path="remote", **kw)  # type: ignore[arg-type]


FIRST = PrefillFirstToken("r1", 5, " cr", None, 10)


def test_strip_first_removes_the_token_the_client_has() -> None:
    lps = [[5, -0.1, []], [6, -0.2, []]]
    out = strip_first(chunk([5, 6], " crème", logprobs=lps), FIRST)
    assert out is not None
    assert (out.new_token_ids, out.new_text, out.logprobs) == ([6], "ème", [[6, -0.2, []]])
    only = strip_first(chunk([5], " cr", finished=True, finish_reason="length"), FIRST)
    assert only is not None and only.new_token_ids == [] and only.finished


def test_strip_first_detects_a_disagreement() -> None:
    assert strip_first(chunk([4, 6], " crème"), FIRST) is None
    assert strip_first(chunk([5, 6], " grème"), FIRST) is None
    error = chunk([], "", finished=True, finish_reason="error", error="boom")
    assert strip_first(error, FIRST) is error


def test_direct_output_and_a_continuations_numbers() -> None:
    msg = dataclasses.replace(FIRST, logprob=[5, -0.1, [[5, -0.1], [2, -3.0]]])
    out = direct_output(msg)
    assert (out.new_token_ids, out.new_text, out.finished, out.num_prompt_tokens, out.num_output_tokens) == (
        [5], " cr", False, 10, 1,
    )  # fmt: skip
    assert out.logprobs == [TokenLogprob(5, -0.1, [(5, -0.1), (2, -3.0)])]
    p = continuation_params(SamplingParams(max_tokens=8, min_tokens=3))
    assert (p.max_tokens, p.min_tokens) == (7, 2)
    p = continuation_params(SamplingParams(max_tokens=None, min_tokens=0))
    assert (p.max_tokens, p.min_tokens) == (None, 0)
    cont = RequestOutput("r1-cont", [6], "ème", True, num_prompt_tokens=11, num_output_tokens=7)
    back = as_original(cont, "r1")
    assert (back.request_id, back.num_prompt_tokens, back.num_output_tokens) == ("r1", 10, 8)


async def test_relay_interleaves_the_stream_with_delivered_tokens_and_closes_it() -> None:
    gate = asyncio.Event()
    closed_in: list[asyncio.Task[object] | None] = []

    async def decode_stream() -> AsyncIterator[str]:
        try:
            yield "job"
            await gate.wait()
            yield "chunk-1"
            await asyncio.sleep(3600)
            yield "never"
        finally:
            closed_in.append(asyncio.current_task())

    inboxes = FirstTokenInboxes()
    merged = relay(decode_stream(), inboxes.open("r1"))
    seen = [await anext(merged)]
    assert inboxes.deliver(FIRST)
    seen.append(await anext(merged))
    gate.set()
    seen.append(await anext(merged))
    assert seen == ["job", FIRST, "chunk-1"]
    await merged.aclose()  # type: ignore[attr-defined]
    # The stream was closed, by the task that read it (where its HTTP response was opened).
    assert len(closed_in) == 1 and closed_in[0] is not asyncio.current_task()
    inboxes.close("r1")
    assert not inboxes.deliver(FIRST) and len(inboxes) == 0


async def test_relay_raises_the_streams_error_where_it_is_read() -> None:
    async def failing() -> AsyncIterator[str]:
        yield "job"
        raise ConnectionError("worker gone")

    merged = relay(failing(), asyncio.Queue())
    assert await anext(merged) == "job"
    with pytest.raises(ConnectionError, match="worker gone"):
        await anext(merged)
