"""pdserve: LLM serving with prefill/decode disaggregation."""

from __future__ import annotations

from pdserve.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams"]


def __getattr__(name: str) -> object:
    # LLM pulls in torch and transformers; import it only when asked for.
    if name == "LLM":
        from pdserve.llm import LLM

        return LLM
    raise AttributeError(name)
