"""nixl transport: KV written by NVIDIA's NIXL library (its UCX backend picks RDMA, NVLink, CUDA IPC,
shared memory or TCP by what the two ends share). Optional: available when `nixl` is importable
(`pip install nixl`).

The decode worker registers its KV cache tensors with a NIXL agent and sends the agent's metadata
and the caches' addresses in the handshake acknowledgement (after the HMAC challenge; msgpack,
never pickle). The prefill worker gathers each layer group's KV, as for tcp, into a staging buffer
it registered once, and writes it with one NIXL WRITE straight into the reserved slots: one
descriptor per (layer, K or V, run of consecutive slots). The socket carries the small header,
sent as soon as the write is posted, the completion and aborts. Each write carries a notification
naming its chunk; NIXL delivers a transfer's notification after its data, so the decode side takes
a header only once the matching notification is in. With CPU caches the header carries a crc32 of
the chunk, which the decode side recomputes from what landed in its cache.

No progress threads: UCX's spins a core for as long as the agent lives. Each side progresses its
agent only while it waits (the decode side for a header's notification, the prefill side for its
write to finish), which is why the header leaves before the write is done: both sides are then
waiting, and progressing, at the same time. An agent is not thread-safe here, so each side calls
it under one lock. Registered memory stays registered until the agent goes: closing a side does not
deregister it, since a write or a wait may still be running on another thread.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pdserve.kv_transfer.base import Expectation, KVTransferError, OnDone, OnFailed, read_kv, slots_for
from pdserve.kv_transfer.channel import send_msg
from pdserve.kv_transfer.codec import checksum
from pdserve.kv_transfer.tcp import SocketKVReceiver, SocketKVSender, _Item, _Peer
from pdserve.protocol import KVLayerChunk, KVLayout, NixlEndpoint

# How long the decode side waits for a write's notification after its header (they travel on
# different paths), and the sender for a write to complete.
NOTIFICATION_TIMEOUT_S = 30.0
WRITE_TIMEOUT_S = 60.0
NOT_CHECKED = -1  # a header checksum for GPU caches: reading them back would cost a host copy


def available() -> bool:
    try:
        import nixl._api  # noqa: F401
    except ImportError:
        return False
    return True


def _agent(role: str) -> Any:
    try:
        from nixl._api import nixl_agent, nixl_agent_config
    except ImportError as e:
        raise ValueError("transport nixl needs the nixl package (pip install nixl)") from e
    config = nixl_agent_config(enable_prog_thread=False, backends=["UCX"])
    return nixl_agent(f"pdserve-{role}-{os.getpid()}-{uuid.uuid4().hex[:8]}", config)


def _poll(ready: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Call `ready` (which progresses an agent) with a growing pause until it says so."""
    deadline = time.monotonic() + timeout_s
    pause = 20e-6
    while not ready():
        if time.monotonic() > deadline:
            raise ConnectionError(f"{what} after {timeout_s:.0f} s")
        time.sleep(pause)
        pause = min(2 * pause, 1e-3)


def _mem_type(t: torch.Tensor) -> str:
    return "VRAM" if t.is_cuda else "DRAM"


def notification(request_id: str, layer_start: int, start: int) -> bytes:
    return f"{request_id}|{layer_start}|{start}".encode()


