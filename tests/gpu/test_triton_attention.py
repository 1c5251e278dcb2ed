"""Triton attention kernels against the torch reference backend, on fresh random inputs: the store
kernel, decode (with and without split-K), and prefill with cached prefixes in one launch."""

from __future__ import annotations

import random

import pytest
import torch

from pdserve.engine.attention.base import AttentionMetadata
from pdserve.engine.attention.torch_ref import TorchRefBackend

pytestmark = pytest.mark.gpu


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out64, ref64 = out.double(), ref.double()
    return float((out64 - ref64).norm() / ref64.norm())


def tolerance(dtype: torch.dtype) -> float:
    return 1e-5 if dtype == torch.float32 else 2e-2


def check_dtype(device: torch.device, dtype: torch.dtype) -> None:
    if device.type == "cpu" and dtype == torch.bfloat16:
        pytest.skip("Triton's interpreter computes bf16 dots wrongly; bf16 runs on the GPU")


def make_batch(
    ctx_and_query: list[tuple[int, int]],  # (tokens cached before this step, tokens this step) per sequence
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata]:
    """Random q/k/v, a random full cache, and metadata with shuffled block tables."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    seq_lens = [c + n for c, n in ctx_and_query]
    blocks_per_seq = [(s + block_size - 1) // block_size for s in seq_lens]
    num_blocks = sum(blocks_per_seq) + 3
    ids = list(range(num_blocks))
    rng.shuffle(ids)
    tables, slots, starts = [], [], [0]
    for (ctx, n), nb in zip(ctx_and_query, blocks_per_seq, strict=True):
        table, ids = ids[:nb], ids[nb:]
        tables.append(table)
        slots += [table[p // block_size] * block_size + p % block_size for p in range(ctx, ctx + n)]
        starts.append(starts[-1] + n)
    width = max(blocks_per_seq)
    padded = [t + [0] * (width - len(t)) for t in tables]
    cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, device=device).to(dtype)
    num_tokens = starts[-1]
    qkv = torch.randn(num_tokens, num_heads + 2 * num_kv_heads, head_dim, device=device).to(dtype)
    # Strided views, as the model hands them over.
    q, k, v = qkv.split([num_heads, num_kv_heads, num_kv_heads], dim=1)

    def t(x: list[int] | list[list[int]]) -> torch.Tensor:
        return torch.tensor(x, dtype=torch.int64, device=device)

    meta = AttentionMetadata(t(slots), starts, seq_lens, t(padded), t(seq_lens))
    return q, k, v, cache, meta


def run_both(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: torch.Tensor, meta: AttentionMetadata
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from pdserve.engine.attention.triton import TritonBackend

    scale = q.shape[-1] ** -0.5
    ref_cache, tri_cache = cache.clone(), cache.clone()
    ref = TorchRefBackend().forward(q, k, v, ref_cache, meta, scale)
    out = TritonBackend().forward(q, k, v, tri_cache, meta, scale)
    return out, ref, tri_cache, ref_cache


def shapes(device: torch.device) -> list[tuple[int, int, int]]:
    """(num_heads, num_kv_heads, head_dim): small under the interpreter, model-sized on a GPU."""
    if device.type == "cpu":
        return [(4, 2, 16), (4, 4, 32)]
    return [(32, 8, 128), (8, 8, 64), (28, 4, 128), (4, 2, 80)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_store_kv(device: torch.device, dtype: torch.dtype) -> None:
    from pdserve.engine.attention.triton_common import store_kv

    q, k, v, cache, meta = make_batch([(0, 9), (5, 3), (17, 1)], 4, 2, 32, 4, dtype, device, seed=1)
    ref_cache, tri_cache = cache.clone(), cache.clone()
    TorchRefBackend().forward(q, k, v, ref_cache, meta, 1.0)
    store_kv(k, v, tri_cache, meta.slot_mapping)
    assert torch.equal(tri_cache, ref_cache)
    # A negative slot (a padded row of a captured batch) writes nothing.
    before = tri_cache.clone()
    store_kv(k[:2], v[:2], tri_cache, torch.full((2,), -1, dtype=torch.int64, device=device))
    assert torch.equal(tri_cache, before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size", [16, 8])
def test_decode_matches_reference(device: torch.device, dtype: torch.dtype, block_size: int) -> None:
    check_dtype(device, dtype)
    long = 1500 if device.type == "cuda" else 150
    for num_heads, num_kv_heads, head_dim in shapes(device):
        lens = [1, 2, 63, 64, 65, long, 7]
        q, k, v, cache, meta = make_batch(
            [(n - 1, 1) for n in lens], num_heads, num_kv_heads, head_dim, block_size, dtype, device,
            seed=head_dim + block_size,
        )  # fmt: skip
        out, ref, tri_cache, ref_cache = run_both(q, k, v, cache, meta)
        assert torch.equal(tri_cache, ref_cache)
        assert rel_err(out, ref) < tolerance(dtype), (num_heads, num_kv_heads, head_dim)


@pytest.mark.parametrize("num_splits", [1, 3, 16])
def test_decode_split_counts(device: torch.device, num_splits: int) -> None:
    from pdserve.engine.attention import triton_decode

    q, k, v, cache, meta = make_batch(
        [(n - 1, 1) for n in (1, 40, 200, 333)], 8, 2, 32, 16, torch.float32, device, seed=num_splits
    )
    TorchRefBackend().forward(q, k, v, cache, meta, 0.2)
    ref = TorchRefBackend().forward(q, k, v, cache.clone(), meta, 0.2)
    out = torch.full_like(ref, float("nan"))  # poisoned: every element must be written
    triton_decode.decode_attention(q, cache, meta.block_tables, meta.seq_lens_tensor, out, 0.2, num_splits)
    assert rel_err(out, ref) < 1e-5


def test_decode_padding_rows_are_finite(device: torch.device) -> None:
    """A captured batch pads with seq_len 0 rows: they must not produce NaN (nor touch the cache)."""
    from pdserve.engine.attention import triton_decode

    q, _, _, cache, meta = make_batch([(9, 1), (0, 1)], 4, 2, 16, 4, torch.float32, device, seed=3)
    seq_lens = torch.tensor([10, 0], device=device)
    for splits in (1, 4):
        out = torch.full_like(q, float("nan"))
        triton_decode.decode_attention(q, cache, meta.block_tables, seq_lens, out, 0.25, splits)
        assert torch.isfinite(out).all() and (out[1] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_with_cached_prefix_matches_reference(device: torch.device, dtype: torch.dtype) -> None:
    check_dtype(device, dtype)
    big = device.type == "cuda"
    batches = [
        [(0, 300 if big else 40)],  # one fresh prompt
        [(0, 17), (32, 45), (5, 1), (0, 1), (70, 130 if big else 20)],  # fresh, chunked, decode rows
        [(500 if big else 50, 700 if big else 30), (3, 200 if big else 9)],  # long cached prefixes
    ]
    for num_heads, num_kv_heads, head_dim in shapes(device):
        for i, batch in enumerate(batches):
            q, k, v, cache, meta = make_batch(
                batch, num_heads, num_kv_heads, head_dim, 16, dtype, device, seed=10 * i + head_dim
            )
            out, ref, tri_cache, ref_cache = run_both(q, k, v, cache, meta)
            assert torch.equal(tri_cache, ref_cache)
            assert rel_err(out, ref) < tolerance(dtype), (batch, num_heads, num_kv_heads, head_dim)


def test_fp8_cache_store_and_decode_match_reference(device: torch.device) -> None:
    """An fp8 (e4m3) cache: the store kernel rounds like the reference, and decode and chunked
    prefill read it back in q's dtype as the reference does."""
    if device.type != "cuda":
        pytest.skip("fp8 conversions need a GPU (sm_89+)")
    for ctx_and_query in ([(n - 1, 1) for n in (1, 64, 65, 1500)], [(0, 40), (300, 17)]):
        q, k, v, cache, meta = make_batch(ctx_and_query, 32, 8, 128, 16, torch.bfloat16, device, seed=5)
        fp8 = cache.to(torch.float8_e4m3fn)
        out, ref, tri_cache, ref_cache = run_both(q, k, v, fp8, meta)
        assert torch.equal(tri_cache.view(torch.uint8), ref_cache.view(torch.uint8))
        assert rel_err(out, ref) < tolerance(torch.bfloat16)
