"""`pdserve profile`: time this engine's steps and the KV transports on this machine, and fit the
PerfModel the simulator uses.

Prefill: one prompt of t tokens, for each t, chunk by chunk under the serving token budget
(`--max-num-batched-tokens`, default 512 as in `pdserve serve`), each chunk attending to the ones
before it. Decode: sequences of c context tokens, timed at every batch size of `decode_batches`
(the batch shrinks by aborting sequences, so one prefill serves every size): the step is not
linear in the batch, and the simulator interpolates between these sizes. A second sweep puts one
long sequence among short ones at every batch size, which shows that attention pays for the
padding to the longest context, and where its gathers outgrow the caches. Mixed steps put a new
prompt chunk next to running decodes, at a few batch sizes, to time what a decode adds to a step
that also prefills. Every step is `LLMEngine.step()` as a worker runs it (schedule, forward,
sample, detokenize), and on a thread of its own, as a worker's AsyncLLM steps its engine: with
two threads the same step runs slower off the process's main thread (on the CPU here a
150-token prefill took 183-198 ms on the main thread and 254-286 ms on a second one, a batch-1
decode 38-43 against 48-67 ms; one thread showed no difference), and a two-thread profile timed
on the main thread under-predicted the served co-located worker's prompt steps by ~50-100 ms.
Transports: random KV tensors of the model's layout pushed layer by layer through the kv_transfer
connectors (local, shm, tcp over loopback), from the first send to the receiver's
completion callback. `--cpus` / `--threads` set the cores the engine computes on, so a 1-core
profile (one worker per core, as in a 1P1D CPU deployment) and a 2-core one (a co-located worker)
can be compared; `--clock cpu` times a one-thread engine by its CPU time, which other processes on
a shared machine do not inflate. The fit is perf_fit.fit_steps.
"""

from __future__ import annotations

import logging
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from pdserve.planner.perf_fit import DecodeStep, MixedStep, PrefillStep, fit_steps
from pdserve.planner.perf_model import PerfModel

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProfileSpec:
    model: str = "smollm2"
    dtype: str = "auto"
    device: str = "auto"
    threads: int | None = None
    cpus: str | None = None
    prefill_tokens: list[int] = field(default_factory=lambda: [64, 256, 512, 2048])
    decode_batches: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 5, 6, 8, 12, 16, 24, 32])
    decode_contexts: list[int] = field(default_factory=lambda: [128, 512])
    # A context sweep stops at batch * context = this many tokens (each needs prefilling first);
    # None: 8,192 on a CPU, 262,144 on a GPU (where batches of 64-256 are the operating range).
    max_decode_tokens: int | None = None
    # One sequence this long (at most the model's context less 128) among short ones
    # (decode_contexts[0]), at every batch size from 2; 0 skips it.
    mixed_long_context: int = 1920
    # Mixed steps: a new prompt of `chunk_tokens` next to this many running decodes (of each of
    # the first two decode_contexts); empty skips them.
    chunk_batches: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    chunk_tokens: int = 128
    transports: list[str] = field(default_factory=lambda: ["local", "shm", "tcp"])
    transfer_tokens: int = 1024
    # The serving token budget: prompts are timed chunk by chunk, as a worker with it runs them.
    max_num_batched_tokens: int = 512
    repeats: int = 3
    # "wall", or "cpu": the engine thread's CPU time, which another process sharing the core does
    # not inflate. Only for one thread on a CPU, where all of a step's work runs on that thread.
    clock: str = "wall"

    def __post_init__(self) -> None:
        if self.clock not in ("wall", "cpu"):
            raise ValueError(f"clock must be wall|cpu, got {self.clock!r}")
        if self.clock == "cpu" and (self.threads != 1 or self.device not in ("cpu", "auto")):
            raise ValueError("clock 'cpu' times the calling thread only: use it with one thread on a CPU")


