"""GGUF loading: SmolLM2-135M-Instruct against transformers' own GGUF loading (the oracle), and
synthetic GGUF files written from tiny HF models."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import cast

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from pdserve.config import ModelConfig
from pdserve.engine.loader import LoadedModel, load_model
from pdserve.engine.model import CausalLM
from tests.unit.tiny_models import PagedRunner, make_tiny_hf_model

NEW_TOKENS = 32


@pytest.fixture(scope="module")
def ours(smollm2: LoadedModel) -> LoadedModel:
    return smollm2


@pytest.fixture(scope="module")
def hf(smollm2_hf: PreTrainedModel) -> PreTrainedModel:
    return smollm2_hf


def _as_hf_names(model: CausalLM) -> dict[str, torch.Tensor]:
    """Our fused parameters split back into Hugging Face names."""
    arch = model.arch
    out: dict[str, torch.Tensor] = {}
    for name, param in model.state_dict().items():
        hf_name = name if name.startswith("lm_head") else f"model.{name}"
        if ".qkv_proj." in name:
            q, k, v = param.split([arch.q_size, arch.kv_size, arch.kv_size])
            for proj, part in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
                out[hf_name.replace("qkv_proj", proj)] = part
        elif ".gate_up_proj." in name:
            gate, up = param.chunk(2)
            out[hf_name.replace("gate_up_proj", "gate_proj")] = gate
            out[hf_name.replace("gate_up_proj", "up_proj")] = up
        else:
            out[hf_name] = param
    return out


@pytest.mark.slow
def test_weights_equal_transformers_gguf(ours: LoadedModel, hf: PreTrainedModel) -> None:
    expected = hf.state_dict()
    actual = _as_hf_names(ours.model)
    assert set(actual) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(actual[name], tensor), name


@pytest.mark.slow
def test_arch_and_fields(ours: LoadedModel, hf: PreTrainedModel) -> None:
    arch = ours.arch
    assert (arch.num_layers, arch.hidden_size, arch.num_heads, arch.num_kv_heads) == (30, 576, 9, 3)
    assert arch.tie_word_embeddings and ours.model.lm_head.weight is ours.model.embed_tokens.weight
    assert arch.rope_theta == hf.config.rope_parameters["rope_theta"] == 100000.0
    assert arch.rms_norm_eps == hf.config.rms_norm_eps
    assert (arch.bos_token_id, arch.eos_token_ids) == (1, (2,))  # <|im_start|>, <|im_end|>
    assert ours.max_model_len == 8192 and ours.name == "smollm2"


@pytest.mark.slow
def test_tokenizer(ours: LoadedModel) -> None:
    tok = ours.tokenizer
    assert tok is not None
    text = "Hello, world! Ünïcödé — 123\n\ttabs"
    assert tok.decode(tok.encode(text)) == text
    assert tok.eos_token_id == 2 and tok.convert_ids_to_tokens(2) == "<|im_end|>"
    assert tok.chat_template
    prompt = str(
        tok.apply_chat_template(
            [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False
        )
    )
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.slow
def test_greedy_matches_hf_generate(ours: LoadedModel, hf: PreTrainedModel) -> None:
    tok = ours.tokenizer
    assert tok is not None
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    prompt = cast(
        list[int],
        tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False),
    )
    with torch.no_grad():
        out = hf.generate(  # type: ignore[operator]
            torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=2
        )
        expected_logits = hf(torch.tensor([prompt])).logits[0, -1]  # type: ignore[operator]
    expected = out[0, len(prompt) :].tolist()
    runner = PagedRunner(ours.model, block_size=16)
    torch.testing.assert_close(
        runner.prefill(prompt, chunk_size=16)[-1], expected_logits, atol=1e-4, rtol=1e-4
    )
    assert (
        PagedRunner(ours.model, block_size=16).generate_greedy(prompt, NEW_TOKENS, chunk_size=7) == expected
    )


# ----------------------------------------------------------------------------------------------
# Synthetic GGUF files from tiny HF models: name mapping, Q/K un-permutation, metadata


_HF_TO_GGUF = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def _converter_permute(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """llama.cpp's convert_hf_to_gguf reordering of Llama q/k rows (rotate-half → adjacent pairs)."""
    return w.reshape(num_heads, 2, w.shape[0] // num_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_gguf(hf_dir: Path, out: Path, gguf_arch: str) -> dict[str, torch.Tensor]:
    import gguf

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    cfg = model.config
    weights = dict(model.state_dict())
    writer = gguf.GGUFWriter(str(out), gguf_arch)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    for name, tensor in weights.items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if gguf_arch == "llama" and name.endswith("q_proj.weight"):
            tensor = _converter_permute(tensor, cfg.num_attention_heads)
        elif gguf_arch == "llama" and name.endswith("k_proj.weight"):
            tensor = _converter_permute(tensor, cfg.num_key_value_heads)
        writer.add_tensor(_gguf_name(name), tensor.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return weights


def _gguf_name(hf_name: str) -> str:
    stem, kind = hf_name.rsplit(".", 1)
    globals_ = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
    if stem in globals_:
        return f"{globals_[stem]}.{kind}"
    _, _, layer, sub = stem.split(".", 3)
    return f"blk.{layer}.{_HF_TO_GGUF[sub]}.{kind}"


@pytest.mark.parametrize(("kind", "gguf_arch"), [("llama", "llama"), ("qwen2", "qwen2"), ("qwen3", "qwen3")])
def test_synthetic_gguf_roundtrip(tmp_path: Path, kind: str, gguf_arch: str) -> None:
    hf_dir = make_tiny_hf_model(kind, tmp_path)
    path = tmp_path / f"{kind}.gguf"
    expected = _write_gguf(hf_dir, path, gguf_arch)
    loaded = load_model(ModelConfig(model=str(path), device="cpu", dtype="float32"))
    assert loaded.tokenizer is None and loaded.name == kind
    hf_arch = load_model(ModelConfig(model=str(hf_dir), device="cpu", dtype="float32")).arch
    assert loaded.arch.rms_norm_eps == pytest.approx(hf_arch.rms_norm_eps)  # GGUF stores it as float32
    assert dataclasses.replace(loaded.arch, rms_norm_eps=hf_arch.rms_norm_eps) == hf_arch
    actual = _as_hf_names(loaded.model)
    assert set(actual) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(actual[name], tensor), name
