"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, Qwen3, SmolLM2) over the paged KV cache.

Tokens of every sequence in a step arrive flattened into one batch `[T]`; the layers never see
requests, only `positions` (for RoPE) and a `ForwardContext` whose `attend` stores K/V in the
paged cache and attends over each sequence's context. q/k/v and gate/up are fused into one
linear each (fewer, larger matmuls per layer); `load_weights` maps Hugging Face names onto them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pdserve.engine.attention.base import ForwardContext
from pdserve.engine.model_ops import Rope, add_rms_norm, rope_cache, silu_mul

# Hugging Face `architectures[0]` → what differs between them for this decoder.
_ARCHITECTURES: dict[str, dict[str, bool]] = {
    "LlamaForCausalLM": {"attention_bias": False, "qk_norm": False},
    "MistralForCausalLM": {"attention_bias": False, "qk_norm": False},
    "Qwen2ForCausalLM": {"attention_bias": True, "qk_norm": False},  # bias on q/k/v only
    "Qwen3ForCausalLM": {"attention_bias": False, "qk_norm": True},
}
_MODEL_TYPES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class ModelArch:
    """Everything the engine needs to know about the architecture (hashable, immutable)."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    # sorted (key, value) items of the HF rope-scaling dict, None for plain RoPE
    rope_scaling: tuple[tuple[str, Any], ...] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # bias on q/k/v (Qwen2)
    qk_norm: bool  # per-head RMSNorm on q and k before RoPE (Qwen3)
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_kv_heads < 1 or self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim < 2 or self.head_dim % 2:
            raise ValueError(f"head_dim must be even and >= 2 for RoPE, got {self.head_dim}")
        if self.architecture not in _ARCHITECTURES:
            raise ValueError(f"unsupported architecture {self.architecture!r}")

    @classmethod
    def from_hf_config(cls, cfg: Mapping[str, Any]) -> ModelArch:
        """Read a Hugging Face `config.json` dict (old `rope_theta/rope_scaling` or new `rope_parameters`)."""
        architecture = _architecture_of(cfg)
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"only SwiGLU (hidden_act='silu') is supported, got {cfg['hidden_act']!r}")
        if cfg.get("mlp_bias"):
            raise ValueError("mlp_bias=True is not supported")
        # Llama/Mistral/Qwen3 `attention_bias` also puts a bias on o_proj; no released model uses it.
        if architecture != "Qwen2ForCausalLM" and cfg.get("attention_bias"):
            raise ValueError(f"attention_bias=True is not supported for {architecture}")
        if cfg.get("use_sliding_window"):
            raise ValueError("sliding-window attention (use_sliding_window=True) is not supported")
        hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        max_pos = int(cfg.get("max_position_embeddings", 2048))
        window = cfg.get("sliding_window") if architecture == "MistralForCausalLM" else None
        if window is not None and window < max_pos:
            # Full attention equals sliding-window attention while the context fits in the window.
            max_pos = int(window)
        rope_theta, rope_scaling = _rope_of(cfg)
        return cls(
            architecture=architecture,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=max_pos,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=_ARCHITECTURES[architecture]["attention_bias"],
            qk_norm=_ARCHITECTURES[architecture]["qk_norm"],
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=_token_ids(cfg.get("eos_token_id")),
        )

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        """Bytes of K and V cache one token takes across all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype.itemsize

    def num_parameters(self) -> int:
        """Parameter count, counting tied embeddings once."""
        h, i = self.hidden_size, self.intermediate_size
        attn = h * (self.q_size + 2 * self.kv_size) + self.q_size * h
        attn += (self.q_size + 2 * self.kv_size) if self.attention_bias else 0
        attn += 2 * self.head_dim if self.qk_norm else 0
        layer = attn + 3 * h * i + 2 * h
        embeddings = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * layer + embeddings + h


def _architecture_of(cfg: Mapping[str, Any]) -> str:
    archs = cfg.get("architectures") or []
    name = archs[0] if archs else _MODEL_TYPES.get(cfg.get("model_type", ""), "")
    if name not in _ARCHITECTURES:
        shown = name or cfg.get("model_type")
        raise ValueError(
            f"unsupported architecture {shown!r}; supported: {', '.join(_ARCHITECTURES)} "
            f"(model_type {', '.join(_MODEL_TYPES)})"
        )
    return name


