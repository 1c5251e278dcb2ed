"""Triton attention backend (GPU): stores each step's K/V with one kernel, then runs the decode
kernel for decode-only batches (the shape CUDA graphs capture) and the prefill kernel for
anything else (prompts, chunks with a cached prefix, mixed prefill + decode batches)."""

from __future__ import annotations

import torch

from pdserve.engine.attention.base import AttentionBackend, AttentionMetadata
from pdserve.engine.attention.triton_common import store_kv
from pdserve.engine.attention.triton_decode import decode_attention, num_splits_for
from pdserve.engine.attention.triton_prefill import prefill_attention


class TritonBackend(AttentionBackend):
    name = "triton"

    def __init__(self) -> None:
        # Per-step device copy of query_start_loc, made once and reused by every layer.
        self._meta: AttentionMetadata | None = None
        self._query_start: torch.Tensor | None = None
        self._num_splits: dict[tuple[int, int], int] = {}

    def store(
        self, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata
    ) -> None:
        # An fp8 cache is stored by casting and read back in the queries' dtype by the kernels.
        cache_dtype_ok = kv_cache.dtype in (k.dtype, torch.float8_e4m3fn)
        if not kv_cache.is_contiguous() or not cache_dtype_ok:
            raise ValueError("triton attention needs a contiguous cache in the query dtype or fp8 (e4m3)")
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
        if q.stride(2) != 1:
            raise ValueError("triton attention needs queries contiguous in their last dimension")
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # [T, H, D]
        if meta.decode_only:
            decode_attention(
                q, kv_cache, meta.block_tables, meta.seq_lens_tensor, out, scale,
                self.num_splits(q.shape[0], kv_cache.shape[3], q.device),
            )  # fmt: skip
        else:
            prefill_attention(
                q, kv_cache, meta.block_tables, meta.seq_lens_tensor, self._query_start_of(meta),
                max(meta.query_lens), out, scale,
            )  # fmt: skip
        return out

    def num_splits(self, batch_size: int, num_kv_heads: int, device: torch.device) -> int:
        key = (batch_size, num_kv_heads)
        if key not in self._num_splits:
            self._num_splits[key] = num_splits_for(batch_size, num_kv_heads, device)
        return self._num_splits[key]

    def _query_start_of(self, meta: AttentionMetadata) -> torch.Tensor:
        if meta is not self._meta or self._query_start is None:
            self._meta = meta
            self._query_start = torch.tensor(
                meta.query_start_loc, dtype=torch.int32, device=meta.seq_lens_tensor.device
            )
        return self._query_start
