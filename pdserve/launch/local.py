"""`pdserve serve` for a whole deployment on one host: worker processes plus the router.

Each worker is its own OS process started as a `pdserve worker --role ...` command line, so an
operator can see and signal it with ps and kill. The launcher waits until all are healthy,
serves the router in its own process, and on Ctrl-C / SIGTERM (or its own death: children get
SIGTERM from the kernel) tears everything down: no orphan, no shared-memory segment left.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from pdserve.kv_transfer.shm import SHM_PREFIX
from pdserve.launch.placement import cpu_plan, gpu_plan

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _pdserve_command() -> list[str]:
    """`pdserve` itself when installed beside this interpreter (so `ps` shows `pdserve worker ...`)."""
    script = Path(sys.executable).parent / "pdserve"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "pdserve.cli"]


def _die_with_parent() -> None:
    # Linux: the kernel sends SIGTERM to the worker if the launcher dies, even by SIGKILL.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class WorkerProc:
    role: str
    url: str
    cmd: list[str]
    proc: subprocess.Popen[bytes] | None = None


@dataclass
class LocalDeployment:
    num_prefill: int
    num_decode: int
    num_colocated: int
    transport: str
    router_url: str
    engine_args: list[str] = field(default_factory=list)  # model/cache/scheduler flags for every worker
    worker_args: list[str] = field(default_factory=list)  # extra `pdserve worker` flags
    pin_cpus: bool = False
    gpus: list[int] | None = None  # CUDA devices to spread the workers over (None: CPU workers)
    gpu_memory_utilization: float = 0.9  # of each GPU, split between the workers sharing it
    host: str = "127.0.0.1"
    log_dir: Path | None = None
    tag: str = field(default_factory=lambda: secrets.token_hex(4))
    workers: list[WorkerProc] = field(default_factory=list)

    def __post_init__(self) -> None:
        if min(self.num_prefill, self.num_decode, self.num_colocated) < 0:
            raise ValueError("worker counts must be >= 0")
        if self.num_decode + self.num_colocated == 0:
            raise ValueError("a deployment needs at least one decode or colocated worker")
        if self.num_prefill and not self.num_decode:
            raise ValueError("prefill workers need decode workers to send KV to (--decode >= 1)")

    def plan(self) -> list[WorkerProc]:
        roles = (
            ["prefill"] * self.num_prefill + ["decode"] * self.num_decode + ["colocated"] * self.num_colocated
        )
        cpus = cpu_plan(len(roles), os.cpu_count() or 1) if self.pin_cpus else [None] * len(roles)
        slots = gpu_plan(len(roles), self.gpus, self.gpu_memory_utilization) if self.gpus else None
        counts: dict[str, int] = {}
        self.workers = []
        for i, (role, cpu) in enumerate(zip(roles, cpus, strict=True)):
            counts[role] = counts.get(role, 0) + 1
            port = free_port(self.host)
            cmd = [
                *_pdserve_command(), "worker", "--role", role,
                "--worker-id", f"{role}-{counts[role] - 1}", "--host", self.host, "--port", str(port),
                "--kv-transport", self.transport, "--shm-tag", self.tag,
            ]  # fmt: skip
            if role == "prefill":
                cmd += ["--router-url", self.router_url]
            if cpu is not None:
                cmd += ["--cpus", cpu]
            placement = []
            if slots is not None:  # after the shared engine flags, so these win
                placement = [
                    "--device", f"cuda:{slots[i].gpu}",
                    "--gpu-memory-utilization", f"{slots[i].memory_utilization:.4f}",
                ]  # fmt: skip
            self.workers.append(
                WorkerProc(
                    role, f"http://{self.host}:{port}", cmd + self.engine_args + self.worker_args + placement
                )
            )
        return self.workers

    def start(self, secret: str) -> None:
        env = {**os.environ, "PDSERVE_SECRET": secret}
        for w in self.plan():
            out = None
            if self.log_dir is not None:
                self.log_dir.mkdir(parents=True, exist_ok=True)
                out = open(self.log_dir / f"{w.cmd[w.cmd.index('--worker-id') + 1]}.log", "wb")  # noqa: SIM115
            w.proc = subprocess.Popen(
                w.cmd,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT if out else None,
                preexec_fn=_die_with_parent,
            )
            logger.info("started %s worker pid %d: %s", w.role, w.proc.pid, " ".join(w.cmd))

    def wait_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        pending = list(self.workers)
        while pending:
            for w in list(pending):
                assert w.proc is not None
                code = w.proc.poll()
                if code is not None:
                    raise RuntimeError(f"{w.role} worker ({w.url}) exited with code {code} during start-up")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{w.url}/health", timeout=1.0).status_code == 200:
                        pending.remove(w)
            if pending and time.monotonic() > deadline:
                raise TimeoutError(f"workers not healthy after {timeout_s:.0f} s: {[w.url for w in pending]}")
            if pending:
                time.sleep(0.2)

    def stop(self, timeout_s: float = 10.0) -> None:
        procs = [w.proc for w in self.workers if w.proc is not None and w.proc.poll() is None]
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for p in procs:
            try:
                p.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                logger.warning("worker pid %d ignored SIGTERM: killing it", p.pid)
                p.kill()
                p.wait()
        self.remove_leftover_segments()

    def remove_leftover_segments(self) -> None:
        """Segments of workers that died without cleaning up (e.g. SIGKILL)."""
        for path in glob.glob(f"/dev/shm/{SHM_PREFIX}{self.tag}_*"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
