"""The router's side of a first token streamed from the prefill worker, against a scripted decode
stream: whichever of the two comes first is what the client gets, once; the decode worker's repeat
is stripped; a declined early job takes no token from its prefill worker."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

import pdserve.router.disagg_client as disagg_client
from pdserve.outputs import RequestOutput
from pdserve.protocol import (
    GenerateRequest,
    KVLayout,
    PrefillDeclined,
    PrefillFirstToken,
    PrefillJob,
    TokenChunk,
    WorkerInfo,
    WorkerLoad,
)
from pdserve.router.disagg_client import DisaggClient
from pdserve.router.early_prefill import early_job
from pdserve.router.request_events import RequestEvents
from pdserve.router.worker_handle import WorkerHandle
from pdserve.sampling_params import SamplingParams

LAYOUT = KVLayout("m", "bfloat16", 16, 2, 2, 64)
PROMPT = list(range(100))
FIRST = PrefillFirstToken("r1", 7, " seven", None, len(PROMPT), {"prefill.first_token_sent": 1.0})


def chunk(ids: list[int], text: str, first: bool = False, finished: bool = False) -> TokenChunk:
    return TokenChunk(
        "r1", ids, text, finished=finished, finish_reason="length" if finished else None,
        prefill_path="remote" if first else None, num_prompt_tokens=len(PROMPT), num_output_tokens=len(ids),
    )  # fmt: skip


class Script:
    """A decode worker's generate stream that sends `messages`, waiting on a gate before each."""

    def __init__(self, messages: list[TokenChunk | PrefillJob | PrefillDeclined]) -> None:
        self.messages = messages
        self.gates = [asyncio.Event() for _ in messages]

    async def stream(
        self, http: object, worker: WorkerHandle, body: GenerateRequest
    ) -> AsyncIterator[object]:
        for gate, msg in zip(self.gates, self.messages, strict=True):
            await gate.wait()
            yield msg

    def release(self, i: int) -> None:
        self.gates[i].set()


@pytest.fixture
def client(monkeypatch: pytest.MonkeyPatch) -> DisaggClient:
    c = DisaggClient([], "token", tokenizer=None)
    info = WorkerInfo("d0", "decode", "http://d0", "127.0.0.1", 1, LAYOUT, "m", 4096)
    c.workers["d0"] = WorkerHandle(info, load=WorkerLoad("d0", 0, 0, 100, 100))
    return c


async def serve(
    client: DisaggClient, script: Script, monkeypatch: pytest.MonkeyPatch
) -> tuple[asyncio.Task[list[RequestOutput]], list[RequestEvents]]:
    monkeypatch.setattr(disagg_client, "stream_generate", script.stream)
    seen: list[RequestEvents] = []
    client.on_first_chunk = seen.append
    worker = client.workers["d0"]
    job = early_job("r1", PROMPT, {}, worker.info)

    async def collect() -> list[RequestOutput]:
        return [out async for out in client._serve("r1", PROMPT, SamplingParams(), worker, 0.0, early=job)]

    task = asyncio.get_running_loop().create_task(collect())
    await asyncio.sleep(0.01)
    return task, seen


async def test_the_prefill_workers_token_first_then_the_rest_without_it(
    client: DisaggClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = Script([chunk([7, 8], " seven eight", first=True), chunk([9], " nine", finished=True)])
    task, seen = await serve(client, script, monkeypatch)
    assert client.first_tokens is not None and client.first_tokens.deliver(FIRST)
    await asyncio.sleep(0.01)
    script.release(0)
    script.release(1)
    outs = await task
    assert [(o.new_token_ids, o.new_text) for o in outs] == [([7], " seven"), ([8], " eight"), ([9], " nine")]
    assert outs[0].num_prompt_tokens == len(PROMPT) and outs[-1].finished
    (events,) = seen
    assert events.first_token_from == "prefill_worker" and not events.first_token_disagreed
    assert events.trace["prefill.first_token_sent"] == 1.0
    assert not client.first_tokens.deliver(FIRST) and len(client.first_tokens) == 0


async def test_a_token_posted_after_the_decode_workers_first_chunk_is_ignored(
    client: DisaggClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = Script([chunk([7], " seven", first=True), chunk([8], " eight", finished=True)])
    task, seen = await serve(client, script, monkeypatch)
    script.release(0)
    await asyncio.sleep(0.01)
    assert client.first_tokens is not None and not client.first_tokens.deliver(FIRST)  # too late
    script.release(1)
    outs = await task
    assert [(o.new_token_ids, o.new_text) for o in outs] == [([7], " seven"), ([8], " eight")]
    assert seen[0].first_token_from == "serving_worker"


async def test_a_declined_early_job_takes_no_token_from_its_prefill_worker(
    client: DisaggClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = Script(
        [
            PrefillDeclined("r1", "no blocks"),
            chunk([4], " four", first=True),
            chunk([5], " five", finished=True),
        ]
    )
    task, _ = await serve(client, script, monkeypatch)
    script.release(0)
    await asyncio.sleep(0.01)
    assert client.first_tokens is not None and not client.first_tokens.deliver(FIRST)
    assert client.queue.depth == 0  # the early job was withdrawn
    script.release(1)
    script.release(2)
    assert [o.new_token_ids for o in await task] == [[4], [5]]
