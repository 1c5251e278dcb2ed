"""A remote prefill's first token, as the router streams it before the decode worker has it.

The decode worker would turn the job's first token into text with an IncrementalDetokenizer over
the request's prompt and check it against the request's stop conditions; the prefill worker has
the same tokenizer and the same prompt, so it can do both at once and the router can stream the
token to the client while the KV's completion is still on its way (router/direct_first_token.py).
A token that ends the request is not sent: whether and how it ends (stop string cut, stop reason,
min_tokens) is the decode worker's to say, and the router waits for it as before.
"""

from __future__ import annotations

from typing import Any

from pdserve.engine.detokenizer import IncrementalDetokenizer
from pdserve.outputs import TokenLogprob
from pdserve.protocol import PrefillFirstToken, PrefillJob, logprob_to_wire
from pdserve.sampling_params import SamplingParams


def first_token_message(
    job: PrefillJob,
    token_id: int,
    logprob: TokenLogprob | None,
    tokenizer: Any | None,
    eos_token_ids: tuple[int, ...],
) -> PrefillFirstToken | None:
    """The message for the router (with the job's marks so far), or None if this token may end
    the request."""
    params = SamplingParams(**job.params)
    if params.max_tokens is not None and params.max_tokens <= 1:
        return None
    if (not params.ignore_eos and token_id in eos_token_ids) or token_id in params.stop_token_ids:
        return None
    text = ""
    if tokenizer is not None:
        detok = IncrementalDetokenizer(tokenizer, job.prompt_token_ids, params)
        if detok.update([token_id]) is not None:
            return None  # a stop string inside the first token's text
        text = detok.take_delta(False)
    wire = None if logprob is None else logprob_to_wire(logprob)
    return PrefillFirstToken(job.request_id, token_id, text, wire, len(job.prompt_token_ids), dict(job.trace))
