"""When a request stops: the completion budget it gets at admission, and the stop check after each
sampled token. Pure functions of the request's numbers."""

from __future__ import annotations

from pdserve.engine.request import Request, RequestStatus
from pdserve.sampling_params import SamplingParams


class ContextLengthError(ValueError):
    """The prompt plus the requested completion do not fit the model's context."""


def resolve_max_tokens(num_prompt_tokens: int, params: SamplingParams, max_model_len: int) -> int:
    """The completion budget a request gets; raises ContextLengthError if it cannot fit."""
    room = max_model_len - num_prompt_tokens
    requested = params.max_tokens if params.max_tokens is not None else max(room, 1)
    if num_prompt_tokens + requested > max_model_len:
        raise ContextLengthError(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{num_prompt_tokens + requested} tokens ({num_prompt_tokens} in the prompt, "
            f"{requested} for the completion). Please reduce the prompt or the completion length."
        )
    return requested


def stop_status(
    req: Request, token_id: int, eos_token_ids: tuple[int, ...], max_model_len: int
) -> RequestStatus | None:
    """The request's status after `token_id` was appended: stopped (an EOS or stop token, once
    min_tokens are out; a stop token is recorded as the stop reason), out of length, or None."""
    params = req.params
    if req.num_output_tokens >= params.min_tokens:
        if not params.ignore_eos and token_id in eos_token_ids:
            return RequestStatus.FINISHED_STOPPED
        if token_id in params.stop_token_ids:
            req.stop_reason = token_id
            return RequestStatus.FINISHED_STOPPED
    if req.num_output_tokens >= req.max_tokens or req.num_tokens >= max_model_len:
        return RequestStatus.FINISHED_LENGTH
    return None
