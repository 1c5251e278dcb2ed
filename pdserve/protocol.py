"""Typed wire messages between router, decode workers and prefill workers.

Every message is a dataclass; on the wire it is msgpack `[PROTOCOL_VERSION, type_tag, fields]`.
Never pickle: a peer can only make us build these plain types. Tensor payloads travel beside
the message as raw bytes (see kv_transfer/framing.py), never inside it.
"""

from __future__ import annotations

import dataclasses
import struct
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgpack

from pdserve.outputs import RequestOutput, TokenLogprob, merge_outputs
from pdserve.sampling_params import SamplingParams

PROTOCOL_VERSION = 9


def logprob_to_wire(lp: TokenLogprob) -> list[Any]:
    """A token's logprob on the wire: [token_id, logprob, [[id, lp], ...]]."""
    return [lp.token_id, lp.logprob, [list(t) for t in lp.top]]


def logprob_from_wire(wire: list[Any]) -> TokenLogprob:
    token, lp, top = wire
    return TokenLogprob(int(token), float(lp), [(int(a), float(b)) for a, b in top])


class ProtocolError(ValueError):
    """A message that is malformed, of an unknown type, or from another protocol version."""


# ---- KV layout: what two workers must agree on before KV can move between them ----


@dataclass(frozen=True)
class KVLayout:
    model: str
    dtype: str
    block_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int

    def incompatibility(self, other: KVLayout) -> str | None:
        """None if KV from `other` can land in this cache; else which fields differ."""
        diffs = [
            f"{f.name}: {getattr(self, f.name)!r} != {getattr(other, f.name)!r}"
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != getattr(other, f.name)
        ]
        return "; ".join(diffs) if diffs else None

    @property
    def bytes_per_token(self) -> int:
        itemsize = {"float32": 4, "bfloat16": 2, "float16": 2}[self.dtype]
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * itemsize


# ---- worker registration and health ----


@dataclass
class WorkerInfo:
    worker_id: str
    role: str  # "prefill" | "decode" | "colocated"
    url: str  # internal HTTP API
    kv_host: str
    kv_port: int  # 0 when the worker receives no KV
    layout: KVLayout
    model_name: str
    max_model_len: int
    # A decode worker's remote-prefill policy (workers/disagg_policy.DisaggPolicy fields) and KV
    # deadline, so the router can start a prefill before the decode worker has decided.
    disagg_policy: dict[str, Any] | None = None
    kv_timeout_s: float = 0.0


@dataclass
class WorkerLoad:
    worker_id: str
    num_running: int
    num_waiting: int
    num_free_blocks: int
    num_total_blocks: int
    num_reserved: int = 0  # requests holding blocks while their KV is being prefilled elsewhere
    # (event, block_hash) since the last poll: "stored" / "removed"; feeds the router's prefix index.
    kv_events: list[tuple[str, int]] = field(default_factory=list)
    prefix_cache_hit_tokens: int = 0
    num_preemptions: int = 0
    # The engine thread's lifetime counters (engine/step_stats.py): steps, tokens, seconds per phase.
    engine_counters: dict[str, float] = field(default_factory=dict)
    prefill_tokens_per_s: float = 0.0  # a decode worker's estimate of its own prefill speed


# ---- router → decode worker (or a prefill worker serving a request whole) ----


@dataclass
class GenerateRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: dict[str, Any]  # SamplingParams fields
    # What the router knows that the decode worker's local-or-remote choice needs.
    prefill_queue_depth: int = 0
    num_prefill_workers: int = 0
    allow_remote: bool = True
    # The router has already queued this prompt's prefill (router/early_prefill.py): the decode
    # worker reserves blocks and answers with the job (its destination), or with PrefillDeclined.
    prefill_started: bool = False

    def sampling_params(self) -> SamplingParams:
        return SamplingParams(**self.params)


def params_to_dict(params: SamplingParams) -> dict[str, Any]:
    return dataclasses.asdict(params)


# ---- decode worker → router (the generate stream) ----


