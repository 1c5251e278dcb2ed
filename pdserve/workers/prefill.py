"""Prefill worker: pulls remote-prefill jobs from the router's shared queue, runs each prompt,
and pushes its KV into the decode worker's reserved blocks layer by layer as the forward pass
produces it, then the first token. It only pulls while it has room, so the queue's depth is the
pool's real backlog (the signal to scale the prefill pool on).

It also serves whole requests (prefill and decode, streamed back as a co-located worker streams
them) that a router with `--prefill-serves-whole` sends it while it has no prefill work
(router/whole_policy.py). Those run in the same engine as the jobs; the scheduler serves running
requests first, so a job pulled later shares each step with at most the router's cap of decodes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import httpx

from pdserve import envs
from pdserve.config import EngineConfig, WorkerConfig, resolve_kv_push
from pdserve.engine.async_llm import AsyncLLM
from pdserve.engine.engine import LLMEngine
from pdserve.engine.kv_output import KVStreamer
from pdserve.engine.request import Request
from pdserve.kv_transfer import make_sender
from pdserve.outputs import RequestOutput, TokenLogprob
from pdserve.protocol import (
    AbortRequest,
    GenerateRequest,
    PrefillDestination,
    PrefillFirstToken,
    PrefillJob,
    PrefillJobPull,
    TokenChunk,
    WorkerInfo,
    WorkerLoad,
    decode,
    encode,
    frame,
)
from pdserve.trace import mark
from pdserve.workers.common import kv_layout, worker_load
from pdserve.workers.first_token import first_token_message
from pdserve.workers.generate_stream import stream_frames

logger = logging.getLogger(__name__)

# Long-poll length of one pull; the router answers 204 when nothing came in that time.
_PULL_TIMEOUT_S = 1.0
_RETRY_S = 0.5


class PrefillWorker:
    def __init__(
        self, cfg: WorkerConfig, engine_cfg: EngineConfig, secret: bytes, url: str, token: str
    ) -> None:
        self.cfg = cfg
        self.url = url
        self.token = token
        self.llm = AsyncLLM(engine_cfg)
        engine = self.llm.engine
        self.layout = kv_layout(engine)
        self.worker_id = cfg.worker_id or f"prefill-{cfg.port}"
        self.sender = make_sender(
            cfg.kv_transport,
            self.layout,
            self.worker_id,
            secret,
            cfg.kv_wire_dtype,
            on_error=self._on_send_error,
        )
        self.sender.on_abort = self._on_decode_abort  # type: ignore[method-assign]
        self.streamer = KVStreamer(
            self.sender,
            engine.kv_caches,
            engine.block_manager.block_size,
            cfg.kv_layers_per_chunk,
            push=resolve_kv_push(cfg.kv_push, cfg.kv_transport),
        )
        engine.kv_streamer = self.streamer
        self.streamer.on_first_token = self._first_token_sampled
        self._jobs: dict[str, PrefillJob] = {}  # in flight here
        # Jobs that failed or were aborted here before their destination was known: the decode
        # worker is told once it arrives (request id -> (error, the job's deadline)).
        self._failed: dict[str, tuple[str, float]] = {}
        self._puller: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # The routers following this worker's first tokens (`first_tokens`): one queue of frames each.
        self._feeds: set[asyncio.Queue[bytes]] = set()
        self._first_token_shift = envs.fault_first_token_shift()
        self.llm.on_tick = self._tick
        self.llm.abort_fn = lambda eng, rid: self._end(eng, rid, "aborted on the prefill worker")

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.llm.start()
        self._puller = self._loop.create_task(self._pull_loop())

    async def shutdown(self) -> None:
        if self._puller is not None:
            self._puller.cancel()
        await self.llm.shutdown()
        self.sender.close()

    def info(self) -> WorkerInfo:
        return WorkerInfo(
            self.worker_id,
            "prefill",
            self.url,
            self.cfg.host,
            0,
            self.layout,
            self.llm.model_name,
            self.llm.max_model_len,
        )

    def load(self) -> WorkerLoad:
        events = self.llm.engine.block_manager.drain_events()
        return worker_load(self.worker_id, self.llm, 0, events)

    # ---- whole requests (from a router with --prefill-serves-whole) ----

    def generate(self, req: GenerateRequest) -> AsyncIterator[bytes]:
        return stream_frames(self.llm, req, lambda eng: self._admit_whole(eng, req), self._first_token)

    def _admit_whole(self, eng: LLMEngine, req: GenerateRequest) -> None:
        eng.add_request(req.request_id, req.prompt_token_ids, req.sampling_params())
        logger.info("[%s] serving whole (%d prompt tokens)", req.request_id, len(req.prompt_token_ids))

    @staticmethod
    def _first_token(chunk: TokenChunk, out: RequestOutput, seconds: float) -> None:
        chunk.prefill_path = "whole"

    # ---- remote-prefill jobs ----

    def _has_room(self) -> bool:
        stats = self.llm.stats()
        max_seqs = self.llm.engine.scheduler.max_num_seqs
        # Keep at most one job queued behind the running ones: the rest wait in the shared queue,
        # where an idle prefill worker can take them.
        return stats.num_waiting < 1 and stats.num_running < max_seqs

    async def _pull_loop(self) -> None:
        assert self.cfg.router_url is not None
        headers = {"x-pdserve-token": self.token}
        async with httpx.AsyncClient(base_url=self.cfg.router_url, headers=headers, timeout=10.0) as client:
            while True:
                if not self._has_room():
                    await asyncio.sleep(0.005)
                    continue
                try:
                    resp = await client.post(
                        "/internal/prefill/pull",
                        content=encode(PrefillJobPull(self.worker_id, _PULL_TIMEOUT_S)),
                    )
                except httpx.HTTPError as e:
                    logger.debug("prefill pull failed: %s", e)
                    await asyncio.sleep(_RETRY_S)
                    continue
                if resp.status_code == 204:
                    continue
                if resp.status_code != 200:
                    logger.warning("prefill pull: HTTP %d %s", resp.status_code, resp.text[:200])
                    await asyncio.sleep(_RETRY_S)
                    continue
                job = decode(resp.content, PrefillJob)
                mark(job.trace, "prefill.received")
                await self._start_job(job)

    async def _start_job(self, job: PrefillJob) -> None:
        rid = job.request_id
        if time.time() > job.deadline:
            logger.info("[%s] prefill job expired before it started", rid)
            return
        try:
            await self.llm.call(lambda eng: self._add_job(eng, job))
        except ValueError as e:
            self._fail(job, str(e))
            return
        logger.info(
            "[%s] prefill job started (%d tokens, %d cached on decode)",
            rid,
            len(job.prompt_token_ids),
            job.skip_tokens,
        )

    def set_destination(self, dest: PrefillDestination) -> None:
        """Event loop: where the KV of a job taken early goes (the router got it from the decode
        worker). Offered at once, since the job may be in the middle of its forward; a job whose
        forward has ended is flushed on the engine thread."""
        self.streamer.offer_destination(dest)
        self.llm.submit(lambda eng: self._after_destination(eng, dest))

    # ---- the first token, straight to the router (router/direct_first_token.py) ----

    def _first_token_sampled(self, req: Request, token_id: int, logprob: TokenLogprob | None) -> None:
        """Engine thread, at sampling: the router streams it while the completion is on its way."""
        job = req.kv_job
        assert job is not None and self._loop is not None
        if not job.first_token_to_router:
            return
        eng = self.llm.engine
        if self._first_token_shift:  # fault injection: a first token the decode worker disagrees with
            token_id, logprob = (token_id + self._first_token_shift) % eng.arch.vocab_size, None
        msg = first_token_message(job, token_id, logprob, eng.tokenizer, eng.eos_token_ids)
        if msg is not None:
            self._loop.call_soon_threadsafe(self._feed_first_token, msg)

    def _feed_first_token(self, msg: PrefillFirstToken) -> None:
        """Event loop: onto every router's feed; with none following, the decode worker's stream
        still carries the token."""
        mark(msg.trace, "prefill.first_token_sent")
        data = frame(msg)
        for feed in self._feeds:
            feed.put_nowait(data)

    async def first_tokens(self) -> AsyncIterator[bytes]:
        """A router's feed of this worker's first tokens (`GET /worker/prefill/first_tokens`): one
        long-lived stream, so each token costs a frame on an open connection, not a request."""
        feed: asyncio.Queue[bytes] = asyncio.Queue()
        self._feeds.add(feed)
        try:
            while True:
                yield await feed.get()
        finally:
            self._feeds.discard(feed)

    # ---- engine thread ----

    def _after_destination(self, eng: LLMEngine, dest: PrefillDestination) -> None:
        rid = dest.request_id
        if self.streamer.flush_parked(rid):
            # Its copies are queued on the stream ahead of any later writer of these blocks.
            eng.release_draining(rid)
            self._jobs.pop(rid, None)
            logger.info("[%s] destination came after the prefill: KV and first token sent now", rid)
            return
        failed = self._failed.pop(rid, None)
        if failed is not None:
            self.streamer.drop(rid)
            job = PrefillJob(rid, [], {}, "", "", 0, [], 0, 0.0)
            job.set_destination(dest)
            self.sender.send_failed(job, failed[0])

    def _fail(self, job: PrefillJob, error: str) -> None:
        """Tell the decode side no more writes are coming: now, or once it is known."""
        if not job.has_destination:
            self._failed[job.request_id] = (error, job.deadline)
        self.streamer.send_failed(job, error)

    def _add_job(self, eng: LLMEngine, job: PrefillJob) -> None:
        eng.add_prefill_job(job)
        mark(job.trace, "prefill.admitted")
        self._jobs[job.request_id] = job

    def _tick(self, eng: LLMEngine) -> None:
        # Parked jobs past their deadline: the decode side has prefilled locally by now.
        if eng.draining:
            eng.release_draining()
            for rid in [r for r in self.streamer.parked if r not in eng.draining]:
                self.streamer.drop(rid)
        now = time.time()
        self.streamer.expire_arrivals(now)
        for rid in [r for r, (_, deadline) in list(self._failed.items()) if deadline < now]:
            del self._failed[rid]
        # A job whose request the engine has finished needs no terminal message on abort any more.
        for rid in [
            r for r in self._jobs if r not in eng.scheduler.requests and r not in self.streamer.parked
        ]:
            del self._jobs[rid]

    # ---- aborts: from the router, from the decode side, or a broken link ----

    async def abort(self, msg: AbortRequest) -> None:
        await self.llm.call(lambda eng: self._abort_on_engine(eng, msg.request_id, "aborted"))

    def _on_decode_abort(self, request_id: str) -> None:
        self.llm.submit(lambda eng: self._abort_on_engine(eng, request_id, "decode side gave it up"))

    def _on_send_error(self, request_id: str, error: str) -> None:
        self.llm.submit(lambda eng: self._abort_on_engine(eng, request_id, error))

    def _abort_on_engine(self, eng: LLMEngine, request_id: str, reason: str) -> None:
        out = self._end(eng, request_id, reason)
        if out is not None:
            self.llm.deliver(out)  # ends a whole request's stream; a job has none, so a no-op

    def _end(self, eng: LLMEngine, request_id: str, reason: str) -> RequestOutput | None:
        """Abort a request or job here (also what a failed engine step does to each)."""
        out = eng.abort_request(request_id)
        parked = request_id in self.streamer.parked
        job = self._jobs.pop(request_id, None)
        if job is not None:
            self._fail(job, reason)  # the streamer forgets what it held for the job
        if parked:  # nothing was pushed from its blocks: free them now
            eng.release_draining(request_id)
        return out
