"""Workloads: what each request asks for (prompt length, output length) and when it arrives.

Prompts are token-id lists, so a prompt's length is exact whatever the tokenizer; random ids from
the middle of the vocabulary avoid special tokens. Trace files (JSONL) may name lengths,
timestamps and Mooncake-style hashed prefixes (blocks with equal hash ids share their tokens).
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

WORKLOADS = ("fixed", "uniform", "bimodal", "sharegpt", "short")


@dataclass(frozen=True)
class RequestSpec:
    index: int
    prompt: list[int]
    output_len: int
    arrival_s: float  # offset from the start of the run; 0 for every request under fixed concurrency


@dataclass(frozen=True)
class LengthSampler:
    """Draws (prompt_len, output_len) pairs."""

    kind: str
    prompt_len: int = 512
    output_len: int = 128
    # bimodal: the share of long prompts and both ranges
    long_share: float = 0.2
    short_range: tuple[int, int] = (50, 200)
    long_range: tuple[int, int] = (1500, 2000)
    output_range: tuple[int, int] = (64, 128)

    def __post_init__(self) -> None:
        if self.kind not in WORKLOADS:
            raise ValueError(
                f"unknown workload {self.kind!r} (choose: {', '.join(WORKLOADS)}, or a .jsonl trace)"
            )
        if not 0 <= self.long_share <= 1:
            raise ValueError(f"long_share must be in [0, 1], got {self.long_share}")

    def draw(self, rng: random.Random) -> tuple[int, int]:
        if self.kind == "fixed":
            return self.prompt_len, self.output_len
        if self.kind == "uniform":
            return rng.randint(1, 2 * self.prompt_len), rng.randint(1, 2 * self.output_len)
        if self.kind == "bimodal":
            lo, hi = self.long_range if rng.random() < self.long_share else self.short_range
            return rng.randint(lo, hi), rng.randint(*self.output_range)
        if self.kind == "short":
            return rng.randint(*self.short_range), rng.randint(*self.output_range)
        # sharegpt-like: log-normal lengths fitted to public conversation statistics
        # (median prompt ~ 250 tokens with a long tail, median output ~ 200).
        p = int(min(max(rng.lognormvariate(math.log(250), 1.0), 4), 4000))
        o = int(min(max(rng.lognormvariate(math.log(200), 0.8), 4), 1500))
        return p, o


def random_prompt(rng: random.Random, length: int, vocab_size: int) -> list[int]:
    lo, hi = min(100, vocab_size // 4), max(vocab_size - 100, vocab_size * 3 // 4)
    return [rng.randrange(lo, hi) for _ in range(length)]


def arrivals(rng: random.Random, rate: float | None, n: int, burstiness: float = 1.0) -> list[float]:
    """Arrival offsets: gamma-distributed gaps with mean 1/rate (burstiness 1 = Poisson; < 1 burstier).
    rate None: everything at once (fixed-concurrency runs pace themselves)."""
    if rate is None:
        return [0.0] * n
    if rate <= 0 or burstiness <= 0:
        raise ValueError("rate and burstiness must be > 0")
    t, out = 0.0, []
    for _ in range(n):
        t += rng.gammavariate(burstiness, 1.0 / (rate * burstiness))
        out.append(t)
    return out


def synthetic(
    sampler: LengthSampler,
    num_requests: int,
    rate: float | None,
    vocab_size: int,
    seed: int = 0,
    burstiness: float = 1.0,
    max_model_len: int | None = None,
) -> list[RequestSpec]:
    rng = random.Random(seed)
    times = arrivals(rng, rate, num_requests, burstiness)
    specs = []
    for i in range(num_requests):
        p, o = sampler.draw(rng)
        if max_model_len is not None:
            p = min(p, max_model_len - o - 1)
        specs.append(RequestSpec(i, random_prompt(rng, p, vocab_size), o, times[i]))
    return specs


def load_trace(
    path: Path, vocab_size: int, seed: int = 0, block_tokens: int = 512, time_scale: float = 1.0
) -> list[RequestSpec]:
    """JSONL, one request per line. Accepted fields: `timestamp` (ms, Mooncake) or `arrival_s`;
    `input_length` / `prompt_len`; `output_length` / `output_len`; `hash_ids` (Mooncake: one id per
    `block_tokens` prompt tokens; equal ids mean equal tokens, so shared prefixes are reproduced)."""
    rng = random.Random(seed)
    blocks: dict[int, list[int]] = {}
    specs: list[RequestSpec] = []
    t0: float | None = None
    for i, line in enumerate(x for x in path.read_text().splitlines() if x.strip()):
        rec = json.loads(line)
        p = int(rec.get("input_length", rec.get("prompt_len", 0)))
        o = int(rec.get("output_length", rec.get("output_len", 128)))
        t = float(rec["timestamp"]) / 1000 if "timestamp" in rec else float(rec.get("arrival_s", 0.0))
        t0 = t if t0 is None else t0
        prompt: list[int] = []
        for h in rec.get("hash_ids", []):
            if h not in blocks:
                blocks[h] = random_prompt(rng, block_tokens, vocab_size)
            prompt += blocks[h]
        prompt = prompt[:p] if prompt else []
        prompt += random_prompt(rng, max(p - len(prompt), 0), vocab_size)
        specs.append(RequestSpec(i, prompt, max(o, 1), (t - t0) * time_scale))
    return specs


def iter_rates(lo: float, hi: float, steps: int) -> Iterator[float]:
    for i in range(steps):
        yield lo + (hi - lo) * i / max(steps - 1, 1)
