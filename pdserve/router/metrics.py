"""Prometheus metrics of the HTTP front end, on a registry of their own.

A dedicated `CollectorRegistry` (not the process-global one) lets several apps live in one
process, as tests do. Engine-side numbers (queue lengths, KV usage, prefix hits, preemptions)
are read from `engine.stats()` when Prometheus scrapes, so they are never stale.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from pdserve.engine.client import EngineStats
from pdserve.engine.step_stats import PHASES
from pdserve.process_pauses import PauseMonitor

logger = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Buckets span a GPU serving in milliseconds and a laptop CPU taking seconds per step.
TTFT_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0,
)  # fmt: skip
ITL_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05,
    0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
E2E_BUCKETS = (
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
    60.0, 120.0, 300.0, 600.0, 1200.0,
)  # fmt: skip


class _EngineStatsCollector(Collector):
    """Turns one `engine.stats()` call per scrape into gauges and engine-lifetime counters."""

    def __init__(self, stats: Callable[[], EngineStats]) -> None:
        self._stats = stats

    def collect(self) -> Iterable[Metric]:
        try:
            s = self._stats()
        except Exception:
            # A failing engine must not take the front end's own counters down with it.
            logger.exception("engine.stats() failed during a metrics scrape")
            return
        yield GaugeMetricFamily("pdserve_num_requests_running", "requests being run", value=s.num_running)
        yield GaugeMetricFamily("pdserve_num_requests_waiting", "requests queued", value=s.num_waiting)
        usage = GaugeMetricFamily(
            "pdserve_kv_cache_usage_ratio", "fraction of KV blocks in use (0..1)", labels=["worker"]
        )
        for worker, ratio in (s.worker_kv_usage or {"local": s.kv_cache_usage}).items():
            usage.add_metric([worker], ratio)
        yield usage
        yield CounterMetricFamily(
            "pdserve_prefix_cache_hit_tokens",
            "prompt tokens served from the prefix cache",
            value=s.prefix_cache_hit_tokens,
        )
        yield CounterMetricFamily(
            "pdserve_prefix_cache_query_tokens",
            "prompt tokens looked up in the prefix cache",
            value=s.prefix_cache_query_tokens,
        )
        yield CounterMetricFamily(
            "pdserve_num_preemptions", "requests preempted to free KV blocks", value=s.num_preemptions
        )
        yield from _engine_counter_metrics(s.engine_counters or {})


def _engine_counter_metrics(per_engine: dict[str, dict[str, float]]) -> Iterable[Metric]:
    """Each engine thread's lifetime counters (engine/step_stats.py), labelled by worker."""
    seconds = CounterMetricFamily(
        "pdserve_engine_thread_seconds", "engine-thread seconds by phase", labels=["worker", "phase"]
    )
    steps = CounterMetricFamily(
        "pdserve_engine_steps",
        "engine steps; kind=graph: replayed a CUDA graph, kind=ahead: launched before the previous step was read",
        labels=["worker", "kind"],
    )
    tokens = CounterMetricFamily(
        "pdserve_engine_step_tokens", "tokens computed by engine steps", labels=["worker", "kind"]
    )
    seqs = CounterMetricFamily(
        "pdserve_engine_step_seqs", "requests scheduled, summed over steps", labels=["worker"]
    )
    for worker, c in sorted(per_engine.items()):
        for phase in PHASES:
            seconds.add_metric([worker, phase], c.get(f"{phase}_s", 0.0))
        steps.add_metric([worker, "all"], c.get("steps", 0))
        steps.add_metric([worker, "graph"], c.get("graph_steps", 0))
        steps.add_metric([worker, "ahead"], c.get("ahead_steps", 0))
        tokens.add_metric([worker, "prefill"], c.get("prefill_tokens", 0))
        tokens.add_metric([worker, "decode"], c.get("decode_tokens", 0))
        seqs.add_metric([worker], c.get("seqs", 0))
    yield from (seconds, steps, tokens, seqs)


def parse_engine_counters(metrics_text: str) -> dict[str, dict[str, float]]:
    """The inverse of the engine-counter families above: each worker's StepStats counters back
    from a scrape of `/metrics` (for clients that time a deployment from outside)."""
    out: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            worker = sample.labels.get("worker")
            if worker is None:
                continue
            c = out.setdefault(worker, {})
            kind = sample.labels.get("kind")
            if sample.name == "pdserve_engine_thread_seconds_total":
                c[f"{sample.labels['phase']}_s"] = sample.value
            elif sample.name == "pdserve_engine_steps_total":
                c["steps" if kind == "all" else f"{kind}_steps"] = sample.value
            elif sample.name == "pdserve_engine_step_tokens_total":
                c[f"{kind}_tokens"] = sample.value
            elif sample.name == "pdserve_engine_step_seqs_total":
                c["seqs"] = sample.value
    return {w: c for w, c in out.items() if "steps" in c}


class ServerMetrics:
    def __init__(self, stats: Callable[[], EngineStats]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "pdserve_requests",
            "HTTP requests by endpoint and status code",
            ["endpoint", "status"],
            registry=r,
        )
        self.prompt_tokens = Counter("pdserve_prompt_tokens", "prompt tokens processed", registry=r)
        self.generation_tokens = Counter("pdserve_generation_tokens", "tokens generated", registry=r)
        self.ttft = Histogram(
            "pdserve_time_to_first_token_seconds",
            "time from arrival to the first generated token",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "pdserve_inter_token_latency_seconds",
            "time between consecutive outputs of one request",
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "pdserve_e2e_request_latency_seconds",
            "time from arrival to the last token",
            buckets=E2E_BUCKETS,
            registry=r,
        )
        r.register(_EngineStatsCollector(stats))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class PauseCollector(Collector):
    """A process's garbage collections and event-loop lag (process_pauses.PauseMonitor), per scrape."""

    def __init__(self, monitor: PauseMonitor) -> None:
        self._monitor = monitor

    def collect(self) -> Iterable[Metric]:
        s, process = self._monitor.stats, self._monitor.process
        count = CounterMetricFamily(
            "pdserve_process_gc_collections", "garbage collections", labels=["process", "generation"]
        )
        spent = CounterMetricFamily(
            "pdserve_process_gc_pause_seconds",
            "time stopped in garbage collections",
            labels=["process", "generation"],
        )
        longest = GaugeMetricFamily(
            "pdserve_process_gc_pause_max_seconds",
            "longest garbage collection",
            labels=["process", "generation"],
        )
        for gen in range(3):
            count.add_metric([process, str(gen)], s.collections[gen])
            spent.add_metric([process, str(gen)], s.seconds[gen])
            longest.add_metric([process, str(gen)], s.max_seconds[gen])
        yield from (count, spent, longest)
        lag = GaugeMetricFamily(
            "pdserve_process_event_loop_lag_max_seconds", "longest event-loop lag seen", labels=["process"]
        )
        lag.add_metric([process], s.loop_lag_max_s)
        yield lag
        stalls = CounterMetricFamily(
            "pdserve_process_event_loop_stalls", "event-loop lags of 50 ms or more", labels=["process"]
        )
        stalls.add_metric([process], s.loop_lags_visible)
        yield stalls
