"""Process pauses: collections counted by generation, a blocked event loop seen as lag, the start-up
heap frozen only when enabled, and the router's metrics for them."""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from pdserve.process_pauses import VISIBLE_PAUSE_S, PauseMonitor, freeze_startup_heap
from pdserve.router.metrics import PauseCollector


@pytest.fixture
def monitor() -> Iterator[PauseMonitor]:
    m = PauseMonitor("test")
    yield m
    m.close()


def test_collections_are_counted_by_generation(monitor: PauseMonitor) -> None:
    before = monitor.stats.collections[2]
    gc.collect(2)
    gc.collect(2)
    assert monitor.stats.collections[2] == before + 2
    assert monitor.stats.seconds[2] > 0 and monitor.stats.max_seconds[2] > 0
    monitor.close()
    gc.collect(2)
    assert monitor.stats.collections[2] == before + 2  # unhooked


def test_a_blocked_event_loop_is_seen_as_lag(monitor: PauseMonitor) -> None:
    async def scenario() -> None:
        watch = asyncio.create_task(monitor.watch_loop(interval_s=0.005))
        await asyncio.sleep(0.03)
        time.sleep(VISIBLE_PAUSE_S + 0.03)  # a handler that blocks the loop
        await asyncio.sleep(0.03)
        watch.cancel()

    asyncio.run(scenario())
    assert monitor.stats.loop_lags_visible == 1
    assert monitor.stats.loop_lag_max_s >= VISIBLE_PAUSE_S


def test_the_start_up_heap_is_frozen_only_when_enabled(monkeypatch: pytest.MonkeyPatch) -> None:
    try:
        monkeypatch.setenv("PDSERVE_GC_FREEZE", "0")
        gc.unfreeze()
        assert not freeze_startup_heap() and gc.get_freeze_count() == 0
        monkeypatch.setenv("PDSERVE_GC_FREEZE", "1")
        assert freeze_startup_heap() and gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()


def test_router_metrics_report_the_pauses(monitor: PauseMonitor) -> None:
    gc.collect(2)
    registry = CollectorRegistry()
    registry.register(PauseCollector(monitor))
    text = generate_latest(registry).decode()
    assert 'pdserve_process_gc_collections_total{generation="2",process="test"}' in text
    assert 'pdserve_process_gc_pause_max_seconds{generation="2",process="test"}' in text
    assert 'pdserve_process_event_loop_stalls_total{process="test"} 0.0' in text


def test_heap_census_names_what_the_collector_walks() -> None:
    from pdserve.process_pauses import heap_census

    class Marker:
        pass

    keep = [Marker() for _ in range(200_000)]  # more than any other type in the test process
    text = heap_census(top=3)
    total, _, common = text.partition(" in all; ")
    assert int(total) >= len(keep)
    assert common.startswith(f"Marker {len(keep)}")
    del keep
