"""Router + prefill + decode workers as real processes, SmolLM2 on CPU: the remote path is taken
when it should be, moves exactly the KV it should, gives transformers' greedy output, and
survives aborts and a dying prefill worker with every block back where it started."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from transformers import PreTrainedModel

from pdserve.engine.loader import LoadedModel
from tests.e2e.deploy import Deployment, deployment, metric, shm_segments
from tests.oracle import hf_greedy

NEW_TOKENS = 24
# SmolLM2-135M in fp32: 2 (K and V) x 30 layers x 3 KV heads x 64 dims x 4 bytes per token.
KV_BYTES_PER_TOKEN = 2 * 30 * 3 * 64 * 4
THRESHOLD = 128
FLAGS = ("--remote-prefill-threshold", str(THRESHOLD), "--max-model-len", "2048", "--kv-timeout-s", "20")

TOPICS = ["rivers", "mountains", "libraries", "bridges", "orchards", "harbours", "observatories", "markets"]


def long_prompt(tok: object, topic: str, words: int = 60) -> list[int]:
    text = f"Notes on {topic}. " + " ".join(
        f"{topic} item {i} is described here in detail." for i in range(words)
    )
    ids: list[int] = tok.encode(text)  # type: ignore[attr-defined]
    return ids


def complete(dep: Deployment, prompt: list[int], max_tokens: int = NEW_TOKENS) -> str:
    body = {
        "model": "smollm2",
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
    }
    resp = dep.http.post("/v1/completions", json=body)
    assert resp.status_code == 200, resp.text
    return str(resp.json()["choices"][0]["text"])


def expected(hf: PreTrainedModel, loaded: LoadedModel, prompt: list[int], n: int = NEW_TOKENS) -> str:
    assert loaded.tokenizer is not None
    return str(loaded.tokenizer.decode(hf_greedy(hf, prompt, n), skip_special_tokens=True))


@pytest.fixture(scope="module")
def shm_dep(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    with deployment(
        tmp_path_factory.mktemp("shm"), "--prefill", "1", "--decode", "1", "--transport", "shm", *FLAGS
    ) as dep:
        tag = dep.shm_tag()
        assert shm_segments(tag), "the decode worker's KV cache is not in shared memory"
        yield dep
    # Only this deployment's segments: other deployments may run beside this test.
    assert not shm_segments(tag + "_"), "shared-memory segments left behind"


def test_remote_prefill_matches_transformers_and_moves_the_whole_kv(
    shm_dep: Deployment, smollm2: LoadedModel, smollm2_hf: PreTrainedModel
) -> None:
    prompt = long_prompt(smollm2.tokenizer, "rivers")
    m0 = shm_dep.metrics()
    text = complete(shm_dep, prompt)
    m1 = shm_dep.metrics()
    assert (
        metric(m1, "pdserve_disagg_decisions_total", 'path="remote"')
        == metric(m0, "pdserve_disagg_decisions_total", 'path="remote"') + 1
    )
    moved = metric(m1, "pdserve_kv_transfer_bytes_total") - metric(m0, "pdserve_kv_transfer_bytes_total")
    assert moved == len(prompt) * KV_BYTES_PER_TOKEN
    assert (
        metric(m1, "pdserve_kv_transfer_seconds_count") == metric(m0, "pdserve_kv_transfer_seconds_count") + 1
    )
    assert text == expected(smollm2_hf, smollm2, prompt)


def test_engine_counters_show_which_worker_computed_what(shm_dep: Deployment, smollm2: LoadedModel) -> None:
    prompt = long_prompt(smollm2.tokenizer, "harbours")

    def tokens(text: str, role: str, kind: str) -> float:
        """Tokens of `kind` computed by the workers whose id starts with `role`."""
        return sum(
            float(line.rpartition(" ")[2])
            for line in text.splitlines()
            if line.startswith("pdserve_engine_step_tokens_total{")
            and f'worker="{role}-' in line
            and f'kind="{kind}"' in line
        )

    m0 = shm_dep.metrics()
    complete(shm_dep, prompt)
    # Worker counters reach the router with its load polls: wait for the next ones.
    deadline = time.monotonic() + 5
    while True:
        m1 = shm_dep.metrics()
        done = tokens(m1, "decode", "decode") - tokens(m0, "decode", "decode") >= NEW_TOKENS - 1
        if done or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    # The prefill worker computed the whole prompt; the decode worker one token per output after
    # the first (which the prefill worker sampled) and no prompt token.
    assert tokens(m1, "prefill", "prefill") - tokens(m0, "prefill", "prefill") == len(prompt)
    assert tokens(m1, "decode", "decode") - tokens(m0, "decode", "decode") == NEW_TOKENS - 1
    assert tokens(m1, "decode", "prefill") == tokens(m0, "decode", "prefill")
    assert metric(m1, "pdserve_engine_thread_seconds_total", 'phase="forward"') > metric(
        m0, "pdserve_engine_thread_seconds_total", 'phase="forward"'
    )


def test_short_prompt_is_prefilled_locally(
    shm_dep: Deployment, smollm2: LoadedModel, smollm2_hf: PreTrainedModel
) -> None:
    prompt = smollm2.tokenizer.encode("The three primary colours are")  # type: ignore[union-attr]
    m0 = shm_dep.metrics()
    text = complete(shm_dep, prompt)
    m1 = shm_dep.metrics()
    assert (
        metric(m1, "pdserve_disagg_decisions_total", 'path="local"')
        == metric(m0, "pdserve_disagg_decisions_total", 'path="local"') + 1
    )
    assert metric(m1, "pdserve_kv_transfer_bytes_total") == metric(m0, "pdserve_kv_transfer_bytes_total")
    assert text == expected(smollm2_hf, smollm2, prompt)


def test_prefix_cached_on_decode_skips_remote_prefill(
    shm_dep: Deployment, smollm2: LoadedModel, smollm2_hf: PreTrainedModel
) -> None:
    base = long_prompt(smollm2.tokenizer, "bridges")
    complete(shm_dep, base, max_tokens=2)  # remote: the decode worker now caches the prompt's blocks
    follow_up = base + smollm2.tokenizer.encode(" Summarise them.")  # type: ignore[union-attr]
    m0 = shm_dep.metrics()
    text = complete(shm_dep, follow_up)
    m1 = shm_dep.metrics()
    assert metric(m1, "pdserve_disagg_decisions_total", 'path="remote"') == metric(
        m0, "pdserve_disagg_decisions_total", 'path="remote"'
    )
    assert (
        metric(m1, "pdserve_disagg_decisions_total", 'path="local"')
        == metric(m0, "pdserve_disagg_decisions_total", 'path="local"') + 1
    )
    assert text == expected(smollm2_hf, smollm2, follow_up)


def _stream_then_close(
    dep: Deployment, prompt: list[int], *, after_s: float | None = None, after_chunks: int | None = None
) -> None:
    body = {
        "model": "smollm2",
        "prompt": prompt,
        "max_tokens": 200,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    t0 = time.monotonic()
    with (
        httpx.Client(base_url=dep.url, timeout=60) as client,
        client.stream("POST", "/v1/completions", json=body) as resp,
    ):
        assert resp.status_code == 200, resp.read()
        chunks = 0
        for line in resp.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks += 1
            if after_chunks is not None and chunks >= after_chunks:
                break
            if after_s is not None and time.monotonic() - t0 >= after_s:
                break
    # Leaving the block closes the connection: the client is gone.


def test_aborts_mid_prefill_and_mid_decode_free_every_block(
    shm_dep: Deployment, smollm2: LoadedModel
) -> None:
    shm_dep.wait_idle()
    _stream_then_close(shm_dep, long_prompt(smollm2.tokenizer, "orchards", 120), after_s=0.05)  # mid-prefill
    shm_dep.wait_idle()
    _stream_then_close(shm_dep, long_prompt(smollm2.tokenizer, "harbours"), after_chunks=3)  # mid-decode
    usage = shm_dep.wait_idle()
    assert set(usage) == {"prefill-0", "decode-0"}


@pytest.fixture(scope="module")
def tcp_dep(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    # Slow every KV chunk down (fault injection) so the transfer window is wide enough to hit.
    os.environ["PDSERVE_FAULT_KV_DELAY_S"] = "0.03"
    try:
        # Decode steps launched ahead (the GPU default) in these workers: aborts, fallbacks and
        # remote KV arriving must work with a step always in flight.
        with deployment(
            tmp_path_factory.mktemp("tcp"), "--prefill", "1", "--decode", "1", "--transport", "tcp",
            "--async-decode", *FLAGS,
        ) as dep:  # fmt: skip
            yield dep
    finally:
        del os.environ["PDSERVE_FAULT_KV_DELAY_S"]


def test_tcp_remote_prefill(tcp_dep: Deployment, smollm2: LoadedModel, smollm2_hf: PreTrainedModel) -> None:
    prompt = long_prompt(smollm2.tokenizer, "libraries")
    m0 = tcp_dep.metrics()
    text = complete(tcp_dep, prompt)
    m1 = tcp_dep.metrics()
    assert (
        metric(m1, "pdserve_kv_transfer_bytes_total") - metric(m0, "pdserve_kv_transfer_bytes_total")
        == len(prompt) * KV_BYTES_PER_TOKEN
    )
    assert text == expected(smollm2_hf, smollm2, prompt)


def test_kv_pushed_after_the_first_token(
    tmp_path: Path, smollm2: LoadedModel, smollm2_hf: PreTrainedModel
) -> None:
    """--kv-push after (the cuda_ipc default): nothing moves during the forward, the whole prompt in
    one push behind the step's sampling; the decode worker continues from exactly that KV."""
    flags = ("--prefill", "1", "--decode", "1", "--transport", "shm", "--kv-push", "after", *FLAGS)
    with deployment(tmp_path, *flags) as dep:
        prompt = long_prompt(smollm2.tokenizer, "harbours")
        m0 = dep.metrics()
        text = complete(dep, prompt)
        m1 = dep.metrics()
        moved = metric(m1, "pdserve_kv_transfer_bytes_total") - metric(m0, "pdserve_kv_transfer_bytes_total")
        assert moved == len(prompt) * KV_BYTES_PER_TOKEN
        assert text == expected(smollm2_hf, smollm2, prompt)


