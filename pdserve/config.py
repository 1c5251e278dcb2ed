"""Frozen configuration per role. CLI flags are generated from these dataclasses (see cli.py):
each field becomes `--field-name`, its type and default come from here, and its help text from
the `help` metadata."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True)
class ModelConfig:
    model: str = field(
        default="smollm2",
        metadata=_help("model: 'smollm2', a GGUF file, a Hugging Face model directory, or dummy:<shape>"),
    )
    dtype: str = field(default="auto", metadata=_help("float32 | bfloat16 | float16 | auto (fp32 on CPU, bf16 on GPU)"))
    device: str = field(default="auto", metadata=_help("cpu | cuda | auto (cuda when available)"))
    max_model_len: int | None = field(default=None, metadata=_help("context length (default: the model's)"))
    tokenizer: str | None = field(default=None, metadata=_help("tokenizer directory (default: the model's)"))
    served_model_name: str | None = field(default=None, metadata=_help("model name reported by the API"))
    seed: int = field(default=0, metadata=_help("seed for dummy weights and unseeded sampling"))

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be auto|float32|bfloat16|float16, got {self.dtype!r}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be auto|cpu|cuda[:N], got {self.device!r}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def resolved_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.float32 if self.resolved_device().type == "cpu" else torch.bfloat16
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[self.dtype]


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = field(default=16, metadata=_help("tokens per KV block"))
    kv_cache_memory_gb: float = field(default=1.0, metadata=_help("KV cache budget in GiB (CPU)"))
    gpu_memory_utilization: float = field(default=0.9, metadata=_help("fraction of GPU memory to use (GPU)"))
    num_blocks: int | None = field(default=None, metadata=_help("exact number of KV blocks (overrides the budget)"))
    enable_prefix_caching: bool = field(default=True, metadata=_help("reuse KV of shared prompt prefixes"))

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.kv_cache_memory_gb <= 0:
            raise ValueError(f"kv_cache_memory_gb must be > 0, got {self.kv_cache_memory_gb}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.num_blocks is not None and self.num_blocks < 2:
            raise ValueError(f"num_blocks must be >= 2, got {self.num_blocks}")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = field(default=64, metadata=_help("max running sequences per step"))
    max_num_batched_tokens: int = field(default=512, metadata=_help("token budget per step"))
    enable_chunked_prefill: bool = field(default=True, metadata=_help("split long prompts over steps"))

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    attention_backend: str = "torch"


@dataclass(frozen=True)
class ServerConfig:
    host: str = field(default="127.0.0.1", metadata=_help("bind address (loopback unless told otherwise)"))
    port: int = field(default=8000, metadata=_help("HTTP port"))
    api_key: str | None = field(default=None, metadata=_help("require 'Authorization: Bearer <key>'"))
    max_body_bytes: int = field(default=8 * 1024 * 1024, metadata=_help("largest accepted request body"))
    log_level: str = field(default="info", metadata=_help("uvicorn log level"))

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.max_body_bytes < 1024:
            raise ValueError(f"max_body_bytes must be >= 1024, got {self.max_body_bytes}")
