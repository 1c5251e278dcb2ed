"""Turn a batch of last-position logits into next tokens: greedy, temperature, top-k, top-p,
per-request seeds, suppressed ids (min_tokens) and logprobs.

Everything stays on the logits' device until one final transfer, so on a GPU the sampler costs a
single host sync per step, and that sync can wait: `launch` returns the sampled ids on the device
(the next decode step can read them there) and a copy to the host that `result()` waits for.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from pdserve import envs
from pdserve.outputs import TokenLogprob
from pdserve.sampling_params import SamplingParams

# Dividing by a temperature this small already makes softmax one-hot; anything smaller only risks
# turning finite logits into inf (and the softmax into NaN).
_MIN_TEMPERATURE = 1e-6
# PDSERVE_GPU_WAIT, read once: the engine thread's wait for each step's sampled tokens.
_BLOCKING_WAIT = envs.gpu_wait() == "block"


@dataclass
class SamplerOutput:
    token_ids: list[int]  # one per row
    logprobs: list[TokenLogprob | None]  # per row; None where params.logprobs is None


def make_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    """A request's private RNG: None (use torch's default RNG) unless the request has a seed."""
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


class PendingSamples:
    """A step's samples on their way to the host. `token_ids` [N] (int64) stay on the logits'
    device for a next step to read; `result()` waits for the host copy and unpacks it."""

    def __init__(
        self, token_ids: torch.Tensor, packed: torch.Tensor, unpack: Callable[[list[Any]], SamplerOutput]
    ) -> None:
        self.token_ids = token_ids
        self._unpack = unpack
        self._event: torch.cuda.Event | None = None
        if packed.is_cuda:
            # Into pinned memory without waiting; the event marks the copy's end on the stream, so
            # result() waits for this step only, not for steps launched after it.
            self._host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
            self._host.copy_(packed, non_blocking=True)
            self._event = torch.cuda.Event(blocking=_BLOCKING_WAIT)
            self._event.record()
        else:
            self._host = packed

    def result(self) -> SamplerOutput:
        if self._event is not None:
            # Waits with the GIL released (unlike .tolist() on a CUDA tensor, which would starve
            # every other thread of the worker for the whole step: its HTTP server streaming
            # tokens, the KV transfer threads). A blocking event sleeps until the GPU signals,
            # freeing the core but paying a wake-up; spinning returns the moment the step ends.
            self._event.synchronize()
        return self._unpack(self._host.tolist())


class Sampler:
    def __call__(
        self,
        logits: torch.Tensor,
        params: list[SamplingParams],
        generators: list[torch.Generator | None],
        suppress_token_ids: list[list[int]] | None = None,
    ) -> SamplerOutput:
        """Sample now and wait for the result on the host; see launch()."""
        return self.launch(logits, params, generators, suppress_token_ids).result()

    def launch(
        self,
        logits: torch.Tensor,
        params: list[SamplingParams],
        generators: list[torch.Generator | None],
        suppress_token_ids: list[list[int]] | None = None,
    ) -> PendingSamples:
        """Sample one token per row of `logits` [N, V] (float32), without waiting for the device.

        Logprobs describe the *model's* distribution: log_softmax of the raw logits, before
        suppression, temperature, top-k and top-p. They say how likely the model found a token,
        not how likely this sampler was to pick it.
        """
        num_rows = logits.shape[0]
        if len(params) != num_rows or len(generators) != num_rows:
            raise ValueError(
                f"got {num_rows} logit rows, {len(params)} params and {len(generators)} generators"
            )
        if suppress_token_ids is not None and len(suppress_token_ids) != num_rows:
            raise ValueError(f"got {num_rows} logit rows and {len(suppress_token_ids)} suppress lists")

        masked = _suppress(logits, suppress_token_ids) if suppress_token_ids else logits
        token_ids = _sample(masked, params, generators)  # [N]
        return _pending_output(logits, token_ids, params)


def _suppress(logits: torch.Tensor, suppress_token_ids: list[list[int]]) -> torch.Tensor:
    """A copy of `logits` [N, V] with each row's listed ids set to -inf."""
    rows = [row for row, ids in enumerate(suppress_token_ids) for _ in ids]
    cols = [token_id for ids in suppress_token_ids for token_id in ids]
    if not rows:
        return logits
    index = (to_device(rows, torch.long, logits.device), to_device(cols, torch.long, logits.device))
    return logits.index_put(index, logits.new_full((), float("-inf")))


