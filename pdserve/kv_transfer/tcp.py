"""tcp transport: KV bytes travel over an authenticated socket (any host).

The receiver runs one thread per connection and scatters each chunk into the reserved blocks;
the sender runs one thread per peer, so the engine thread only queues tensors and goes on
computing the next layers while earlier ones are on the wire.
"""

from __future__ import annotations

import logging
import queue
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from pdserve import envs
from pdserve.kv_transfer.base import (
    Expectation,
    KVReceiver,
    KVSender,
    KVTransferError,
    OnDone,
    OnFailed,
    read_kv,
    slots_for,
    write_kv,
)
from pdserve.kv_transfer.channel import client_connect, recv_exact, recv_msg, send_msg, server_handshake
from pdserve.kv_transfer.codec import checksum, decode_kv, encode_kv, torch_dtype
from pdserve.protocol import (
    AbortRequest,
    KVHelloAck,
    KVLayerChunk,
    KVLayout,
    PrefillDone,
    PrefillFailed,
    PrefillJob,
    ProtocolError,
)
from pdserve.trace import mark

logger = logging.getLogger(__name__)


class SocketKVReceiver(KVReceiver):
    transport = "tcp"

    def __init__(
        self,
        layout: KVLayout,
        kv_caches: list[torch.Tensor],
        on_done: OnDone,
        on_failed: OnFailed,
        secret: bytes,
        host: str = "127.0.0.1",
        port: int = 0,
        shm_name: str | None = None,
    ) -> None:
        super().__init__(layout, kv_caches, on_done, on_failed)
        self.secret = secret
        self.shm_name = shm_name
        self._listener = socket.create_server((host, port))
        self._host = host
        self._port = self._listener.getsockname()[1]
        self._closed = False
        self._conns: list[socket.socket] = []
        threading.Thread(target=self._accept_loop, name="kv-accept", daemon=True).start()

    @property
    def endpoint(self) -> tuple[str, int]:
        return self._host, self._port

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        with self._lock:
            conns, self._conns = self._conns, []
        for c in conns:
            c.close()

    def handshake_extras(self) -> dict[str, Any]:
        """More KVHelloAck fields for transports that map the receiver's memory (cuda_ipc)."""
        return {}

    # ---- connection threads ----

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), name="kv-recv", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            peer = server_handshake(
                conn, self.secret, self.layout, self.transport, self.shm_name, self.handshake_extras()
            )
        except (ConnectionRefusedError, ProtocolError, OSError) as e:
            logger.warning("KV connection refused: %s", e)
            conn.close()
            return
        logger.info("KV channel open from %s (%s)", peer, self.transport)
        refused: set[str] = set()
        try:
            while True:
                msg = recv_msg(conn)
                if isinstance(msg, KVLayerChunk):
                    self._on_chunk(conn, msg, refused)
                elif isinstance(msg, PrefillDone):
                    mark(msg.trace, "decode.done_received")
                    self._on_prefill_done(msg)
                elif isinstance(msg, PrefillFailed):
                    # Reported even when no longer expected: the owner may hold blocks until the writer stops.
                    self._pop(msg.request_id)
                    self.on_failed(msg.request_id, f"prefill worker failed: {msg.error}")
                else:
                    raise ProtocolError(f"unexpected {type(msg).__name__} on the KV channel")
        except (ConnectionError, OSError, ProtocolError) as e:
            if not self._closed:
                logger.info("KV channel from %s closed: %s", peer, e)
        finally:
            conn.close()

    def _on_chunk(self, conn: socket.socket, chunk: KVLayerChunk, refused: set[str]) -> None:
        payload = self._receive_payload(conn, chunk)
        with self._lock:
            exp = self._expected.get(chunk.request_id)
        if exp is None:
            if chunk.request_id not in refused:
                refused.add(chunk.request_id)
                send_msg(conn, AbortRequest(chunk.request_id, "not expected (aborted or expired)"))
            return
        try:
            self._store(exp, chunk, payload)
        except KVTransferError as e:
            if self._pop(chunk.request_id) is not None:
                self.on_failed(chunk.request_id, str(e))
            refused.add(chunk.request_id)
            send_msg(conn, AbortRequest(chunk.request_id, str(e)))
            return
        exp.note(
            chunk.layer_start, chunk.layer_end, chunk.end - chunk.start, chunk.nbytes + chunk.scales_nbytes
        )

    def _receive_payload(self, conn: socket.socket, chunk: KVLayerChunk) -> bytearray:
        return recv_exact(conn, chunk.nbytes + chunk.scales_nbytes)

    def _chunk_shape(self, chunk: KVLayerChunk) -> tuple[int, ...]:
        lay = self.layout
        return (
            chunk.layer_end - chunk.layer_start,
            2,
            chunk.end - chunk.start,
            lay.num_kv_heads,
            lay.head_dim,
        )

    def _store(self, exp: Expectation, chunk: KVLayerChunk, payload: bytearray) -> None:
        if checksum(payload) != chunk.checksum:
            raise KVTransferError(f"[{chunk.request_id}] KV checksum mismatch on layers {chunk.layer_start}+")
        if chunk.start < exp.skip_tokens:
            raise KVTransferError(
                f"[{chunk.request_id}] chunk starts at {chunk.start} < skip {exp.skip_tokens}"
            )
        view = memoryview(payload)
        kv = decode_kv(
            view[: chunk.nbytes], view[chunk.nbytes :], chunk.wire_dtype,
            self._chunk_shape(chunk), torch_dtype(self.layout.dtype),
        )  # fmt: skip
        slots = slots_for(exp.dst_block_ids, self.layout.block_size, chunk.start, chunk.end)
        write_kv(self.kv_caches, chunk.layer_start, slots, kv)

    def _on_prefill_done(self, done: PrefillDone) -> None:
        self.finish_prefill(done)


