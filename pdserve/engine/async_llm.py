"""AsyncLLM: the engine on a background thread, streaming deltas to asyncio callers.

torch releases the GIL inside its kernels, so one engine thread next to the HTTP event loop
keeps both busy. Commands (add/abort) cross into the thread through a queue; outputs cross back
with call_soon_threadsafe onto each caller's own asyncio queue.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

from pdserve.config import EngineConfig
from pdserve.engine.client import EngineStats
from pdserve.engine.engine import LLMEngine
from pdserve.engine.loader import LoadedModel
from pdserve.outputs import RequestOutput
from pdserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# How long the idle engine thread sleeps on its command queue before checking for shutdown.
_IDLE_POLL_S = 0.05


@dataclass
class _Add:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams


@dataclass
class _Abort:
    request_id: str


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[RequestOutput]


class AsyncLLM:
    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None) -> None:
        self.engine = LLMEngine(config, loaded)
        self.model_name = self.engine.model_name
        self.max_model_len = self.engine.max_model_len
        self.tokenizer = self.engine.tokenizer
        self._commands: queue.Queue[_Add | _Abort] = queue.Queue()
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._stats = self.engine.stats()

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
        return self._stats

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        self.engine.validate(prompt_token_ids, params)  # raise ValueErrors in the caller, not the thread
        if self._thread is None:
            raise RuntimeError("AsyncLLM.start() was not called")
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        with self._lock:
            if request_id in self._streams:
                raise ValueError(f"duplicate request id {request_id!r}")
            self._streams[request_id] = stream
        self._commands.put(_Add(request_id, prompt_token_ids, params))
        finished = False
        try:
            while not finished:
                out = await stream.queue.get()
                finished = out.finished
                yield out
        finally:
            with self._lock:
                self._streams.pop(request_id, None)
            if not finished:
                # The caller went away (client disconnect, cancellation): free the KV now.
                self._commands.put(_Abort(request_id))

    async def abort(self, request_id: str) -> None:
        self._commands.put(_Abort(request_id))

    # ---- engine thread ----

    def _run(self) -> None:
        while not self._stop.is_set():
            self._drain_commands(block=not self.engine.has_unfinished())
            if not self.engine.has_unfinished():
                continue
            try:
                outputs = self.engine.step()
            except Exception:
                logger.exception("engine step failed; failing all in-flight requests")
                outputs = self._fail_all()
            self._stats = self.engine.stats()
            for out in outputs:
                self._deliver(out)
        for out in self._fail_all():
            self._deliver(out)

    def _drain_commands(self, block: bool) -> None:
        try:
            cmd = self._commands.get(timeout=_IDLE_POLL_S) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            self._apply(cmd)
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                break
        self._stats = self.engine.stats()

    def _apply(self, cmd: _Add | _Abort) -> None:
        if isinstance(cmd, _Abort):
            out = self.engine.abort_request(cmd.request_id)
            if out is not None:
                self._deliver(out)
            return
        with self._lock:
            if cmd.request_id not in self._streams:
                return  # the caller already left before the engine saw the request
        try:
            self.engine.add_request(cmd.request_id, cmd.prompt_token_ids, cmd.params)
        except ValueError as e:
            self._deliver(
                RequestOutput(cmd.request_id, [], "", finished=True, finish_reason="error", error=str(e))
            )

    def _fail_all(self) -> list[RequestOutput]:
        outputs = []
        for request_id in list(self.engine.scheduler.requests):
            out = self.engine.abort_request(request_id)
            if out is not None:
                out.finish_reason, out.error = "error", "internal engine error"
                outputs.append(out)
        return outputs

    def _deliver(self, out: RequestOutput) -> None:
        with self._lock:
            stream = self._streams.get(out.request_id)
        if stream is not None:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, out)
