"""`pdserve profile`: time this engine's steps and the KV transports on this machine, and fit the
PerfModel the simulator uses.

Prefill: one prompt of t tokens, for each t, chunk by chunk under the serving token budget
(`--max-num-batched-tokens`, default 512 as in `pdserve serve`), each chunk attending to the ones
before it. Decode: b sequences of c context tokens,
several decode steps each. Every step is `LLMEngine.step()` as a worker runs it (schedule, forward,
sample, detokenize). Transports: random KV tensors of the model's layout pushed layer by layer
through the kv_transfer connectors (local, shm, tcp over loopback), from the first send to the
receiver's completion callback. `--cpus` / `--threads` set the cores the engine computes on, so a
1-core profile (one worker per core, as in a 1P1D CPU deployment) and a 2-core one (a co-located
worker) can be compared.
"""

from __future__ import annotations

import os
import platform
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from pdserve.planner.perf_model import PerfModel, attention_pairs

COEFFS = ("overhead_s", "prefill_token_s", "attn_pair_s", "decode_seq_s", "decode_ctx_s")


@dataclass(frozen=True)
class ProfileSpec:
    model: str = "smollm2"
    dtype: str = "auto"
    device: str = "auto"
    threads: int | None = None
    cpus: str | None = None
    prefill_tokens: list[int] = field(default_factory=lambda: [64, 256, 512, 2048])
    decode_batches: list[int] = field(default_factory=lambda: [1, 4, 16])
    decode_contexts: list[int] = field(default_factory=lambda: [128, 512])
    transports: list[str] = field(default_factory=lambda: ["local", "shm", "tcp"])
    transfer_tokens: int = 1024
    # The serving token budget: prompts are timed chunk by chunk, as a worker with it runs them.
    max_num_batched_tokens: int = 512
    repeats: int = 3


def fit_nonnegative(rows: list[list[float]], times: list[float]) -> list[float]:
    """Least squares on relative error (each row divided by its time, so short steps count as much
    as long ones), with coefficients that come out negative pinned to 0 and the rest refitted."""
    active = list(range(len(rows[0])))
    while True:
        a = torch.tensor(
            [[r[j] / t for j in active] for r, t in zip(rows, times, strict=True)], dtype=torch.float64
        )
        b = torch.ones(len(times), 1, dtype=torch.float64)
        x = torch.linalg.lstsq(a, b).solution.flatten().tolist()
        negative = [active[i] for i, v in enumerate(x) if v < 0]
        if not negative:
            out = [0.0] * len(rows[0])
            for i, j in enumerate(active):
                out[j] = x[i]
            return out
        active = [j for j in active if j not in negative]


def _engine(spec: ProfileSpec) -> Any:
    from pdserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
    from pdserve.engine.engine import LLMEngine

    cfg = EngineConfig(
        model=ModelConfig(spec.model, dtype=spec.dtype, device=spec.device),
        cache=CacheConfig(kv_cache_memory_gb=1.0, enable_prefix_caching=False),
        scheduler=SchedulerConfig(
            max_num_seqs=max(spec.decode_batches), max_num_batched_tokens=spec.max_num_batched_tokens
        ),
    )
    return LLMEngine(cfg)


def _sync(engine: Any) -> None:
    if engine.device.type == "cuda":
        torch.cuda.synchronize()


def _time_prefill(engine: Any, tokens: int, repeats: int, rid: str) -> list[tuple[int, int, float]]:
    """(chunk tokens, cached tokens before it, seconds) of every prefill step of a `tokens` prompt,
    chunked by the engine's token budget exactly as a serving worker chunks it."""
    from pdserve.sampling_params import SamplingParams

    budget = engine.config.scheduler.max_num_batched_tokens
    out = []
    for i in range(repeats + 1):  # the first run warms up
        g = torch.Generator().manual_seed(1000 * tokens + i)
        prompt = torch.randint(100, 20000, (tokens,), generator=g).tolist()
        engine.add_request(f"{rid}-{i}", prompt, SamplingParams(temperature=0, max_tokens=1))
        done = 0
        while done < tokens:
            n = min(budget, tokens - done)
            _sync(engine)
            t0 = time.perf_counter()
            engine.step()
            _sync(engine)
            if i:
                out.append((n, done, time.perf_counter() - t0))
            done += n
        while engine.has_unfinished():
            engine.step()
    return out