def test_nixl_remote_prefill(tmp_path: Path, smollm2: LoadedModel, smollm2_hf: PreTrainedModel) -> None:
    """KV written by NIXL (UCX between two processes) straight into the decode worker's blocks."""
    pytest.importorskip("nixl._api", reason="transport nixl needs the nixl package")
    with deployment(tmp_path, "--prefill", "1", "--decode", "1", "--transport", "nixl", *FLAGS) as dep:
        prompts = [long_prompt(smollm2.tokenizer, topic) for topic in ("orchards", "harbours")]
        m0 = dep.metrics()
        texts = [complete(dep, p) for p in prompts]
        m1 = dep.metrics()
        assert metric(m1, "pdserve_disagg_decisions_total", 'path="remote"') == metric(
            m0, "pdserve_disagg_decisions_total", 'path="remote"'
        ) + len(prompts)
        moved = metric(m1, "pdserve_kv_transfer_bytes_total") - metric(m0, "pdserve_kv_transfer_bytes_total")
        assert moved == sum(len(p) for p in prompts) * KV_BYTES_PER_TOKEN
        assert texts == [expected(smollm2_hf, smollm2, p) for p in prompts]
        dep.wait_idle()


def test_abort_mid_transfer_frees_both_sides(tcp_dep: Deployment, smollm2: LoadedModel) -> None:
    tcp_dep.wait_idle()
    # 30 layers x 30 ms: the transfer outlasts the prefill by most of a second.
    _stream_then_close(tcp_dep, long_prompt(smollm2.tokenizer, "markets"), after_s=0.6)
    tcp_dep.wait_idle()


