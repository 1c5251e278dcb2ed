from __future__ import annotations

import dataclasses

from pdserve.config import SchedulerConfig
from pdserve.engine.block_manager import BlockManager
from pdserve.engine.request import Request, RequestStatus
from pdserve.engine.scheduler import Scheduler, SchedulerOutput
from pdserve.sampling_params import SamplingParams


def make_req(rid: str, n_prompt: int, max_tokens: int = 4, base: int = 0) -> Request:
    return Request(rid, list(range(base, base + n_prompt)), SamplingParams(max_tokens=max_tokens), max_tokens)


def fake_step(sched: Scheduler) -> SchedulerOutput:
    """What the engine does after the model ran: advance computed counts, sample a token, finish."""
    out = sched.schedule()
    for s in out.scheduled:
        req = s.request
        samples = s.samples
        req.num_computed_tokens += s.num_new_tokens
        sched.block_manager.cache_full_blocks(req)
        if samples:
            req.append_token(7, None)
            if req.num_output_tokens >= req.max_tokens:
                sched.finish(req, RequestStatus.FINISHED_LENGTH)
    return out


def test_token_budget_and_chunked_prefill() -> None:
    bm = BlockManager(64, 4)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=10), bm)
    long, short = make_req("long", 25), make_req("short", 3, base=100)
    sched.add(long)
    sched.add(short)
    out = sched.schedule()
    assert [(s.request.request_id, s.num_new_tokens) for s in out.scheduled] == [("long", 10)]
    assert not out.scheduled[0].samples


def test_decodes_go_first_then_prefill_chunks_fill_budget() -> None:
    bm = BlockManager(64, 4)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=8), bm)
    sched.add(make_req("a", 3, max_tokens=10))
    fake_step(sched)  # a prefilled, sampled one token
    sched.add(make_req("b", 20, base=50))
    out = fake_step(sched)
    assert [(s.request.request_id, s.num_new_tokens) for s in out.scheduled] == [("a", 1), ("b", 7)]


def test_max_num_seqs() -> None:
    bm = BlockManager(64, 4)
    sched = Scheduler(SchedulerConfig(max_num_seqs=2), bm)
    for i in range(3):
        sched.add(make_req(f"r{i}", 4, base=10 * i))
    out = sched.schedule()
    assert len(out.scheduled) == 2 and len(sched.waiting) == 1


def test_unset_limits_follow_the_device_and_set_ones_stay() -> None:
    bm = BlockManager(64, 4)
    cpu, gpu = Scheduler(SchedulerConfig(), bm), Scheduler(SchedulerConfig(), bm, device_type="cuda")
    assert (cpu.max_num_seqs, cpu.max_num_batched_tokens) == (64, 512)
    assert (gpu.max_num_seqs, gpu.max_num_batched_tokens) == (256, 2048)
    mine = Scheduler(SchedulerConfig(max_num_seqs=3, max_num_batched_tokens=16), bm, device_type="cuda")
    assert (mine.max_num_seqs, mine.max_num_batched_tokens) == (3, 16)
    # The GPU budget is what one step takes: a 4,000-token prompt's first chunk is 2,048 tokens.
    gpu_big = Scheduler(SchedulerConfig(), BlockManager(2048, 4), device_type="cuda")
    gpu_big.add(make_req("long", 4000))
    assert [s.num_new_tokens for s in gpu_big.schedule().scheduled] == [2048]
    # The config stays the one source: a budget set on it later (as a benchmark does) applies.
    gpu_big.cfg = dataclasses.replace(gpu_big.cfg, max_num_batched_tokens=100)
    assert [s.num_new_tokens for s in gpu_big.schedule().scheduled] == [100]


def test_preemption_by_recompute_and_block_accounting() -> None:
    bm = BlockManager(6, 4)  # 24 token slots
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=64), bm)
    reqs = [make_req(f"r{i}", 7, max_tokens=8, base=100 * i) for i in range(3)]
    for r in reqs:
        sched.add(r)
    preempted = 0
    for _ in range(200):
        if not sched.has_unfinished():
            break
        preempted += len(fake_step(sched).preempted)
        # Prompts share no prefix, so every block in use belongs to exactly one running request.
        used = sum(len(r.block_table) for r in sched.running)
        assert used + bm.num_free_blocks == bm.num_blocks
    assert not sched.has_unfinished()
    assert preempted > 0
    assert all(r.status == RequestStatus.FINISHED_LENGTH and r.num_output_tokens == 8 for r in reqs)
    assert bm.num_free_blocks == bm.num_blocks


