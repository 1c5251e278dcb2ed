"""Attention-backend interface over the paged KV cache.

A backend does two things per layer: store this step's keys/values into their cache
slots, then attend each query token over its sequence's cached context. The model
never sees requests; it sees only this metadata.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    # [num_tokens] flat cache slot (block_id * block_size + offset) of each new token
    slot_mapping: torch.Tensor
    # [num_seqs + 1] host offsets of each sequence's query tokens in the flat batch
    query_start_loc: list[int]
    # [num_seqs] host context length of each sequence *including* this step's tokens
    seq_lens: list[int]
    # [num_seqs, max_blocks_per_seq] block ids, padded with 0
    block_tables: torch.Tensor
    # [num_seqs] device copy of seq_lens (for kernels that mask on device)
    seq_lens_tensor: torch.Tensor

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)

    @property
    def query_lens(self) -> list[int]:
        q = self.query_start_loc
        return [q[i + 1] - q[i] for i in range(len(q) - 1)]

    @property
    def decode_only(self) -> bool:
        return self.query_start_loc[-1] == self.num_seqs


class AttentionBackend(ABC):
    """Stores new K/V into the paged cache and computes attention for a flat token batch."""

    name: str = "base"

    @abstractmethod
    def store(
        self,
        k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
        meta: AttentionMetadata,
    ) -> None:
        """Write this step's keys/values into their cache slots."""

    @abstractmethod
    def attention(
        self,
        q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim] (already stored)
        v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        """Attend each query over its sequence's cached context (this step's K/V stored)."""

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        self.store(k, v, kv_cache, meta)
        return self.attention(q, k, v, kv_cache, meta, scale)


@dataclass
class ForwardContext:
    """What one model forward needs besides token ids and positions."""

    backend: AttentionBackend
    meta: AttentionMetadata
    kv_caches: list[torch.Tensor]  # one [2, num_blocks, block_size, num_kv_heads, head_dim] per layer
    # Called with the layer index once that layer's K/V are in the cache, before its attention is
    # queued: a streaming prefill worker ships them from here, the earliest point they are
    # complete, so the last layer's copy runs beside that layer's attention and MLP instead of
    # trailing the forward.
    layer_hook: Callable[[int], None] | None = None

    def attend(
        self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
    ) -> torch.Tensor:
        cache = self.kv_caches[layer_idx]
        self.backend.store(k, v, cache, self.meta)
        if self.layer_hook is not None:
            self.layer_hook(layer_idx)
        return self.backend.attention(q, k, v, cache, self.meta, scale)


def get_backend(name: str) -> AttentionBackend:
    """Backends import lazily: the Triton one needs a GPU and triton installed."""
    if name in ("torch", "torch_ref"):
        from pdserve.engine.attention.torch_ref import TorchRefBackend

        return TorchRefBackend()
    if name == "triton":
        from pdserve.engine.attention.triton import TritonBackend  # type: ignore[import-not-found]

        return TritonBackend()  # type: ignore[no-any-return]
    raise ValueError(f"unknown attention backend {name!r} (choose: torch, triton)")
