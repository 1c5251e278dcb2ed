"""A remote prefill's first token reaches the client from the prefill worker, before the KV has
moved (router/direct_first_token.py): with every KV chunk held back 0.1 s on the prefill side
(30 layers: 3 s), the first streamed chunk comes long before the second, and the whole stream is
still transformers' greedy output. A first
token the decode worker disagrees with (fault injection) is kept: the rest is served as the
continuation of prompt + that token."""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from transformers import PreTrainedModel

from pdserve.engine.loader import LoadedModel
from tests.e2e.deploy import Deployment, deployment, metric
from tests.e2e.test_disagg import FLAGS, NEW_TOKENS, complete, long_prompt
from tests.oracle import hf_greedy

pytestmark = pytest.mark.slow
KV_DELAY_S = 0.1  # before each of the prompt's 30 layer chunks: 3 s in all


def stream(dep: Deployment, prompt: list[int]) -> tuple[list[tuple[float, str]], dict[str, object]]:
    """(seconds since the request, text) of each streamed chunk with text, and the usage."""
    body = {
        "model": "smollm2", "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0,
        "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
    }  # fmt: skip
    chunks: list[tuple[float, str]] = []
    usage: dict[str, object] = {}
    t0 = time.monotonic()
    with (
        httpx.Client(base_url=dep.url, timeout=60) as client,
        client.stream("POST", "/v1/completions", json=body) as resp,
    ):
        assert resp.status_code == 200, resp.read()
        for line in resp.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[len("data: ") :])
            if event.get("usage"):
                usage = event["usage"]
            for choice in event["choices"]:
                if choice.get("text"):
                    chunks.append((time.monotonic() - t0, choice["text"]))
    return chunks, usage


@contextlib.contextmanager
def faulty(tmp_path: Path, **faults: str) -> Iterator[Deployment]:
    """A 1P1D tcp deployment whose processes see these fault-injection variables."""
    os.environ.update(faults)
    try:
        with deployment(tmp_path, "--prefill", "1", "--decode", "1", "--transport", "tcp", *FLAGS) as dep:
            for name in faults:
                os.environ.pop(name)  # the processes have their copy
            yield dep
    finally:
        for name in faults:
            os.environ.pop(name, None)


@pytest.fixture
def slow_kv_dep(tmp_path: Path) -> Iterator[Deployment]:
    with faulty(tmp_path, PDSERVE_FAULT_KV_DELAY_S=str(KV_DELAY_S)) as dep:
        yield dep


def test_first_token_reaches_the_client_before_the_kv_moves(
    slow_kv_dep: Deployment, smollm2: LoadedModel, smollm2_hf: PreTrainedModel
) -> None:
    tok = smollm2.tokenizer
    assert tok is not None
    prompt = long_prompt(tok, "orchards", words=16)
    m0 = slow_kv_dep.metrics()
    chunks, usage = stream(slow_kv_dep, prompt)
    m1 = slow_kv_dep.metrics()
    ids = hf_greedy(smollm2_hf, prompt, NEW_TOKENS)
    assert "".join(text for _, text in chunks) == tok.decode(ids, skip_special_tokens=True)
    # The first token came while the KV was still on its way; the second needed all of it.
    first_s, second_s = chunks[0][0], chunks[1][0]
    assert second_s - first_s > 20 * KV_DELAY_S, chunks[:3]
    assert chunks[0][1] == tok.decode(ids[:1], skip_special_tokens=True)
    assert usage["prompt_tokens"] == len(prompt) and usage["completion_tokens"] == NEW_TOKENS
    for name, labels in (
        ("pdserve_disagg_decisions_total", 'path="remote"'),
        ("pdserve_first_token_source_total", 'source="prefill_worker"'),
    ):
        assert metric(m1, name, labels) == metric(m0, name, labels) + 1, name
    assert metric(m1, "pdserve_first_token_disagreements_total") == 0
    assert set(slow_kv_dep.wait_idle()) == {"prefill-0", "decode-0"}


@pytest.fixture
def shifted_dep(tmp_path: Path) -> Iterator[Deployment]:
    # The KV held back as well, so the posted token surely comes first.
    with faulty(
        tmp_path, PDSERVE_FAULT_FIRST_TOKEN_SHIFT="1", PDSERVE_FAULT_KV_DELAY_S=str(KV_DELAY_S)
    ) as dep:
        yield dep


def test_a_disagreeing_decode_worker_continues_from_the_streamed_token(
    shifted_dep: Deployment, smollm2: LoadedModel, smollm2_hf: PreTrainedModel
) -> None:
    tok = smollm2.tokenizer
    assert tok is not None
    prompt = long_prompt(tok, "observatories", words=16)
    streamed = hf_greedy(smollm2_hf, prompt, 1)[0] + 1  # what the prefill worker posts
    rest = hf_greedy(smollm2_hf, [*prompt, streamed], NEW_TOKENS - 1)
    m0 = shifted_dep.metrics()
    chunks, usage = stream(shifted_dep, prompt)
    m1 = shifted_dep.metrics()
    assert "".join(text for _, text in chunks) == tok.decode([streamed, *rest], skip_special_tokens=True)
    assert usage["prompt_tokens"] == len(prompt) and usage["completion_tokens"] == NEW_TOKENS
    assert "continuing from the streamed one" in shifted_dep.logs()
    disagreements = "pdserve_first_token_disagreements_total"
    assert metric(m1, disagreements) == metric(m0, disagreements) + 1
    # A request whose first token the decode worker streams itself is unaffected (short prompt).
    short = tok.encode("The three primary colours are")
    assert complete(shifted_dep, short) == tok.decode(hf_greedy(smollm2_hf, short, NEW_TOKENS))
    assert set(shifted_dep.wait_idle()) == {"prefill-0", "decode-0"}
