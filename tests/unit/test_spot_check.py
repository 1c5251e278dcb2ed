"""The positions a cuda_ipc fingerprint covers: the same on both sides whatever the chunking, every
block at the default stride, every position at stride 1."""

from __future__ import annotations

import pytest
import torch

from pdserve import envs
from pdserve.kv_transfer.base import slots_for
from pdserve.kv_transfer.spot_check import num_sampled, sample_offset, sampled


def sender_positions(request_id: str, chunks: list[tuple[int, int]], stride: int) -> list[int]:
    """What the prefill side fingerprints: per pushed range [start, end), its sampled positions."""
    offset = sample_offset(request_id, stride)
    out: list[int] = []
    for start, end in chunks:
        out += list(range(start, end))[sampled(start, end - start, stride, offset)]
    return out


@pytest.mark.parametrize("stride", [1, 3, 16])
@pytest.mark.parametrize("chunks", [[(0, 100)], [(16, 60), (60, 100)], [(5, 6), (6, 37), (37, 100)]])
def test_both_sides_sample_the_same_positions(stride: int, chunks: list[tuple[int, int]]) -> None:
    rid = "req-7"
    skip, end = chunks[0][0], chunks[-1][1]
    receiver = list(range(skip, end))[sampled(skip, end - skip, stride, sample_offset(rid, stride))]
    assert sender_positions(rid, chunks, stride) == receiver
    assert all(p % stride == sample_offset(rid, stride) for p in receiver)
    if stride == 1:
        assert receiver == list(range(skip, end))


@pytest.mark.parametrize("stride", [1, 3, 16])
@pytest.mark.parametrize("skip", [0, 5, 16])
def test_a_prompt_samples_a_prefix_of_what_its_whole_block_table_would(stride: int, skip: int) -> None:
    """The decode side stages the positions of its whole reserved table when it reserves, and
    checks the first num_sampled of them once it knows how many tokens the prompt had."""
    offset = sample_offset("req-9", stride)
    capacity = 128
    staged = list(range(skip, capacity))[sampled(skip, capacity - skip, stride, offset)]
    for num_tokens in range(skip + 1, capacity + 1):
        want = list(range(skip, num_tokens))[sampled(skip, num_tokens - skip, stride, offset)]
        assert staged[: num_sampled(skip, num_tokens - skip, stride, offset)] == want


def test_default_stride_checks_every_block_of_a_request() -> None:
    stride, block_size = envs.kv_fingerprint_stride(), 16
    assert stride == 16
    blocks = [9, 3, 14, 0, 7, 12, 5]
    for rid in ("a", "b", "request-12345"):
        slots = slots_for(blocks, block_size, 0, 100)  # the last block is part full
        offset = sample_offset(rid, stride)
        picked = slots[sampled(0, 100, stride, offset)]
        touched = sorted({int(s) // block_size for s in picked})
        full = (100 // block_size) + (1 if 100 % block_size > offset else 0)
        assert touched == sorted(blocks[:full])


def test_offsets_differ_between_requests_and_stay_fixed() -> None:
    offsets = {sample_offset(f"r{i}", 16) for i in range(64)}
    assert len(offsets) > 8  # spread over the block, not one fixed position
    assert sample_offset("r1", 16) == sample_offset("r1", 16)
    with pytest.raises(ValueError):
        sample_offset("r1", 0)


def test_stride_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PDSERVE_KV_FINGERPRINT_STRIDE", "1")
    assert envs.kv_fingerprint_stride() == 1
    monkeypatch.setenv("PDSERVE_KV_FINGERPRINT_STRIDE", "0")
    with pytest.raises(ValueError):
        envs.kv_fingerprint_stride()


def test_slots_for_matches_positions_and_refuses_short_tables() -> None:
    blocks = [5, 2, 7]
    slots = slots_for(blocks, 4, 1, 11)
    assert slots.tolist() == [blocks[p // 4] * 4 + p % 4 for p in range(1, 11)]
    assert slots_for(blocks, 4, 3, 3).numel() == 0
    with pytest.raises(IndexError):
        slots_for(blocks, 4, 0, 13)
    assert torch.equal(
        slots_for(blocks, 4, 0, 12), torch.tensor([20, 21, 22, 23, 8, 9, 10, 11, 28, 29, 30, 31])
    )
