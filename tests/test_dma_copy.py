"""The copy engines' plan (kv_transfer/dma_copy.py): slot runs and the byte ranges they become,
checked by carrying the copies out on host buffers against a slot-by-slot reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pdserve.kv_transfer.base import slots_for
from pdserve.kv_transfer.dma_copy import descriptors, slot_runs


def test_runs_split_where_either_side_jumps() -> None:
    runs = slot_runs(np.array([4, 5, 6, 7, 20, 21, 9]), np.array([100, 101, 50, 51, 52, 53, 54]))
    assert runs.src.tolist() == [4, 6, 20, 9]
    assert runs.dst.tolist() == [100, 50, 52, 54]
    assert runs.length.tolist() == [2, 2, 2, 1]


def test_runs_of_nothing_and_mismatched_lengths() -> None:
    assert len(slot_runs(np.zeros(0, np.int64), np.zeros(0, np.int64)).length) == 0
    with pytest.raises(ValueError, match="destination slots"):
        slot_runs(np.arange(3), np.arange(2))


def test_adjacent_blocks_on_both_sides_make_one_run() -> None:
    block = 16
    src = slots_for([3, 4, 5], block, 5, 40)
    dst = slots_for([10, 11, 12], block, 5, 40)
    runs = slot_runs(src.numpy(), dst.numpy())
    assert runs.length.tolist() == [35]


@pytest.mark.parametrize("start,end", [(0, 64), (5, 61), (16, 17)])
def test_descriptors_move_exactly_the_slots(start: int, end: int) -> None:
    """Both caches [layers][2, blocks, block_size, H, D] live in one host buffer each; carrying out
    the (dst, src, size) triples byte by byte must equal copying slot by slot."""
    rng = np.random.default_rng(start)
    layers, blocks, block, heads, dim = 3, 12, 16, 2, 4
    src_caches = [torch.randn(2, blocks, block, heads, dim) for _ in range(layers)]
    dst_caches = [torch.zeros(2, blocks + 3, block, heads, dim) for _ in range(layers)]
    src_blocks = rng.permutation(blocks)[:4].tolist()
    dst_blocks = rng.permutation(blocks + 3)[:4].tolist()
    src_slots = slots_for(src_blocks, block, start, end)
    dst_slots = slots_for(dst_blocks, block, start, end)
    expected = [c.clone() for c in dst_caches]
    for s, d in zip(src_caches, expected, strict=True):
        d.view(2, -1, heads, dim)[:, dst_slots] = s.view(2, -1, heads, dim)[:, src_slots]

    # Addresses as offsets into one flat byte view per side (layer l at l * its cache's bytes).
    src_flat = np.concatenate([c.numpy().reshape(-1).view(np.uint8) for c in src_caches])
    dst_flat = np.concatenate([c.numpy().reshape(-1).view(np.uint8) for c in dst_caches])
    src_layer, dst_layer = src_caches[0].numel() * 4, dst_caches[0].numel() * 4
    row = heads * dim * 4
    for first, last in [(0, 1), (1, 3)]:  # two pushes: one layer, then two
        dsts, srcs, sizes = descriptors(
            slot_runs(src_slots.numpy(), dst_slots.numpy()),
            np.arange(first, last, dtype=np.uint64) * np.uint64(src_layer),
            np.arange(first, last, dtype=np.uint64) * np.uint64(dst_layer),
            src_caches[0].stride(0) * 4,
            dst_caches[0].stride(0) * 4,
            row,
        )
        assert dsts.dtype == srcs.dtype == sizes.dtype == np.uint64
        for d, s, n in zip(dsts.tolist(), srcs.tolist(), sizes.tolist(), strict=True):
            dst_flat[d : d + n] = src_flat[s : s + n]
    got = dst_flat.view(np.float32).reshape(layers, *dst_caches[0].shape)
    for layer in range(layers):
        assert np.array_equal(got[layer], expected[layer].numpy())
