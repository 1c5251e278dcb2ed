"""Engine.step(): schedule → run → postprocess. Single-threaded; AsyncLLM drives it from a thread."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable

import torch

from pdserve.config import EngineConfig
from pdserve.engine.attention.base import get_backend
from pdserve.engine.block_manager import BlockManager
from pdserve.engine.client import EngineStats
from pdserve.engine.decode_pipeline import InflightStep, plan_continuation
from pdserve.engine.detokenizer import IncrementalDetokenizer
from pdserve.engine.kv_output import KVStreamer
from pdserve.engine.loader import LoadedModel, load_model
from pdserve.engine.model import ModelArch
from pdserve.engine.request import Request, RequestStatus
from pdserve.engine.runner import DeviceFeed, ModelRunner, allocate_kv_caches, num_blocks_for_budget
from pdserve.engine.sampler import make_generator
from pdserve.engine.scheduler import ScheduledRequest, Scheduler
from pdserve.engine.step_stats import StepStats, Stopwatch
from pdserve.engine.stop_conditions import resolve_max_tokens, stop_status
from pdserve.outputs import RequestOutput, TokenLogprob
from pdserve.protocol import PrefillJob
from pdserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# Left free on a GPU beyond the KV cache: prefill activations of a full token budget, logits and
# the CUDA-graph pools (an 8B model at 8k batched tokens peaks near 1 GiB).
_GPU_ACTIVATION_HEADROOM_BYTES = 2 * 2**30


# (arch, num_blocks, block_size, dtype, device) -> one cache tensor per layer; e.g. in shared memory.
KVCacheFactory = Callable[[ModelArch, int, int, torch.dtype, torch.device], list[torch.Tensor]]


def use_device(device: torch.device) -> None:
    """Make `device` the calling thread's current GPU: Triton kernels, events and graph capture use
    the current device, which is per thread and cuda:0 by default."""
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)


class LLMEngine:
    def __init__(
        self,
        config: EngineConfig,
        loaded: LoadedModel | None = None,
        kv_cache_factory: KVCacheFactory | None = None,
    ) -> None:
        self.config = config
        use_device(config.model.resolved_device())
        loaded = loaded if loaded is not None else load_model(config.model)
        self.model_name = config.model.served_model_name or loaded.name
        self.tokenizer = loaded.tokenizer
        self.arch = loaded.arch
        self.max_model_len = loaded.max_model_len
        self.device = config.model.resolved_device()
        self.dtype = config.model.resolved_dtype()
        self.kv_dtype = config.cache.resolved_kv_dtype(self.dtype)
        cache = config.cache
        num_blocks = cache.num_blocks or num_blocks_for_budget(
            self.arch, cache.block_size, self.kv_dtype, self._kv_budget_bytes()
        )
        self.block_manager = BlockManager(num_blocks, cache.block_size, cache.enable_prefix_caching)
        self.scheduler = Scheduler(config.scheduler, self.block_manager, self.device.type)
        # The limits as resolved for this device, for whoever reads them off the engine.
        self.config = config = dataclasses.replace(config, scheduler=self.scheduler.cfg)
        eos = set(self.arch.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_token_ids = tuple(sorted(eos))
        if kv_cache_factory is not None:
            self.kv_caches = kv_cache_factory(
                self.arch, num_blocks, cache.block_size, self.kv_dtype, self.device
            )
        else:
            self.kv_caches = allocate_kv_caches(
                self.arch, num_blocks, cache.block_size, self.kv_dtype, self.device
            )
        backend = get_backend(config.resolved_attention_backend())
        self.runner = ModelRunner(
            loaded.model,
            self.arch,
            backend,
            self.kv_caches,
            cache.block_size,
            self.device,
            self.eos_token_ids,
        )
        # Graph replay needs kernels that read context lengths on the device: the triton backend's.
        self.cuda_graphs = (
            self.device.type == "cuda" and backend.name == "triton" and not config.enforce_eager
        )
        if self.cuda_graphs:
            self.runner.capture_cuda_graphs(self.scheduler.max_num_seqs, self.max_model_len)
        self.async_decode = config.async_decode if config.async_decode is not None else self.cuda_graphs
        self._inflight: InflightStep | None = None  # a launched step not read yet (async_decode)
        self._detokenizers: dict[str, IncrementalDetokenizer] = {}
        self.step_stats = StepStats()
        # Prefill side: set by the prefill worker to ship KV of remote-prefill requests.
        self.kv_streamer: KVStreamer | None = None
        # Decode side: aborted remote prefills whose blocks stay held until the writer stops
        # (shared-memory writers write before telling us), with the deadline that frees them anyway.
        self.draining: dict[str, tuple[Request, float]] = {}
        logger.info(
            "engine ready: model=%s device=%s dtype=%s attention=%s cuda_graphs=%s kv_blocks=%d x %d tokens",
            self.model_name, self.device, self.dtype, backend.name, self.cuda_graphs, num_blocks,
            cache.block_size,
        )  # fmt: skip

    def _kv_budget_bytes(self) -> int:
        if self.device.type == "cuda":
            # Blocks the allocator caches but no tensor holds count as free.
            torch.cuda.empty_cache()
            free, total = torch.cuda.mem_get_info(self.device)
            # This worker may hold `gpu_memory_utilization` of the GPU in all, its weights included
            # (workers sharing a GPU each get a share), and never more than is free now less room
            # for activations and graph pools: another process may hold the rest.
            mine = torch.cuda.memory_reserved(self.device)
            limit = total * self.config.cache.gpu_memory_utilization - mine
            return int(max(min(limit, free - _GPU_ACTIVATION_HEADROOM_BYTES), 0))
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
        req = Request(
            request_id, prompt_token_ids, params, max_tokens, make_generator(params.seed, self.device)
        )
        self.scheduler.add(req)
        if self.tokenizer is not None:
            self._detokenizers[request_id] = IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params)

    def abort_request(self, request_id: str, drain_s: float | None = None) -> RequestOutput | None:
        """Free the request's blocks now. None if it is unknown or already finished. drain_s: for a
        request whose KV a remote writer may still be writing, hold its blocks until release_draining
        (or at most drain_s seconds) instead."""
        req = self.scheduler.requests.get(request_id)
        if req is None:
            return None
        drain = drain_s is not None and req.status == RequestStatus.WAITING_FOR_KV
        if drain:
            self.scheduler.finish(req, RequestStatus.FINISHED_ABORTED, free_blocks=False)
            self.draining[request_id] = (req, time.monotonic() + (drain_s or 0.0))
        else:
            self._finish(req, RequestStatus.FINISHED_ABORTED)
        self._detokenizers.pop(request_id, None)
        logger.info("[%s] aborted", request_id)
        return self._output(req, [], "", None)

    # ---- remote prefill ----

    def reserve_remote(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> Request | None:
        """Decode side: hold blocks for the prompt so a prefill worker can fill them. None if short of memory."""
        max_tokens = self.validate(prompt_token_ids, params)
        req = Request(
            request_id, prompt_token_ids, params, max_tokens, make_generator(params.seed, self.device)
        )
        if not self.scheduler.reserve(req):
            return None
        if self.tokenizer is not None:
            self._detokenizers[request_id] = IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params)
        return req

    def complete_remote(
        self, request_id: str, first_token_id: int, logprob: TokenLogprob | None
    ) -> RequestOutput | None:
        """Decode side: the prompt's KV arrived with the first token; decoding continues here."""
        req = self.scheduler.reserved.get(request_id)
        if req is None:
            return None  # aborted meanwhile
        self.scheduler.kv_arrived(req)
        return self._postprocess(req, first_token_id, logprob)

    def fall_back_to_local(self, request_id: str, reason: str) -> None:
        req = self.scheduler.reserved.get(request_id)
        if req is not None:
            logger.warning("[%s] remote prefill failed (%s): prefilling locally", request_id, reason)
            self.scheduler.fall_back_to_local(req)

    def release_draining(self, request_id: str | None = None) -> None:
        """Free held blocks of aborted remote prefills: one (its writer stopped) or all expired ones."""
        now = time.monotonic()
        for rid, (req, deadline) in list(self.draining.items()):
            if rid == request_id or (request_id is None and now >= deadline):
                del self.draining[rid]
                self.block_manager.free(req)

    def _hold_parked(self, req: Request, status: RequestStatus) -> None:
        """Prefill side: the job's forward ended before its destination arrived (kv_output.py). It is
        done here, but its blocks hold the KV to send: kept until release_draining, at the latest
        at the job's deadline."""
        assert req.kv_job is not None
        self.scheduler.finish(req, status, free_blocks=False)
        self.draining[req.request_id] = (req, time.monotonic() + max(req.kv_job.deadline - time.time(), 0.0))
        logger.info("[%s] prefilled before its destination arrived: KV and first token held", req.request_id)

    def add_prefill_job(self, job: PrefillJob) -> None:
        """Prefill side: run the prompt, ship its KV as it is computed, sample the first token."""
        params = dataclasses.replace(SamplingParams(**job.params), max_tokens=1, min_tokens=0, n=1)
        self.validate(job.prompt_token_ids, params)
        req = Request(
            job.request_id, job.prompt_token_ids, params, 1, make_generator(params.seed, self.device)
        )
        req.kv_job = job
        self.scheduler.add(req)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or self._inflight is not None

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

    def counters(self) -> dict[str, float]:
        return self.step_stats.as_dict()

    # ---- the step ----

    def step(self) -> list[RequestOutput]:
        """Run one step; returns the outputs of the step whose samples the host read. With
        async_decode that may be the step launched in the previous call (see decode_pipeline.py)."""
        try:
            if self._inflight is not None:
                return self._step_ahead()
            return self._schedule_and_launch()
        except BaseException:
            self._drop_inflight()
            raise

    def _schedule_and_launch(self) -> list[RequestOutput]:
        stats, watch = self.step_stats, Stopwatch()
        sched = self.scheduler.schedule()
        stats.schedule_s += watch.lap()
        if sched.empty:
            return []
        hook = self.kv_streamer.layer_hook_for(sched.scheduled) if self.kv_streamer is not None else None
        sampled, pending = self.runner.launch(sched.scheduled, hook)
        self._advance(sched.scheduled)
        if self.kv_streamer is not None:
            self.kv_streamer.after_launch(sched.scheduled)
        if pending is None:
            stats.forward_s += watch.lap()
            return []
        # A step that ships KV (a prefill worker's job) is read at once: its first token must follow
        # its KV out. A prefill worker's whole requests (router/whole_policy.py) may run ahead.
        if self.async_decode and hook is None and all(s.request.kv_job is None for s in sampled):
            self._inflight = InflightStep(sampled, pending)
            stats.forward_s += watch.lap()
            return []  # read in the next call, after the step that follows is queued
        samples = pending.result()
        stats.forward_s += watch.lap()
        outputs = self._outputs(sampled, samples.token_ids, samples.logprobs)
        stats.postprocess_s += watch.lap()
        return outputs

    def _step_ahead(self) -> list[RequestOutput]:
        """Queue the continuation of the in-flight step (if it is one), then read the in-flight step."""
        stats, watch = self.step_stats, Stopwatch()
        prev = self._inflight
        assert prev is not None
        batch = [s.request for s in prev.sampled]
        rows = plan_continuation(
            batch, self.scheduler.running, bool(self.scheduler.waiting), self.max_model_len
        )
        # Each row needs a slot for its next token; short of blocks, the scheduler decides (preempts).
        if rows is not None and not all(self.block_manager.allocate(batch[i], 1) for i in rows):
            rows = None
        stats.schedule_s += watch.lap()
        nxt = None
        if rows is not None:
            cont = [ScheduledRequest(batch[i], 1, ahead=1) for i in rows]
            sampled, pending = self.runner.launch(cont, None, DeviceFeed(prev.pending.token_ids, rows))
            assert pending is not None, "a continuation samples every row"
            nxt = InflightStep(sampled, pending)
            stats.ahead_steps += 1
        self._inflight = nxt  # from here on, requests finishing in it keep their blocks until it ends
        try:
            samples = prev.pending.result()
        finally:
            for req in prev.deferred:
                self.block_manager.free(req)
        stats.forward_s += watch.lap()
        outputs = self._outputs(prev.sampled, samples.token_ids, samples.logprobs)
        if nxt is not None:
            self._advance(nxt.sampled)
        stats.postprocess_s += watch.lap()
        if nxt is None:
            # Plan and queue the next step before handing these outputs back, so the GPU is not
            # idle while the caller streams them.
            outputs += self._schedule_and_launch()
        return outputs

    def _advance(self, scheduled: list[ScheduledRequest]) -> None:
        """Account a launched step: its tokens' KV is (being) computed."""
        decode_tokens = num_tokens = 0
        for s in scheduled:
            decode_tokens += s.num_new_tokens == 1
            num_tokens += s.num_new_tokens
            req = s.request
            req.num_computed_tokens += s.num_new_tokens
            if not req.status.finished:
                self.block_manager.cache_full_blocks(req)
        self.step_stats.record_step(
            len(scheduled), num_tokens - decode_tokens, decode_tokens, self.runner.last_step_graph
        )

    def _outputs(
        self, sampled: list[ScheduledRequest], token_ids: list[int], logprobs: list[TokenLogprob | None]
    ) -> list[RequestOutput]:
        outputs = []
        for s, token_id, logprob in zip(sampled, token_ids, logprobs, strict=True):
            if not s.request.status.finished:  # else aborted or stopped while its step ran: dropped
                outputs.append(self._postprocess(s.request, token_id, logprob))
        return outputs

    def _finish(self, req: Request, status: RequestStatus) -> None:
        """Finish a request; its blocks are freed now, or when the in-flight step writing them ends."""
        inflight = self._inflight
        if inflight is not None and inflight.holds(req) and not req.status.finished:
            self.scheduler.finish(req, status, free_blocks=False)
            inflight.deferred.append(req)
        else:
            self.scheduler.finish(req, status)

    def _drop_inflight(self) -> None:
        """After a failed step: forget the in-flight step and free what waited for it."""
        inflight, self._inflight = self._inflight, None
        if inflight is None:
            return
        if self.device.type == "cuda":
            with contextlib.suppress(Exception):
                torch.cuda.synchronize(self.device)
        for req in inflight.deferred:
            self.block_manager.free(req)

    def _postprocess(self, req: Request, token_id: int, logprob: TokenLogprob | None) -> RequestOutput:
        parked = False
        if req.kv_job is not None and self.kv_streamer is not None:
            parked = not self.kv_streamer.send_first_token(req, token_id, logprob)
        req.append_token(token_id, logprob)
        status = stop_status(req, token_id, self.eos_token_ids, self.max_model_len)
        detok = self._detokenizers.get(req.request_id)
        if detok is not None:
            stop_str = detok.update([token_id])  # honours min_tokens itself
            if stop_str is not None:
                status, req.stop_reason = RequestStatus.FINISHED_STOPPED, stop_str
        if parked:
            self._hold_parked(req, status or RequestStatus.FINISHED_LENGTH)
        elif status is not None:
            self._finish(req, status)
        text = detok.take_delta(status is not None) if detok is not None else ""
        if status is not None:
            self._detokenizers.pop(req.request_id, None)
        return self._output(req, [token_id], text, logprob)

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
