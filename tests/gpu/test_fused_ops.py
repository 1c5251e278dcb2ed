"""The fused elementwise kernels against the torch ops they replace, on fresh random inputs:
RoPE in place (on a strided q/k view, as the model hands it over), SiLU(gate)·up, and residual
add + RMSNorm (the residual updated in place)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pdserve.engine.model_ops import apply_rope

pytestmark = pytest.mark.gpu


def dtypes(device: torch.device) -> list[torch.dtype]:
    # Triton's interpreter (CPU) is exact in fp32; bf16 is checked on the GPU.
    return [torch.float32] if device.type == "cpu" else [torch.float32, torch.bfloat16]


def close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    err = float((out.double() - ref.double()).norm() / ref.double().norm())
    assert err < (1e-6 if dtype == torch.float32 else 1e-2), err


@pytest.mark.parametrize("num_tokens", [1, 7, 300])
def test_rope_in_place_on_a_strided_view(device: torch.device, num_tokens: int) -> None:
    from pdserve.engine.fused_ops import rope_triton

    for dtype in dtypes(device):
        torch.manual_seed(num_tokens)
        heads, kv_heads, dim = 8, 2, 128
        qkv = torch.randn(num_tokens, (heads + 2 * kv_heads) * dim, device=device).to(dtype)
        qk = qkv[:, : (heads + kv_heads) * dim].view(num_tokens, heads + kv_heads, dim)
        v_before = qkv[:, (heads + kv_heads) * dim :].clone()
        angles = torch.rand(4096, dim // 2) * 6.28
        cos_sin = torch.stack((angles.cos(), angles.sin()), dim=1).to(device=device, dtype=dtype)
        positions = torch.randint(0, 4096, (num_tokens,), device=device)
        cos, sin = cos_sin[positions].unsqueeze(1).unbind(2)
        ref = apply_rope(qk.clone(), cos, sin)
        out = rope_triton(qk, cos_sin, positions)
        assert out.data_ptr() == qk.data_ptr()  # in place
        close(qk, ref, dtype)
        assert torch.equal(qkv[:, (heads + kv_heads) * dim :], v_before)  # v untouched


@pytest.mark.parametrize("num_tokens", [1, 33])
def test_silu_mul(device: torch.device, num_tokens: int) -> None:
    from pdserve.engine.fused_ops import silu_mul_triton

    for dtype in dtypes(device):
        torch.manual_seed(num_tokens)
        gate_up = (torch.randn(num_tokens, 2 * 3000, device=device) * 3).to(dtype)
        gate, up = gate_up.chunk(2, dim=-1)
        close(silu_mul_triton(gate_up), F.silu(gate) * up, dtype)


@pytest.mark.parametrize("num_tokens", [1, 65])
def test_add_rms_norm_updates_the_residual(device: torch.device, num_tokens: int) -> None:
    from pdserve.engine.fused_ops import add_rms_norm_triton

    for dtype in dtypes(device):
        torch.manual_seed(num_tokens)
        hidden = 4096
        x = torch.randn(num_tokens, hidden, device=device).to(dtype)
        residual = (torch.randn(num_tokens, hidden, device=device) * 4).to(dtype)
        weight = (torch.rand(hidden, device=device) + 0.5).to(dtype)
        h_ref = residual + x
        normed_ref = F.rms_norm(h_ref, (hidden,), weight, 1e-5)
        normed, h = add_rms_norm_triton(x, residual, weight, 1e-5)
        assert h.data_ptr() == residual.data_ptr()
        assert torch.equal(h, h_ref)  # the add rounds exactly as `residual + x`
        close(normed, normed_ref, dtype)
