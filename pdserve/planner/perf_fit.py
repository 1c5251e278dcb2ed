"""Fitting a PerfModel's engine terms to timed engine steps (what `pdserve profile` measures).

One least-squares fit over every step: the fixed overhead of every step and the extra fixed cost of
a step that computes a prompt chunk, per prompt token and per attention pair (prefill steps), the
attention of decode-only steps as a piecewise-linear function of the KV positions gathered per
layer (batch * longest context; its values at knots 1k, 2k, 4k, ... positions up to the largest
timed are the coefficients), and one free term per decode batch size measured beyond the
smallest (whose decode steps pin the common overhead), because a decode step's cost is not linear in the batch (see
perf_model.py). Giving each batch size its own term keeps that shape out of the context terms,
which are then fitted from contexts that differ at the same batch size. `decode_seq_s`, used
past the largest batch measured, is the per-sequence slope of those batch terms. Mixed steps (a
prompt chunk next to running decodes), when timed, fit `mixed_decode_s`, what each decode adds to
such a step, and `decode_ctx_s`, per context token of those decodes (attention per sequence there,
no padding); without them, `decode_ctx_s` is the gather curve's slope up to its first knot. A
profile without padded decode steps (a third of the positions gathered or more) cannot separate
gathered positions from the batch: its decode-only steps get a linear context term instead. With
them, the curve and linear context and padding terms are both fitted and the better fit is kept
(a backend that reads each sequence's own KV pays little for padding, which the curve cannot say);
the curve is fitted as non-negative rises between knots, so it never falls. Where the prompt
steps show a floor (on a GPU, chunks of a few hundred tokens all cost what reading the weights
costs), the fit takes it as `prefill_floor_s` under the prompt part, if it cuts the error enough.
"""

from __future__ import annotations

import itertools
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


@dataclass(frozen=True)
class MixedStep:
    """A prompt chunk computed in the same step as `batch` running decodes."""

    batch: int
    ctx_tokens: int  # context tokens of the decodes
    tokens: int  # the chunk
    cached: int
    seconds: float


def fit_nonnegative(
    rows: list[list[float]], times: list[float], offsets: list[float] | None = None
) -> list[float]:
    """Least squares on relative error (each row divided by its time, so short steps count as much
    as long ones), with coefficients that come out negative pinned to 0 and the rest refitted.
    `offsets`: a known part of each step's time, outside the coefficients (row . x + offset ~ time)."""
    # A column no step exercises (e.g. padding when no mixed-context step was timed) would make the
    # problem rank-deficient: its coefficient is 0.
    active = [j for j in range(len(rows[0])) if any(r[j] for r in rows)]
    while True:
        a = torch.tensor(
            [[r[j] / t for j in active] for r, t in zip(rows, times, strict=True)], dtype=torch.float64
        )
        b = torch.tensor(
            [[1.0 - o / t] for o, t in zip(offsets or [0.0] * len(times), times, strict=True)],
            dtype=torch.float64,
        )
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


