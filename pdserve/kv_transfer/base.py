"""KV connector interface, split by side.

The prefill side holds a `KVSender`: it pushes the KV of token ranges, one layer group at a time,
into blocks the decode worker reserved for the request, then reports the first token. The decode
side holds a `KVReceiver`: it is told which requests to expect (and where their KV goes), accepts
pushes only for those, checks each chunk, and reports a completed (or failed) prefill.
Bookkeeping (what is expected, what arrived) stays here; transports only move bytes.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from pdserve.protocol import KVLayout, PrefillDone, PrefillJob

TRANSPORTS = ("local", "shm", "tcp", "cuda_ipc", "nccl", "nixl")


class KVTransferError(RuntimeError):
    """A transfer that cannot complete: refused handshake, bad checksum, broken connection."""


@dataclass
class TransferStats:
    request_id: str
    nbytes: int
    seconds: float  # first chunk received → prefill reported done


OnDone = Callable[[PrefillDone, TransferStats], None]
OnFailed = Callable[[str, str], None]  # (request_id, error)


class KVSender(ABC):
    """Prefill side. All methods are non-blocking: data is queued and moved by the transport."""

    # Called with a request id when the decode side no longer wants it (aborted, expired).
    on_abort: Callable[[str], None] = staticmethod(lambda request_id: None)  # type: ignore[assignment]

    # Transports that copy straight out of the paged cache (cuda_ipc) take slots, not a gathered copy.
    copies_from_cache: bool = False

    @abstractmethod
    def send_kv(self, job: PrefillJob, layer_start: int, kv: torch.Tensor, start: int) -> None:
        """kv: [layers, 2, tokens, kv_heads, head_dim] for layers [layer_start, layer_start+layers)
        and token positions [start, start+tokens)."""

    def send_kv_from_cache(
        self,
        job: PrefillJob,
        layer_start: int,
        layer_end: int,
        kv_caches: list[torch.Tensor],
        slots: torch.Tensor,
        start: int,
    ) -> None:
        """Like send_kv, for copies_from_cache transports: the tokens at positions [start, start+len(slots))
        sit in `slots` of kv_caches (the sender's own paged cache) for layers [layer_start, layer_end)."""
        raise NotImplementedError(f"{type(self).__name__} takes gathered KV (send_kv)")

    def seal(self, job: PrefillJob) -> None:
        """Called once the last of the job's KV has been pushed (the last layer's hook of its last
        chunk, or the push after its first token), before that token is read: a transport that
        summarises what it sent (cuda_ipc's fingerprint) may launch that now. Nothing by default."""
        return None

    @abstractmethod
    def send_done(self, job: PrefillJob, done: PrefillDone) -> None: ...

    @abstractmethod
    def send_failed(self, job: PrefillJob, error: str) -> None: ...

    @abstractmethod
    def close(self) -> None: ...


@dataclass
class Expectation:
    """A reservation on the decode side: where the request's KV lands and what has arrived."""

    request_id: str
    dst_block_ids: list[int]
    skip_tokens: int
    num_layers: int
    received: dict[int, int] = field(default_factory=dict)  # layer -> tokens received
    nbytes: int = 0
    first_arrival: float | None = None

    def note(self, layer_start: int, layer_end: int, num_tokens: int, nbytes: int) -> None:
        if self.first_arrival is None:
            self.first_arrival = time.monotonic()
        for layer in range(layer_start, layer_end):
            self.received[layer] = self.received.get(layer, 0) + num_tokens
        self.nbytes += nbytes

    def missing(self, num_tokens: int) -> str | None:
        """None if every layer holds positions [skip_tokens, num_tokens); else what is missing."""
        want = num_tokens - self.skip_tokens
        short = [layer for layer in range(self.num_layers) if self.received.get(layer, 0) != want]
        if short:
            return f"layers {short[:4]}{'...' if len(short) > 4 else ''} hold the wrong number of tokens (want {want})"
        return None


def slots_for(block_ids: list[int], block_size: int, start: int, end: int) -> torch.Tensor:
    """Flat cache slots of token positions [start, end) in a request's block table."""
    if end <= start:
        return torch.empty(0, dtype=torch.int64)
    # Every slot of the blocks the range touches, then the range: no per-position division or
    # gather (this runs on the engine thread once per step and request: ~25 us for 4096 positions).
    first = start // block_size
    table = torch.tensor(block_ids[first : (end - 1) // block_size + 1], dtype=torch.int64)
    slots = (table[:, None] * block_size + torch.arange(block_size)).reshape(-1)
    offset = start - first * block_size
    out = slots[offset : offset + end - start]
    if out.numel() != end - start:
        raise IndexError(f"positions [{start}, {end}) run past a table of {len(block_ids)} blocks")
    return out


def write_kv(kv_caches: list[torch.Tensor], layer_start: int, slots: torch.Tensor, kv: torch.Tensor) -> None:
    """Scatter kv [layers, 2, tokens, H, D] into the paged caches at `slots` for consecutive layers."""
    for i in range(kv.shape[0]):
        cache = kv_caches[layer_start + i]  # [2, num_blocks, block_size, H, D]
        flat = cache.view(2, -1, cache.shape[-2], cache.shape[-1])  # [2, slots, H, D]
        src = kv[i].to(cache.device, cache.dtype)
        if cache.element_size() == 1:  # fp8: index_copy_ has no fp8 kernel on every device
            flat, src = flat.view(torch.uint8), src.view(torch.uint8)
        flat.index_copy_(1, slots.to(cache.device), src)


def read_kv(
    kv_caches: list[torch.Tensor], layer_start: int, layer_end: int, slots: torch.Tensor
) -> torch.Tensor:
    """Gather [layers, 2, tokens, H, D] from the paged caches at `slots` (a copy)."""
    out = []
    for layer in range(layer_start, layer_end):
        cache = kv_caches[layer]
        flat = cache.view(2, -1, cache.shape[-2], cache.shape[-1])
        out.append(flat.index_select(1, slots.to(cache.device)))
    return torch.stack(out)


class KVReceiver(ABC):
    """Decode side. The bookkeeping (which requests are expected, where their KV lands, whether all
    of it arrived) lives here; a transport only brings chunks in and calls finish_prefill."""

    def __init__(
        self, layout: KVLayout, kv_caches: list[torch.Tensor], on_done: OnDone, on_failed: OnFailed
    ) -> None:
        self.layout = layout
        self.kv_caches = kv_caches
        self.on_done = on_done
        self.on_failed = on_failed
        self._lock = threading.Lock()
        self._expected: dict[str, Expectation] = {}

    @property
    @abstractmethod
    def endpoint(self) -> tuple[str, int]: ...

    def expect(self, request_id: str, dst_block_ids: list[int], skip_tokens: int) -> None:
        with self._lock:
            self._expected[request_id] = Expectation(
                request_id, dst_block_ids, skip_tokens, self.layout.num_layers
            )

    def cancel(self, request_id: str) -> None:
        """Forget the request; later pushes for it are refused and the sender told to abort."""
        self._pop(request_id)

    def _pop(self, request_id: str) -> Expectation | None:
        with self._lock:
            return self._expected.pop(request_id, None)

    def finish_prefill(self, done: PrefillDone) -> None:
        """The sender's last word on a request: report it complete, or failed if KV is missing.
        Reported even when no longer expected, since the owner may hold blocks until the writer stops."""
        exp = self._pop(done.request_id)
        if exp is None:
            self.on_failed(done.request_id, "prefill finished after the request was given up")
            return
        missing = exp.missing(done.num_tokens)
        if missing:
            self.on_failed(done.request_id, f"incomplete KV transfer: {missing}")
            return
        seconds = time.monotonic() - exp.first_arrival if exp.first_arrival is not None else 0.0
        self.on_done(done, TransferStats(done.request_id, exp.nbytes, seconds))

    @abstractmethod
    def close(self) -> None: ...
