"""CUDA IPC handles of a worker's KV cache tensors: exported by the decode worker (inside the
authenticated KV handshake, as plain msgpack fields), mapped as tensors by the prefill worker."""

from __future__ import annotations

from typing import Any

import torch

from pdserve.kv_transfer.codec import torch_dtype
from pdserve.protocol import KVLayout


def export_handles(kv_caches: list[torch.Tensor]) -> list[list[Any]]:
    """Per layer: [storage handle fields..., element offset, num_blocks]."""
    out = []
    for cache in kv_caches:
        if not cache.is_cuda or not cache.is_contiguous():
            raise ValueError("transport cuda_ipc needs contiguous KV caches on a CUDA device")
        device, handle, size, offset, ref_handle, ref_offset, event_handle, event_sync = (
            cache.untyped_storage()._share_cuda_()  # type: ignore[attr-defined]
        )
        out.append(
            [device, handle, size, offset, ref_handle, ref_offset, event_handle, event_sync,
             cache.storage_offset(), cache.shape[1]]
        )  # fmt: skip
    return out


def import_handles(handles: list[list[Any]], layout: KVLayout, device: torch.device) -> list[torch.Tensor]:
    """Map the peer's caches into this process as tensors on `device` (the GPU our kernels run on;
    a peer cache on another GPU is reached through peer access)."""
    if len(handles) != layout.num_layers:
        raise ConnectionError(
            f"peer shared {len(handles)} KV caches, the layout has {layout.num_layers} layers"
        )
    dtype = torch_dtype(layout.dtype)
    tensors = []
    for entry in handles:
        _, handle, size, offset, ref_handle, ref_offset, event_handle, event_sync, elem_offset, num_blocks = (
            entry
        )
        try:
            storage = torch.UntypedStorage._new_shared_cuda(  # type: ignore[attr-defined]
                device.index if device.index is not None else torch.cuda.current_device(),
                handle, size, offset, ref_handle, ref_offset, event_handle, event_sync,
            )  # fmt: skip
        except RuntimeError as e:
            raise ConnectionError(f"cannot open the peer's CUDA IPC handle (same host?): {e}") from None
        shape = (2, num_blocks, layout.block_size, layout.num_kv_heads, layout.head_dim)
        strides = [1] * len(shape)  # contiguous
        for i in range(len(shape) - 2, -1, -1):
            strides[i] = strides[i + 1] * shape[i + 1]
        tensor = torch.empty((0,), dtype=dtype, device=device)
        tensors.append(tensor.set_(storage, elem_offset, shape, strides))
    return tensors
