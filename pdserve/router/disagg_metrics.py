"""Router metrics of disaggregated serving, on the app's registry."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from pdserve.router.disagg_client import DisaggClient
from pdserve.router.request_events import RequestEvents

DECISION_PATHS = ("local", "remote", "fallback", "whole")
TRANSFER_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip


class _PoolCollector(Collector):
    def __init__(self, client: DisaggClient) -> None:
        self.client = client

    def collect(self) -> Iterable[Metric]:
        c = self.client
        yield GaugeMetricFamily(
            "pdserve_prefill_queue_depth",
            "remote-prefill jobs waiting for a prefill worker",
            value=c.queue.depth,
        )
        yield GaugeMetricFamily(
            "pdserve_prefill_in_flight",
            "remote-prefill jobs held by prefill workers",
            value=c.queue.in_flight,
        )
        healthy = GaugeMetricFamily(
            "pdserve_worker_healthy", "1 if the worker answers its health polls", labels=["worker", "role"]
        )
        for w in c.workers.values():
            healthy.add_metric([w.worker_id, w.info.role], 1.0 if w.healthy else 0.0)
        yield healthy


class DisaggMetrics:
    def __init__(self, registry: CollectorRegistry, client: DisaggClient) -> None:
        self.decisions = Counter(
            "pdserve_disagg_decisions",
            "where prompts were prefilled: on the decode worker (local), by a prefill worker (remote), "
            "on the decode worker after a failed remote prefill (fallback), or by a prefill worker "
            "that served the whole request (whole)",
            ["path"],
            registry=registry,
        )
        for path in DECISION_PATHS:  # at zero from the start, so two scrapes always diff
            self.decisions.labels(path=path)
        self.kv_bytes = Counter(
            "pdserve_kv_transfer_bytes", "KV bytes moved from prefill to decode", registry=registry
        )
        self.kv_seconds = Histogram(
            "pdserve_kv_transfer_seconds", "KV transfer time per request (first chunk to done)",
            buckets=TRANSFER_BUCKETS, registry=registry,
        )  # fmt: skip
        self.queue_wait = Histogram(
            "pdserve_prefill_queue_wait_seconds", "time a remote-prefill job waited in the queue",
            buckets=TRANSFER_BUCKETS, registry=registry,
        )  # fmt: skip
        self.first_token_from = Counter(
            "pdserve_first_token_source",
            "where the router got each request's first token: from the worker serving the request, or "
            "from the prefill worker as soon as it was sampled (a remote prefill started early)",
            ["source"],
            registry=registry,
        )
        for source in ("serving_worker", "prefill_worker"):
            self.first_token_from.labels(source=source)
        self.first_token_disagreements = Counter(
            "pdserve_first_token_disagreements",
            "first tokens streamed from a prefill worker that the decode worker then disagreed with "
            "(it prefilled the prompt itself after a failed transfer); the rest was served as a "
            "continuation of the streamed token",
            registry=registry,
        )
        registry.register(_PoolCollector(client))
        self.client = client
        client.on_first_chunk = self.observe

    def observe(self, events: RequestEvents) -> None:
        self.decisions.labels(path=events.prefill_path or "local").inc()
        self.first_token_from.labels(source=events.first_token_from).inc()
        if events.first_token_disagreed:
            self.first_token_disagreements.inc()
        if events.prefill_path == "remote":
            self.kv_bytes.inc(events.kv_bytes)
            self.kv_seconds.observe(events.kv_seconds)
        waits, self.client.queue.wait_seconds = self.client.queue.wait_seconds, []
        for w in waits:
            self.queue_wait.observe(w)
