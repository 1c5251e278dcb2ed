"""Offline API: `LLM("smollm2").generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from pdserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from pdserve.engine.engine import LLMEngine
from pdserve.engine.loader import LoadedModel
from pdserve.outputs import CompletionResult
from pdserve.sampling_params import SamplingParams


@dataclass
class GenerateResult:
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionResult] = field(default_factory=list)  # n of them


def _split_kwargs(kwargs: dict[str, Any]) -> EngineConfig:
    """Route flat keyword arguments (block_size=..., max_num_seqs=...) to their config dataclass."""
    parts: dict[str, dict[str, Any]] = {"model": {}, "cache": {}, "scheduler": {}}
    owners = {"model": ModelConfig, "cache": CacheConfig, "scheduler": SchedulerConfig}
    engine_kwargs = {
        k: kwargs.pop(k) for k in ("attention_backend", "enforce_eager", "async_decode") if k in kwargs
    }
    for key, value in kwargs.items():
        for part, cls in owners.items():
            if key in {f.name for f in dataclasses.fields(cls)}:
                parts[part][key] = value
                break
        else:
            raise TypeError(f"unknown LLM option {key!r}")
    return EngineConfig(
        model=ModelConfig(**parts["model"]),
        cache=CacheConfig(**parts["cache"]),
        scheduler=SchedulerConfig(**parts["scheduler"]),
        **engine_kwargs,
    )


class LLM:
    def __init__(self, model: str = "smollm2", loaded: LoadedModel | None = None, **kwargs: Any) -> None:
        self.engine = LLMEngine(_split_kwargs({"model": model, **kwargs}), loaded)
        self.tokenizer = self.engine.tokenizer

    def generate(
        self,
        prompts: str | list[str] | list[list[int]],
        params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[GenerateResult]:
        if isinstance(prompts, str):
            prompts = [prompts]
        params_list = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params_list)} sampling params")
        results: list[GenerateResult] = []
        pending: dict[str, tuple[int, int]] = {}
        for i, (prompt, p) in enumerate(zip(prompts, params_list, strict=True)):
            ids = self._encode(prompt)  # type: ignore[arg-type]
            results.append(GenerateResult(prompt if isinstance(prompt, str) else None, ids))
            for j in range(p.n):
                # Each of the n samples is its own engine request; the prefix cache shares the prompt.
                sub = dataclasses.replace(p, n=1, seed=None if p.seed is None else p.seed + j)
                rid = f"{i}-{j}"
                self.engine.add_request(rid, ids, sub)
                pending[rid] = (i, j)
                results[i].outputs.append(CompletionResult(rid, ids, [], "", None))
        bar = tqdm(total=len(pending), disable=not use_tqdm, desc="generate")
        while self.engine.has_unfinished():
            for out in self.engine.step():
                i, j = pending[out.request_id]
                res = results[i].outputs[j]
                res.token_ids.extend(out.new_token_ids)
                res.text += out.new_text
                if out.logprobs:
                    res.logprobs = (res.logprobs or []) + out.logprobs
                if out.finished:
                    res.finish_reason = out.finish_reason
                    res.num_cached_tokens = out.num_cached_tokens
                    bar.update(1)
        bar.close()
        return results

    def _encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass token ids")
            return list(self.tokenizer.encode(prompt))
        return list(prompt)
