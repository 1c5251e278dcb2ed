"""Our CausalLM against Hugging Face transformers on tiny random models (fp32, CPU), plus config,
weight-loading and dummy-shape checks."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from pdserve.config import ModelConfig
from pdserve.engine.loader import LoadedModel, load_model
from pdserve.engine.model import CausalLM, ModelArch
from pdserve.engine.shapes import SHAPES, get_shape
from tests.unit.tiny_models import TINY_KINDS, PagedRunner, make_tiny_hf_model

PROMPT = [5, 17, 42, 99, 3, 250, 7, 8, 11, 123, 45, 200, 64]
NEW_TOKENS = 32


@pytest.fixture(scope="module", params=TINY_KINDS)
def tiny(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[PreTrainedModel, LoadedModel]:
    """(HF model, our loaded model) on the same saved weights."""
    path = make_tiny_hf_model(request.param, tmp_path_factory.mktemp("tiny"))
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None  # always generate NEW_TOKENS ids
    ours = load_model(ModelConfig(model=str(path), device="cpu", dtype="float32"))
    return hf, ours


def _hf_logits(hf: PreTrainedModel, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float()  # type: ignore[operator]  # [len(ids), vocab]


def test_prefill_logits_match_hf(tiny: tuple[PreTrainedModel, LoadedModel]) -> None:
    hf, ours = tiny
    expected = _hf_logits(hf, PROMPT)
    torch.testing.assert_close(PagedRunner(ours.model).prefill(PROMPT), expected, atol=1e-5, rtol=1e-4)
    # Chunks of 3 over blocks handed out in reverse: chunked prefill and block tables must not matter.
    runner = PagedRunner(ours.model, block_order=list(range(63, -1, -1)))
    torch.testing.assert_close(runner.prefill(PROMPT, chunk_size=3), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_greedy_matches_hf_generate(
    tiny: tuple[PreTrainedModel, LoadedModel], chunk_size: int | None
) -> None:
    hf, ours = tiny
    with torch.no_grad():
        out = hf.generate(  # type: ignore[operator]
            torch.tensor([PROMPT]), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0
        )
    expected = out[0, len(PROMPT) :].tolist()
    assert len(expected) == NEW_TOKENS
    assert PagedRunner(ours.model).generate_greedy(PROMPT, NEW_TOKENS, chunk_size) == expected


def test_loaded_model_fields(tiny: tuple[PreTrainedModel, LoadedModel]) -> None:
    hf, ours = tiny
    assert ours.tokenizer is None  # no tokenizer files in the tiny dirs
    assert ours.max_model_len == hf.config.max_position_embeddings == 256
    assert ours.arch.eos_token_ids == (2,)
    assert not ours.model.training
    assert all(not p.requires_grad for p in ours.model.parameters())
    hf_params = sum(p.numel() for p in hf.parameters())
    assert ours.arch.num_parameters() == sum(p.numel() for p in ours.model.parameters()) == hf_params


def test_sharded_checkpoint_with_index(tmp_path: Path) -> None:
    path = make_tiny_hf_model("qwen2", tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    sharded = tmp_path / "sharded"
    hf.save_pretrained(sharded, max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    ours = load_model(ModelConfig(model=str(sharded), device="cpu", dtype="float32", served_model_name="q"))
    assert ours.name == "q"
    torch.testing.assert_close(
        PagedRunner(ours.model).prefill(PROMPT), _hf_logits(hf, PROMPT), atol=1e-5, rtol=1e-4
    )


# ----------------------------------------------------------------------------------------------
# ModelArch.from_hf_config


def _tiny_cfg(**overrides: object) -> dict[str, object]:
    cfg = get_shape("tiny-llama")
    cfg.update(overrides)
    return cfg


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"architectures": ["GPT2LMHeadModel"]}, "unsupported architecture"),
        ({"architectures": None, "model_type": "gemma"}, "unsupported architecture"),
        ({"hidden_act": "gelu"}, "SwiGLU"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "unsupported rope scaling"),
        ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "unsupported rope scaling"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "needs"),
        ({"num_key_value_heads": 3}, "multiple of num_kv_heads"),
        ({"use_sliding_window": True}, "sliding-window"),
        ({"attention_bias": True}, "attention_bias"),
        ({"mlp_bias": True}, "mlp_bias"),
    ],
)
def test_from_hf_config_rejects(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ModelArch.from_hf_config(_tiny_cfg(**overrides))


def test_from_hf_config_reads_both_rope_styles() -> None:
    scaling = {"rope_type": "linear", "factor": 2.0}
    old = ModelArch.from_hf_config(_tiny_cfg(rope_theta=5e5, rope_scaling=scaling))
    cfg = _tiny_cfg(rope_parameters={"rope_theta": 5e5, **scaling})
    del cfg["rope_theta"]
    assert ModelArch.from_hf_config(cfg) == old
    assert old.rope_theta == 5e5 and dict(old.rope_scaling or ()) == scaling
    assert ModelArch.from_hf_config(_tiny_cfg(rope_scaling={"type": "default"})).rope_scaling is None
    hash(old)  # frozen and hashable


def test_from_hf_config_model_type_and_sliding_window() -> None:
    arch = ModelArch.from_hf_config(
        _tiny_cfg(architectures=None, model_type="mistral", max_position_embeddings=512, sliding_window=128)
    )
    assert arch.architecture == "MistralForCausalLM"
    assert arch.max_position_embeddings == 128  # full attention is exact only inside the window


# ----------------------------------------------------------------------------------------------
# load_weights


def _hf_named_weights(path: Path) -> dict[str, torch.Tensor]:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return dict(model.state_dict())


def test_load_weights_errors(tmp_path: Path) -> None:
    path = make_tiny_hf_model("qwen2", tmp_path)
    weights = _hf_named_weights(path)
    arch = load_model(ModelConfig(model=str(path), device="cpu", dtype="float32")).arch
    model = CausalLM(arch)
    model.load_weights([*weights.items(), ("model.rotary_emb.inv_freq", torch.ones(8))])  # inv_freq skipped

    missing = {k: v for k, v in weights.items() if k != "model.layers.1.self_attn.k_proj.bias"}
    with pytest.raises(ValueError, match=r"missing weights: layers\.1\.self_attn\.qkv_proj\.bias\[k\]"):
        CausalLM(arch).load_weights(missing.items())
    with pytest.raises(ValueError, match=re.escape("unexpected weight 'model.layers.0.mlp.extra.weight'")):
        CausalLM(arch).load_weights([*weights.items(), ("model.layers.0.mlp.extra.weight", torch.ones(1))])
    bad_shape = dict(weights, **{"model.norm.weight": torch.ones(3)})
    with pytest.raises(ValueError, match="has shape"):
        CausalLM(arch).load_weights(bad_shape.items())
    with pytest.raises(ValueError, match="given twice"):
        CausalLM(arch).load_weights([*weights.items(), ("model.norm.weight", weights["model.norm.weight"])])


# ----------------------------------------------------------------------------------------------
# dummy shapes


def test_dummy_tiny_runs_and_is_seeded() -> None:
    a = load_model(ModelConfig(model="dummy:tiny-llama", device="cpu", dtype="float32", seed=1))
    b = load_model(ModelConfig(model="dummy:tiny-llama", device="cpu", dtype="float32", seed=1))
    c = load_model(ModelConfig(model="dummy:tiny-llama", device="cpu", dtype="float32", seed=2))
    assert a.name == "dummy:tiny-llama" and a.max_model_len == 512
    # random weights come with the synthetic one-word-per-id tokenizer
    assert a.tokenizer is not None and len(a.tokenizer) == a.arch.vocab_size
    assert a.tokenizer.decode([5, 6]) == "t5 t6"
    key = "layers.0.mlp.gate_up_proj.weight"
    w = a.model.state_dict()[key]
    assert torch.equal(w, b.model.state_dict()[key])
    assert not torch.equal(w, c.model.state_dict()[key])
    assert 0.015 < w.std().item() < 0.025
    assert a.model.lm_head.weight is a.model.embed_tokens.weight  # tied
    logits = PagedRunner(a.model).prefill(PROMPT, chunk_size=5)
    assert logits.shape == (len(PROMPT), 512) and torch.isfinite(logits).all()


def test_dummy_bf16_and_max_model_len() -> None:
    lm = load_model(ModelConfig(model="dummy:tiny-llama", device="cpu", dtype="bfloat16", max_model_len=100))
    assert lm.max_model_len == 100
    assert {p.dtype for p in lm.model.parameters()} == {torch.bfloat16}
    assert len(PagedRunner(lm.model).generate_greedy(PROMPT, 4)) == 4
    with pytest.raises(ValueError, match="exceeds"):
        load_model(ModelConfig(model="dummy:tiny-llama", device="cpu", max_model_len=513))


def test_bad_model_names() -> None:
    with pytest.raises(ValueError, match="unknown model shape 'nope'"):
        load_model(ModelConfig(model="dummy:nope", device="cpu"))
    with pytest.raises(ValueError, match="is not 'smollm2'"):
        load_model(ModelConfig(model="no/such/dir", device="cpu"))


# Public facts: Llama-3-8B 8.03B, Llama-2-7B 6.74B parameters; SmolLM2-135M's GGUF holds
# 134,515,008 elements; KV bytes per token = 2 * layers * kv_heads * head_dim * itemsize.
@pytest.mark.parametrize(
    ("shape", "num_params", "kv_bytes_bf16"),
    [
        ("llama-3-8b", 8_030_261_248, 2 * 32 * 8 * 128 * 2),
        ("llama-3-70b", 70_553_706_496, 2 * 80 * 8 * 128 * 2),
        ("llama-2-7b", 6_738_415_616, 2 * 32 * 32 * 128 * 2),
        ("smollm2-135m", 134_515_008, 2 * 30 * 3 * 64 * 2),
    ],
)
def test_big_shapes_numbers(shape: str, num_params: int, kv_bytes_bf16: int) -> None:
    arch = ModelArch.from_hf_config(get_shape(shape))
    assert arch.num_parameters() == num_params
    assert arch.kv_bytes_per_token(torch.bfloat16) == kv_bytes_bf16
    assert arch.kv_bytes_per_token(torch.float32) == 2 * kv_bytes_bf16


def test_all_shapes_parse() -> None:
    archs = {name: ModelArch.from_hf_config(cfg) for name, cfg in SHAPES.items()}
    assert archs["qwen2.5-7b"].attention_bias and archs["qwen3-8b"].qk_norm
    assert archs["qwen3-8b"].head_dim == 128 and archs["mistral-7b"].max_position_embeddings == 32768
    assert archs["smollm2-1.7b"].tie_word_embeddings and not archs["llama-3-8b"].tie_word_embeddings
    assert archs["llama-3-8b"].eos_token_ids == (128001, 128009)
