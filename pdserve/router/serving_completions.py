"""POST /v1/completions: prompt(s) in, n samples per prompt out, streamed or whole."""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Sequence

from fastapi import Request, Response

from pdserve.router.openai_protocol import (
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamChoice,
    CompletionStreamResponse,
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
from pdserve.sampling_params import SamplingParams

logger = logging.getLogger("pdserve.router")


def _sampling_params(ctx: ServingContext, req: CompletionRequest, prompt_len: int) -> SamplingParams:
    max_tokens = resolve_max_tokens(prompt_len, req.max_tokens, ctx.engine.max_model_len, "prompt")
    try:
        return req.to_sampling_params(max_tokens)
    except ValueError as exc:
        raise APIError(400, str(exc)) from exc


async def create_completion(ctx: ServingContext, req: CompletionRequest, raw: Request) -> Response:
    arrival = time.monotonic()
    ctx.check_model(req.model)
    if reason := req.unsupported_reason():
        raise APIError(400, reason)
    prompts = req.prompts()
    if not prompts:
        raise APIError(400, "prompt must not be empty", param="prompt")
    prompt_ids = [ctx.tokenize_prompt(p) for p in prompts]
    params = [_sampling_params(ctx, req, len(ids)) for ids in prompt_ids]
    request_id = f"cmpl-{uuid.uuid4().hex}"
    subs = make_sub_requests(request_id, prompt_ids, params, arrival)
    echo = (
        [p if isinstance(p, str) else ctx.engine.tokenizer.decode(p) for p in prompts] if req.echo else None
    )
    logger.info(
        "%s: completion: %d prompt(s), prompt tokens %s, n=%d, max_tokens=%s, stream=%s",
        request_id, len(prompts), [len(ids) for ids in prompt_ids], req.n,
        [p.max_tokens for p in params], req.stream,
    )  # fmt: skip
    prompt_lens = [len(ids) for ids in prompt_ids]
    headers = {"X-Request-Id": request_id}
    if req.stream:
        return SSEResponse(_stream(ctx, req, request_id, subs, echo, prompt_lens), headers=headers)
    try:
        results: dict[int, ChoiceResult] = await run_unless_disconnected(raw, collect_choices(ctx, subs))
    except ClientDisconnected:
        logger.info("%s: client disconnected, request aborted", request_id)
        return Response(status_code=499)
    except Exception as exc:
        raise engine_exception_to_api_error(request_id, exc) from exc
    body = _response(ctx, req, request_id, subs, results, echo, prompt_lens)
    logger.info(
        "%s: finished in %.3fs, %d completion tokens",
        request_id, time.monotonic() - arrival, body.usage.completion_tokens,
    )  # fmt: skip
    return Response(body.model_dump_json(), media_type="application/json", headers=headers)


def _response(
    ctx: ServingContext,
    req: CompletionRequest,
    request_id: str,
    subs: Sequence[SubRequest],
    results: dict[int, ChoiceResult],
    echo: list[str] | None,
    prompt_lens: list[int],
) -> CompletionResponse:
    choices: list[CompletionChoice] = []
    for sub in subs:
        r = results[sub.index]
        if err := failure_of(sub.request_id, r.finish_reason, r.error):
            raise err
        prefix = echo[sub.index // req.n] if echo else ""
        logprobs = ctx.completion_logprobs(r.logprobs, len(prefix)) if req.logprobs is not None else None
        choices.append(
            CompletionChoice(
                index=sub.index,
                text=prefix + "".join(r.text),
                logprobs=logprobs,
                finish_reason=r.finish_reason,
                stop_reason=r.stop_reason,
            )
        )
    # Cached prompt tokens as the first sample of each prompt saw them.
    cached = [results[k * req.n].num_cached_tokens for k in range(len(prompt_lens))]
    completion_tokens = sum(r.num_tokens for r in results.values())
    return CompletionResponse(
        id=request_id,
        model=ctx.model_name,
        choices=choices,
        usage=usage_of(prompt_lens, completion_tokens, cached),
    )


async def _stream(
    ctx: ServingContext,
    req: CompletionRequest,
    request_id: str,
    subs: Sequence[SubRequest],
    echo: list[str] | None,
    prompt_lens: list[int],
) -> AsyncGenerator[str, None]:
    created = int(time.time())
    by_index = {sub.index: sub for sub in subs}
    offsets = dict.fromkeys(by_index, 0)  # characters streamed so far per choice
    cached: dict[int, int] = {}
    completion_tokens = 0

    def chunk(choice: CompletionStreamChoice) -> str:
        return sse(
            CompletionStreamResponse(id=request_id, created=created, model=ctx.model_name, choices=[choice])
        )

    try:
        if echo:
            for index in by_index:
                text = echo[index // req.n]
                offsets[index] = len(text)
                yield chunk(CompletionStreamChoice(index=index, text=text))
        async with contextlib.aclosing(merge_generations(ctx, subs)) as outputs:
            async for index, out in outputs:
                completion_tokens += len(out.new_token_ids)
                if out.new_text or out.logprobs:
                    logprobs = ctx.completion_logprobs(out.logprobs, offsets[index]) if out.logprobs else None
                    offsets[index] += len(out.new_text)
                    yield chunk(CompletionStreamChoice(index=index, text=out.new_text, logprobs=logprobs))
                if out.finished:
                    if err := failure_of(by_index[index].request_id, out.finish_reason, out.error):
                        raise err
                    if index % req.n == 0:
                        cached[index // req.n] = out.num_cached_tokens
                    final = chunk(
                        CompletionStreamChoice(
                            index=index, text="", finish_reason=out.finish_reason, stop_reason=out.stop_reason
                        )
                    )
                    yield with_phases(final, out, by_index[index].arrival)
        if req.include_usage_in_stream:
            usage = usage_of(prompt_lens, completion_tokens, list(cached.values()))
            yield sse(
                CompletionStreamResponse(
                    id=request_id, created=created, model=ctx.model_name, choices=[], usage=usage
                )
            )
        logger.info("%s: stream finished, %d completion tokens", request_id, completion_tokens)
    except APIError as err:
        yield sse_error(err)
    except Exception as exc:
        yield sse_error(engine_exception_to_api_error(request_id, exc))
    yield SSE_DONE
