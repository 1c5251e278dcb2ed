"""What streaming a prompt's KV to another GPU costs the prompt's own forward.

A Llama-3-8B-shaped prefill of one 4,096-token prompt (random bf16 weights; per layer the QKV, O,
gate-up and down matmuls, the KV store into a paged cache and causal attention) runs on GPU 0
while, after each layer, that layer's KV is copied on a side stream into a paged cache with
scattered blocks, as the cuda_ipc transport does during the forward. Variants:

- no copy (the local prefill's forward);
- the copy kernel into a cache on the same GPU (one-GPU deployments);
- the copy kernel into GPU 1's cache, one program per 8-token tile (`PDSERVE_KV_COPY_PROGRAMS=0`)
  and with a few programs per layer half, each walking a stride of tiles;
- the copy engines instead of a kernel (`copy_` of one contiguous run of blocks per layer to GPU
  1): the best case a DMA path could reach, since real destinations are scattered blocks; and in
  runs of 16 blocks, one memcpy each;
- the copy kernel launched on GPU 1, reading GPU 0's cache (a pull by the receiving GPU);

- the copy kernel to GPU 1 while the forward runs on a high-priority stream (the block scheduler
  then hands free SMs to the forward's kernels first, the copy's programs fill in).

Then what the copies cost the receiving GPU: a decode-like step there (64 tokens through every
layer's matmuls) with 2 layers' KV pushed from GPU 0 or pulled by GPU 1 at the same time.

Every iteration runs one forward of each variant, in a fresh random order, so clocks and
temperature drift over all of them alike; each variant's cost is the per-iteration difference from
the no-copy forward of the same iteration (paired), reported as a mean with its 95% interval and as
a median, beside the forward's time (CUDA events) and how long after the forward the last copy ends
(what a request waits for its KV beyond its prefill).

    python benchmarks/copy_interference.py --programs 0 16 --iterations 150 --json results/copy_interference.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from pdserve.kv_transfer.gpu_copy import copy_slots, pointer_table

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, LAYERS, BLOCK = 4096, 32, 8, 128, 14336, 32, 16


def weights(device: torch.device) -> list[dict[str, torch.Tensor]]:
    def w(rows: int, cols: int) -> torch.Tensor:
        return torch.randn(rows, cols, device=device, dtype=torch.bfloat16) * rows**-0.5

    qkv = (HEADS + 2 * KV_HEADS) * HEAD_DIM
    return [
        {"qkv": w(HIDDEN, qkv), "o": w(HIDDEN, HIDDEN), "gu": w(HIDDEN, 2 * FFN), "down": w(FFN, HIDDEN)}
        for _ in range(LAYERS)
    ]


def caches(device: torch.device, num_blocks: int) -> list[torch.Tensor]:
    shape = (2, num_blocks, BLOCK, KV_HEADS, HEAD_DIM)
    return [torch.zeros(shape, device=device, dtype=torch.bfloat16) for _ in range(LAYERS)]


class Prefill:
    """One prompt's forward on GPU 0 with a hook after each layer (the KV in `cache` by then)."""

    def __init__(self, tokens: int, device: torch.device) -> None:
        self.tokens, self.device = tokens, device
        self.w = weights(device)
        self.cache = caches(device, tokens // BLOCK + 16)
        self.slots = torch.arange(tokens, device=device)  # [T] this prompt's slots in `cache`
        self.x0 = torch.randn(tokens, HIDDEN, device=device, dtype=torch.bfloat16)

    def forward(self, after_layer: Any) -> None:
        T = self.tokens
        x = self.x0.clone()  # [T, HIDDEN]
        for i, w in enumerate(self.w):
            qkv = x @ w["qkv"]  # [T, (H + 2 H_kv) D]
            q, k, v = qkv.split([HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM], dim=-1)
            flat = self.cache[i].view(2, -1, KV_HEADS, HEAD_DIM)  # [2, slots, H_kv, D]
            flat[0, self.slots] = k.view(T, KV_HEADS, HEAD_DIM)
            flat[1, self.slots] = v.view(T, KV_HEADS, HEAD_DIM)
            # [1, H, T, D], KV heads repeated: the flash kernel takes 4-D, equal-head inputs only
            # (anything else falls back to the math path, ~5x slower at this length).
            group = HEADS // KV_HEADS
            attn = F.scaled_dot_product_attention(
                q.view(1, T, HEADS, HEAD_DIM).transpose(1, 2),
                k.view(1, T, KV_HEADS, HEAD_DIM).transpose(1, 2).repeat_interleave(group, dim=1),
                v.view(1, T, KV_HEADS, HEAD_DIM).transpose(1, 2).repeat_interleave(group, dim=1),
                is_causal=True,
            )
            x = x + attn[0].transpose(0, 1).reshape(T, HIDDEN) @ w["o"]
            gate, up = (x @ w["gu"]).chunk(2, dim=-1)  # [T, FFN] each
            x = x + (F.silu(gate) * up) @ w["down"]
            after_layer(i)


def scattered_slots(tokens: int, num_blocks: int, device: torch.device, seed: int) -> torch.Tensor:
    """[T] destination slots in randomly chosen blocks, as a decode worker's free list hands them."""
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randperm(num_blocks, generator=g)[: tokens // BLOCK]
    return (blocks[:, None] * BLOCK + torch.arange(BLOCK)[None, :]).reshape(-1).to(device)


def timed(
    prefill: Prefill, copy: Any, side: torch.cuda.Stream, stream: torch.cuda.Stream | None
) -> tuple[float, float]:
    """One forward's time and the copies' tail after it (ms); the forward on `stream` if given."""
    with torch.cuda.stream(stream):  # None: the current stream
        main = torch.cuda.current_stream(prefill.device)
        start, end, copied = (torch.cuda.Event(enable_timing=True) for _ in range(3))
        start.record()

        def after_layer(i: int) -> None:
            if copy is None:
                return
            side.wait_stream(main)
            with torch.cuda.stream(side):
                copy(i)

        prefill.forward(after_layer)
        end.record()
        side.wait_stream(main)
        copied.record(side)
        main.wait_stream(side)
    torch.cuda.synchronize()
    return start.elapsed_time(end), start.elapsed_time(copied) - start.elapsed_time(end)


def paired(diffs: list[float]) -> dict[str, float]:
    """Mean of per-iteration differences with a normal 95% interval, and their median (ms)."""
    mean = statistics.fmean(diffs)
    half = 1.96 * statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else float("nan")
    return {
        "mean_ms": mean,
        "ci_low_ms": mean - half,
        "ci_high_ms": mean + half,
        "median_ms": statistics.median(diffs),
    }


def sync_all() -> None:
    for d in range(torch.cuda.device_count()):
        torch.cuda.synchronize(d)


def receiver_cost(
    copies: dict[str, Any], device: torch.device, iterations: int
) -> dict[str, dict[str, float]]:
    """What a copy of 2 layers' KV (what arrives during ~2 layers of the prefill) costs a
    decode-like step on the receiving GPU: 64 tokens through the 32 layers' matmuls, bound by
    reading the weights. Paired per iteration with the step alone, as above."""
    w = weights(device)
    x0 = torch.randn(64, HIDDEN, device=device, dtype=torch.bfloat16)
    main = torch.cuda.current_stream(device)

    def step(copy: Any) -> float:
        sync_all()
        if copy is not None:
            copy()  # queued on its own stream (either GPU) before the step, so both run at once
        with torch.cuda.device(device):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(main)
            x = x0
            for layer in w:
                x = x + (x @ layer["qkv"])[:, :HIDDEN] @ layer["o"]
                gate, up = (x @ layer["gu"]).chunk(2, dim=-1)
                x = x + (F.silu(gate) * up) @ layer["down"]
            end.record(main)
        sync_all()
        return start.elapsed_time(end)

    variants: dict[str, Any] = {"alone": None, **copies}
    rng = random.Random(1)
    times: dict[str, list[float]] = {name: [] for name in variants}
    diffs: dict[str, list[float]] = {name: [] for name in variants}
    for it in range(iterations + 1):
        order = list(variants)
        rng.shuffle(order)
        got = {name: step(variants[name]) for name in order}
        if it == 0:
            continue
        for name, t in got.items():
            times[name].append(t)
            diffs[name].append(t - got["alone"])
    out: dict[str, dict[str, float]] = {}
    print(
        f"{'receiving GPU: decode-like step':72s} {'step':>8s} {'slower: mean (95% CI) / median':>32s}  (ms)"
    )
    for name in variants:
        row = {"step_ms": statistics.median(times[name])} | {
            f"slower_{k}": v for k, v in paired(diffs[name]).items()
        }
        out[name] = row
        print(
            f"{name:72s} {row['step_ms']:8.2f} {row['slower_mean_ms']:+7.2f} ({row['slower_ci_low_ms']:+.2f} .. "
            f"{row['slower_ci_high_ms']:+.2f}) / {row['slower_median_ms']:+.2f}",
            flush=True,
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--programs", type=int, nargs="+", default=[0, 16])
    ap.add_argument("--iterations", type=int, default=100, help="forwards per variant")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    src_dev = torch.device("cuda", 0)
    peer = torch.device("cuda", 1) if torch.cuda.device_count() > 1 else None
    prefill = Prefill(args.tokens, src_dev)
    num_blocks = 4 * (args.tokens // BLOCK)
    src_table = pointer_table(prefill.cache)
    side = torch.cuda.Stream(src_dev)

    def kernel_copy(dst: list[torch.Tensor], programs: int) -> Any:
        dst_table = pointer_table(dst).to(src_dev)
        dst_slots = scattered_slots(args.tokens, num_blocks, src_dev, seed=1)
        like = prefill.cache[0]
        return lambda i: copy_slots(
            src_table, dst_table, like, like.stride(0), dst[0].stride(0), i, i + 1,
            prefill.slots, dst_slots, programs,
        )  # fmt: skip

    variants: dict[str, Any] = {"no copy": None}
    local = caches(src_dev, num_blocks)
    variants["kernel, same GPU, one program per tile"] = kernel_copy(local, 0)
    if peer is not None:
        remote = caches(peer, num_blocks)
        remote[0][:, :1].copy_(prefill.cache[0][:, :1])  # enables peer access from GPU 0 to GPU 1
        torch.cuda.synchronize()
        for p in args.programs:
            name = "one program per tile" if p == 0 else f"{p} programs per layer half"
            variants[f"kernel, GPU 1, {name}"] = kernel_copy(remote, p)
        run = args.tokens // BLOCK  # one contiguous run of blocks per layer: the copy engines' best case

        def dma(i: int) -> None:
            for half in range(2):  # each half's run is contiguous: one memcpy each
                remote[i][half, num_blocks - run :].copy_(prefill.cache[i][half, :run], non_blocking=True)

        variants["copy engines, GPU 1, one contiguous run"] = dma

        def dma_runs(i: int, blocks: int = 16) -> None:
            # Runs of `blocks` blocks (256 tokens) at scattered places: one memcpy per run and half.
            for half in range(2):
                for r in range(0, run, blocks):
                    at = (3 * r) % (num_blocks - blocks)  # [at, at + blocks) in the destination
                    remote[i][half, at : at + blocks].copy_(
                        prefill.cache[i][half, r : r + blocks], non_blocking=True
                    )

        variants["copy engines, GPU 1, runs of 16 blocks"] = dma_runs

        # Pull: the kernel runs on GPU 1 and reads GPU 0's cache over NVLink, so the prefill GPU's
        # SMs do no copying (what a decode worker copying its own KV in would cost the prefill).
        with torch.cuda.device(peer):
            prefill.cache[0][:, :1].copy_(remote[0][:, :1])  # peer access from GPU 1 to GPU 0
        torch.cuda.synchronize()
        pull = torch.cuda.Stream(peer)
        pull_src = src_table.to(peer)
        pull_dst = pointer_table(remote)
        pull_src_slots = prefill.slots.to(peer)
        pull_dst_slots = scattered_slots(args.tokens, num_blocks, peer, seed=1)

        def pulled(i: int) -> None:
            ready = torch.cuda.Event()
            ready.record()  # on the side stream (GPU 0), which has waited for layer i
            pull.wait_event(ready)
            with torch.cuda.device(peer), torch.cuda.stream(pull):
                like = prefill.cache[0]
                copy_slots(
                    pull_src, pull_dst, like, like.stride(0), remote[0].stride(0), i, i + 1,
                    pull_src_slots, pull_dst_slots, 0,
                )  # fmt: skip
                done = torch.cuda.Event()
                done.record()
            torch.cuda.current_stream(src_dev).wait_event(done)  # the side stream: the tail ends with it

        variants["kernel on GPU 1 pulling from GPU 0, one program per tile"] = pulled

    hi = torch.cuda.Stream(src_dev, priority=-1)  # lower numbers run first; 0 is the default's
    streams: dict[str, torch.cuda.Stream | None] = {name: None for name in variants}
    if peer is not None:
        name = "kernel, GPU 1, one program per tile, forward on a high-priority stream"
        variants[name], streams[name] = variants["kernel, GPU 1, one program per tile"], hi

    rng = random.Random(0)
    forwards: dict[str, list[float]] = {name: [] for name in variants}
    tails: dict[str, list[float]] = {name: [] for name in variants}
    diffs: dict[str, list[float]] = {name: [] for name in variants}
    for it in range(args.iterations + 1):  # the first warms up (allocator, kernels' compilation)
        order = list(variants)
        rng.shuffle(order)
        times = {name: timed(prefill, variants[name], side, streams[name]) for name in order}
        if it == 0:
            continue
        for name, (fwd, tail) in times.items():
            forwards[name].append(fwd)
            tails[name].append(tail)
            diffs[name].append(fwd - times["no copy"][0])
    results: dict[str, dict[str, float]] = {}
    print(f"{'variant':72s} {'forward':>8s} {'slower: mean (95% CI) / median':>32s} {'tail':>6s}  (ms)")
    for name in variants:
        row = {"forward_ms": statistics.median(forwards[name]), "forward_min_ms": min(forwards[name])}
        row["tail_ms"] = statistics.median(tails[name])
        row |= {f"slower_{k}": v for k, v in paired(diffs[name]).items()}
        results[name] = row
        print(
            f"{name:72s} {row['forward_ms']:8.2f} {row['slower_mean_ms']:+7.2f} ({row['slower_ci_low_ms']:+.2f} .. "
            f"{row['slower_ci_high_ms']:+.2f}) / {row['slower_median_ms']:+.2f} {row['tail_ms']:6.2f}",
            flush=True,
        )
    receiving: dict[str, dict[str, float]] = {}
    if peer is not None:

        def push2() -> None:
            with torch.cuda.stream(side):
                for i in range(2):
                    variants["kernel, GPU 1, one program per tile"](i)

        def pull2() -> None:
            with torch.cuda.stream(side):
                for i in range(2):
                    pulled(i)

        receiving = receiver_cost(
            {"push from GPU 0 (2 layers)": push2, "pull by GPU 1 (2 layers)": pull2}, peer, args.iterations
        )
    if args.json:
        gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "gpus": gpus,
                    "tokens": args.tokens,
                    "iterations": args.iterations,
                    "results": results,
                    "diffs": diffs,
                    "receiving_gpu": receiving,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
