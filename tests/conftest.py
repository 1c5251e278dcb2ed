from __future__ import annotations

import pytest
from transformers import PreTrainedModel

from pdserve.config import ModelConfig
from pdserve.engine.loader import LoadedModel, load_model
from tests.oracle import load_smollm2_hf


@pytest.fixture(scope="session")
def smollm2() -> LoadedModel:
    """Our SmolLM2-135M-Instruct (GGUF, fp32), loaded once per test session."""
    return load_model(ModelConfig(model="smollm2", device="cpu", dtype="float32"))


@pytest.fixture(scope="session")
def smollm2_hf() -> PreTrainedModel:
    return load_smollm2_hf()
