"""A `pdserve serve` deployment as a child process, for the serving benchmarks: start it with
flags, wait for /health, read its Prometheus metrics, stop it (SIGTERM: the launcher tears its
workers down)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from pdserve.engine.step_stats import per_step_report
from pdserve.router.metrics import parse_engine_counters


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    def __init__(
        self, flags: list[str], log: Path, start_timeout_s: float = 300.0, env: dict[str, str] | None = None
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [
            sys.executable, "-m", "pdserve.cli", "serve", "--port", str(self.port),
            "--log-level", "warning", *flags,
        ]  # fmt: skip
        self.log = open(log, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + start_timeout_s
        while True:
            if self.proc.poll() is not None:
                self.log.close()
                raise RuntimeError(f"server exited with {self.proc.returncode}: see {log}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"server did not come up in {start_timeout_s:.0f} s: see {log}")
            time.sleep(0.5)

    def cpu_seconds(self) -> dict[str, float]:
        """CPU time used so far by the router (this deployment's launcher process) and by each of
        its worker processes: a router near one core per second of wall time is the bottleneck."""
        out = {"router": _proc_cpu_s(self.proc.pid)}
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        if children.is_file():
            for pid in children.read_text().split():
                out[f"worker-{pid}"] = _proc_cpu_s(int(pid))
        return out

    def metrics(self) -> str:
        return httpx.get(f"{self.url}/metrics", timeout=10).text

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def cores_busy(before: dict[str, float], after: dict[str, float], seconds: float) -> dict[str, float]:
    """Cores each process kept busy between two `Server.cpu_seconds()` readings `seconds` apart."""
    return {k: round((after[k] - before[k]) / seconds, 3) for k in after if k in before}


def _proc_cpu_s(pid: int) -> float:
    """user + system CPU seconds of a live process (Linux /proc), NaN elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def counter(metrics_text: str, name: str, label: str) -> dict[str, float]:
    """Values of a labelled counter by its `label` value, e.g. decisions by path."""
    out = {}
    for line in metrics_text.splitlines():
        if line.startswith(name + "{") and f'{label}="' in line:
            value = line.split(f'{label}="')[1].split('"')[0]
            out[value] = float(line.rsplit(" ", 1)[1])
    return out


def decisions(metrics_text: str) -> dict[str, float]:
    return counter(metrics_text, "pdserve_disagg_decisions_total", "path")


class ScrapesAt:
    """The deployment's /metrics (and CPU seconds) scraped at given wall-clock times (time.time())
    from a thread of its own, while the caller's load runs: counters over the arrival window, not
    only over the whole run with its drain."""

    def __init__(self, server: Server, at: list[float]) -> None:
        self.at = at
        self.texts: list[str] = []
        self.cpu: list[dict[str, float]] = []
        self._thread = threading.Thread(target=self._run, args=(server,), daemon=True)
        self._thread.start()

    def _run(self, server: Server) -> None:
        for t in self.at:
            time.sleep(max(t - time.time(), 0.0))
            self.texts.append(server.metrics())
            self.cpu.append(server.cpu_seconds())

    def join(self) -> bool:
        """True if every scrape was taken."""
        self._thread.join(timeout=30)
        return len(self.texts) == len(self.at)


def engine_reports(before: str, after: str, wall_s: float) -> dict[str, dict[str, float]]:
    """Per worker, what its engine thread did between two metric scrapes (step_stats.per_step_report)."""
    b, a = parse_engine_counters(before), parse_engine_counters(after)
    return {
        w: {k: round(v, 3) for k, v in per_step_report(b.get(w, {}), c, wall_s).items()} for w, c in a.items()
    }
