"""cuda_ipc transport between two processes: the decode side (a child process) shares its cache, the
prefill side writes a request's KV into the reserved blocks with its own kernels, through the
KVStreamer hook as the prefill worker does; the decode side checks the completion's fingerprint, and
KV written into blocks it did not reserve fails that check."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from pdserve.engine.kv_output import KVStreamer
from pdserve.engine.request import Request
from pdserve.engine.scheduler import ScheduledRequest
from pdserve.kv_transfer import make_sender
from pdserve.kv_transfer.base import read_kv, slots_for
from pdserve.protocol import KVLayout, PrefillDestination, PrefillJob
from pdserve.sampling_params import SamplingParams

pytestmark = pytest.mark.gpu

LAYOUT = KVLayout("tiny", "bfloat16", block_size=16, num_layers=4, num_kv_heads=2, head_dim=64)
SECRET = b"s3cret"
NUM_BLOCKS = 32


def receiver_main(conn: Any) -> None:
    """Decode side: serve the cache, expect what the parent says, report what landed."""
    from pdserve.kv_transfer import make_receiver

    caches = [
        torch.zeros(2, NUM_BLOCKS, 16, 2, 64, dtype=torch.bfloat16, device="cuda")
        for _ in range(LAYOUT.num_layers)
    ]
    results: list[tuple[str, Any]] = []
    arrived = threading.Event()

    def on_done(done: Any, stats: Any) -> None:
        results.append(("done", (done.request_id, done.first_token_id, stats.nbytes)))
        arrived.set()

    def on_failed(request_id: str, error: str) -> None:
        results.append(("failed", (request_id, error)))
        arrived.set()

    rx = make_receiver("cuda_ipc", LAYOUT, caches, on_done, on_failed, SECRET)
    conn.send(rx.endpoint)
    while True:
        msg = conn.recv()
        if msg is None:
            break
        rid, blocks, skip, num_tokens = msg
        rx.expect(rid, blocks, skip)
        conn.send("expecting")
        assert arrived.wait(30), "no completion"
        arrived.clear()
        kind, detail = results.pop()
        slots = slots_for(blocks, LAYOUT.block_size, skip, num_tokens)
        landed = read_kv(caches, 0, LAYOUT.num_layers, slots).cpu()
        conn.send((kind, detail, landed))
    rx.close()


def prefill_request(rid: str, num_tokens: int, blocks: list[int], job: PrefillJob) -> Request:
    req = Request(rid, list(range(num_tokens)), SamplingParams(max_tokens=1), 1, None)
    req.block_table = blocks
    req.kv_job = job
    return req


@contextlib.contextmanager
def decode_side() -> Iterator[tuple[Any, str, int]]:
    """The receiver in a child process: (its pipe, KV host, KV port); stopped on exit."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=receiver_main, args=(child,), daemon=True)
    proc.start()
    try:
        host, port = parent.recv()
        yield parent, host, port
    finally:
        parent.send(None)
        proc.join(30)


def run_prefill(streamer: KVStreamer, req: Request, chunks: list[int]) -> None:
    """Step the request's prompt through the streamer's layer hooks, chunk by chunk, as the
    prefill worker's forward does; then send the first token (42)."""
    for chunk in chunks:
        hook = streamer.layer_hook_for([ScheduledRequest(req, chunk)])
        assert (hook is None) == (streamer.push == "after")
        with torch.inference_mode():  # as in the engine's forward
            for layer in range(LAYOUT.num_layers if hook is not None else 0):
                hook(layer)
        req.num_computed_tokens += chunk
    streamer.send_first_token(req, 42, None)