@dataclass
class PrefillJob:
    """A remote prefill: run the prompt, push KV for positions >= skip_tokens into dst_block_ids
    of the decode worker at kv_host:kv_port, then report the first token."""

    request_id: str
    prompt_token_ids: list[int]
    params: dict[str, Any]
    decode_worker_id: str
    kv_host: str
    kv_port: int
    dst_block_ids: list[int]
    skip_tokens: int  # already cached on the decode worker: not computed there, not sent
    deadline: float  # wall-clock (time.time()) after which the decode worker stops waiting
    layout: KVLayout | None = None
    # Wall-clock marks (time.time()) of the request's control path so far; each side adds its own
    # and the first TokenChunk carries them all to the router (see pdserve/trace.py).
    trace: dict[str, float] = field(default_factory=dict)
    # The router streams the first token from the prefill worker as soon as it is sampled
    # (router/direct_first_token.py): the prefill worker sends it a PrefillFirstToken as well.
    first_token_to_router: bool = False

    @property
    def has_destination(self) -> bool:
        """False for a job the router queued before the decode worker reserved blocks for it."""
        return self.kv_port != 0

    def set_destination(self, dest: PrefillDestination) -> None:
        self.decode_worker_id, self.kv_host, self.kv_port = dest.decode_worker_id, dest.kv_host, dest.kv_port
        self.dst_block_ids, self.skip_tokens, self.deadline = (
            dest.dst_block_ids,
            dest.skip_tokens,
            dest.deadline,
        )
        for name, t in dest.trace.items():
            self.trace.setdefault(name, t)


@dataclass
class PrefillDeclined:
    """Decode worker → router, for a request whose prefill the router started early: this worker
    prefills the prompt itself (no blocks to reserve), so the early job is withdrawn."""

    request_id: str
    reason: str


@dataclass
class PrefillDestination:
    """Router → prefill worker: where the KV of a job it took before the decode worker had decided
    goes (the fields a PrefillJob lacks until then)."""

    request_id: str
    decode_worker_id: str
    kv_host: str
    kv_port: int
    dst_block_ids: list[int]
    skip_tokens: int
    deadline: float
    trace: dict[str, float] = field(default_factory=dict)

    @classmethod
    def of(cls, job: PrefillJob) -> PrefillDestination:
        return cls(
            job.request_id, job.decode_worker_id, job.kv_host, job.kv_port, list(job.dst_block_ids),
            job.skip_tokens, job.deadline, dict(job.trace),
        )  # fmt: skip


