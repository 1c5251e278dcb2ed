"""The router with --prefill-serves-whole: which worker a request goes to, and what happens when
the prefill worker serving it whole fails (workers faked over httpx's mock transport)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable

import httpx
import pytest

from pdserve.protocol import KVLayout, PrefillJob, TokenChunk, WorkerInfo, WorkerLoad, frame
from pdserve.router.disagg_client import DisaggClient, WorkerHandle
from pdserve.router.prefix_index import PrefixIndex
from pdserve.router.whole_policy import WholePolicy
from pdserve.sampling_params import SamplingParams

LAYOUT = KVLayout("m", "bfloat16", 16, 2, 2, 64)
SHORT = list(range(1, 41))
LONG = list(range(1, 301))


def _client(whole: WholePolicy | None, handler: Callable[[httpx.Request], httpx.Response]) -> DisaggClient:
    client = DisaggClient([], "token", tokenizer=None, whole=whole)
    idle = WorkerLoad("x", num_running=0, num_waiting=0, num_free_blocks=100, num_total_blocks=100)
    for wid, role in (("decode-0", "decode"), ("prefill-0", "prefill")):
        info = WorkerInfo(wid, role, f"http://{wid}", "127.0.0.1", 0, LAYOUT, "m", 512)
        client.workers[wid] = WorkerHandle(info, load=idle)
    client.prefix_index = PrefixIndex(16)
    client._http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    return client


def _never(request: httpx.Request) -> httpx.Response:
    raise AssertionError(f"unexpected call {request.url}")


def _route(client: DisaggClient, prompt: list[int]) -> str:
    decoder = client._pick(prompt)
    whole = client._pick_whole("r", prompt, decoder)
    return (whole or decoder).worker_id


async def test_a_burst_of_short_prompts_is_shared_with_the_idle_prefill_worker() -> None:
    client = _client(WholePolicy(256, max_whole_per_worker=3), _never)
    routed = []
    for i in range(8):
        wid = _route(client, SHORT)
        client._streams[f"r{i}"] = wid  # what generate() records before streaming
        routed.append(wid)
    assert routed[:6] == ["decode-0", "prefill-0"] * 3
    assert routed.count("prefill-0") == 3  # the cap
    # Long prompts go to the decode worker, which sends their prefill to the prefill pool.
    client._streams.clear()
    client._streams["r0"] = "decode-0"
    assert _route(client, LONG) == "decode-0"
    assert _route(client, SHORT) == "prefill-0"
    # A prefill job held by the prefill worker (or one waiting in the queue) keeps it for prompts.
    await client.queue.put(PrefillJob("j", LONG, {}, "decode-0", "h", 1, [0], 0, time.time() + 30))
    assert _route(client, SHORT) == "decode-0"
    await client.queue.pull("prefill-0", 0.1)
    assert client.queue.depth == 0
    assert _route(client, SHORT) == "decode-0"
    client.queue.done("j")
    assert _route(client, SHORT) == "prefill-0"
    await client.shutdown()


async def test_without_the_option_prefill_workers_only_prefill() -> None:
    client = _client(None, _never)
    client._streams.update({f"r{i}": "decode-0" for i in range(10)})
    assert _route(client, SHORT) == "decode-0"
    await client.shutdown()


def _chunks(*chunks: TokenChunk) -> AsyncIterator[bytes]:
    """A streamed body, one frame per read (as a worker sends them)."""

    async def body() -> AsyncIterator[bytes]:
        for c in chunks:
            yield frame(c)

    return body()


async def _generate(client: DisaggClient) -> list[tuple[list[int], str | None, str | None]]:
    # Another stream on the decode worker makes the idle prefill worker the less loaded one.
    client._streams["other"] = "decode-0"
    outs = client.generate("r1", SHORT, SamplingParams(max_tokens=2))
    return [(o.new_token_ids, o.finish_reason, o.error) async for o in outs]


async def test_prefill_worker_failing_before_its_first_token_hands_the_request_to_the_decode_worker() -> None:
    calls: list[tuple[str, str]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append((request.url.host, request.url.path))
        if request.url.path == "/worker/abort":
            return httpx.Response(200)
        if request.url.host == "prefill-0":
            raise httpx.ConnectError("connection refused")
        first = TokenChunk("r1", [7], " t7", prefill_path="local")
        return httpx.Response(200, content=_chunks(first, TokenChunk("r1", [8], " t8", True, "length")))

    client = _client(WholePolicy(256, 4), handler)
    paths = []
    client.on_first_chunk = lambda events: paths.append((events.decode_worker, events.prefill_path))
    assert await _generate(client) == [([7], None, None), ([8], "length", None)]
    assert ("prefill-0", "/worker/generate") in calls and ("decode-0", "/worker/generate") in calls
    assert ("prefill-0", "/worker/abort") in calls  # in case it holds the request after all
    assert paths == [("decode-0", "local")]
    assert client._streams == {"other": "decode-0"}
    await client.shutdown()


async def test_prefill_worker_failing_mid_stream_ends_the_request_with_a_clear_error() -> None:
    calls: list[tuple[str, str]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append((request.url.host, request.url.path))
        if request.url.path == "/worker/abort":
            return httpx.Response(200)
        assert request.url.host == "prefill-0"
        # One token, then the stream ends without a finished chunk: the worker died.
        return httpx.Response(200, content=_chunks(TokenChunk("r1", [7], " t7", prefill_path="whole")))

    client = _client(WholePolicy(256, 4), handler)
    got = await _generate(client)
    assert got[0] == ([7], None, None)
    ids, reason, error = got[1]
    assert ids == [] and reason == "error"
    assert error is not None and "prefill worker prefill-0 failed" in error
    assert ("decode-0", "/worker/generate") not in calls  # tokens were out: no second attempt
    assert ("prefill-0", "/worker/abort") in calls
    await client.shutdown()


@pytest.mark.parametrize("role", ["decode", "prefill"])
async def test_whole_requests_count_as_running_in_the_routers_stats(role: str) -> None:
    client = _client(WholePolicy(256, 4), _never)
    client._streams["r0"] = f"{role}-0"
    # Decode workers report their own running count (polled); whole requests are counted by stream.
    assert client.stats().num_running == (1 if role == "prefill" else 0)
    await client.shutdown()
