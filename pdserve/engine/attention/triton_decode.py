"""Decode attention in Triton: one query token per sequence over its paged context.

One program per (sequence, kv head, split): the GQA group's query heads share every K/V tile it
loads, so each cached byte is read once per step. Long contexts are cut into `num_splits` ranges
(flash-decoding) so a small batch still fills the GPU; a second kernel merges the partial
results. The grid depends only on the batch size, never on the context lengths (those are read
on the device), so a captured CUDA graph stays valid as sequences grow.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pdserve.engine.attention.triton_common import LOG2_E, attend_block, head_block, input_precision

# Keys per tile, warps and pipeline depth (the best of a sweep at the Llama-3-8B shape, batch 32
# and 64 at 1k context: benchmarks/gpu_suite.py --sweep).
BLOCK_N = 64
NUM_WARPS = 4
NUM_STAGES = 3
MAX_SPLITS = 16
# Split a sequence only while batch * kv_heads leaves SMs idle: at batch 32 and more, splitting (and
# the merge pass) cost more than they gained in the sweep.
PROGRAMS_PER_SM = 1


@triton.jit
def _decode_kernel(
    q_ptr,
    cache_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    out_ptr,
    part_acc_ptr,  # [B, H, num_splits, HEAD_DIM] fp32 (SPLIT only)
    part_ml_ptr,  # [B, H, num_splits, 2] fp32: running max and sum (SPLIT only)
    qk_scale,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_bt,
    stride_half,
    stride_block,
    stride_tok,
    num_splits,
    NUM_HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq).to(tl.int32)
    per_split = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * per_split
    end = tl.minimum(start + per_split, seq_len)

    g = tl.arange(0, GROUP_PAD)
    heads = kv_head * GROUP + g  # [GROUP_PAD]
    hmask = g < GROUP
    d = tl.arange(0, BLOCK_D)
    dmask = d < HEAD_DIM
    q_ptrs = q_ptr + seq.to(tl.int64) * stride_qt + heads[:, None] * stride_qh + d[None, :]
    q = tl.load(q_ptrs, mask=hmask[:, None] & dmask[None, :], other=0.0)  # [GROUP_PAD, BLOCK_D]

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, BLOCK_D], tl.float32)
    table_ptr = block_tables_ptr + seq.to(tl.int64) * stride_bt
    head_cache = cache_ptr + kv_head * HEAD_DIM
    for n0 in tl.range(start, end, BLOCK_N):
        acc, m_i, l_i = attend_block(
            acc, m_i, l_i, q, head_cache, table_ptr, n0, end, m_i, d, dmask,
            stride_half, stride_block, stride_tok, qk_scale,
            PAGE, BLOCK_N, True, False, INPUT_PRECISION,
        )  # fmt: skip

    if SPLIT:
        row = ((seq * NUM_HEADS + heads) * num_splits + split).to(tl.int64)  # [GROUP_PAD]
        tl.store(
            part_acc_ptr + row[:, None] * HEAD_DIM + d[None, :], acc, mask=hmask[:, None] & dmask[None, :]
        )
        tl.store(part_ml_ptr + row * 2, m_i, mask=hmask)
        tl.store(part_ml_ptr + row * 2 + 1, l_i, mask=hmask)
    else:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # l_i == 0: an empty (padding) sequence
        o_ptrs = out_ptr + seq.to(tl.int64) * stride_ot + heads[:, None] * stride_oh + d[None, :]
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=hmask[:, None] & dmask[None, :])


@triton.jit
def _merge_kernel(
    part_acc_ptr,
    part_ml_ptr,
    out_ptr,
    stride_ot,
    stride_oh,
    num_splits,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    s = tl.arange(0, SPLITS_PAD)
    smask = s < num_splits
    row = ((seq * NUM_HEADS + head) * num_splits + s).to(tl.int64)  # [SPLITS_PAD]
    m = tl.load(part_ml_ptr + row * 2, mask=smask, other=float("-inf"))
    s_sum = tl.load(part_ml_ptr + row * 2 + 1, mask=smask, other=0.0)
    m_max = tl.max(m, 0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)  # every split empty: a padding sequence
    w = tl.exp2(m - m_max)  # [SPLITS_PAD]; empty splits weigh 0
    denom = tl.sum(w * s_sum, 0)
    d = tl.arange(0, BLOCK_D)
    dmask = d < HEAD_DIM
    acc = tl.load(
        part_acc_ptr + row[:, None] * HEAD_DIM + d[None, :], mask=smask[:, None] & dmask[None, :], other=0.0
    )
    out = tl.sum(acc * w[:, None], 0) / tl.where(denom > 0, denom, 1.0)  # [BLOCK_D]
    o_ptrs = out_ptr + seq.to(tl.int64) * stride_ot + head * stride_oh + d
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=dmask)


def num_splits_for(batch_size: int, num_kv_heads: int, device: torch.device) -> int:
    """Splits per sequence so that batch * kv_heads * splits fills the SMs about PROGRAMS_PER_SM times."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8
    programs = batch_size * num_kv_heads
    return max(1, min(MAX_SPLITS, triton.cdiv(PROGRAMS_PER_SM * sms, programs)))


def decode_attention(
    q: torch.Tensor,  # [B, H, D]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, H_kv, D]
    block_tables: torch.Tensor,  # [B, max_blocks]
    seq_lens: torch.Tensor,  # [B]
    out: torch.Tensor,  # [B, H, D]
    scale: float,
    num_splits: int,
) -> None:
    batch, num_heads, head_dim = q.shape
    _, _, page, num_kv_heads, _ = kv_cache.shape
    group = num_heads // num_kv_heads
    block_d = head_block(head_dim)
    split = num_splits > 1
    if split:
        part_acc = torch.empty((batch, num_heads, num_splits, head_dim), dtype=torch.float32, device=q.device)
        part_ml = torch.empty((batch, num_heads, num_splits, 2), dtype=torch.float32, device=q.device)
    else:
        part_acc = part_ml = out  # unused
    _decode_kernel[(batch, num_kv_heads, num_splits)](
        q, kv_cache, block_tables, seq_lens, out, part_acc, part_ml, scale * LOG2_E,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), num_splits,
        NUM_HEADS=num_heads, GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim, BLOCK_D=block_d, PAGE=page, BLOCK_N=BLOCK_N, SPLIT=split,
        INPUT_PRECISION=input_precision(kv_cache.dtype), num_warps=NUM_WARPS, num_stages=NUM_STAGES,
    )  # fmt: skip
    if split:
        _merge_kernel[(batch, num_heads)](
            part_acc, part_ml, out, out.stride(0), out.stride(1), num_splits,
            NUM_HEADS=num_heads, HEAD_DIM=head_dim, BLOCK_D=block_d,
            SPLITS_PAD=triton.next_power_of_2(num_splits), num_warps=4,
        )  # fmt: skip
