"""nccl transport (GPUs on different hosts): KV moves GPU to GPU through torch.distributed
point-to-point, where cuda_ipc cannot reach (it maps the peer's memory, so both workers must share
a host). It costs one gather copy on the sender (the chunk's slots into one contiguous tensor) and
one scatter on the receiver (from a receive buffer into the reserved slots).

The authenticated socket of the tcp transport still carries everything but the KV bytes: one small
KVLayerChunk header per layer group, completions, failures and aborts. After the HMAC handshake the
decode side's KVHelloAck names a TCPStore it hosts on its KV address and a random key prefix for
the connection; from these both sides build a 2-rank process group object of their own, never the
global default group (init_process_group runs once per process, and a decode worker talks to many
prefill workers). Rank 0 is the prefill side (it sends), rank 1 the decode side (it receives). Both
build the group on the connection's first chunk, so neither waits in a constructor for a peer that
has not started.

The backend follows the KV cache's device: NCCL for CUDA caches, gloo for CPU caches. The gloo path
lets the connector run, and be tested, on machines without GPUs; between CPU workers tcp does the
same job with less machinery.

Headers and tensors pair up by order: each connection has one sending and one receiving thread, and
the decode side receives the tensor of every header, even of a request it no longer expects. It
checks each header against the tensor shape it implies before receiving; the sender derives every
header from the tensor it sends (a tensor longer than its header would abort a gloo process, whose
I/O thread enforces sizes, and derail NCCL). No per-chunk crc (unlike tcp): it would cost a
device-to-host read of every chunk, and NCCL and gloo move bytes over links with integrity checks
of their own (TCP, InfiniBand, NVLink). Neither the store nor those links are authenticated; the
handshake decides who learns a connection's prefix, the same trust as tcp's cleartext payloads.
"""

from __future__ import annotations

import contextlib
import math
import os
import secrets
import socket
import threading
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from pdserve.kv_transfer.base import Expectation, KVTransferError, OnDone, OnFailed, slots_for, write_kv
from pdserve.kv_transfer.channel import FRAME_TIMEOUT_S, HANDSHAKE_TIMEOUT_S
from pdserve.kv_transfer.codec import torch_dtype
from pdserve.kv_transfer.tcp import SocketKVReceiver, SocketKVSender, _Item, _Peer
from pdserve.protocol import KVLayerChunk, KVLayout, NcclRendezvous, PrefillJob, ProtocolError

SENDER_RANK, RECEIVER_RANK = 0, 1
_TAG = 0  # tensors pair with headers by order on a connection: one tag serves
# Once its header is out, a tensor must arrive within this, like the rest of a frame.
_OP_TIMEOUT = timedelta(seconds=FRAME_TIMEOUT_S)
# Both sides form the group right after the first header: the peer is there, or gone.
_CONNECT_TIMEOUT = timedelta(seconds=HANDSHAKE_TIMEOUT_S)
# NCCL's own deadline (its watchdog): later than ours, so ours fires first and fails the request.
_WATCHDOG_TIMEOUT = 2 * _OP_TIMEOUT


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def check_backend(backend: str) -> None:
    if not dist.is_available():
        raise ValueError("transport nccl needs torch.distributed, which this torch build lacks")
    if backend == "nccl" and not dist.is_nccl_available():
        raise ValueError("transport nccl with a CUDA KV cache needs a torch build with NCCL")
    if backend == "gloo" and not dist.is_gloo_available():
        raise ValueError("transport nccl with a CPU KV cache needs a torch build with gloo")