def fit_steps(
    prefill: list[PrefillStep], decode: list[DecodeStep], mixed: list[MixedStep] | None = None
) -> dict[str, Any]:
    """PerfModel keyword arguments: the engine terms and the `decode_batch_s` table, and
    `mixed_decode_s` when mixed steps were timed. Decode attention as the gather curve (what a
    backend that pads every sequence to the longest pays) or as linear context and padding terms
    (a backend that reads each sequence's own KV only, e.g. split-K over the real lengths):
    whichever fits the timed steps better. The curve alone cannot tell these apart, and fitted to
    a backend that skips padding it comes out bent the wrong way (cheaper past its last knot)."""
    pre = _medians(prefill, lambda s: (s.tokens, s.cached))
    dec = _medians(decode, lambda s: (s.batch, s.ctx_tokens // 64, s.max_ctx // 64))
    mix = _medians(mixed or [], lambda s: (s.batch, s.tokens, s.cached, s.ctx_tokens // 64))
    # The gather curve needs positions that vary apart from the batch: padded steps (one long
    # sequence among short ones). Without them, linear context and padding terms only.
    padded = any(3 * s.padded >= s.batch * s.max_ctx for s in dec)  # a third of it padding, or more
    linear, linear_error = _fit_floored(pre, dec, mix, [])
    if not padded:
        return linear
    knots = gather_knots([s.batch * s.max_ctx for s in dec])
    curve, curve_error = _fit_floored(pre, dec, mix, knots)
    return curve if curve_error <= linear_error else linear


# Floors tried for a step's prompt part, as fractions of the cheapest timed prompt step, and how
# much a floor must cut the plain line's error to be kept (a profile without one, e.g. a CPU's,
# keeps its line exactly).
_FLOOR_FRACTIONS = [i / 32 for i in range(1, 32)]
_FLOOR_GAIN = 0.8


def _fit_floored(
    pre: list[PrefillStep], dec: list[DecodeStep], mix: list[MixedStep], knots: list[int]
) -> tuple[dict[str, Any], float]:
    """`_fit`, with the floor under a step's prompt part that fits best (`prefill_floor_s`): on a
    GPU a chunk of a few hundred tokens costs what reading the weights costs, a big one what its
    matrix products compute, and one line through both is too flat for the big ones. Which steps sit
    on the floor depends on the fitted line: classified again from each fit until it settles."""
    best, best_error = _fit(pre, dec, mix, knots)
    if len({s.tokens for s in pre}) < 3:  # a floor and a slope need more than two chunk sizes
        return best, best_error
    prompt_steps: list[PrefillStep | MixedStep] = [*pre, *mix]
    cheapest = min(s.seconds for s in prompt_steps)
    floored_best = None
    for fraction in _FLOOR_FRACTIONS:
        floor, terms, floored = cheapest * fraction, best, None
        for _ in range(8):
            on_floor = frozenset(
                i
                for i, s in enumerate(prompt_steps)
                if terms["prefill_token_s"] * s.tokens
                + terms["attn_pair_s"] * attention_pairs(s.tokens, s.cached)
                < floor
            )
            if on_floor == floored:
                break
            floored = on_floor
            terms, error = _fit(pre, dec, mix, knots, floor, floored)
        if floored and (floored_best is None or error < floored_best[1]):
            floored_best = (terms, error)
    if floored_best is not None and floored_best[1] < _FLOOR_GAIN * best_error:
        return floored_best
    return best, best_error


def _fit(
    pre: list[PrefillStep],
    dec: list[DecodeStep],
    mix: list[MixedStep],
    knots: list[int],
    floor: float = 0.0,
    floored: frozenset[int] = frozenset(),
) -> tuple[dict[str, Any], float]:
    """The terms with decode attention on the gather curve at `knots` (none: linear context and
    padding terms), and the fit's squared relative error summed over the steps. The prompt steps
    numbered in `floored` (prefill steps, then mixed ones) cost `floor` for their prompt part, not
    their tokens and attention pairs."""
    batches = sorted({s.batch for s in dec})
    # The smallest batch gets no term of its own: its steps pin the overhead every step pays, and
    # the prompt steps' extra fixed cost is then a term of its own.
    column = {b: i for i, b in enumerate(batches[1:])}

    def one_hot(b: int) -> list[float]:
        return [1.0 if column.get(b) == i else 0.0 for i in range(len(column))]

    def memory(s: DecodeStep) -> list[float]:
        if not knots:
            return [float(s.ctx_tokens), float(s.padded)]
        # The curve's value at knot j is the sum of non-negative rises up to j, so it never falls as
        # more positions are gathered: rise i weighs as much as every knot from i on together.
        w = hat_weights(s.batch * s.max_ctx, knots)
        return [*reversed(list(itertools.accumulate(reversed(w)))), 0.0]

    # Columns: overhead, prompt-step overhead, prompt token, attention pair, one per batch size
    # beyond the smallest, the gather knots (or context and padding), a mixed step's decode context
    # (the curve only; linear terms share the decode-only context column) and its decodes.
    width = len(knots) + 1 if knots else 2

    def mixed_memory(s: MixedStep) -> list[float]:
        return [0.0] * width + [float(s.ctx_tokens)] if knots else [float(s.ctx_tokens), 0.0, 0.0]

    def prompt(i: int, s: PrefillStep | MixedStep) -> list[float]:
        return [0.0, 0.0] if i in floored else [float(s.tokens), attention_pairs(s.tokens, s.cached)]

    none = [0.0] * (width + 1)
    rows = [[1.0, 1.0, *prompt(i, s), *one_hot(0), *none, 0.0] for i, s in enumerate(pre)]
    rows += [[1.0, 0.0, 0.0, 0.0, *one_hot(s.batch), *memory(s), 0.0, 0.0] for s in dec]
    rows += [
        [1.0, 1.0, *prompt(len(pre) + i, s), *one_hot(0), *mixed_memory(s), s.batch]
        for i, s in enumerate(mix)
    ]
    times = [s.seconds for s in pre] + [s.seconds for s in dec] + [s.seconds for s in mix]
    # Prompt steps numbered prefill first, then mixed; decode-only steps have no prompt part.
    offsets = [floor if i in floored else 0.0 for i in range(len(pre))] + [0.0] * len(dec)
    offsets += [floor if len(pre) + i in floored else 0.0 for i in range(len(mix))]
    x = fit_nonnegative(rows, times, offsets)
    error = sum(
        ((sum(a * c for a, c in zip(r, x, strict=True)) + o) / t - 1.0) ** 2
        for r, t, o in zip(rows, times, offsets, strict=True)
    )
    k = len(column)
    table = tuple(zip(batches, [0.0, *x[4 : 4 + k]], strict=True)) if batches else ()
    gather = tuple(zip(knots, itertools.accumulate(x[4 + k : 4 + k + len(knots)]), strict=True))
    sq = sum(b * b for b in batches)
    if knots:
        # A mixed step's decode context: from the mixed steps; else priced like decode-only steps.
        ctx, pad = (x[-2] if mix else gather[0][1] / gather[0][0]), 0.0
    else:
        ctx, pad = x[4 + k], x[5 + k]
    terms = {
        "overhead_s": x[0],
        "prefill_overhead_s": x[1],
        "prefill_token_s": x[2],
        "attn_pair_s": x[3],
        "decode_seq_s": sum(b * c for b, c in table) / sq if sq else 0.0,
        "decode_ctx_s": ctx,
        "decode_pad_s": pad,
        "decode_batch_s": table,
        "decode_gather_s": gather,
        "mixed_decode_s": x[-1] if mix else None,
        "max_prefill_chunk": max([s.tokens for s in pre] + [s.tokens for s in mix], default=0),
        "prefill_floor_s": floor if floored else 0.0,
    }
    return terms, error


def gather_knots(positions: list[int]) -> list[int]:
    """1k, 2k, 4k, ... positions below the largest gathered, then the largest; a knot whose
    interval (from the knot before) holds no timed step is left out."""
    top = max(positions, default=0)
    grid, k = [], 1024
    while k < top:
        grid.append(k)
        k *= 2
    grid = [*grid, top] if top else []
    return [b for a, b in itertools.pairwise([0, *grid]) if any(a < p <= b for p in positions)]


def hat_weights(x: int, knots: list[int]) -> list[float]:
    """The weights of the knots' values in the piecewise-linear function (through 0 at 0) at x."""
    w = [0.0] * len(knots)
    points = [0, *knots]
    for i in range(1, len(points)):
        lo, hi = points[i - 1], points[i]
        if x <= hi or i == len(points) - 1:
            t = (x - lo) / (hi - lo)
            w[i - 1] = t
            if i > 1:
                w[i - 2] = 1.0 - t
            return w
    return w


def steps_from_raw(raw: dict[str, Any]) -> tuple[list[PrefillStep], list[DecodeStep], list[MixedStep]]:
    """The timed steps of a profile's `.raw.json` (see profile.py), to fit them again."""
    return (
        [PrefillStep(int(n), int(c), float(t)) for n, c, t in raw.get("prefill", [])],
        [DecodeStep(int(b), int(c), int(m), float(t)) for b, c, m, t in raw.get("decode", [])],
        [MixedStep(int(b), int(c), int(n), int(k), float(t)) for b, c, n, k, t in raw.get("mixed", [])],
    )
