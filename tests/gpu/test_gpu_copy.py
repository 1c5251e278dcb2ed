"""The cuda_ipc copy and fingerprint kernels against torch indexing, on fresh random caches and
scattered slots: every program count (one per tile, a few walking strides of tiles, one for all)
copies exactly the requested layers and slots and nothing else."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")  # the kernels' compiler: on GPU machines (and the interpreter's CPU runs)

from pdserve.kv_transfer.gpu_copy import copy_slots, fingerprint_slots, pointer_table

pytestmark = pytest.mark.gpu

BLOCKS, BLOCK_SIZE, HEADS, DIM, LAYERS = 24, 16, 2, 64, 4


def caches(device: torch.device, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(2, BLOCKS, BLOCK_SIZE, HEADS, DIM, generator=g).to(torch.bfloat16).to(device)
        for _ in range(LAYERS)
    ]


@pytest.mark.parametrize("max_programs", [0, 1, 3, 64])
@pytest.mark.parametrize("num_tokens", [1, 37, 200])
def test_copy_slots_moves_exactly_the_slots(device: torch.device, max_programs: int, num_tokens: int) -> None:
    src, dst = caches(device, 1), caches(device, 2)
    before = [d.clone() for d in dst]
    g = torch.Generator().manual_seed(num_tokens)
    slots = BLOCKS * BLOCK_SIZE
    src_slots = torch.randperm(slots, generator=g)[:num_tokens].to(device)
    dst_slots = torch.randperm(slots, generator=g)[:num_tokens].to(device)
    copy_slots(
        pointer_table(src), pointer_table(dst), src[0], src[0].stride(0), dst[0].stride(0),
        1, 3, src_slots, dst_slots, max_programs,
    )  # fmt: skip
    for layer in range(LAYERS):
        expected = before[layer].clone().view(2, slots, HEADS, DIM)
        if 1 <= layer < 3:
            expected[:, dst_slots] = src[layer].view(2, slots, HEADS, DIM)[:, src_slots]
        assert torch.equal(dst[layer].view(2, slots, HEADS, DIM), expected), f"layer {layer}"


@pytest.mark.parametrize("num_tokens", [5, 200])
def test_fingerprint_is_the_bit_sum_of_the_slots(device: torch.device, num_tokens: int) -> None:
    src = caches(device, 3)
    slots = torch.randperm(BLOCKS * BLOCK_SIZE, generator=torch.Generator().manual_seed(7))[:num_tokens]
    found = fingerprint_slots(pointer_table(src), src[0], 0, LAYERS, slots.to(device))
    expected = sum(
        int(c.view(2, -1, HEADS * DIM)[:, slots.to(device)].view(torch.int16).to(torch.int64).sum())
        for c in src
    )
    assert int(found) == expected
