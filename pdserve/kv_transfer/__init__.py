"""KV transfer between prefill and decode workers: a connector interface split by side and
one module per transport (local, shm, tcp; cuda_ipc and nccl on GPUs; nixl where the nixl package
is installed), imported lazily."""

from __future__ import annotations

from collections.abc import Callable

import torch

from pdserve.kv_transfer.base import TRANSPORTS, KVReceiver, KVSender, KVTransferError, OnDone, OnFailed
from pdserve.protocol import KVLayout

__all__ = ["TRANSPORTS", "KVReceiver", "KVSender", "KVTransferError", "make_receiver", "make_sender"]


def make_receiver(
    transport: str,
    layout: KVLayout,
    kv_caches: list[torch.Tensor],
    on_done: OnDone,
    on_failed: OnFailed,
    secret: bytes,
    host: str = "127.0.0.1",
    port: int = 0,
    shm_name: str | None = None,
) -> KVReceiver:
    if transport == "local":
        from pdserve.kv_transfer.local import LocalKVReceiver

        return LocalKVReceiver(layout, kv_caches, on_done, on_failed)
    if transport == "tcp":
        from pdserve.kv_transfer.tcp import SocketKVReceiver

        return SocketKVReceiver(layout, kv_caches, on_done, on_failed, secret, host, port)
    if transport == "shm":
        from pdserve.kv_transfer.shm import ShmKVReceiver

        if shm_name is None:
            raise ValueError("transport shm needs the KV cache in shared memory (shm_name)")
        return ShmKVReceiver(layout, kv_caches, on_done, on_failed, secret, host, port, shm_name)
    if transport == "cuda_ipc":
        from pdserve.kv_transfer.cuda_ipc_receiver import CudaIpcKVReceiver

        return CudaIpcKVReceiver(layout, kv_caches, on_done, on_failed, secret, host, port)
    if transport == "nccl":
        from pdserve.kv_transfer.nccl import NcclKVReceiver

        return NcclKVReceiver(layout, kv_caches, on_done, on_failed, secret, host, port)
    if transport == "nixl":
        from pdserve.kv_transfer.nixl import NixlKVReceiver

        return NixlKVReceiver(layout, kv_caches, on_done, on_failed, secret, host, port)
    raise ValueError(f"unknown KV transport {transport!r} (choose: {', '.join(TRANSPORTS)})")


def make_sender(
    transport: str,
    layout: KVLayout,
    worker_id: str,
    secret: bytes,
    wire_dtype: str = "native",
    on_error: Callable[[str, str], None] | None = None,
) -> KVSender:
    if transport == "local":
        from pdserve.kv_transfer.local import LocalKVSender

        return LocalKVSender()
    if transport == "tcp":
        from pdserve.kv_transfer.tcp import SocketKVSender

        return SocketKVSender(layout, worker_id, secret, wire_dtype, on_error)
    if transport == "shm":
        from pdserve.kv_transfer.shm import ShmKVSender

        return ShmKVSender(layout, worker_id, secret, "native", on_error)
    if transport == "cuda_ipc":
        from pdserve.kv_transfer.cuda_ipc import CudaIpcKVSender

        return CudaIpcKVSender(layout, worker_id, secret, "native", on_error)
    if transport == "nccl":
        from pdserve.kv_transfer.nccl import NcclKVSender

        return NcclKVSender(layout, worker_id, secret, "native", on_error)
    if transport == "nixl":
        from pdserve.kv_transfer.nixl import NixlKVSender

        return NixlKVSender(layout, worker_id, secret, "native", on_error)
    raise ValueError(f"unknown KV transport {transport!r} (choose: {', '.join(TRANSPORTS)})")
