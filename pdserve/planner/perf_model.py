"""The engine's cost model: step time from what a step computes, and KV link bandwidths.

Fitted by `pdserve profile` on the current hardware, or written from first principles for
hardware we do not have at hand (then `source` says "modelled"). One engine step costs

    step_s = overhead + max(weights_read_s, prefill_token_s * prefill_tokens
                                 + attn_pair_s * attention_pairs + decode_seq_s * decode_batch)
             + decode_ctx_s * decode_context_tokens + serving_seq_s * decode_batch

The max is the roofline: a step reads the weights once and computes on every token, whichever
takes longer (on a GPU small decode batches are memory-bound, prompts compute-bound); a CPU
profile fits weights_read_s = 0, which leaves a plain linear model. Each decode reads its
context's KV. Where a prompt chunk of t tokens after c cached ones has t * (c + (t + 1) / 2) attention pairs
(causal). A step of prefill only is `prefill_s`, a step of decodes only `decode_step_s`; a
mixed (chunked-prefill) step pays the overhead once.
"""

from __future__ import annotations

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
    # Per decoding sequence per step, outside the engine: streaming each token out of the worker
    # to the router and client. `pdserve profile` times the engine alone and cannot see it; it is
    # calibrated from a served run (see benchmarks/sim_fidelity.py). On a CPU it is not small:
    # the worker's HTTP streaming shares the GIL, and the cores, with the engine thread.
    serving_seq_s: float = 0.0
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
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    def prefill_s(self, tokens: int, cached: int = 0) -> float:
        """A step computing one prompt chunk of `tokens` after `cached` tokens."""
        return self.step_s(0, 0, [(tokens, cached)])

    def decode_step_s(self, batch: int, ctx_tokens: int) -> float:
        return self.step_s(batch, ctx_tokens, [])

    def step_s(self, decode_batch: int, decode_ctx: int, chunks: list[tuple[int, int]]) -> float:
        """One engine step: `decode_batch` decodes over `decode_ctx` context tokens in all, and
        prompt chunks given as (new tokens, cached tokens)."""
        compute = self.decode_seq_s * decode_batch + sum(
            self.prefill_token_s * n + self.attn_pair_s * attention_pairs(n, c) for n, c in chunks
        )
        memory = self.decode_ctx_s * decode_ctx
        return (
            self.overhead_s + max(self.weights_read_s, compute) + memory + self.serving_seq_s * decode_batch
        )

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
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    @classmethod
    def load(cls, path: Path) -> PerfModel:
        return cls.from_dict(json.loads(path.read_text()))