@dataclass
class TokenChunk:
    """One or more steps' worth of output for one request."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool = False
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    logprobs: list[list[Any]] | None = None  # [token_id, logprob, [[id, lp], ...]] per token
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    num_output_tokens: int = 0
    error: str | None = None
    # Set on the first chunk: how the prompt was prefilled and what the transfer cost.
    # "whole": a prefill worker served the request end to end (router/whole_policy.py).
    prefill_path: str | None = None  # "local" | "remote" | "fallback" | "whole"
    kv_bytes: int = 0
    kv_seconds: float = 0.0
    trace: dict[str, float] | None = None  # first chunk: the control path's marks (pdserve/trace.py)

    @classmethod
    def from_output(cls, out: RequestOutput) -> TokenChunk:
        lps = None
        if out.logprobs is not None:
            lps = [logprob_to_wire(lp) for lp in out.logprobs]
        return cls(
            request_id=out.request_id,
            new_token_ids=out.new_token_ids,
            new_text=out.new_text,
            finished=out.finished,
            finish_reason=out.finish_reason,
            stop_reason=out.stop_reason,
            logprobs=lps,
            num_prompt_tokens=out.num_prompt_tokens,
            num_cached_tokens=out.num_cached_tokens,
            num_output_tokens=out.num_output_tokens,
            error=out.error,
        )

    @classmethod
    def from_outputs(cls, outs: list[RequestOutput]) -> TokenChunk:
        """Consecutive outputs of one request as one chunk (see outputs.merge_outputs)."""
        return cls.from_output(merge_outputs(*outs))

    def to_output(self) -> RequestOutput:
        lps = None if self.logprobs is None else [logprob_from_wire(w) for w in self.logprobs]
        return RequestOutput(
            request_id=self.request_id,
            new_token_ids=self.new_token_ids,
            new_text=self.new_text,
            finished=self.finished,
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
            logprobs=lps,
            num_prompt_tokens=self.num_prompt_tokens,
            num_cached_tokens=self.num_cached_tokens,
            num_output_tokens=self.num_output_tokens,
            error=self.error,
        )


@dataclass
class AbortRequest:
    request_id: str
    reason: str = "client"
    # Router → decode worker: no prefill worker can still be writing this request's KV
    # (its job never left the queue, or the prefill worker confirmed it stopped).
    writer_stopped: bool = False
    # Router → decode worker: the prefill worker holding the job died; prefill locally instead
    # of aborting the request.
    fall_back: bool = False


# ---- prefill worker ↔ decode worker (the KV channel) ----


@dataclass
class KVHello:
    """First message on a KV connection, sent by the prefill side after the challenge."""

    protocol_version: int
    worker_id: str
    layout: KVLayout
    transport: str  # "tcp" | "shm" | "cuda_ipc" | "nccl" | "nixl"
    mac: bytes  # HMAC-SHA256(secret, challenge || worker_id)


@dataclass
class KVChallenge:
    nonce: bytes
    protocol_version: int


@dataclass
class NcclRendezvous:
    """Transport nccl: where the prefill side meets the decode side to form the connection's 2-rank
    torch.distributed process group (see kv_transfer/nccl.py)."""

    store_port: int  # a TCPStore the decode worker hosts on its KV host
    prefix: str  # this connection's keys in that store (random per connection)
    backend: str  # "nccl" (CUDA caches) | "gloo" (CPU caches)


@dataclass
class NixlEndpoint:
    """Transport nixl: what a prefill worker needs to write into the decode worker's cache with NIXL
    (see kv_transfer/nixl.py)."""

    agent_metadata: bytes  # the decode side's NIXL agent (backends, registered memory)
    mem_type: str  # "DRAM" (CPU caches) | "VRAM" (GPU caches)
    # Per layer: [base address, bytes from the K half to the V half, device id] of its cache tensor.
    regions: list[list[int]]


@dataclass
class KVHelloAck:
    ok: bool
    error: str | None = None
    shm_name: str | None = None  # the decode worker's shared-memory KV cache, for transport shm
    layout: KVLayout | None = None
    # Transport cuda_ipc: per layer, the CUDA IPC handle fields of the decode worker's cache tensor
    # (raw bytes and ints; see kv_transfer/cuda_ipc.py).
    cuda_ipc: list[list[Any]] | None = None
    nccl: NcclRendezvous | None = None  # transport nccl
    nixl: NixlEndpoint | None = None  # transport nixl


@dataclass
class KVLayerChunk:
    """KV of token positions [start, end) of one layer group. For tcp the payload follows the message;
    for shm it was written straight into the receiver's cache. checksum: crc32 of the payload."""

    request_id: str
    layer_start: int
    layer_end: int
    start: int
    end: int
    wire_dtype: str
    nbytes: int
    checksum: int
    scales_nbytes: int = 0  # fp8 wire compression: per-(layer, k/v, token) scales follow the payload


@dataclass
class PrefillDone:
    request_id: str
    first_token_id: int
    first_logprob: list[Any] | None  # [token_id, logprob, [[id, lp], ...]]
    num_tokens: int  # positions [skip, num_tokens) were sent
    kv_bytes: int
    # Transports that write in place (cuda_ipc): a fingerprint of the KV written at one position in
    # kv_checksum_stride (kv_transfer/spot_check.py), which the decode side recomputes from its
    # cache before it decodes.
    kv_checksum: int | None = None
    kv_checksum_stride: int = 1
    trace: dict[str, float] = field(default_factory=dict)  # the job's marks and the prefill side's


@dataclass
class PrefillFirstToken:
    """Prefill worker → router, for a job with first_token_to_router: the first token as the decode
    worker will stream it (text from the same incremental detokenizer over the same prompt), sent
    the moment it is sampled, before the KV's completion reaches the decode worker. Only for a
    token that does not end the request (no EOS, stop token or stop string)."""

    request_id: str
    token_id: int
    text: str
    logprob: list[Any] | None  # [token_id, logprob, [[id, lp], ...]]
    num_prompt_tokens: int
    trace: dict[str, float] = field(default_factory=dict)


@dataclass
class PrefillFailed:
    request_id: str
    error: str


