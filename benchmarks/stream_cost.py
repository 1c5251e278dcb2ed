"""What streaming a prompt's KV costs the prefill worker's own engine step, paired step by step.

`copy_interference.py` times a stand-in forward; the serving runs (`exposed_paired.py`) carry HTTP,
the router and the noise of two processes. Here the real engine (dummy Llama-3-8B, bf16) on GPU 0
runs one 4,096-token prompt per step with the real cuda_ipc sender, and a receiver process with the
real CudaIpcKVReceiver on `--decode-gpu` reserves blocks and checks what lands. Every iteration runs
each variant once, in a fresh random order, and each remote variant is compared with the local step
of the same iteration (the GPU's clock drifts over seconds by as much as the effect):

- local: a plain request (what a decode worker runs for a prompt it keeps);
- remote: a prefill job, its KV streamed layer by layer into scattered reserved blocks (the default);
- remote, no data: the same job with the copy kernel replaced by nothing: the host side of
  streaming alone (hooks, slot staging, events, headers, the fingerprint; the receiver's check
  fails, as it must);
- remote, one push at the end (`layers_per_chunk` = all layers): the whole copy after the forward,
  the transfer's own time on this path, against which the streamed cost is a fraction.

A step is timed from the call to `engine.step()` that launches it to its return with the first token
(wall clock, what TTFT sees). `--profile` adds one torch-profiler trace per variant and a table of
the GPU time per kernel name, local beside remote.

    python benchmarks/stream_cost.py --decode-gpu 1 --iterations 60 --out results/stream_cost
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import random
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from exposed_paired import summary
from gpu_suite_transfer import DST_BLOCKS, LAYOUT, SECRET, receiver_main

from pdserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from pdserve.engine.engine import LLMEngine
from pdserve.engine.kv_output import KVStreamer
from pdserve.kv_transfer import cuda_ipc, make_sender
from pdserve.kv_transfer.base import slots_for
from pdserve.protocol import PrefillJob
from pdserve.sampling_params import SamplingParams

MODEL = "dummy:llama-3-8b"
# name -> (what copies: kernel | dma | none, kernel programs per layer half, layers per push (0: the
# whole prompt after its first token, --kv-push after), the decode side's blocks: scattered one by
# one | in runs of 16 | one contiguous run)
VARIANTS: dict[str, tuple[str, int, int, str]] = {
    "local": ("none", 0, 1, "scattered"),
    "remote, pushed after the first token": ("kernel", 0, 0, "scattered"),
    "remote": ("kernel", 0, 1, "scattered"),
    "remote, contiguous": ("kernel", 0, 1, "contiguous"),
    "remote, copy engines": ("dma", 0, 1, "scattered"),
    "remote, copy engines, runs of 16 blocks": ("dma", 0, 1, "runs16"),
    "remote, copy engines, contiguous": ("dma", 0, 1, "contiguous"),
    "remote, 16 programs per layer half": ("kernel", 16, 1, "scattered"),
    "remote, no data": ("none", 0, 1, "scattered"),
    "remote, one push at the end": ("kernel", 0, 32, "scattered"),
    "remote, copy engines, one push at the end": ("dma", 0, 32, "scattered"),
}


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


def receiver(conn: Any, gpu: int) -> None:
    """The decode side in its own process, its cache on `gpu`."""
    torch.cuda.set_device(gpu)
    receiver_main(conn, "cuda_ipc")


@contextmanager
def no_copy() -> Iterator[None]:
    """The sender's copy kernel replaced by nothing (everything else it does stays)."""
    real = cuda_ipc.copy_slots
    cuda_ipc.copy_slots = lambda *args, **kwargs: None
    try:
        yield
    finally:
        cuda_ipc.copy_slots = real