def _rope_of(cfg: Mapping[str, Any]) -> tuple[float, tuple[tuple[str, Any], ...] | None]:
    """(rope_theta, scaling items) from either config style; None scaling means plain RoPE."""
    params = dict(cfg.get("rope_parameters") or {})
    scaling = dict(cfg.get("rope_scaling") or params)
    theta = float(cfg.get("rope_theta") or params.get("rope_theta") or 10000.0)
    scaling.pop("rope_theta", None)
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in _ROPE_TYPES:
        raise ValueError(f"unsupported rope scaling type {rope_type!r}; supported: {', '.join(_ROPE_TYPES)}")
    if rope_type == "default":
        return theta, None
    scaling["rope_type"] = rope_type
    scaling.pop("type", None)
    required = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor")}
    missing = [k for k in required[rope_type] if k not in scaling]
    if missing:
        raise ValueError(f"rope scaling {rope_type!r} needs {missing}")
    if rope_type == "llama3" and "original_max_position_embeddings" not in scaling:
        raise ValueError("rope scaling 'llama3' needs original_max_position_embeddings")
    return theta, tuple(sorted(scaling.items()))


def _token_ids(value: int | list[int] | None) -> tuple[int, ...]:
    if value is None:
        return ()
    return (int(value),) if isinstance(value, int) else tuple(int(v) for v in value)


# ----------------------------------------------------------------------------------------------
# Layers


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One fused op (it accumulates in fp32) instead of HF's five: bitwise equal to HF in fp32;
        # in bf16/fp16 it rounds once where HF rounds before and after the weight.
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, arch: ModelArch, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = arch.num_heads, arch.num_kv_heads, arch.head_dim
        self.q_size, self.kv_size = arch.q_size, arch.kv_size
        self.scale = arch.head_dim**-0.5
        self.qkv_proj = nn.Linear(arch.hidden_size, self.q_size + 2 * self.kv_size, bias=arch.attention_bias)
        self.o_proj = nn.Linear(self.q_size, arch.hidden_size, bias=False)
        self.qk_norm = arch.qk_norm
        if arch.qk_norm:
            self.q_norm = RMSNorm(arch.head_dim, arch.rms_norm_eps)
            self.k_norm = RMSNorm(arch.head_dim, arch.rms_norm_eps)

    def forward(self, x: torch.Tensor, rope: Rope, ctx: ForwardContext) -> torch.Tensor:
        num_tokens = x.shape[0]
        qkv = self.qkv_proj(x)  # [T, (H + 2 * H_kv) * D]
        qk, v = qkv.split([self.q_size + self.kv_size, self.kv_size], dim=-1)
        qk = qk.view(num_tokens, self.num_heads + self.num_kv_heads, self.head_dim)  # [T, H + H_kv, D]
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)  # [T, H_kv, D]
        if self.qk_norm:
            q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
            qk = torch.cat((self.q_norm(q), self.k_norm(k)), dim=1)
        # One RoPE call for q and k together (they share positions): half the ops, which count on CPU.
        qk = rope.apply(qk)
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)  # [T, H, D], [T, H_kv, D]
        out = ctx.attend(self.layer_idx, q, k, v, self.scale)  # [T, H, D]
        return self.o_proj(out.reshape(num_tokens, self.q_size))  # [T, hidden]


class MLP(nn.Module):
    def __init__(self, arch: ModelArch) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(arch.hidden_size, 2 * arch.intermediate_size, bias=False)
        self.down_proj = nn.Linear(arch.intermediate_size, arch.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_mul(self.gate_up_proj(x)))  # [T, I] -> [T, hidden]


