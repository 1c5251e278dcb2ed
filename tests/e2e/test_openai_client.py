"""`pdserve serve` as a real subprocess with the real SmolLM2 model, driven by the official
`openai` client: chat and completions, streaming and not."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

if importlib.util.find_spec("pdserve.engine.async_llm") is None:
    pytest.skip("pdserve.engine.async_llm is not there yet: no engine to serve", allow_module_level=True)

STARTUP_DEADLINE_S = 300  # loading the model on a busy CPU can be slow
API_KEY = "e2e-test-key"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _wait_healthy(proc: subprocess.Popen[bytes], url: str, log_path: str) -> None:
    deadline = time.monotonic() + STARTUP_DEADLINE_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            with open(log_path) as f:
                pytest.fail(f"pdserve serve exited with {proc.returncode}:\n{f.read()[-4000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    pytest.fail(f"pdserve serve not healthy after {STARTUP_DEADLINE_S}s")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = _free_port()
    log_path = str(tmp_path_factory.mktemp("serve") / "serve.log")
    cmd = [
        sys.executable, "-m", "pdserve.cli", "serve",
        "--model", "smollm2",
        "--port", str(port),
        "--max-model-len", "1024",
        "--api-key", API_KEY,
        "--log-level", "warning",
    ]  # fmt: skip
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
        )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(proc, url, log_path)
        yield url
    finally:
        proc.terminate()  # SIGTERM: the server shuts the engine down and exits
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def client(server: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0, timeout=120) as c:
        yield c


def _model(client: openai.OpenAI) -> str:
    [model] = client.models.list().data
    return model.id


def test_chat(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=_model(client),
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=8,
        temperature=0,
    )
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert r.usage is not None and r.usage.completion_tokens <= 8 and r.usage.prompt_tokens > 5


def test_chat_stream(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=_model(client),
        messages=[{"role": "user", "content": "Count to five."}],
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish and finish[-1] in ("stop", "length")
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens <= 8


def _complete(client: openai.OpenAI, prompt: str) -> str:
    r = client.completions.create(model=_model(client), prompt=prompt, max_tokens=6, temperature=0)
    assert r.usage is not None and r.usage.completion_tokens == 6
    return r.choices[0].text


def test_completion_greedy_is_deterministic(client: openai.OpenAI) -> None:
    a = _complete(client, "The quick brown fox")
    assert a and a == _complete(client, "The quick brown fox")


def test_completion_stream_matches_non_stream(client: openai.OpenAI) -> None:
    whole = _complete(client, "Once upon a time")
    stream = client.completions.create(
        model=_model(client), prompt="Once upon a time", max_tokens=6, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in stream if c.choices) == whole


def test_errors_reach_the_client(client: openai.OpenAI, server: str) -> None:
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="x", max_tokens=1)
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.completions.create(model=_model(client), prompt="x", max_tokens=5000)
    with (
        openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0) as bad,
        pytest.raises(openai.AuthenticationError),
    ):
        bad.models.list()
