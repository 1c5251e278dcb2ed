"""Triton pieces both attention kernels share: the KV-store kernel and the inner step of an
online-softmax attention over one tile of keys read from the paged cache.

Cache layout per layer: [2, num_blocks, block_size, num_kv_heads, head_dim], contiguous. A token
at position n of a sequence lives in block `table[n // PAGE]`, row `n % PAGE`. Offsets are int64:
a large cache passes 2**31 elements per layer.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2_E = 1.4426950408889634


@triton.jit
def _store_kv_kernel(
    k_ptr,
    v_ptr,
    cache_ptr,
    slot_ptr,
    stride_kt,
    stride_vt,
    stride_half,
    ROW: tl.constexpr,  # num_kv_heads * head_dim
    BLOCK: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    if slot >= 0:  # -1: a padding row of a captured decode batch
        offs = tl.arange(0, BLOCK)
        mask = offs < ROW
        k = tl.load(k_ptr + token.to(tl.int64) * stride_kt + offs, mask=mask)
        v = tl.load(v_ptr + token.to(tl.int64) * stride_vt + offs, mask=mask)
        dst = cache_ptr + slot * ROW + offs
        tl.store(dst, k.to(cache_ptr.dtype.element_ty), mask=mask)
        tl.store(dst + stride_half, v.to(cache_ptr.dtype.element_ty), mask=mask)


def _rows_flat(x: torch.Tensor) -> torch.Tensor:
    """x: [T, H_kv, D] with each token's heads back to back (the q/k/v split views are)."""
    if x.stride(2) != 1 or x.stride(1) != x.shape[2]:
        x = x.contiguous()
    return x


def store_kv(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Write k, v [T, H_kv, D] into their slots of kv_cache [2, num_blocks, block_size, H_kv, D];
    negative slots are skipped."""
    num_tokens = k.shape[0]
    if num_tokens == 0:
        return
    k, v = _rows_flat(k), _rows_flat(v)
    row = kv_cache.shape[-2] * kv_cache.shape[-1]
    _store_kv_kernel[(num_tokens,)](
        k, v, kv_cache, slot_mapping, k.stride(0), v.stride(0), kv_cache.stride(0),
        ROW=row, BLOCK=triton.next_power_of_2(row), num_warps=4,
    )  # fmt: skip


@triton.jit
def attend_block(
    acc,  # [M, BLOCK_D] fp32, unnormalised output
    m_i,  # [M] fp32 running max of the scores (log2 domain)
    l_i,  # [M] fp32 running sum of exp2(score - m_i)
    q,  # [M, BLOCK_D]
    cache_ptr,  # this layer's cache, offset to the K half and the kv head
    table_ptr,  # this sequence's block table
    n0,  # first key position of the tile
    limit,  # keys at positions >= limit are masked (when MASKED)
    qpos,  # [M] absolute position of each query row (when CAUSAL)
    d,  # [BLOCK_D] arange
    dmask,  # [BLOCK_D]
    stride_half,
    stride_block,
    stride_tok,
    qk_scale,  # softmax scale * log2(e)
    PAGE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    CAUSAL: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    n = n0 + tl.arange(0, BLOCK_N)
    if MASKED:
        nmask = n < limit
        block = tl.load(table_ptr + n // PAGE, mask=nmask, other=0).to(tl.int64)
        kv_mask = nmask[:, None] & dmask[None, :]
    else:
        block = tl.load(table_ptr + n // PAGE).to(tl.int64)
        kv_mask = dmask[None, :]
    offs = block * stride_block + (n % PAGE).to(tl.int64) * stride_tok  # [BLOCK_N]
    ptrs = cache_ptr + offs[:, None] + d[None, :]  # [BLOCK_N, BLOCK_D]
    k = tl.load(ptrs, mask=kv_mask, other=0.0).to(q.dtype)  # an fp8 cache is read in q's dtype
    s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale  # [M, BLOCK_N]
    if CAUSAL:
        visible = n[None, :] <= qpos[:, None]
        if MASKED:
            visible = visible & nmask[None, :]
        s = tl.where(visible, s, float("-inf"))
    elif MASKED:
        s = tl.where(nmask[None, :], s, float("-inf"))
    # Every row sees at least one key in its first tile, so m_new is finite from then on.
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(ptrs + stride_half, mask=kv_mask, other=0.0).to(q.dtype)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=INPUT_PRECISION)
    return acc, m_new, l_i


def input_precision(dtype: torch.dtype) -> str | None:
    """fp32 caches get exact fp32 dots (tests compare against fp32 references); others the default."""
    return "ieee" if dtype == torch.float32 else None


def head_block(head_dim: int) -> int:
    return max(triton.next_power_of_2(head_dim), 16)
