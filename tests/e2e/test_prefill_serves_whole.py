"""1P1D with --prefill-serves-whole, SmolLM2 on CPU: short prompts are shared between the decode
worker and the idle prefill worker, which serves them whole with transformers' greedy output; long
prompts still go remote; aborts and a dying prefill worker leave every block back at zero."""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import signal
import time
from collections.abc import Iterator

import httpx
import pytest
from transformers import PreTrainedModel

from pdserve.engine.loader import LoadedModel
from tests.e2e.deploy import Deployment, deployment, metric
from tests.e2e.test_disagg import FLAGS, THRESHOLD, TOPICS, complete, expected, long_prompt

NEW_TOKENS = 16
DECISIONS = "pdserve_disagg_decisions_total"


def short_prompt(loaded: LoadedModel, topic: str) -> list[int]:
    assert loaded.tokenizer is not None
    ids: list[int] = loaded.tokenizer.encode(f"A short fact about {topic}:")
    return ids


def decisions(dep: Deployment) -> dict[str, float]:
    m = dep.metrics()
    return {p: metric(m, DECISIONS, f'path="{p}"') for p in ("local", "remote", "fallback", "whole")}


def decode_tokens(dep: Deployment, worker: str) -> float:
    """Decode tokens the worker's engine computed (counters reach the router with its load polls)."""
    return sum(
        float(line.rpartition(" ")[2])
        for line in dep.metrics().splitlines()
        if line.startswith("pdserve_engine_step_tokens_total{")
        and f'worker="{worker}"' in line
        and 'kind="decode"' in line
    )


@pytest.fixture(scope="module")
def dep(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    with deployment(
        tmp_path_factory.mktemp("whole"), "--prefill", "1", "--decode", "1", "--transport", "shm",
        "--prefill-serves-whole", "--max-whole-per-prefill-worker", "4", *FLAGS,
    ) as d:  # fmt: skip
        yield d


def test_concurrent_short_requests_are_shared_with_the_prefill_worker(
    dep: Deployment, smollm2: LoadedModel, smollm2_hf: PreTrainedModel
) -> None:
    prompts = [short_prompt(smollm2, t) for t in TOPICS]
    want = [expected(smollm2_hf, smollm2, p, NEW_TOKENS) for p in prompts]
    d0, decoded0 = decisions(dep), decode_tokens(dep, "prefill-0")
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        got = list(pool.map(lambda p: complete(dep, p, NEW_TOKENS), prompts))
    assert got == want
    d1 = decisions(dep)
    delta = {p: d1[p] - d0[p] for p in d1}
    assert delta["whole"] >= 1 and delta["local"] >= 1, delta
    assert delta["whole"] + delta["local"] == len(prompts) and delta["remote"] == 0, delta
    # The prefill worker decoded: all but the first token of each whole request.
    want_decoded = (NEW_TOKENS - 1) * delta["whole"]
    deadline = time.monotonic() + 5
    while decode_tokens(dep, "prefill-0") - decoded0 < want_decoded and time.monotonic() < deadline:
        time.sleep(0.1)
    assert decode_tokens(dep, "prefill-0") - decoded0 == want_decoded
    usage = dep.wait_idle()
    assert set(usage) == {"prefill-0", "decode-0"}


@contextlib.contextmanager
def streaming(dep: Deployment, prompt: list[int]) -> Iterator[Iterator[str]]:
    """An open streamed completion whose first token has arrived; leaving closes the connection
    (the client is gone) unless the stream already ended."""
    body = {"model": "smollm2", "prompt": prompt, "max_tokens": 400, "temperature": 0, "ignore_eos": True}
    with (
        httpx.Client(base_url=dep.url, timeout=60) as client,
        client.stream("POST", "/v1/completions", json={**body, "stream": True}) as resp,
    ):
        assert resp.status_code == 200, resp.read()
        lines = (line for line in resp.iter_lines() if line.startswith("data: "))
        assert next(lines) != "data: [DONE]"
        yield lines


def test_long_prompts_go_remote_while_the_prefill_worker_serves_whole_requests(
    dep: Deployment, smollm2: LoadedModel, smollm2_hf: PreTrainedModel
) -> None:
    long = long_prompt(smollm2.tokenizer, "rivers", words=20)
    assert len(long) > THRESHOLD
    want = expected(smollm2_hf, smollm2, long, NEW_TOKENS)
    dep.wait_idle()
    d0 = decisions(dep)
    with streaming(dep, short_prompt(smollm2, "tea")), streaming(dep, short_prompt(smollm2, "ink")):
        # The first went to the decode worker (a tie), the second whole to the prefill worker.
        d1 = decisions(dep)
        assert (d1["local"] - d0["local"], d1["whole"] - d0["whole"]) == (1, 1)
        # A long prompt still has its prefill done by the prefill worker, beside the whole request.
        assert complete(dep, long, NEW_TOKENS) == want
        assert decisions(dep)["remote"] == d0["remote"] + 1
    # Both clients left mid-decode: every block of both workers is free again.
    assert set(dep.wait_idle()) == {"prefill-0", "decode-0"}


def test_prefill_worker_death_fails_its_whole_request_and_the_decode_worker_serves_on(
    dep: Deployment, smollm2: LoadedModel, smollm2_hf: PreTrainedModel
) -> None:
    prompt = short_prompt(smollm2, "clay")
    want = expected(smollm2_hf, smollm2, prompt, NEW_TOKENS)
    dep.wait_idle()
    d0 = decisions(dep)
    with streaming(dep, short_prompt(smollm2, "salt")):
        with streaming(dep, short_prompt(smollm2, "glass")) as whole:
            assert decisions(dep)["whole"] == d0["whole"] + 1
            os.kill(dep.worker_pid("prefill-0"), signal.SIGKILL)
            rest = list(whole)
        assert any("prefill worker prefill-0 failed" in line for line in rest), rest
        # Routed to the dead worker before the router notices, or to the decode worker after: the
        # client gets the same answer.
        assert complete(dep, prompt, NEW_TOKENS) == want
    deadline = time.monotonic() + 5
    while metric(dep.metrics(), "pdserve_worker_healthy", 'worker="prefill-0"') != 0:
        assert time.monotonic() < deadline, "the router still counts the dead prefill worker healthy"
        time.sleep(0.1)
    assert set(dep.wait_idle()) == {"decode-0"}
