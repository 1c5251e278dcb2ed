"""The correctness oracle: Hugging Face transformers on the same weights."""

from __future__ import annotations

import importlib.util

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from pdserve.engine.loader import default_model_path


def load_smollm2_hf() -> PreTrainedModel:
    """SmolLM2-135M-Instruct from the packaged GGUF, dequantized by transformers, fp32."""
    path = default_model_path()
    if importlib.util.find_spec("accelerate") is not None:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    else:
        # from_pretrained insists on accelerate for GGUF; this is the same dequantize-and-map step
        # it runs internally, without it.
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
        result = model.load_state_dict({k: torch.as_tensor(v) for k, v in tensors.items()}, strict=False)
        assert not result.unexpected_keys and set(result.missing_keys) <= {"lm_head.weight"}
        model.tie_weights()
    model.generation_config.eos_token_id = None
    return model.eval()


@torch.inference_mode()
def hf_greedy(model: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    """Greedy ids for one prompt at a time, with transformers' own KV cache."""
    out = model(input_ids=torch.tensor([prompt]), use_cache=True)  # type: ignore[operator]
    tokens: list[int] = []
    for _ in range(n):
        tok = int(out.logits[0, -1].argmax())
        tokens.append(tok)
        out = model(input_ids=torch.tensor([[tok]]), past_key_values=out.past_key_values, use_cache=True)  # type: ignore[operator]
    return tokens
