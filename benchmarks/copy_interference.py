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
  1): the best case a DMA path could reach, since real destinations are scattered blocks.

Reported per variant: the forward's time (the median over `--rounds` of `--repeats` each, variants interleaved; CUDA events), how much
longer than without copies, and how long after the forward the last copy ends (what a request
waits for its KV beyond its prefill).

    python benchmarks/copy_interference.py --programs 0 64 16 4 --json results/copy_interference.json
"""

from __future__ import annotations

import argparse
import json
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
    prefill: Prefill, copy: Any, side: torch.cuda.Stream, repeats: int
) -> tuple[list[float], list[float]]:
    """Forward times and the copies' tail after each (ms)."""
    main = torch.cuda.current_stream(prefill.device)
    forwards: list[float] = []
    tails: list[float] = []
    for r in range(repeats + 1):  # the first warms up (allocator, kernels' compilation)
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
        if r >= 1:
            forwards.append(start.elapsed_time(end))
            tails.append(start.elapsed_time(copied) - start.elapsed_time(end))
    return forwards, tails


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--programs", type=int, nargs="+", default=[0, 64, 16, 4])
    ap.add_argument("--repeats", type=int, default=5, help="forwards per variant and round")
    ap.add_argument("--rounds", type=int, default=4)
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

    # Rounds of every variant in turn, so clocks and temperature drift over all of them alike.
    forwards: dict[str, list[float]] = {name: [] for name in variants}
    tails: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, copy in variants.items():
            f, t = timed(prefill, copy, side, args.repeats)
            forwards[name] += f
            tails[name] += t
    results: dict[str, dict[str, float]] = {}
    base = statistics.median(forwards["no copy"])
    print(f"{'variant':55s} {'forward ms':>10s} {'slower ms':>10s} {'tail ms':>8s}")
    for name in variants:
        fwd = statistics.median(forwards[name])
        row = {"forward_ms": fwd, "slower_ms": fwd - base, "tail_ms": statistics.median(tails[name])}
        row["forward_min_ms"] = min(forwards[name])
        results[name] = row
        print(f"{name:55s} {fwd:10.2f} {fwd - base:10.2f} {row['tail_ms']:8.2f}", flush=True)
    if args.json:
        gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"gpus": gpus, "tokens": args.tokens, "results": results}, indent=2))


if __name__ == "__main__":
    main()
