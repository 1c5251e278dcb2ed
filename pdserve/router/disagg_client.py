"""The router's EngineClient: a pool of decode/colocated workers and a prefill pool behind them.

Per request: pick a decode worker (KV-aware or round-robin), stream its frames back as
RequestOutputs, and put any PrefillJob it emits on the shared prefill queue. With a WholePolicy
(`--prefill-serves-whole`), a short request may instead be served whole by an idle prefill worker
(router/whole_policy.py); if that worker fails before its first token, the decode worker serves it.
Aborts reach both sides at once: the queue gives the job up (or names the prefill worker holding
it), the decode worker frees its blocks, the prefill worker stops. A poller keeps every worker's
load, health and KV events (for the prefix index) fresh.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

import httpx

from pdserve.outputs import RequestOutput
from pdserve.protocol import (
    AbortRequest,
    GenerateRequest,
    PrefillDeclined,
    PrefillFirstToken,
    PrefillJob,
    ProtocolError,
    TokenChunk,
    params_to_dict,
)
from pdserve.router.direct_first_token import (
    FirstTokenInboxes,
    as_original,
    continuation_params,
    direct_output,
    relay,
    strip_first,
)
from pdserve.router.early_prefill import EarlyPrefills
from pdserve.router.health import WorkerHealth
from pdserve.router.policy import Candidate, RoundRobin, pick_kv_aware
from pdserve.router.prefill_queue import PrefillQueue
from pdserve.router.prefix_index import PrefixIndex
from pdserve.router.request_events import RequestEvents
from pdserve.router.whole_policy import PrefillCandidate, WholePolicy, choose_whole_target
from pdserve.router.worker_calls import fetch_info, follow_first_tokens, post_abort, stream_generate
from pdserve.router.worker_handle import WorkerHandle
from pdserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class _FailedBeforeOutput(Exception):
    """A worker failed before it sent anything: the request may still be served elsewhere."""


class DisaggClient(WorkerHealth):
    def __init__(
        self,
        worker_urls: list[str],
        token: str,
        tokenizer: Any,
        routing: str = "kv_aware",
        whole: WholePolicy | None = None,
        early_prefill: bool = True,
        first_token_from_prefill: bool = True,
    ) -> None:
        if routing not in ("kv_aware", "round_robin"):
            raise ValueError(f"routing must be kv_aware|round_robin, got {routing!r}")
        self.worker_urls = worker_urls
        self.tokenizer = tokenizer
        self.routing = routing
        self.whole = whole  # None: prefill workers only prefill
        self._round_robin = RoundRobin()
        # One connection per open request stream, and no cap on them: httpx's default pool of 100
        # would queue request 101 until another request finished, while the workers (which bound
        # their own batches) still had room.
        self._http = httpx.AsyncClient(
            headers={"x-pdserve-token": token},
            timeout=httpx.Timeout(10.0),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=256),
        )
        self.workers: dict[str, WorkerHandle] = {}
        self.queue = PrefillQueue()
        # Remote prefills queued at routing (router/early_prefill.py); None: decode workers decide first.
        self.early = (
            EarlyPrefills(self.queue, self._http, self.workers, self._post_abort) if early_prefill else None
        )
        # Remote prefills whose first token the prefill worker streams here (router/direct_first_token.py).
        self.first_tokens = FirstTokenInboxes() if first_token_from_prefill else None
        self.prefix_index: PrefixIndex | None = None
        self.model_name = ""
        self.max_model_len = 0
        self._poller: asyncio.Task[None] | None = None
        self._feeds: list[asyncio.Task[None]] = []  # one per prefill worker: its first tokens
        self._streams: dict[str, str] = {}  # request id -> the worker streaming it
        # Called once per request when its first chunk arrives: (events) → metrics.
        self.on_first_chunk: Callable[[RequestEvents], None] | None = None

    # ---- lifecycle ----

    async def start(self, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        infos = await asyncio.gather(*(fetch_info(self._http, url, deadline) for url in self.worker_urls))
        for info in infos:
            self.workers[info.worker_id] = WorkerHandle(info)
        decoders = self.decode_workers(healthy_only=False)
        if not decoders:
            raise ValueError("a deployment needs at least one decode or colocated worker")
        ref = decoders[0].info
        for w in decoders[1:]:
            diff = ref.layout.incompatibility(w.info.layout)
            if diff:
                raise ValueError(
                    f"decode workers {ref.worker_id} and {w.worker_id} have different KV layouts: {diff}"
                )
        for w in self.prefill_workers(healthy_only=False):
            w.incompatible = ref.layout.incompatibility(w.info.layout)
            if w.incompatible:
                logger.error(
                    "prefill worker %s refused: incompatible KV layout (%s)", w.worker_id, w.incompatible
                )
        self.model_name = ref.model_name
        self.max_model_len = min(w.info.max_model_len for w in decoders)
        self.prefix_index = PrefixIndex(ref.layout.block_size)
        loop = asyncio.get_running_loop()
        self._poller = loop.create_task(self._poll_loop())
        if self.first_tokens is not None:
            self._feeds = [
                loop.create_task(follow_first_tokens(self._http, w, self.first_tokens.deliver))
                for w in self.prefill_workers(healthy_only=False)
            ]

    async def shutdown(self) -> None:
        for task in [self._poller, *self._feeds]:
            if task is not None:
                task.cancel()
        await self._http.aclose()

    # ---- pools ----

    def prefill_pull_allowed(self, worker_id: str) -> str | None:
        """None if this prefill worker may take jobs; else why not."""
        w = self.workers.get(worker_id)
        if w is None or w.info.role != "prefill":
            return f"unknown prefill worker {worker_id!r}"
        if w.incompatible:
            return f"incompatible KV layout: {w.incompatible}"
        return None

    def _candidates(self, prompt: list[int], workers: list[WorkerHandle]) -> list[Candidate]:
        assert self.prefix_index is not None
        overlap = self.prefix_index.overlap(prompt, [w.worker_id for w in workers])
        in_flight = Counter(self._streams.values())
        return [w.candidate(overlap[w.worker_id], in_flight[w.worker_id]) for w in workers]

    def _pick(self, prompt: list[int]) -> WorkerHandle:
        decoders = self.decode_workers()
        if not decoders:
            raise RuntimeError("no healthy decode worker")
        cands = self._candidates(prompt, decoders)
        wid = (
            pick_kv_aware(cands, len(prompt)) if self.routing == "kv_aware" else self._round_robin.pick(cands)
        )
        return self.workers[wid]

    def _pick_whole(self, request_id: str, prompt: list[int], decoder: WorkerHandle) -> WorkerHandle | None:
        """The prefill worker that serves this request whole, if the WholePolicy says one should."""
        if self.whole is None:
            return None
        decode, *prefill = self._candidates(prompt, [decoder, *self.prefill_workers()])
        jobs = self.queue.in_flight_by_worker()
        cands = [
            PrefillCandidate(
                c.worker_id, c.cached_tokens, c.num_running, c.num_waiting, c.kv_usage, jobs[c.worker_id]
            )
            for c in prefill
        ]
        decision = choose_whole_target(len(prompt), decode, self.queue.depth, cands, self.whole)
        if decision.worker_id is None:
            return None
        logger.info("[%s] served whole by %s: %s", request_id, decision.worker_id, decision.reason)
        return self.workers[decision.worker_id]

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        arrival = time.monotonic()
        decoder = self._pick(prompt_token_ids)
        whole = self._pick_whole(request_id, prompt_token_ids, decoder)
        if whole is not None:
            try:
                serving = self._serve(
                    request_id, prompt_token_ids, params, whole, arrival, may_fail_over=True
                )
                async with contextlib.aclosing(serving) as outs:
                    async for out in outs:
                        yield out
                return
            except _FailedBeforeOutput as e:
                # Like a failed remote prefill falling back to a local one: the client sees nothing.
                logger.warning(
                    "[%s] prefill worker %s failed before the first token (%s): serving it on %s",
                    request_id, whole.worker_id, e, decoder.worker_id,
                )  # fmt: skip
        early = None
        if self.early is not None and self.prefix_index is not None:
            early = self.early.job_for(
                request_id, prompt_token_ids, params_to_dict(params), decoder, self.prefix_index,
                len(self.prefill_workers()),
            )  # fmt: skip
        async with contextlib.aclosing(
            self._serve(request_id, prompt_token_ids, params, decoder, arrival, early=early)
        ) as outs:
            async for out in outs:
                yield out

    async def _serve(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        worker: WorkerHandle,
        arrival: float,
        may_fail_over: bool = False,
        early: PrefillJob | None = None,
    ) -> AsyncGenerator[RequestOutput, None]:
        """Stream the request from `worker`. may_fail_over: if the worker fails before any output,
        raise _FailedBeforeOutput (after aborting it there) instead of yielding an error. early: this
        request's prefill job, queued now, before the decode worker decides (router/early_prefill.py)."""
        body = GenerateRequest(
            request_id, prompt_token_ids, params_to_dict(params),
            prefill_queue_depth=self.queue.depth, num_prefill_workers=len(self.prefill_workers()),
            allow_remote=worker.info.role == "decode", prefill_started=early is not None,
        )  # fmt: skip
        events = RequestEvents(worker.worker_id, arrival=arrival, routed=time.monotonic())
        self._streams[request_id] = worker.worker_id
        stream: AsyncIterator[object] = stream_generate(self._http, worker, body)
        if early is not None and self.first_tokens is not None:
            early.first_token_to_router = True
            stream = relay(stream, self.first_tokens.open(request_id))
        direct: PrefillFirstToken | None = None  # the first token, if the prefill worker's came first
        disagreed: TokenChunk | None = None  # the decode worker's first chunk, if it has another token
        finished = False
        sent = False
        try:
            if early is not None:
                events.enqueued = time.monotonic()
                await self.queue.put(early)
            async with contextlib.aclosing(stream):  # type: ignore[type-var]
                async for msg in stream:
                    if isinstance(msg, PrefillFirstToken):
                        if sent:
                            continue  # the decode worker's came first
                        direct, sent = msg, True
                        events.first_token = time.monotonic()
                        yield direct_output(msg)
                        continue
                    if isinstance(msg, PrefillJob):
                        if self.early is not None and early is not None:
                            msg.first_token_to_router = early.first_token_to_router
                            await self.early.route_destination(msg, worker, len(self.prefill_workers()))
                            continue
                        events.enqueued = time.monotonic()
                        await self.queue.put(msg)
                        continue
                    if isinstance(msg, PrefillDeclined):
                        assert self.early is not None
                        if self.first_tokens is not None and direct is None:
                            self.first_tokens.close(request_id)  # the job is withdrawn: none will come
                        await self.early.withdraw(request_id)
                        events.enqueued = None
                        continue
                    assert isinstance(msg, TokenChunk)
                    if msg.prefill_path is not None:
                        stripped = strip_first(msg, direct) if direct is not None else msg
                        self._first_chunk(msg, events, direct, disagrees=stripped is None)
                        if stripped is None:
                            disagreed = msg
                            break
                        msg = stripped
                    out = msg.to_output()
                    finished = out.finished
                    if finished:
                        out.phases = events.phases(time.monotonic())
                    if out.new_token_ids or finished or out.new_text:
                        sent = True
                        yield out
            if disagreed is not None and direct is not None:
                rest = self._continue(request_id, prompt_token_ids, params, worker, direct, disagreed)
                async for out in rest:
                    finished = out.finished
                    yield out
            if not finished:
                raise ConnectionError(f"the {worker.info.role} worker's stream ended early")
        except (httpx.HTTPError, ConnectionError, ProtocolError) as e:
            logger.warning("[%s] %s worker %s failed: %s", request_id, worker.info.role, worker.worker_id, e)
            finished = True
            await self._abort_everywhere(request_id, worker)
            if may_fail_over and not sent:
                raise _FailedBeforeOutput(str(e) or type(e).__name__) from e
            yield RequestOutput(
                request_id, [], "", finished=True, finish_reason="error",
                error=f"{worker.info.role} worker {worker.worker_id} failed: {e}",
            )  # fmt: skip
        finally:
            self._streams.pop(request_id, None)
            if self.first_tokens is not None:
                self.first_tokens.close(request_id)
            if not finished:
                await asyncio.shield(self._abort_everywhere(request_id, worker))
            if self.early is not None:
                self.early.forget(request_id)

    def _first_chunk(
        self, msg: TokenChunk, events: RequestEvents, direct: PrefillFirstToken | None, disagrees: bool
    ) -> None:
        """The decode worker's first chunk: how the prompt was prefilled, and the path's marks."""
        if self.first_tokens is not None:
            self.first_tokens.close(msg.request_id)  # a first token posted later is not needed
        if events.first_token is None:
            events.first_token = time.monotonic()
        events.pulled = self.queue.pulled_at(msg.request_id)
        self.queue.done(msg.request_id)
        events.prefill_path, events.kv_bytes, events.kv_seconds = (
            msg.prefill_path,
            msg.kv_bytes,
            msg.kv_seconds,
        )
        events.trace = {**direct.trace, **(msg.trace or {})} if direct is not None else msg.trace or {}
        events.first_token_from = "prefill_worker" if direct is not None else "serving_worker"
        events.first_token_disagreed = disagrees
        if self.on_first_chunk is not None:
            self.on_first_chunk(events)

    async def _continue(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        worker: WorkerHandle,
        direct: PrefillFirstToken,
        theirs: TokenChunk,
    ) -> AsyncGenerator[RequestOutput, None]:
        """The client has the prefill worker's first token, the decode worker sampled another (it
        prefilled the prompt itself after a failed transfer): serve the rest as a continuation of
        prompt + the client's token, under a request id of its own."""
        logger.warning(
            "[%s] first token %d streamed from the prefill worker, the decode worker has %s: "
            "continuing from the streamed one", request_id, direct.token_id, theirs.new_token_ids[:1],
        )  # fmt: skip
        await self._abort_everywhere(request_id, worker)
        rest = self._serve(
            f"{request_id}-cont", [*prompt_token_ids, direct.token_id], continuation_params(params),
            worker, time.monotonic(),
        )  # fmt: skip
        async with contextlib.aclosing(rest) as outs:
            async for out in outs:
                yield as_original(out, request_id)

    async def abort(self, request_id: str) -> None:
        wid = self._streams.get(request_id)
        if wid is not None:
            await self._abort_everywhere(request_id, self.workers[wid])

    async def _abort_everywhere(self, request_id: str, decode_worker: WorkerHandle) -> None:
        state, prefill_id = self.queue.cancel(request_id)
        # A prefill worker writes into the decode worker's blocks only once it knows where they are.
        stopped = state != "in_flight" or (self.early is not None and not self.early.may_write(request_id))
        calls = [self._post_abort(decode_worker, AbortRequest(request_id, "client", writer_stopped=stopped))]
        if state == "in_flight" and prefill_id in self.workers:
            calls.append(self._post_abort(self.workers[prefill_id], AbortRequest(request_id, "client")))
        await asyncio.gather(*calls)

    async def _post_abort(self, worker: WorkerHandle, msg: AbortRequest) -> None:
        await post_abort(self._http, worker, msg)