@dataclass
class _Item:
    kind: str  # "kv" | "done" | "failed"
    job: PrefillJob
    payload: Any = None
    layer_start: int = 0
    start: int = 0


class _Peer:
    """One decode worker's KV endpoint: a connection, a send queue and its two threads."""

    def __init__(self, sender: SocketKVSender, host: str, port: int) -> None:
        self.sender = sender
        self.host, self.port = host, port
        self.queue: queue.Queue[_Item | None] = queue.Queue()
        self.sock: socket.socket | None = None
        self.ack: KVHelloAck | None = None
        threading.Thread(target=self._send_loop, name=f"kv-send-{port}", daemon=True).start()

    def _send_loop(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                break
            if item.job.request_id in self.sender.aborted:
                if item.kind != "kv":  # the request's last item: forget it
                    self.sender.aborted.discard(item.job.request_id)
                continue
            if item.kind == "kv" and time.time() > item.job.deadline:
                # The decode side has given up on it and may reuse the blocks: never write late.
                self.sender.aborted.add(item.job.request_id)
                self.sender.report_error(item.job.request_id, "KV push after the job's deadline: dropped")
                continue
            try:
                if self.sock is None:
                    self._connect()
                self.sender.push(self, item)
            except (OSError, ConnectionError, ProtocolError) as e:
                self._drop_connection()
                self.sender.report_error(
                    item.job.request_id, f"KV push to {self.host}:{self.port} failed: {e}"
                )
        self._drop_connection()

    def _connect(self) -> None:
        s = self.sender
        self.sock, self.ack = client_connect(
            self.host, self.port, s.secret, s.worker_id, s.layout, s.transport
        )
        self.sender.on_connected(self)
        threading.Thread(target=self._read_loop, args=(self.sock,), name="kv-read", daemon=True).start()

    def _read_loop(self, sock: socket.socket) -> None:
        try:
            while True:
                msg = recv_msg(sock)
                if isinstance(msg, AbortRequest):
                    self.sender.aborted.add(msg.request_id)
                    self.sender.on_abort(msg.request_id)
        except (OSError, ConnectionError, ProtocolError):
            return

    def _drop_connection(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


class SocketKVSender(KVSender):
    transport = "tcp"

    def __init__(
        self,
        layout: KVLayout,
        worker_id: str,
        secret: bytes,
        wire_dtype: str = "native",
        on_error: Callable[[str, str], None] | None = None,
    ) -> None:
        self.layout = layout
        self.worker_id = worker_id
        self.secret = secret
        self.wire_dtype = wire_dtype
        self.on_error = on_error
        self.aborted: set[str] = set()
        self.fault_delay_s = envs.fault_kv_delay_s()
        self._peers: dict[tuple[str, int], _Peer] = {}
        self._lock = threading.Lock()

    def _peer(self, job: PrefillJob) -> _Peer:
        key = (job.kv_host, job.kv_port)
        with self._lock:
            if key not in self._peers:
                self._peers[key] = _Peer(self, job.kv_host, job.kv_port)
            return self._peers[key]

    def send_kv(self, job: PrefillJob, layer_start: int, kv: torch.Tensor, start: int) -> None:
        self._peer(job).queue.put(_Item("kv", job, kv, layer_start, start))

    def send_done(self, job: PrefillJob, done: PrefillDone) -> None:
        self._peer(job).queue.put(_Item("done", job, done))

    def send_failed(self, job: PrefillJob, error: str) -> None:
        self._peer(job).queue.put(_Item("failed", job, PrefillFailed(job.request_id, error)))

    def close(self) -> None:
        with self._lock:
            peers, self._peers = list(self._peers.values()), {}
        for p in peers:
            p.queue.put(None)

    def report_error(self, request_id: str, error: str) -> None:
        logger.warning("[%s] %s", request_id, error)
        if self.on_error is not None:
            self.on_error(request_id, error)

    # ---- called on a peer's send thread ----

    def on_connected(self, peer: _Peer) -> None:
        """Hook for transports that map the peer's memory (shm)."""

    def push(self, peer: _Peer, item: _Item) -> None:
        assert peer.sock is not None
        if item.kind == "kv":
            if self.fault_delay_s:
                time.sleep(self.fault_delay_s)
            chunk, payload = self.encode_chunk(peer, item)
            send_msg(peer.sock, chunk, payload)
        else:
            if isinstance(item.payload, PrefillDone):
                mark(item.payload.trace, "prefill.done_sent")
            send_msg(peer.sock, item.payload)
            self.aborted.discard(item.job.request_id)

    def encode_chunk(self, peer: _Peer, item: _Item) -> tuple[KVLayerChunk, bytes]:
        kv: torch.Tensor = item.payload
        payload, scales = encode_kv(kv, self.wire_dtype)
        data = payload + scales
        chunk = KVLayerChunk(
            request_id=item.job.request_id,
            layer_start=item.layer_start,
            layer_end=item.layer_start + kv.shape[0],
            start=item.start,
            end=item.start + kv.shape[2],
            wire_dtype=self.wire_dtype,
            nbytes=len(payload),
            checksum=checksum(data),
            scales_nbytes=len(scales),
        )
        return chunk, data


__all__ = ["SocketKVReceiver", "SocketKVSender", "read_kv"]
