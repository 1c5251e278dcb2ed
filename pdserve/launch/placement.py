"""Where each worker of a one-host deployment runs: its CPUs, its GPU and its share of that GPU's
memory, and which KV transport connects them. Pure functions of the worker list and the machine.

Workers are listed prefill first, then decode, then co-located, and both CPUs and GPUs are split
into contiguous slices in that order: with more workers than GPUs, workers of one role share a
GPU before workers of different roles do, so a prefill burst does not stall a decode worker on the
same GPU unless the counts force it.
"""

from __future__ import annotations

from dataclasses import dataclass


def cpu_plan(num_workers: int, num_cpus: int) -> list[str]:
    """Split the CPUs into contiguous, equal slices, one per worker (shared when too few)."""
    if num_workers <= 0:
        return []
    if num_workers > num_cpus:
        return [str(i % num_cpus) for i in range(num_workers)]
    per = num_cpus // num_workers
    return [f"{i * per}-{(i + 1) * per - 1}" if per > 1 else str(i * per) for i in range(num_workers)]


@dataclass(frozen=True)
class GpuSlot:
    gpu: int  # CUDA device index
    memory_utilization: float  # this worker's fraction of that GPU's total memory


def gpu_plan(num_workers: int, gpus: list[int], memory_utilization: float) -> list[GpuSlot]:
    """One GPU per worker while there are enough; else contiguous groups of workers share one and
    split `memory_utilization` of it equally (weights + KV of each must fit its share)."""
    if not gpus:
        raise ValueError("gpu_plan needs at least one GPU")
    if len(set(gpus)) != len(gpus):
        raise ValueError(f"GPU listed twice: {gpus}")
    if num_workers <= 0:
        return []
    index = [i * len(gpus) // num_workers if num_workers > len(gpus) else i for i in range(num_workers)]
    sharing = {g: index.count(g) for g in set(index)}
    return [GpuSlot(gpus[g], memory_utilization / sharing[g]) for g in index]


def resolve_transport(transport: str, on_gpu: bool) -> str:
    """`auto`: GPU caches are written in place through CUDA IPC, CPU caches through shared memory
    (both one host, which a local deployment is)."""
    if transport != "auto":
        if transport == "shm" and on_gpu:
            raise ValueError("transport shm keeps the KV cache in host memory: use cuda_ipc on GPUs")
        if transport == "cuda_ipc" and not on_gpu:
            raise ValueError("transport cuda_ipc needs the workers on GPUs (--device cuda)")
        return transport
    return "cuda_ipc" if on_gpu else "shm"


def parse_gpus(spec: str | None, available: int) -> list[int]:
    """`--gpus 0,2` (or `all`/None: every visible GPU) -> device indices, checked against `available`."""
    if spec is None or spec == "all":
        gpus = list(range(available))
    else:
        try:
            gpus = [int(x) for x in spec.split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"--gpus takes comma-separated device indices, got {spec!r}") from None
    bad = [g for g in gpus if not 0 <= g < available]
    if bad or not gpus:
        raise ValueError(f"--gpus {spec!r}: this machine has {available} visible GPU(s)")
    return gpus
