"""What the engine hands back per step and per finished request."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    # The k most likely tokens at this position, most likely first: (token_id, logprob).
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class RequestOutput:
    """One step's delta for one request; `finished` marks the last one."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: str | int | None = None  # the stop string or stop token that ended it
    logprobs: list[TokenLogprob] | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    num_output_tokens: int = 0
    error: str | None = None
    # On the last output, where the router knows them: when each phase of the request happened
    # (time.monotonic() of the router process; see router/disagg_client.py), plus the prefill path.
    phases: dict[str, float | str] | None = None


def merge_outputs(*outs: RequestOutput) -> RequestOutput:
    """Consecutive deltas of one request as one: tokens, text and logprobs joined in order,
    everything else (finish, counts, phases) from the last."""
    last = outs[-1]
    if len(outs) == 1:
        return last
    logprobs = None
    if any(o.logprobs is not None for o in outs):
        logprobs = [lp for o in outs for lp in o.logprobs or ()]
    return dataclasses.replace(
        last,
        new_token_ids=[t for o in outs for t in o.new_token_ids],
        new_text="".join(o.new_text for o in outs),
        logprobs=logprobs,
    )


@dataclass
class CompletionResult:
    """A finished request, accumulated (offline API)."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str | None
    logprobs: list[TokenLogprob] | None = None
    num_cached_tokens: int = 0
