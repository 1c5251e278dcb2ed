"""The authenticated socket channel under the tcp and shm transports.

Handshake (the decode side listens):
  D → P  KVChallenge(nonce, version)
  P → D  KVHello(version, worker_id, layout, transport, mac = HMAC-SHA256(secret, nonce || worker_id))
  D → P  KVHelloAck(ok | error)  — refused on a bad MAC, another protocol version or another KV layout
Then P sends KVLayerChunk (+ payload for tcp), PrefillDone, PrefillFailed; D may send AbortRequest back.
Frames are length-prefixed msgpack (protocol.frame); payload bytes follow their header raw.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import socket
import struct
from typing import Any

from pdserve.protocol import (
    MAX_FRAME,
    PROTOCOL_VERSION,
    KVChallenge,
    KVHello,
    KVHelloAck,
    KVLayout,
    ProtocolError,
    decode,
    frame,
)

HANDSHAKE_TIMEOUT_S = 10.0
# Once a frame has started, the rest must arrive within this; an idle connection may wait forever.
FRAME_TIMEOUT_S = 60.0
_LEN = struct.Struct("!I")


def make_mac(secret: bytes, nonce: bytes, worker_id: str) -> bytes:
    return hmac.new(secret, nonce + worker_id.encode(), hashlib.sha256).digest()


def recv_exact(sock: socket.socket, n: int, into: bytearray | None = None) -> bytearray:
    buf = into if into is not None else bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        r = sock.recv_into(view[got:], n - got)
        if r == 0:
            raise ConnectionError("peer closed the KV channel")
        got += r
    return buf


def recv_msg(sock: socket.socket, idle_ok: bool = True) -> Any:
    """Next message. Waiting for its first byte may take forever when idle_ok; the rest has a deadline."""
    sock.settimeout(None if idle_ok else FRAME_TIMEOUT_S)
    head = recv_exact(sock, 1)
    sock.settimeout(FRAME_TIMEOUT_S)
    head += recv_exact(sock, _LEN.size - 1)
    (n,) = _LEN.unpack(head)
    if n > MAX_FRAME:
        raise ProtocolError(f"frame of {n} bytes exceeds the limit")
    return decode(bytes(recv_exact(sock, n)))


def send_msg(sock: socket.socket, msg: Any, payload: bytes | memoryview = b"") -> None:
    sock.sendall(frame(msg))
    if payload:
        sock.sendall(payload)


def server_handshake(
    sock: socket.socket,
    secret: bytes,
    layout: KVLayout,
    transport: str,
    shm_name: str | None,
    ack_extras: dict[str, Any] | None = None,
) -> str:
    """Run the decode side of the handshake. Returns the peer's worker id; raises on refusal."""
    sock.settimeout(HANDSHAKE_TIMEOUT_S)
    nonce = os.urandom(32)
    send_msg(sock, KVChallenge(nonce, PROTOCOL_VERSION))
    hello = recv_msg(sock, idle_ok=False)
    error = None
    if not isinstance(hello, KVHello):
        error = f"expected KVHello, got {type(hello).__name__}"
    elif hello.protocol_version != PROTOCOL_VERSION:
        error = f"protocol version {hello.protocol_version} != {PROTOCOL_VERSION}"
    elif not hmac.compare_digest(hello.mac, make_mac(secret, nonce, hello.worker_id)):
        error = "authentication failed (KV secrets differ)"
    elif hello.transport != transport:
        error = f"transport {hello.transport!r} != {transport!r}"
    else:
        diff = layout.incompatibility(hello.layout)
        if diff:
            error = f"incompatible KV layout: {diff}"
    if error:
        send_msg(sock, KVHelloAck(ok=False, error=error, layout=layout))
        raise ConnectionRefusedError(error)
    # Extras (memory handles) go out only to an authenticated peer.
    send_msg(sock, KVHelloAck(ok=True, shm_name=shm_name, layout=layout, **(ack_extras or {})))
    return str(hello.worker_id)


def client_connect(
    host: str, port: int, secret: bytes, worker_id: str, layout: KVLayout, transport: str
) -> tuple[socket.socket, KVHelloAck]:
    """Connect and authenticate as the prefill side. Raises ConnectionRefusedError with the reason."""
    sock = socket.create_connection((host, port), timeout=HANDSHAKE_TIMEOUT_S)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        challenge = recv_msg(sock, idle_ok=False)
        if not isinstance(challenge, KVChallenge):
            raise ProtocolError(f"expected KVChallenge, got {type(challenge).__name__}")
        mac = make_mac(secret, challenge.nonce, worker_id)
        send_msg(sock, KVHello(PROTOCOL_VERSION, worker_id, layout, transport, mac))
        ack = recv_msg(sock, idle_ok=False)
        if not isinstance(ack, KVHelloAck):
            raise ProtocolError(f"expected KVHelloAck, got {type(ack).__name__}")
        if not ack.ok:
            raise ConnectionRefusedError(f"KV peer {host}:{port} refused us: {ack.error}")
    except BaseException:
        sock.close()
        raise
    return sock, ack
