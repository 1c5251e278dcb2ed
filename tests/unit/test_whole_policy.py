"""The router's choice to have an idle prefill worker serve a short request whole."""

from __future__ import annotations

import dataclasses

import pytest

from pdserve.router.policy import Candidate
from pdserve.router.whole_policy import PrefillCandidate, WholePolicy, choose_whole_target

POLICY = WholePolicy(threshold_tokens=256, max_whole_per_worker=4)


def decode(streams: int = 1, cached: int = 0, kv_usage: float = 0.1) -> Candidate:
    return Candidate("decode-0", cached, streams, 0, kv_usage)


def prefill(
    wid: str = "prefill-0",
    whole: int = 0,
    jobs: int = 0,
    waiting: int = 0,
    kv_usage: float = 0.0,
    cached: int = 0,
) -> PrefillCandidate:
    return PrefillCandidate(wid, cached, whole, waiting, kv_usage, num_jobs=jobs)


def test_idle_prefill_worker_takes_a_short_prompt_from_a_busier_decode_worker() -> None:
    d = choose_whole_target(40, decode(streams=3), 0, [prefill(whole=1)], POLICY)
    assert d.worker_id == "prefill-0"
    assert "queue empty" in d.reason


def test_on_a_tie_the_decode_worker_keeps_it() -> None:
    d = choose_whole_target(40, decode(streams=0, kv_usage=0.0), 0, [prefill()], POLICY)
    assert d.worker_id is None
    assert "not less loaded" in d.reason


def test_a_prompt_at_the_threshold_stays_with_the_decode_worker() -> None:
    assert choose_whole_target(255, decode(streams=5), 0, [prefill()], POLICY).worker_id == "prefill-0"
    d = choose_whole_target(256, decode(streams=5), 0, [prefill()], POLICY)
    assert d.worker_id is None
    assert "threshold" in d.reason


def test_a_prompt_short_only_thanks_to_the_decode_workers_cache_stays_there() -> None:
    # 1000 tokens, 900 cached on the decode worker: 100 to compute there, 1000 on the prefill worker.
    d = choose_whole_target(1000, decode(streams=5, cached=900), 0, [prefill()], POLICY)
    assert d.worker_id is None
    assert "1000 uncached tokens on prefill-0" in d.reason
    # The same prompt cached on the prefill worker too may go there.
    assert (
        choose_whole_target(1000, decode(streams=5, cached=900), 0, [prefill(cached=900)], POLICY).worker_id
        == "prefill-0"
    )


@pytest.mark.parametrize(
    ("queue_depth", "candidate", "why"),
    [
        (1, prefill(), "prefill queue holds 1 jobs"),
        (0, prefill(jobs=1), "holds 1 prefill jobs"),
        (0, prefill(waiting=2), "2 requests waiting"),
        (0, prefill(whole=4), "cap 4"),
        (0, prefill(kv_usage=0.6), "KV usage 0.60 > 0.50"),
    ],
)
def test_a_prefill_worker_with_prefill_work_or_at_its_limits_takes_none(
    queue_depth: int, candidate: PrefillCandidate, why: str
) -> None:
    d = choose_whole_target(40, decode(streams=20), queue_depth, [candidate], POLICY)
    assert d.worker_id is None
    assert why in d.reason


def test_no_prefill_worker() -> None:
    d = choose_whole_target(40, decode(streams=20), 0, [], POLICY)
    assert d.worker_id is None and d.reason == "no healthy prefill worker"


def test_the_least_loaded_free_prefill_worker_is_chosen() -> None:
    cands = [prefill("prefill-0", whole=2), prefill("prefill-1", whole=1), prefill("prefill-2", jobs=1)]
    assert choose_whole_target(40, decode(streams=6), 0, cands, POLICY).worker_id == "prefill-1"


