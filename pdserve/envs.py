"""Every PDSERVE_* environment variable, typed, in one place."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def secret() -> bytes:
    """PDSERVE_SECRET: shared by the router and workers of one deployment; authenticates the KV
    channel (HMAC challenge) and the internal worker API. The launcher generates one per deployment."""
    value = os.environ.get("PDSERVE_SECRET")
    if not value:
        raise RuntimeError("PDSERVE_SECRET is not set: workers and router of a deployment must share it")
    return value.encode()


def internal_token(secret_value: bytes) -> str:
    """What the router sends on the internal worker API: derived from, never equal to, the secret."""
    return hashlib.sha256(b"pdserve-internal-api:" + secret_value).hexdigest()


def log_level() -> str:
    """PDSERVE_LOG_LEVEL: logging level of pdserve processes (default INFO)."""
    return os.environ.get("PDSERVE_LOG_LEVEL", "INFO").upper()


def fault_kv_delay_s() -> float:
    """PDSERVE_FAULT_KV_DELAY_S: fault injection for tests and drills; the prefill side sleeps this
    long before each KV chunk it sends, widening the transfer window (default 0)."""
    return float(os.environ.get("PDSERVE_FAULT_KV_DELAY_S", "0") or 0)


def fault_destination_delay_s() -> float:
    """PDSERVE_FAULT_DESTINATION_DELAY_S: fault injection for tests and drills; the router holds the
    destination of a prefill it started early this long, so the prefill worker finishes first."""
    return float(os.environ.get("PDSERVE_FAULT_DESTINATION_DELAY_S", "0") or 0)


def fault_first_token_shift() -> int:
    """PDSERVE_FAULT_FIRST_TOKEN_SHIFT: fault injection for tests and drills; a prefill worker adds
    this to the first token id it streams to the router (not the one it sends the decode worker), so
    the two disagree and the router must recover (router/direct_first_token.py). Default 0."""
    return int(os.environ.get("PDSERVE_FAULT_FIRST_TOKEN_SHIFT", "0") or 0)


def cache_dir() -> Path:
    """PDSERVE_CACHE_DIR: where derived files are kept between runs, e.g. tokenizers rebuilt from
    GGUF metadata (default ~/.cache/pdserve)."""
    return Path(os.environ.get("PDSERVE_CACHE_DIR") or Path.home() / ".cache" / "pdserve")


def gpu_wait() -> str:
    """PDSERVE_GPU_WAIT: how the engine thread waits for a step's sampled tokens: "spin" (lowest
    latency, one busy core per worker while the GPU runs) or "block" (the thread sleeps until the GPU
    signals; the core is free, waking costs latency). Default spin."""
    value = os.environ.get("PDSERVE_GPU_WAIT", "spin").lower()
    if value not in ("spin", "block"):
        raise ValueError(f"PDSERVE_GPU_WAIT must be spin|block, got {value!r}")
    return value


def kv_copy_programs() -> int:
    """PDSERVE_KV_COPY_PROGRAMS: a cuda_ipc copy runs at most this many GPU programs per layer half
    (each walks a stride of 8-token tiles); 0 runs one per tile. Few programs leave the prompt's
    forward more of its SMs while the copy writes over the link; measured no better on two H100s
    (kv_transfer/gpu_copy.py)."""
    value = int(os.environ.get("PDSERVE_KV_COPY_PROGRAMS", "0") or 0)
    if value < 0:
        raise ValueError(f"PDSERVE_KV_COPY_PROGRAMS must be >= 0, got {value}")
    return value


def kv_copy_with() -> str:
    """PDSERVE_KV_COPY: what moves a cuda_ipc prefill worker's KV into the decode worker's blocks:
    "kernel" (our copy kernel on the SMs, the default) or "dma" (the GPU's copy engines through
    cuMemcpyBatchAsync, CUDA 12.8+: the SMs stay with the forward; kv_transfer/dma_copy.py)."""
    value = os.environ.get("PDSERVE_KV_COPY", "kernel").lower()
    if value not in ("kernel", "dma"):
        raise ValueError(f"PDSERVE_KV_COPY must be kernel|dma, got {value!r}")
    return value


def kv_fingerprint_stride() -> int:
    """PDSERVE_KV_FINGERPRINT_STRIDE: a cuda_ipc prefill worker fingerprints one token position in
    this many of what it wrote (every layer), and the decode worker checks the same positions before
    decoding. Default 16: one token per block of 16; 1 checks every byte (twice the copy's HBM
    traffic, spread over both GPUs)."""
    value = int(os.environ.get("PDSERVE_KV_FINGERPRINT_STRIDE", "16") or 16)
    if value < 1:
        raise ValueError(f"PDSERVE_KV_FINGERPRINT_STRIDE must be >= 1, got {value}")
    return value


def gc_freeze() -> bool:
    """PDSERVE_GC_FREEZE: after start-up, router and workers freeze the objects alive then out of
    the garbage collector's reach, so a full collection walks only what requests allocated since
    (default 1; 0 leaves the collector as Python sets it)."""
    return os.environ.get("PDSERVE_GC_FREEZE", "1") not in ("0", "false", "no", "")


def gc_report() -> bool:
    """PDSERVE_GC_REPORT: after a full garbage collection long enough to stall streams, log which
    object types the collector walks (a diagnostic; at most one census per 10 s; default 0)."""
    return os.environ.get("PDSERVE_GC_REPORT", "0") not in ("0", "false", "no", "")


def switch_interval_s() -> float | None:
    """PDSERVE_SWITCH_INTERVAL_US: how long a worker thread may hold the interpreter while another
    waits for it (sys.setswitchinterval). A worker's engine thread runs Python between GPU launches
    while its event loop waits to send the tokens it just produced; the interpreter's default
    (5,000 us) lets that wait last a whole interval. Unset: the interpreter's default."""
    value = os.environ.get("PDSERVE_SWITCH_INTERVAL_US", "")
    if not value:
        return None
    us = float(value)
    if us <= 0:
        raise ValueError(f"PDSERVE_SWITCH_INTERVAL_US must be > 0, got {value}")
    return us * 1e-6
