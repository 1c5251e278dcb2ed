"""A prefill job started before its decode worker reserved blocks (router/early_prefill.py): the
KVStreamer sends nothing until the destination arrives, then catches up, whenever it arrives — in
the middle of a forward, between chunks, or after the first token (parked). Over the tcp transport
on CPU caches, so every byte that lands is compared with the source."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import torch

from pdserve.engine.kv_output import KVStreamer
from pdserve.engine.request import Request
from pdserve.engine.scheduler import ScheduledRequest
from pdserve.kv_transfer import KVReceiver, make_receiver, make_sender
from pdserve.kv_transfer.base import read_kv, slots_for
from pdserve.protocol import KVLayout, PrefillDestination, PrefillJob
from pdserve.sampling_params import SamplingParams
from tests.unit.test_kv_nccl import Sink, wait_for

pytestmark = pytest.mark.timeout(20)

LAYOUT = KVLayout("tiny", "float32", block_size=4, num_layers=4, num_kv_heads=2, head_dim=8)
SECRET = b"s3cret"
NUM_BLOCKS = 24
SRC_BLOCKS, DST_BLOCKS = [7, 2, 19, 11, 5, 3], [14, 1, 9, 22, 6, 17]
NUM_TOKENS = 22


@pytest.fixture
def sides() -> Iterator[tuple[KVReceiver, Sink, list[torch.Tensor], KVStreamer, list[tuple[str, str]]]]:
    sink = Sink()
    dst = [torch.zeros(2, NUM_BLOCKS, 4, 2, 8) for _ in range(LAYOUT.num_layers)]
    rx = make_receiver("tcp", LAYOUT, dst, sink.on_done, sink.on_failed, SECRET)
    errors: list[tuple[str, str]] = []
    tx = make_sender("tcp", LAYOUT, "p0", SECRET, on_error=lambda r, e: errors.append((r, e)))
    gen = torch.Generator().manual_seed(0)
    src = [torch.randn(2, NUM_BLOCKS, 4, 2, 8, generator=gen) for _ in range(LAYOUT.num_layers)]
    yield rx, sink, dst, KVStreamer(tx, src, LAYOUT.block_size, layers_per_chunk=2), errors
    tx.close()
    rx.close()


def early_job(rid: str) -> PrefillJob:
    return PrefillJob(rid, [], {}, "d0", "", 0, [], 0, time.time() + 30, LAYOUT)


def destination(rx: KVReceiver, rid: str, skip: int) -> PrefillDestination:
    host, port = rx.endpoint
    return PrefillDestination(
        rid, "d0", host, port, DST_BLOCKS, skip, time.time() + 30, {"worker.admitted": 1.0}
    )


class Prefill:
    """One job's forward passes, driven through the hook as the engine drives it; `offer_at` hands
    the destination over just before the hook of that (step, layer) runs."""

    def __init__(self, streamer: KVStreamer, job: PrefillJob) -> None:
        self.streamer = streamer
        self.req = Request(job.request_id, list(range(NUM_TOKENS)), SamplingParams(max_tokens=1), 1, None)
        self.req.block_table = SRC_BLOCKS
        self.req.kv_job = job
        self.steps = 0

    def step(
        self, num_new_tokens: int, offer_at: int | None = None, dest: PrefillDestination | None = None
    ) -> None:
        hook = self.streamer.layer_hook_for([ScheduledRequest(self.req, num_new_tokens)])
        assert hook is not None
        for layer in range(LAYOUT.num_layers):
            if offer_at == layer:
                assert dest is not None
                self.streamer.offer_destination(dest)
            hook(layer)
        self.req.num_computed_tokens += num_new_tokens
        self.steps += 1


def landed(caches: list[torch.Tensor], blocks: list[int], start: int, end: int) -> torch.Tensor:
    return read_kv(caches, 0, LAYOUT.num_layers, slots_for(blocks, LAYOUT.block_size, start, end))


def check_complete(sink: Sink, dst: list[torch.Tensor], src: list[torch.Tensor], rid: str, skip: int) -> None:
    wait_for(lambda: rid in sink.done or sink.failed)
    assert not sink.failed
    done, nbytes = sink.done[rid]
    assert (done.first_token_id, done.num_tokens) == (42, NUM_TOKENS)
    assert nbytes == (NUM_TOKENS - skip) * LAYOUT.bytes_per_token
    assert torch.equal(landed(dst, DST_BLOCKS, skip, NUM_TOKENS), landed(src, SRC_BLOCKS, skip, NUM_TOKENS))
    if skip:  # positions the decode side already holds are not sent
        assert landed(dst, DST_BLOCKS, 0, skip).abs().sum() == 0
    assert done.trace["worker.admitted"] == 1.0  # the decode side's marks travel with the destination


@pytest.mark.parametrize("skip", [0, 8])
def test_destination_in_the_second_chunk_catches_up_everything(sides, skip: int) -> None:  # type: ignore[no-untyped-def]
    rx, sink, dst, streamer, errors = sides
    rx.expect("r1", DST_BLOCKS, skip)
    prefill = Prefill(streamer, early_job("r1"))
    prefill.step(13)  # no destination for the whole first chunk: nothing may go out
    time.sleep(0.05)
    assert dst[0].abs().sum() == 0 and not streamer.bytes_sent
    prefill.step(NUM_TOKENS - 13, offer_at=1, dest=destination(rx, "r1", skip))
    # All of it went out inside that forward, the first chunk with the catch-up at layer 1.
    assert streamer.bytes_sent["r1"] == (NUM_TOKENS - skip) * LAYOUT.bytes_per_token
    assert streamer.send_first_token(prefill.req, 42, None)
    check_complete(sink, dst, streamer.kv_caches, "r1", skip)
    assert not errors


def test_destination_mid_forward_of_a_single_chunk(sides) -> None:  # type: ignore[no-untyped-def]
    rx, sink, dst, streamer, errors = sides
    rx.expect("r2", DST_BLOCKS, 0)
    prefill = Prefill(streamer, early_job("r2"))
    prefill.step(NUM_TOKENS, offer_at=3, dest=destination(rx, "r2", 0))  # at the last layer
    assert streamer.bytes_sent["r2"] == NUM_TOKENS * LAYOUT.bytes_per_token
    assert streamer.send_first_token(prefill.req, 42, None)
    check_complete(sink, dst, streamer.kv_caches, "r2", 0)
    assert not errors


def test_forward_done_before_the_destination_parks_the_first_token(sides) -> None:  # type: ignore[no-untyped-def]
    rx, sink, dst, streamer, errors = sides
    rx.expect("r3", DST_BLOCKS, 4)
    prefill = Prefill(streamer, early_job("r3"))
    prefill.step(NUM_TOKENS)
    assert not streamer.send_first_token(prefill.req, 42, None)
    assert "r3" in streamer.parked
    assert not streamer.flush_parked("r3")  # nothing arrived yet: stays parked
    time.sleep(0.05)
    assert not sink.done and dst[0].abs().sum() == 0
    streamer.offer_destination(destination(rx, "r3", 4))
    assert streamer.flush_parked("r3")
    assert not streamer.parked
    check_complete(sink, dst, streamer.kv_caches, "r3", 4)
    assert not errors


def test_a_job_dropped_before_its_destination_sends_nothing(sides) -> None:  # type: ignore[no-untyped-def]
    rx, sink, _, streamer, errors = sides
    prefill = Prefill(streamer, early_job("r4"))
    prefill.step(NUM_TOKENS)
    assert not streamer.send_first_token(prefill.req, 42, None)
    job = prefill.req.kv_job
    assert job is not None
    streamer.send_failed(job, "aborted")  # no one to tell, no connection made
    assert not streamer.parked and not streamer.sender._peers  # type: ignore[attr-defined]
    # A destination that comes after the drop is not used by anything, and expires.
    streamer.offer_destination(destination(rx, "r4", 0))
    assert not streamer.flush_parked("r4")
    streamer.expire_arrivals(time.time() + 60)
    assert not streamer._arrived
    assert not sink.done and not sink.failed and not errors


# ---- push="after": nothing leaves during the forward, the whole prompt once the token is out ----


@pytest.mark.parametrize("skip", [0, 8])
def test_after_mode_sends_the_whole_prompt_once_after_the_first_token(sides, skip: int) -> None:  # type: ignore[no-untyped-def]
    rx, sink, dst, streamer, errors = sides
    streamer.push = "after"
    rx.expect("r5", DST_BLOCKS, skip)
    job = destination_job("r5", rx, skip)
    req = Request("r5", list(range(NUM_TOKENS)), SamplingParams(max_tokens=1), 1, None)
    req.block_table, req.kv_job = SRC_BLOCKS, job
    for chunk in (13, NUM_TOKENS - 13):  # two chunks, no hook in either
        scheduled = [ScheduledRequest(req, chunk)]
        assert streamer.layer_hook_for(scheduled) is None
        if chunk == 13:  # nothing goes out before the prompt's last chunk is queued
            req.num_computed_tokens += chunk
            streamer.after_launch(scheduled)
            time.sleep(0.05)
            assert dst[0].abs().sum() == 0 and not streamer.bytes_sent
        else:
            req.num_computed_tokens += chunk
            streamer.after_launch(scheduled)  # queued behind the step, before its token is read
            assert streamer.bytes_sent["r5"] == (NUM_TOKENS - skip) * LAYOUT.bytes_per_token
    assert "prefill.launched" in job.trace
    assert streamer.send_first_token(req, 42, None)  # sends the completion, not the KV again
    check_complete(sink, dst, streamer.kv_caches, "r5", skip)
    assert not errors and not streamer._prompt_pushed


def test_after_mode_with_a_late_destination_parks_then_sends(sides) -> None:  # type: ignore[no-untyped-def]
    rx, sink, dst, streamer, errors = sides
    streamer.push = "after"
    rx.expect("r6", DST_BLOCKS, 0)
    req = Request("r6", list(range(NUM_TOKENS)), SamplingParams(max_tokens=1), 1, None)
    req.block_table, req.kv_job = SRC_BLOCKS, early_job("r6")
    assert streamer.layer_hook_for([ScheduledRequest(req, NUM_TOKENS)]) is None
    req.num_computed_tokens = NUM_TOKENS
    streamer.after_launch([ScheduledRequest(req, NUM_TOKENS)])  # no destination: nothing to push
    assert not streamer.bytes_sent
    assert not streamer.send_first_token(req, 42, None)
    streamer.offer_destination(destination(rx, "r6", 0))
    assert streamer.flush_parked("r6")
    check_complete(sink, dst, streamer.kv_caches, "r6", 0)
    assert not errors


def destination_job(rid: str, rx: KVReceiver, skip: int) -> PrefillJob:
    job = early_job(rid)
    job.set_destination(destination(rx, rid, skip))
    return job


def test_push_mode_by_transport() -> None:
    from pdserve.config import WorkerConfig, resolve_kv_push

    assert resolve_kv_push("auto", "cuda_ipc") == "after"
    assert resolve_kv_push("auto", "tcp") == "stream"
    assert resolve_kv_push("auto", "nccl") == "stream"
    assert resolve_kv_push("stream", "cuda_ipc") == "stream"
    with pytest.raises(ValueError, match="kv_push"):
        WorkerConfig(kv_push="later")
    with pytest.raises(ValueError, match="push must be"):
        KVStreamer(None, [], 4, push="later")  # type: ignore[arg-type]
