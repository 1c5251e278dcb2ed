"""What the completions and chat endpoints share on the request/response side: OpenAI-shaped
errors, tokenization and the context-length check, logprob and usage formatting."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from fastapi.responses import JSONResponse

from pdserve.engine.client import EngineClient
from pdserve.outputs import RequestOutput, TokenLogprob
from pdserve.router.metrics import ServerMetrics
from pdserve.router.openai_protocol import (
    ChatTokenLogprob,
    CompletionLogprobs,
    ErrorInfo,
    ErrorResponse,
    PromptTokensDetails,
    TopLogprob,
    UsageInfo,
)

logger = logging.getLogger("pdserve.router")

# JSON has no -inf; OpenAI-style clients expect a number, so impossible tokens get this floor.
MIN_LOGPROB = -9999.0


class APIError(Exception):
    """An error answered in OpenAI's JSON shape with its HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")
        self.param = param
        self.code = code

    def body(self) -> ErrorResponse:
        return ErrorResponse(
            error=ErrorInfo(message=self.message, type=self.type, param=self.param, code=self.code)
        )

    def response(self) -> JSONResponse:
        return JSONResponse(self.body().model_dump(), status_code=self.status)


def engine_exception_to_api_error(request_id: str, exc: Exception) -> APIError:
    # Convention with the engine: ValueError means "this request cannot be served as asked".
    if isinstance(exc, ValueError):
        return APIError(400, str(exc))
    logger.error("%s: engine error: %r", request_id, exc, exc_info=exc)
    return APIError(500, f"engine error: {exc}", code="engine_error")


@dataclass
class ServingContext:
    engine: EngineClient
    metrics: ServerMetrics
    _token_texts: dict[int, str] = field(default_factory=dict)

    @property
    def model_name(self) -> str:
        return self.engine.model_name

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.engine.model_name:
            raise APIError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")

    def tokenize_prompt(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise APIError(400, "prompt must not be empty", param="prompt")
            ids: list[int] = self.engine.tokenizer.encode(prompt)
            return ids
        if not prompt:
            raise APIError(400, "prompt must not be empty", param="prompt")
        vocab = len(self.engine.tokenizer)
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"prompt token ids out of range [0, {vocab}): {bad[:5]}", param="prompt")
        return list(prompt)

    def tokenize_chat(self, messages: list[dict[str, str]]) -> list[int]:
        tok = self.engine.tokenizer
        try:
            text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # jinja TemplateError, or no template: a bad request either way
            raise APIError(400, f"cannot apply the chat template: {exc}", param="messages") from exc
        # The template already wrote BOS (if the model uses one); letting the tokenizer add its
        # special tokens again would double it.
        ids: list[int] = tok.encode(text, add_special_tokens=False)
        return ids

    def token_text(self, token_id: int) -> str:
        text = self._token_texts.get(token_id)
        if text is None:
            text = self.engine.tokenizer.decode([token_id], skip_special_tokens=False)
            self._token_texts[token_id] = text
        return text

    def completion_logprobs(self, lps: list[TokenLogprob], offset: int) -> CompletionLogprobs:
        """OpenAI legacy shape; `offset` is where the first token starts in the choice text."""
        out = CompletionLogprobs()
        for lp in lps:
            text = self.token_text(lp.token_id)
            out.tokens.append(text)
            out.token_logprobs.append(max(lp.logprob, MIN_LOGPROB))
            out.top_logprobs.append({self.token_text(t): max(v, MIN_LOGPROB) for t, v in lp.top})
            out.text_offset.append(offset)
            offset += len(text)
        return out

    def chat_logprobs(self, lps: list[TokenLogprob]) -> list[ChatTokenLogprob]:
        return [
            ChatTokenLogprob(
                token=self.token_text(lp.token_id),
                logprob=max(lp.logprob, MIN_LOGPROB),
                bytes=list(self.token_text(lp.token_id).encode()),
                top_logprobs=[
                    TopLogprob(
                        token=self.token_text(t),
                        logprob=max(v, MIN_LOGPROB),
                        bytes=list(self.token_text(t).encode()),
                    )
                    for t, v in lp.top
                ],
            )
            for lp in lps
        ]


def resolve_max_tokens(prompt_len: int, requested: int | None, max_model_len: int, what: str) -> int:
    """The completion budget: as requested if it fits the context, else a 400; all the room
    left when not given."""
    if requested is None:
        room = max_model_len - prompt_len
        if room < 1:
            raise APIError(
                400,
                f"This model's maximum context length is {max_model_len} tokens. However, your "
                f"{what} resulted in {prompt_len} tokens, which leaves no room for the completion. "
                f"Please reduce the length of the {what}.",
                param=what,
                code="context_length_exceeded",
            )
        return room
    if prompt_len + requested > max_model_len:
        raise APIError(
            400,
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{prompt_len + requested} tokens ({prompt_len} in the {what}, {requested} in the "
            f"completion). Please reduce the length of the {what} or completion.",
            param=what,
            code="context_length_exceeded",
        )
    return requested


@dataclass
class ChoiceResult:
    """A choice accumulated from its engine outputs (non-streaming responses)."""

    index: int
    text: list[str] = field(default_factory=list)
    num_tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    num_cached_tokens: int = 0
    error: str | None = None

    def add(self, out: RequestOutput) -> None:
        self.text.append(out.new_text)
        self.num_tokens += len(out.new_token_ids)
        if out.logprobs:
            self.logprobs.extend(out.logprobs)
        if out.finished:
            self.finish_reason = out.finish_reason
            self.stop_reason = out.stop_reason
            self.num_cached_tokens = out.num_cached_tokens
            self.error = out.error


def failure_of(request_id: str, finish_reason: str | None, error: str | None) -> APIError | None:
    """The API error for a choice the engine ended abnormally, or None."""
    if finish_reason == "error":
        logger.error("%s: engine reported an error: %s", request_id, error)
        return APIError(500, f"engine error: {error or 'unknown'}", code="engine_error")
    if finish_reason == "abort":
        logger.warning("%s: aborted by the engine", request_id)
        return APIError(503, "the request was aborted by the engine", code="service_unavailable")
    return None


def usage_of(prompt_lens: Sequence[int], completion_tokens: int, cached: Sequence[int]) -> UsageInfo:
    """Prompts count once each however many samples were drawn (as OpenAI bills n > 1)."""
    prompt_tokens = sum(prompt_lens)
    return UsageInfo(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=sum(cached)),
    )
