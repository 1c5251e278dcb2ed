"""Named real-model shapes for `dummy:<shape>` (random weights of the right size).

Each is a Hugging Face config.json-style dict with the numbers of the public config of that model
(the Instruct variant where eos ids differ), so `ModelArch.from_hf_config` reads it like a real one.
"""

from __future__ import annotations

from typing import Any


def _llama(**overrides: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
    }
    cfg.update(overrides)
    return cfg


SHAPES: dict[str, dict[str, Any]] = {
    "llama-3-8b": _llama(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        rope_theta=500000.0,
        max_position_embeddings=8192,
        bos_token_id=128000,
        eos_token_id=[128001, 128009],  # <|end_of_text|>, <|eot_id|>
    ),
    "llama-3-70b": _llama(
        vocab_size=128256,
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        rope_theta=500000.0,
        max_position_embeddings=8192,
        bos_token_id=128000,
        eos_token_id=[128001, 128009],
    ),
    "llama-2-7b": _llama(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=2,
    ),
    "mistral-7b": _llama(  # Mistral-7B-Instruct-v0.3 (no sliding window)
        architectures=["MistralForCausalLM"],
        model_type="mistral",
        vocab_size=32768,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        rope_theta=1000000.0,
        max_position_embeddings=32768,
        sliding_window=None,
        bos_token_id=1,
        eos_token_id=2,
    ),
    "qwen2.5-7b": _llama(  # Qwen2.5-7B-Instruct
        architectures=["Qwen2ForCausalLM"],
        model_type="qwen2",
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        max_position_embeddings=32768,
        use_sliding_window=False,
        bos_token_id=151643,
        eos_token_id=[151645, 151643],  # <|im_end|>, <|endoftext|>
    ),
    "qwen3-8b": _llama(
        architectures=["Qwen3ForCausalLM"],
        model_type="qwen3",
        vocab_size=151936,
        hidden_size=4096,
        intermediate_size=12288,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        max_position_embeddings=40960,
        attention_bias=False,
        use_sliding_window=False,
        bos_token_id=151643,
        eos_token_id=[151645, 151643],
    ),
    "smollm2-135m": _llama(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        rope_theta=100000.0,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,  # <|im_end|>
    ),
    "smollm2-1.7b": _llama(
        vocab_size=49152,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=24,
        num_attention_heads=32,
        num_key_value_heads=32,
        rope_theta=130000.0,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    ),
    # A few-MB shape for tests: 2 layers, GQA, tied embeddings.
    "tiny-llama": _llama(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    ),
}


def get_shape(name: str) -> dict[str, Any]:
    """A copy of the named shape's config dict; ValueError listing the known names otherwise."""
    if name not in SHAPES:
        raise ValueError(f"unknown model shape {name!r}; known: {', '.join(SHAPES)}")
    return dict(SHAPES[name])
