"""The router's calls to one worker: its info at start-up, a generate stream, an abort, and the
feed of a prefill worker's first tokens."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable

import httpx

from pdserve.protocol import (
    AbortRequest,
    FrameReader,
    GenerateRequest,
    PrefillDeclined,
    PrefillFirstToken,
    PrefillJob,
    ProtocolError,
    TokenChunk,
    WorkerInfo,
    decode,
    encode,
)
from pdserve.router.worker_handle import WorkerHandle

logger = logging.getLogger(__name__)

# Outer bound between two frames of one stream; the decode worker has its own, shorter deadlines.
STREAM_READ_TIMEOUT_S = 600.0
# A broken first-token feed is reopened after this long (its worker may be restarting or dead).
FEED_RETRY_S = 0.5


async def fetch_info(http: httpx.AsyncClient, url: str, deadline: float) -> WorkerInfo:
    """The worker's WorkerInfo, retried until it answers or `deadline` (monotonic) passes."""
    while True:
        try:
            resp = await http.get(f"{url}/worker/info")
            if resp.status_code == 200:
                return decode(resp.content, WorkerInfo)
            if resp.status_code == 401:
                raise PermissionError(f"worker {url} refused our token: secrets differ")
        except (httpx.HTTPError, ProtocolError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"worker {url} did not come up in time")
        await asyncio.sleep(0.2)


async def stream_generate(
    http: httpx.AsyncClient, worker: WorkerHandle, body: GenerateRequest
) -> AsyncIterator[PrefillJob | PrefillDeclined | TokenChunk]:
    """The worker's generate stream, message by message."""
    timeout = httpx.Timeout(10.0, read=STREAM_READ_TIMEOUT_S)
    async with http.stream(
        "POST", f"{worker.info.url}/worker/generate", content=encode(body), timeout=timeout
    ) as resp:
        if resp.status_code != 200:
            raise ConnectionError(f"HTTP {resp.status_code} from {worker.worker_id}")
        reader = FrameReader()
        async for data in resp.aiter_raw():
            for msg in reader.feed(data):
                if not isinstance(msg, PrefillJob | PrefillDeclined | TokenChunk):
                    raise ProtocolError(f"unexpected {type(msg).__name__} in a generate stream")
                yield msg


async def post_abort(http: httpx.AsyncClient, worker: WorkerHandle, msg: AbortRequest) -> None:
    try:
        await http.post(f"{worker.info.url}/worker/abort", content=encode(msg), timeout=5.0)
    except httpx.HTTPError as e:
        logger.warning("[%s] abort to %s failed: %s", msg.request_id, worker.worker_id, e)


async def follow_first_tokens(
    http: httpx.AsyncClient, worker: WorkerHandle, deliver: Callable[[PrefillFirstToken], object]
) -> None:
    """Keep a prefill worker's first-token feed open (router/direct_first_token.py), handing each
    token to `deliver`; reopen it whenever it breaks. Runs until cancelled."""
    url = f"{worker.info.url}/worker/prefill/first_tokens"
    while True:
        try:
            async with http.stream("GET", url, timeout=httpx.Timeout(10.0, read=None)) as resp:
                if resp.status_code != 200:
                    raise ConnectionError(f"HTTP {resp.status_code}")
                reader = FrameReader()
                async for data in resp.aiter_raw():
                    for msg in reader.feed(data):
                        if isinstance(msg, PrefillFirstToken):
                            deliver(msg)
        except (httpx.HTTPError, ConnectionError, ProtocolError) as e:
            logger.debug("first-token feed of %s broke: %s", worker.worker_id, e)
        await asyncio.sleep(FEED_RETRY_S)
