"""cuda_ipc transport (same host, GPU), sending side: the decode worker shares its KV cache tensors
through CUDA IPC handles (kv_transfer/cuda_ipc_receiver.py), and the prefill worker writes a
request's KV straight into the reserved blocks, GPU to GPU: one layer group at a time from inside
the forward pass, or the whole prompt once its first token is sampled (`--kv-push`, the default
here: engine/kv_output.py), by our copy kernel or by the copy engines (`PDSERVE_KV_COPY`).

The handles travel as raw fields of the KVHelloAck (msgpack bytes and ints, never pickle), sent
only after the HMAC handshake. The socket still carries one small header per layer group, the
completion and aborts. A header leaves only once its copy has finished on the device, so when the
decode side reads the KV it is complete. The completion carries a fingerprint of what was written at
one token position in `PDSERVE_KV_FINGERPRINT_STRIDE` (every layer; computed from the sender's
cache), which the decode side recomputes from its own before decoding (kv_transfer/spot_check.py).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pdserve import envs
from pdserve.kv_transfer.base import slots_for
from pdserve.kv_transfer.cuda_ipc_handles import import_handles
from pdserve.kv_transfer.dma_copy import BatchCopier, SlotRuns, descriptors, slot_runs
from pdserve.kv_transfer.gpu_copy import copy_slots, fingerprint_slots, pointer_table
from pdserve.kv_transfer.spot_check import sample_offset, sampled
from pdserve.kv_transfer.tcp import SocketKVSender, _Item, _Peer
from pdserve.protocol import KVLayerChunk, PrefillDone, PrefillJob
from pdserve.trace import mark


class _IpcPeer(_Peer):
    """A peer whose connection the engine thread may open first (it needs the mapping to launch
    copies); the send thread reuses it."""

    def __init__(self, sender: SocketKVSender, host: str, port: int) -> None:
        self._connect_lock = threading.Lock()
        super().__init__(sender, host, port)

    def _connect(self) -> None:
        with self._connect_lock:
            if self.sock is None:
                super()._connect()


@dataclass
class _Staging:
    """Pinned host and device buffers for one step's slot pairs: [source slots | destination slots]."""

    host: torch.Tensor  # [capacity] int64, pinned
    device: torch.Tensor  # [capacity] int64
    uploaded: torch.cuda.Event  # recorded after the last upload out of `host`


