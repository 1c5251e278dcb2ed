"""fp8 KV cache (`--kv-cache-dtype fp8`): K and V stored as float8 e4m3 (scale 1), read back in the
model's dtype. Attention over it stays close to attention over a full-precision cache; the engine
holds more blocks for the same memory and serves as usual."""

from __future__ import annotations

import pytest
import torch

from pdserve import LLM, SamplingParams
from pdserve.config import CacheConfig
from pdserve.engine.attention.base import AttentionMetadata
from pdserve.engine.attention.torch_ref import TorchRefBackend, store_kv
from pdserve.kv_transfer.codec import dtype_name, torch_dtype


def test_config() -> None:
    assert CacheConfig().resolved_kv_dtype(torch.bfloat16) == torch.bfloat16
    assert CacheConfig(kv_cache_dtype="fp8").resolved_kv_dtype(torch.bfloat16) == torch.float8_e4m3fn
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        CacheConfig(kv_cache_dtype="int4")
    assert torch_dtype(dtype_name(torch.float8_e4m3fn)) == torch.float8_e4m3fn  # KV layouts name it


def test_store_rounds_to_fp8_and_decode_attention_stays_close() -> None:
    torch.manual_seed(0)
    heads, kv_heads, dim, block, blocks = 8, 2, 64, 16, 12
    seq_lens = [37, 100, 5]
    tables = torch.tensor([[0, 1, 2, 0, 0, 0, 0], [3, 4, 5, 6, 7, 8, 9], [10, 0, 0, 0, 0, 0, 0]])
    caches = {
        dt: torch.zeros(2, blocks, block, kv_heads, dim, dtype=dt)
        for dt in (torch.float32, torch.float8_e4m3fn)
    }
    for i, n in enumerate(seq_lens):
        k, v = torch.randn(n, kv_heads, dim), torch.randn(n, kv_heads, dim)
        slots = torch.tensor([int(tables[i, p // block]) * block + p % block for p in range(n)])
        for cache in caches.values():
            store_kv(k, v, cache, slots)
    # the fp8 cache holds the fp32 values rounded to e4m3
    assert torch.equal(
        caches[torch.float8_e4m3fn].float(), caches[torch.float32].to(torch.float8_e4m3fn).float()
    )
    q = torch.randn(len(seq_lens), heads, dim)
    meta = AttentionMetadata.__new__(AttentionMetadata)
    meta.seq_lens, meta.block_tables = seq_lens, tables
    meta.seq_lens_tensor = torch.tensor(seq_lens)
    backend = TorchRefBackend()
    ref = backend._decode(q, caches[torch.float32], meta, dim**-0.5)
    out = backend._decode(q, caches[torch.float8_e4m3fn], meta, dim**-0.5)
    err = float((out - ref).norm() / ref.norm())
    assert 0 < err < 0.06, err  # e4m3 keeps 3 mantissa bits: a few percent, not more


def test_engine_with_fp8_cache_serves_with_more_blocks() -> None:
    prompts = [[5, 9, 17, 33, 2, 8] * 6, [40, 41, 42] * 5]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    common = {"device": "cpu", "dtype": "float32", "kv_cache_memory_gb": 0.001}
    full = LLM("dummy:tiny-llama", **common)
    fp8 = LLM("dummy:tiny-llama", kv_cache_dtype="fp8", **common)
    # the same budget holds 4x the blocks of an fp32 cache
    assert fp8.engine.block_manager.num_blocks == 4 * full.engine.block_manager.num_blocks
    assert fp8.engine.kv_caches[0].dtype == torch.float8_e4m3fn
    a, b = full.generate(prompts, params), fp8.generate(prompts, params)
    for x, y in zip(a, b, strict=True):
        ids_full, ids_fp8 = x.outputs[0].token_ids, y.outputs[0].token_ids
        assert len(ids_fp8) == 12
        # the first token comes from the prefill, which attends to fresh (unrounded) K/V
        assert ids_full[0] == ids_fp8[0]
    assert fp8.engine.block_manager.num_free_blocks == fp8.engine.block_manager.num_blocks


def test_kv_transfer_scatter_and_gather_on_an_fp8_cache() -> None:
    from pdserve.kv_transfer.base import read_kv, slots_for, write_kv

    torch.manual_seed(1)
    caches = [torch.zeros(2, 8, 4, 2, 16, dtype=torch.float8_e4m3fn) for _ in range(3)]
    slots = slots_for([5, 2, 7], 4, 1, 11)  # positions 1..10 over three blocks
    kv = torch.randn(2, 2, 10, 2, 16)  # layers 1-2 of a chunk
    write_kv(caches, 1, slots, kv)
    back = read_kv(caches, 1, 3, slots)
    assert back.dtype == torch.float8_e4m3fn
    assert torch.equal(back.float(), kv.to(torch.float8_e4m3fn).float())
    assert not caches[0].float().any()  # layer 0 untouched