# The steps a profile times where the flags leave them unset, by device. On a GPU they are the
# steps `pdserve serve` runs there (2,048-token budget, batches to 128 and more): a profile of
# 512-token chunks beside 8 short decodes priced an H100's 2,048-token mixed steps at a fraction
# of their cost, and the simulator replayed co-located runs at full attainment where they reached
# 0.59-0.91 (docs/benchmarks.md).
PROFILE_DEFAULTS: dict[str, dict[str, Any]] = {
    "cpu": {
        "prefill_tokens": [64, 256, 512, 2048],
        "decode_batches": [1, 2, 3, 4, 5, 6, 8, 12, 16, 24, 32],
        "decode_contexts": [128, 512],
        "chunk_batches": [1, 2, 4, 8],
        "chunk_tokens": 128,
        "max_num_batched_tokens": 512,
    },
    "cuda": {
        "prefill_tokens": [64, 256, 512, 2048, 4096],
        "decode_batches": [1, 16, 64, 128],
        "decode_contexts": [512, 2048],
        "chunk_batches": [1, 16, 64, 128],
        "max_num_batched_tokens": 2048,
    },
}


def profile_defaults(device_type: str, chosen: dict[str, Any]) -> dict[str, Any]:
    """ProfileSpec's step fields for a `device_type` engine: `chosen` where given, else the
    device's defaults; on a GPU the mixed steps' chunk fills the budget beside the largest batch."""
    defaults = PROFILE_DEFAULTS["cuda" if device_type == "cuda" else "cpu"]
    out: dict[str, Any] = {k: list(v) if isinstance(v, list) else v for k, v in defaults.items()}  # a copy
    out |= chosen
    if "chunk_tokens" not in out:
        out["chunk_tokens"] = max(out["max_num_batched_tokens"] - max(out["chunk_batches"], default=0), 1)
    return out


def _engine(spec: ProfileSpec) -> Any:
    from pdserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
    from pdserve.engine.engine import LLMEngine

    cfg = EngineConfig(
        model=ModelConfig(spec.model, dtype=spec.dtype, device=spec.device),
        cache=CacheConfig(kv_cache_memory_gb=1.0, enable_prefix_caching=False),
        scheduler=SchedulerConfig(
            # One more than any timed batch: a mixed step's new prompt joins the largest one.
            max_num_seqs=max([*spec.decode_batches, *spec.chunk_batches]) + 1,
            max_num_batched_tokens=spec.max_num_batched_tokens,
        ),
    )
    return LLMEngine(cfg)


def _sync(engine: Any) -> None:
    if engine.device.type == "cuda":
        torch.cuda.synchronize()


def _timed_step(engine: Any, clock: Callable[[], float]) -> float:
    _sync(engine)
    t0 = clock()
    engine.step()
    _sync(engine)
    return clock() - t0