class CudaIpcKVSender(SocketKVSender):
    transport = "cuda_ipc"
    copies_from_cache = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # (host, port) -> (the peer's caches mapped here, their pointer table)
        self._mapped: dict[tuple[str, int], tuple[list[torch.Tensor], torch.Tensor]] = {}
        self._src: tuple[list[torch.Tensor], torch.Tensor] | None = None
        # (request id, first position) -> the step's slots on the device and how many tokens
        self._slots: dict[tuple[str, int], tuple[_Staging, int]] = {}
        self._free_staging: list[_Staging] = []
        # request id -> (event after its fingerprint, the fingerprint on the device)
        self._fingerprints: dict[str, tuple[torch.cuda.Event, torch.Tensor]] = {}
        # The send thread reads fingerprints through a stream of its own: a copy on the engine's
        # stream would wait for everything queued there (the rest of the forward).
        self._side: torch.cuda.Stream | None = None
        # The copies (and fingerprints) run on a stream of their own, each after the layers that
        # wrote its KV: on the forward's stream, every layer's compute would wait for the previous
        # layer's copy over NVLink. Nothing on the forward's stream may reuse a source block or a
        # staging buffer before they have been read: it waits for this stream when a request's
        # pushes end (_forget, before the engine frees the request's blocks).
        self._copies: torch.cuda.Stream | None = None
        self.fingerprint_stride = envs.kv_fingerprint_stride()
        self.copy_programs = envs.kv_copy_programs()
        # "kernel": our copy kernel on the SMs; "dma": the copy engines (kv_transfer/dma_copy.py)
        self.copy_with = envs.kv_copy_with()
        self._dma: BatchCopier | None = None
        # (request id, first position) -> the step's slot runs, for the copy engines
        self._runs: dict[tuple[str, int], SlotRuns] = {}

    def _peer(self, job: PrefillJob) -> _Peer:
        key = (job.kv_host, job.kv_port)
        with self._lock:
            if key not in self._peers:
                self._peers[key] = _IpcPeer(self, job.kv_host, job.kv_port)
            return self._peers[key]

    def on_connected(self, peer: _Peer) -> None:
        if peer.ack is None or not peer.ack.cuda_ipc:
            raise ConnectionError("the decode worker shares no CUDA KV cache (is it on transport cuda_ipc?)")
        device = self._src[0][0].device if self._src else torch.device("cuda", torch.cuda.current_device())
        views = import_handles(peer.ack.cuda_ipc, self.layout, device)
        self._mapped[(peer.host, peer.port)] = (views, pointer_table(views))

    def send_kv(self, job: PrefillJob, layer_start: int, kv: torch.Tensor, start: int) -> None:
        raise NotImplementedError("transport cuda_ipc copies from the cache: use send_kv_from_cache")

    def send_kv_from_cache(
        self,
        job: PrefillJob,
        layer_start: int,
        layer_end: int,
        kv_caches: list[torch.Tensor],
        slots: torch.Tensor,
        start: int,
    ) -> None:
        """Engine thread: queue the copy on the copy stream, after everything queued so far on the
        forward's stream (the layers that wrote this KV, the slot upload), then hand the header to
        the send thread."""
        rid = job.request_id
        if rid in self.aborted:
            return
        if time.time() > job.deadline:
            # The decode side may reuse the blocks after its deadline: never write late.
            self.aborted.add(rid)
            self.report_error(rid, "KV push after the job's deadline: dropped")
            return
        if self._src is None or self._src[0] is not kv_caches:
            self._src = (kv_caches, pointer_table(kv_caches))  # before connecting: it names our GPU
        peer = self._peer(job)
        try:
            peer._connect()
        except (OSError, ConnectionError) as e:
            peer._drop_connection()
            self.aborted.add(rid)
            self.report_error(rid, f"KV connection to {peer.host}:{peer.port} failed: {e}")
            return
        views, dst_table = self._mapped[(peer.host, peer.port)]
        src_slots, dst_slots = self._device_slots(job, start, slots, kv_caches[0].device)
        like = kv_caches[0]
        copies = self._copy_stream(like.device)
        copies.wait_stream(torch.cuda.current_stream(like.device))
        with torch.cuda.stream(copies):
            if self.copy_with == "dma":
                self._copy_by_dma(job, start, kv_caches, views, layer_start, layer_end, copies)
            else:
                copy_slots(
                    self._src[1], dst_table, like, like.stride(0), views[0].stride(0),
                    layer_start, layer_end, src_slots, dst_slots, self.copy_programs,
                )  # fmt: skip
            copied = torch.cuda.Event()
            copied.record()
        peer.queue.put(_Item("kv", job, (copied, layer_end, start + len(slots)), layer_start, start))

    def _copy_by_dma(
        self,
        job: PrefillJob,
        start: int,
        kv_caches: list[torch.Tensor],
        views: list[torch.Tensor],
        layer_start: int,
        layer_end: int,
        stream: torch.cuda.Stream,
    ) -> None:
        """Queue layers [layer_start, layer_end) of the step's slots (staged by _device_slots) on the
        copy engines."""
        key = (job.request_id, start)
        runs = self._runs.get(key)
        if runs is None:
            staging, n = self._slots[key]
            pairs = staging.host[: 2 * n].numpy()  # [source slots | destination slots]
            runs = self._runs[key] = slot_runs(pairs[:n], pairs[n:])
        like = kv_caches[0]
        if self._dma is None:
            self._dma = BatchCopier(like.device.index or 0)
        size = like.element_size()
        dsts, srcs, sizes = descriptors(
            runs,
            np.array([c.data_ptr() for c in kv_caches[layer_start:layer_end]], dtype=np.uint64),
            np.array([v.data_ptr() for v in views[layer_start:layer_end]], dtype=np.uint64),
            like.stride(0) * size,
            views[0].stride(0) * size,
            like.shape[-2] * like.shape[-1] * size,
        )
        self._dma.copy(dsts, srcs, sizes, stream.cuda_stream)

    def _copy_stream(self, device: torch.device) -> torch.cuda.Stream:
        if self._copies is None:
            self._copies = torch.cuda.Stream(device)
        return self._copies

    def _join_copies(self) -> None:
        """The forward's stream waits for every copy and fingerprint queued so far."""
        if self._copies is not None:
            torch.cuda.current_stream(self._copies.device).wait_stream(self._copies)

    def prepare_from_cache(
        self, job: PrefillJob, slots: torch.Tensor, start: int, device: torch.device
    ) -> None:
        """Upload the slot tables of a step's pushes ahead of them, so the pushes only launch copies.
        The engine leaves this to the first push, inside the forward, where the host's work overlaps
        the GPU's; benchmarks call it to time the copies apart from the staging."""
        if job.request_id not in self.aborted:
            self._device_slots(job, start, slots, device)

    def _device_slots(
        self, job: PrefillJob, start: int, slots: torch.Tensor, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's (source, destination) slots on the device, uploaded once per step and request
        from pinned memory without waiting: every other copy here would wait for the stream."""
        key = (job.request_id, start)
        if key not in self._slots:
            n = len(slots)
            staging = self._take_staging(2 * n, device)
            staging.host[:n].copy_(slots)
            staging.host[n : 2 * n].copy_(
                slots_for(job.dst_block_ids, self.layout.block_size, start, start + n)
            )
            # On the engine's stream: ordered after every earlier reader of this device buffer.
            staging.device[: 2 * n].copy_(staging.host[: 2 * n], non_blocking=True)
            staging.uploaded.record()
            self._slots[key] = (staging, n)
        staging, n = self._slots[key]
        return staging.device[:n], staging.device[n : 2 * n]

    def _take_staging(self, size: int, device: torch.device) -> _Staging:
        """A free staging pair whose last upload has left its host buffer; a new one if none has
        (never wait: with requests pushed back to back that upload sits behind the earlier copies
        on the stream, and waiting for it would hold the host to one request ahead of the GPU)."""
        for i, staging in enumerate(self._free_staging):
            if staging.host.numel() >= size and staging.uploaded.query():
                return self._free_staging.pop(i)
        capacity = max(size, 2 * 8192)
        # Ordinary tensors though first needed inside the forward (a streaming push from a layer's
        # hook, kv_output.py): they are written again outside inference mode before later steps.
        with torch.inference_mode(False):
            return _Staging(
                torch.empty(capacity, dtype=torch.int64, pin_memory=True),
                torch.empty(capacity, dtype=torch.int64, device=device),
                torch.cuda.Event(),
            )

    def seal(self, job: PrefillJob) -> None:
        """Engine thread, once the prompt's last push is queued (the last layer's hook, or the push
        after the first token): fingerprint the sampled positions of everything sent for the
        request, from our cache, on the copy stream after the last copy, so the completion does not
        wait for this launch. The forward does not wait for it (the first token would then wait for
        the last layer's copy over NVLink): the engine joins the copy stream when the job ends
        (`_forget`), before its blocks can be reused."""
        rid = job.request_id
        if rid in self._fingerprints or rid in self.aborted:
            return
        stride = self.fingerprint_stride
        offset = sample_offset(rid, stride)
        ranges = [(staging.device[:n], start) for (r, start), (staging, n) in self._slots.items() if r == rid]
        if ranges and self._src is not None:
            caches, table = self._src
            copies = self._copy_stream(caches[0].device)
            copies.wait_stream(torch.cuda.current_stream(caches[0].device))  # after the last layer
            with torch.cuda.stream(copies):
                total = torch.zeros(1, dtype=torch.int64, device=caches[0].device)
                for src, start in ranges:
                    part = src[sampled(start, len(src), stride, offset)]
                    fingerprint_slots(table, caches[0], 0, len(caches), part.contiguous(), out=total)
                ready = torch.cuda.Event()
                ready.record()
            self._fingerprints[rid] = (ready, total)

    def send_done(self, job: PrefillJob, done: PrefillDone) -> None:
        """Engine thread: the send thread puts the request's fingerprint (sealed with the last push,
        or now if not) into the completion."""
        self.seal(job)
        self._forget(job.request_id)
        mark(done.trace, "prefill.done_queued")
        super().send_done(job, done)

    def send_failed(self, job: PrefillJob, error: str) -> None:
        self._forget(job.request_id)
        self._fingerprints.pop(job.request_id, None)
        super().send_failed(job, error)

    def _forget(self, request_id: str) -> None:
        self._join_copies()  # a failed job's copies may still read its blocks and staging
        for key in [k for k in self._slots if k[0] == request_id]:
            # Reusable at once: later uploads into it are queued behind this request's copies.
            self._free_staging.append(self._slots.pop(key)[0])
        for key in [k for k in self._runs if k[0] == request_id]:
            del self._runs[key]

    def push(self, peer: _Peer, item: _Item) -> None:
        """Send thread: a completion waits for its fingerprint (not for the rest of the stream)."""
        if item.kind == "done":
            mark(item.payload.trace, "prefill.done_dequeued")
            pending = self._fingerprints.pop(item.job.request_id, None)
            if pending is not None:
                ready, total = pending
                ready.synchronize()
                if self._side is None:
                    self._side = torch.cuda.Stream(total.device)
                with torch.cuda.stream(self._side):  # read it without waiting for the engine's stream
                    item.payload.kv_checksum = int(total.item())
                item.payload.kv_checksum_stride = self.fingerprint_stride
                mark(item.payload.trace, "prefill.fingerprint_read")
        super().push(peer, item)

    def encode_chunk(self, peer: _Peer, item: _Item) -> tuple[KVLayerChunk, bytes]:
        """Send thread: wait for the copy (not the rest of the stream), then describe it."""
        copied, layer_end, end = item.payload
        copied.synchronize()
        per_token_layer = self.layout.bytes_per_token // self.layout.num_layers
        chunk = KVLayerChunk(
            request_id=item.job.request_id,
            layer_start=item.layer_start,
            layer_end=layer_end,
            start=item.start,
            end=end,
            wire_dtype="native",
            nbytes=per_token_layer * (end - item.start) * (layer_end - item.layer_start),
            checksum=0,  # the completion carries the fingerprint of the whole request
        )
        return chunk, b""

    def close(self) -> None:
        super().close()
        self._mapped.clear()
        self._slots.clear()
        self._runs.clear()
        self._free_staging.clear()
        self._fingerprints.clear()
