"""Where the workers of a one-host deployment run: CPU slices, GPU slots and memory shares, and
the transport `auto` picks."""

from __future__ import annotations

import pytest

from pdserve.launch.local import LocalDeployment
from pdserve.launch.placement import GpuSlot, cpu_plan, gpu_plan, parse_gpus, resolve_transport


def test_cpu_plan_slices() -> None:
    assert cpu_plan(2, 2) == ["0", "1"]
    assert cpu_plan(2, 16) == ["0-7", "8-15"]
    assert cpu_plan(3, 2) == ["0", "1", "0"]
    assert cpu_plan(0, 4) == []


def test_one_gpu_per_worker_while_there_are_enough() -> None:
    assert gpu_plan(2, [0, 1], 0.9) == [GpuSlot(0, 0.9), GpuSlot(1, 0.9)]
    assert gpu_plan(2, [3, 5, 7], 0.8) == [GpuSlot(3, 0.8), GpuSlot(5, 0.8)]


def test_workers_sharing_a_gpu_split_its_memory() -> None:
    # 1P1D on one GPU: both halves of 0.9
    assert gpu_plan(2, [0], 0.9) == [GpuSlot(0, 0.45), GpuSlot(0, 0.45)]
    # 2P2D on two GPUs: the prefill workers share one GPU, the decode workers the other
    plan = gpu_plan(4, [0, 1], 0.9)
    assert [s.gpu for s in plan] == [0, 0, 1, 1]
    assert all(s.memory_utilization == pytest.approx(0.45) for s in plan)
    # uneven: 3 workers on 2 GPUs
    plan = gpu_plan(3, [0, 1], 0.9)
    assert [s.gpu for s in plan] == [0, 0, 1]
    assert [s.memory_utilization for s in plan] == pytest.approx([0.45, 0.45, 0.9])


def test_gpu_plan_rejects_bad_lists() -> None:
    with pytest.raises(ValueError, match="at least one"):
        gpu_plan(1, [], 0.9)
    with pytest.raises(ValueError, match="twice"):
        gpu_plan(2, [0, 0], 0.9)


def test_auto_transport_follows_the_device() -> None:
    assert resolve_transport("auto", on_gpu=True) == "cuda_ipc"
    assert resolve_transport("auto", on_gpu=False) == "shm"
    assert resolve_transport("tcp", on_gpu=True) == "tcp"
    with pytest.raises(ValueError, match="cuda_ipc"):
        resolve_transport("shm", on_gpu=True)
    with pytest.raises(ValueError, match="--device cuda"):
        resolve_transport("cuda_ipc", on_gpu=False)


def test_parse_gpus() -> None:
    assert parse_gpus(None, 2) == [0, 1]
    assert parse_gpus("all", 3) == [0, 1, 2]
    assert parse_gpus("1", 2) == [1]
    assert parse_gpus("0,1", 2) == [0, 1]
    with pytest.raises(ValueError, match="2 visible"):
        parse_gpus("2", 2)
    with pytest.raises(ValueError, match="comma-separated"):
        parse_gpus("a,b", 2)
    with pytest.raises(ValueError, match="0 visible"):
        parse_gpus(None, 0)


def test_deployment_places_workers_on_their_gpus() -> None:
    dep = LocalDeployment(
        num_prefill=1, num_decode=1, num_colocated=0, transport="cuda_ipc",
        router_url="http://127.0.0.1:1", engine_args=["--device", "auto"], gpus=[0, 1],
        gpu_memory_utilization=0.8,
    )  # fmt: skip
    prefill, decode = dep.plan()
    for w, gpu in ((prefill, 0), (decode, 1)):
        # the placement comes after the shared engine flags, so it wins in argparse
        assert w.cmd[-4:] == ["--device", f"cuda:{gpu}", "--gpu-memory-utilization", "0.8000"]
        assert w.cmd.index("--device") < len(w.cmd) - 4
        assert w.cmd[w.cmd.index("--kv-transport") + 1] == "cuda_ipc"
    cpu_dep = LocalDeployment(
        num_prefill=0, num_decode=0, num_colocated=1, transport="shm", router_url="http://127.0.0.1:1"
    )
    (w,) = cpu_dep.plan()
    assert "--device" not in w.cmd and "--gpu-memory-utilization" not in w.cmd


def test_serve_refuses_gpus_for_cpu_workers() -> None:
    from pdserve.config import EngineConfig, ModelConfig
    from pdserve.launch.serve import deployment_gpus

    cpu = EngineConfig(model=ModelConfig(device="cpu"))
    assert deployment_gpus(cpu, None) is None
    with pytest.raises(ValueError, match="--gpus needs the workers on GPUs"):
        deployment_gpus(cpu, "0,1")