def _time_decode(engine: Any, batch: int, ctx: int, steps: int, rid: str) -> list[float]:
    from pdserve.sampling_params import SamplingParams

    # Enough tokens that no sequence finishes while the others are still being prefilled
    # (prompts are chunked by the token budget), so every timed step decodes the whole batch.
    prefill_steps = batch * ctx // engine.config.scheduler.max_num_batched_tokens + batch + 2
    params = SamplingParams(temperature=0, max_tokens=prefill_steps + steps + 3, ignore_eos=True)
    for i in range(batch):
        prompt = torch.randint(100, 20000, (ctx,), generator=torch.Generator().manual_seed(i)).tolist()
        engine.add_request(f"{rid}-{i}", prompt, params)
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.running) or (
        engine.scheduler.waiting
    ):
        engine.step()
    engine.step()  # warm-up decode step
    out = []
    for _ in range(steps):
        _sync(engine)
        t0 = time.perf_counter()
        engine.step()
        _sync(engine)
        out.append(time.perf_counter() - t0)
    while engine.has_unfinished():
        engine.step()
    return out


def _time_transport(transport: str, layout: Any, tokens: int, repeats: int) -> float:
    """GB/s of one request's KV (`tokens` tokens, all layers) from first send to completion."""
    from pdserve.kv_transfer import make_receiver, make_sender
    from pdserve.kv_transfer.codec import torch_dtype
    from pdserve.kv_transfer.shm import ShmKVCache
    from pdserve.protocol import PrefillDone, PrefillJob

    blocks = -(-tokens // layout.block_size)
    num_blocks = blocks + 1
    shm = ShmKVCache(layout, num_blocks, tag="profile") if transport == "shm" else None
    dtype = torch_dtype(layout.dtype)
    shape = (2, num_blocks, layout.block_size, layout.num_kv_heads, layout.head_dim)
    caches = (
        shm.tensors
        if shm is not None
        else [torch.zeros(shape, dtype=dtype) for _ in range(layout.num_layers)]
    )
    done = threading.Event()
    secret = os.urandom(16)
    rx = make_receiver(
        transport, layout, caches, lambda d, s: done.set(), lambda r, e: done.set(), secret,
        shm_name=shm.name if shm else None,
    )  # fmt: skip
    tx = make_sender(transport, layout, "profile", secret)
    kv = torch.randn(layout.num_layers, 2, tokens, layout.num_kv_heads, layout.head_dim).to(dtype)
    nbytes = kv.numel() * kv.element_size()
    times = []
    try:
        for i in range(repeats + 1):
            rid = f"xfer-{i}"
            done.clear()
            rx.expect(rid, list(range(blocks)), 0)
            host, port = rx.endpoint
            job = PrefillJob(rid, [], {}, "d0", host, port, list(range(blocks)), 0, time.time() + 60, layout)
            t0 = time.perf_counter()
            for layer in range(layout.num_layers):
                tx.send_kv(job, layer, kv[layer : layer + 1], 0)
            tx.send_done(job, PrefillDone(rid, 1, None, tokens, 0))
            if not done.wait(60):
                raise TimeoutError(f"{transport}: transfer did not complete")
            if i:
                times.append(time.perf_counter() - t0)
    finally:
        tx.close()
        rx.close()
        if shm is not None:
            shm.close()
    return nbytes / statistics.median(times) / 1e9


def profile(spec: ProfileSpec) -> tuple[PerfModel, dict[str, Any]]:
    if spec.cpus:
        from pdserve.workers.common import set_cpu_affinity

        set_cpu_affinity(spec.cpus)
    if spec.threads:
        torch.set_num_threads(spec.threads)
    engine = _engine(spec)
    rows: list[list[float]] = []
    times: list[float] = []
    raw: dict[str, Any] = {"prefill": {}, "decode": {}, "links_gbps": {}}
    for t in spec.prefill_tokens:
        steps = _time_prefill(engine, t, spec.repeats, f"p{t}")
        raw["prefill"][str(t)] = steps
        rows += [[1.0, n, attention_pairs(n, c), 0.0, 0.0] for n, c, _ in steps]
        times += [dt for _, _, dt in steps]
    for b in spec.decode_batches:
        for c in spec.decode_contexts:
            ts = _time_decode(engine, b, c, max(spec.repeats, 3), f"d{b}x{c}")
            raw["decode"][f"{b}x{c}"] = ts
            rows += [[1.0, 0.0, 0.0, b, b * c] for _ in ts]
            times += ts
    coeffs = dict(zip(COEFFS, fit_nonnegative(rows, times), strict=True))
    from pdserve.workers.common import kv_layout

    layout = kv_layout(engine)
    links = {tr: _time_transport(tr, layout, spec.transfer_tokens, spec.repeats) for tr in spec.transports}
    raw["links_gbps"] = links
    threads = torch.get_num_threads()
    where = f"{platform.machine()} {engine.device.type}, {threads} thread(s)" + (
        f", cpus {spec.cpus}" if spec.cpus else ""
    )
    perf = PerfModel(
        name=f"{engine.model_name} {engine.dtype} on {where}",
        source="measured",
        kv_bytes_per_token=layout.bytes_per_token,
        num_layers=layout.num_layers,
        links_gbps=links,
        notes=f"pdserve profile, {time.strftime('%Y-%m-%d %H:%M')}; coefficients fitted on relative error",
        **coeffs,
    )
    return perf, raw