def slot_runs(dst_slots: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Runs of consecutive destination slots: (first token index, length, first slot) each [R]."""
    n = len(dst_slots)
    breaks = np.flatnonzero(np.diff(dst_slots) != 1) + 1  # a run starts where the slots jump
    starts = np.concatenate(([0], breaks)).astype(np.int64)
    lengths = np.diff(np.concatenate((starts, [n]))).astype(np.int64)
    return starts, lengths, dst_slots[starts].astype(np.int64)


def write_descriptors(
    staging_addr: int,
    staging_device: int,
    regions: list[list[int]],
    layer_start: int,
    num_layers: int,
    num_tokens: int,
    row_bytes: int,
    dst_slots: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """(local, remote) [N, 3] descriptors (address, bytes, device id) that write a staged chunk
    [layers, 2, tokens, heads, dim] into the destination slots of layers [layer_start, +num_layers)
    of caches laid out [2, slots, heads, dim] (`regions`: per layer base, K-to-V bytes, device)."""
    starts, lengths, first_slots = slot_runs(dst_slots)
    layer = np.arange(num_layers, dtype=np.int64)[:, None, None]  # [L, 1, 1]
    half = np.arange(2, dtype=np.int64)[None, :, None]  # [1, 2, 1]
    region = np.asarray(regions, dtype=np.int64)[layer_start : layer_start + num_layers]  # [L, 3]
    local = staging_addr + ((layer * 2 + half) * num_tokens + starts[None, None, :]) * row_bytes
    remote = (
        region[:, 0][:, None, None]
        + half * region[:, 1][:, None, None]
        + first_slots[None, None, :] * row_bytes
    )
    size = np.broadcast_to(lengths[None, None, :] * row_bytes, local.shape)
    local_descs = np.stack(
        [local.ravel(), size.ravel(), np.full(local.size, staging_device, dtype=np.int64)], axis=1
    )
    remote_device = np.broadcast_to(region[:, 2][:, None, None], remote.shape)
    remote_descs = np.stack([remote.ravel(), size.ravel(), remote_device.ravel()], axis=1)
    return local_descs, remote_descs


class NixlKVReceiver(SocketKVReceiver):
    transport = "nixl"

    def __init__(
        self,
        layout: KVLayout,
        kv_caches: list[torch.Tensor],
        on_done: OnDone,
        on_failed: OnFailed,
        secret: bytes,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        if not all(c.is_contiguous() for c in kv_caches):
            raise ValueError("transport nixl needs contiguous KV caches")
        # Set before the accept thread starts.
        self._agent = _agent("decode")
        self._agent.register_memory(kv_caches)
        self._arrived: set[bytes] = set()  # notifications not yet matched with their header
        self._notify = threading.Lock()
        super().__init__(layout, kv_caches, on_done, on_failed, secret, host, port)

    def handshake_extras(self) -> dict[str, Any]:
        regions = [
            [c.data_ptr(), c.stride(0) * c.element_size(), c.device.index or 0] for c in self.kv_caches
        ]
        with self._notify:
            metadata = self._agent.get_agent_metadata()
        return {"nixl": NixlEndpoint(metadata, _mem_type(self.kv_caches[0]), regions)}

    def _receive_payload(self, conn: object, chunk: KVLayerChunk) -> bytearray:
        """The data came by NIXL: wait for its notification (also for chunks we refuse, so no
        notification is left behind)."""
        self._await(notification(chunk.request_id, chunk.layer_start, chunk.start))
        return bytearray()

    def _await(self, key: bytes) -> None:
        def arrived() -> bool:
            with self._notify:
                for messages in self._agent.get_new_notifs().values():
                    self._arrived.update(messages)
                if key not in self._arrived:
                    return False
                self._arrived.discard(key)
                return True

        _poll(arrived, NOTIFICATION_TIMEOUT_S, f"no NIXL notification for {key.decode()!r} after its header")

    def _store(self, exp: Expectation, chunk: KVLayerChunk, payload: bytearray) -> None:
        if chunk.start < exp.skip_tokens:
            raise KVTransferError(
                f"[{chunk.request_id}] chunk starts at {chunk.start} < skip {exp.skip_tokens}"
            )
        if chunk.checksum != NOT_CHECKED:
            slots = slots_for(exp.dst_block_ids, self.layout.block_size, chunk.start, chunk.end)
            landed = read_kv(self.kv_caches, chunk.layer_start, chunk.layer_end, slots)
            if checksum(landed.numpy().data) != chunk.checksum:
                raise KVTransferError(
                    f"[{chunk.request_id}] KV checksum mismatch on layers {chunk.layer_start}+"
                )


@dataclass
class _Remote:
    agent: str  # the decode side's agent name in ours
    regions: list[list[int]]


@dataclass
class _Staging:
    buffer: torch.Tensor  # [capacity] bytes (uint8), registered with our agent
    registered: Any


class NixlKVSender(SocketKVSender):
    transport = "nixl"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._agent: Any = None
        self._agent_lock = threading.Lock()
        self._remotes: dict[tuple[str, int], _Remote] = {}
        self._staging: dict[tuple[str, int], _Staging] = {}  # per peer: one chunk in flight each

    def on_connected(self, peer: _Peer) -> None:
        endpoint = peer.ack.nixl if peer.ack is not None else None
        if endpoint is None:
            raise ConnectionError("the decode worker offers no NIXL endpoint (is it on transport nixl?)")
        with self._agent_lock:
            if self._agent is None:
                self._agent = _agent("prefill")
            name = self._agent.add_remote_agent(endpoint.agent_metadata)
        self._remotes[(peer.host, peer.port)] = _Remote(name, endpoint.regions)

    def push(self, peer: _Peer, item: _Item) -> None:
        """Send thread: stage the chunk and post its write, send the header, then wait for the
        write (the staging buffer is reused by the next chunk)."""
        if item.kind != "kv":
            super().push(peer, item)
            return
        assert peer.sock is not None
        if self.fault_delay_s:
            time.sleep(self.fault_delay_s)
        kv: torch.Tensor = item.payload  # [layers, 2, tokens, heads, dim]
        job = item.job
        num_layers, _, num_tokens = kv.shape[:3]
        remote = self._remotes[(peer.host, peer.port)]
        staging = self._stage(peer, kv)
        row_bytes = kv.shape[3] * kv.shape[4] * kv.element_size()
        dst = slots_for(job.dst_block_ids, self.layout.block_size, item.start, item.start + num_tokens)
        local, remote_descs = write_descriptors(
            staging.buffer.data_ptr(), staging.buffer.device.index or 0, remote.regions,
            item.layer_start, num_layers, num_tokens, row_bytes, dst.numpy(),
        )  # fmt: skip
        mem = _mem_type(kv)
        nbytes = kv.numel() * kv.element_size()
        chunk = KVLayerChunk(
            request_id=job.request_id,
            layer_start=item.layer_start,
            layer_end=item.layer_start + num_layers,
            start=item.start,
            end=item.start + num_tokens,
            wire_dtype="native",
            nbytes=nbytes,
            checksum=NOT_CHECKED if kv.is_cuda else checksum(staging.buffer[:nbytes].numpy().data),
        )
        with self._agent_lock:
            agent = self._agent
            handle = agent.initialize_xfer(
                "WRITE",
                agent.get_xfer_descs(local, mem),
                agent.get_xfer_descs(remote_descs, mem),
                remote.agent,
                notification(job.request_id, item.layer_start, item.start),
            )
            state = agent.transfer(handle)
        try:
            send_msg(peer.sock, chunk)
            self._wait(handle, state, job.request_id)
        finally:
            with self._agent_lock:
                agent.release_xfer_handle(handle)

    def _stage(self, peer: _Peer, kv: torch.Tensor) -> _Staging:
        """Our registered buffer for this peer, holding `kv` (grown and re-registered if short)."""
        key = (peer.host, peer.port)
        nbytes = kv.numel() * kv.element_size()
        staging = self._staging.get(key)
        if staging is None or staging.buffer.numel() < nbytes or staging.buffer.device != kv.device:
            buffer = torch.empty(max(nbytes, 1 << 20), dtype=torch.uint8, device=kv.device)
            with self._agent_lock:
                if staging is not None:
                    self._agent.deregister_memory(staging.registered)
                staging = _Staging(buffer, self._agent.register_memory([buffer]))
            self._staging[key] = staging
        # The copy is ordered after the forward pass that made `kv` (the default stream), and done
        # before NIXL reads the buffer.
        staging.buffer[:nbytes].copy_(kv.contiguous().view(-1).view(torch.uint8))
        if kv.is_cuda:
            # Wait for this copy only, not for the rest of the forward queued behind it.
            copied = torch.cuda.Event()
            copied.record()
            copied.synchronize()
        return staging

    def _wait(self, handle: Any, state: str, request_id: str) -> None:
        """Progress our agent until the write is done (the decode side progresses its own)."""

        def done() -> bool:
            nonlocal state
            if state == "ERR":
                raise ConnectionError(f"[{request_id}] NIXL write failed")
            if state == "DONE":
                return True
            with self._agent_lock:
                state = self._agent.check_xfer_state(handle)
            return False

        _poll(done, WRITE_TIMEOUT_S, f"[{request_id}] NIXL write did not finish")
