from __future__ import annotations

import os

import pytest
import torch


@pytest.fixture
def device() -> torch.device:
    """The GPU; or, with TRITON_INTERPRET=1, the CPU through Triton's interpreter (kernel tests only)."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if os.environ.get("TRITON_INTERPRET") == "1":
        return torch.device("cpu")
    pytest.skip("needs a CUDA GPU (or TRITON_INTERPRET=1 for the kernel tests)")
