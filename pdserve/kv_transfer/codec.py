"""KV payload encoding on the wire: native dtype, bf16, or fp8 (e4m3) with per-token scales.

Pure functions: tensor in, bytes out, and back. A KV chunk is [layers, 2, tokens, kv_heads, head_dim].
"""

from __future__ import annotations

import zlib

import numpy as np
import torch

WIRE_DTYPES = ("native", "bfloat16", "fp8")
_FP8_MAX = 448.0  # largest finite float8_e4m3fn value

_TORCH_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float8_e4m3fn": torch.float8_e4m3fn,  # an fp8 KV cache (--kv-cache-dtype fp8)
}


def torch_dtype(name: str) -> torch.dtype:
    return _TORCH_DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in _TORCH_DTYPES.items()}[dtype]


def _as_bytes(t: torch.Tensor) -> bytes:
    # numpy has no bfloat16/fp8: move the raw bits as same-width integers.
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()]
    return t.detach().contiguous().cpu().view(ints).numpy().tobytes()


def _from_bytes(data: bytes | memoryview, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    ints = {1: np.uint8, 2: np.int16, 4: np.int32}[torch.empty((), dtype=dtype).element_size()]
    arr = np.frombuffer(data, dtype=ints).reshape(shape)
    return torch.from_numpy(arr.copy()).view(dtype)


def encode_kv(kv: torch.Tensor, wire_dtype: str) -> tuple[bytes, bytes]:
    """kv: [layers, 2, tokens, kv_heads, head_dim] → (payload, scales). Scales are empty unless fp8."""
    if wire_dtype == "native":
        return _as_bytes(kv), b""
    if wire_dtype == "bfloat16":
        return _as_bytes(kv.to(torch.bfloat16)), b""
    if wire_dtype == "fp8":
        # One scale per (layer, k/v, token): outliers in one token don't crush the others' precision.
        amax = kv.abs().amax(dim=(-2, -1), keepdim=True).float().clamp(min=1e-12)  # [L, 2, T, 1, 1]
        scales = amax / _FP8_MAX
        q = (kv.float() / scales).to(torch.float8_e4m3fn)
        return _as_bytes(q), _as_bytes(scales.squeeze(-1).squeeze(-1))
    raise ValueError(f"unknown wire dtype {wire_dtype!r} (choose: {', '.join(WIRE_DTYPES)})")


def decode_kv(
    payload: bytes | memoryview,
    scales: bytes | memoryview,
    wire_dtype: str,
    shape: tuple[int, ...],
    dtype: torch.dtype,
) -> torch.Tensor:
    """Inverse of encode_kv, returning [layers, 2, tokens, kv_heads, head_dim] in the cache dtype."""
    if wire_dtype == "native":
        return _from_bytes(payload, dtype, shape)
    if wire_dtype == "bfloat16":
        return _from_bytes(payload, torch.bfloat16, shape).to(dtype)
    if wire_dtype == "fp8":
        q = _from_bytes(payload, torch.float8_e4m3fn, shape)
        s = _from_bytes(scales, torch.float32, shape[:3])
        return (q.float() * s[..., None, None]).to(dtype)
    raise ValueError(f"unknown wire dtype {wire_dtype!r}")


def wire_nbytes(shape: tuple[int, ...], wire_dtype: str, cache_dtype: torch.dtype) -> int:
    n = int(np.prod(shape))
    if wire_dtype == "native":
        return n * torch.empty((), dtype=cache_dtype).element_size()
    return n * (2 if wire_dtype == "bfloat16" else 1)


def checksum(data: bytes | bytearray | memoryview) -> int:
    return zlib.crc32(data)
