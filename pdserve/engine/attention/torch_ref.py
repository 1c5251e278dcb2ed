"""Reference attention over the paged cache in plain PyTorch: runs on CPU and GPU, and is the
oracle the GPU kernels are tested against."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pdserve.engine.attention.base import AttentionBackend, AttentionMetadata


def store_kv(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Write this step's K/V into their cache slots. kv_cache: [2, num_blocks, block_size, H_kv, D]."""
    num_kv_heads, head_dim = kv_cache.shape[-2:]
    # One-byte caches (fp8) go through their bits: index_copy_ has no fp8 kernel on every device.
    bits = torch.uint8 if kv_cache.element_size() == 1 else kv_cache.dtype
    for half, x in ((0, k), (1, v)):
        dst = kv_cache[half].view(bits).view(-1, num_kv_heads, head_dim)
        dst.index_copy_(0, slot_mapping, x.to(kv_cache.dtype).view(bits))


def gather_kv(
    kv_cache: torch.Tensor, block_table: torch.Tensor, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence's first `seq_len` cached K and V, each [seq_len, H_kv, D]."""
    block_size = kv_cache.shape[2]
    num_blocks = (seq_len + block_size - 1) // block_size
    ids = block_table[:num_blocks]
    k = kv_cache[0, ids].flatten(0, 1)[:seq_len]
    v = kv_cache[1, ids].flatten(0, 1)[:seq_len]
    return k, v


class TorchRefBackend(AttentionBackend):
    name = "torch"

    def store(
        self, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata
    ) -> None:
        store_kv(k, v, kv_cache, meta.slot_mapping)

    def attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        if meta.decode_only:
            return self._decode(q, kv_cache, meta, scale)
        out = torch.empty_like(q)
        starts = meta.query_start_loc
        for i, seq_len in enumerate(meta.seq_lens):
            s, e = starts[i], starts[i + 1]
            n = e - s
            if n == seq_len and kv_cache.dtype == k.dtype:
                # Nothing cached before this chunk: attend over the fresh K/V, no gather needed.
                # (Not with an fp8 cache: every read goes through its rounding, so that a prompt's
                # output does not depend on how it was chunked, as the Triton kernels do.)
                ks, vs = k[s:e], v[s:e]
            else:
                ks, vs = gather_kv(kv_cache, meta.block_tables[i], seq_len)
            out[s:e] = _causal_attention(q[s:e], ks.to(q.dtype), vs.to(q.dtype), scale)
        return out

    def _decode(
        self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float
    ) -> torch.Tensor:
        # One query per sequence: gather every sequence's blocks at once, mask the padding.
        num_seqs, _, head_dim = q.shape
        num_kv_heads, block_size = kv_cache.shape[-2], kv_cache.shape[2]
        max_blocks = (max(meta.seq_lens) + block_size - 1) // block_size
        table = meta.block_tables[:, :max_blocks].reshape(-1)  # [B * max_blocks]
        length = max_blocks * block_size
        # index_select on the block dim is one contiguous copy per block; SDPA takes the
        # transposed (strided) views as they are.
        keys = kv_cache[0].index_select(0, table).view(num_seqs, length, num_kv_heads, head_dim)
        values = kv_cache[1].index_select(0, table).view(num_seqs, length, num_kv_heads, head_dim)
        pos = torch.arange(length, device=q.device)
        valid = pos[None, :] < meta.seq_lens_tensor[:, None]  # [B, L]
        out = F.scaled_dot_product_attention(
            q.unsqueeze(2),  # [B, H, 1, D]
            keys.transpose(1, 2).to(q.dtype),  # [B, H_kv, L, D]
            values.transpose(1, 2).to(q.dtype),
            attn_mask=valid[:, None, None, :],
            scale=scale,
            enable_gqa=True,
        )  # [B, H, 1, D]
        return out.squeeze(2)


def _causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q: [n, H, D] are the last n positions of a context of len(k) tokens; k, v: [L, H_kv, D]."""
    n, seq_len = q.shape[0], k.shape[0]
    qt, kt, vt = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
    if n == seq_len:
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale, enable_gqa=True)
    else:
        # Query j sits at absolute position seq_len - n + j and sees keys up to it.
        qpos = torch.arange(seq_len - n, seq_len, device=q.device)
        mask = torch.arange(seq_len, device=q.device)[None, :] <= qpos[:, None]  # [n, L]
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale, enable_gqa=True)
    return out.transpose(0, 1)
