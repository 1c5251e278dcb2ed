"""The engine on a GPU: triton attention with CUDA graphs gives the same greedy tokens as the torch
reference backend (fp32, tiny models), under batching, chunked prefill and prefix hits; graph
replay gives the same tokens as eager triton steps in bf16; and "auto" picks triton on CUDA."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import torch

from pdserve import LLM, SamplingParams
from pdserve.engine.cuda_graphs import DecodeGraphs
from tests.unit.tiny_models import make_tiny_hf_model

pytestmark = pytest.mark.gpu

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    root = tmp_path_factory.mktemp("tiny")
    return {k: make_tiny_hf_model(k, root) for k in ("llama", "qwen3", "qwen2")}


def prompts(lengths: list[int], seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 300) for _ in range(n)] for n in lengths]


def generate(path: Path, batch: list[list[int]], **kwargs: Any) -> tuple[LLM, list[list[int]]]:
    llm = LLM(str(path), device="cuda", block_size=4, num_blocks=512, **kwargs)
    return llm, [r.outputs[0].token_ids for r in llm.generate(batch, GREEDY)]


def count_replays(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    sizes: list[int] = []
    original = DecodeGraphs.run

    def run(self: DecodeGraphs, scheduled: list[Any], input_ids: torch.Tensor | None = None) -> torch.Tensor:
        sizes.append(len(scheduled))
        return original(self, scheduled, input_ids)

    monkeypatch.setattr(DecodeGraphs, "run", run)
    return sizes


@pytest.mark.parametrize("kind", ["llama", "qwen3", "qwen2"])
def test_triton_graphs_match_torch_backend_fp32(
    kind: str, tiny_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    batch = prompts([3, 17, 40, 9, 64, 1, 30], seed=1)  # 7 rows: replays pad to 8
    _, ref = generate(tiny_dirs[kind], batch, dtype="float32", attention_backend="torch")
    replays = count_replays(monkeypatch)
    llm, got = generate(tiny_dirs[kind], batch, dtype="float32", max_num_seqs=16)
    assert llm.engine.runner.backend.name == "triton" and llm.engine.cuda_graphs
    assert replays and max(replays) == 7
    assert got == ref


def test_chunked_prefill_and_prefix_hits_fp32(tiny_dirs: dict[str, Path]) -> None:
    shared = prompts([37], seed=3)[0]
    batch = [shared + t for t in prompts([5, 12, 1, 30], seed=4)]
    path = tiny_dirs["qwen3"]
    opts: dict[str, Any] = {"dtype": "float32", "max_num_batched_tokens": 7}
    _, ref = generate(path, batch, attention_backend="torch", **opts)
    llm, got = generate(path, batch, attention_backend="triton", **opts)
    assert got == ref
    again = llm.generate(batch[:2], GREEDY)  # the shared prefix now comes from the cache
    assert [r.outputs[0].token_ids for r in again] == ref[:2]
    assert all(r.outputs[0].num_cached_tokens >= 36 for r in again)


def test_graph_replay_matches_eager_bf16(tiny_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    batch = prompts([20, 33, 7, 50], seed=5)  # 4 rows: the bucket size, so eager runs the same shapes
    _, eager = generate(tiny_dirs["llama"], batch, dtype="bfloat16", enforce_eager=True)
    replays = count_replays(monkeypatch)
    _, graphed = generate(tiny_dirs["llama"], batch, dtype="bfloat16")
    assert replays
    assert graphed == eager


def test_cpu_engine_keeps_the_torch_backend(tiny_dirs: dict[str, Path]) -> None:
    llm = LLM(str(tiny_dirs["llama"]), device="cpu", num_blocks=64)
    assert llm.engine.runner.backend.name == "torch" and not llm.engine.cuda_graphs


def test_decode_ahead_matches_step_by_step_on_graphs(tiny_dirs: dict[str, Path]) -> None:
    """Graph steps launched before the previous step's samples reach the host (the default with
    CUDA graphs) give the tokens, stops and logprobs of step-by-step graph steps."""
    batch = prompts([12, 3, 40, 25, 7], seed=7)
    params = [
        SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=31, ignore_eos=True, logprobs=2),
        SamplingParams(temperature=0.8, max_tokens=17, seed=5, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=26, ignore_eos=True, min_tokens=4),
    ]
    results = {}
    for ahead in (False, True):
        llm = LLM(str(tiny_dirs["llama"]), device="cuda", dtype="float32", block_size=4, num_blocks=512,
                  async_decode=ahead)  # fmt: skip
        out = llm.generate(batch, params)
        results[ahead] = [
            (r.outputs[0].token_ids, [round(x.logprob, 4) for x in r.outputs[0].logprobs or []]) for r in out
        ]
        stats = llm.engine.step_stats
        assert llm.engine.cuda_graphs and stats.graph_steps > 20
        assert (stats.ahead_steps > 20) == ahead
        assert llm.engine.block_manager.num_free_blocks == 512
    assert results[True] == results[False]