def test_prefill_worker_death_falls_back_to_local(
    tcp_dep: Deployment, smollm2: LoadedModel, smollm2_hf: PreTrainedModel, tmp_path: Path
) -> None:
    prompt = long_prompt(smollm2.tokenizer, "observatories")
    pid = tcp_dep.worker_pid("prefill-0")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(complete, tcp_dep, prompt)
        time.sleep(0.6)  # the job is with the prefill worker, its KV half sent
        os.kill(pid, signal.SIGKILL)
        text = pending.result(timeout=120)
    assert text == expected(smollm2_hf, smollm2, prompt)
    m = tcp_dep.metrics()
    assert metric(m, "pdserve_disagg_decisions_total", 'path="fallback"') >= 1
    assert metric(m, "pdserve_worker_healthy", 'worker="prefill-0"') == 0
    # With no prefill worker left, long prompts are served locally.
    assert complete(tcp_dep, long_prompt(smollm2.tokenizer, "rivers", 30)) == expected(
        smollm2_hf, smollm2, long_prompt(smollm2.tokenizer, "rivers", 30)
    )


def test_2p2d_mixed_concurrent_traffic(
    tmp_path: Path, smollm2: LoadedModel, smollm2_hf: PreTrainedModel
) -> None:
    prompts = [long_prompt(smollm2.tokenizer, t, 40) for t in TOPICS[:4]]
    prompts += [smollm2.tokenizer.encode(f"A fact about {t}:") for t in TOPICS[4:]]  # type: ignore[union-attr]
    want = [expected(smollm2_hf, smollm2, p, 16) for p in prompts]
    flags = ("--prefill", "2", "--decode", "2", "--transport", "tcp", "--async-decode", *FLAGS)
    with deployment(tmp_path, *flags) as dep:
        with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
            got = list(pool.map(lambda p: complete(dep, p, 16), prompts))
        assert got == want
        m = dep.metrics()
        assert metric(m, "pdserve_disagg_decisions_total", 'path="remote"') >= 1
        assert metric(m, "pdserve_disagg_decisions_total", 'path="local"') >= 4
        # The decode workers launched steps ahead of reading the previous ones.
        assert metric(m, "pdserve_engine_steps_total", 'kind="ahead"') > 0
        usage = dep.wait_idle()
        assert set(usage) == {"prefill-0", "prefill-1", "decode-0", "decode-1"}
