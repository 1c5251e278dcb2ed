"""Engine.step(): schedule → run → postprocess. Single-threaded; AsyncLLM drives it from a thread."""

from __future__ import annotations

import logging

import torch

from pdserve.config import EngineConfig
from pdserve.engine.attention.base import get_backend
from pdserve.engine.block_manager import BlockManager
from pdserve.engine.client import EngineStats
from pdserve.engine.detokenizer import IncrementalDetokenizer
from pdserve.engine.loader import LoadedModel, load_model
from pdserve.engine.request import Request, RequestStatus
from pdserve.engine.runner import ModelRunner, allocate_kv_caches, num_blocks_for_budget
from pdserve.engine.sampler import make_generator
from pdserve.engine.scheduler import Scheduler
from pdserve.outputs import RequestOutput, TokenLogprob
from pdserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class ContextLengthError(ValueError):
    """The prompt plus the requested completion do not fit the model's context."""


def resolve_max_tokens(num_prompt_tokens: int, params: SamplingParams, max_model_len: int) -> int:
    """The completion budget a request gets; raises ContextLengthError if it cannot fit."""
    room = max_model_len - num_prompt_tokens
    requested = params.max_tokens if params.max_tokens is not None else max(room, 1)
    if num_prompt_tokens + requested > max_model_len:
        raise ContextLengthError(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{num_prompt_tokens + requested} tokens ({num_prompt_tokens} in the prompt, "
            f"{requested} for the completion). Please reduce the prompt or the completion length."
        )
    return requested


class LLMEngine:
    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None) -> None:
        self.config = config
        loaded = loaded if loaded is not None else load_model(config.model)
        self.model_name = config.model.served_model_name or loaded.name
        self.tokenizer = loaded.tokenizer
        self.arch = loaded.arch
        self.max_model_len = loaded.max_model_len
        self.device = config.model.resolved_device()
        self.dtype = config.model.resolved_dtype()
        cache = config.cache
        num_blocks = cache.num_blocks or num_blocks_for_budget(
            self.arch, cache.block_size, self.dtype, self._kv_budget_bytes()
        )
        self.block_manager = BlockManager(num_blocks, cache.block_size, cache.enable_prefix_caching)
        self.scheduler = Scheduler(config.scheduler, self.block_manager)
        eos = set(self.arch.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_token_ids = tuple(sorted(eos))
        self.kv_caches = allocate_kv_caches(self.arch, num_blocks, cache.block_size, self.dtype, self.device)
        self.runner = ModelRunner(
            loaded.model,
            self.arch,
            get_backend(config.attention_backend),
            self.kv_caches,
            cache.block_size,
            self.device,
            self.eos_token_ids,
        )
        self._detokenizers: dict[str, IncrementalDetokenizer] = {}
        logger.info(
            "engine ready: model=%s device=%s dtype=%s kv_blocks=%d x %d tokens",
            self.model_name, self.device, self.dtype, num_blocks, cache.block_size,
        )  # fmt: skip

    def _kv_budget_bytes(self) -> int:
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            reserve = total * (1 - self.config.cache.gpu_memory_utilization)
            return int(max(free - reserve, 0))
        return int(self.config.cache.kv_cache_memory_gb * 2**30)

    # ---- requests in and out ----

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> int:
        """Checks that need no engine state (safe from any thread). Returns the resolved max_tokens."""
        if not prompt_token_ids:
            raise ValueError("the prompt is empty")
        vocab = self.arch.vocab_size
        bad = [t for t in prompt_token_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids out of range [0, {vocab}): {bad[:5]}")
        return resolve_max_tokens(len(prompt_token_ids), params, self.max_model_len)

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        max_tokens = self.validate(prompt_token_ids, params)
        req = Request(request_id, prompt_token_ids, params, max_tokens, make_generator(params.seed, self.device))
        self.scheduler.add(req)
        if self.tokenizer is not None:
            self._detokenizers[request_id] = IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Free the request's blocks now. None if it is unknown or already finished."""
        req = self.scheduler.requests.get(request_id)
        if req is None:
            return None
        self.scheduler.finish(req, RequestStatus.FINISHED_ABORTED)
        self._detokenizers.pop(request_id, None)
        logger.info("[%s] aborted", request_id)
        return self._output(req, [], "", None)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            num_free_blocks=self.block_manager.num_free_blocks,
            num_total_blocks=self.block_manager.num_blocks,
            num_preemptions=self.scheduler.num_preemptions,
            prefix_cache_hit_tokens=self.block_manager.hit_tokens,
            prefix_cache_query_tokens=self.block_manager.query_tokens,
        )

    # ---- the step ----

    def step(self) -> list[RequestOutput]:
        sched = self.scheduler.schedule()
        if sched.empty:
            return []
        sampled, samples = self.runner.execute(sched.scheduled)
        for s in sched.scheduled:
            s.request.num_computed_tokens += s.num_new_tokens
            self.block_manager.cache_full_blocks(s.request)
        if samples is None:
            return []
        outputs = []
        for s, token_id, logprob in zip(sampled, samples.token_ids, samples.logprobs, strict=True):
            outputs.append(self._postprocess(s.request, token_id, logprob))
        return outputs

    def _postprocess(self, req: Request, token_id: int, logprob: TokenLogprob | None) -> RequestOutput:
        req.append_token(token_id, logprob)
        status = self._check_stop_token(req, token_id)
        detok = self._detokenizers.get(req.request_id)
        if detok is not None:
            stop_str = detok.update([token_id])  # honours min_tokens itself
            if stop_str is not None:
                status, req.stop_reason = RequestStatus.FINISHED_STOPPED, stop_str
        if status is not None:
            self.scheduler.finish(req, status)
        text = detok.take_delta(status is not None) if detok is not None else ""
        if status is not None:
            self._detokenizers.pop(req.request_id, None)
        return self._output(req, [token_id], text, logprob)

    def _check_stop_token(self, req: Request, token_id: int) -> RequestStatus | None:
        params = req.params
        if req.num_output_tokens >= params.min_tokens:
            if not params.ignore_eos and token_id in self.eos_token_ids:
                return RequestStatus.FINISHED_STOPPED
            if token_id in params.stop_token_ids:
                req.stop_reason = token_id
                return RequestStatus.FINISHED_STOPPED
        if req.num_output_tokens >= req.max_tokens or req.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def _output(
        self, req: Request, token_ids: list[int], text: str, logprob: TokenLogprob | None
    ) -> RequestOutput:
        finished = req.status.finished
        return RequestOutput(
            request_id=req.request_id,
            new_token_ids=token_ids,
            new_text=text,
            finished=finished,
            finish_reason=req.status.value if finished else None,
            stop_reason=req.stop_reason,
            logprobs=[logprob] if logprob is not None else None,
            num_prompt_tokens=req.num_prompt_tokens,
            num_cached_tokens=req.num_cached_tokens,
            num_output_tokens=req.num_output_tokens,
        )
