from __future__ import annotations

import asyncio
import gc
import random
import time

from pdserve.engine.block_manager import hash_prefix_blocks
from pdserve.protocol import KVLayout, PrefillDestination, PrefillJob, WorkerInfo, WorkerLoad
from pdserve.router.early_prefill import decide_early, early_job
from pdserve.router.policy import Candidate, RoundRobin, pick_kv_aware
from pdserve.router.prefill_queue import PrefillQueue
from pdserve.router.prefix_index import PrefixIndex
from pdserve.workers.disagg_policy import DisaggPolicy, choose_prefill_path


def job(rid: str, deadline_in: float = 30.0) -> PrefillJob:
    return PrefillJob(rid, [1, 2, 3], {}, "d0", "127.0.0.1", 1, [0], 0, time.time() + deadline_in)


async def test_queue_is_fifo_and_tracks_holders() -> None:
    q = PrefillQueue()
    await q.put(job("a"))
    await q.put(job("b"))
    assert q.depth == 2
    got = await q.pull("p0", 0.1)
    assert got is not None and got.request_id == "a"
    assert q.cancel("a") == ("in_flight", "p0")
    assert q.cancel("b") == ("queued", None)
    assert q.cancel("b") == ("unknown", None)
    assert q.depth == 0 and q.in_flight == 0


async def test_pull_waits_then_times_out_and_skips_expired() -> None:
    q = PrefillQueue()
    t0 = time.monotonic()
    assert await q.pull("p0", 0.05) is None
    assert time.monotonic() - t0 >= 0.04
    await q.put(job("old", deadline_in=-1))
    puller = asyncio.create_task(q.pull("p0", 1.0))
    await asyncio.sleep(0.01)
    await q.put(job("new"))
    got = await puller
    assert got is not None and got.request_id == "new"


async def test_forget_worker_returns_its_jobs() -> None:
    q = PrefillQueue()
    await q.put(job("a"))
    await q.pull("p1", 0.1)
    assert q.forget_worker("p1") == ["a"]
    assert q.in_flight == 0


async def test_an_early_job_takes_its_destination_where_it_is() -> None:
    info = WorkerInfo(
        "d0", "decode", "http://d0", "127.0.0.1", 9, KVLayout("m", "bfloat16", 16, 2, 1, 8), "m", 64
    )
    info.kv_timeout_s = 20.0
    q = PrefillQueue()
    await q.put(early_job("a", [1, 2, 3], {}, info))
    await q.put(early_job("b", [4, 5], {}, info))
    first = await q.pull("p0", 0.1)
    assert first is not None and first.request_id == "a" and not first.has_destination
    assert 19 < first.deadline - time.time() <= 20
    # "a" is on p0: its destination must be sent there; "b" is still queued: replaced in place.
    assert q.set_destination(job("a")) == ("in_flight", "p0")
    assert q.set_destination(job("b")) == ("queued", None)
    second = await q.pull("p1", 0.1)
    assert second is not None and second.request_id == "b" and second.has_destination
    assert q.set_destination(job("gone")) == ("unknown", None)
    # What the prefill worker receives completes the early job, the decode side's marks included.
    dest = PrefillDestination.of(job("a"))
    dest.trace = {"worker.admitted": 5.0}
    first.trace["prefill.received"] = 6.0
    first.set_destination(dest)
    assert first.has_destination and (first.kv_port, first.dst_block_ids) == (1, [0])
    assert first.trace == {"prefill.received": 6.0, "worker.admitted": 5.0}


def test_early_start_follows_the_decode_workers_own_policy() -> None:
    policy = DisaggPolicy(256, 4, 4e9, 46080)
    layout = KVLayout("m", "bfloat16", 16, 2, 1, 8)
    decode = WorkerInfo(
        "d0", "decode", "u", "h", 9, layout, "m", 64, disagg_policy=vars(policy), kv_timeout_s=30
    )
    load = WorkerLoad("d0", 0, 0, 10, 10, prefill_tokens_per_s=1500.0)
    for uncached, depth, workers in [(100, 0, 1), (1800, 0, 1), (600, 4, 1), (1800, 0, 0)]:
        assert decide_early(decode, load, uncached, depth, workers) == (
            choose_prefill_path(uncached, depth, workers, 1500.0, policy).remote
        )
    assert not decide_early(decode, None, 1800, 0, 1)  # not polled yet: leave it to the worker
    colocated = WorkerInfo("c0", "colocated", "u", "h", 0, layout, "m", 64)
    assert not decide_early(colocated, load, 1800, 0, 1)


def test_prefix_index_counts_leading_blocks() -> None:
    idx = PrefixIndex(block_size=4)
    prompt = list(range(20))
    hashes = hash_prefix_blocks(prompt[:12], 4)
    idx.apply("d0", [("stored", h) for h in hashes])
    idx.apply("d1", [("stored", hashes[0])])
    assert idx.overlap(prompt, ["d0", "d1", "d2"]) == {"d0": 12, "d1": 4, "d2": 0}
    idx.apply("d0", [("removed", hashes[1])])
    assert idx.overlap(prompt, ["d0"]) == {"d0": 4}
    idx.remove_worker("d0")
    idx.remove_worker("d1")
    assert len(idx) == 0


