"""Frozen configuration per role. CLI flags are generated from these dataclasses (see cli.py):
each field becomes `--field-name`, its type and default come from here, and its help text from
the `help` metadata."""

from __future__ import annotations

import dataclasses
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
    dtype: str = field(
        default="auto", metadata=_help("float32 | bfloat16 | float16 | auto (fp32 on CPU, bf16 on GPU)")
    )
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
    num_blocks: int | None = field(
        default=None, metadata=_help("exact number of KV blocks (overrides the budget)")
    )
    enable_prefix_caching: bool = field(default=True, metadata=_help("reuse KV of shared prompt prefixes"))
    kv_cache_dtype: str = field(
        default="auto",
        metadata=_help("auto (the model's dtype) | fp8 (float8 e4m3, scale 1: half the bytes of bf16)"),
    )

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.kv_cache_memory_gb <= 0:
            raise ValueError(f"kv_cache_memory_gb must be > 0, got {self.kv_cache_memory_gb}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.num_blocks is not None and self.num_blocks < 2:
            raise ValueError(f"num_blocks must be >= 2, got {self.num_blocks}")
        if self.kv_cache_dtype not in ("auto", "fp8"):
            raise ValueError(f"kv_cache_dtype must be auto|fp8, got {self.kv_cache_dtype!r}")

    def resolved_kv_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        """The KV cache's element type. fp8 stores K and V as e4m3 with a scale of 1 (their values
        stay well inside its +-448 range after the projections); attention reads them back in the
        model's dtype."""
        return torch.float8_e4m3fn if self.kv_cache_dtype == "fp8" else model_dtype


# (max_num_seqs, max_num_batched_tokens) where the flags leave them unset, by device: what the
# engine was measured with. On two H100s 2,048-token steps served the bimodal mix better than 512
# (28 against 24 req/s co-located), and decode batches reached ~120 streams at the operating
# point, past 64 (docs/benchmarks.md).
SCHEDULER_DEFAULTS = {"cpu": (64, 512), "cuda": (256, 2048)}


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int | None = field(
        default=None, metadata=_help("max running sequences per step (default: 64 on a CPU, 256 on a GPU)")
    )
    max_num_batched_tokens: int | None = field(
        default=None, metadata=_help("token budget per step (default: 512 on a CPU, 2048 on a GPU)")
    )
    enable_chunked_prefill: bool = field(default=True, metadata=_help("split long prompts over steps"))
    prefill_chunk_cap: int = field(
        default=0,
        metadata=_help(
            "while other requests wait, the most prompt tokens one request computes per step (0: up to "
            "the whole budget), so short prompts behind a long one are admitted in the same steps"
        ),
    )

    def __post_init__(self) -> None:
        if self.prefill_chunk_cap < 0:
            raise ValueError(f"prefill_chunk_cap must be >= 0, got {self.prefill_chunk_cap}")
        if self.max_num_seqs is not None and self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")

    def for_device(self, device_type: str) -> SchedulerConfig:
        """This config with the unset limits filled in for a `device_type` ("cpu" or "cuda") engine."""
        seqs, tokens = SCHEDULER_DEFAULTS["cuda" if device_type == "cuda" else "cpu"]
        return dataclasses.replace(
            self,
            max_num_seqs=self.max_num_seqs if self.max_num_seqs is not None else seqs,
            max_num_batched_tokens=(
                self.max_num_batched_tokens if self.max_num_batched_tokens is not None else tokens
            ),
        )


ATTENTION_BACKENDS = ("auto", "torch", "torch_ref", "triton")
KV_TRANSPORTS = ("shm", "tcp", "local", "cuda_ipc", "nccl", "nixl")


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    attention_backend: str = field(
        default="auto",
        metadata=_help("torch (reference) | triton (GPU) | auto (torch on CPU, triton on GPU)"),
    )
    enforce_eager: bool = field(
        default=False, metadata=_help("never use CUDA graphs for decode steps (GPU, triton backend)")
    )
    async_decode: bool | None = field(
        default=None,
        metadata=_help(
            "launch each decode step before the host has read the previous step's tokens, so host "
            "work overlaps the GPU (default: on with CUDA graphs, off otherwise)"
        ),
    )

    def __post_init__(self) -> None:
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(
                f"attention_backend must be {'|'.join(ATTENTION_BACKENDS)}, got {self.attention_backend!r}"
            )

    def resolved_attention_backend(self) -> str:
        if self.attention_backend != "auto":
            return self.attention_backend
        return "triton" if self.model.resolved_device().type == "cuda" else "torch"


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


KV_PUSH_MODES = ("auto", "stream", "after")


def resolve_kv_push(setting: str, transport: str) -> str:
    """stream | after for a prefill worker's --kv-push on a transport. On GPUs in one host
    (cuda_ipc), moving the KV while the prompt's forward runs slowed the forward by about 1-2x the
    copy's own time, by SMs or by copy engines alike (benchmarks/stream_cost.py): copying once the
    first token is out costs the first token nothing and the decode worker's second token less. Over
    a network the transfer takes longer than the interference it causes: streaming hides it."""
    if setting != "auto":
        return setting
    return "after" if transport == "cuda_ipc" else "stream"


# WorkerConfig fields a deployment sets per worker itself; the rest pass through `pdserve serve`.
PER_WORKER_FIELDS = (
    "role",
    "worker_id",
    "host",
    "port",
    "kv_port",
    "router_url",
    "cpus",
    "shm_tag",
    "kv_transport",
)


@dataclass(frozen=True)
class WorkerConfig:
    role: str = field(default="colocated", metadata=_help("prefill | decode | colocated"))
    worker_id: str = field(default="", metadata=_help("name in logs and metrics (default: role-port)"))
    host: str = field(default="127.0.0.1", metadata=_help("internal API bind address"))
    port: int = field(default=0, metadata=_help("internal API port (0: any free port)"))
    kv_transport: str = field(
        default="tcp",
        metadata=_help(
            "KV transfer: shm (same host, CPU) | cuda_ipc (same host, GPU) | nccl (GPUs on any hosts; "
            "gloo for a CPU cache) | tcp | local"
        ),
    )
    kv_port: int = field(default=0, metadata=_help("KV channel port of a decode worker (0: any free port)"))
    kv_wire_dtype: str = field(
        default="native", metadata=_help("KV on the wire (tcp): native | bfloat16 | fp8")
    )
    kv_layers_per_chunk: int = field(default=1, metadata=_help("layers per KV message (prefill side)"))
    kv_push: str = field(
        default="auto",
        metadata=_help(
            "when a prefill worker sends a prompt's KV: stream (layer by layer during the forward) | "
            "after (all layers once the first token is sampled) | auto (after for cuda_ipc, where a "
            "copy beside the forward costs it more than the copy takes; stream otherwise)"
        ),
    )
    kv_timeout_s: float = field(default=30.0, metadata=_help("remote prefill deadline before local fallback"))
    router_url: str | None = field(
        default=None, metadata=_help("router to pull prefill jobs from (prefill role)")
    )
    remote_prefill_threshold: int = field(
        default=256, metadata=_help("uncached prompt tokens from which a decode worker prefills remotely")
    )
    max_queue_per_prefill_worker: int = field(
        default=4, metadata=_help("prefill queue depth per prefill worker at which decode prefills locally")
    )
    max_local_prefill_tokens: int = field(
        default=1024,
        metadata=_help(
            "with the prefill queue saturated, the longest prompt a decode worker prefills itself"
        ),
    )
    prefill_serves_whole: bool = field(
        default=False,
        metadata=_help(
            "router: send a prompt below --remote-prefill-threshold to a prefill worker that has no "
            "prefill work and fewer requests than the decode worker, which then serves it whole "
            "(prefill and decode), so an idle prefill GPU adds decode capacity"
        ),
    )
    early_prefill: bool = field(
        default=True,
        metadata=_help(
            "router: queue a prompt's remote prefill as it routes the request (by the decode worker's "
            "own policy), so the prefill runs while the decode worker reserves blocks for its KV"
        ),
    )
    first_token_from_prefill: bool = field(
        default=True,
        metadata=_help(
            "router: stream a remote prefill's first token from the prefill worker as soon as it is "
            "sampled, not after the KV's completion has reached the decode worker"
        ),
    )
    max_whole_per_prefill_worker: int = field(
        default=16,
        metadata=_help(
            "with --prefill-serves-whole, the most whole requests one prefill worker holds at once "
            "(the decode batch a long prompt that arrives later shares its steps with)"
        ),
    )
    whole_job_streams: int | None = field(
        default=None,
        metadata=_help(
            "with --prefill-serves-whole, a prefill worker that holds prefill jobs still takes short "
            "requests whole while its whole requests plus this many per job are fewer than the decode "
            "worker's streams (default: none while it holds any job)"
        ),
    )
    link_gbps: float = field(default=4.0, metadata=_help("KV link bandwidth estimate, GB/s (decision only)"))
    prefill_tokens_per_s: float = field(
        default=1500.0, metadata=_help("local prefill speed estimate before measurements (decision only)")
    )
    cpus: str | None = field(default=None, metadata=_help("pin this worker to CPUs, e.g. '0' or '0-3'"))
    shm_tag: str = field(default="", metadata=_help("tag in the shared-memory segment name (launcher use)"))

    def __post_init__(self) -> None:
        if self.role not in ("prefill", "decode", "colocated"):
            raise ValueError(f"role must be prefill|decode|colocated, got {self.role!r}")
        if self.kv_transport not in KV_TRANSPORTS:
            raise ValueError(f"kv_transport must be {'|'.join(KV_TRANSPORTS)}, got {self.kv_transport!r}")
        if self.kv_wire_dtype not in ("native", "bfloat16", "fp8"):
            raise ValueError(f"kv_wire_dtype must be native|bfloat16|fp8, got {self.kv_wire_dtype!r}")
        if self.kv_transport in ("shm", "cuda_ipc", "nccl", "nixl") and self.kv_wire_dtype != "native":
            raise ValueError(
                f"kv_wire_dtype applies to tcp only: {self.kv_transport} moves the cache dtype as it is"
            )
        if self.kv_timeout_s <= 0:
            raise ValueError(f"kv_timeout_s must be > 0, got {self.kv_timeout_s}")
        if self.kv_layers_per_chunk < 1:
            raise ValueError(f"kv_layers_per_chunk must be >= 1, got {self.kv_layers_per_chunk}")
        if self.kv_push not in KV_PUSH_MODES:
            raise ValueError(f"kv_push must be {'|'.join(KV_PUSH_MODES)}, got {self.kv_push!r}")
        if self.max_whole_per_prefill_worker < 1:
            raise ValueError(
                f"max_whole_per_prefill_worker must be >= 1, got {self.max_whole_per_prefill_worker}"
            )
        if self.whole_job_streams is not None and self.whole_job_streams < 0:
            raise ValueError(f"whole_job_streams must be >= 0, got {self.whole_job_streams}")
        if self.role == "prefill" and not self.router_url:
            raise ValueError("a prefill worker needs --router-url to pull jobs from")
