"""shm transport (same host): the decode worker's KV cache lives in POSIX shared memory, and the
prefill worker writes a request's KV straight into the reserved blocks — one copy, no socket
payload. The authenticated socket still carries the headers (with a checksum of what was written),
the completion and aborts; the segment's name is revealed only after the handshake.
"""

from __future__ import annotations

import contextlib
import math
import os
import uuid
from multiprocessing import resource_tracker, shared_memory

import torch

from pdserve.kv_transfer.base import Expectation, read_kv, slots_for, write_kv
from pdserve.kv_transfer.codec import checksum, encode_kv, torch_dtype
from pdserve.kv_transfer.tcp import SocketKVReceiver, SocketKVSender, _Item, _Peer
from pdserve.protocol import KVLayerChunk, KVLayout

SHM_PREFIX = "pdserve_kv_"


def _views(buf: memoryview, layout: KVLayout, num_blocks: int) -> list[torch.Tensor]:
    dtype = torch_dtype(layout.dtype)
    shape = (2, num_blocks, layout.block_size, layout.num_kv_heads, layout.head_dim)
    per_layer = math.prod(shape)
    flat = torch.frombuffer(buf, dtype=dtype, count=per_layer * layout.num_layers)
    return [flat[i * per_layer : (i + 1) * per_layer].view(shape) for i in range(layout.num_layers)]


def _num_blocks(nbytes: int, layout: KVLayout) -> int:
    itemsize = torch.empty((), dtype=torch_dtype(layout.dtype)).element_size()
    per_block = 2 * layout.block_size * layout.num_kv_heads * layout.head_dim * itemsize * layout.num_layers
    return nbytes // per_block


class ShmKVCache:
    """A decode worker's whole KV cache in one shared-memory segment, as per-layer tensors."""

    def __init__(self, layout: KVLayout, num_blocks: int, tag: str = "") -> None:
        itemsize = torch.empty((), dtype=torch_dtype(layout.dtype)).element_size()
        nbytes = 2 * num_blocks * layout.block_size * layout.num_kv_heads * layout.head_dim * itemsize
        name = f"{SHM_PREFIX}{tag or os.getpid()}_{uuid.uuid4().hex[:8]}"
        self.shm = shared_memory.SharedMemory(name=name, create=True, size=nbytes * layout.num_layers)
        self.name = self.shm.name
        assert self.shm.buf is not None
        self.tensors = _views(self.shm.buf, layout, num_blocks)

    def close(self) -> None:
        """Unlink the segment. Tensors viewing it must not be used afterwards."""
        self.tensors = []
        # Views still alive keep the mapping until the process ends; the name goes now.
        with contextlib.suppress(BufferError):
            self.shm.close()
        with contextlib.suppress(FileNotFoundError):
            self.shm.unlink()


def attach(name: str, layout: KVLayout) -> tuple[shared_memory.SharedMemory, list[torch.Tensor]]:
    shm = shared_memory.SharedMemory(name=name, create=False)
    # The attaching side must never unlink the owner's segment at exit (Python < 3.13 would).
    resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]
    assert shm.buf is not None
    return shm, _views(shm.buf, layout, _num_blocks(shm.size, layout))


class ShmKVReceiver(SocketKVReceiver):
    transport = "shm"

    def _receive_payload(self, conn: object, chunk: KVLayerChunk) -> bytearray:
        return bytearray()  # the data is already in our cache

    def _store(self, exp: Expectation, chunk: KVLayerChunk, payload: bytearray) -> None:
        from pdserve.kv_transfer.base import KVTransferError

        if chunk.start < exp.skip_tokens:
            raise KVTransferError(
                f"[{chunk.request_id}] chunk starts at {chunk.start} < skip {exp.skip_tokens}"
            )
        slots = slots_for(exp.dst_block_ids, self.layout.block_size, chunk.start, chunk.end)
        kv = read_kv(self.kv_caches, chunk.layer_start, chunk.layer_end, slots)
        if checksum(encode_kv(kv, "native")[0]) != chunk.checksum:
            raise KVTransferError(f"[{chunk.request_id}] KV checksum mismatch on layers {chunk.layer_start}+")


class ShmKVSender(SocketKVSender):
    transport = "shm"

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._mapped: dict[tuple[str, int], tuple[shared_memory.SharedMemory, list[torch.Tensor]]] = {}

    def on_connected(self, peer: _Peer) -> None:
        if peer.ack is None or not peer.ack.shm_name:
            raise ConnectionError("the decode worker offers no shared-memory cache (is it on transport shm?)")
        self._mapped[(peer.host, peer.port)] = attach(peer.ack.shm_name, self.layout)

    def encode_chunk(self, peer: _Peer, item: _Item) -> tuple[KVLayerChunk, bytes]:
        kv: torch.Tensor = item.payload  # [layers, 2, tokens, H, D]
        _, views = self._mapped[(peer.host, peer.port)]
        end = item.start + kv.shape[2]
        write_kv(
            views,
            item.layer_start,
            slots_for(item.job.dst_block_ids, self.layout.block_size, item.start, end),
            kv,
        )
        native = encode_kv(kv, "native")[0]
        chunk = KVLayerChunk(
            request_id=item.job.request_id,
            layer_start=item.layer_start,
            layer_end=item.layer_start + kv.shape[0],
            start=item.start,
            end=end,
            wire_dtype="native",
            nbytes=len(native),
            checksum=checksum(native),
        )
        return chunk, b""

    def close(self) -> None:
        super().close()
        for shm, _ in self._mapped.values():
            with contextlib.suppress(BufferError):
                shm.close()
        self._mapped.clear()
