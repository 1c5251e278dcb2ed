"""The nixl transport's descriptors: each (layer, K or V, run of consecutive destination slots)
becomes one write from the staged chunk to the right bytes of the decode worker's cache. Checked by
carrying the writes out with numpy on two flat byte arrays (no NIXL needed); the transport itself
is exercised end to end in test_kv_transfer.py where the nixl package is installed."""

from __future__ import annotations

import numpy as np
import torch

from pdserve.kv_transfer.base import read_kv, slots_for
from pdserve.kv_transfer.nixl import slot_runs, write_descriptors


def test_slot_runs_split_where_slots_jump() -> None:
    starts, lengths, first = slot_runs(np.array([8, 9, 10, 11, 4, 5, 20, 21, 22]))
    assert starts.tolist() == [0, 4, 6] and lengths.tolist() == [4, 2, 3] and first.tolist() == [8, 4, 20]
    starts, lengths, first = slot_runs(np.array([7]))
    assert (starts.tolist(), lengths.tolist(), first.tolist()) == ([0], [1], [7])


def test_descriptors_write_each_token_where_it_belongs() -> None:
    layers, blocks, block_size, heads, dim = 4, 6, 4, 2, 3
    caches = [torch.zeros(2, blocks, block_size, heads, dim) for _ in range(layers)]
    row = heads * dim * 4  # float32 bytes per token per layer half
    # Address space: the caches one after another from 0, the staging buffer after them.
    cache_bytes = caches[0].numel() * 4
    regions = [[i * cache_bytes, cache_bytes // 2, 0] for i in range(layers)]
    staging_addr = layers * cache_bytes
    block_table, start, end, layer_start, num_layers = [5, 1, 3], 2, 11, 1, 2
    kv = torch.randn(num_layers, 2, end - start, heads, dim)  # the staged chunk
    dst = slots_for(block_table, block_size, start, end).numpy()
    local, remote = write_descriptors(
        staging_addr, 0, regions, layer_start, num_layers, end - start, row, dst
    )
    assert len(local) == len(remote) == num_layers * 2 * 3  # three runs: blocks 5, 1, 3
    memory = np.zeros(staging_addr + kv.numel() * 4, dtype=np.uint8)
    memory[staging_addr:] = kv.numpy().view(np.uint8).ravel()
    for (src, size, _), (dst_addr, dst_size, device) in zip(local, remote, strict=True):
        assert size == dst_size and device == 0
        memory[dst_addr : dst_addr + size] = memory[src : src + size]
    for i, cache in enumerate(caches):
        cache.view(-1).view(torch.uint8).copy_(
            torch.from_numpy(memory[i * cache_bytes : (i + 1) * cache_bytes])
        )
    got = read_kv(
        caches, layer_start, layer_start + num_layers, slots_for(block_table, block_size, start, end)
    )
    assert torch.equal(got, kv)
    others = [c for i, c in enumerate(caches) if not layer_start <= i < layer_start + num_layers]
    assert all(c.abs().sum() == 0 for c in others)
