"""Test helpers: tiny random-weight Hugging Face models, and a single-sequence paged-cache harness
that runs our CausalLM before (and without) the real engine."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    Qwen2Config,
    Qwen3Config,
)

from pdserve.engine.attention.base import AttentionMetadata, ForwardContext, get_backend
from pdserve.engine.model import CausalLM, ModelArch

TINY_KINDS = ("llama", "llama3-rope", "qwen2", "qwen3", "mistral")

_COMMON: dict[str, Any] = {
    "vocab_size": 300,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def _rope(theta: float, scaling: dict[str, Any] | None = None) -> dict[str, Any]:
    # The pre-v5 keyword names: transformers 5 still accepts them and 4.x knows no others.
    return {"rope_theta": theta, "rope_scaling": scaling}


def tiny_hf_config(kind: str) -> PretrainedConfig:
    if kind == "llama":  # SmolLM2-like: tied embeddings
        return LlamaConfig(**_COMMON, tie_word_embeddings=True, **_rope(100000.0))
    if kind == "llama3-rope":
        # original_max_position_embeddings=64 puts the head's 8 frequencies in all three llama3 bands.
        rope = {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        }
        return LlamaConfig(**_COMMON, **_rope(500000.0, rope))
    if kind == "qwen2":
        return Qwen2Config(**_COMMON, rms_norm_eps=1e-6)
    if kind == "qwen3":  # head_dim 32 != hidden / heads
        return Qwen3Config(**_COMMON, head_dim=32, rms_norm_eps=1e-6)
    if kind == "mistral":
        return MistralConfig(**_COMMON, sliding_window=None)
    raise ValueError(f"unknown tiny kind {kind!r}; choose from {TINY_KINDS}")


def make_tiny_hf_model(kind: str, tmp_path: Path, seed: int = 0) -> Path:
    """Save a seeded random fp32 model of `kind` (safetensors) into tmp_path/kind and return the dir.

    Every parameter is randomized, biases and norm weights included, so a weight that lands in
    the wrong place changes the logits."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_hf_config(kind), dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            else:
                param.normal_(0.0, 0.05)
    out = tmp_path / kind
    model.save_pretrained(out)
    return out


class PagedRunner:
    """One sequence through our CausalLM over a paged KV cache, with the torch attention backend.

    Blocks are handed out in `block_order` (identity by default); a shuffled order checks that
    the model and backend honor the block table."""

    def __init__(
        self,
        model: CausalLM,
        block_size: int = 4,
        num_blocks: int = 64,
        block_order: list[int] | None = None,
    ) -> None:
        arch: ModelArch = model.arch
        param = next(model.parameters())
        self.model = model
        self.device = param.device
        self.block_size = block_size
        # one [2, num_blocks, block_size, kv_heads, head_dim] cache per layer
        self.kv_caches = [
            torch.zeros(
                2,
                num_blocks,
                block_size,
                arch.num_kv_heads,
                arch.head_dim,
                dtype=param.dtype,
                device=self.device,
            )
            for _ in range(arch.num_layers)
        ]
        order = block_order if block_order is not None else list(range(num_blocks))
        self.block_table = torch.tensor([order], dtype=torch.int32, device=self.device)  # [1, num_blocks]
        self.backend = get_backend("torch")
        self.num_cached = 0  # tokens whose K/V are in the cache

    @torch.no_grad()
    def step(self, token_ids: list[int]) -> torch.Tensor:
        """Run `token_ids` as the next tokens of the sequence; returns their logits [n, vocab] fp32."""
        n = len(token_ids)
        start, seq_len = self.num_cached, self.num_cached + n
        positions = torch.arange(start, seq_len, device=self.device)  # [n]
        blocks = self.block_table[0, positions // self.block_size].long()
        meta = AttentionMetadata(
            slot_mapping=blocks * self.block_size + positions % self.block_size,
            query_start_loc=[0, n],
            seq_lens=[seq_len],
            block_tables=self.block_table,
            seq_lens_tensor=torch.tensor([seq_len], dtype=torch.int32, device=self.device),
        )
        ctx = ForwardContext(backend=self.backend, meta=meta, kv_caches=self.kv_caches)
        ids = torch.tensor(token_ids, dtype=torch.int64, device=self.device)
        hidden = self.model(ids, positions, ctx)  # [n, hidden]
        self.num_cached = seq_len
        return self.model.compute_logits(hidden)

    def prefill(self, prompt: list[int], chunk_size: int | None = None) -> torch.Tensor:
        """Logits [len(prompt), vocab] for the whole prompt, run in chunks of `chunk_size` tokens."""
        size = chunk_size or len(prompt)
        return torch.cat([self.step(prompt[i : i + size]) for i in range(0, len(prompt), size)])

    def generate_greedy(
        self, prompt: list[int], max_new_tokens: int, chunk_size: int | None = None
    ) -> list[int]:
        """Greedy ids after `prompt`: prefill (optionally chunked), then one decode step per token."""
        logits = self.prefill(prompt, chunk_size)[-1]
        out: list[int] = []
        for _ in range(max_new_tokens):
            out.append(int(logits.argmax()))
            if len(out) < max_new_tokens:
                logits = self.step([out[-1]])[-1]
        return out
