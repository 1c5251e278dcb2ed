"""Prefill (and chunked-prefill) attention in Triton over the paged cache.

Sequences of any query length share one launch; the query chunk of a sequence is the last
`query_len` positions of its `seq_len`-token context, so an earlier chunk or a prefix-cache hit is
simply read from the cache, the same way as the chunk's own keys (stored just before). One program
per (sequence, tile of BLOCK_M query rows, query head): keys before the tile's first row are seen
by every row (no mask), the rest up to the tile's last row go through the causal mask.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pdserve.engine.attention.triton_common import LOG2_E, attend_block, head_block, input_precision

# The best of a sweep at the Llama-3-8B shape (16 x 512 and 1 x 4096 tokens).
BLOCK_M = 64
BLOCK_N = 64
NUM_WARPS = 4
NUM_STAGES = 3


@triton.jit
def _prefill_kernel(
    q_ptr,
    cache_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    query_start_ptr,
    out_ptr,
    qk_scale,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_bt,
    stride_half,
    stride_block,
    stride_tok,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    tile = tl.program_id(1)
    head = tl.program_id(2)
    q_start = tl.load(query_start_ptr + seq).to(tl.int32)
    q_len = tl.load(query_start_ptr + seq + 1).to(tl.int32) - q_start
    if tile * BLOCK_M < q_len:
        seq_len = tl.load(seq_lens_ptr + seq).to(tl.int32)
        ctx = seq_len - q_len  # positions cached before this chunk
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < q_len
        qpos = ctx + rows  # [BLOCK_M] absolute positions
        d = tl.arange(0, BLOCK_D)
        dmask = d < HEAD_DIM
        tokens = (q_start + rows).to(tl.int64)
        q_ptrs = q_ptr + tokens[:, None] * stride_qt + head * stride_qh + d[None, :]
        q = tl.load(q_ptrs, mask=rmask[:, None] & dmask[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        table_ptr = block_tables_ptr + seq.to(tl.int64) * stride_bt
        head_cache = cache_ptr + (head // GROUP) * HEAD_DIM
        full_end = ((ctx + tile * BLOCK_M) // BLOCK_N) * BLOCK_N
        hi = tl.minimum(ctx + (tile + 1) * BLOCK_M, seq_len)
        for n0 in tl.range(0, full_end, BLOCK_N):
            acc, m_i, l_i = attend_block(
                acc, m_i, l_i, q, head_cache, table_ptr, n0, hi, qpos, d, dmask,
                stride_half, stride_block, stride_tok, qk_scale,
                PAGE, BLOCK_N, False, False, INPUT_PRECISION,
            )  # fmt: skip
        for n0 in tl.range(full_end, hi, BLOCK_N):
            acc, m_i, l_i = attend_block(
                acc, m_i, l_i, q, head_cache, table_ptr, n0, hi, qpos, d, dmask,
                stride_half, stride_block, stride_tok, qk_scale,
                PAGE, BLOCK_N, True, True, INPUT_PRECISION,
            )  # fmt: skip
        out = acc / l_i[:, None]
        o_ptrs = out_ptr + tokens[:, None] * stride_ot + head * stride_oh + d[None, :]
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=rmask[:, None] & dmask[None, :])


def prefill_attention(
    q: torch.Tensor,  # [T, H, D] queries of all sequences, back to back
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, H_kv, D], this step's K/V already stored
    block_tables: torch.Tensor,  # [B, max_blocks]
    seq_lens: torch.Tensor,  # [B] context length including this step's tokens
    query_start: torch.Tensor,  # [B + 1] offsets of each sequence's queries in q
    max_query_len: int,
    out: torch.Tensor,  # [T, H, D]
    scale: float,
) -> None:
    num_heads, head_dim = q.shape[1], q.shape[2]
    _, _, page, num_kv_heads, _ = kv_cache.shape
    batch = seq_lens.shape[0]
    # Tiny query chunks (tests, decode rows in a mixed batch) waste less with a smaller tile.
    block_m = BLOCK_M if max_query_len > 32 else 16
    grid = (batch, triton.cdiv(max_query_len, block_m), num_heads)
    _prefill_kernel[grid](
        q, kv_cache, block_tables, seq_lens, query_start, out, scale * LOG2_E,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2),
        GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim, BLOCK_D=head_block(head_dim), PAGE=page,
        BLOCK_M=block_m, BLOCK_N=BLOCK_N, INPUT_PRECISION=input_precision(kv_cache.dtype),
        num_warps=NUM_WARPS if block_m == BLOCK_M else 4, num_stages=NUM_STAGES,
    )  # fmt: skip
