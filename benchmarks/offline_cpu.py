"""Offline throughput on CPU: pdserve against transformers `generate` (batched), same prompts, same run.

    .venv/bin/python benchmarks/offline_cpu.py --num-prompts 32 --max-tokens 128

Both generate exactly --max-tokens greedy tokens per prompt (EOS ignored) from SmolLM2-135M-Instruct
in float32 (or --dtype bfloat16 for both). transformers gets the whole batch at once (left-padded), its fastest batched form on CPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from pdserve import LLM, SamplingParams
from pdserve.config import ModelConfig
from pdserve.engine.loader import default_model_path, load_model

TOPICS = [
    "the history of the printing press", "how rainbows form", "why cats purr", "the rules of chess",
    "photosynthesis", "the water cycle", "how vaccines work", "the French revolution",
    "black holes", "the stock market", "how bread rises", "volcanoes", "the human heart",
    "machine learning", "the Roman empire", "coral reefs",
]  # fmt: skip


def make_prompts(tokenizer: object, n: int, seed: int) -> list[list[int]]:
    """Chat-formatted requests of mixed length (about 30 to 120 tokens)."""
    rng = random.Random(seed)
    prompts = []
    for i in range(n):
        detail = " ".join(rng.choice(TOPICS) for _ in range(rng.randint(0, 12)))
        text = f"Explain {TOPICS[i % len(TOPICS)]} to a curious student. Mention {detail}."
        messages = [{"role": "user", "content": text}]
        ids = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=False
        )  # type: ignore[attr-defined]
        prompts.append(list(ids))
    return prompts


def run_pdserve(llm: LLM, prompts: list[list[int]], max_tokens: int) -> tuple[float, list[list[int]]]:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    results = llm.generate(prompts, params)
    elapsed = time.perf_counter() - t0
    return elapsed, [r.outputs[0].token_ids for r in results]


def run_hf(
    model: torch.nn.Module, prompts: list[list[int]], max_tokens: int, pad_id: int
) -> tuple[float, list[list[int]]]:
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(  # type: ignore[operator]
            input_ids=ids, attention_mask=mask, max_new_tokens=max_tokens, min_new_tokens=max_tokens,
            do_sample=False, pad_token_id=pad_id,
        )  # fmt: skip
    elapsed = time.perf_counter() - t0
    return elapsed, out[:, width:].tolist()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per system (best is kept)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--dtype", choices=("float32", "bfloat16"), default="float32", help="both systems run in it"
    )
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    args = ap.parse_args()

    dtype = getattr(torch, args.dtype)
    loaded = load_model(ModelConfig(model="smollm2", dtype=args.dtype))
    tokenizer = loaded.tokenizer
    prompts = make_prompts(tokenizer, args.num_prompts, args.seed)
    path = default_model_path()
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype).eval()
    llm = LLM(
        "smollm2",
        loaded=loaded,
        dtype=args.dtype,
        max_num_seqs=max(args.num_prompts, 1),
        max_num_batched_tokens=4096,
    )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id  # type: ignore[union-attr]

    # Warm both up (allocator, thread pools) on a small batch.
    run_pdserve(llm, prompts[:2], 4)
    run_hf(hf, prompts[:2], 4, pad_id)

    ours, theirs = [], []
    for _ in range(args.repeats):
        t_ours, out_ours = run_pdserve(llm, prompts, args.max_tokens)
        t_hf, out_hf = run_hf(hf, prompts, args.max_tokens, pad_id)
        ours.append(t_ours)
        theirs.append(t_hf)
    total = args.num_prompts * args.max_tokens
    same = sum(a == b for a, b in zip(out_ours, out_hf, strict=True))
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "dtype": args.dtype,
        "num_prompts": args.num_prompts,
        "max_tokens": args.max_tokens,
        "prompt_tokens": sum(len(p) for p in prompts),
        "pdserve_s": min(ours),
        "transformers_s": min(theirs),
        "pdserve_tok_s": total / min(ours),
        "transformers_tok_s": total / min(theirs),
        "speedup": min(theirs) / min(ours),
        "identical_outputs": f"{same}/{args.num_prompts}",
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
