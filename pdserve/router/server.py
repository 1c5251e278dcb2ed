"""The router process: the OpenAI API over a DisaggClient, plus the internal prefill-queue route."""

from __future__ import annotations

import hmac

from fastapi import FastAPI, Request, Response

from pdserve.config import ServerConfig
from pdserve.protocol import PrefillJobPull, ProtocolError, decode, encode
from pdserve.router.app import build_app
from pdserve.router.disagg_client import DisaggClient
from pdserve.router.disagg_metrics import DisaggMetrics

# A pull never holds the connection longer than this, whatever the prefill worker asks.
MAX_PULL_WAIT_S = 5.0


def build_router_app(client: DisaggClient, cfg: ServerConfig, token: str) -> FastAPI:
    app = build_app(client, cfg)
    app.state.disagg_metrics = DisaggMetrics(app.state.ctx.metrics.registry, client)

    @app.post("/internal/prefill/pull")
    async def pull(request: Request) -> Response:
        if not hmac.compare_digest(request.headers.get("x-pdserve-token", ""), token):
            return Response(status_code=401)
        try:
            msg = decode(await request.body(), PrefillJobPull)
        except ProtocolError as e:
            return Response(str(e), status_code=400)
        refusal = client.prefill_pull_allowed(msg.worker_id)
        if refusal is not None:
            return Response(refusal, status_code=403)
        job = await client.queue.pull(msg.worker_id, min(max(msg.timeout_s, 0.0), MAX_PULL_WAIT_S))
        if job is None:
            return Response(status_code=204)
        return Response(encode(job), media_type="application/msgpack")

    return app