class DecoderLayer(nn.Module):
    def __init__(self, arch: ModelArch, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.self_attn = Attention(arch, layer_idx)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.mlp = MLP(arch)

    def forward(
        self, h: torch.Tensor, pending: torch.Tensor | None, rope: Rope, ctx: ForwardContext
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """h: the residual stream [T, hidden]; pending: the previous layer's MLP output, not yet
        added to it (the add happens inside this layer's input norm, one pass on the GPU).
        Returns (residual stream, this layer's MLP output, pending for the next layer)."""
        norm1, norm2 = self.input_layernorm, self.post_attention_layernorm
        if pending is None:
            x = norm1(h)
        else:
            x, h = add_rms_norm(pending, h, norm1.weight, norm1.eps)
        x, h = add_rms_norm(self.self_attn(x, rope, ctx), h, norm2.weight, norm2.eps)
        return h, self.mlp(x)


# HF projection name → (our fused parameter stem, which shard of it)
_FUSED = {
    "self_attn.q_proj": ("self_attn.qkv_proj", "q"),
    "self_attn.k_proj": ("self_attn.qkv_proj", "k"),
    "self_attn.v_proj": ("self_attn.qkv_proj", "v"),
    "mlp.gate_proj": ("mlp.gate_up_proj", "gate"),
    "mlp.up_proj": ("mlp.gate_up_proj", "up"),
}


class CausalLM(nn.Module):
    cos_sin: torch.Tensor  # [max_pos, 2, D/2] buffer

    def __init__(self, arch: ModelArch) -> None:
        super().__init__()
        self.arch = arch
        self.embed_tokens = nn.Embedding(arch.vocab_size, arch.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(arch, i) for i in range(arch.num_layers))
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.lm_head = nn.Linear(arch.hidden_size, arch.vocab_size, bias=False)
        self.tie_weights()
        # [max_pos, 2, D/2]; derived from the config, so not part of the state dict.
        self.register_buffer("cos_sin", rope_cache(arch, torch.float32, "cpu"), persistent=False)

    def tie_weights(self) -> None:
        if self.arch.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """input_ids, positions: [T] int64 → final hidden states [T, hidden]."""
        rope = Rope(self.cos_sin, positions)
        h = self.embed_tokens(input_ids)  # [T, hidden]
        pending: torch.Tensor | None = None
        for layer in self.layers:
            h, pending = layer(h, pending, rope, ctx)
        if pending is None:
            return self.norm(h)
        return add_rms_norm(pending, h, self.norm.weight, self.norm.eps)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [N, hidden] (only the rows that need a token) → [N, vocab] fp32."""
        return self.lm_head(hidden).float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy Hugging Face-named tensors into the (fused) parameters; every one must arrive exactly once."""
        params = dict(self.named_parameters())
        expected = {(name, shard) for name, shard_names in self._shards().items() for shard in shard_names}
        loaded: set[tuple[str, str]] = set()
        for hf_name, tensor in weights:
            if hf_name.endswith("rotary_emb.inv_freq"):
                continue  # recomputed from the config
            if self.arch.tie_word_embeddings and hf_name == "lm_head.weight":
                continue  # some checkpoints store the tied copy too
            name, shard, rows = self._target_of(hf_name)
            if name not in params:
                raise ValueError(f"unexpected weight {hf_name!r} for {self.arch.architecture}")
            target = params[name].data[rows]
            if tuple(target.shape) != tuple(tensor.shape):
                raise ValueError(
                    f"weight {hf_name!r} has shape {tuple(tensor.shape)}, expected {tuple(target.shape)}"
                )
            if (name, shard) in loaded:
                raise ValueError(f"weight {hf_name!r} given twice")
            target.copy_(tensor)
            loaded.add((name, shard))
        missing = sorted(f"{name}[{shard}]" if shard else name for name, shard in expected - loaded)
        if missing:
            shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
            raise ValueError(f"missing weights: {shown}")

    def _shard_rows(self) -> dict[str, slice]:
        """Output rows of each shard inside its fused weight."""
        q, kv, i = self.arch.q_size, self.arch.kv_size, self.arch.intermediate_size
        return {
            "q": slice(0, q),
            "k": slice(q, q + kv),
            "v": slice(q + kv, q + 2 * kv),
            "gate": slice(0, i),
            "up": slice(i, 2 * i),
        }

    def _target_of(self, hf_name: str) -> tuple[str, str, slice]:
        """HF name → (our parameter name, shard or '', rows of that parameter)."""
        name = hf_name.removeprefix("model.")
        for hf_stem, (stem, shard) in _FUSED.items():
            marker = f".{hf_stem}."
            if marker in name:
                return name.replace(marker, f".{stem}."), shard, self._shard_rows()[shard]
        return name, "", slice(None)

    def _shards(self) -> dict[str, tuple[str, ...]]:
        """Our parameter name → the shards that fill it ('' for unfused ones)."""
        shards: dict[str, tuple[str, ...]] = {}
        for name, _ in self.named_parameters():  # tied lm_head is listed once, as embed_tokens
            if name.endswith("qkv_proj.weight") or name.endswith("qkv_proj.bias"):
                shards[name] = ("q", "k", "v")
            elif name.endswith("gate_up_proj.weight"):
                shards[name] = ("gate", "up")
            else:
                shards[name] = ("",)
        return shards


def build_model(arch: ModelArch, device: torch.device, dtype: torch.dtype) -> CausalLM:
    """A CausalLM on `device` in `dtype` with UNINITIALIZED weights (load or randomize them next).

    Built on the meta device so no memory is spent on a throwaway random init."""
    with torch.device("meta"):
        model = CausalLM(arch)
    model = model.to(dtype=dtype).to_empty(device=device)
    model.tie_weights()  # to_empty replaces parameters one by one, which unties them
    model.cos_sin = rope_cache(arch, dtype, device)
    return model.eval().requires_grad_(False)
