"""The internal HTTP surface every worker shares, and the `pdserve worker` process.

Routes (msgpack bodies, loopback by default, token-checked except /health):
  GET  /health            200 once the engine is up
  GET  /worker/info       WorkerInfo (role, KV layout and endpoint, model)
  GET  /worker/load       WorkerLoad (queue lengths, free blocks, KV events since the last poll)
  POST /worker/generate   GenerateRequest → stream of frames: [PrefillJob], TokenChunk... (decode
                          and colocated roles; a prefill worker serves the whole requests a router
                          with --prefill-serves-whole sends it)
  POST /worker/abort      AbortRequest
  POST /worker/prefill/destination  PrefillDestination (prefill role)
  GET  /worker/prefill/first_tokens stream of PrefillFirstToken frames, for the router (prefill role)
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import sys
from collections.abc import AsyncIterator
from typing import Protocol

import uvicorn
from fastapi import FastAPI, Request, Response
from fastapi.responses import StreamingResponse

from pdserve import envs
from pdserve.config import EngineConfig, WorkerConfig
from pdserve.process_pauses import PauseMonitor, freeze_startup_heap
from pdserve.protocol import (
    AbortRequest,
    GenerateRequest,
    PrefillDestination,
    ProtocolError,
    WorkerInfo,
    WorkerLoad,
    decode,
    encode,
)
from pdserve.workers.common import set_cpu_affinity

logger = logging.getLogger(__name__)
MSGPACK = "application/msgpack"


class WorkerRole(Protocol):
    def start(self) -> None: ...
    async def shutdown(self) -> None: ...
    def info(self) -> WorkerInfo: ...
    def load(self) -> WorkerLoad: ...
    def generate(self, req: GenerateRequest) -> AsyncIterator[bytes]: ...
    async def abort(self, msg: AbortRequest) -> None: ...


def build_worker_app(make_role: object, token: str) -> FastAPI:
    """make_role: () -> WorkerRole, called inside the app's lifespan (its event loop)."""
    holder: dict[str, WorkerRole] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        interval = envs.switch_interval_s()
        if interval is not None:
            sys.setswitchinterval(interval)
        role: WorkerRole = make_role()  # type: ignore[operator]
        role.start()
        holder["role"] = role
        pauses = PauseMonitor(f"worker {role.info().worker_id}")
        pauses.watch()
        freeze_startup_heap()
        logger.info("worker %s (%s) ready", role.info().worker_id, role.info().role)
        yield
        pauses.close()
        await role.shutdown()

    app = FastAPI(lifespan=lifespan)

    def authorized(request: Request) -> bool:
        return hmac.compare_digest(request.headers.get("x-pdserve-token", ""), token)

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200 if "role" in holder else 503)

    @app.get("/worker/info")
    async def info(request: Request) -> Response:
        if not authorized(request):
            return Response(status_code=401)
        return Response(encode(holder["role"].info()), media_type=MSGPACK)

    @app.get("/worker/load")
    async def load(request: Request) -> Response:
        if not authorized(request):
            return Response(status_code=401)
        return Response(encode(holder["role"].load()), media_type=MSGPACK)

    @app.post("/worker/abort")
    async def abort(request: Request) -> Response:
        if not authorized(request):
            return Response(status_code=401)
        try:
            msg = decode(await request.body(), AbortRequest)
        except ProtocolError as e:
            return Response(str(e), status_code=400)
        await holder["role"].abort(msg)
        return Response(status_code=200)

    @app.post("/worker/prefill/destination")
    async def destination(request: Request) -> Response:
        if not authorized(request):
            return Response(status_code=401)
        set_destination = getattr(holder["role"], "set_destination", None)
        if set_destination is None:
            return Response("not a prefill worker", status_code=404)
        try:
            msg = decode(await request.body(), PrefillDestination)
        except ProtocolError as e:
            return Response(str(e), status_code=400)
        set_destination(msg)
        return Response(status_code=200)

    @app.get("/worker/prefill/first_tokens")
    async def first_tokens(request: Request) -> Response:
        if not authorized(request):
            return Response(status_code=401)
        feed = getattr(holder["role"], "first_tokens", None)
        if feed is None:
            return Response("not a prefill worker", status_code=404)
        return StreamingResponse(feed(), media_type=MSGPACK)

    @app.post("/worker/generate")
    async def generate(request: Request) -> Response:
        if not authorized(request):
            return Response(status_code=401)
        try:
            msg = decode(await request.body(), GenerateRequest)
        except ProtocolError as e:
            return Response(str(e), status_code=400)
        return StreamingResponse(holder["role"].generate(msg), media_type=MSGPACK)

    return app


def run_worker(cfg: WorkerConfig, engine_cfg: EngineConfig) -> None:
    """Entry point of `pdserve worker`: one engine, one process, until SIGINT/SIGTERM."""
    set_cpu_affinity(cfg.cpus)
    secret = envs.secret()
    token = envs.internal_token(secret)
    url = f"http://{cfg.host}:{cfg.port}"

    def make_role() -> WorkerRole:
        if cfg.role == "prefill":
            from pdserve.workers.prefill import PrefillWorker

            return PrefillWorker(cfg, engine_cfg, secret, url, token)
        from pdserve.workers.decode import DecodeWorker

        return DecodeWorker(cfg, engine_cfg, secret, url)

    app = build_worker_app(make_role, token)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning", access_log=False)
