"""Host CPU per generated token of a decoding worker, on CPU with a model whose forward is cheap.

On a GPU the worker's Python host side (scheduling, bookkeeping, detokenization, handing outputs
to the HTTP thread, framing and sending chunks) runs on one interpreter next to the GPU step; if it
costs more per token than the step, the worker process saturates a core before its GPU does. A
random-weight `dummy:tiny-llama` (2 layers, hidden size 64) on CPU makes the forward cheap, and the
worker's own accounting takes the forward out, so what is left is that host side.

Two measurements per source tree and repeat (trees take turns, so drift hits them alike):

- `engine`: LLMEngine.step() in a loop in one process (no HTTP): CPU seconds per generated token of
  the whole step, and of the step minus the model forward (CausalLM.forward and compute_logits),
  i.e. scheduler, block manager, input tensors, sampling bookkeeping, postprocessing, detokenizer.
- `serve`: a real `pdserve serve --prefill 0 --decode 0 --colocated 1` deployment driven by
  streaming clients at fixed concurrency: streamed tokens/s, and CPU seconds per streamed token of
  the worker process (split into forward, the rest of the engine thread, and the HTTP side) and of
  the router process (from /proc).

Run from the repository root (the tree to measure is `--tree LABEL=DIR`, its `pdserve` package is
put first on PYTHONPATH; the default is this checkout). Before/after side by side in one run:

    git archive HEAD --prefix=base/ | tar -x -C /tmp          # the committed tree as "before"
    .venv/bin/python benchmarks/host_overhead.py --tree before=/tmp/base --tree after=. --repeats 3

Medians over the repeats. `--profile DIR` also writes cProfile stats of the engine loop and of every
thread of each served process (worker and router) to DIR and prints the top entries of the
worker's (profile runs are separate from the timed runs). One torch thread (OMP_NUM_THREADS=1) in
every process, so the forward runs on the engine thread and is accounted there. Defaults: 128 concurrent streams, 512 requests, 32-token prompts,
256 output tokens (ignore_eos), 2 client processes; tiny-llama's context is 512 tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
MODEL = "dummy:tiny-llama"

# Put on a served deployment's PYTHONPATH. In the worker, it accounts the engine thread's CPU time,
# the model forward's part of it (CausalLM.forward and compute_logits) and the frames sent on
# generate streams, in a small file after every step (runner.launch), so the benchmark can split
# the worker's CPU time into forward, the rest of the engine thread, and the HTTP side. With
# HOST_OVERHEAD_PROFILE_DIR set, it also runs one cProfile per thread and dumps them merged when
# the process exits; uvicorn shuts down on SIGTERM and then re-raises the signal, which skips
# atexit, so the dump also runs before that re-raise.
_SITECUSTOMIZE = textwrap.dedent(
    """
    import atexit, cProfile, os, signal, sys, threading, time
    _acct = os.environ.get("HOST_OVERHEAD_ACCOUNTING")
    if _acct and "worker" in sys.argv[1:2]:
        from pdserve.engine.model import CausalLM
        from pdserve.engine.runner import ModelRunner
        _forward = [0.0]
        def _timed(fn):
            def timed(*args, **kwargs):
                t = time.thread_time()
                try:
                    return fn(*args, **kwargs)
                finally:
                    _forward[0] += time.thread_time() - t
            return timed
        CausalLM.forward = _timed(CausalLM.forward)
        CausalLM.compute_logits = _timed(CausalLM.compute_logits)
        import pdserve.workers.generate_stream as _stream
        _frames = [0]
        _frame = _stream.frame
        def _counted_frame(msg):
            _frames[0] += 1
            return _frame(msg)
        _stream.frame = _counted_frame
        _launch = ModelRunner.launch
        _fd = os.open(_acct, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        def _accounted(self, *args, **kwargs):
            try:
                return _launch(self, *args, **kwargs)
            finally:
                line = f"{_forward[0]:.6f} {time.thread_time():.6f} {_frames[0]}"
                os.pwrite(_fd, line.ljust(80).encode(), 0)
        ModelRunner.launch = _accounted
    _dir = os.environ.get("HOST_OVERHEAD_PROFILE_DIR")
    if _dir:
        _profiles = []
        _run = threading.Thread.run
        def _profiled_run(self):
            p = cProfile.Profile()
            p.enable()
            try:
                _run(self)
            finally:
                p.disable()
                _profiles.append(p)
        threading.Thread.run = _profiled_run
        _main = cProfile.Profile()
        _main.enable()
        _dumped = []
        def _dump():
            import pstats
            if _dumped:
                return
            _dumped.append(True)
            _main.disable()
            role = next((a for a in sys.argv if a in ("serve", "worker")), "proc")
            stats = pstats.Stats(_main)
            for p in _profiles:
                stats.add(p)
            stats.dump_stats(os.path.join(_dir, f"{role}-{os.getpid()}.prof"))
        atexit.register(_dump)
        _raise_signal = signal.raise_signal
        def _dump_then_raise(sig):
            _dump()
            _raise_signal(sig)
        signal.raise_signal = _dump_then_raise
    """
)


def read_accounting(path: Path) -> tuple[float, float, float]:
    """(forward CPU s, engine thread CPU s, generate-stream frames) of the worker so far."""
    forward, engine, frames = path.read_text().split()
    return float(forward), float(engine), float(frames)


def specs(num: int, prompt_len: int, output_len: int) -> list[Any]:
    from pdserve.bench.workload import RequestSpec

    # Distinct prompts (no prefix-cache hits between requests), ids clear of tiny-llama's specials.
    return [
        RequestSpec(i, [3 + (i * 31 + j * 7) % 500 for j in range(prompt_len)], output_len, 0.0)
        for i in range(num)
    ]


# ---- engine mode (runs in a child process, so each tree imports its own pdserve) ----


def engine_child(args: argparse.Namespace) -> dict[str, float]:
    from pdserve.engine.engine import LLMEngine
    from pdserve.llm import _split_kwargs
    from pdserve.sampling_params import SamplingParams

    engine = LLMEngine(_split_kwargs({"model": MODEL, "device": "cpu", "max_num_seqs": args.concurrency}))
    forward_s = 0.0

    def timed(fn: Any) -> Any:
        def run(*a: Any, **kw: Any) -> Any:
            nonlocal forward_s
            t = time.process_time()
            try:
                return fn(*a, **kw)
            finally:
                forward_s += time.process_time() - t

        return run

    # The model forward only (as in the worker's accounting): input building and sampling count
    # as host work.
    model = engine.runner.model
    model.forward = timed(model.forward)  # type: ignore[method-assign]
    model.compute_logits = timed(model.compute_logits)  # type: ignore[method-assign]
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)

    def run(batch: list[Any]) -> int:
        for s in batch:
            engine.add_request(f"r{s.index}", s.prompt, params)
        n = 0
        while engine.has_unfinished():
            for out in engine.step():
                n += len(out.new_token_ids)
        return n

    batch = specs(args.concurrency, args.prompt_len, args.output_len)
    run(batch[: min(8, len(batch))])  # warm-up
    forward_s = 0.0
    t0 = time.process_time()
    tokens = run(batch)
    cpu_s = time.process_time() - t0
    if args.profile:
        import cProfile

        prof = cProfile.Profile()
        prof.runcall(run, batch)
        prof.dump_stats(str(Path(args.profile) / f"engine-{os.getpid()}.prof"))
    return {"tokens": tokens, "cpu_s": cpu_s, "forward_s": forward_s}


# ---- serve mode ----


def serve_once(tree: Path, args: argparse.Namespace, env: dict[str, str], log: Path) -> dict[str, float]:
    from serve_proc import Server

    from pdserve.bench.client import run_sharded

    flags = [
        "--model", MODEL, "--device", "cpu", "--prefill", "0", "--decode", "0", "--colocated", "1",
        "--max-num-seqs", str(args.concurrency),
    ]  # fmt: skip
    acct = Path(env["HOST_OVERHEAD_ACCOUNTING"])
    server = Server(flags, log, env=env)
    try:
        run_sharded(server.url, specs(16, args.prompt_len, 16), MODEL, 1, concurrency=16)  # warm-up
        before = server.cpu_seconds()
        acct_before = read_accounting(acct)
        t0 = time.monotonic()
        results = run_sharded(
            server.url,
            specs(args.num_requests, args.prompt_len, args.output_len),
            MODEL,
            args.client_procs,
            concurrency=args.concurrency,
        )
        wall = time.monotonic() - t0
        after = server.cpu_seconds()
        acct_after = read_accounting(acct)
    finally:
        server.stop()
    failed = [r for r in results if not r.ok]
    if failed:
        raise RuntimeError(f"{len(failed)} requests failed, e.g. {failed[0].error}: see {log}")
    tokens = sum(r.output_tokens for r in results)
    workers = [k for k in after if k.startswith("worker-")]
    return {
        "tokens": tokens,
        "wall_s": wall,
        "router_cpu_s": after["router"] - before["router"],
        "worker_cpu_s": sum(after[k] - before.get(k, 0.0) for k in workers),
        "forward_cpu_s": acct_after[0] - acct_before[0],
        "engine_thread_cpu_s": acct_after[1] - acct_before[1],
        "frames": acct_after[2] - acct_before[2],
    }


def tree_env(tree: Path, site: Path | None = None) -> dict[str, str]:
    paths = [str(p) for p in (site, tree.resolve()) if p] + [os.environ.get("PYTHONPATH", "")]
    # One torch thread everywhere: the forward runs on the engine thread, so thread CPU time
    # accounts it, and an idle thread pool's spinning does not blur the process's CPU time.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p), "OMP_NUM_THREADS": "1"}
    if site is not None:
        (site / "sitecustomize.py").write_text(_SITECUSTOMIZE)
        env["HOST_OVERHEAD_ACCOUNTING"] = str(site / "accounting")
    return env


def measure_once(label: str, tree: Path, args: argparse.Namespace, out: Path, rep: int) -> dict[str, float]:
    site = out / f"site-{label}"
    site.mkdir(parents=True, exist_ok=True)
    env = tree_env(tree, site)
    cmd = [sys.executable, __file__, "_engine", *child_flags(args)]
    eng = json.loads(subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout)
    srv = serve_once(tree, args, env, out / f"serve-{label}-{rep}.log")
    n, m = srv["tokens"] / 1e6, eng["tokens"] / 1e6  # µs per token below
    return {
        "tok_s": srv["tokens"] / srv["wall_s"],
        "tokens_per_frame": srv["tokens"] / srv["frames"],
        "worker_us": srv["worker_cpu_s"] / n,
        "worker_host_us": (srv["worker_cpu_s"] - srv["forward_cpu_s"]) / n,
        "worker_engine_us": (srv["engine_thread_cpu_s"] - srv["forward_cpu_s"]) / n,
        "worker_http_us": (srv["worker_cpu_s"] - srv["engine_thread_cpu_s"]) / n,
        "router_us": srv["router_cpu_s"] / n,
        "engine_us": eng["cpu_s"] / m,
        "engine_host_us": (eng["cpu_s"] - eng["forward_s"]) / m,
    }


def measure(trees: dict[str, str], args: argparse.Namespace, out: Path) -> dict[str, dict[str, Any]]:
    """Trees take turns within each repeat, so a drift of the machine's speed hits them alike."""
    runs: dict[str, list[dict[str, float]]] = {label: [] for label in trees}
    for rep in range(args.repeats):
        for label, tree in trees.items():
            runs[label].append(measure_once(label, Path(tree), args, out, rep))
            print(
                f"{label} #{rep}: " + ", ".join(f"{k} {v:,.1f}" for k, v in runs[label][-1].items()),
                flush=True,
            )
    return {
        label: {k: statistics.median(r[k] for r in rs) for k in rs[0]} | {"runs": rs}
        for label, rs in runs.items()
    }


def profile_tree(label: str, tree: Path, args: argparse.Namespace, out: Path) -> None:
    import pstats

    prof_dir = out / f"profile-{label}"
    site = prof_dir / "site"
    site.mkdir(parents=True, exist_ok=True)
    env = tree_env(tree, site) | {"HOST_OVERHEAD_PROFILE_DIR": str(prof_dir)}
    serve_once(tree, args, env, out / f"profile-{label}.log")
    cmd = [sys.executable, __file__, "_engine", *child_flags(args), "--profile", str(prof_dir)]
    subprocess.run(cmd, env=tree_env(tree), check=True, capture_output=True)
    for path in sorted(prof_dir.glob("*.prof")):
        if path.name.startswith(("worker", "engine")):
            print(f"\n== {label}: {path.name} (tottime) ==")
            pstats.Stats(str(path)).sort_stats("tottime").print_stats(args.profile_top)


def child_flags(args: argparse.Namespace) -> list[str]:
    return [
        "--concurrency", str(args.concurrency), "--prompt-len", str(args.prompt_len),
        "--output-len", str(args.output_len),
    ]  # fmt: skip


# CPU µs per generated token unless said otherwise. Worker: the whole process; minus forward: its
# host side; of which engine thread: scheduling, bookkeeping, detokenizing, handing outputs over;
# HTTP side: everything else (event loop, generate streams, framing, sends). Engine loop: the
# in-process LLMEngine.step() loop, with and without its forward.
COLUMNS = [
    ("tok_s", "streamed tok/s"),
    ("tokens_per_frame", "tokens per worker frame"),
    ("worker_us", "worker"),
    ("worker_host_us", "worker minus forward"),
    ("worker_engine_us", "of which engine thread"),
    ("worker_http_us", "of which HTTP side"),
    ("router_us", "router"),
    ("engine_us", "engine loop"),
    ("engine_host_us", "engine loop minus forward"),
]


def table(results: dict[str, dict[str, Any]]) -> str:
    lines = ["| tree | " + " | ".join(name for _, name in COLUMNS) + " |"]
    lines.append("| --- " * (len(COLUMNS) + 1) + "|")
    for label, r in results.items():
        lines.append(f"| {label} | " + " | ".join(f"{r[k]:,.1f}" for k, _ in COLUMNS) + " |")
    labels = list(results)
    base = results[labels[0]]
    for label in labels[1:]:
        r = results[label]
        lines.append(
            f"| {label} / {labels[0]} | " + " | ".join(f"{r[k] / base[k]:.2f}x" for k, _ in COLUMNS) + " |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", nargs="?", default="run", choices=["run", "_engine"])
    ap.add_argument(
        "--tree", action="append", default=[], help="LABEL=DIR (repeatable); default: this checkout"
    )
    ap.add_argument("--concurrency", type=int, default=128)
    ap.add_argument("--num-requests", type=int, default=512)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--client-procs", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--profile", default=None, help="also write and print cProfile stats (a directory)")
    ap.add_argument("--profile-top", type=int, default=25)
    ap.add_argument("--out", default="results/host_overhead")
    args = ap.parse_args()
    if args.mode == "_engine":
        print(json.dumps(engine_child(args)))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    trees = dict(t.split("=", 1) for t in args.tree) or {"this": str(HERE.parent)}
    results = measure(trees, args, out)
    print(f"\n{platform.machine()}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}; {MODEL}, "
          f"{args.concurrency} streams, {args.prompt_len}+{args.output_len} tokens, medians of {args.repeats}")  # fmt: skip
    print(table(results))
    (out / "report.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    if args.profile:
        prof_root = Path(args.profile)
        for label, d in trees.items():
            profile_tree(label, Path(d), args, prof_root)


if __name__ == "__main__":
    main()