def make_group(backend: str, store: dist.Store, prefix: str, rank: int, local_addr: str) -> Any:
    """A 2-rank process group (a c10d backend object) over `store`, keyed by `prefix`."""
    prefixed = dist.PrefixStore(prefix, store)
    if backend == "gloo":
        opts = dist.ProcessGroupGloo._Options()  # type: ignore[attr-defined]
        opts._timeout = _CONNECT_TIMEOUT  # gloo's ops take the timeout we wait with
        opts.group_name = prefix
        # The address our KV socket uses reaches the peer; gloo's default resolves the hostname,
        # which may name another interface.
        opts._devices = [dist.ProcessGroupGloo.create_device(hostname=local_addr)]
        return dist.ProcessGroupGloo(prefixed, rank, 2, opts)
    from torch._C._distributed_c10d import ProcessGroupNCCL

    # An NCCL error or timeout must fail requests, not the worker: the default handling (3) takes
    # the whole process down from the watchdog thread. Read when the group is built; a value the
    # operator set wins.
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")  # CleanUpOnly: abort the comms
    nccl_opts = ProcessGroupNCCL.Options()
    nccl_opts._timeout = _WATCHDOG_TIMEOUT
    nccl_opts.group_name = prefix  # type: ignore[assignment]
    return ProcessGroupNCCL(prefixed, rank, 2, nccl_opts)


