"""GPU suite, kernels: every Triton kernel against the torch reference on fresh random inputs (relative
error), with its time at the Llama-3-8B shape; optionally a sweep of block-size variants."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from gpu_suite_common import Table, bench_ms, rel_err

from pdserve.engine.attention import triton_decode, triton_prefill
from pdserve.engine.attention.base import AttentionMetadata
from pdserve.engine.attention.torch_ref import TorchRefBackend
from pdserve.engine.attention.torch_ref import store_kv as torch_store_kv
from pdserve.engine.attention.triton import TritonBackend
from pdserve.engine.attention.triton_common import store_kv


@dataclass
class Shape:
    heads: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    block_size: int = 16


def shape_for(dry: bool) -> Shape:
    return Shape(4, 2, 16, torch.float32) if dry else Shape(32, 8, 128, torch.bfloat16)


@dataclass
class Batch:
    q: torch.Tensor  # [T, H, D] (strided view, as the model passes it)
    k: torch.Tensor
    v: torch.Tensor
    cache: torch.Tensor  # [2, num_blocks, block_size, H_kv, D]
    meta: AttentionMetadata
    query_start: torch.Tensor  # [B + 1] int32


def make_batch(ctx_and_query: list[tuple[int, int]], s: Shape, device: torch.device, seed: int) -> Batch:
    rng = random.Random(seed)
    torch.manual_seed(seed)
    seq_lens = [c + n for c, n in ctx_and_query]
    nblocks = [(x + s.block_size - 1) // s.block_size for x in seq_lens]
    ids = list(range(sum(nblocks) + 1))
    rng.shuffle(ids)
    tables, slots, starts = [], [], [0]
    for (c, n), nb in zip(ctx_and_query, nblocks, strict=True):
        table, ids = ids[:nb], ids[nb:]
        tables.append(table + [0] * (max(nblocks) - nb))
        slots += [table[p // s.block_size] * s.block_size + p % s.block_size for p in range(c, c + n)]
        starts.append(starts[-1] + n)
    cache = torch.randn(
        2, sum(nblocks) + 1, s.block_size, s.kv_heads, s.head_dim, device=device, dtype=s.dtype
    )
    qkv = torch.randn(starts[-1], s.heads + 2 * s.kv_heads, s.head_dim, device=device, dtype=s.dtype)
    q, k, v = qkv.split([s.heads, s.kv_heads, s.kv_heads], dim=1)

    def t(x: list[int] | list[list[int]]) -> torch.Tensor:
        return torch.tensor(x, dtype=torch.int64, device=device)

    meta = AttentionMetadata(t(slots), starts, seq_lens, t(tables), t(seq_lens))
    return Batch(q, k, v, cache, meta, torch.tensor(starts, dtype=torch.int32, device=device))


def attention_error(b: Batch) -> float:
    scale = b.q.shape[-1] ** -0.5
    ref = TorchRefBackend().forward(b.q, b.k, b.v, b.cache.clone(), b.meta, scale)
    out = TritonBackend().forward(b.q, b.k, b.v, b.cache.clone(), b.meta, scale)
    return rel_err(out, ref)


def kv_bytes(b: Batch) -> int:
    """Bytes of K and V the batch's attention must read (each cached token once)."""
    per_token = 2 * b.cache.shape[-2] * b.cache.shape[-1] * b.cache.element_size()
    return sum(b.meta.seq_lens) * per_token


def attention_flops(b: Batch) -> float:
    """QK^T and PV multiply-adds over the causally visible keys."""
    heads, dim = b.q.shape[1], b.q.shape[2]
    pairs = sum(
        n * (c + 1) + n * (n - 1) // 2 for c, n in zip(ctx_of(b), b.meta.query_lens, strict=True)
    )  # sum over queries of visible keys
    return 4.0 * heads * dim * pairs


def ctx_of(b: Batch) -> list[int]:
    return [s - n for s, n in zip(b.meta.seq_lens, b.meta.query_lens, strict=True)]


def time_decode(b: Batch, device: torch.device, splits: int | None = None) -> float:
    out = torch.empty_like(b.q)
    num_splits = splits or triton_decode.num_splits_for(b.q.shape[0], b.cache.shape[3], device)
    scale = b.q.shape[-1] ** -0.5
    return bench_ms(
        lambda: triton_decode.decode_attention(
            b.q, b.cache, b.meta.block_tables, b.meta.seq_lens_tensor, out, scale, num_splits
        ),
        device,
    )


def time_prefill(b: Batch, device: torch.device) -> float:
    out = torch.empty_like(b.q)
    scale = b.q.shape[-1] ** -0.5
    max_q = max(b.meta.query_lens)
    return bench_ms(
        lambda: triton_prefill.prefill_attention(
            b.q, b.cache, b.meta.block_tables, b.meta.seq_lens_tensor, b.query_start, max_q, out, scale
        ),
        device,
    )