class Bench:
    def __init__(self, decode_gpu: int, seed: int) -> None:
        cfg = EngineConfig(
            model=ModelConfig(model=MODEL, dtype="bfloat16", device="cuda:0"),
            cache=CacheConfig(gpu_memory_utilization=0.5, enable_prefix_caching=False),
            scheduler=SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=8192),
            enforce_eager=True,  # prefill steps only: no decode graphs to capture
        )
        self.engine = LLMEngine(cfg)
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=receiver, args=(child, decode_gpu), daemon=True)
        self.proc.start()
        self.host, self.port = self.conn.recv()
        self.sender = make_sender("cuda_ipc", LAYOUT, "p0", SECRET)
        self.streamer = KVStreamer(self.sender, self.engine.kv_caches, self.engine.block_manager.block_size)
        self.engine.kv_streamer = self.streamer
        self.rng = random.Random(seed)
        self.count = 0
        self.window = (0.0, 0.0)  # wall-clock span of the last timed step
        self.mono0 = 0.0  # its start on the monotonic clock
        self.t0 = 0.0  # and on perf_counter
        self.host_s: dict[str, float] = {}  # host seconds of the last step, by part
        self._instrument()

    def _instrument(self) -> None:
        """Time the host's parts of a step that streaming adds to: before the forward (the hook's
        set-up), inside it (every layer's hook), after it (the first token's post-processing)."""
        streamer, engine, host = self.streamer, self.engine, self.host_s
        make_hook, post = streamer.layer_hook_for, engine._postprocess

        def layer_hook_for(scheduled: Any) -> Any:
            t0 = time.perf_counter()
            hook = make_hook(scheduled)
            host["hook_setup"] = time.perf_counter() - t0
            host["hooks"] = 0.0
            if hook is None:
                return None

            def timed_hook(layer: int) -> None:
                t = time.perf_counter()
                hook(layer)
                host["hooks"] += time.perf_counter() - t

            return timed_hook

        def postprocess(*args: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return post(*args)
            finally:
                host["postprocess"] = time.perf_counter() - t0

        real_runs = cuda_ipc.slot_runs

        def slot_runs(*args: Any) -> Any:  # how many runs the copy engines got (host_s in ms: x1000)
            runs = real_runs(*args)
            host["runs"] = len(runs.length) / 1e3
            return runs

        cuda_ipc.slot_runs = slot_runs

        def first_token(*args: Any) -> None:  # the prefill worker hands it to the router here
            host["first_token_handed_over"] = time.perf_counter() - self.t0

        streamer.on_first_token = first_token
        streamer.layer_hook_for = layer_hook_for  # type: ignore[method-assign]
        engine._postprocess = postprocess  # type: ignore[method-assign]

    def prompt(self, n: int) -> list[int]:
        return [self.rng.randrange(10, self.engine.arch.vocab_size) for _ in range(n)]

    def timed_step(self) -> float:
        """Seconds from the step's launch to its first token on the host."""
        self.host_s.clear()
        wall0, self.mono0 = time.time(), time.monotonic()
        t0 = self.t0 = time.perf_counter()
        outs = self.engine.step()
        elapsed = time.perf_counter() - t0
        self.window = (wall0, wall0 + elapsed)
        if not outs or self.engine.has_unfinished():
            raise RuntimeError("the prompt did not finish in one step (step budget too small?)")
        return elapsed

    def local(self, n: int) -> float:
        self.count += 1
        self.engine.add_request(
            f"l{self.count}", self.prompt(n), SamplingParams(max_tokens=1, temperature=0.0)
        )
        return self.timed_step()

    def remote(
        self, n: int, expect_ok: bool = True, layers_per_chunk: int = 1, layout: str = "scattered"
    ) -> float:
        self.count += 1
        rid = f"r{self.count}"
        blocks = destination(self.rng, n // LAYOUT.block_size, layout)
        self.conn.send((rid, blocks))
        assert self.conn.recv() == "ready"
        job = PrefillJob(
            rid, self.prompt(n), {"temperature": 0.0}, "d0", self.host, self.port, blocks, 0,
            time.time() + 60, LAYOUT,
        )  # fmt: skip
        self.streamer.layers_per_chunk = max(layers_per_chunk, 1)
        self.streamer.push = "stream" if layers_per_chunk else "after"
        try:
            self.engine.add_prefill_job(job)
            elapsed = self.timed_step()
        finally:
            self.streamer.layers_per_chunk, self.streamer.push = 1, "stream"
        t_done, kind, detail, _, _ = self.conn.recv()  # the receiver's check, outside the timed span
        # CLOCK_MONOTONIC is one clock for every process of the host.
        self.host_s["kv_complete_from_step_start"] = t_done - self.mono0
        if (kind == "done") != expect_ok:
            raise RuntimeError(f"{rid}: receiver says {kind} ({detail})")
        return elapsed

    def variant(self, name: str, n: int) -> Callable[[], float]:
        if name == "local":
            return lambda: self.local(n)
        copy_with, programs, layers_per_chunk, layout = VARIANTS[name]

        def run() -> float:
            sender = self.sender
            sender.copy_with, sender.copy_programs = copy_with, programs  # type: ignore[attr-defined]
            try:
                if copy_with == "none":
                    with no_copy():
                        return self.remote(n, expect_ok=False)
                return self.remote(n, layers_per_chunk=layers_per_chunk, layout=layout)
            finally:
                sender.copy_with, sender.copy_programs = "kernel", 0  # type: ignore[attr-defined]

        return run

    def close(self) -> None:
        self.sender.close()
        self.conn.send(None)
        self.proc.join(30)


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--decode-gpu", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=4096)
    ap.add_argument("--iterations", type=int, default=60)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--clocks", action="store_true", help="sample GPU 0's SM clock and power (nvidia-smi)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    names = ["local", *(v for v in args.variants if v != "local")]
    dma_error = dma_works(args.decode_gpu)
    print(f"copy engines: {dma_error or 'ok'}", flush=True)
    if dma_error is not None:
        names = [v for v in names if VARIANTS[v][0] != "dma"]
    bench = Bench(args.decode_gpu, seed=2024)
    try:
        for name in names:  # compile the copy kernel, warm the allocator
            bench.variant(name, args.prompt_len)()
        times: dict[str, list[float]] = {name: [] for name in names}
        host: dict[str, dict[str, list[float]]] = {name: {} for name in names}
        windows: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
        sampler = ClockSampler(args.out / "clocks.csv") if args.clocks else None
        order = list(names)
        for _ in range(args.iterations):
            bench.rng.shuffle(order)
            for name in order:
                times[name].append(bench.variant(name, args.prompt_len)())
                windows[name].append(bench.window)
                for part, seconds in bench.host_s.items():
                    host[name].setdefault(part, []).append(seconds)
        clocks = sampler.per_variant(windows) if sampler is not None else {}
        try:
            alone = transfer_alone(bench, args.prompt_len, dma_error is None)
        except Exception as e:  # keep the paired results
            alone = {"error": repr(e)}  # type: ignore[dict-item]
        kernels = profile(bench, args.prompt_len, args.out, names) if args.profile else {}
    finally:
        bench.close()
    report: dict[str, Any] = {
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "decode_gpu": args.decode_gpu,
        "prompt_len": args.prompt_len,
        "iterations": args.iterations,
        "date": time.strftime("%Y-%m-%d"),
        "local_step_median_ms": 1e3 * statistics.median(times["local"]),
        "transfer_alone_ms": alone,
        "gpu0_during_steps": clocks,
        "host_ms": {
            name: {part: 1e3 * statistics.median(v) for part, v in parts.items()}
            for name, parts in host.items()
        },
        "variants": {},
    }
    print(f"local step: median {report['local_step_median_ms']:.2f} ms")
    print("the KV alone, GPU to GPU, nothing else running (median ms): " + json.dumps(alone))
    print("host time by part (median ms): " + json.dumps(report["host_ms"]))
    if clocks:
        print("GPU 0 during the steps (mean of samples): " + json.dumps(clocks))
    for name in names[1:]:
        diffs = [r - loc for r, loc in zip(times[name], times["local"], strict=True)]
        row = summary(diffs) | {"step_median_ms": 1e3 * statistics.median(times[name])}
        report["variants"][name] = row
        print(
            f"{name:30s} step {row['step_median_ms']:8.2f}  slower: {row['mean_ms']:+.2f} "
            f"({row['ci95_low_ms']:+.2f} .. {row['ci95_high_ms']:+.2f}) / median {row['median_ms']:+.2f} ms"
        )
    # A remote prompt's first token leaves the prefill worker when it is handed to the router (the
    # rest of the step follows it); a local one when the step returns it: the exposed time as TTFT sees it.
    for name in names[1:]:
        handed = host[name].get("first_token_handed_over", [])
        if len(handed) != len(times["local"]):
            continue
        row = summary([h - loc for h, loc in zip(handed, times["local"], strict=True)])
        report["variants"][name]["first_token_vs_local_step"] = row
        print(
            f"{name:30s} first token handed over vs the local step: {row['mean_ms']:+.2f} "
            f"({row['ci95_low_ms']:+.2f} .. {row['ci95_high_ms']:+.2f}) / median {row['median_ms']:+.2f} ms"
        )
    if kernels:
        report["kernels_ms"] = kernels
        local = kernels["local"]
        for name in names[1:]:
            other = kernels[name]
            keys = sorted(set(local) | set(other), key=lambda k: -abs(other.get(k, 0) - local.get(k, 0)))
            print(f"\nGPU ms per kernel, {name} − local (largest 12 differences):")
            for k in keys[:12]:
                print(
                    f"  {other.get(k, 0) - local.get(k, 0):+8.3f}  ({local.get(k, 0):8.3f} → {other.get(k, 0):8.3f})  {k[:90]}"
                )
    (args.out / "report.json").write_text(json.dumps(report, indent=2))
    report["times_s"] = times
    (args.out / "raw.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
