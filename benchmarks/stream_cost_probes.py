"""The measurements `stream_cost.py` makes beside its paired steps: the transfer alone (the copy
kernel and the copy engines, by destination layout), a check that the copy engines copy, GPU 0's
clock and power over the steps, and a torch-profiler trace per variant."""

from __future__ import annotations

import random
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from gpu_suite_transfer import DST_BLOCKS, LAYOUT

from pdserve.kv_transfer.base import slots_for

if TYPE_CHECKING:
    from stream_cost import Bench


def destination(rng: random.Random, num_blocks: int, layout: str) -> list[int]:
    """Block ids on the decode side: one by one at random (a long-running decode worker's free
    list at worst), in runs of 16, or one contiguous run."""
    if layout == "contiguous":
        first = rng.randrange(DST_BLOCKS - num_blocks)
        return list(range(first, first + num_blocks))
    if layout == "runs16":
        runs = rng.sample(range(DST_BLOCKS // 16), -(-num_blocks // 16))
        return [16 * r + i for r in runs for i in range(16)][:num_blocks]
    return rng.sample(range(DST_BLOCKS), num_blocks)


class ClockSampler:
    """nvidia-smi sampling GPU 0's SM clock and power every 10 ms into a file, read back per
    variant over the wall-clock spans of its steps: is a slower step a slower clock?"""

    def __init__(self, path: Path) -> None:
        import subprocess

        self.path = path
        self.file = path.open("w")
        query = "--query-gpu=timestamp,index,clocks.sm,power.draw"
        self.proc = subprocess.Popen(
            ["nvidia-smi", query, "--format=csv,noheader,nounits", "-i", "0", "-lms", "10"], stdout=self.file
        )

    def per_variant(self, windows: dict[str, list[tuple[float, float]]]) -> dict[str, dict[str, float]]:
        self.proc.terminate()
        self.proc.wait(10)
        self.file.close()
        samples = []
        for line in self.path.read_text().splitlines():
            parts = [p.strip() for p in line.split(",")]
            try:
                when = time.mktime(time.strptime(parts[0].split(".")[0], "%Y/%m/%d %H:%M:%S"))
                when += float("0." + parts[0].split(".")[1]) if "." in parts[0] else 0.0
                samples.append((when, float(parts[2]), float(parts[3])))
            except (ValueError, IndexError):
                continue
        out = {}
        for name, spans in windows.items():
            inside = [(c, p) for t, c, p in samples if any(a <= t <= b for a, b in spans)]
            if inside:
                out[name] = {
                    "samples": float(len(inside)),
                    "sm_mhz": statistics.fmean(c for c, _ in inside),
                    "power_w": statistics.fmean(p for _, p in inside),
                }
        return out


def dma_works(decode_gpu: int) -> str | None:
    """None if the copy engines copy a few scattered slots from GPU 0 into `decode_gpu` correctly,
    else why not (the run then leaves their variants out)."""
    from pdserve.kv_transfer.dma_copy import BatchCopier, descriptors, slot_runs

    try:
        src = torch.randn(2, 8, 16, 8, 128, device="cuda:0").bfloat16()
        dst = torch.zeros(2, 8, 16, 8, 128, device=f"cuda:{decode_gpu}").bfloat16()
        src_slots, dst_slots = slots_for([3, 1], 16, 4, 30), slots_for([6, 7], 16, 4, 30)
        row = 8 * 128 * 2
        dsts, srcs, sizes = descriptors(
            slot_runs(src_slots.numpy(), dst_slots.numpy()),
            np.array([src.data_ptr()], dtype=np.uint64),
            np.array([dst.data_ptr()], dtype=np.uint64),
            src.stride(0) * 2,
            dst.stride(0) * 2,
            row,
        )
        side = torch.cuda.Stream(0)  # not the legacy default stream: the batch call refuses it
        side.wait_stream(torch.cuda.current_stream(0))
        BatchCopier(0).copy(dsts, srcs, sizes, side.cuda_stream)
        torch.cuda.synchronize(0)
        got = dst.view(2, -1, 8, 128)[:, dst_slots.to(dst.device)].cpu()
        want = src.view(2, -1, 8, 128)[:, src_slots.to(src.device)].cpu()
        return None if torch.equal(got, want) else "copied bytes differ"
    except Exception as e:
        return repr(e)


def transfer_alone(bench: Bench, n: int, dma: bool, repeats: int = 20) -> dict[str, float]:
    """The transfer's own time: the prompt's KV copied into the receiver's cache with nothing else
    on the GPU, in one launch and layer by layer (what a streamed push moves), GPU time (ms)."""
    from pdserve.kv_transfer.gpu_copy import copy_slots, pointer_table

    sender = bench.sender
    ((views, dst_table),) = sender._mapped.values()  # type: ignore[attr-defined]
    caches = bench.engine.kv_caches
    src_table = pointer_table(caches)
    blocks = n // LAYOUT.block_size
    src_slots = slots_for(bench.rng.sample(range(bench.engine.block_manager.num_blocks), blocks), 16, 0, n)
    dst_slots = slots_for(bench.rng.sample(range(DST_BLOCKS), blocks), 16, 0, n)
    src_slots, dst_slots = src_slots.to(caches[0].device), dst_slots.to(caches[0].device)
    out: dict[str, float] = {}
    for name, per_launch in (("one launch", LAYOUT.num_layers), ("layer by layer", 1)):
        samples = []
        for _ in range(repeats + 1):
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            for first in range(0, LAYOUT.num_layers, per_launch):
                copy_slots(
                    src_table, dst_table, caches[0], caches[0].stride(0), views[0].stride(0),
                    first, first + per_launch, src_slots, dst_slots,
                )  # fmt: skip
            stop.record()
            stop.synchronize()
            samples.append(start.elapsed_time(stop))
        out[name] = statistics.median(samples[1:])
    out["GB/s, one launch"] = n * LAYOUT.bytes_per_token / out["one launch"] / 1e6
    if not dma:
        return out
    # The copy engines, one batch for all layers and one per layer.
    from pdserve.kv_transfer.dma_copy import BatchCopier, descriptors, slot_runs

    copier = BatchCopier(caches[0].device.index or 0)
    size = caches[0].element_size()
    stream = torch.cuda.Stream()  # not the legacy default stream: the batch call refuses it
    # The source as the engine allocates an idle engine's blocks: one run.
    first = bench.rng.randrange(bench.engine.block_manager.num_blocks - blocks)
    src_host = slots_for(list(range(first, first + blocks)), 16, 0, n).numpy()
    cases = [
        (f"copy engines, {layout} destination, {label}", layout, per_launch)
        for layout in ("scattered", "runs16", "contiguous")
        for label, per_launch in (("one batch", LAYOUT.num_layers), ("layer by layer", 1))
    ]
    for name, layout, per_launch in cases:
        dst_host = slots_for(destination(bench.rng, blocks, layout), 16, 0, n).numpy()
        runs = slot_runs(src_host, dst_host)
        batches = []
        for first in range(0, LAYOUT.num_layers, per_launch):
            batches.append(
                descriptors(
                    runs,
                    np.array([c.data_ptr() for c in caches[first : first + per_launch]], dtype=np.uint64),
                    np.array([v.data_ptr() for v in views[first : first + per_launch]], dtype=np.uint64),
                    caches[0].stride(0) * size,
                    views[0].stride(0) * size,
                    caches[0].shape[-2] * caches[0].shape[-1] * size,
                )
            )
        samples = []
        for _ in range(repeats + 1):
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record(stream)
            for dsts, srcs, sizes in batches:
                copier.copy(dsts, srcs, sizes, stream.cuda_stream)
            stop.record(stream)
            stop.synchronize()
            samples.append(start.elapsed_time(stop))
        out[name] = statistics.median(samples[1:])
        out[f"{name}: runs per layer half"] = float(len(runs.length))
    return out


def profile(bench: Bench, n: int, out: Path, names: list[str]) -> dict[str, dict[str, float]]:
    """GPU ms per kernel name for one step of each variant (torch profiler), and a trace each."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    tables: dict[str, dict[str, float]] = {}
    for name in names:
        run = bench.variant(name, n)
        run()  # warm
        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            run()
        prof.export_chrome_trace(str(out / f"trace_{name.replace(' ', '_').replace(',', '')}.json"))
        tables[name] = {
            e.key: e.device_time_total / 1e3 for e in prof.key_averages() if e.device_time_total > 0
        }
    return tables
