"""The engine's cost model: step time from what a step computes, and KV link bandwidths.

Fitted by `pdserve profile` on the current hardware, or written from first principles for
hardware we do not have at hand (then `source` says "modelled"). One engine step costs

    step_s = overhead + max(weights_read_s, prefill_token_s * prefill_tokens
                                 + attn_pair_s * attention_pairs + decode(batch))
             + decode_ctx_s * context_tokens + decode_pad_s * padded_positions
             + serving_step_s + serving_seq_s * streamed_tokens

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

A step of prefill only is `prefill_s`, a step of decodes only `decode_step_s`; a mixed step pays
the overhead once.
"""

from __future__ import annotations

import bisect
import itertools
import json
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
    overhead_s: float
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
    # Serving outside the engine: streaming tokens out of the worker to the router and client,
    # which `pdserve profile`, timing the engine alone, cannot see. Calibrated from a served run
    # (see benchmarks/sim_fidelity.py). On a CPU it is not small: the worker's event loop, the
    # router and the client run on the cores the engine computes on.
    serving_step_s: float = 0.0  # per step that streams any token
    serving_seq_s: float = 0.0  # per token streamed
    # Measured transports (GB/s) by name; fabrics not measured come from FABRICS_GBPS.
    links_gbps: dict[str, float] = field(default_factory=dict)
    # Fixed cost of one KV handoff besides the bytes (messages, handshake, scheduling).
    transfer_overhead_s: float = 0.0
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
            "serving_step_s",
            "serving_seq_s",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        # JSON gives lists; keep a hashable, comparable tuple of (int, float) pairs.
        table = tuple((int(b), float(s)) for b, s in self.decode_batch_s)
        if any(b < 1 or s < 0 for b, s in table) or any(a[0] >= b[0] for a, b in itertools.pairwise(table)):
            raise ValueError(f"decode_batch_s must be ascending (batch >= 1, seconds >= 0): {table}")
        object.__setattr__(self, "decode_batch_s", table)

    def prefill_s(self, tokens: int, cached: int = 0) -> float:
        """A step computing one prompt chunk of `tokens` after `cached` tokens."""
        return self.step_s(0, 0, [(tokens, cached)], streamed=0)

    def decode_step_s(self, batch: int, ctx_tokens: int, max_ctx: int = 0) -> float:
        """A decode-only step of `batch` sequences over `ctx_tokens` context tokens in all, the
        longest of them `max_ctx` long (0: all equally long)."""
        return self.step_s(batch, ctx_tokens, [], decode_max_ctx=max_ctx)

    def decode_batch_cost_s(self, batch: int) -> float:
        """The decode part of a decode-only step of `batch` sequences (before context terms)."""
        table = self.decode_batch_s
        if batch <= 0:
            return 0.0
        if not table:
            return self.decode_seq_s * batch
        points = ((0, 0.0), *table)
        i = bisect.bisect_left([b for b, _ in points], batch)
        if i == len(points):  # past the last measured size: the fitted per-sequence slope
            b_last, s_last = points[-1]
            return s_last + self.decode_seq_s * (batch - b_last)
        (b0, s0), (b1, s1) = points[i - 1], points[i]
        return s0 + (s1 - s0) * (batch - b0) / (b1 - b0)

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
            # Decodes ride along in the prompt's matrix products; attention runs per sequence.
            decode, padded = self.decode_seq_s * decode_batch, 0
        else:
            decode = self.decode_batch_cost_s(decode_batch)
            padded = max(decode_batch * decode_max_ctx - decode_ctx, 0)
        memory = self.decode_ctx_s * decode_ctx + self.decode_pad_s * padded
        n_out = decode_batch if streamed is None else streamed
        serving = (self.serving_step_s if n_out else 0.0) + self.serving_seq_s * n_out
        return self.overhead_s + max(self.weights_read_s, decode + prefill) + memory + serving

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
