"""cuda_ipc transport, decode side: shares the KV cache tensors through CUDA IPC handles (inside
the authenticated handshake) and, once a request's completion arrives, recomputes its fingerprint
from the blocks the prefill worker wrote before the request decodes (kv_transfer/cuda_ipc.py has
the sending side)."""

from __future__ import annotations

from typing import Any

import torch

from pdserve import envs
from pdserve.kv_transfer.base import Expectation, KVTransferError, OnDone, OnFailed, slots_for
from pdserve.kv_transfer.cuda_ipc_handles import export_handles
from pdserve.kv_transfer.gpu_copy import fingerprint_slots, pointer_table
from pdserve.kv_transfer.spot_check import num_sampled, sample_offset, sampled
from pdserve.kv_transfer.tcp import SocketKVReceiver
from pdserve.protocol import KVLayerChunk, KVLayout, PrefillDone
from pdserve.trace import mark


class CudaIpcKVReceiver(SocketKVReceiver):
    transport = "cuda_ipc"
    # Recompute the request's fingerprint from our cache once its KV is complete (one read of the
    # sampled positions, one launch, on a side stream).
    verify = True

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
        if not kv_caches[0].is_cuda:
            raise ValueError("transport cuda_ipc keeps the KV cache on the GPU: use it with --device cuda")
        # Set before the accept thread starts.
        self._stream = torch.cuda.Stream(kv_caches[0].device)
        self._table = pointer_table(kv_caches)
        self._stride = envs.kv_fingerprint_stride()
        # request id -> the slots its fingerprint will read, on the device, for our own stride:
        # staged when the blocks are reserved, so the check after the completion only launches.
        self._planned: dict[str, torch.Tensor] = {}
        super().__init__(layout, kv_caches, on_done, on_failed, secret, host, port)

    def expect(self, request_id: str, dst_block_ids: list[int], skip_tokens: int) -> None:
        super().expect(request_id, dst_block_ids, skip_tokens)
        capacity = len(dst_block_ids) * self.layout.block_size
        with torch.cuda.stream(self._stream):
            self._planned[request_id] = self._sampled_slots(
                request_id, dst_block_ids, skip_tokens, capacity, self._stride
            ).to(self.kv_caches[0].device)

    def _pop(self, request_id: str) -> Expectation | None:
        self._planned.pop(request_id, None)
        return super()._pop(request_id)

    def _sampled_slots(
        self, request_id: str, blocks: list[int], skip: int, num_tokens: int, stride: int
    ) -> torch.Tensor:
        """Our cache slots of the positions in [skip, num_tokens) the fingerprint covers."""
        slots = slots_for(blocks, self.layout.block_size, skip, num_tokens)
        return slots[sampled(skip, len(slots), stride, sample_offset(request_id, stride))].contiguous()

    def handshake_extras(self) -> dict[str, Any]:
        return {"cuda_ipc": export_handles(self.kv_caches)}

    def _receive_payload(self, conn: object, chunk: KVLayerChunk) -> bytearray:
        return bytearray()  # the data is already in our cache

    def _store(self, exp: Expectation, chunk: KVLayerChunk, payload: bytearray) -> None:
        if chunk.start < exp.skip_tokens:
            raise KVTransferError(
                f"[{chunk.request_id}] chunk starts at {chunk.start} < skip {exp.skip_tokens}"
            )

    def _on_prefill_done(self, done: PrefillDone) -> None:
        rid = done.request_id
        with self._lock:
            exp = self._expected.get(rid)
        if self.verify and exp is not None and exp.missing(done.num_tokens) is None:
            error = self._check_fingerprint(exp, done)
            if error is not None:
                if self._pop(rid) is not None:
                    self.on_failed(rid, error)
                return
        super()._on_prefill_done(done)

    def _check_fingerprint(self, exp: Expectation, done: PrefillDone) -> str | None:
        """None if our cache holds what the sender fingerprinted, at the positions it sampled."""
        stride, skip = done.kv_checksum_stride, exp.skip_tokens
        planned = self._planned.get(exp.request_id)
        if done.kv_checksum is None or stride < 1:
            return f"completion without a usable fingerprint (stride {stride})"
        with torch.cuda.stream(self._stream):
            if planned is not None and stride == self._stride:
                # The positions below num_tokens are a prefix of those staged for the whole table.
                offset = sample_offset(exp.request_id, stride)
                count = num_sampled(skip, done.num_tokens - skip, stride, offset)
                device_slots = planned[:count]
            else:  # a sender with another stride: stage them now
                device_slots = self._sampled_slots(
                    exp.request_id, exp.dst_block_ids, skip, done.num_tokens, stride
                ).to(self.kv_caches[0].device)
            found = fingerprint_slots(self._table, self.kv_caches[0], 0, self.layout.num_layers, device_slots)
            mark(done.trace, "decode.fingerprint_launched")
            if int(found) != done.kv_checksum:
                return "KV fingerprint mismatch: what landed is not what was sent"
        return None
