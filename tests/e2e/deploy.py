"""Start and stop a whole `pdserve serve` deployment (router + worker processes) for a test."""

from __future__ import annotations

import glob
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

STARTUP_DEADLINE_S = 300.0
SECRET = "e2e-test-secret"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def metric(text: str, name: str, labels: str = "") -> float:
    """Sum of a Prometheus sample family's values whose label set contains `labels`."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            head, _, value = line.rpartition(" ")
            if head.split("{")[0] == name and labels in head:
                total += float(value)
    return total


def children_of(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def shm_segments(tag: str = "") -> set[str]:
    return set(glob.glob(f"/dev/shm/pdserve_kv_{tag}*"))


class Deployment:
    def __init__(self, url: str, proc: subprocess.Popen[bytes], log_dir: Path) -> None:
        self.url = url
        self.proc = proc
        self.log_dir = log_dir
        self.http = httpx.Client(base_url=url, timeout=120)

    def metrics(self) -> str:
        return self.http.get("/metrics").text

    def worker_usage(self) -> dict[str, float]:
        usage = {}
        for line in self.metrics().splitlines():
            m = re.match(r'pdserve_kv_cache_usage_ratio\{worker="([\w-]+)"\} (\S+)', line)
            if m:
                usage[m.group(1)] = float(m.group(2))
        return usage

    def wait_idle(self, timeout_s: float = 20.0) -> dict[str, float]:
        """Until every worker's KV usage is back at zero (all blocks free)."""
        deadline = time.monotonic() + timeout_s
        while True:
            usage = self.worker_usage()
            if usage and all(v == 0.0 for v in usage.values()):
                return usage
            if time.monotonic() > deadline:
                raise AssertionError(f"blocks still held after {timeout_s} s: {usage}")
            time.sleep(0.1)

    def shm_tag(self) -> str:
        """The tag the launcher gave this deployment's shared-memory segments (from a worker's argv)."""
        for pid in children_of(self.proc.pid):
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if b"--shm-tag" in args:
                return args[args.index(b"--shm-tag") + 1].decode()
        raise AssertionError("no worker process found")

    def worker_pid(self, worker_id: str) -> int:
        for pid in children_of(self.proc.pid):
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if b"--worker-id" in args and args[args.index(b"--worker-id") + 1] == worker_id.encode():
                return pid
        raise AssertionError(f"no process for {worker_id}")

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.log_dir.glob("*.log")))


@contextmanager
def deployment(tmp_path: Path, *flags: str) -> Iterator[Deployment]:
    port = free_port()
    log_dir = tmp_path / f"logs-{port}"
    log_dir.mkdir(parents=True)
    cmd = [
        sys.executable, "-m", "pdserve.cli", "serve", "--model", "smollm2", "--port", str(port),
        "--log-level", "warning", "--worker-log-dir", str(log_dir), *flags,
    ]  # fmt: skip
    env = {**os.environ, "PDSERVE_SECRET": SECRET, "PYTHONUNBUFFERED": "1"}
    with open(log_dir / "router.log", "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    dep = Deployment(url, proc, log_dir)
    try:
        deadline = time.monotonic() + STARTUP_DEADLINE_S
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"pdserve serve exited with {proc.returncode}\n{dep.logs()}")
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"deployment not healthy in time\n{dep.logs()}")
            time.sleep(0.5)
        yield dep
    finally:
        workers = children_of(proc.pid)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        finally:
            dep.http.close()
        # Teardown leaves no worker process behind.
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in workers if _alive(pid)], "orphan worker processes"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False
