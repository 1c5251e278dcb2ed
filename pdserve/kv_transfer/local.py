"""local transport: sender and receiver in one process (tests, single-process deployments).
Chunks are scattered into the receiver's cache synchronously; no bytes are serialised."""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch

from pdserve.kv_transfer.base import (
    KVReceiver,
    KVSender,
    OnDone,
    OnFailed,
    slots_for,
    write_kv,
)
from pdserve.protocol import KVLayout, PrefillDone, PrefillJob

_REGISTRY: dict[int, LocalKVReceiver] = {}
_REGISTRY_LOCK = threading.Lock()
_next_port = iter(range(1, 1 << 30))


class LocalKVReceiver(KVReceiver):
    def __init__(
        self, layout: KVLayout, kv_caches: list[torch.Tensor], on_done: OnDone, on_failed: OnFailed
    ) -> None:
        super().__init__(layout, kv_caches, on_done, on_failed)
        with _REGISTRY_LOCK:
            self._port = next(_next_port)
            _REGISTRY[self._port] = self

    @property
    def endpoint(self) -> tuple[str, int]:
        return "local", self._port

    def close(self) -> None:
        with _REGISTRY_LOCK:
            _REGISTRY.pop(self._port, None)

    def accept(self, job: PrefillJob, layer_start: int, kv: torch.Tensor, start: int) -> bool:
        """Store a chunk; False if the request is no longer expected."""
        with self._lock:
            exp = self._expected.get(job.request_id)
            if exp is None:
                return False
            end = start + kv.shape[2]
            write_kv(
                self.kv_caches,
                layer_start,
                slots_for(exp.dst_block_ids, self.layout.block_size, start, end),
                kv,
            )
        exp.note(layer_start, layer_start + kv.shape[0], kv.shape[2], kv.numel() * kv.element_size())
        return True

    def finish(self, done: PrefillDone | None, request_id: str, error: str | None = None) -> None:
        if done is not None:
            self.finish_prefill(done)
            return
        # Reported even when no longer expected: the owner may hold blocks until the writer stops.
        self._pop(request_id)
        self.on_failed(request_id, error or "prefill failed")


class LocalKVSender(KVSender):
    def __init__(self, on_abort: Callable[[str], None] | None = None) -> None:
        if on_abort is not None:
            self.on_abort = on_abort  # type: ignore[method-assign]

    def _receiver(self, job: PrefillJob) -> LocalKVReceiver | None:
        with _REGISTRY_LOCK:
            return _REGISTRY.get(job.kv_port)

    def send_kv(self, job: PrefillJob, layer_start: int, kv: torch.Tensor, start: int) -> None:
        rx = self._receiver(job)
        if rx is None or not rx.accept(job, layer_start, kv, start):
            self.on_abort(job.request_id)

    def send_done(self, job: PrefillJob, done: PrefillDone) -> None:
        rx = self._receiver(job)
        if rx is not None:
            rx.finish(done, job.request_id)

    def send_failed(self, job: PrefillJob, error: str) -> None:
        rx = self._receiver(job)
        if rx is not None:
            rx.finish(None, job.request_id, error)

    def close(self) -> None:
        pass
