"""The internal wire format: typed messages through msgpack (never pickle), version-checked."""

from __future__ import annotations

import msgpack
import pytest

from pdserve.protocol import (
    PROTOCOL_VERSION,
    FrameReader,
    GenerateRequest,
    KVLayout,
    PrefillJob,
    ProtocolError,
    TokenChunk,
    decode,
    encode,
    frame,
)


def _job() -> PrefillJob:
    layout = KVLayout("m", "bfloat16", 16, 2, 8, 128)
    return PrefillJob(
        request_id="r1", prompt_token_ids=list(range(5000)), params={"max_tokens": 3, "stop": ["x"]},
        decode_worker_id="decode-0", kv_host="127.0.0.1", kv_port=5, dst_block_ids=[7, 3, 9],
        skip_tokens=16, deadline=1.5, layout=layout,
    )  # fmt: skip


def test_round_trip_keeps_types_and_nested_messages() -> None:
    job = decode(encode(_job()), PrefillJob)
    assert job == _job()
    assert isinstance(job.layout, KVLayout)  # nested message rebuilt as its class
    assert job.params == {"max_tokens": 3, "stop": ["x"]}  # plain maps stay maps


def test_frames_split_a_byte_stream_anywhere() -> None:
    msgs = [TokenChunk("r", [i], f" t{i}", finished=i == 4) for i in range(5)]
    data = b"".join(frame(m) for m in msgs)
    reader, out = FrameReader(), []
    for i in range(0, len(data), 7):  # arbitrary cut points
        out += reader.feed(data[i : i + 7])
    assert out == msgs


def test_unknown_types_wrong_versions_and_garbage_are_refused() -> None:
    bogus = msgpack.packb([PROTOCOL_VERSION, {"__t": "Pickle", "x": 1}])
    with pytest.raises(ProtocolError, match="unknown message type 'Pickle'"):
        decode(bogus)
    with pytest.raises(ProtocolError, match="malformed GenerateRequest"):
        decode(msgpack.packb([PROTOCOL_VERSION, {"__t": "GenerateRequest", "nope": 1}]))
    old = msgpack.packb([PROTOCOL_VERSION - 1, {"__t": "GenerateRequest", "renamed_field": 1}])
    with pytest.raises(ProtocolError, match=f"protocol version {PROTOCOL_VERSION - 1} != ours"):
        decode(old)
    with pytest.raises(ProtocolError, match="undecodable"):
        decode(b"\xc1\x00garbage")
    with pytest.raises(ProtocolError, match="expected PrefillJob"):
        decode(encode(GenerateRequest("r", [1], {})), PrefillJob)
    with pytest.raises(ProtocolError, match="not a wire message"):
        encode({"a": 1})
