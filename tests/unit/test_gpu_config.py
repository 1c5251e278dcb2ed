"""CPU checks of the GPU-side configuration and wire fields: backend choice, transport validation,
graph batch sizes, and the cuda_ipc handshake fields through msgpack."""

from __future__ import annotations

import pytest

from pdserve.config import EngineConfig, ModelConfig, WorkerConfig
from pdserve.engine.cuda_graphs import graph_batch_sizes
from pdserve.protocol import KVHelloAck, KVLayout, PrefillDone, decode, encode


def test_auto_backend_is_torch_on_cpu_and_triton_on_cuda() -> None:
    assert EngineConfig().attention_backend == "auto"
    assert EngineConfig(model=ModelConfig(device="cpu")).resolved_attention_backend() == "torch"
    assert EngineConfig(model=ModelConfig(device="cuda")).resolved_attention_backend() == "triton"
    assert EngineConfig(attention_backend="torch").resolved_attention_backend() == "torch"
    with pytest.raises(ValueError, match="attention_backend"):
        EngineConfig(attention_backend="flash")


def test_cuda_ipc_transport_validation() -> None:
    assert WorkerConfig(kv_transport="cuda_ipc").kv_transport == "cuda_ipc"
    with pytest.raises(ValueError, match="tcp only"):
        WorkerConfig(kv_transport="cuda_ipc", kv_wire_dtype="fp8")


def test_graph_batch_sizes() -> None:
    assert graph_batch_sizes(1) == [1]
    assert graph_batch_sizes(6) == [1, 2, 4, 6]
    assert graph_batch_sizes(64) == [1, 2, 4, 8, 16, 32, 48, 64]
    assert graph_batch_sizes(100)[-2:] == [96, 100]


def test_cuda_ipc_fields_survive_the_wire() -> None:
    handles = [[0, b"\x00\xffhandle", 1 << 33, 512, b"/torch_ref", 3, b"\x01event", True, 0, 300]]
    layout = KVLayout("m", "bfloat16", 16, 1, 8, 128)
    ack = decode(encode(KVHelloAck(ok=True, layout=layout, cuda_ipc=handles)), KVHelloAck)
    assert ack.cuda_ipc == handles
    done = decode(encode(PrefillDone("r", 1, None, 10, 0, kv_checksum=-(1 << 40))), PrefillDone)
    assert done.kv_checksum == -(1 << 40)
