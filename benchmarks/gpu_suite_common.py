"""Helpers shared by the GPU suite's sections: the result table and timing."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch


class Table:
    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def add(self, section: str, metric: str, value: str, note: str = "", **numbers: float) -> None:
        self.rows.append({"section": section, "metric": metric, "value": value, "note": note, **numbers})
        print(f"  {section:9s} {metric:44s} {value:>20s}  {note}", flush=True)

    def render(self) -> str:
        lines = [f"{'section':9s} {'metric':44s} {'value':>20s}  note", "-" * 110]
        for r in self.rows:
            lines.append(f"{r['section']:9s} {r['metric']:44s} {r['value']:>20s}  {r['note']}")
        return "\n".join(lines)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_ms(
    fn: Callable[[], Any], device: torch.device, warmup_ms: float = 50, rep_ms: float = 300
) -> float:
    """Median milliseconds per call: CUDA events through triton's do_bench on a GPU, a host clock on CPU."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    fn()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out64, ref64 = out.double(), ref.double()
    return float((out64 - ref64).norm() / ref64.norm())