def test_a_burst_is_shared_until_the_cap_then_the_decode_worker_takes_the_rest() -> None:
    """Routing a burst one request at a time, counting each routed stream as the router does."""
    streams = {"decode-0": 0, "prefill-0": 0}
    order = []
    for _ in range(20):
        d = choose_whole_target(
            40, decode(streams["decode-0"], kv_usage=0.0), 0, [prefill(whole=streams["prefill-0"])], POLICY
        )
        target = d.worker_id or "decode-0"
        streams[target] += 1
        order.append(target)
    assert order[:8] == ["decode-0", "prefill-0"] * 4
    assert streams == {"decode-0": 16, "prefill-0": POLICY.max_whole_per_worker}


def test_with_job_streams_a_prefilling_worker_takes_whole_requests_while_lighter() -> None:
    """Each job weighs `job_streams` streams: 2 jobs x 4 + 3 whole = 11 against the decode worker's
    12 streams takes it; against 11 it does not."""
    policy = WholePolicy(threshold_tokens=256, max_whole_per_worker=64, job_streams=4)
    busy = prefill(whole=3, jobs=2)
    d = choose_whole_target(40, decode(streams=12, kv_usage=0.0), 0, [busy], policy)
    assert d.worker_id == "prefill-0" and "3 whole requests and 2 prefill jobs" in d.reason
    d = choose_whole_target(40, decode(streams=11, kv_usage=0.0), 0, [busy], policy)
    assert d.worker_id is None and "not less loaded" in d.reason
    # Without job_streams the same worker takes none while it holds a job.
    d = choose_whole_target(40, decode(streams=40), 0, [busy], dataclasses.replace(policy, job_streams=None))
    assert d.worker_id is None and "holds 2 prefill jobs" in d.reason
    # A backlog in the shared queue still keeps every whole request off the prefill pool.
    assert choose_whole_target(40, decode(streams=40), 1, [busy], policy).worker_id is None


def test_a_burst_beside_a_prefill_job_leaves_the_prefill_worker_job_streams_fewer() -> None:
    """Routing a burst while the prefill worker holds one job: the streams settle `job_streams`
    apart, the decode worker holding the more."""
    policy = WholePolicy(threshold_tokens=256, max_whole_per_worker=64, job_streams=8)
    streams = {"decode-0": 0, "prefill-0": 0}
    for _ in range(40):
        d = choose_whole_target(
            40,
            decode(streams["decode-0"], kv_usage=0.0),
            0,
            [prefill(whole=streams["prefill-0"], jobs=1)],
            policy,
        )
        streams[d.worker_id or "decode-0"] += 1
    assert streams == {"decode-0": 24, "prefill-0": 16}


def test_policy_validation() -> None:
    with pytest.raises(ValueError, match="max_whole_per_worker"):
        WholePolicy(256, 0)
    with pytest.raises(ValueError, match="max_kv_usage"):
        WholePolicy(256, 4, max_kv_usage=0.0)


def test_serve_flags_build_the_routers_policy_and_reach_the_workers() -> None:
    from pdserve.cli import build_parser
    from pdserve.cli_args import dataclass_from_args, dataclass_to_argv
    from pdserve.config import PER_WORKER_FIELDS, WorkerConfig
    from pdserve.launch.serve import whole_policy

    def worker_defaults(*flags: str) -> WorkerConfig:
        return dataclass_from_args(WorkerConfig, build_parser().parse_args(["serve", *flags]), role="decode")

    assert whole_policy(worker_defaults()) is None
    cfg = worker_defaults(
        "--prefill-serves-whole", "--max-whole-per-prefill-worker", "8", "--remote-prefill-threshold", "100"
    )
    assert whole_policy(cfg) == WholePolicy(threshold_tokens=100, max_whole_per_worker=8)
    weighed = worker_defaults("--prefill-serves-whole", "--whole-job-streams", "24")
    assert whole_policy(weighed) == WholePolicy(threshold_tokens=256, max_whole_per_worker=16, job_streams=24)
    argv = dataclass_to_argv(cfg, exclude=PER_WORKER_FIELDS)
    assert "--prefill-serves-whole" in argv and argv[argv.index("--max-whole-per-prefill-worker") + 1] == "8"
    with pytest.raises(ValueError, match="max_whole_per_prefill_worker"):
        WorkerConfig(max_whole_per_prefill_worker=0)
    with pytest.raises(ValueError, match="whole_job_streams"):
        WorkerConfig(whole_job_streams=-1)