@pytest.mark.parametrize("stride", [1, 16])
@pytest.mark.parametrize("skip", [0, 16])
def test_cuda_ipc_push_through_the_streamer(skip: int, stride: int, monkeypatch: pytest.MonkeyPatch) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    monkeypatch.setenv("PDSERVE_KV_FINGERPRINT_STRIDE", str(stride))
    with decode_side() as (parent, host, port):
        torch.manual_seed(skip)
        src = [torch.randn(2, 40, 16, 2, 64, device="cuda").bfloat16() for _ in range(LAYOUT.num_layers)]
        src_blocks = torch.randperm(40)[:7].tolist()  # our (prefill side) blocks, shuffled
        dst_blocks = torch.randperm(NUM_BLOCKS)[:7].tolist()  # the reserved blocks on the decode side
        num_tokens = 100
        parent.send(("r1", dst_blocks, skip, num_tokens))
        assert parent.recv() == "expecting"

        job = PrefillJob("r1", [], {}, "d0", host, port, dst_blocks, skip, time.time() + 30, LAYOUT)
        sender = make_sender("cuda_ipc", LAYOUT, "p0", SECRET)
        streamer = KVStreamer(sender, src, LAYOUT.block_size, layers_per_chunk=3)  # groups of 3 and 1
        req = prefill_request("r1", num_tokens, src_blocks, job)
        run_prefill(streamer, req, [60, num_tokens - 60])  # a chunked prefill: two steps

        kind, detail, landed = parent.recv()
        assert kind == "done", detail
        expected_bytes = (num_tokens - skip) * LAYOUT.bytes_per_token
        assert detail == ("r1", 42, expected_bytes)
        sent = read_kv(src, 0, LAYOUT.num_layers, slots_for(src_blocks, 16, skip, num_tokens)).cpu()
        assert torch.equal(landed, sent)
        sender.close()