def check(table: Table, device: torch.device, dry: bool) -> None:
    s = shape_for(dry)
    big = 1 if dry else 8  # context scale

    # KV store: exact, and its time against the reference's index_copy.
    b = make_batch([(0, 512 * big)], s, device, seed=1)
    ref_cache, tri_cache = b.cache.clone(), b.cache.clone()
    torch_store_kv(b.k, b.v, ref_cache, b.meta.slot_mapping)
    store_kv(b.k, b.v, tri_cache, b.meta.slot_mapping)
    exact = torch.equal(ref_cache, tri_cache)
    t_tri = bench_ms(lambda: store_kv(b.k, b.v, tri_cache, b.meta.slot_mapping), device)
    t_ref = bench_ms(lambda: torch_store_kv(b.k, b.v, ref_cache, b.meta.slot_mapping), device)
    table.add("kernel", f"store_kv {b.k.shape[0]} tokens", "exact" if exact else "MISMATCH",
              f"{t_tri * 1e3:.0f} us vs torch {t_ref * 1e3:.0f} us")  # fmt: skip

    # Decode: ragged lengths (1 to 2k), then split counts forced.
    rng = random.Random(2)
    lens = [1, 2, 17, 2048 // (8 // big)] + [rng.randint(1, 256 * big) for _ in range(28)]
    b = make_batch([(n - 1, 1) for n in lens], s, device, seed=3)
    table.add("kernel", "decode 32 seqs, ragged 1..2k", f"rel err {attention_error(b):.1e}", f"{s.dtype}")
    for splits in (1, 7, 16):
        ref = TorchRefBackend().forward(b.q, b.k, b.v, b.cache.clone(), b.meta, 0.1)
        out = torch.full_like(ref, float("nan"))
        cache = b.cache.clone()
        store_kv(b.k, b.v, cache, b.meta.slot_mapping)
        triton_decode.decode_attention(
            b.q, cache, b.meta.block_tables, b.meta.seq_lens_tensor, out, 0.1, splits
        )
        table.add("kernel", f"decode forced {splits} splits", f"rel err {rel_err(out, ref):.1e}")
    for batch in (1, 32, 64):
        b = make_batch([(128 * big - 1, 1)] * batch, s, device, seed=4 + batch)
        t_tri = time_decode(b, device)
        t_ref = bench_ms(
            lambda b=b: TorchRefBackend()._decode(b.q, b.cache, b.meta, 0.1),  # type: ignore[misc]
            device,
        )
        table.add("kernel", f"decode b{batch} ctx {128 * big} (one layer)", f"{t_tri * 1e3:.1f} us",
                  f"{kv_bytes(b) / (t_tri * 1e-3) / 1e9:.0f} GB/s KV; torch ref {t_ref * 1e3:.0f} us",
                  us=t_tri * 1e3)  # fmt: skip

    # Prefill: fresh prompts, a chunk after a long cached prefix, and a mixed batch.
    cases = {
        f"prefill 16x{64 * big} fresh": [(0, 64 * big)] * 16,
        f"prefill 1x{512 * big} fresh": [(0, 512 * big)],
        f"chunk {64 * big} after {448 * big} cached": [(448 * big, 64 * big)],
        "mixed prefill + decode rows": [(0, 33), (100, 1), (64, 200), (7, 1), (300, 5)],
    }
    for name, spec in cases.items():
        b = make_batch(spec, s, device, seed=len(name))
        err = attention_error(b)
        t = time_prefill(b, device)
        table.add("kernel", name, f"rel err {err:.1e}",
                  f"{t * 1e3:.0f} us, {attention_flops(b) / (t * 1e-3) / 1e12:.0f} TFLOP/s (one layer)")  # fmt: skip

    check_copy_kernel(table, s, device)


def check_copy_kernel(table: Table, s: Shape, device: torch.device) -> None:
    from pdserve.kv_transfer.gpu_copy import copy_slots, fingerprint_slots, pointer_table

    layers = 4
    src = [
        torch.randn(2, 64, s.block_size, s.kv_heads, s.head_dim, device=device).to(s.dtype)
        for _ in range(layers)
    ]
    dst = [torch.zeros(2, 80, s.block_size, s.kv_heads, s.head_dim, device=device, dtype=s.dtype) for _ in range(layers)]  # fmt: skip
    n = 64 * s.block_size - 5
    src_slots = torch.randperm(64 * s.block_size, device=device)[:n]
    dst_slots = torch.randperm(80 * s.block_size, device=device)[:n]
    src_table, dst_table = pointer_table(src), pointer_table(dst)
    copy_slots(
        src_table, dst_table, src[0], src[0].stride(0), dst[0].stride(0), 0, layers, src_slots, dst_slots
    )
    row = s.kv_heads * s.head_dim
    same = all(
        torch.equal(a.view(2, -1, row)[:, src_slots], c.view(2, -1, row)[:, dst_slots])
        for a, c in zip(src, dst, strict=True)
    )
    sent = int(fingerprint_slots(src_table, src[0], 0, layers, src_slots))
    landed = int(fingerprint_slots(dst_table, dst[0], 0, layers, dst_slots))
    bits = {2: torch.int16, 4: torch.int32}[src[0].element_size()]
    expected = sum(int(a.view(2, -1, row)[:, src_slots].view(bits).sum(dtype=torch.int64)) for a in src)
    fp_ok = sent == landed == expected
    table.add("kernel", "cuda_ipc slot copy (in process)", "exact" if same and fp_ok else "MISMATCH",
              f"fingerprint {'matches' if fp_ok else 'DIFFERS'}")  # fmt: skip
    # Its speed on a 4096-token KV of every layer of the shape (32 layers at the Llama shape).
    layers, blocks = (32, 4096 // s.block_size) if device.type == "cuda" else (2, 8)
    src = [
        torch.randn(2, blocks, s.block_size, s.kv_heads, s.head_dim, device=device).to(s.dtype)
        for _ in range(layers)
    ]
    dst = [torch.empty_like(x) for x in src]
    n = blocks * s.block_size
    src_slots = torch.randperm(n, device=device)
    dst_slots = torch.randperm(n, device=device)
    tables = pointer_table(src), pointer_table(dst)
    nbytes = sum(x.numel() * x.element_size() for x in src)
    ms = bench_ms(lambda: copy_slots(*tables, src[0], src[0].stride(0), dst[0].stride(0), 0, layers,
                                     src_slots, dst_slots), device)  # fmt: skip
    fp_ms = bench_ms(lambda: fingerprint_slots(tables[0], src[0], 0, layers, src_slots), device)
    table.add("kernel", f"slot copy {nbytes / 2**20:.0f} MiB, one launch", f"{nbytes / (ms * 1e-3) / 1e9:.0f} GB/s",
              f"{ms * 1e3:.0f} us, payload rate (bytes moved once); fingerprint pass {fp_ms * 1e3:.0f} us")  # fmt: skip


def sweep(table: Table, device: torch.device, dry: bool) -> None:
    """Time block-size variants of both kernels at the Llama shape (the defaults are the winners)."""
    s = shape_for(dry)
    ctx = 1024 if not dry else 64
    defaults = (triton_decode.BLOCK_N, triton_decode.NUM_WARPS, triton_decode.NUM_STAGES)
    for batch in (32, 64):
        b = make_batch([(ctx - 1, 1)] * batch, s, device, seed=batch)
        for block_n, warps, stages in [
            (64, 4, 2),
            (64, 4, 3),
            (128, 4, 2),
            (128, 8, 3),
            (32, 4, 3),
            (64, 8, 2),
        ]:
            triton_decode.BLOCK_N, triton_decode.NUM_WARPS, triton_decode.NUM_STAGES = block_n, warps, stages
            for splits in (None, 1, 2, 4):
                t = time_decode(b, device, splits)
                table.add("sweep", f"decode b{batch} n{block_n} w{warps} s{stages} sp{splits or 'auto'}",
                          f"{t * 1e3:.1f} us", f"{kv_bytes(b) / (t * 1e-3) / 1e9:.0f} GB/s")  # fmt: skip
    triton_decode.BLOCK_N, triton_decode.NUM_WARPS, triton_decode.NUM_STAGES = defaults

    pdefaults = (
        triton_prefill.BLOCK_M,
        triton_prefill.BLOCK_N,
        triton_prefill.NUM_WARPS,
        triton_prefill.NUM_STAGES,
    )
    big = 8 if not dry else 1
    for name, spec in {"16x512": [(0, 64 * big)] * 16, "1x4096": [(0, 512 * big)]}.items():
        b = make_batch(spec, s, device, seed=7)
        for cfg in [(128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (128, 64, 4, 3), (128, 32, 4, 4)]:
            (
                triton_prefill.BLOCK_M,
                triton_prefill.BLOCK_N,
                triton_prefill.NUM_WARPS,
                triton_prefill.NUM_STAGES,
            ) = cfg
            try:
                t = time_prefill(b, device)
                note = f"{attention_flops(b) / (t * 1e-3) / 1e12:.0f} TFLOP/s"
                value = f"{t * 1e3:.0f} us"
            except Exception as e:  # a variant that does not fit (shared memory) is just skipped
                value, note = "n/a", type(e).__name__
            table.add("sweep", f"prefill {name} m{cfg[0]} n{cfg[1]} w{cfg[2]} s{cfg[3]}", value, note)
    triton_prefill.BLOCK_M, triton_prefill.BLOCK_N, triton_prefill.NUM_WARPS, triton_prefill.NUM_STAGES = (
        pdefaults
    )
