"""nccl transport between two processes and two GPUs (NCCL refuses two ranks on one GPU): the decode
side (a child process) keeps its cache on cuda:1, the prefill side pushes a request's KV from its
cache on cuda:0 through the KVStreamer hook, as the prefill worker does."""

from __future__ import annotations

import multiprocessing as mp
import threading
import time
from typing import Any

import pytest
import torch

from pdserve.engine.kv_output import KVStreamer
from pdserve.engine.request import Request
from pdserve.engine.scheduler import ScheduledRequest
from pdserve.kv_transfer import make_sender
from pdserve.kv_transfer.base import read_kv, slots_for
from pdserve.protocol import KVLayout, PrefillJob
from pdserve.sampling_params import SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(180)]

LAYOUT = KVLayout("tiny", "bfloat16", block_size=16, num_layers=4, num_kv_heads=2, head_dim=64)
SECRET = b"s3cret"
NUM_BLOCKS = 32


def receiver_main(conn: Any) -> None:
    """Decode side on cuda:1: expect what the parent says, report what landed."""
    from pdserve.kv_transfer import make_receiver

    device = torch.device("cuda", 1)
    torch.cuda.set_device(device)
    caches = [
        torch.zeros(2, NUM_BLOCKS, 16, 2, 64, dtype=torch.bfloat16, device=device)
        for _ in range(LAYOUT.num_layers)
    ]
    results: list[tuple[str, Any]] = []
    arrived = threading.Event()

    def on_done(done: Any, stats: Any) -> None:
        results.append(("done", (done.request_id, done.first_token_id, done.num_tokens, stats.nbytes)))
        arrived.set()

    def on_failed(request_id: str, error: str) -> None:
        results.append(("failed", (request_id, error)))
        arrived.set()

    rx = make_receiver("nccl", LAYOUT, caches, on_done, on_failed, SECRET)
    conn.send(rx.endpoint)
    while True:
        msg = conn.recv()
        if msg is None:
            break
        rid, blocks, skip, num_tokens = msg
        rx.expect(rid, blocks, skip)
        conn.send("expecting")
        assert arrived.wait(60), "no completion"
        arrived.clear()
        kind, detail = results.pop()
        landed = read_kv(caches, 0, LAYOUT.num_layers, slots_for(blocks, 16, skip, num_tokens)).cpu()
        untouched = read_kv(caches, 0, LAYOUT.num_layers, slots_for(blocks, 16, 0, skip)).cpu()
        conn.send((kind, detail, landed, untouched))
    rx.close()


def test_nccl_push_across_two_gpus() -> None:
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA GPUs (NCCL refuses two ranks on one GPU)")
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=receiver_main, args=(child,), daemon=True)
    proc.start()
    sender = make_sender("nccl", LAYOUT, "p0", SECRET)
    try:
        host, port = parent.recv()
        torch.manual_seed(0)
        device = torch.device("cuda", 0)
        src = [torch.randn(2, 40, 16, 2, 64, device=device).bfloat16() for _ in range(LAYOUT.num_layers)]
        streamer = KVStreamer(sender, src, LAYOUT.block_size, layers_per_chunk=3)  # groups of 3 and 1
        reserved = torch.randperm(NUM_BLOCKS).tolist()  # on the decode side, 7 per request, disjoint
        # Two requests over the same connection and process group; the second reuses its buffers.
        for i, (rid, skip, num_tokens) in enumerate((("r1", 0, 100), ("r2", 16, 77))):
            src_blocks = torch.randperm(40)[:7].tolist()  # our (prefill side) blocks, shuffled
            dst_blocks = reserved[7 * i : 7 * (i + 1)]
            parent.send((rid, dst_blocks, skip, num_tokens))
            assert parent.recv() == "expecting"

            job = PrefillJob(rid, [], {}, "d0", host, port, dst_blocks, skip, time.time() + 60, LAYOUT)
            req = Request(rid, list(range(num_tokens)), SamplingParams(max_tokens=1), 1, None)
            req.block_table = src_blocks
            req.kv_job = job
            for chunk in (60, num_tokens - 60):  # a chunked prefill: two steps
                hook = streamer.layer_hook_for([ScheduledRequest(req, chunk)])
                assert hook is not None
                for layer in range(LAYOUT.num_layers):
                    hook(layer)
                req.num_computed_tokens += chunk
            streamer.send_first_token(req, 42, None)

            kind, detail, landed, untouched = parent.recv()
            assert kind == "done", detail
            assert detail == (rid, 42, num_tokens, (num_tokens - skip) * LAYOUT.bytes_per_token)
            sent = read_kv(src, 0, LAYOUT.num_layers, slots_for(src_blocks, 16, skip, num_tokens)).cpu()
            assert torch.equal(landed, sent)
            assert untouched.abs().sum() == 0
    finally:
        sender.close()
        parent.send(None)
        proc.join(30)