@pytest.mark.parametrize("copy_with,push", [("kernel", "after"), ("dma", "stream"), ("dma", "after")])
def test_cuda_ipc_copy_engines_and_push_after_the_first_token(copy_with: str, push: str) -> None:
    """The copy engines (cuMemcpyBatchAsync over slot runs) and the whole prompt pushed once its
    first token is sampled land the same bytes as the streamed kernel copy."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    with decode_side() as (parent, host, port):
        torch.manual_seed(7)
        src = [torch.randn(2, 40, 16, 2, 64, device="cuda").bfloat16() for _ in range(LAYOUT.num_layers)]
        # Partly adjacent on both sides (runs of 2 and 3 blocks), partly not.
        src_blocks, dst_blocks = [5, 6, 7, 20, 21, 3, 30], [9, 10, 11, 2, 3, 30, 12]
        num_tokens, skip = 100, 16
        parent.send(("r5", dst_blocks, skip, num_tokens))
        assert parent.recv() == "expecting"
        job = PrefillJob("r5", [], {}, "d0", host, port, dst_blocks, skip, time.time() + 30, LAYOUT)
        sender = make_sender("cuda_ipc", LAYOUT, "p0", SECRET)
        sender.copy_with = copy_with  # type: ignore[attr-defined]
        streamer = KVStreamer(sender, src, LAYOUT.block_size, layers_per_chunk=3, push=push)
        run_prefill(streamer, prefill_request("r5", num_tokens, src_blocks, job), [60, num_tokens - 60])
        kind, detail, landed = parent.recv()
        assert kind == "done", detail
        assert detail == ("r5", 42, (num_tokens - skip) * LAYOUT.bytes_per_token)
        sent = read_kv(src, 0, LAYOUT.num_layers, slots_for(src_blocks, 16, skip, num_tokens)).cpu()
        assert torch.equal(landed, sent)
        sender.close()


@pytest.mark.parametrize("stride", [1, 16])
def test_kv_in_blocks_not_reserved_fails_the_fingerprint(
    stride: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The prefill side writes into the wrong blocks (a job naming blocks the decode side did not
    reserve for it): every header arrives, but the completion's check fails the request."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    monkeypatch.setenv("PDSERVE_KV_FINGERPRINT_STRIDE", str(stride))
    with decode_side() as (parent, host, port):
        src = [torch.randn(2, 40, 16, 2, 64, device="cuda").bfloat16() for _ in range(LAYOUT.num_layers)]
        src_blocks = torch.randperm(40)[:7].tolist()
        reserved = list(range(0, 7))
        written = list(range(8, 15))  # not what the decode side expects
        num_tokens = 100
        parent.send(("r2", reserved, 0, num_tokens))
        assert parent.recv() == "expecting"
        job = PrefillJob("r2", [], {}, "d0", host, port, written, 0, time.time() + 30, LAYOUT)
        sender = make_sender("cuda_ipc", LAYOUT, "p0", SECRET)
        streamer = KVStreamer(sender, src, LAYOUT.block_size, layers_per_chunk=LAYOUT.num_layers)
        req = prefill_request("r2", num_tokens, src_blocks, job)
        run_prefill(streamer, req, [num_tokens])
        kind, detail, _ = parent.recv()
        assert kind == "failed"
        assert detail[0] == "r2" and "fingerprint mismatch" in detail[1]
        sender.close()


@pytest.mark.parametrize("when", ["second_chunk", "after_the_forward"])
def test_cuda_ipc_destination_that_arrives_late(when: str) -> None:
    """A job the router queued early (router/early_prefill.py): no destination when its forward
    starts; it arrives in the middle of the second chunk, or only after the first token was sampled
    (parked). Either way the whole KV lands and the fingerprint matches."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    with decode_side() as (parent, host, port):
        src = [torch.randn(2, 40, 16, 2, 64, device="cuda").bfloat16() for _ in range(LAYOUT.num_layers)]
        src_blocks = torch.randperm(40)[:7].tolist()
        dst_blocks = torch.randperm(NUM_BLOCKS)[:7].tolist()
        num_tokens, skip = 100, 16
        parent.send(("r3", dst_blocks, skip, num_tokens))
        assert parent.recv() == "expecting"
        early = PrefillJob("r3", [], {}, "d0", "", 0, [], 0, time.time() + 30, LAYOUT)
        dest = PrefillDestination("r3", "d0", host, port, dst_blocks, skip, time.time() + 30)
        sender = make_sender("cuda_ipc", LAYOUT, "p0", SECRET)
        streamer = KVStreamer(sender, src, LAYOUT.block_size, layers_per_chunk=2)
        req = prefill_request("r3", num_tokens, src_blocks, early)
        for i, chunk in enumerate([60, num_tokens - 60]):
            hook = streamer.layer_hook_for([ScheduledRequest(req, chunk)])
            assert hook is not None
            with torch.inference_mode():  # as in the engine's forward
                for layer in range(LAYOUT.num_layers):
                    if when == "second_chunk" and (i, layer) == (1, 1):
                        streamer.offer_destination(dest)
                    hook(layer)
            req.num_computed_tokens += chunk
        if when == "after_the_forward":
            assert not streamer.send_first_token(req, 42, None)
            streamer.offer_destination(dest)
            assert streamer.flush_parked("r3")
        else:
            assert streamer.send_first_token(req, 42, None)
        kind, detail, landed = parent.recv()
        assert kind == "done", detail
        assert detail == ("r3", 42, (num_tokens - skip) * LAYOUT.bytes_per_token)
        sent = read_kv(src, 0, LAYOUT.num_layers, slots_for(src_blocks, 16, skip, num_tokens)).cpu()
        assert torch.equal(landed, sent)
        # The next request reuses the staging buffers this one made inside the forward, from
        # outside inference mode (prepare_from_cache): they must be ordinary tensors.
        parent.send(("r4", dst_blocks, 0, num_tokens))
        assert parent.recv() == "expecting"
        job = PrefillJob("r4", [], {}, "d0", host, port, dst_blocks, 0, time.time() + 30, LAYOUT)
        run_prefill(streamer, prefill_request("r4", num_tokens, src_blocks, job), [num_tokens])
        kind, detail, landed = parent.recv()
        assert kind == "done", detail
        assert torch.equal(
            landed, read_kv(src, 0, LAYOUT.num_layers, slots_for(src_blocks, 16, 0, num_tokens)).cpu()
        )
        sender.close()