def test_prefix_index_matches_sets_and_stays_out_of_the_collector() -> None:
    """Random stored/removed events from three workers (one leaving and coming back): the bit-mask
    index answers as a block -> set-of-workers map would, and the garbage collector never tracks
    its table (a set per block made every full collection walk all of them)."""
    rng = random.Random(7)
    block = 4
    prompts = [[rng.randrange(50) for _ in range(rng.randrange(4, 40))] for _ in range(30)]
    idx, ref = PrefixIndex(block), {}  # ref: block hash -> set of workers
    for step in range(400):
        worker = rng.choice(["d0", "d1", "d2"])
        if step == 200:
            idx.remove_worker("d1")
            ref = {h: ws - {"d1"} for h, ws in ref.items() if ws - {"d1"}}
            continue
        hashes = hash_prefix_blocks(rng.choice(prompts), block)
        kind = rng.choice(["stored", "stored", "removed"])
        idx.apply(worker, [(kind, h) for h in hashes])
        for h in hashes:
            if kind == "stored":
                ref.setdefault(h, set()).add(worker)
            elif h in ref:
                ref[h].discard(worker)
                if not ref[h]:
                    del ref[h]
        prompt = rng.choice(prompts)
        want = {}
        for w in ("d0", "d1", "d2"):
            n = 0
            for i, h in enumerate(hash_prefix_blocks(prompt[: len(prompt) - 1], block)):
                if w not in ref.get(h, set()):
                    break
                n = (i + 1) * block
            want[w] = n
        assert idx.overlap(prompt, ["d0", "d1", "d2"]) == want
        assert len(idx) == len(ref)
    gc.collect()
    assert not gc.is_tracked(idx._holders)


def test_kv_aware_prefers_overlap_unless_overloaded() -> None:
    a = Candidate("a", cached_tokens=900, num_running=2, num_waiting=0, kv_usage=0.1)
    b = Candidate("b", cached_tokens=0, num_running=2, num_waiting=0, kv_usage=0.1)
    assert pick_kv_aware([a, b], 1000) == "a"
    busy = Candidate("a", cached_tokens=900, num_running=40, num_waiting=20, kv_usage=0.95)
    assert pick_kv_aware([busy, b], 1000) == "b"
    rr = RoundRobin()
    assert [rr.pick([a, b]) for _ in range(4)] == ["a", "b", "a", "b"]


def test_disagg_decision() -> None:
    policy = DisaggPolicy(
        threshold_tokens=256, max_queue_per_prefill_worker=4, link_bytes_per_s=4e9, kv_bytes_per_token=46080
    )
    assert not choose_prefill_path(100, 0, 1, 1500.0, policy).remote  # short
    assert choose_prefill_path(1800, 0, 1, 1500.0, policy).remote
    assert choose_prefill_path(1800, 4, 1, 1500.0, policy).remote  # saturated queue, but too long for here
    assert not choose_prefill_path(600, 4, 1, 1500.0, policy).remote  # saturated queue: short enough
    assert not choose_prefill_path(1800, 0, 0, 1500.0, policy).remote  # no prefill worker
    slow_link = DisaggPolicy(256, 4, 1e6, 46080)
    decision = choose_prefill_path(1800, 0, 1, 1500.0, slow_link)
    assert not decision.remote and "transfer" in decision.reason


def test_coalesce_merges_backlogged_deltas_per_choice_in_order() -> None:
    from pdserve.outputs import RequestOutput, TokenLogprob
    from pdserve.router.streams import coalesce

    def out(ids: list[int], finished: bool = False, lp: bool = False) -> RequestOutput:
        return RequestOutput(
            "r", ids, "".join(f" t{i}" for i in ids), finished,
            finish_reason="length" if finished else None,
            logprobs=[TokenLogprob(i, -1.0) for i in ids] if lp else None,
            phases={"end": 1.0} if finished else None,
        )  # fmt: skip

    err = RuntimeError("x")
    batch = [(0, out([1])), (0, out([2], lp=True)), (1, out([7])), (0, out([3], finished=True)), (0, None)]
    merged = coalesce([*batch, (1, out([8])), (1, err)])
    assert [i for i, _ in merged] == [0, 1, 0, 0, 1, 1]
    first = merged[0][1]
    assert isinstance(first, RequestOutput) and first.new_token_ids == [1, 2] and first.new_text == " t1 t2"
    assert first.logprobs is not None and [lp.token_id for lp in first.logprobs] == [2]
    assert merged[2][1] is batch[3][1]  # only adjacent deltas merge: choice 1 came between
    # an unfinished delta merges into the finishing one after it, which keeps its reason and phases
    ((_, last),) = coalesce([(0, out([4])), (0, out([5], finished=True))])
    assert isinstance(last, RequestOutput) and last.new_token_ids == [4, 5] and last.finished
    assert last.finish_reason == "length" and last.phases == {"end": 1.0}
    assert merged[3] == (0, None) and merged[5] == (1, err)  # markers and errors pass through


async def test_routing_counts_its_own_streams_between_load_polls() -> None:
    """A burst between two load polls spreads over the replicas instead of following the same
    stale load numbers to one of them."""
    from pdserve.protocol import KVLayout, WorkerInfo, WorkerLoad
    from pdserve.router.disagg_client import DisaggClient, WorkerHandle
    from pdserve.router.prefix_index import PrefixIndex

    client = DisaggClient([], "token", tokenizer=None)
    layout = KVLayout("m", "bfloat16", 16, 2, 2, 64)
    stale = WorkerLoad("x", num_running=0, num_waiting=0, num_free_blocks=100, num_total_blocks=100)
    for wid in ("c0", "c1"):
        info = WorkerInfo(wid, "colocated", f"http://{wid}", "127.0.0.1", 0, layout, "m", 512)
        client.workers[wid] = WorkerHandle(info, load=stale)
    client.prefix_index = PrefixIndex(16)
    picks = []
    for i in range(6):
        w = client._pick([1, 2, 3])
        client._streams[f"r{i}"] = w.worker_id  # what generate() records before streaming
        picks.append(w.worker_id)
    assert picks.count("c0") == picks.count("c1") == 3
    await client.shutdown()