def test_finish_is_idempotent_and_frees() -> None:
    bm = BlockManager(16, 4)
    sched = Scheduler(SchedulerConfig(), bm)
    r = make_req("r", 9)
    sched.add(r)
    sched.schedule()
    assert bm.num_free_blocks < 16
    sched.finish(r, RequestStatus.FINISHED_ABORTED)
    sched.finish(r, RequestStatus.FINISHED_STOPPED)
    assert r.status == RequestStatus.FINISHED_ABORTED
    assert bm.num_free_blocks == 16 and not sched.has_unfinished()


def test_prefix_hit_reported_once() -> None:
    bm = BlockManager(32, 4)
    sched = Scheduler(SchedulerConfig(), bm)
    sched.add(make_req("a", 13))
    while sched.has_unfinished():
        fake_step(sched)
    b = make_req("b", 13)
    sched.add(b)
    out = sched.schedule()
    assert b.num_cached_tokens == 12
    assert out.scheduled[0].num_new_tokens == 1


def test_request_that_can_never_fit_is_rejected() -> None:
    bm = BlockManager(4, 4)
    sched = Scheduler(SchedulerConfig(), bm)
    try:
        sched.add(make_req("huge", 30))
    except ValueError as e:
        assert "KV blocks" in str(e)
    else:
        raise AssertionError("expected ValueError")


def steps(sched: Scheduler) -> list[tuple[str, int]]:
    return [(s.request.request_id, s.num_new_tokens) for s in fake_step(sched).scheduled]


def test_a_prefill_chunk_cap_lets_short_prompts_in_beside_a_long_one() -> None:
    """A 40-token prompt, then two 3-token ones, with a 16-token budget. Without a cap the long one
    takes every step until it is done and the short ones get their first token in the third step;
    with a cap of 8 they are prefilled in the first step beside its chunk, decode before its next
    chunk, and once nothing waits the long prompt takes the whole budget again (its own first token
    one step later)."""

    def run(cap: int) -> list[list[tuple[str, int]]]:
        sched = Scheduler(
            SchedulerConfig(max_num_batched_tokens=16, prefill_chunk_cap=cap), BlockManager(64, 4)
        )
        sched.add(make_req("long", 40, max_tokens=2))
        sched.add(make_req("s1", 3, max_tokens=2, base=100))
        sched.add(make_req("s2", 3, max_tokens=2, base=200))
        return [steps(sched) for _ in range(4)]

    assert run(0) == [
        [("long", 16)],
        [("long", 16)],
        [("long", 8), ("s1", 3), ("s2", 3)],
        [("long", 1), ("s1", 1), ("s2", 1)],
    ]
    assert run(8) == [
        [("long", 8), ("s1", 3), ("s2", 3)],  # s2 has nobody behind it: its chunk is not capped
        [("s1", 1), ("s2", 1), ("long", 14)],  # decodes first, then the long prompt, uncapped
        [("long", 16)],
        [("long", 2)],
    ]


def test_the_chunk_cap_flag_reaches_the_workers_engines() -> None:
    """`pdserve serve --prefill-chunk-cap 64` gives every worker's engine the cap: the launcher
    rebuilds the engine config from the flags it passes on."""
    from pdserve.cli import build_parser, engine_argv, engine_config

    cfg = engine_config(build_parser().parse_args(["serve", "--prefill-chunk-cap", "64"]))
    assert cfg.scheduler.prefill_chunk_cap == 64
    worker = engine_config(build_parser().parse_args(["worker", "--role", "decode", *engine_argv(cfg)]))
    assert worker.scheduler.prefill_chunk_cap == 64
    assert engine_config(build_parser().parse_args(["serve"])).scheduler.prefill_chunk_cap == 0