@dataclass
class PrefillJobPull:
    worker_id: str
    timeout_s: float = 1.0


# ---- encoding ----

_TYPES: dict[str, type] = {
    cls.__name__: cls
    for cls in (
        KVLayout, WorkerInfo, WorkerLoad, GenerateRequest, PrefillJob, TokenChunk, AbortRequest,
        KVHello, KVChallenge, KVHelloAck, NcclRendezvous, NixlEndpoint, KVLayerChunk, PrefillDone,
        PrefillFailed, PrefillFirstToken,
        PrefillJobPull, PrefillDeclined, PrefillDestination,
    )
}  # fmt: skip

T = TypeVar("T")


# Field names per message type: dataclasses.fields() rebuilds its tuple on every call, once per
# message (a streamed token's frame is the common one).
_FIELD_NAMES: dict[type, tuple[str, ...]] = {}


def _pack_default(obj: Any) -> Any:
    """msgpack calls this for what it cannot pack itself: our dataclasses, tagged with their type.
    Lists of ids and numbers are packed natively (in C), which keeps a 4k-token prompt cheap."""
    cls = type(obj)
    names = _FIELD_NAMES.get(cls)
    if names is None:
        if not dataclasses.is_dataclass(obj) or isinstance(obj, type):
            raise TypeError(f"cannot encode {cls.__name__}")
        names = _FIELD_NAMES[cls] = tuple(f.name for f in dataclasses.fields(obj))
    out = {name: getattr(obj, name) for name in names}
    out["__t"] = cls.__name__
    return out


class _Malformed(Exception):
    pass


def _unpack_hook(obj: dict[Any, Any]) -> Any:
    """msgpack calls this for every map, innermost first: tagged maps become their dataclass."""
    name = obj.pop("__t", None)
    if name is None:
        return obj
    cls = _TYPES.get(name)
    if cls is None:
        raise _Malformed(f"unknown message type {name!r}")
    try:
        return cls(**obj)
    except TypeError as e:
        raise _Malformed(f"malformed {name}: {e}") from None


def encode(msg: Any) -> bytes:
    if type(msg).__name__ not in _TYPES:
        raise ProtocolError(f"not a wire message: {type(msg).__name__}")
    return msgpack.packb([PROTOCOL_VERSION, msg], default=_pack_default, use_bin_type=True)


def decode(data: bytes, expect: type[T] | None = None) -> T:
    try:
        version, msg = msgpack.unpackb(data, raw=False, strict_map_key=False, object_hook=_unpack_hook)
    except _Malformed as e:
        # Another version's messages may not fit our classes: say so rather than "malformed".
        _check_version(data)
        raise ProtocolError(str(e)) from None
    except (ValueError, msgpack.UnpackException, TypeError) as e:
        raise ProtocolError(f"undecodable message: {e}") from None
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {version} != ours ({PROTOCOL_VERSION})")
    if expect is not None and not isinstance(msg, expect):
        raise ProtocolError(f"expected {expect.__name__}, got {type(msg).__name__}")
    return msg  # type: ignore[no-any-return]


def _check_version(data: bytes) -> None:
    try:
        version = msgpack.unpackb(data, raw=False, strict_map_key=False)[0]
    except (ValueError, msgpack.UnpackException, TypeError, IndexError, KeyError):
        return
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {version} != ours ({PROTOCOL_VERSION})")


# Length-prefixed frames for streams of messages (HTTP bodies, sockets).
_LEN = struct.Struct("!I")
MAX_FRAME = 64 * 1024 * 1024


def frame(msg: Any) -> bytes:
    body = encode(msg)
    return _LEN.pack(len(body)) + body


class FrameReader:
    """Incrementally splits a byte stream into decoded messages."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Any]:
        self._buf += data
        out: list[Any] = []
        while len(self._buf) >= _LEN.size:
            (n,) = _LEN.unpack_from(self._buf)
            if n > MAX_FRAME:
                raise ProtocolError(f"frame of {n} bytes exceeds the {MAX_FRAME}-byte limit")
            if len(self._buf) < _LEN.size + n:
                break
            out.append(decode(bytes(self._buf[_LEN.size : _LEN.size + n])))
            del self._buf[: _LEN.size + n]
        return out
