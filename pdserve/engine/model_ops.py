"""The model's elementwise pieces: RoPE tables and rotation, SiLU(gate)·up, residual add + RMSNorm.

Each runs as plain torch ops on CPU (the reference, checked token for token against transformers)
and as one fused Triton kernel on the GPU (engine/fused_ops.py), where a decode step at batch 1 is
otherwise ~1 ms of small kernels on top of the weight reads.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from pdserve.engine.model import ModelArch


def rope_inv_freq(arch: ModelArch) -> torch.Tensor:
    """[head_dim // 2] fp32 inverse frequencies, scaled as the config asks."""
    d = arch.head_dim
    exponents = torch.arange(0, d, 2, dtype=torch.int64, device="cpu").float() / d
    inv_freq = 1.0 / (arch.rope_theta**exponents)
    if arch.rope_scaling is None:
        return inv_freq
    scaling = dict(arch.rope_scaling)
    factor = float(scaling["factor"])
    if scaling["rope_type"] == "linear":
        return inv_freq / factor  # same as dividing positions by `factor`
    # llama3: keep short wavelengths, stretch long ones by `factor`, interpolate in between.
    old_len = float(scaling["original_max_position_embeddings"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_len / wavelen - low) / (high - low)  # 0 at the long end of the band, 1 at the short end
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    stretched = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    in_band = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(in_band, blended, stretched)


def rope_cache(arch: ModelArch, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """[max_position_embeddings, 2, head_dim // 2]: cos and sin of every position.

    Computed on CPU in fp32 (identical values on any device), then cast like HF casts cos/sin to
    the activation dtype."""
    positions = torch.arange(arch.max_position_embeddings, dtype=torch.float32, device="cpu")
    freqs = torch.outer(positions, rope_inv_freq(arch))  # [P, D/2]
    return torch.stack((freqs.cos(), freqs.sin()), dim=1).to(device=device, dtype=dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE (the HF layout: dims i and i + D/2 form a pair).

    x: [T, heads, D]; cos, sin: [T, 1, D/2]."""
    x1, x2 = x.chunk(2, dim=-1)  # [T, heads, D/2] each
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def _fused() -> Any:
    """The Triton kernels, imported on first GPU use (Triton is a GPU-only dependency)."""
    from pdserve.engine import fused_ops

    return fused_ops


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up: [T, 2I] → silu(gate) * up [T, I]."""
    if gate_up.is_cuda and gate_up.is_contiguous():
        return _fused().silu_mul_triton(gate_up)  # type: ignore[no-any-return]
    gate, up = gate_up.chunk(2, dim=-1)  # [T, I] each
    return F.silu(gate) * up


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(residual + x) * weight, residual + x): a sublayer's output joins the residual
    stream and the next sublayer's input norm is taken; one pass on the GPU (residual updated in
    place there), the same ops as `h = h + x; norm(h)` on CPU."""
    if residual.is_cuda and x.is_contiguous() and residual.is_contiguous():
        return _fused().add_rms_norm_triton(x, residual, weight, eps)  # type: ignore[no-any-return]
    h = residual + x
    return F.rms_norm(h, (h.shape[-1],), weight, eps), h


class Rope:
    """Rotary embedding of one forward pass. On the GPU one kernel rotates q and k in place, reading
    cos/sin by position; the torch path gathers cos/sin once per pass and applies the reference."""

    def __init__(self, cos_sin: torch.Tensor, positions: torch.Tensor) -> None:
        self.cos_sin, self.positions = cos_sin, positions  # [P, 2, D/2], [T]
        self._cos_sin_t: tuple[torch.Tensor, torch.Tensor] | None = None

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, heads, D] → rotated (in place on the GPU when D is contiguous)."""
        if x.is_cuda and x.stride(2) == 1:
            return _fused().rope_triton(x, self.cos_sin, self.positions)  # type: ignore[no-any-return]
        if self._cos_sin_t is None:
            cos, sin = self.cos_sin[self.positions].unsqueeze(1).unbind(2)  # [T, 1, D/2] each
            self._cos_sin_t = (cos, sin)
        return apply_rope(x, *self._cos_sin_t)
