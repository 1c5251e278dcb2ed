"""A fake `EngineClient` for testing the HTTP layer without a model.

Its tokenizer is byte-level (one token per UTF-8 byte, plus a few special tokens) and built in
memory, so prompt lengths are easy to predict. It "generates" a fixed reply, one token per
step after a configurable delay, honouring max_tokens, stop strings, stop token ids, EOS and
logprobs, and records every call and every abort.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from pdserve.engine.client import EngineStats
from pdserve.outputs import RequestOutput, TokenLogprob
from pdserve.sampling_params import SamplingParams

REPLY = "Hello there! I am a fake model."
SPECIAL_TOKENS = ["<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def make_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level tokenizer without merges; prepends <s> when special tokens are added."""
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for tok in SPECIAL_TOKENS:
        vocab[tok] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", vocab["<s>"])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        additional_special_tokens=SPECIAL_TOKENS[2:],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@dataclass
class GenerateCall:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams


class FakeEngine:
    model_name = "fake-model"

    def __init__(
        self,
        *,
        max_model_len: int = 256,
        token_delay: float = 0.0,
        fail: str | None = None,  # "error" (finish_reason), "raise", "value" (ValueError), "abort"
        fail_after: int = 0,
    ) -> None:
        self.max_model_len = max_model_len
        self.tokenizer: Any = make_tokenizer()
        self.token_delay = token_delay
        self.fail = fail
        self.fail_after = fail_after
        self.calls: list[GenerateCall] = []
        self.aborted: list[str] = []  # engine.abort() calls
        self.closed_early: list[str] = []  # streams closed before they finished
        self.running: set[str] = set()
        self.seen_prompts: set[tuple[int, ...]] = set()
        self.prefix_hit_tokens = 0
        self.stats_calls = 0
        self.shut_down = False

    def reply_for(self, params: SamplingParams) -> str:
        # Seeded samples differ from each other, so n > 1 tests can tell the choices apart.
        return REPLY if params.seed is None else f"[{params.seed}] {REPLY}"

    def _cached_tokens(self, prompt: list[int]) -> int:
        key = tuple(prompt)
        cached = (len(prompt) - 1) // 4 * 4 if key in self.seen_prompts else 0
        self.seen_prompts.add(key)
        self.prefix_hit_tokens += cached
        return cached

    def _logprob(self, token_id: int, pos: int, k: int) -> TokenLogprob:
        lp = -0.25 * (1 + pos % 4)
        top = [(token_id, lp)] + [((token_id + j) % 256, lp - j) for j in range(1, k)]
        return TokenLogprob(token_id=token_id, logprob=lp, top=top[:k])

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        self.calls.append(GenerateCall(request_id, list(prompt_token_ids), params))
        if self.fail == "raise":
            raise RuntimeError("fake engine exploded")
        if self.fail == "value":
            raise ValueError("fake engine rejects this request")
        self.running.add(request_id)
        finished = False
        try:
            async for out in self._steps(request_id, prompt_token_ids, params):
                finished = out.finished
                yield out
        finally:
            self.running.discard(request_id)
            if not finished:
                self.closed_early.append(request_id)

    async def _steps(
        self, request_id: str, prompt: list[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        tok = self.tokenizer
        reply_ids: list[int] = tok.encode(self.reply_for(params), add_special_tokens=False)
        cached = self._cached_tokens(prompt)
        max_tokens = params.max_tokens or self.max_model_len - len(prompt)
        hold = max((len(s) for s in params.stop), default=1) - 1  # text that may start a stop string
        ids: list[int] = []
        emitted = ""

        def output(new_ids: list[int], text: str, reason: str | None = None, **kw: Any) -> RequestOutput:
            nonlocal emitted
            new_text, emitted = text[len(emitted) :], text
            lps = None
            if params.logprobs is not None:
                start = len(ids) - len(new_ids)
                lps = [self._logprob(t, start + i, params.logprobs) for i, t in enumerate(new_ids)]
            return RequestOutput(
                request_id=request_id,
                new_token_ids=new_ids,
                new_text=new_text,
                finished=reason is not None,
                finish_reason=reason,
                logprobs=lps,
                num_prompt_tokens=len(prompt),
                num_cached_tokens=cached,
                num_output_tokens=len(ids),
                **kw,
            )

        while True:
            await asyncio.sleep(self.token_delay)
            if self.fail in ("error", "abort") and len(ids) >= self.fail_after:
                yield output([], emitted, self.fail, error="fake failure" if self.fail == "error" else None)
                return
            token = self._next_token(len(ids), reply_ids, params)
            ids.append(token)
            text = tok.decode(ids, skip_special_tokens=params.skip_special_tokens)
            if token == tok.eos_token_id:
                yield output([token], text, "stop")
                return
            if token in params.stop_token_ids:
                yield output([token], text, "stop", stop_reason=token)
                return
            for stop in params.stop:
                at = text.find(stop)
                if at >= 0:
                    end = at + len(stop) if params.include_stop_str_in_output else at
                    yield output([token], text[:end], "stop", stop_reason=stop)
                    return
            if len(ids) >= max_tokens:
                yield output([token], text, "length")
                return
            yield output([token], text[: max(len(emitted), len(text) - hold)])

    def _next_token(self, pos: int, reply_ids: list[int], params: SamplingParams) -> int:
        """The reply, then EOS; the reply again while EOS is ignored or min_tokens not reached."""
        if pos < len(reply_ids):
            return reply_ids[pos]
        if params.ignore_eos or pos < params.min_tokens:
            return reply_ids[pos % len(reply_ids)]
        eos: int = self.tokenizer.eos_token_id
        return eos

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    def stats(self) -> EngineStats:
        self.stats_calls += 1
        return EngineStats(
            num_running=len(self.running),
            num_waiting=0,
            num_free_blocks=90,
            num_total_blocks=100,
            num_preemptions=3,
            prefix_cache_hit_tokens=self.prefix_hit_tokens,
            prefix_cache_query_tokens=0,
        )

    async def shutdown(self) -> None:
        self.shut_down = True
