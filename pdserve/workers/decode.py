"""Decode (and colocated) worker: owns the requests end to end.

For each request it decides where the prompt is prefilled. Local: it goes into its own engine.
Remote: it reserves blocks for the prompt, hands the router a PrefillJob naming them, and waits
(with a deadline) for a prefill worker to push the KV in; the first token comes with the KV and
decoding continues here. A failed or late remote prefill falls back to local prefill in the
blocks already held, so a request is never lost to a broken prefill worker.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import torch

from pdserve.config import EngineConfig, WorkerConfig
from pdserve.engine.async_llm import AsyncLLM
from pdserve.engine.engine import LLMEngine
from pdserve.engine.model import ModelArch
from pdserve.kv_transfer import make_receiver
from pdserve.kv_transfer.base import TransferStats
from pdserve.kv_transfer.shm import ShmKVCache
from pdserve.outputs import RequestOutput
from pdserve.protocol import (
    AbortRequest,
    GenerateRequest,
    PrefillDeclined,
    PrefillDone,
    PrefillJob,
    TokenChunk,
    WorkerInfo,
    WorkerLoad,
    logprob_from_wire,
    params_to_dict,
)
from pdserve.trace import Trace, mark
from pdserve.workers.common import PrefillSpeed, kv_layout, worker_load
from pdserve.workers.disagg_policy import Decision, DisaggPolicy, choose_prefill_path
from pdserve.workers.generate_stream import stream_frames

logger = logging.getLogger(__name__)

# After a remote prefill's deadline, how long shared-memory blocks stay held in case the writer
# is mid-copy (it checks the same deadline before every write).
_SHM_GRACE_S = 1.0
# Transports whose writer puts KV straight into our blocks (so aborted blocks drain before reuse).
_IN_PLACE = ("shm", "cuda_ipc", "nixl")


@dataclass
class _Remote:
    job: PrefillJob
    deadline: float  # monotonic
    path: str = "remote"  # becomes "fallback" if the KV never arrives
    stats: TransferStats | None = None
    trace: Trace | None = None  # the completion's marks (pdserve/trace.py)


class DecodeWorker:
    def __init__(self, cfg: WorkerConfig, engine_cfg: EngineConfig, secret: bytes, url: str) -> None:
        self.cfg = cfg
        self.url = url
        self.remote_enabled = cfg.role == "decode"
        self._shm: ShmKVCache | None = None
        factory = self._shm_factory if self.remote_enabled and cfg.kv_transport == "shm" else None
        self.llm = AsyncLLM(engine_cfg, kv_cache_factory=factory)
        engine = self.llm.engine
        self.layout = kv_layout(engine)
        self.worker_id = cfg.worker_id or f"{cfg.role}-{cfg.port}"
        self.receiver = None
        if self.remote_enabled:
            self.receiver = make_receiver(
                cfg.kv_transport, self.layout, engine.kv_caches, self._on_kv_done, self._on_kv_failed,
                secret, host=cfg.host, port=cfg.kv_port, shm_name=self._shm.name if self._shm else None,
            )  # fmt: skip
        self.policy = DisaggPolicy(
            threshold_tokens=cfg.remote_prefill_threshold,
            max_queue_per_prefill_worker=cfg.max_queue_per_prefill_worker,
            link_bytes_per_s=cfg.link_gbps * 1e9,
            kv_bytes_per_token=self.layout.bytes_per_token,
            max_local_prefill_tokens=cfg.max_local_prefill_tokens,
        )
        self.prefill_speed = PrefillSpeed(cfg.prefill_tokens_per_s)
        self._remote: dict[str, _Remote] = {}  # touched on the engine thread only
        self._paths: dict[str, _Remote | None] = {}  # request id -> how it was prefilled
        self.llm.on_tick = self._tick
        self.llm.abort_fn = self._abort_on_engine

    def _shm_factory(
        self, arch: ModelArch, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device
    ) -> list[torch.Tensor]:
        if device.type != "cpu":
            raise ValueError(
                "transport shm keeps the KV cache in host shared memory: use it with --device cpu"
            )
        from pdserve.kv_transfer.codec import dtype_name
        from pdserve.protocol import KVLayout

        layout = KVLayout(
            "", dtype_name(dtype), block_size, arch.num_layers, arch.num_kv_heads, arch.head_dim
        )
        self._shm = ShmKVCache(layout, num_blocks, tag=self.cfg.shm_tag)
        return self._shm.tensors

    def start(self) -> None:
        self.llm.start()

    async def shutdown(self) -> None:
        await self.llm.shutdown()
        if self.receiver is not None:
            self.receiver.close()
        if self._shm is not None:
            self._shm.close()

    def info(self) -> WorkerInfo:
        host, port = self.receiver.endpoint if self.receiver is not None else (self.cfg.host, 0)
        return WorkerInfo(
            self.worker_id,
            self.cfg.role,
            self.url,
            host,
            port,
            self.layout,
            self.llm.model_name,
            self.llm.max_model_len,
            disagg_policy=dataclasses.asdict(self.policy) if self.remote_enabled else None,
            kv_timeout_s=self.cfg.kv_timeout_s,
        )

    def load(self) -> WorkerLoad:
        events = self.llm.engine.block_manager.drain_events()  # list swap: safe across threads
        load = worker_load(self.worker_id, self.llm, len(self._remote), events)
        load.prefill_tokens_per_s = self.prefill_speed.tokens_per_s
        return load

    # ---- the generate stream ----

    def generate(self, req: GenerateRequest) -> AsyncIterator[bytes]:
        return stream_frames(
            self.llm, req, lambda eng: self._admit(eng, req), self._first_token,
            lambda rid: self._paths.pop(rid, None),
        )  # fmt: skip

    def _first_token(self, chunk: TokenChunk, out: RequestOutput, seconds: float) -> None:
        """The first chunk reports how the prompt was prefilled; a local prefill teaches its speed."""
        remote = self._paths.pop(chunk.request_id, None)
        chunk.prefill_path = remote.path if remote is not None else "local"
        if remote is not None and remote.stats is not None:
            chunk.kv_bytes, chunk.kv_seconds = remote.stats.nbytes, remote.stats.seconds
        if remote is not None and remote.trace is not None and chunk.trace is not None:
            chunk.trace.update(remote.trace)
        if chunk.prefill_path != "remote":
            self.prefill_speed.observe(out.num_prompt_tokens - out.num_cached_tokens, seconds)

    def _admit(self, eng: LLMEngine, req: GenerateRequest) -> PrefillJob | PrefillDeclined | None:
        """Engine thread: local prefill, or reserve blocks and return the job for a prefill worker."""
        params = req.sampling_params()
        rid = req.request_id
        if self.remote_enabled and req.allow_remote:
            bm = eng.block_manager
            cached = len(bm.peek_cached_prefix(req.prompt_token_ids)) * bm.block_size
            decision = choose_prefill_path(
                len(req.prompt_token_ids) - cached, req.prefill_queue_depth, req.num_prefill_workers,
                self.prefill_speed.tokens_per_s, self.policy,
            )  # fmt: skip
            if req.prefill_started and (decision.remote or not cached):
                # The router already runs it on a prefill worker, from the same policy with its view
                # of our cache. That view lags ours by a load poll (~0.1 s): a prompt whose blocks we
                # cached since (a follow-up sent the moment its previous turn ended) is ours to
                # prefill; otherwise only a shortage of blocks makes us prefill it here after all.
                decision = Decision(True, "prefill started early by the router")
            logger.info("[%s] prefill %s: %s", rid, "remote" if decision.remote else "local", decision.reason)
            if decision.remote:
                held = eng.reserve_remote(rid, req.prompt_token_ids, params)
                if held is not None:
                    assert self.receiver is not None
                    host, port = self.receiver.endpoint
                    job = PrefillJob(
                        request_id=rid, prompt_token_ids=req.prompt_token_ids, params=params_to_dict(params),
                        decode_worker_id=self.worker_id, kv_host=host, kv_port=port,
                        dst_block_ids=list(held.block_table), skip_tokens=held.num_cached_tokens,
                        deadline=time.time() + self.cfg.kv_timeout_s, layout=self.layout,
                    )  # fmt: skip
                    remote = _Remote(job, time.monotonic() + self.cfg.kv_timeout_s)
                    self._remote[rid] = remote
                    self._paths[rid] = remote
                    self.receiver.expect(rid, job.dst_block_ids, job.skip_tokens)
                    return job
                logger.info("[%s] no blocks to reserve: prefilling locally", rid)
        eng.add_request(rid, req.prompt_token_ids, params)
        if req.prefill_started:
            return PrefillDeclined(rid, "prefilled on the decode worker")
        return None

    # ---- KV arrival (receiver threads) → engine thread ----

    def _on_kv_done(self, done: PrefillDone, stats: TransferStats) -> None:
        mark(done.trace, "decode.kv_checked")
        self.llm.submit(lambda eng: self._complete(eng, done, stats))

    def _on_kv_failed(self, request_id: str, error: str) -> None:
        self.llm.submit(lambda eng: self._fail_remote(eng, request_id, error))

    def _complete(self, eng: LLMEngine, done: PrefillDone, stats: TransferStats) -> None:
        remote = self._remote.pop(done.request_id, None)
        if remote is None:
            eng.release_draining(done.request_id)
            return
        remote.stats = stats
        mark(done.trace, "decode.completed")
        remote.trace = done.trace
        lp = done.first_logprob
        logprob = None if lp is None else logprob_from_wire(lp)
        out = eng.complete_remote(done.request_id, done.first_token_id, logprob)
        if out is not None:
            self.llm.deliver(out)
            mark(done.trace, "decode.delivered")

    def _fail_remote(self, eng: LLMEngine, request_id: str, error: str) -> None:
        remote = self._remote.pop(request_id, None)
        if remote is None:
            eng.release_draining(request_id)  # the writer of an aborted request has stopped
            return
        remote.path = "fallback"
        eng.fall_back_to_local(request_id, error)

    def _tick(self, eng: LLMEngine) -> None:
        now = time.monotonic()
        grace = _SHM_GRACE_S if self.cfg.kv_transport in _IN_PLACE else 0.0
        for rid, remote in list(self._remote.items()):
            if now > remote.deadline + grace:
                assert self.receiver is not None
                self.receiver.cancel(rid)
                self._fail_remote(eng, rid, f"no KV within {self.cfg.kv_timeout_s:.0f} s")
        if eng.draining:
            eng.release_draining()

    # ---- aborts ----

    async def abort(self, msg: AbortRequest) -> None:
        if msg.fall_back:
            await self.llm.call(lambda eng: self._give_up_remote(eng, msg.request_id, msg.reason))
            return
        await self.llm.call(lambda eng: self._abort_and_deliver(eng, msg.request_id, msg.writer_stopped))

    def _give_up_remote(self, eng: LLMEngine, request_id: str, reason: str) -> None:
        if request_id in self._remote:
            assert self.receiver is not None
            self.receiver.cancel(request_id)
            self._fail_remote(eng, request_id, reason)

    def _abort_and_deliver(self, eng: LLMEngine, request_id: str, writer_stopped: bool) -> None:
        out = self._abort_on_engine(eng, request_id, writer_stopped)
        if out is not None:
            self.llm.deliver(out)
        if writer_stopped:
            eng.release_draining(request_id)

    def _abort_on_engine(
        self, eng: LLMEngine, request_id: str, writer_stopped: bool = False
    ) -> RequestOutput | None:
        remote = self._remote.pop(request_id, None)
        drain_s = None
        if remote is not None:
            assert self.receiver is not None
            self.receiver.cancel(request_id)
            if self.cfg.kv_transport in _IN_PLACE and not writer_stopped:
                # A prefill worker may be writing into these blocks: hold them until it stops.
                drain_s = max(remote.deadline - time.monotonic(), 0.0) + _SHM_GRACE_S
        self._paths.pop(request_id, None)
        return eng.abort_request(request_id, drain_s=drain_s)
