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
(wall clock). What TTFT sees is the first token's hand-over to the router (remote; the rest of the
step follows it) against the local step's return, also reported, with its split at the moment the
token is on the host. `--profile` adds one torch-profiler trace per variant and a table of
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

import torch
from exposed_paired import summary
from gpu_suite_transfer import LAYOUT, SECRET, receiver_main
from stream_cost_probes import ClockSampler, destination, dma_works, profile, transfer_alone

from pdserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from pdserve.engine.engine import LLMEngine
from pdserve.engine.kv_output import KVStreamer
from pdserve.engine.sampler import PendingSamples
from pdserve.kv_transfer import cuda_ipc, make_sender
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
        self._restore = [(cuda_ipc, "slot_runs", real_runs)]

        def handed_over(*args: Any) -> None:  # the prefill worker hands it to the router here
            host["first_token_handed_over"] = time.perf_counter() - self.t0

        real_result = PendingSamples.result

        def result(pending: PendingSamples) -> Any:  # the host waits for the step's tokens here
            host["token_wait_from"] = time.perf_counter() - self.t0
            out = real_result(pending)
            host["token_on_host"] = time.perf_counter() - self.t0
            return out

        PendingSamples.result = result  # type: ignore[method-assign]
        self._restore.append((PendingSamples, "result", real_result))
        streamer.on_first_token = handed_over
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
        elapsed = self.host_s["step_returned"] = time.perf_counter() - t0
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

    def pairs(
        self, names: list[str], iterations: int, n: int
    ) -> tuple[
        dict[str, list[float]], dict[str, dict[str, list[float]]], dict[str, list[tuple[float, float]]]
    ]:
        """Every variant once per iteration, in a fresh random order: the step times (s), the
        host's parts of each step (s), and each step's wall-clock span."""
        times: dict[str, list[float]] = {name: [] for name in names}
        host: dict[str, dict[str, list[float]]] = {name: {} for name in names}
        windows: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
        order = list(names)
        for _ in range(iterations):
            self.rng.shuffle(order)
            for name in order:
                times[name].append(self.variant(name, n)())
                windows[name].append(self.window)
                for part, seconds in self.host_s.items():
                    host[name].setdefault(part, []).append(seconds)
        return times, host, windows

    def close(self) -> None:
        for owner, attr, real in self._restore:  # the module-wide probes, for whoever runs next
            setattr(owner, attr, real)
        self.sender.close()
        self.conn.send(None)
        self.proc.join(30)


def minus(a: list[float], b: list[float]) -> list[float]:
    return [x - y for x, y in zip(a, b, strict=True)]


def first_token(name: str, remote: dict[str, list[float]], local: dict[str, list[float]]) -> dict[str, Any]:
    """When the first token leaves, remote (handed to the router; the rest of the step follows it)
    against local (the step returns it), paired: the exposed time as TTFT sees it. Then the same
    split in two halves that add up to it. Up to the token on the host: the GPU's work (the same
    kernels in both while nothing is copied before the sampling) and the host's launches, hidden
    while the host waits for the GPU (the slack). After it: host work alone, timed to microseconds,
    which the GPU's step-to-step drift does not blur."""
    handed, token = remote["first_token_handed_over"], remote["token_on_host"]
    total = summary(minus(handed, local["step_returned"]))
    gpu_side = summary(minus(token, local["token_on_host"]))
    after, local_after = minus(handed, token), minus(local["step_returned"], local["token_on_host"])
    host_side = summary(minus(after, local_after))
    slack = 1e3 * statistics.median(minus(token, remote["token_wait_from"]))
    local_slack = 1e3 * statistics.median(minus(local["token_on_host"], local["token_wait_from"]))
    print(
        f"{name:30s} first token handed over vs the local step: {ms(total)}\n"
        f"{'':30s}   = token on the host vs local {ms(gpu_side)} (the host waited for the GPU "
        f"{slack:.1f} ms, local {local_slack:.1f})\n"
        f"{'':30s}   + token to hand-over {1e3 * statistics.median(after):.3f} ms vs token to the local "
        f"step's return {1e3 * statistics.median(local_after):.3f}: {ms(host_side, 3)}"
    )
    return {
        "first_token_vs_local_step": total,
        "token_on_host_vs_local": gpu_side,
        "token_to_handover_vs_local_ms": host_side,
        "token_to_handover_median_ms": 1e3 * statistics.median(after),
        "local_token_to_return_median_ms": 1e3 * statistics.median(local_after),
        "host_waited_for_gpu_median_ms": slack,
        "local_host_waited_for_gpu_median_ms": local_slack,
    }


def ms(row: dict[str, float], digits: int = 2) -> str:
    f = f"+.{digits}f"
    return (
        f"{row['mean_ms']:{f}} ({row['ci95_low_ms']:{f}} .. {row['ci95_high_ms']:{f}}) / median "
        f"{row['median_ms']:{f}} ms"
    )


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
        sampler = ClockSampler(args.out / "clocks.csv") if args.clocks else None
        times, host, windows = bench.pairs(names, args.iterations, args.prompt_len)
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
    for name in names[1:]:
        if len(host[name].get("first_token_handed_over", [])) == len(times["local"]):
            report["variants"][name] |= first_token(name, host[name], host["local"])
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
