"""AsyncLLM: the engine on a background thread, streaming deltas to asyncio callers.

torch releases the GIL inside its kernels, so one engine thread next to the HTTP event loop
keeps both busy. Work crosses into the thread as calls on a queue (the engine is touched by
that thread only); outputs cross back onto each caller's own queue, a whole step's outputs in one
call_soon_threadsafe per event loop (each such call writes to the loop's wake-up pipe).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import logging
import queue
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from pdserve.config import EngineConfig
from pdserve.engine.client import EngineStats
from pdserve.engine.engine import KVCacheFactory, LLMEngine, use_device
from pdserve.engine.loader import LoadedModel
from pdserve.engine.step_stats import Stopwatch
from pdserve.outputs import RequestOutput
from pdserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# How long the idle engine thread sleeps on its queue before running periodic work again.
_IDLE_POLL_S = 0.02

T = TypeVar("T")


@dataclass
class _Call:
    fn: Callable[[LLMEngine], Any]
    future: concurrent.futures.Future[Any] | None


def _put_all(items: list[tuple[asyncio.Queue[RequestOutput], RequestOutput]]) -> None:
    for stream_queue, out in items:
        stream_queue.put_nowait(out)


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[RequestOutput]


class AsyncLLM:
    def __init__(
        self,
        config: EngineConfig,
        loaded: LoadedModel | None = None,
        kv_cache_factory: KVCacheFactory | None = None,
    ) -> None:
        self.engine = LLMEngine(config, loaded, kv_cache_factory)
        self.model_name = self.engine.model_name
        self.max_model_len = self.engine.max_model_len
        self.tokenizer = self.engine.tokenizer
        self._calls: queue.Queue[_Call] = queue.Queue()
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._stats = self.engine.stats()
        # Runs on the engine thread every loop iteration (deadlines, leases).
        self.on_tick: Callable[[LLMEngine], None] | None = None
        # How an abort is carried out on the engine thread (a decode worker may hold blocks).
        self.abort_fn: Callable[[LLMEngine, str], RequestOutput | None] = lambda eng, rid: eng.abort_request(
            rid
        )

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="pdserve-engine", daemon=True)
            self._thread.start()

    async def shutdown(self) -> None:
        self._stop.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10.0)
            self._thread = None

    def stats(self) -> EngineStats:
        # The counters are read live (monotonic numbers, each read whole under the GIL).
        return dataclasses.replace(self._stats, engine_counters={"local": self.engine.counters()})

    # ---- asyncio side ----

    def open_stream(self, request_id: str) -> None:
        """Register a request's output queue; do this before the engine may produce output for it."""
        if self._thread is None:
            raise RuntimeError("AsyncLLM.start() was not called")
        with self._lock:
            if request_id in self._streams:
                raise ValueError(f"duplicate request id {request_id!r}")
            self._streams[request_id] = _Stream(asyncio.get_running_loop(), asyncio.Queue())

    def close_stream(self, request_id: str) -> None:
        """Forget a stream that will never be read (its request was refused at admission)."""
        with self._lock:
            self._streams.pop(request_id, None)

    async def stream(self, request_id: str) -> AsyncIterator[RequestOutput]:
        """Yield the request's outputs until it finishes. Leaving early (client gone, cancelled)
        aborts it, so its KV blocks free at once."""
        async with contextlib.aclosing(self.stream_batches(request_id)) as batches:
            async for batch in batches:
                for out in batch:
                    yield out

    async def stream_batches(self, request_id: str) -> AsyncGenerator[list[RequestOutput], None]:
        """Like stream(), but each item is every output that is waiting when the caller comes
        back for more (at least one), oldest first: a caller slower than the engine can send them
        on together instead of paying its per-message cost once per token."""
        with self._lock:
            stream = self._streams[request_id]
        pending = stream.queue
        finished = False
        try:
            while not finished:
                out = await pending.get()
                batch = [out]
                finished = out.finished
                while not finished and not pending.empty():
                    out = pending.get_nowait()
                    batch.append(out)
                    finished = out.finished
                yield batch
        finally:
            with self._lock:
                self._streams.pop(request_id, None)
            if not finished:
                self.submit(lambda eng: self._abort_and_deliver(request_id))

    async def call(self, fn: Callable[[LLMEngine], T]) -> T:
        """Run fn(engine) on the engine thread and return its result."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._calls.put(_Call(fn, future))
        return await asyncio.wrap_future(future)

    def submit(self, fn: Callable[[LLMEngine], Any]) -> None:
        """Run fn(engine) on the engine thread, fire and forget (callable from any thread)."""
        self._calls.put(_Call(fn, None))

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        self.engine.validate(prompt_token_ids, params)  # raise ValueErrors in the caller, not the thread
        self.open_stream(request_id)
        self.submit(lambda eng: self._add(request_id, prompt_token_ids, params))
        async for out in self.stream(request_id):
            yield out

    async def abort(self, request_id: str) -> None:
        self.submit(lambda eng: self._abort_and_deliver(request_id))

    # ---- engine thread ----

    def deliver(self, out: RequestOutput) -> None:
        self.deliver_all([out])

    def deliver_all(self, outputs: list[RequestOutput]) -> None:
        """Hand outputs to their streams with one call_soon_threadsafe per event loop."""
        by_loop: dict[
            asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[RequestOutput], RequestOutput]]
        ] = {}
        with self._lock:
            for out in outputs:
                stream = self._streams.get(out.request_id)
                if stream is not None:
                    by_loop.setdefault(stream.loop, []).append((stream.queue, out))
        for loop, items in by_loop.items():
            loop.call_soon_threadsafe(_put_all, items)

    def _add(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        with self._lock:
            if request_id not in self._streams:
                return  # the caller left before the engine saw the request
        try:
            self.engine.add_request(request_id, prompt_token_ids, params)
        except ValueError as e:
            self.deliver(
                RequestOutput(request_id, [], "", finished=True, finish_reason="error", error=str(e))
            )

    def _abort_and_deliver(self, request_id: str) -> None:
        out = self.abort_fn(self.engine, request_id)
        if out is not None:
            self.deliver(out)

    def _run(self) -> None:
        use_device(self.engine.device)
        stats = self.engine.step_stats
        while not self._stop.is_set():
            self._drain_calls(block=not self.engine.has_unfinished())
            watch = Stopwatch()  # after the wait for work: idle time is counted nowhere
            if self.on_tick is not None:
                self.on_tick(self.engine)
            stats.calls_s += watch.lap()
            if not self.engine.has_unfinished():
                continue
            try:
                outputs = self.engine.step()
            except Exception:
                logger.exception("engine step failed; failing all in-flight requests")
                outputs = self._fail_all()
            watch.lap()  # the step counts its own phases
            self._stats = self.engine.stats()
            self.deliver_all(outputs)
            stats.deliver_s += watch.lap()
        self.deliver_all(self._fail_all())

    def _drain_calls(self, block: bool) -> None:
        try:
            call = self._calls.get(timeout=_IDLE_POLL_S) if block else self._calls.get_nowait()
        except queue.Empty:
            return
        watch = Stopwatch()
        while True:
            self._run_call(call)
            try:
                call = self._calls.get_nowait()
            except queue.Empty:
                break
        self._stats = self.engine.stats()
        self.engine.step_stats.calls_s += watch.lap()

    def _run_call(self, call: _Call) -> None:
        try:
            result = call.fn(self.engine)
        except Exception as e:
            if call.future is None:
                logger.exception("engine call failed")
            else:
                call.future.set_exception(e)
            return
        if call.future is not None:
            call.future.set_result(result)

    def _fail_all(self) -> list[RequestOutput]:
        outputs = []
        for request_id in list(self.engine.scheduler.requests):
            # As the worker aborts (a decode worker keeps blocks a prefill worker may be writing;
            # a prefill worker tells the decode side its job is over).
            out = self.abort_fn(self.engine, request_id)
            if out is not None:
                out.finish_reason, out.error = "error", "internal engine error"
                outputs.append(out)
        return outputs
