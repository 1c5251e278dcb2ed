"""GPU suite, engine: decode tok/s at batch 1, 32 and 64 against the roofline, prefill time and TFLOP/s,
CUDA-graph tokens against eager tokens; then transformers `generate` on the same weights."""

from __future__ import annotations

import dataclasses
import random
import statistics
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from gpu_suite_common import Table, sync

from pdserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from pdserve.engine.engine import LLMEngine
from pdserve.engine.model import CausalLM, ModelArch
from pdserve.sampling_params import SamplingParams


def linear_params(arch: ModelArch) -> int:
    """Parameters a token multiplies through, without the LM head."""
    h, i = arch.hidden_size, arch.intermediate_size
    per_layer = h * (arch.q_size + 2 * arch.kv_size) + arch.q_size * h + 3 * h * i
    return arch.num_layers * per_layer


class EngineBench:
    def __init__(
        self, table: Table, model: str, device: torch.device, dry: bool, copy_bw: float, matmul_flops: float
    ) -> None:
        self.table = table
        self.model = model
        self.device = device
        self.dry = dry
        self.copy_bw = copy_bw
        self.matmul_flops = matmul_flops
        self.engine: LLMEngine | None = None
        self.rng = random.Random(0)
        self.ctx = 64 if dry else 1024
        self.steps = 8 if dry else 96
        self.hf: Any = None
        self.profile_dir: Path | None = None
        self.device_ms = float("nan")
        self.kv_cache_dtype = "auto"  # or "fp8": e4m3 KV cache (half the KV bytes of bf16)

    # ---- helpers ----

    def prompt(self, n: int) -> list[int]:
        assert self.engine is not None
        return [self.rng.randrange(3, self.engine.arch.vocab_size) for _ in range(n)]

    def add(self, prefix: str, count: int, length: int, max_tokens: int) -> list[str]:
        assert self.engine is not None
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        ids = [f"{prefix}-{i}" for i in range(count)]
        for rid in ids:
            self.engine.add_request(rid, self.prompt(length), params)
        return ids

    def until_first_tokens(self, ids: list[str]) -> dict[str, list[int]]:
        assert self.engine is not None
        tokens: dict[str, list[int]] = defaultdict(list)
        while any(not tokens[r] for r in ids):
            for out in self.engine.step():
                tokens[out.request_id] += out.new_token_ids
        return tokens

    def drain(self) -> None:
        assert self.engine is not None
        while self.engine.has_unfinished():
            self.engine.step()

    def decode_rate(self, batch: int, ctx: int) -> tuple[float, float, dict[str, list[int]]]:
        """(tokens/s, median step ms, tokens) over `steps` decode-only steps of `batch` sequences."""
        assert self.engine is not None
        ids = self.add(f"d{batch}x{ctx}", batch, ctx, self.steps + 24)
        tokens = self.until_first_tokens(ids)
        sync(self.device)
        times, produced = [], 0
        graphs = self.engine.runner.graphs
        events: list[tuple[Any, Any]] = []
        if graphs is not None and self.device.type == "cuda":
            # Device time of each replay (inputs copy + graph), to tell GPU time from host time.
            replay = graphs.run

            def timed(scheduled: list[Any], input_ids: torch.Tensor | None = None) -> torch.Tensor:
                pair = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                pair[0].record()
                logits = replay(scheduled, input_ids)
                pair[1].record()
                events.append(pair)
                return logits

            graphs.run = timed  # type: ignore[method-assign]
        t_start = time.perf_counter()
        for _ in range(self.steps):
            t0 = time.perf_counter()
            outs = self.engine.step()  # ends with the host reading the sampled ids: a full sync
            times.append(time.perf_counter() - t0)
            produced += sum(len(o.new_token_ids) for o in outs)
            for o in outs:
                tokens[o.request_id] += o.new_token_ids
        elapsed = time.perf_counter() - t_start
        sync(self.device)  # the step launched ahead by the last call is still running
        if graphs is not None and events:
            del graphs.run  # back to the class's method
            device_ms = statistics.median(a.elapsed_time(b) for a, b in events)
            self.device_ms = device_ms
        else:
            self.device_ms = float("nan")
        self.drain()
        return produced / elapsed, statistics.median(times) * 1e3, tokens

    def step_time(self, specs: list[int], repeats: int = 3) -> float:
        """Median seconds of the single step that prefills prompts of these lengths (and samples)."""
        assert self.engine is not None
        times = []
        for r in range(repeats):
            params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
            for i, n in enumerate(specs):
                self.engine.add_request(f"p{r}-{i}-{n}", self.prompt(n), params)
            sync(self.device)
            t0 = time.perf_counter()
            self.engine.step()
            sync(self.device)  # a step may return before its samples are read (async decode)
            times.append(time.perf_counter() - t0)
            self.drain()
        return statistics.median(times)

    def profile_eager_step(self, batch: int, ctx: int) -> None:
        """Device time per kernel of a few eager decode steps (what a graph replays back to back)."""
        from torch.profiler import ProfilerActivity, profile

        assert self.engine is not None and self.profile_dir is not None
        eng = self.engine
        ids = self.add(f"prof{batch}", batch, ctx, 40)
        self.until_first_tokens(ids)
        graphs, eng.runner.graphs = eng.runner.graphs, None
        eng.step()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                eng.step()
        eng.runner.graphs = graphs
        self.drain()
        text = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30)
        (self.profile_dir / f"profile_b{batch}.txt").write_text(text)
        print(text, flush=True)

    # ---- the runs ----

    def run(self) -> None:
        t0 = time.monotonic()
        budget = 8192 if not self.dry else 1024
        cfg = EngineConfig(
            model=ModelConfig(model=self.model, dtype="float32" if self.dry else "bfloat16"),
            cache=CacheConfig(
                gpu_memory_utilization=0.55,
                enable_prefix_caching=False,
                num_blocks=512 if self.dry else None,
                kv_cache_dtype=self.kv_cache_dtype,
            ),
            scheduler=SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=budget),
        )
        self.engine = eng = LLMEngine(cfg)
        arch = eng.arch
        table, bw = self.table, self.copy_bw
        kv_gib = (
            eng.block_manager.num_blocks
            * eng.block_manager.block_size
            * arch.kv_bytes_per_token(eng.kv_dtype)
        )
        table.add("engine", "startup (load, KV, graph capture)", f"{time.monotonic() - t0:.1f} s",
                  f"{eng.runner.backend.name}, graphs={eng.cuda_graphs}, KV {kv_gib / 2**30:.1f} GiB "
                  f"{eng.kv_dtype} at gpu_memory_utilization 0.55")  # fmt: skip

        itemsize = eng.dtype.itemsize
        weight_bytes = (arch.num_parameters() - arch.vocab_size * arch.hidden_size) * itemsize
        if arch.tie_word_embeddings:  # the tied table is read as the LM head
            weight_bytes += arch.vocab_size * arch.hidden_size * itemsize
        all_weights = arch.num_parameters() * itemsize
        table.add("engine", "roofline b1 (weights read / copy BW)", f"{bw / weight_bytes:.0f} tok/s",
                  f"{weight_bytes / 1e9:.2f} GB read per step; all weights {all_weights / 1e9:.2f} GB "
                  f"-> {bw / all_weights:.0f} tok/s")  # fmt: skip

        # Batch 1: graphs, then the same prompt eagerly (token check and the graphs' gain).
        rate, step_ms, graph_tokens = self.decode_rate(1, 128)
        table.add("engine", "decode b1 (CUDA graphs)", f"{rate:.1f} tok/s",
                  f"{step_ms:.2f} ms/step ({self.device_ms:.2f} on the GPU), "
                  f"{100 * rate * weight_bytes / bw:.0f}% of roofline; target >= 160", tok_s=rate)  # fmt: skip
        self.step_by_step("decode b1", 1, 128, rate)
        graphs, eng.runner.graphs = eng.runner.graphs, None
        self.rng = random.Random(0)  # the same prompt again
        eager_rate, eager_ms, eager_tokens = self.decode_rate(1, 128)
        eng.runner.graphs = graphs
        same = next(iter(graph_tokens.values())) == next(iter(eager_tokens.values()))
        table.add("engine", "decode b1 eager (no graphs)", f"{eager_rate:.1f} tok/s",
                  f"{eager_ms:.2f} ms/step; greedy tokens identical to graphs: {same}")  # fmt: skip
        if self.profile_dir is not None:
            self.profile_eager_step(1, 128)
            self.profile_eager_step(32, self.ctx)

        for batch in (32, 64):
            rate, step_ms, _ = self.decode_rate(batch, self.ctx)
            ctx_mid = self.ctx + self.steps // 2 + 12
            step_bytes = weight_bytes + batch * ctx_mid * arch.kv_bytes_per_token(eng.kv_dtype)
            roof = batch * bw / step_bytes
            table.add("engine", f"decode b{batch} at {self.ctx} ctx", f"{rate:.0f} tok/s",
                      f"{step_ms:.2f} ms/step ({self.device_ms:.2f} on the GPU); roofline {roof:.0f} tok/s "
                      f"-> {100 * rate / roof:.0f}%", tok_s=rate)  # fmt: skip
            self.step_by_step(f"decode b{batch} at {self.ctx} ctx", batch, self.ctx, rate)

        self.prefill_runs(arch, eng)

    def step_by_step(self, name: str, batch: int, ctx: int, ahead_rate: float) -> None:
        """The same decode with every step read before the next is launched (async decode off),
        right after the run with it on: the side-by-side gain of launching ahead."""
        eng = self.engine
        assert eng is not None
        if not eng.async_decode:
            return
        eng.async_decode = False
        try:
            rate, step_ms, _ = self.decode_rate(batch, ctx)
        finally:
            eng.async_decode = True
        self.table.add("engine", f"{name}, step by step", f"{rate:.1f} tok/s",
                       f"{step_ms:.2f} ms/step ({self.device_ms:.2f} on the GPU); launching ahead "
                       f"{ahead_rate / rate:.3f}x")  # fmt: skip

    def prefill_runs(self, arch: ModelArch, eng: LLMEngine) -> None:
        table, lin = self.table, linear_params(arch)
        heads_dim_layers = arch.num_heads * arch.head_dim * arch.num_layers
        head = 2 * arch.hidden_size * arch.vocab_size  # LM head FLOPs per sampled row
        long, n16, short = (4096, 16, 512) if not self.dry else (256, 4, 32)

        def flops(lengths: list[int]) -> float:
            attn = sum(4 * heads_dim_layers * n * (n + 1) / 2 for n in lengths)
            return 2 * lin * sum(lengths) + attn + head * len(lengths)

        t = self.step_time([long])
        table.add("engine", f"prefill 1x{long} (one step)", f"{t * 1e3:.1f} ms",
                  f"{flops([long]) / t / 1e12:.0f} TFLOP/s = {100 * flops([long]) / t / self.matmul_flops:.0f}% "
                  "of matmul peak")  # fmt: skip
        t = self.step_time([short] * n16)
        f = flops([short] * n16)
        table.add("engine", f"prefill {n16}x{short} batched (one step)", f"{t * 1e3:.1f} ms",
                  f"{f / t / 1e12:.0f} TFLOP/s = {100 * f / t / self.matmul_flops:.0f}% of matmul peak",
                  tflops=f / t / 1e12)  # fmt: skip
        # A 512-token budget (a CPU's default): the same prompt in chunks over the cached prefix.
        eng.scheduler.cfg = dataclasses.replace(eng.scheduler.cfg, max_num_batched_tokens=short)
        ids = self.add("chunked", 1, long, 1)
        sync(self.device)
        t0 = time.perf_counter()
        self.until_first_tokens(ids)
        t = time.perf_counter() - t0
        table.add("engine", f"prefill 1x{long} in {short}-token chunks", f"{t * 1e3:.1f} ms",
                  f"{long // short} steps, {flops([long]) / t / 1e12:.0f} TFLOP/s")  # fmt: skip
        self.drain()

    # ---- transformers on the same weights ----

    def run_hf(self) -> None:
        from transformers import AutoModelForCausalLM, LlamaConfig

        from pdserve.engine.shapes import get_shape

        assert self.engine is not None
        ours: CausalLM = self.engine.runner.model
        shape = get_shape(self.model.removeprefix("dummy:"))
        cfg = LlamaConfig(**{k: v for k, v in shape.items() if k not in ("architectures", "model_type")})
        dtype = self.engine.dtype
        with torch.device(self.device):  # built in bf16 on the GPU: no fp32 copy of 8B parameters
            hf = AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
        copy_weights(ours, hf)
        del ours
        self.close()  # free our engine's memory
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.hf = hf
        vocab = cfg.vocab_size
        short = 128 if not self.dry else 16
        ctx = self.ctx
        for name, batch, length, new, static in [
            ("default", 1, short, 24, False),
            ("default", 32, ctx, 12, False),
            ("static", 32, ctx, 16, True),
            ("static", 1, short, 32, True),
        ]:
            if self.dry:
                if static:
                    continue  # compiling on CPU is no plumbing check
                new = 4
            t0 = time.monotonic()
            try:
                rate = hf_decode_rate(hf, batch, length, new, static, vocab, self.device)
            except Exception as e:  # e.g. compilation unavailable: report it, run the rest
                self.table.add("hf", f"generate {name} b{batch}", "FAILED", f"{type(e).__name__}: {e}"[:120])
                continue
            self.table.add("hf", f"generate {name} b{batch} at {length} ctx", f"{rate:.1f} tok/s",
                           f"decode steps only; run took {time.monotonic() - t0:.0f} s (compile incl.)",
                           tok_s=rate)  # fmt: skip
        ids = torch.randint(3, vocab, (1, 4096 if not self.dry else 256), device=self.device)
        with torch.inference_mode():
            hf(ids, logits_to_keep=1)
            sync(self.device)
            t0 = time.perf_counter()
            hf(ids, logits_to_keep=1)
            sync(self.device)
        self.table.add(
            "hf", f"forward 1x{ids.shape[1]} prefill", f"{(time.perf_counter() - t0) * 1e3:.1f} ms"
        )

    def close(self) -> None:
        import gc

        self.engine = None
        self.hf = None
        gc.collect()


