"""The OpenAI-compatible HTTP app: routes, error shapes, API-key and body-size guards, metrics.

The app talks to the engine only through `EngineClient`, so the same app fronts an in-process
engine or a pool of remote workers.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from typing import TypeVar

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pdserve.config import ServerConfig
from pdserve.engine.client import EngineClient
from pdserve.router import metrics as metrics_mod
from pdserve.router.metrics import ServerMetrics
from pdserve.router.openai_protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
    validation_message,
)
from pdserve.router.serving import APIError, ServingContext
from pdserve.router.serving_chat import create_chat_completion
from pdserve.router.serving_completions import create_completion

logger = logging.getLogger("pdserve.router")

ENDPOINTS = ("/v1/models", "/v1/completions", "/v1/chat/completions")

_M = TypeVar("_M", bound=BaseModel)


def _digest(value: bytes) -> bytes:
    return hashlib.sha256(value).digest()


class _GuardMiddleware:
    """Checks the API key on /v1/* and caps the request body, both before any route runs.
    The cap holds for the declared Content-Length and for the bytes actually received, so a
    chunked upload cannot get around it."""

    def __init__(self, app: ASGIApp, api_key: str | None, max_body_bytes: int) -> None:
        self.app = app
        # Compared as digests so the comparison takes the same time whatever the key's length.
        self.expected_auth = None if api_key is None else _digest(f"Bearer {api_key}".encode())
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        err = self._check_auth(scope) or self._check_content_length(scope)
        if err is not None:
            await err.response()(scope, receive, send)
            return

        received = 0
        response_started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise self._too_large()
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal response_started
            response_started = response_started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except APIError as exc:
            # Raised by limited_receive where no route turned it into a response.
            if response_started:
                raise
            await exc.response()(scope, receive, send)

    def _check_auth(self, scope: Scope) -> APIError | None:
        if self.expected_auth is None or not scope["path"].startswith("/v1"):
            return None
        given = dict(scope["headers"]).get(b"authorization")
        if given is None:
            message = "You didn't provide an API key (header 'Authorization: Bearer <key>')."
        elif hmac.compare_digest(_digest(given), self.expected_auth):
            return None
        else:
            message = "Incorrect API key provided."
        return APIError(401, message, code="invalid_api_key")

    def _check_content_length(self, scope: Scope) -> APIError | None:
        value = dict(scope["headers"]).get(b"content-length")
        if value is None:
            return None
        if not value.isdigit():
            return APIError(400, "invalid Content-Length header")
        if int(value) > self.max_body_bytes:
            return self._too_large()
        return None

    def _too_large(self) -> APIError:
        return APIError(413, f"request body exceeds {self.max_body_bytes} bytes", code="request_too_large")


class _RequestCounterMiddleware:
    """Counts /v1 requests by endpoint and final status, including those the guard rejects."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope["path"] if scope["type"] == "http" else ""
        if not path.startswith("/v1"):
            await self.app(scope, receive, send)
            return
        # Unknown paths share one label so clients cannot grow the label set without bound.
        endpoint = path if path in ENDPOINTS else "other"
        status = 500

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            self.metrics.requests.labels(endpoint=endpoint, status=str(status)).inc()


async def _parse(request: Request, model: type[_M]) -> _M:
    body = await request.body()
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        message, param = validation_message(exc)
        raise APIError(400, message, param=param) from exc


def _install_error_handlers(app: FastAPI) -> None:
    async def on_api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, APIError)
        return exc.response()

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        message = (
            f"Invalid URL ({request.method} {request.url.path})" if exc.status_code == 404 else exc.detail
        )
        return APIError(exc.status_code, str(message)).response()

    async def on_validation_error(request: Request, exc: Exception) -> Response:
        return APIError(400, str(exc)).response()

    async def on_unexpected(request: Request, exc: Exception) -> Response:
        logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return APIError(500, "internal server error").response()

    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(Exception, on_unexpected)


def build_app(engine: EngineClient, cfg: ServerConfig) -> FastAPI:
    metrics = ServerMetrics(engine.stats)
    ctx = ServingContext(engine, metrics)
    # No interactive docs: a serving endpoint exposes only what clients need.
    app = FastAPI(title="pdserve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.ctx = ctx
    _install_error_handlers(app)

    @app.get("/health")
    async def health() -> Response:
        try:
            engine.stats()
        except Exception as exc:
            logger.warning("health check failed: %r", exc)
            return JSONResponse({"status": "unhealthy"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=metrics_mod.CONTENT_TYPE)

    @app.get("/v1/models")
    async def list_models() -> Response:
        card = ModelCard(id=engine.model_name, max_model_len=engine.max_model_len)
        return Response(ModelList(data=[card]).model_dump_json(), media_type="application/json")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await create_completion(ctx, await _parse(request, CompletionRequest), request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await create_chat_completion(ctx, await _parse(request, ChatCompletionRequest), request)

    app.add_middleware(_GuardMiddleware, api_key=cfg.api_key, max_body_bytes=cfg.max_body_bytes)
    app.add_middleware(_RequestCounterMiddleware, metrics=metrics)  # outermost: sees every status
    return app
