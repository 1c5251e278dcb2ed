"""The engine's cost model: step time from what a step computes, and KV link bandwidths.

Fitted by `pdserve profile` on the current hardware, or written from first principles for
hardware we do not have at hand (then `source` says "modelled"). One engine step costs

    step_s = overhead [+ prefill_overhead] + max(weights_read_s, prompt + decode(batch))
    prompt = max(prefill_floor_s, prefill_token_s * prefill_tokens + attn_pair_s * attention_pairs)
             + decode_ctx_s * context_tokens + decode_pad_s * padded_positions
             + serving_step_s + serving_seq_s * streamed_tokens [+ serving_prompt_s]

where decode(batch) is the measured table below in a decode-only step and mixed_decode_s * batch
in a step that also computes a prompt chunk, and prefill_overhead is paid by steps that compute
a prompt chunk: their fixed cost differs from a decode step's (on the CPU here, with two threads
on the worker's engine thread, ~95 ms against ~50 ms).

The max is the roofline: a step reads the weights once and computes on every token, whichever
takes longer (on a GPU small decode batches are memory-bound, prompts compute-bound); a CPU
profile fits weights_read_s = 0, which leaves a plain linear model. A prompt chunk of t tokens
after c cached ones has t * (c + (t + 1) / 2) attention pairs (causal). Each decode reads its
context's KV.

Two decode-only effects a linear fit over a few batch sizes misses, both measured by the profile:
- `decode_batch_s`: the decode part of a decode-only step by batch size. Matrix kernels switch
  code paths with the number of rows (on the CPU here a batch of 4 costs half again as much as
  one of 3), so between its measured points the cost is interpolated, not assumed linear.
- `decode_pad_s`: an attention backend that gathers every sequence's KV up to the batch's longest
  context (the torch backend: one padded, masked gather) pays for batch * max_context positions,
  not for the sum; a short request decoding next to a 2,000-token one costs as much as another
  long one. Mixed (chunked-prefill) steps run attention per sequence, without padding.
- `decode_gather_s`, which replaces the two context terms in decode-only steps when measured: the
  attention's cost by the positions it gathers per layer (batch * longest context), interpolated
  between measured points. It is not linear: on the CPU here a batch of 32 next to a 2,000-token
  sequence (64k positions, 100 MB of K and V per layer, expanded to every query head) took 1.9 s,
  three times what a line through batches of up to 8 predicts; the gathers outgrow the caches.

And one effect of mixed steps: `mixed_decode_s`, what each decode adds to a step that computes a
prompt chunk. The torch backend runs such a step's attention one sequence at a time (a gather,
a mask and an attention call per sequence and layer), so a decode costs more there than the
batched decode-only step's slope; the profile times mixed steps to measure it.

A step of prefill only is `prefill_s`, a step of decodes only `decode_step_s`; a mixed step pays
the overhead once.
"""

from __future__ import annotations

import bisect
import itertools
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# Effective one-way KV bandwidth between two GPUs, bytes/s. Assumptions, not measurements:
# - nvlink: NVLink 4 on H100 SXM is 900 GB/s both directions (450 GB/s each way, NVIDIA's H100
#   datasheet); we assume ~2/3 of one direction is reached by layer-sized copies.
# - pcie: PCIe Gen5 x16 is 64 GB/s each way; peer copies staged through host memory reach less
#   (pinned host<->device measured ~55 GB/s here, and staging crosses the bus twice): ~25 GB/s.
# - rdma: one 200 Gb/s NIC (ConnectX-7 / NDR200) is 25 GB/s line rate; ~20 GB/s after protocol.
# - tcp: 10 GbE is 1.25 GB/s line rate; ~1.2 GB/s with large messages.
FABRICS_GBPS: dict[str, float] = {"nvlink": 300.0, "pcie": 25.0, "rdma": 20.0, "tcp": 1.2}


def attention_pairs(tokens: int, cached: int = 0) -> float:
    """Causal query-key pairs of a chunk of `tokens` new tokens after `cached` ones."""
    return tokens * (cached + (tokens + 1) / 2)


