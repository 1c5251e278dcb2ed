from __future__ import annotations

import glob
import threading
import time

import pytest
import torch

from pdserve.kv_transfer import make_receiver, make_sender
from pdserve.kv_transfer.base import read_kv, slots_for
from pdserve.kv_transfer.shm import SHM_PREFIX, ShmKVCache
from pdserve.kv_transfer.tcp import SocketKVSender
from pdserve.protocol import KVLayout, PrefillDone, PrefillJob

LAYOUT = KVLayout("tiny", "float32", block_size=4, num_layers=3, num_kv_heads=2, head_dim=8)
SECRET = b"s3cret"
NUM_BLOCKS = 16


class Sink:
    def __init__(self) -> None:
        self.done: list[tuple[PrefillDone, int]] = []
        self.failed: list[tuple[str, str]] = []
        self.event = threading.Event()

    def on_done(self, done: PrefillDone, stats: object) -> None:
        self.done.append((done, stats.nbytes))  # type: ignore[attr-defined]
        self.event.set()

    def on_failed(self, request_id: str, error: str) -> None:
        self.failed.append((request_id, error))
        self.event.set()


def wait_for(cond: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def make_caches() -> list[torch.Tensor]:
    return [torch.zeros(2, NUM_BLOCKS, 4, 2, 8) for _ in range(LAYOUT.num_layers)]


def job_for(rx: object, rid: str, blocks: list[int], skip: int) -> PrefillJob:
    host, port = rx.endpoint  # type: ignore[attr-defined]
    return PrefillJob(rid, [], {}, "d0", host, port, blocks, skip, time.time() + 30, LAYOUT)


@pytest.fixture(params=["local", "tcp", "shm", "nixl"])
def pair(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    transport = request.param
    if transport == "nixl":
        pytest.importorskip("nixl._api", reason="transport nixl needs the nixl package")
    sink = Sink()
    shm = ShmKVCache(LAYOUT, NUM_BLOCKS, tag="test") if transport == "shm" else None
    caches = shm.tensors if shm is not None else make_caches()
    rx = make_receiver(transport, LAYOUT, caches, sink.on_done, sink.on_failed, SECRET,
                       shm_name=shm.name if shm else None)  # fmt: skip
    errors: list[tuple[str, str]] = []
    tx = make_sender(transport, LAYOUT, "p0", SECRET, on_error=lambda r, e: errors.append((r, e)))
    yield transport, rx, tx, sink, caches, errors
    tx.close()
    rx.close()
    if shm is not None:
        shm.close()


def test_push_layer_by_layer_lands_in_reserved_blocks(pair) -> None:  # type: ignore[no-untyped-def]
    _, rx, tx, sink, caches, _ = pair
    blocks, skip, n = [5, 2, 9, 11, 3], 4, 18
    kv = torch.randn(LAYOUT.num_layers, 2, n, 2, 8)  # the prefill side's KV for positions [0, n)
    rx.expect("r1", blocks, skip)
    job = job_for(rx, "r1", blocks, skip)
    for layer in range(LAYOUT.num_layers):  # two token chunks per layer, as chunked prefill would
        tx.send_kv(job, layer, kv[layer : layer + 1, :, skip:10], skip)
        tx.send_kv(job, layer, kv[layer : layer + 1, :, 10:n], 10)
    tx.send_done(job, PrefillDone("r1", 42, None, n, 0))
    wait_for(lambda: sink.event.is_set())
    assert not sink.failed
    done, nbytes = sink.done[0]
    assert done.first_token_id == 42
    assert nbytes == (n - skip) * LAYOUT.bytes_per_token
    got = read_kv(caches, 0, LAYOUT.num_layers, slots_for(blocks, 4, skip, n))
    assert torch.equal(got, kv[:, :, skip:n])
    # Positions before skip (cached on the decode side) were not touched.
    assert read_kv(caches, 0, 3, slots_for(blocks, 4, 0, skip)).abs().sum() == 0


def test_missing_layers_fail_the_transfer(pair) -> None:  # type: ignore[no-untyped-def]
    _, rx, tx, sink, _, _ = pair
    rx.expect("r2", [0, 1], 0)
    job = job_for(rx, "r2", [0, 1], 0)
    tx.send_kv(job, 0, torch.randn(1, 2, 6, 2, 8), 0)
    tx.send_done(job, PrefillDone("r2", 1, None, 6, 0))
    wait_for(lambda: sink.event.is_set())
    assert sink.failed and "incomplete" in sink.failed[0][1]


def test_unexpected_request_is_refused_and_sender_told(pair) -> None:  # type: ignore[no-untyped-def]
    transport, rx, tx, _, caches, _ = pair
    if transport == "shm":
        pytest.skip("shm writes before the header: the decode side never cancels a live shm reservation")
    aborted: list[str] = []
    tx.on_abort = aborted.append
    rx.expect("other", [0], 0)
    rx.cancel("other")
    job = job_for(rx, "gone", [0, 1], 0)
    tx.send_kv(job, 0, torch.ones(1, 2, 4, 2, 8), 0)
    wait_for(lambda: aborted == ["gone"])
    if transport != "nixl":  # nixl writes in place before its header (the decode worker drains such blocks)
        assert all(c.abs().sum() == 0 for c in caches)


@pytest.mark.parametrize("wire", ["bfloat16", "fp8"])
def test_compressed_wire(wire: str) -> None:
    sink = Sink()
    caches = make_caches()
    rx = make_receiver("tcp", LAYOUT, caches, sink.on_done, sink.on_failed, SECRET)
    tx = make_sender("tcp", LAYOUT, "p0", SECRET, wire_dtype=wire)
    try:
        kv = torch.randn(3, 2, 8, 2, 8)
        rx.expect("r", [1, 2], 0)
        job = job_for(rx, "r", [1, 2], 0)
        tx.send_kv(job, 0, kv, 0)
        tx.send_done(job, PrefillDone("r", 0, None, 8, 0))
        wait_for(lambda: sink.event.is_set())
        _, nbytes = sink.done[0]
        # fp8 pays one fp32 scale per 16 values in this tiny shape (about 2% in real shapes).
        assert nbytes < kv.numel() * 4 / (1.9 if wire == "bfloat16" else 3.0)
        got = read_kv(caches, 0, 3, slots_for([1, 2], 4, 0, 8))
        tol = 0.02 if wire == "bfloat16" else 0.15
        assert (got - kv).abs().max() < tol * kv.abs().max()
    finally:
        tx.close()
        rx.close()


@pytest.mark.parametrize(
    ("secret", "layout", "needle"),
    [
        (b"wrong", LAYOUT, "authentication failed"),
        (SECRET, KVLayout("tiny", "float32", 4, 3, 4, 8), "incompatible KV layout: num_kv_heads"),
    ],
)
def test_handshake_refuses_bad_peers(secret: bytes, layout: KVLayout, needle: str) -> None:
    sink = Sink()
    caches = make_caches()
    rx = make_receiver("tcp", LAYOUT, caches, sink.on_done, sink.on_failed, SECRET)
    errors: list[tuple[str, str]] = []
    tx = make_sender("tcp", layout, "p0", secret, on_error=lambda r, e: errors.append((r, e)))
    try:
        rx.expect("r", [0], 0)
        tx.send_kv(job_for(rx, "r", [0], 0), 0, torch.ones(3, 2, 1, layout.num_kv_heads, 8), 0)
        wait_for(lambda: errors)
        assert needle in errors[0][1]
        assert all(c.abs().sum() == 0 for c in caches)
    finally:
        tx.close()
        rx.close()


def test_corrupted_chunk_is_rejected() -> None:
    class Corrupting(SocketKVSender):
        def encode_chunk(self, peer, item):  # type: ignore[no-untyped-def]
            chunk, data = super().encode_chunk(peer, item)
            return chunk, bytes([data[0] ^ 0xFF]) + data[1:]

    sink = Sink()
    caches = make_caches()
    rx = make_receiver("tcp", LAYOUT, caches, sink.on_done, sink.on_failed, SECRET)
    tx = Corrupting(LAYOUT, "p0", SECRET)
    aborted: list[str] = []
    tx.on_abort = aborted.append  # type: ignore[method-assign]
    try:
        rx.expect("r", [0, 1], 0)
        tx.send_kv(job_for(rx, "r", [0, 1], 0), 0, torch.randn(1, 2, 5, 2, 8), 0)
        wait_for(lambda: sink.failed and aborted)
        assert "checksum" in sink.failed[0][1]
    finally:
        tx.close()
        rx.close()


def test_shm_segment_is_unlinked_on_close() -> None:
    cache = ShmKVCache(LAYOUT, 4, tag="leakcheck")
    assert glob.glob(f"/dev/shm/{SHM_PREFIX}leakcheck_*")
    cache.close()
    assert not glob.glob(f"/dev/shm/{SHM_PREFIX}leakcheck_*")