def _sample(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> torch.Tensor:
    """Token ids [N] (int64); greedy rows take the argmax, the others sample."""
    greedy_ids = logits.argmax(dim=-1)  # [N]
    is_greedy = [p.greedy for p in params]
    if all(is_greedy):
        return greedy_ids
    device = logits.device
    # Greedy rows go through the sampling path at temperature 1 and are overwritten below; one
    # batched pass over all rows is cheaper than gathering the sampled rows out and back.
    temperatures = [1.0 if p.greedy else max(p.temperature, _MIN_TEMPERATURE) for p in params]
    scaled = logits / to_device(temperatures, torch.float32, device).unsqueeze(1)  # [N, V]
    if any(p.top_k > 0 or p.top_p < 1.0 for p in params if not p.greedy):
        scaled = _apply_top_k_top_p(scaled, params)
    probs = scaled.softmax(dim=-1)  # [N, V]
    sampled_ids = _exponential_race(probs, generators, is_greedy)  # [N]
    return torch.where(to_device(is_greedy, torch.bool, device), greedy_ids, sampled_ids)


def _apply_top_k_top_p(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Set to -inf every token outside each row's top-k, then outside its top-p nucleus
    (renormalised over the top-k survivors). Rows that disable a filter pass through it."""
    num_rows, vocab_size = logits.shape
    device = logits.device
    top_k = [p.top_k if 0 < p.top_k < vocab_size else vocab_size for p in params]
    top_p = [p.top_p for p in params]
    # A stable sort keeps the lower id first among equal logits, so ties resolve like argmax.
    sorted_logits, sorted_ids = logits.sort(dim=-1, descending=True, stable=True)  # [N, V] each
    ranks = torch.arange(vocab_size, device=device).expand(num_rows, vocab_size)  # [N, V]
    drop = ranks >= to_device(top_k, torch.long, device).unsqueeze(1)  # [N, V]
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))

    sorted_probs = sorted_logits.softmax(dim=-1)  # [N, V]
    # Mass strictly before each token: a token is kept while that mass is still below top_p, which
    # keeps the smallest prefix reaching top_p and always the first token (0 < top_p).
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # [N, V]
    top_p_t = to_device(top_p, torch.float32, device).unsqueeze(1)  # [N, 1]
    # Rows with top_p == 1 skip the test: float rounding can push the cumsum past 1 and would
    # otherwise drop some of the tail.
    drop = drop | ((mass_before >= top_p_t) & (top_p_t < 1.0))

    drop_by_id = torch.empty_like(drop).scatter_(1, sorted_ids, drop)  # [N, V], back in vocab order
    return logits.masked_fill(drop_by_id, float("-inf"))


def _exponential_race(
    probs: torch.Tensor, generators: list[torch.Generator | None], skip: list[bool]
) -> torch.Tensor:
    """Sample one id per row of `probs` [N, V] as argmax(probs / E), E ~ Exp(1) i.i.d.

    E_i / p_i is exponential with rate p_i, and the smallest of independent exponentials is
    number i with probability p_i / sum(p): an exact draw from `probs`. Unlike torch.multinomial,
    the noise is an ordinary tensor, so each row can take it from its own generator and a seeded
    row's tokens don't depend on the rest of the batch. `skip` rows (greedy) get no noise.
    """
    noise = torch.empty_like(probs)  # [N, V]
    if not any(g is not None for g in generators):
        noise.exponential_()
    else:
        # One draw per row (not per token): a seeded row advances only its own generator.
        for row, generator in enumerate(generators):
            if skip[row]:
                noise[row].fill_(1.0)
            else:
                noise[row].exponential_(generator=generator)
    # A zero draw would make 0/0 = NaN on a filtered token, and argmax prefers NaN.
    noise.clamp_min_(torch.finfo(noise.dtype).tiny)
    return (probs / noise).argmax(dim=-1)  # [N]


def _pending_output(
    logits: torch.Tensor, token_ids: torch.Tensor, params: list[SamplingParams]
) -> PendingSamples:
    """Gather logprobs where asked and start bringing everything to the host in one transfer."""
    wanted_rows = [row for row, p in enumerate(params) if p.logprobs is not None]
    num_rows = len(params)
    if not wanted_rows:

        def ids_only(packed: list[Any]) -> SamplerOutput:
            return SamplerOutput(token_ids=packed, logprobs=[None] * num_rows)

        return PendingSamples(token_ids, token_ids, ids_only)

    device = logits.device
    rows = to_device(wanted_rows, torch.long, device)
    logprobs = logits.index_select(0, rows).log_softmax(dim=-1)  # [M, V]
    sampled = logprobs.gather(1, token_ids.index_select(0, rows).unsqueeze(1))  # [M, 1]
    num_top = max(params[row].logprobs or 0 for row in wanted_rows)
    top_logprobs, top_ids = logprobs.topk(num_top, dim=-1)  # [M, K] each, most likely first

    # Pack ids and logprobs as float64 (exact for ids < 2**53) so one copy is the only sync.
    packed = torch.cat(
        [
            token_ids.double(),
            sampled.double().flatten(),
            top_ids.double().flatten(),
            top_logprobs.double().flatten(),
        ]
    )

    def with_logprobs(values: list[Any]) -> SamplerOutput:
        return _unpack(values, num_rows, wanted_rows, num_top, params)

    return PendingSamples(token_ids, packed, with_logprobs)


def _unpack(
    packed: list[float], num_rows: int, wanted_rows: list[int], num_top: int, params: list[SamplingParams]
) -> SamplerOutput:
    num_wanted = len(wanted_rows)
    token_ids = [int(x) for x in packed[:num_rows]]
    sampled = packed[num_rows : num_rows + num_wanted]
    top_start = num_rows + num_wanted
    top_ids = packed[top_start : top_start + num_wanted * num_top]
    top_logprobs = packed[top_start + num_wanted * num_top :]

    logprobs: list[TokenLogprob | None] = [None] * num_rows
    for i, row in enumerate(wanted_rows):
        k = params[row].logprobs or 0
        base = i * num_top
        top = [(int(top_ids[base + j]), top_logprobs[base + j]) for j in range(k)]
        logprobs[row] = TokenLogprob(token_id=token_ids[row], logprob=sampled[i], top=top)
    return SamplerOutput(token_ids=token_ids, logprobs=logprobs)


def to_device(values: Sequence[int | float | bool], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list on `device`. On CUDA it goes through pinned memory with non_blocking, so
    the copy is queued on the stream instead of making the host wait for the GPU."""
    tensor = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)