def _prompt(engine: Any, tokens: int, g: torch.Generator) -> list[int]:
    """Random token ids (below the model's vocabulary, past the special tokens at its start)."""
    high = min(20000, engine.arch.vocab_size)
    return torch.randint(min(100, high // 2), high, (tokens,), generator=g).tolist()


def _time_prefill(
    engine: Any, tokens: int, repeats: int, rid: str, clock: Callable[[], float]
) -> list[PrefillStep]:
    """Every prefill step of a `tokens` prompt, chunked by the engine's token budget exactly as a
    serving worker chunks it."""
    from pdserve.sampling_params import SamplingParams

    budget = engine.config.scheduler.max_num_batched_tokens
    out = []
    for i in range(repeats + 1):  # the first run warms up
        g = torch.Generator().manual_seed(1000 * tokens + i)
        prompt = _prompt(engine, tokens, g)
        engine.add_request(f"{rid}-{i}", prompt, SamplingParams(temperature=0, max_tokens=1))
        done = 0
        while done < tokens:
            n = min(budget, tokens - done)
            dt = _timed_step(engine, clock)
            if i:
                out.append(PrefillStep(n, done, dt))
            done += n
        while engine.has_unfinished():
            engine.step()
    return out


def _time_decode(
    engine: Any, contexts: list[int], batches: list[int], steps: int, rid: str, clock: Callable[[], float]
) -> list[DecodeStep]:
    """Decode steps of sequences with prompts of `contexts` tokens, timed at each size of `batches`
    from the largest down: all sequences first, then the last ones aborted down to each size."""
    from pdserve.sampling_params import SamplingParams

    sizes = sorted({b for b in batches if 1 <= b <= len(contexts)}, reverse=True)
    # Enough tokens that no sequence finishes while the others are still being prefilled
    # (prompts are chunked by the token budget) or before the smallest batch is timed.
    prefill_steps = sum(contexts) // engine.config.scheduler.max_num_batched_tokens + len(contexts) + 2
    params = SamplingParams(
        temperature=0, max_tokens=prefill_steps + (steps + 1) * len(sizes) + 3, ignore_eos=True
    )
    ids = _start_decoding(engine, contexts, params, rid)
    out = []
    for b in sizes:
        for request_id in ids[b:]:
            engine.abort_request(request_id)
        ids = ids[:b]
        engine.step()  # warm-up at this size
        for _ in range(steps):
            ctx = [r.num_computed_tokens for r in engine.scheduler.running]
            out.append(DecodeStep(len(ctx), sum(ctx), max(ctx), _timed_step(engine, clock)))
    for request_id in ids:
        engine.abort_request(request_id)
    return out


def _start_decoding(engine: Any, contexts: list[int], params: Any, rid: str) -> list[str]:
    """Requests with prompts of `contexts` tokens (seeded by their index), stepped until every
    prompt is prefilled; returns their ids."""
    ids = [f"{rid}-{i}" for i in range(len(contexts))]
    for i, (request_id, length) in enumerate(zip(ids, contexts, strict=True)):
        engine.add_request(request_id, _prompt(engine, length, torch.Generator().manual_seed(i)), params)
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.running) or (
        engine.scheduler.waiting
    ):
        engine.step()
    return ids


def _time_mixed(
    engine: Any,
    context: int,
    batches: list[int],
    tokens: int,
    steps: int,
    rid: str,
    clock: Callable[[], float],
) -> list[MixedStep]:
    """Steps that compute a new `tokens`-token prompt next to each size of `batches` running
    decodes (prompts of `context` tokens), largest batch first, shrinking by aborts."""
    from pdserve.sampling_params import SamplingParams

    sizes = sorted({b for b in batches if b >= 1}, reverse=True)
    if not sizes:
        return []
    budget = engine.config.scheduler.max_num_batched_tokens
    prefill_steps = sizes[0] * context // budget + sizes[0] + 2
    params = SamplingParams(
        temperature=0, max_tokens=prefill_steps + (steps + 3) * len(sizes) + 3, ignore_eos=True
    )
    ids = _start_decoding(engine, [context] * sizes[0], params, rid)
    out = []
    for b in sizes:
        for request_id in ids[b:]:
            engine.abort_request(request_id)
        ids = ids[:b]
        engine.step()
        for i in range(steps + 1):  # the first one warms up
            g = torch.Generator().manual_seed(7000 + 100 * b + i)
            prompt = _prompt(engine, tokens, g)
            new_id = f"{rid}-new-{b}-{i}"
            engine.add_request(new_id, prompt, SamplingParams(temperature=0, max_tokens=1))
            ctx = sum(r.num_computed_tokens for r in engine.scheduler.running)
            dt = _timed_step(engine, clock)
            if any(r.request_id == new_id for r in engine.scheduler.waiting):
                # A step without the prompt is a decode-only step: timing it as mixed would teach
                # the fit that a chunk costs nothing.
                raise RuntimeError(
                    f"mixed step of {b} decodes + {tokens} prompt tokens ran without the prompt"
                )
            if i:
                out.append(MixedStep(b, ctx, tokens, 0, dt))
    for request_id in ids:
        engine.abort_request(request_id)
    return out


def _on_engine_thread(fn: Callable[[], Any]) -> Any:
    """fn() on a new thread (as AsyncLLM steps a worker's engine), its result or its exception."""
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["value"] = fn()
        except BaseException as e:  # re-raised on the caller's thread
            result["error"] = e

    thread = threading.Thread(target=target, name="pdserve-engine")
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["value"]


def time_transport(transport: str, layout: Any, tokens: int, repeats: int) -> float:
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


def _time_steps(
    engine: Any, spec: ProfileSpec, clock: Callable[[], float]
) -> tuple[list[PrefillStep], list[DecodeStep], list[MixedStep]]:
    prefill: list[PrefillStep] = []
    for t in spec.prefill_tokens:
        prefill += _time_prefill(engine, t, spec.repeats, f"p{t}", clock)
    decode: list[DecodeStep] = []
    steps = max(spec.repeats, 3)
    cap = spec.max_decode_tokens or (262144 if engine.device.type == "cuda" else 8192)
    for c in spec.decode_contexts:
        batches = [b for b in spec.decode_batches if b * c <= cap]
        if len(batches) < len(spec.decode_batches):
            skipped = sorted(set(spec.decode_batches) - set(batches))
            logger.warning("context %d: batches %s skipped (batch x context > %d)", c, skipped, cap)
        if batches:
            decode += _time_decode(engine, [c] * max(batches), batches, steps, f"d{c}", clock)
    if spec.mixed_long_context:
        short, batches = spec.decode_contexts[0], [b for b in spec.decode_batches if b >= 2]
        if batches:
            # Room for the tokens decoded while the batch shrinks through every size.
            long = min(spec.mixed_long_context, engine.max_model_len - 128)
            contexts = [long] + [short] * (max(batches) - 1)
            decode += _time_decode(engine, contexts, batches, steps, "mixed", clock)
    room = spec.max_num_batched_tokens - spec.chunk_tokens  # decodes that fit beside the chunk
    mixed: list[MixedStep] = []
    for c in spec.decode_contexts[:2]:  # two contexts: a decode's cost apart from its context's
        mixed += _time_mixed(
            engine,
            c,
            [b for b in spec.chunk_batches if b <= room],
            spec.chunk_tokens,
            steps,
            f"chunk{c}",
            clock,
        )
    return prefill, decode, mixed


def profile(spec: ProfileSpec) -> tuple[PerfModel, dict[str, Any]]:
    if spec.cpus:
        from pdserve.workers.common import set_cpu_affinity

        set_cpu_affinity(spec.cpus)
    if spec.threads:
        torch.set_num_threads(spec.threads)
    engine = _engine(spec)
    if spec.clock == "cpu" and engine.device.type != "cpu":
        raise ValueError("clock 'cpu' needs the engine on a CPU")
    clock = time.thread_time if spec.clock == "cpu" else time.perf_counter
    prefill, decode, mixed = _on_engine_thread(lambda: _time_steps(engine, spec, clock))
    fitted = fit_steps(prefill, decode, mixed)
    from pdserve.workers.common import kv_layout

    layout = kv_layout(engine)
    links = {tr: time_transport(tr, layout, spec.transfer_tokens, spec.repeats) for tr in spec.transports}
    raw: dict[str, Any] = {
        "prefill": [[s.tokens, s.cached, s.seconds] for s in prefill],
        "decode": [[s.batch, s.ctx_tokens, s.max_ctx, s.seconds] for s in decode],
        "mixed": [[s.batch, s.ctx_tokens, s.tokens, s.cached, s.seconds] for s in mixed],
        "links_gbps": links,
    }
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
        notes=f"pdserve profile, {time.strftime('%Y-%m-%d %H:%M')}, {spec.clock} clock; "
        "coefficients fitted on relative error",
        **fitted,
    )
    return perf, raw