@dataclass(frozen=True)
class PerfModel:
    name: str  # model and hardware, e.g. "smollm2 on x86_64 (1 thread)"
    source: str  # "measured" (pdserve profile) | "modelled" (first principles)
    kv_bytes_per_token: int
    num_layers: int
    overhead_s: float  # fixed cost of every step (of a decode-only step at the smallest batch timed)
    prefill_token_s: float
    attn_pair_s: float
    decode_seq_s: float
    decode_ctx_s: float
    weights_read_s: float = 0.0
    # Per padded KV position in a decode-only step (batch * longest context - sum of contexts).
    decode_pad_s: float = 0.0
    # ((batch, seconds), ...) ascending: the decode part of a decode-only step, measured at these
    # batch sizes and interpolated between them; empty = decode_seq_s * batch.
    decode_batch_s: tuple[tuple[int, float], ...] = ()
    # ((positions, seconds), ...) ascending: a decode-only step's attention by the KV positions it
    # gathers per layer (batch * longest context); empty: decode_ctx_s and decode_pad_s instead.
    decode_gather_s: tuple[tuple[int, float], ...] = ()
    # Per decode in a step that also computes a prompt chunk; None (not measured): decode_seq_s.
    mixed_decode_s: float | None = None
    # Fixed cost of a step that computes a prompt chunk, beyond overhead_s.
    prefill_overhead_s: float = 0.0
    # Serving outside the engine: streaming tokens out of the worker to the router and client,
    # which `pdserve profile`, timing the engine alone, cannot see. Calibrated from a served run
    # (see benchmarks/sim_fidelity.py). On a CPU it is not small: the worker's event loop, the
    # router and the client run on the cores the engine computes on.
    serving_step_s: float = 0.0  # per step that streams any token
    serving_seq_s: float = 0.0  # per token streamed
    serving_prompt_s: float = 0.0  # per step that computes a prompt chunk
    # Per request: the client's wait for its first token outside engine steps (HTTP hops, a remote
    # prefill's hand-offs). It delays every token of the request alike.
    serving_latency_s: float = 0.0
    # A request that finds the deployment idle for t seconds pays wake_s * (1 - exp(-t / wake_tau_s))
    # on the step that computes its prompt: after idling, the machine runs its next step slower.
    wake_s: float = 0.0
    wake_tau_s: float = 0.0
    # Measured transports (GB/s) by name; fabrics not measured come from FABRICS_GBPS.
    links_gbps: dict[str, float] = field(default_factory=dict)
    # Fixed cost of one KV handoff besides the bytes (messages, handshake, scheduling).
    transfer_overhead_s: float = 0.0
    # The least a step's prompt part costs however short the chunk (its tokens and attention pairs
    # priced by the two terms above, or this, whichever is more): on a GPU a chunk of a few hundred
    # tokens is bound by reading the weights, a long one by its matrix products. 0 on a CPU.
    prefill_floor_s: float = 0.0
    # The most prompt tokens one timed step computed (`pdserve profile`'s token budget); 0: unknown.
    # Steps with bigger chunks are extrapolated from smaller ones, which on a GPU underprices them:
    # small chunks are bound by reading the weights, big ones by compute (a 512-token profile put a
    # 4,096-token H100 prefill at 66 ms; it takes 108).
    max_prefill_chunk: int = 0
    notes: str = ""

    def __post_init__(self) -> None:
        if self.source not in ("measured", "modelled"):
            raise ValueError(f"source must be measured|modelled, got {self.source!r}")
        if self.kv_bytes_per_token <= 0 or self.num_layers <= 0:
            raise ValueError("kv_bytes_per_token and num_layers must be > 0")
        for name in (
            "overhead_s",
            "prefill_token_s",
            "attn_pair_s",
            "decode_seq_s",
            "decode_ctx_s",
            "weights_read_s",
            "decode_pad_s",
            "prefill_overhead_s",
            "prefill_floor_s",
            "serving_step_s",
            "serving_seq_s",
            "serving_prompt_s",
            "serving_latency_s",
            "wake_s",
            "wake_tau_s",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.mixed_decode_s is not None and self.mixed_decode_s < 0:
            raise ValueError(f"mixed_decode_s must be >= 0, got {self.mixed_decode_s}")
        # JSON gives lists; keep hashable, comparable tuples of (int, float) pairs.
        for name in ("decode_batch_s", "decode_gather_s"):
            table = tuple((int(b), float(s)) for b, s in getattr(self, name))
            if any(b < 1 or s < 0 for b, s in table) or any(
                a[0] >= b[0] for a, b in itertools.pairwise(table)
            ):
                raise ValueError(f"{name} must be ascending (sizes >= 1, seconds >= 0): {table}")
            object.__setattr__(self, name, table)

    def chunk_coverage_warning(self, max_num_batched_tokens: int) -> str | None:
        """Why steps of this token budget are priced by extrapolation, if they are."""
        if 0 < self.max_prefill_chunk < max_num_batched_tokens:
            return (
                f"the profile timed prompt chunks of at most {self.max_prefill_chunk} tokens; steps of up to "
                f"{max_num_batched_tokens} are extrapolated from them (on a GPU a big chunk costs more per "
                f"token than a small one): profile with --max-num-batched-tokens {max_num_batched_tokens}"
            )
        return None

    def prefill_s(self, tokens: int, cached: int = 0) -> float:
        """A step computing one prompt chunk of `tokens` after `cached` tokens."""
        return self.step_s(0, 0, [(tokens, cached)], streamed=0)

    def decode_step_s(self, batch: int, ctx_tokens: int, max_ctx: int = 0) -> float:
        """A decode-only step of `batch` sequences over `ctx_tokens` context tokens in all, the
        longest of them `max_ctx` long (0: all equally long)."""
        return self.step_s(batch, ctx_tokens, [], decode_max_ctx=max_ctx)

    def decode_batch_cost_s(self, batch: int) -> float:
        """The decode part of a decode-only step of `batch` sequences (before context terms)."""
        if batch <= 0:
            return 0.0
        if not self.decode_batch_s:
            return self.decode_seq_s * batch
        # Past the last measured size: the fitted per-sequence slope.
        return _interpolate(self.decode_batch_s, batch, self.decode_seq_s)

    def decode_gather_cost_s(self, positions: int) -> float:
        """Attention of a decode-only step that gathers `positions` KV positions per layer."""
        table = self.decode_gather_s
        if positions <= 0 or not table:
            return 0.0
        # Past the last point, the slope over its upper half (one short last segment would swing it).
        p1, s1 = table[-1]
        p0, s0 = max(((p, s) for p, s in ((0, 0.0), *table) if p <= p1 / 2), key=lambda ps: ps[0])
        return _interpolate(table, positions, (s1 - s0) / (p1 - p0))

    def step_s(
        self,
        decode_batch: int,
        decode_ctx: int,
        chunks: list[tuple[int, int]],
        decode_max_ctx: int = 0,
        streamed: int | None = None,
    ) -> float:
        """One engine step: `decode_batch` decodes over `decode_ctx` context tokens in all (the
        longest `decode_max_ctx`), prompt chunks given as (new tokens, cached tokens), and
        `streamed` tokens sent to clients (default: one per decode)."""
        prefill = sum(self.prefill_token_s * n + self.attn_pair_s * attention_pairs(n, c) for n, c in chunks)
        if chunks:
            prefill = max(prefill, self.prefill_floor_s)
            # Decodes ride along in the prompt's matrix products; attention runs per sequence.
            per_decode = self.decode_seq_s if self.mixed_decode_s is None else self.mixed_decode_s
            decode, padded = per_decode * decode_batch, 0
        else:
            decode = self.decode_batch_cost_s(decode_batch)
            padded = max(decode_batch * decode_max_ctx - decode_ctx, 0)
        if not chunks and self.decode_gather_s:
            memory = self.decode_gather_cost_s(decode_ctx + padded)
        else:
            memory = self.decode_ctx_s * decode_ctx + self.decode_pad_s * padded
        n_out = decode_batch if streamed is None else streamed
        serving = (self.serving_step_s if n_out else 0.0) + self.serving_seq_s * n_out
        serving += self.serving_prompt_s if chunks else 0.0
        fixed = self.overhead_s + (self.prefill_overhead_s if chunks else 0.0)
        return fixed + max(self.weights_read_s, decode + prefill) + memory + serving

    def wake_cost_s(self, idle_s: float) -> float:
        """Extra seconds of the first step after the deployment idled `idle_s` seconds."""
        if self.wake_s <= 0 or self.wake_tau_s <= 0:
            return 0.0
        return self.wake_s * -math.expm1(-idle_s / self.wake_tau_s)

    def link_bytes_per_s(self, fabric: str) -> float:
        if fabric in self.links_gbps:
            return self.links_gbps[fabric] * 1e9
        if fabric in FABRICS_GBPS:
            return FABRICS_GBPS[fabric] * 1e9
        known = sorted(set(self.links_gbps) | set(FABRICS_GBPS))
        raise ValueError(f"unknown fabric {fabric!r} (known: {', '.join(known)})")

    def transfer_s(self, tokens: int, fabric: str) -> float:
        return self.transfer_overhead_s + tokens * self.kv_bytes_per_token / self.link_bytes_per_s(fabric)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PerfModel:
        """Fields a file lacks (written before they existed) take their defaults."""
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    @classmethod
    def load(cls, path: Path) -> PerfModel:
        return cls.from_dict(json.loads(path.read_text()))


def _interpolate(table: tuple[tuple[int, float], ...], x: int, slope_past: float) -> float:
    """Piecewise linear through (0, 0) and `table`'s points; past the last, `slope_past`."""
    points = ((0, 0.0), *table)
    i = bisect.bisect_left([p for p, _ in points], x)
    if i == len(points):
        p_last, s_last = points[-1]
        return s_last + slope_past * (x - p_last)
    (p0, s0), (p1, s1) = points[i - 1], points[i]
    return s0 + (s1 - s0) * (x - p0) / (p1 - p0)
