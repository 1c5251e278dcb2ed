"""The OpenAI-compatible HTTP app against a fake engine: shapes, errors, metrics, aborts."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from pdserve.cli import build_parser, serve_configs
from pdserve.cli_args import add_dataclass_args
from pdserve.config import ServerConfig
from pdserve.router.app import build_app
from tests.unit.fake_engine import REPLY, FakeEngine

MODEL = FakeEngine.model_name


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@contextlib.asynccontextmanager
async def make_client(engine: FakeEngine, **cfg: Any) -> AsyncIterator[httpx.AsyncClient]:
    app = build_app(engine, ServerConfig(**cfg))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        yield client


@pytest.fixture
async def client(engine: FakeEngine) -> AsyncIterator[httpx.AsyncClient]:
    async with make_client(engine) as c:
        yield c


def sse_events(body: str) -> list[Any]:
    """Parsed `data:` payloads of an SSE body; '[DONE]' stays a string."""
    events: list[Any] = []
    for block in body.split("\n\n"):
        if not block:
            continue
        assert block.startswith("data: "), block
        payload = block[len("data: ") :]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def assert_error(
    r: httpx.Response, status: int, *, code: str | None = None, contains: str = ""
) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err: dict[str, Any] = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert contains in err["message"]
    if code is not None:
        assert err["code"] == code
    return err


def prompt_len(engine: FakeEngine, text: str) -> int:
    return len(engine.tokenizer.encode(text))


# ---- models, health ---------------------------------------------------------------------------


async def test_models_list(client: httpx.AsyncClient) -> None:
    r = await client.get("/v1/models")
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == [MODEL]
    assert body["data"][0]["object"] == "model"
    assert body["data"][0]["max_model_len"] == 256


async def test_health(client: httpx.AsyncClient) -> None:
    r = await client.get("/health")
    assert r.status_code == 200


# ---- completions ------------------------------------------------------------------------------


async def test_completion_length_and_usage(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "Say hi", "max_tokens": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion"
    assert body["id"].startswith("cmpl-") and re.fullmatch(r"cmpl-[0-9a-f]{32}", body["id"])
    assert r.headers["x-request-id"] == body["id"]
    assert body["model"] == MODEL
    [choice] = body["choices"]
    assert choice == {
        "index": 0,
        "text": REPLY[:5],
        "logprobs": None,
        "finish_reason": "length",
        "stop_reason": None,
    }
    p = prompt_len(engine, "Say hi")
    assert p == len("Say hi") + 1  # bytes plus BOS
    assert body["usage"] == {
        "prompt_tokens": p,
        "completion_tokens": 5,
        "total_tokens": p + 5,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    [call] = engine.calls
    assert call.request_id == body["id"]
    assert call.params.max_tokens == 5 and call.params.n == 1


async def test_completion_default_max_tokens_is_16(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    r = await client.post("/v1/completions", json={"prompt": "x"})
    assert r.json()["usage"]["completion_tokens"] == 16
    assert engine.calls[0].params.max_tokens == 16


async def test_completion_eos_and_cached_tokens(client: httpx.AsyncClient) -> None:
    req = {"model": MODEL, "prompt": "The same prompt again", "max_tokens": 100}
    first = (await client.post("/v1/completions", json=req)).json()
    assert first["choices"][0]["text"] == REPLY
    assert first["choices"][0]["finish_reason"] == "stop"
    assert first["usage"]["completion_tokens"] == len(REPLY) + 1  # EOS counts
    second = (await client.post("/v1/completions", json=req)).json()
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] > 0


async def test_completion_stop_string_and_token(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    r = await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 50, "stop": "there"})
    choice = r.json()["choices"][0]
    assert (choice["text"], choice["finish_reason"], choice["stop_reason"]) == ("Hello ", "stop", "there")
    r = await client.post(
        "/v1/completions",
        json={"prompt": "x", "max_tokens": 50, "stop": ["!"], "include_stop_str_in_output": True},
    )
    assert r.json()["choices"][0]["text"] == "Hello there!"
    bang = engine.tokenizer.encode("!", add_special_tokens=False)[0]
    r = await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 50, "stop_token_ids": [bang]})
    choice = r.json()["choices"][0]
    assert (choice["finish_reason"], choice["stop_reason"]) == ("stop", bang)


async def test_completion_token_id_and_batch_prompts(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    r = await client.post("/v1/completions", json={"prompt": [5, 6, 7], "max_tokens": 2})
    assert r.json()["usage"]["prompt_tokens"] == 3
    assert engine.calls[-1].prompt_token_ids == [5, 6, 7]
    r = await client.post("/v1/completions", json={"prompt": ["a", "bb"], "max_tokens": 2, "n": 2})
    body = r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert body["usage"]["prompt_tokens"] == 2 + 3
    assert body["usage"]["completion_tokens"] == 8
    assert [len(c.prompt_token_ids) for c in engine.calls[-4:]] == [2, 2, 3, 3]


async def test_completion_echo(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/completions", json={"prompt": "Q: ", "max_tokens": 3, "echo": True})
    assert r.json()["choices"][0]["text"] == "Q: " + REPLY[:3]


async def test_completion_stream_with_usage(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    r = await client.post(
        "/v1/completions",
        json={"prompt": "Say hi", "max_tokens": 4, "stream": True, "stream_options": {"include_usage": True}},
    )
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)
    *token_chunks, final, usage = chunks
    assert "".join(c["choices"][0]["text"] for c in token_chunks) == REPLY[:4]
    assert all("usage" not in c for c in token_chunks)
    assert final["choices"][0]["finish_reason"] == "length"
    assert usage["choices"] == []
    p = prompt_len(engine, "Say hi")
    assert usage["usage"]["prompt_tokens"] == p
    assert usage["usage"]["completion_tokens"] == 4
    assert usage["usage"]["total_tokens"] == p + 4


async def test_completion_stream_without_usage(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, "stream": True})
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    assert all(e["choices"] for e in events[:-1])


async def test_completion_logprobs_shape(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 4, "logprobs": 2})
    lp = r.json()["choices"][0]["logprobs"]
    assert lp["tokens"] == list(REPLY[:4])
    assert len(lp["token_logprobs"]) == 4 and all(v < 0 for v in lp["token_logprobs"])
    assert [len(d) for d in lp["top_logprobs"]] == [2, 2, 2, 2]
    assert lp["top_logprobs"][0]["H"] == lp["token_logprobs"][0]
    assert lp["text_offset"] == [0, 1, 2, 3]


async def test_completion_stream_logprobs_offsets(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/v1/completions", json={"prompt": "x", "max_tokens": 3, "logprobs": 0, "stream": True}
    )
    chunks = [e for e in sse_events(r.text)[:-1] if e["choices"][0]["logprobs"]]
    offsets = [o for c in chunks for o in c["choices"][0]["logprobs"]["text_offset"]]
    assert offsets == [0, 1, 2]


async def test_n2_seeds_ids_and_merge(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    r = await client.post(
        "/v1/completions", json={"prompt": "x", "max_tokens": 40, "n": 2, "seed": 7, "temperature": 0.8}
    )
    body = r.json()
    assert [c.request_id for c in engine.calls] == [f"{body['id']}-0", f"{body['id']}-1"]
    assert [c.params.seed for c in engine.calls] == [7, 8]
    assert all(c.params.n == 1 for c in engine.calls)
    texts = {c["index"]: c["text"] for c in body["choices"]}
    assert texts == {0: f"[7] {REPLY}", 1: f"[8] {REPLY}"}
    assert body["usage"]["prompt_tokens"] == 2  # the prompt counts once


async def test_n2_stream(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "n": 2, "stream": True},
    )
    chunks = sse_events(r.text)[:-1]
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == index]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert "".join(c["delta"].get("content", "") for c in mine) == REPLY[:3]
        assert mine[-1]["finish_reason"] == "length" and mine[-1]["delta"] == {}


# ---- chat -------------------------------------------------------------------------------------


async def test_chat_basic_and_single_bos(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    r = await client.post(
        "/v1/chat/completions", json={"model": MODEL, "messages": messages, "max_tokens": 5}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    [choice] = body["choices"]
    assert choice["message"] == {"role": "assistant", "content": REPLY[:5]}
    assert choice["finish_reason"] == "length"
    tok = engine.tokenizer
    prompt = engine.calls[0].prompt_token_ids
    assert prompt.count(tok.bos_token_id) == 1 and prompt[0] == tok.bos_token_id
    expected = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert tok.decode(prompt) == expected
    assert body["usage"]["prompt_tokens"] == len(prompt)
    assert body["usage"]["completion_tokens"] == 5


async def test_chat_content_parts_and_developer_role(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    messages = [
        {"role": "developer", "content": "sys"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
    ]
    r = await client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 1})
    assert r.status_code == 200, r.text
    text = engine.tokenizer.decode(engine.calls[0].prompt_token_ids)
    assert text == "<s><|system|>sys<|end|><|user|>a\nb<|end|><|assistant|>"


async def test_chat_max_tokens_defaults_to_room_left(engine: FakeEngine) -> None:
    async with make_client(FakeEngine(max_model_len=40)) as c:
        r = await c.post(
            "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "ignore_eos": True}
        )
        assert r.status_code == 200
        body = r.json()
        p = body["usage"]["prompt_tokens"]
        assert body["usage"]["completion_tokens"] == 40 - p
        assert body["choices"][0]["finish_reason"] == "length"


async def test_chat_max_completion_tokens_wins(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    await client.post(
        "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 9, "max_completion_tokens": 3},
    )
    assert engine.calls[0].params.max_tokens == 3


async def test_chat_stream_with_usage(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/v1/chat/completions",
        json={
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 4,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    first, *content, final, usage = events[:-1]
    assert first["object"] == "chat.completion.chunk"
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"]["content"] for c in content) == REPLY[:4]
    assert final["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "length",
        "stop_reason": None,
    }
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 4


async def test_chat_logprobs_shape(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/v1/chat/completions",
        json={
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 3,
            "logprobs": True,
            "top_logprobs": 2,
        },
    )
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert [c["token"] for c in content] == list(REPLY[:3])
    assert content[0]["bytes"] == list(b"H")
    assert content[0]["logprob"] < 0
    assert len(content[0]["top_logprobs"]) == 2
    assert set(content[0]["top_logprobs"][0]) == {"token", "logprob", "bytes"}
    r = await client.post(
        "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    )
    assert r.json()["choices"][0]["logprobs"] is None


# ---- errors -----------------------------------------------------------------------------------


async def test_context_length_errors(engine: FakeEngine) -> None:
    async with make_client(FakeEngine(max_model_len=32)) as c:
        prompt = "x" * 20  # 21 tokens with BOS
        r = await c.post("/v1/completions", json={"prompt": prompt, "max_tokens": 20})
        err = assert_error(r, 400, code="context_length_exceeded")
        assert "maximum context length is 32 tokens" in err["message"]
        assert "41 tokens (21 in the prompt, 20 in the completion)" in err["message"]
        r = await c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "y" * 40}]})
        err = assert_error(r, 400, code="context_length_exceeded", contains="32")
        assert "messages" in err["message"]
        r = await c.post("/v1/completions", json={"prompt": prompt, "max_tokens": 11})
        assert r.status_code == 200


@pytest.mark.parametrize(
    "body, contains",
    [
        ({"prompt": "x", "temperature": -1}, "temperature"),
        ({"prompt": "x", "top_p": 2}, "top_p"),
        ({"prompt": "x", "n": 0}, "n"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "x", "logprobs": 21}, "logprobs"),
        ({"prompt": "x", "presence_penalty": 0.5}, "presence_penalty is not supported"),
        ({"prompt": "x", "frequency_penalty": 1}, "frequency_penalty is not supported"),
        ({"prompt": "x", "min_tokens": 20, "max_tokens": 5}, "min_tokens"),
        ({"prompt": "x", "echo": True, "logprobs": 1}, "echo"),
        ({"prompt": ""}, "empty"),
        ({"prompt": []}, "empty"),
        ({"prompt": [1, 99999]}, "out of range"),
        ({"max_tokens": 3}, "prompt"),
        ({"prompt": "x", "stop": [""]}, "stop"),
    ],
)
async def test_completion_bad_params(client: httpx.AsyncClient, body: dict[str, Any], contains: str) -> None:
    err = assert_error(await client.post("/v1/completions", json=body), 400, contains=contains)
    assert err["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    "body, contains",
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "role"),
        ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
        ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools"),
    ],
)
async def test_chat_bad_params(client: httpx.AsyncClient, body: dict[str, Any], contains: str) -> None:
    assert_error(await client.post("/v1/chat/completions", json=body), 400, contains=contains)


async def test_malformed_json_and_unknown_fields(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/v1/completions", content=b'{"prompt": "x",', headers={"content-type": "application/json"}
    )
    assert_error(r, 400, contains="JSON")
    r = await client.post("/v1/completions", content=b"[1, 2]")
    assert_error(r, 400)
    r = await client.post(
        "/v1/completions", json={"prompt": "x", "max_tokens": 1, "some_future_field": {"a": 1}}
    )
    assert r.status_code == 200


async def test_unknown_model_and_route(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/completions", json={"model": "gpt-9", "prompt": "x"})
    err = assert_error(r, 404, code="model_not_found", contains="gpt-9")
    assert err["param"] == "model"
    assert_error(await client.get("/v1/nothing"), 404)


async def test_api_key(engine: FakeEngine) -> None:
    async with make_client(engine, api_key="sekret") as c:
        body = {"prompt": "x", "max_tokens": 1}
        assert_error(await c.post("/v1/completions", json=body), 401, code="invalid_api_key")
        assert_error(
            await c.get("/v1/models", headers={"Authorization": "Bearer nope"}), 401, contains="Incorrect"
        )
        r = await c.post("/v1/completions", json=body, headers={"Authorization": "Bearer sekret"})
        assert r.status_code == 200
        # Health and metrics stay open for probes and scrapers.
        assert (await c.get("/health")).status_code == 200
        assert (await c.get("/metrics")).status_code == 200
    async with make_client(engine) as c:  # no key configured: no header needed
        assert (await c.get("/v1/models")).status_code == 200


async def test_body_too_large(engine: FakeEngine) -> None:
    async with make_client(engine, max_body_bytes=1024) as c:
        big = json.dumps({"prompt": "x" * 2000}).encode()
        assert_error(await c.post("/v1/completions", content=big), 413, code="request_too_large")

        async def chunked() -> AsyncIterator[bytes]:
            for _ in range(8):  # no Content-Length: the received bytes are counted instead
                yield b" " * 512

        r = await c.post("/v1/completions", content=chunked())
        assert "content-length" not in r.request.headers
        assert_error(r, 413, code="request_too_large")
        assert engine.calls == []
        r = await c.post("/v1/completions", json={"prompt": "x" * 200, "max_tokens": 1})
        assert r.status_code == 200


@pytest.mark.parametrize("stream", [False, True])
async def test_engine_failures(stream: bool) -> None:
    cases: list[tuple[FakeEngine, int, str]] = [
        (FakeEngine(fail="error", fail_after=2), 500, "engine error"),
        (FakeEngine(fail="raise"), 500, "exploded"),
        (FakeEngine(fail="abort", fail_after=1), 503, "aborted"),
        (FakeEngine(fail="value"), 400, "rejects"),
    ]
    for engine, status, contains in cases:
        async with make_client(engine) as c:
            r = await c.post("/v1/completions", json={"prompt": "x", "max_tokens": 5, "stream": stream})
            if not stream:
                assert_error(r, status, contains=contains)
                continue
            assert r.status_code == 200  # the headers went out before the failure
            events = sse_events(r.text)
            assert events[-1] == "[DONE]"
            assert contains in events[-2]["error"]["message"]


# ---- metrics ----------------------------------------------------------------------------------


def metric_value(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in metrics")


async def test_metrics(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    before = (await client.get("/metrics")).text
    assert engine.stats_calls >= 1  # engine gauges are read at scrape time
    for name in (
        "pdserve_num_requests_running",
        "pdserve_num_requests_waiting",
        "pdserve_kv_cache_usage_ratio",
        "pdserve_prefix_cache_hit_tokens_total",
        "pdserve_num_preemptions_total",
        "pdserve_prompt_tokens_total",
        "pdserve_generation_tokens_total",
        "pdserve_time_to_first_token_seconds_bucket",
        "pdserve_inter_token_latency_seconds_bucket",
        "pdserve_e2e_request_latency_seconds_bucket",
    ):
        assert name in before
    assert metric_value(before, "pdserve_kv_cache_usage_ratio") == pytest.approx(0.1)
    assert metric_value(before, "pdserve_num_preemptions_total") == 3

    await client.post("/v1/completions", json={"prompt": "abc", "max_tokens": 4})
    await client.post("/v1/completions", json={"prompt": "x", "temperature": -1})
    after = (await client.get("/metrics")).text
    assert 'pdserve_requests_total{endpoint="/v1/completions",status="200"} 1.0' in after
    assert 'pdserve_requests_total{endpoint="/v1/completions",status="400"} 1.0' in after
    assert metric_value(after, "pdserve_generation_tokens_total") == 4
    assert metric_value(after, "pdserve_prompt_tokens_total") == 4
    assert metric_value(after, "pdserve_time_to_first_token_seconds_count") == 1
    assert metric_value(after, "pdserve_inter_token_latency_seconds_count") == 3
    assert metric_value(after, "pdserve_e2e_request_latency_seconds_count") == 1


async def test_two_apps_in_one_process(engine: FakeEngine) -> None:
    async with make_client(engine) as a, make_client(FakeEngine()) as b:
        await a.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})
        assert metric_value((await b.get("/metrics")).text, "pdserve_generation_tokens_total") == 0


# ---- client disconnects (real server: the in-memory transport cannot hang up) ----------------


@contextlib.asynccontextmanager
async def serve(app: FastAPI) -> AsyncIterator[str]:
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off")
    config.timeout_graceful_shutdown = 2
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    deadline = time.monotonic() + 10
    while not server.started:
        assert not task.done() and time.monotonic() < deadline, "uvicorn did not start"
        await asyncio.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)


async def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


SLOW_REQUEST = {"prompt": "x", "max_tokens": 200, "ignore_eos": True}  # 200 tokens x 50 ms = 10 s


@pytest.mark.timeout(30)
async def test_stream_disconnect_aborts() -> None:
    engine = FakeEngine(token_delay=0.05)
    async with serve(build_app(engine, ServerConfig())) as url, httpx.AsyncClient(base_url=url) as c:
        async with c.stream("POST", "/v1/completions", json={**SLOW_REQUEST, "stream": True}) as r:
            request_id = r.headers["x-request-id"]
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    break  # one token is enough: hang up
        await wait_until(lambda: request_id in engine.aborted)
        await wait_until(lambda: not engine.running)
        assert request_id in engine.closed_early


@pytest.mark.timeout(30)
async def test_non_streaming_disconnect_aborts() -> None:
    engine = FakeEngine(token_delay=0.05)
    async with serve(build_app(engine, ServerConfig())) as url:
        async with httpx.AsyncClient(base_url=url, timeout=0.5) as c:
            with pytest.raises(httpx.ReadTimeout):
                await c.post(
                    "/v1/chat/completions",
                    json={**SLOW_REQUEST, "messages": [{"role": "user", "content": "x"}], "n": 2},
                )
        await wait_until(lambda: len(engine.aborted) == 2)
        await wait_until(lambda: not engine.running)
        assert sorted(engine.aborted) == sorted(call.request_id for call in engine.calls)


# ---- CLI flags --------------------------------------------------------------------------------


def test_cli_flags_from_dataclasses() -> None:
    parser = build_parser()
    args = parser.parse_args(
        [
            "serve",
            "--max-model-len",
            "512",
            "--no-enable-prefix-caching",
            "--port",
            "9001",
            "--attention-backend",
            "torch",
        ]
    )
    engine_cfg, server_cfg = serve_configs(args)
    assert engine_cfg.model.max_model_len == 512 and engine_cfg.model.model == "smollm2"
    assert engine_cfg.cache.enable_prefix_caching is False
    assert engine_cfg.scheduler.max_num_seqs is None  # set by the worker's device (test_scheduler.py)
    assert engine_cfg.attention_backend == "torch"
    assert (server_cfg.host, server_cfg.port, server_cfg.api_key) == ("127.0.0.1", 9001, None)
    defaults = serve_configs(parser.parse_args(["serve"]))[0]
    assert defaults.model.max_model_len is None and defaults.cache.enable_prefix_caching is True


def test_cli_invalid_config_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    args = parser.parse_args(["serve", "--block-size", "3"])
    with pytest.raises(SystemExit) as exc:
        args.handler(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "block_size must be a power of two" in err and "pdserve serve" in err
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--port", "not-a-number"])


def test_cli_args_helper_rejects_unknown_types() -> None:
    from dataclasses import dataclass, field

    @dataclass
    class Odd:
        items: list[int] = field(default_factory=list)

    with pytest.raises(TypeError, match=r"Odd\.items"):
        add_dataclass_args(argparse.ArgumentParser(), Odd)
