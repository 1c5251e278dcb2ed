"""Fitting a PerfModel's engine terms to timed engine steps (what `pdserve profile` measures).

One least-squares fit over every step: the fixed overhead, per prompt token and per attention pair
(prefill steps), per context token and per padded context position (decode steps), and one free
term per decode batch size measured, because a decode step's cost is not linear in the batch (see
perf_model.py). Giving each batch size its own term keeps that shape out of the context terms,
which are then fitted from contexts that differ at the same batch size. `decode_seq_s`, used for
the decodes of mixed steps and past the largest batch measured, is the per-sequence slope of
those batch terms.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch

from pdserve.planner.perf_model import attention_pairs


@dataclass(frozen=True)
class PrefillStep:
    tokens: int  # prompt tokens computed in the step (one chunk)
    cached: int  # tokens of the same prompt computed before it
    seconds: float


@dataclass(frozen=True)
class DecodeStep:
    batch: int
    ctx_tokens: int  # context tokens of the whole batch
    max_ctx: int  # the longest sequence's context
    seconds: float

    @property
    def padded(self) -> int:
        """KV positions a backend that pads to the longest sequence reads beyond the real ones."""
        return self.batch * self.max_ctx - self.ctx_tokens


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


def _medians(steps: list[Any], key: Any) -> list[Any]:
    """One step per distinct configuration, with the median time: a step slowed by another
    process on the machine then moves no coefficient."""
    groups: dict[Any, list[Any]] = defaultdict(list)
    for s in steps:
        groups[key(s)].append(s)
    out = []
    for group in groups.values():
        median = statistics.median(s.seconds for s in group)
        out.append(min(group, key=lambda s: abs(s.seconds - median)))
    return out


def fit_steps(prefill: list[PrefillStep], decode: list[DecodeStep]) -> dict[str, Any]:
    """PerfModel keyword arguments: the engine terms and the `decode_batch_s` table."""
    pre = _medians(prefill, lambda s: (s.tokens, s.cached))
    dec = _medians(decode, lambda s: (s.batch, s.ctx_tokens // 64, s.max_ctx // 64))
    batches = sorted({s.batch for s in dec})
    column = {b: i for i, b in enumerate(batches)}

    def one_hot(b: int) -> list[float]:
        return [1.0 if column.get(b) == i else 0.0 for i in range(len(batches))]

    # Columns: overhead, prompt token, attention pair, one per batch size, context, padding.
    rows = [[1.0, s.tokens, attention_pairs(s.tokens, s.cached), *one_hot(0), 0.0, 0.0] for s in pre]
    rows += [[1.0, 0.0, 0.0, *one_hot(s.batch), s.ctx_tokens, s.padded] for s in dec]
    times = [s.seconds for s in pre] + [s.seconds for s in dec]
    x = fit_nonnegative(rows, times)
    table = tuple(zip(batches, x[3 : 3 + len(batches)], strict=True))
    sq = sum(b * b for b in batches)
    return {
        "overhead_s": x[0],
        "prefill_token_s": x[1],
        "attn_pair_s": x[2],
        "decode_seq_s": sum(b * c for b, c in table) / sq if sq else 0.0,
        "decode_ctx_s": x[-2],
        "decode_pad_s": x[-1],
        "decode_batch_s": table,
    }