class _Link:
    """One connection's process group, its stream (CUDA) and receive buffer. Used by one thread;
    close() may come from any."""

    def __init__(
        self, rank: int, backend: str, store: dist.Store, prefix: str, local_addr: str, sock: socket.socket
    ) -> None:
        self.rank, self.backend, self.store, self.prefix = rank, backend, store, prefix
        self.local_addr = local_addr
        self.sock = sock  # the connection this link belongs to
        self.kv: torch.Tensor | None = None  # the last tensor received (decode side)
        self._group: Any = None
        self._stream: torch.cuda.Stream | None = None
        self._buffer: torch.Tensor | None = None  # [capacity] flat, reused chunk after chunk
        self._lock = threading.Lock()
        self._closed = False

    def _ensure_group(self) -> Any:
        if self._group is not None:
            return self._group
        try:
            group = make_group(self.backend, self.store, self.prefix, self.rank, self.local_addr)
        except RuntimeError as e:  # DistStoreError, DistNetworkError, ...
            raise ConnectionError(f"cannot form the {self.backend} process group: {e}") from None
        with self._lock:
            closed = self._closed
            if not closed:
                self._group = group
        if closed:
            group.abort()
            raise ConnectionError("KV link closed")
        return group

    def _on_stream(self, device: torch.device) -> contextlib.AbstractContextManager[Any]:
        """CUDA: a stream of our own, so the transfer neither waits for nor holds up the engine's."""
        if device.type != "cuda":
            return contextlib.nullcontext()
        if self._stream is None:
            self._stream = torch.cuda.Stream(device)
        return torch.cuda.stream(self._stream)

    def _transfer(self, tensor: torch.Tensor) -> None:
        group = self._ensure_group()
        with self._on_stream(tensor.device):
            try:
                if self.rank == SENDER_RANK:
                    work = group.send([tensor], RECEIVER_RANK, _TAG)
                else:
                    work = group.recv([tensor], SENDER_RANK, _TAG)
                # With a timeout the host waits until the op has completed on the device (NCCL
                # included), so the tensor may be reused or freed afterwards.
                work.wait(_OP_TIMEOUT)
            except RuntimeError as e:
                raise ConnectionError(f"{self.backend} transfer failed: {e}") from None

    def send(self, kv: torch.Tensor) -> None:
        self._transfer(kv)

    def receive(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        numel = math.prod(shape)
        buf = self._buffer
        if buf is None or buf.numel() < numel or buf.dtype != dtype:
            with self._on_stream(device):
                buf = self._buffer = torch.empty(numel, dtype=dtype, device=device)
        kv = buf[:numel].view(shape)  # [layers, 2, tokens, H_kv, D]
        self._transfer(kv)
        return kv

    def scatter(self, kv_caches: list[torch.Tensor], layer_start: int, slots: torch.Tensor) -> None:
        """Write the last received tensor into `slots`; complete on return (the decode step reads
        these blocks once the chunk counts as stored, and the buffer is reused next chunk)."""
        assert self.kv is not None
        with self._on_stream(self.kv.device):
            write_kv(kv_caches, layer_start, slots, self.kv)
        if self._stream is not None:
            self._stream.synchronize()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            group, self._group = self._group, None
        if group is not None:
            # NCCL: ends an op in flight now. gloo: a no-op; its peer's op fails once our group is
            # freed, and an op of ours in flight ends at its timeout.
            group.abort()


class NcclKVReceiver(SocketKVReceiver):
    transport = "nccl"

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
        self.device = kv_caches[0].device
        self.backend = backend_for(self.device)
        check_backend(self.backend)
        # Set before the accept thread starts. The store listens on our KV address only (left to
        # itself it would listen on every interface).
        listener = socket.create_server((host, 0))
        self._meeting = dist.TCPStore(
            host, listener.getsockname()[1], is_master=True, wait_for_workers=False,
            timeout=_CONNECT_TIMEOUT, master_listen_fd=listener.detach(),
        )  # fmt: skip
        self._links: set[_Link] = set()
        self._local = threading.local()  # .link: the connection thread's link
        # The most tokens a chunk can carry: as many as the cache holds.
        self._max_tokens = kv_caches[0].shape[1] * kv_caches[0].shape[2]
        super().__init__(layout, kv_caches, on_done, on_failed, secret, host, port)

    def close(self) -> None:
        super().close()
        with self._lock:
            links, self._links = self._links, set()
        for link in links:
            link.close()

    def _serve(self, conn: socket.socket) -> None:
        try:
            local_addr = conn.getsockname()[0]
        except OSError:  # closed under us: the receiver is closing
            conn.close()
            return
        link = _Link(RECEIVER_RANK, self.backend, self._meeting, secrets.token_hex(16), local_addr, conn)
        with self._lock:
            self._links.add(link)
        self._local.link = link
        try:
            super()._serve(conn)
        finally:
            with self._lock:
                self._links.discard(link)
            link.close()

    def handshake_extras(self) -> dict[str, Any]:
        link: _Link = self._local.link  # called on the connection's thread, in _serve
        return {"nccl": NcclRendezvous(self._meeting.port, link.prefix, self.backend)}

    def _receive_payload(self, conn: object, chunk: KVLayerChunk) -> bytearray:
        """Receive the chunk's tensor into the link (always: the next tensor belongs to this header)."""
        link: _Link = self._local.link
        shape = self._checked_shape(chunk)
        link.kv = None
        try:
            link.kv = link.receive(shape, torch_dtype(self.layout.dtype), self.device)
        except ConnectionError as e:
            # Headers and tensors no longer pair up: fail the request, drop the connection.
            if self._pop(chunk.request_id) is not None:
                self.on_failed(chunk.request_id, f"KV transfer failed: {e}")
            raise
        return bytearray()

    def _checked_shape(self, chunk: KVLayerChunk) -> tuple[int, ...]:
        """The tensor the header announces; a header we cannot pair with one ends the connection."""
        shape = self._chunk_shape(chunk)  # [layers, 2, tokens, H_kv, D]
        nbytes = math.prod(shape) * torch_dtype(self.layout.dtype).itemsize
        if not (
            chunk.wire_dtype == "native"
            and chunk.scales_nbytes == 0
            and 0 <= chunk.layer_start < chunk.layer_end <= self.layout.num_layers
            and 0 <= chunk.start < chunk.end <= chunk.start + self._max_tokens
            and chunk.nbytes == nbytes
        ):
            raise ProtocolError(f"[{chunk.request_id}] KV header describes no tensor we can receive: {chunk}")
        return shape

    def _store(self, exp: Expectation, chunk: KVLayerChunk, payload: bytearray) -> None:
        rid = chunk.request_id
        if chunk.start < exp.skip_tokens:
            raise KVTransferError(f"[{rid}] chunk starts at {chunk.start} < skip {exp.skip_tokens}")
        if chunk.end > len(exp.dst_block_ids) * self.layout.block_size:
            raise KVTransferError(f"[{rid}] chunk ends at {chunk.end}, past the reserved blocks")
        slots = slots_for(exp.dst_block_ids, self.layout.block_size, chunk.start, chunk.end)
        self._local.link.scatter(self.kv_caches, chunk.layer_start, slots)


class _NcclPeer(_Peer):
    def __init__(self, sender: SocketKVSender, host: str, port: int) -> None:
        self.link: _Link | None = None
        super().__init__(sender, host, port)

    def _read_loop(self, sock: socket.socket) -> None:
        super()._read_loop(sock)
        # The decode side hung up: end a send that waits for it now, not at its timeout.
        link = self.link
        if link is not None and link.sock is sock:
            link.close()

    def _drop_connection(self) -> None:
        link, self.link = self.link, None
        if link is not None:
            link.close()
        super()._drop_connection()


class NcclKVSender(SocketKVSender):
    transport = "nccl"

    def _peer(self, job: PrefillJob) -> _Peer:
        key = (job.kv_host, job.kv_port)
        with self._lock:
            if key not in self._peers:
                self._peers[key] = _NcclPeer(self, job.kv_host, job.kv_port)
            return self._peers[key]

    def send_kv(self, job: PrefillJob, layer_start: int, kv: torch.Tensor, start: int) -> None:
        """Engine thread: kv [layers, 2, tokens, H_kv, D] was just gathered on the engine's stream;
        the send thread waits for that gather only, never for the rest of the forward."""
        kv = kv.contiguous()
        ready = None
        if kv.is_cuda:
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(kv.device))
        self._peer(job).queue.put(_Item("kv", job, (kv, ready), layer_start, start))

    # ---- called on a peer's send thread ----

    def on_connected(self, peer: _Peer) -> None:
        rendezvous = peer.ack.nccl if peer.ack is not None else None
        if rendezvous is None:
            raise ConnectionError("the decode worker offers no process group (is it on transport nccl?)")
        assert isinstance(peer, _NcclPeer) and peer.sock is not None
        try:
            store = dist.TCPStore(peer.host, rendezvous.store_port, is_master=False, timeout=_CONNECT_TIMEOUT)
        except RuntimeError as e:
            raise ConnectionError(f"cannot reach the decode worker's store: {e}") from None
        peer.link = _Link(
            SENDER_RANK, rendezvous.backend, store, rendezvous.prefix, peer.sock.getsockname()[0], peer.sock
        )

    def push(self, peer: _Peer, item: _Item) -> None:
        super().push(peer, item)  # the header of a chunk, or the whole message
        if item.kind == "kv":
            assert isinstance(peer, _NcclPeer) and peer.link is not None
            peer.link.send(item.payload[0])

    def encode_chunk(self, peer: _Peer, item: _Item) -> tuple[KVLayerChunk, bytes]:
        kv, ready = item.payload
        assert isinstance(peer, _NcclPeer) and peer.link is not None
        if backend_for(kv.device) != peer.link.backend:
            raise ConnectionError(
                f"the decode worker receives KV with {peer.link.backend}; "
                f"our KV cache on {kv.device.type} needs {backend_for(kv.device)}"
            )
        if ready is not None:
            ready.synchronize()
        chunk = KVLayerChunk(
            request_id=item.job.request_id,
            layer_start=item.layer_start,
            layer_end=item.layer_start + kv.shape[0],
            start=item.start,
            end=item.start + kv.shape[2],
            wire_dtype="native",
            nbytes=kv.numel() * kv.element_size(),
            checksum=0,  # not checked: see the module docstring
        )
        return chunk, b""


__all__ = ["NcclKVReceiver", "NcclKVSender"]
