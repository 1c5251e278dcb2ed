"""nccl transport on CPU KV caches: its gloo path, in one process (the sender and receiver are separate
objects with threads of their own, each connection a 2-rank process group over the receiver's store)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from pdserve.config import WorkerConfig
from pdserve.engine.kv_output import KVStreamer
from pdserve.engine.request import Request
from pdserve.engine.scheduler import ScheduledRequest
from pdserve.kv_transfer import KVReceiver, KVSender, make_receiver, make_sender
from pdserve.kv_transfer.base import read_kv, slots_for, write_kv
from pdserve.kv_transfer.nccl import NcclKVSender
from pdserve.kv_transfer.tcp import SocketKVSender
from pdserve.protocol import KVLayout, PrefillDone, PrefillJob
from pdserve.sampling_params import SamplingParams

pytestmark = pytest.mark.timeout(10)

LAYOUT = KVLayout("tiny", "float32", block_size=4, num_layers=3, num_kv_heads=2, head_dim=8)
SECRET = b"s3cret"
NUM_BLOCKS = 24


class Sink:
    def __init__(self) -> None:
        self.done: dict[str, tuple[PrefillDone, int]] = {}
        self.failed: list[tuple[str, str]] = []

    def on_done(self, done: PrefillDone, stats: Any) -> None:
        self.done[done.request_id] = (done, stats.nbytes)

    def on_failed(self, request_id: str, error: str) -> None:
        self.failed.append((request_id, error))


def wait_for(cond: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def random_caches(seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(2, NUM_BLOCKS, 4, 2, 8, generator=gen) for _ in range(LAYOUT.num_layers)]


def job_for(rx: KVReceiver, rid: str, blocks: list[int], skip: int) -> PrefillJob:
    host, port = rx.endpoint
    return PrefillJob(rid, [], {}, "d0", host, port, blocks, skip, time.time() + 30, LAYOUT)


class Prefill:
    """One request's remote prefill on the sender, driven through the KVStreamer hook the prefill
    worker uses (gather per layer group, then send_kv)."""

    def __init__(self, streamer: KVStreamer, job: PrefillJob, num_tokens: int, src_blocks: list[int]) -> None:
        self.streamer = streamer
        self.req = Request(job.request_id, list(range(num_tokens)), SamplingParams(max_tokens=1), 1, None)
        self.req.block_table = src_blocks
        self.req.kv_job = job

    def step(self, num_new_tokens: int) -> None:
        hook = self.streamer.layer_hook_for([ScheduledRequest(self.req, num_new_tokens)])
        for layer in range(LAYOUT.num_layers):
            if hook is not None:  # None: the decode side holds all of this step's positions
                hook(layer)
        self.req.num_computed_tokens += num_new_tokens

    def finish(self, first_token: int) -> None:
        self.streamer.send_first_token(self.req, first_token, None)


@pytest.fixture
def decode_side() -> Iterator[tuple[KVReceiver, Sink, list[torch.Tensor]]]:
    sink = Sink()
    caches = [torch.zeros(2, NUM_BLOCKS, 4, 2, 8) for _ in range(LAYOUT.num_layers)]
    rx = make_receiver("nccl", LAYOUT, caches, sink.on_done, sink.on_failed, SECRET)
    yield rx, sink, caches
    rx.close()


@pytest.fixture
def prefill_side() -> Iterator[tuple[KVSender, KVStreamer, list[torch.Tensor], list[tuple[str, str]]]]:
    errors: list[tuple[str, str]] = []
    tx = make_sender("nccl", LAYOUT, "p0", SECRET, on_error=lambda r, e: errors.append((r, e)))
    src = random_caches(0)
    yield tx, KVStreamer(tx, src, LAYOUT.block_size, layers_per_chunk=2), src, errors  # groups of 2 and 1
    tx.close()


def landed(caches: list[torch.Tensor], blocks: list[int], start: int, end: int) -> torch.Tensor:
    return read_kv(caches, 0, LAYOUT.num_layers, slots_for(blocks, LAYOUT.block_size, start, end))


def test_kv_arrives_bit_identical_in_the_reserved_slots(decode_side, prefill_side) -> None:  # type: ignore[no-untyped-def]
    rx, sink, caches = decode_side
    _, streamer, src, errors = prefill_side
    src_blocks, dst_blocks, skip, n = [7, 2, 19, 11, 5, 3], [14, 1, 9, 22, 6, 17], 8, 23
    rx.expect("r1", dst_blocks, skip)
    prefill = Prefill(streamer, job_for(rx, "r1", dst_blocks, skip), n, src_blocks)
    prefill.step(13)  # a chunked prefill: two steps, the first straddling skip
    prefill.step(n - 13)
    prefill.finish(42)
    wait_for(lambda: sink.done or sink.failed)
    assert not sink.failed and not errors
    done, nbytes = sink.done["r1"]
    assert (done.first_token_id, done.num_tokens) == (42, n)
    assert nbytes == (n - skip) * LAYOUT.bytes_per_token
    assert torch.equal(landed(caches, dst_blocks, skip, n), landed(src, src_blocks, skip, n))
    # Nothing else was written: positions the decode side already held, other blocks.
    rest = [c.clone() for c in caches]
    write_kv(rest, 0, slots_for(dst_blocks, LAYOUT.block_size, skip, n), torch.zeros(3, 2, n - skip, 2, 8))
    assert all(c.abs().sum() == 0 for c in rest)


def test_cancelled_request_never_completes_and_the_link_stays_paired(decode_side, prefill_side) -> None:  # type: ignore[no-untyped-def]
    rx, sink, caches = decode_side
    tx, streamer, _, _ = prefill_side
    aborted: list[str] = []
    tx.on_abort = aborted.append  # type: ignore[method-assign]
    rx.expect("gone", [0, 1], 0)
    rx.cancel("gone")
    gone = Prefill(streamer, job_for(rx, "gone", [0, 1], 0), 6, [3, 4])
    gone.step(6)
    wait_for(lambda: aborted == ["gone"])
    gone.finish(1)
    assert all(c.abs().sum() == 0 for c in caches)
    # The refused chunks' tensors were consumed: the next request on the connection lands intact.
    rx.expect("next", [5, 6], 0)
    nxt = Prefill(streamer, job_for(rx, "next", [5, 6], 0), 7, [8, 9])
    nxt.step(7)
    nxt.finish(2)
    wait_for(lambda: "next" in sink.done)
    assert "gone" not in sink.done
    assert torch.equal(landed(caches, [5, 6], 0, 7), landed(streamer.kv_caches, [8, 9], 0, 7))


def test_wrong_secret_is_refused(decode_side) -> None:  # type: ignore[no-untyped-def]
    rx, sink, caches = decode_side
    errors: list[tuple[str, str]] = []
    tx = make_sender("nccl", LAYOUT, "p0", b"wrong", on_error=lambda r, e: errors.append((r, e)))
    try:
        rx.expect("r", [0, 1], 0)
        tx.send_kv(job_for(rx, "r", [0, 1], 0), 0, torch.ones(3, 2, 5, 2, 8), 0)
        wait_for(lambda: errors)
        assert "authentication failed" in errors[0][1]
        assert not sink.done and all(c.abs().sum() == 0 for c in caches)
    finally:
        tx.close()


def test_concurrent_requests_interleaved_over_two_connections(decode_side) -> None:  # type: ignore[no-untyped-def]
    rx, sink, caches = decode_side
    senders = [make_sender("nccl", LAYOUT, f"p{i}", SECRET) for i in range(2)]
    try:
        srcs = [random_caches(1), random_caches(2)]
        streamers = [KVStreamer(tx, src, LAYOUT.block_size) for tx, src in zip(senders, srcs, strict=True)]
        # (sender, source blocks, reserved blocks, skip, tokens): two requests per prefill worker
        plan = {
            "a": (0, [1, 3, 5], [0, 2, 4], 0, 10),
            "b": (0, [10, 12], [6, 8], 4, 8),
            "c": (1, [2, 4, 6, 8], [1, 3, 5, 7], 0, 15),
            "d": (1, [20, 21, 22], [9, 10, 11], 4, 12),
        }
        prefills = {}
        for rid, (i, src_blocks, dst_blocks, skip, n) in plan.items():
            rx.expect(rid, dst_blocks, skip)
            prefills[rid] = Prefill(streamers[i], job_for(rx, rid, dst_blocks, skip), n, src_blocks)
        for _ in range(2):  # two steps each, the requests' chunks interleaved on each connection
            for rid, (*_, n) in plan.items():
                prefills[rid].step(n // 2 if prefills[rid].req.num_computed_tokens == 0 else n - n // 2)
        for rid in plan:
            prefills[rid].finish(ord(rid))
        wait_for(lambda: len(sink.done) + len(sink.failed) == len(plan))
        assert not sink.failed
        for rid, (i, src_blocks, dst_blocks, skip, n) in plan.items():
            assert sink.done[rid][0].first_token_id == ord(rid)
            assert torch.equal(landed(caches, dst_blocks, skip, n), landed(srcs[i], src_blocks, skip, n)), rid
    finally:
        for tx in senders:
            tx.close()


def test_a_sender_lost_mid_chunk_fails_the_request(decode_side) -> None:  # type: ignore[no-untyped-def]
    class Crashing(NcclKVSender):
        """Sends a header, joins the process group, then goes away instead of sending the tensor."""

        def push(self, peer, item):  # type: ignore[no-untyped-def]
            if item.kind != "kv":
                return super().push(peer, item)
            SocketKVSender.push(self, peer, item)
            peer.link._ensure_group()
            peer.link.close()
            raise ConnectionError("prefill side lost")

    rx, sink, caches = decode_side
    errors: list[tuple[str, str]] = []
    tx = Crashing(LAYOUT, "p0", SECRET, on_error=lambda r, e: errors.append((r, e)))
    try:
        rx.expect("r", [0, 1], 0)
        tx.send_kv(job_for(rx, "r", [0, 1], 0), 0, torch.ones(3, 2, 5, 2, 8), 0)
        wait_for(lambda: sink.failed and errors)
        assert sink.failed[0][0] == "r" and "KV transfer failed" in sink.failed[0][1]
        assert errors[0] == ("r", f"KV push to {rx.endpoint[0]}:{rx.endpoint[1]} failed: prefill side lost")
        assert not sink.done and all(c.abs().sum() == 0 for c in caches)
    finally:
        tx.close()


def test_registered_and_native_only() -> None:
    WorkerConfig(kv_transport="nccl")
    with pytest.raises(ValueError, match="applies to tcp only"):
        WorkerConfig(kv_transport="nccl", kv_wire_dtype="fp8")


def test_close_tears_the_groups_down_promptly(decode_side, prefill_side) -> None:  # type: ignore[no-untyped-def]
    rx, sink, _ = decode_side
    tx, streamer, _, _ = prefill_side
    rx.expect("r", [0, 1], 0)
    prefill = Prefill(streamer, job_for(rx, "r", [0, 1], 0), 6, [2, 3])
    prefill.step(6)
    prefill.finish(1)
    wait_for(lambda: "r" in sink.done)  # both sides now hold a process group for the connection
    start = time.monotonic()
    tx.close()
    rx.close()
    assert time.monotonic() - start < 1.0
    assert not rx._links  # type: ignore[attr-defined]
    wait_for(lambda: not any(t.name.startswith("kv-send") for t in threading.enumerate()))
