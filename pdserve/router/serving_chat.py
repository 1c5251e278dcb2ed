"""POST /v1/chat/completions: messages through the model's chat template, n samples out."""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Sequence

from fastapi import Request, Response

from pdserve.router.openai_protocol import (
    ChatChoiceLogprobs,
    ChatCompletionChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamChoice,
    ChatCompletionStreamResponse,
    ChatResponseMessage,
    DeltaMessage,
)
from pdserve.router.serving import (
    APIError,
    ChoiceResult,
    ServingContext,
    engine_exception_to_api_error,
    failure_of,
    resolve_max_tokens,
    usage_of,
)
from pdserve.router.streams import (
    SSE_DONE,
    ClientDisconnected,
    SSEResponse,
    SubRequest,
    collect_choices,
    make_sub_requests,
    merge_generations,
    run_unless_disconnected,
    sse,
    sse_error,
    with_phases,
)

logger = logging.getLogger("pdserve.router")


async def create_chat_completion(ctx: ServingContext, req: ChatCompletionRequest, raw: Request) -> Response:
    arrival = time.monotonic()
    ctx.check_model(req.model)
    if reason := req.unsupported_reason():
        raise APIError(400, reason)
    prompt_ids = ctx.tokenize_chat(req.template_messages())
    max_tokens = resolve_max_tokens(
        len(prompt_ids), req.requested_max_tokens, ctx.engine.max_model_len, "messages"
    )
    try:
        params = req.to_sampling_params(max_tokens)
    except ValueError as exc:
        raise APIError(400, str(exc)) from exc
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    subs = make_sub_requests(request_id, [prompt_ids], [params], arrival)
    logger.info(
        "%s: chat: %d message(s), %d prompt tokens, n=%d, max_tokens=%d, stream=%s",
        request_id, len(req.messages), len(prompt_ids), req.n, max_tokens, req.stream,
    )  # fmt: skip
    headers = {"X-Request-Id": request_id}
    if req.stream:
        return SSEResponse(_stream(ctx, req, request_id, subs, len(prompt_ids)), headers=headers)
    try:
        results: dict[int, ChoiceResult] = await run_unless_disconnected(raw, collect_choices(ctx, subs))
    except ClientDisconnected:
        logger.info("%s: client disconnected, request aborted", request_id)
        return Response(status_code=499)
    except Exception as exc:
        raise engine_exception_to_api_error(request_id, exc) from exc
    body = _response(ctx, req, request_id, subs, results, len(prompt_ids))
    logger.info(
        "%s: finished in %.3fs, %d completion tokens",
        request_id, time.monotonic() - arrival, body.usage.completion_tokens,
    )  # fmt: skip
    return Response(body.model_dump_json(), media_type="application/json", headers=headers)


def _response(
    ctx: ServingContext,
    req: ChatCompletionRequest,
    request_id: str,
    subs: Sequence[SubRequest],
    results: dict[int, ChoiceResult],
    prompt_len: int,
) -> ChatCompletionResponse:
    choices: list[ChatCompletionChoice] = []
    for sub in subs:
        r = results[sub.index]
        if err := failure_of(sub.request_id, r.finish_reason, r.error):
            raise err
        logprobs = ChatChoiceLogprobs(content=ctx.chat_logprobs(r.logprobs)) if req.logprobs else None
        choices.append(
            ChatCompletionChoice(
                index=sub.index,
                message=ChatResponseMessage(content="".join(r.text)),
                logprobs=logprobs,
                finish_reason=r.finish_reason,
                stop_reason=r.stop_reason,
            )
        )
    completion_tokens = sum(r.num_tokens for r in results.values())
    return ChatCompletionResponse(
        id=request_id,
        model=ctx.model_name,
        choices=choices,
        usage=usage_of([prompt_len], completion_tokens, [results[0].num_cached_tokens]),
    )


async def _stream(
    ctx: ServingContext,
    req: ChatCompletionRequest,
    request_id: str,
    subs: Sequence[SubRequest],
    prompt_len: int,
) -> AsyncGenerator[str, None]:
    created = int(time.time())
    by_index = {sub.index: sub for sub in subs}
    cached = 0
    completion_tokens = 0

    def chunk(choice: ChatCompletionStreamChoice) -> str:
        return sse(
            ChatCompletionStreamResponse(
                id=request_id, created=created, model=ctx.model_name, choices=[choice]
            )
        )

    try:
        # OpenAI's first chunk of each choice announces the role, with empty content.
        for index in by_index:
            yield chunk(
                ChatCompletionStreamChoice(index=index, delta=DeltaMessage(role="assistant", content=""))
            )
        async with contextlib.aclosing(merge_generations(ctx, subs)) as outputs:
            async for index, out in outputs:
                completion_tokens += len(out.new_token_ids)
                if out.new_text or out.logprobs:
                    logprobs = (
                        ChatChoiceLogprobs(content=ctx.chat_logprobs(out.logprobs)) if out.logprobs else None
                    )
                    yield chunk(
                        ChatCompletionStreamChoice(
                            index=index, delta=DeltaMessage(content=out.new_text), logprobs=logprobs
                        )
                    )
                if out.finished:
                    if err := failure_of(by_index[index].request_id, out.finish_reason, out.error):
                        raise err
                    if index == 0:
                        cached = out.num_cached_tokens
                    final = chunk(
                        ChatCompletionStreamChoice(
                            index=index,
                            delta=DeltaMessage(),
                            finish_reason=out.finish_reason,
                            stop_reason=out.stop_reason,
                        )
                    )
                    yield with_phases(final, out, by_index[index].arrival)
        if req.include_usage_in_stream:
            usage = usage_of([prompt_len], completion_tokens, [cached])
            yield sse(
                ChatCompletionStreamResponse(
                    id=request_id, created=created, model=ctx.model_name, choices=[], usage=usage
                )
            )
        logger.info("%s: stream finished, %d completion tokens", request_id, completion_tokens)
    except APIError as err:
        yield sse_error(err)
    except Exception as exc:
        yield sse_error(engine_exception_to_api_error(request_id, exc))
    yield SSE_DONE