@torch.inference_mode()
def copy_weights(ours: CausalLM, hf: Any) -> None:
    arch = ours.arch
    q, kv, inter = arch.q_size, arch.kv_size, arch.intermediate_size
    hf.model.embed_tokens.weight.copy_(ours.embed_tokens.weight)
    hf.model.norm.weight.copy_(ours.norm.weight)
    hf.lm_head.weight.copy_(ours.lm_head.weight)
    for mine, theirs in zip(ours.layers, hf.model.layers, strict=True):
        qkv = mine.self_attn.qkv_proj.weight
        theirs.self_attn.q_proj.weight.copy_(qkv[:q])
        theirs.self_attn.k_proj.weight.copy_(qkv[q : q + kv])
        theirs.self_attn.v_proj.weight.copy_(qkv[q + kv :])
        theirs.self_attn.o_proj.weight.copy_(mine.self_attn.o_proj.weight)
        gate_up = mine.mlp.gate_up_proj.weight
        theirs.mlp.gate_proj.weight.copy_(gate_up[:inter])
        theirs.mlp.up_proj.weight.copy_(gate_up[inter:])
        theirs.mlp.down_proj.weight.copy_(mine.mlp.down_proj.weight)
        theirs.input_layernorm.weight.copy_(mine.input_layernorm.weight)
        theirs.post_attention_layernorm.weight.copy_(mine.post_attention_layernorm.weight)


def hf_decode_rate(
    hf: Any, batch: int, length: int, new: int, static: bool, vocab: int, device: torch.device
) -> float:
    """Decode tokens/s of `generate`: the time between the first and last logits-processor calls
    (one per step), after a warm-up call of the same shape (which compiles the static-cache path)."""
    from transformers import LogitsProcessor, LogitsProcessorList

    stamps: list[float] = []

    class Stamp(LogitsProcessor):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            sync(device)
            stamps.append(time.perf_counter())
            return scores

    ids = torch.randint(3, vocab, (batch, length), device=device)
    kwargs: dict[str, Any] = {
        "attention_mask": torch.ones_like(ids), "do_sample": False, "max_new_tokens": new,
        "min_new_tokens": new, "pad_token_id": 0, "logits_processor": LogitsProcessorList([Stamp()]),
    }  # fmt: skip
    if static:
        kwargs["cache_implementation"] = "static"
    with torch.inference_mode():
        hf.generate(ids, **kwargs)
        stamps.clear()
        hf.generate(ids, **kwargs)
    return batch * (len(stamps) - 1) / (stamps[-1] - stamps[0])
