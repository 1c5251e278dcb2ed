"""GPU suite: Triton kernels against the torch reference, the engine against the roofline and against
transformers `generate`, KV transfer (cuda_ipc, tcp) against the measured copy bandwidth, and the
transfer's exposed time (a remote prompt's first token against a local one's). One run, one
table; every ceiling it compares with is measured in the same run.

    python benchmarks/gpu_suite.py --out results/            # everything (about 8 minutes on an H100)
    python benchmarks/gpu_suite.py --skip-hf --sweep          # no transformers runs; time kernel variants

Ceilings: device-to-device copy of 1 GiB (bytes read + written per second) and an 8192^3 bf16 matmul
on random data. Decode roofline = bytes a step must read (weights except the embedding table, plus
the batch's KV) / copy bandwidth. `--dry-run` runs the plumbing on CPU with a tiny model (Triton's
interpreter: set TRITON_INTERPRET=1).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_suite_engine
import gpu_suite_kernels
from gpu_suite_common import Table, bench_ms, sync


def ceilings(table: Table, device: torch.device, dry: bool) -> tuple[float, float]:
    """(copy bandwidth in bytes/s counting read + write, bf16 matmul FLOP/s)."""
    n = (1 << 30) // 2 if not dry else 1 << 20
    src = torch.randn(n, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src), device)
    copy_bw = 2 * src.numel() * src.element_size() / (ms * 1e-3)
    table.add("ceiling", "D2D copy 1 GiB", f"{copy_bw / 1e12:.2f} TB/s", "read+write; payload rate is half")
    size = 8192 if not dry else 256
    x = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    y = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    ms = bench_ms(lambda: x @ y, device)
    flops = 2 * size**3 / (ms * 1e-3)
    table.add("ceiling", f"bf16 matmul {size}^3", f"{flops / 1e12:.0f} TFLOP/s", "random data")
    return copy_bw, flops


def environment(device: torch.device) -> dict[str, Any]:
    import transformers

    env: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    try:
        import nixl  # type: ignore[import-not-found]  # noqa: F401

        env["nixl"] = "importable"
    except ImportError as e:
        env["nixl"] = f"not importable ({e})"
    return env


def guarded(table: Table, name: str, fn: Callable[[], Any]) -> Any:
    """Run one section; a failure is reported in the table and the rest still runs."""
    t0 = time.monotonic()
    try:
        result = fn()
    except Exception as e:  # a broken section must not hide the others' numbers
        import traceback

        traceback.print_exc()
        table.add(name, "FAILED", type(e).__name__, str(e)[:120])
        result = None
    print(f"[{name}] {time.monotonic() - t0:.1f} s", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=os.environ.get("OUT", "gpu_suite_out"), help="folder for results")
    parser.add_argument("--model", default="dummy:llama-3-8b")
    parser.add_argument("--skip-hf", action="store_true", help="no transformers runs")
    parser.add_argument("--skip-transfer", action="store_true", help="no KV transfer runs")
    parser.add_argument(
        "--skip-engine", action="store_true", help="no engine runs (and no transformers runs)"
    )
    parser.add_argument("--sweep", action="store_true", help="also time kernel block-size variants")
    parser.add_argument("--profile", action="store_true", help="kernel time breakdown of eager decode steps")
    parser.add_argument(
        "--kv-cache-dtype", default="auto", choices=["auto", "fp8"], help="engine runs' KV cache"
    )
    parser.add_argument(
        "--exposed-iterations", type=int, default=300,
        help="remote/local pairs timing the exposed KV transfer (0: skip)",
    )  # fmt: skip
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny model: check the plumbing only")
    args = parser.parse_args()
    dry = args.dry_run
    device = torch.device("cpu" if dry else "cuda")
    model = "dummy:tiny-llama" if dry else args.model
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = Table()
    env = environment(device)
    print(json.dumps(env), flush=True)

    copy_bw, matmul_flops = guarded(table, "ceiling", lambda: ceilings(table, device, dry)) or (
        3.0e12,
        7.9e14,
    )
    guarded(table, "kernels", lambda: gpu_suite_kernels.check(table, device, dry))
    if args.sweep:
        guarded(table, "sweep", lambda: gpu_suite_kernels.sweep(table, device, dry))
    bench = gpu_suite_engine.EngineBench(table, model, device, dry, copy_bw, matmul_flops)
    bench.profile_dir = out if args.profile else None
    bench.kv_cache_dtype = args.kv_cache_dtype
    if not args.skip_engine:
        guarded(table, "engine", bench.run)
    if not args.skip_transfer and not dry:
        import gpu_suite_transfer

        guarded(table, "transfer", lambda: gpu_suite_transfer.run(table, copy_bw))
    if not args.skip_hf and not args.skip_engine:
        guarded(table, "hf", bench.run_hf)
    bench.close()
    sync(device)
    if args.exposed_iterations and not args.skip_transfer and not dry:
        import gpu_suite_exposed  # after the engine above is closed: this loads its own

        guarded(table, "exposed", lambda: gpu_suite_exposed.run(table, args.exposed_iterations))

    text = table.render()
    print(text)
    (out / "gpu_suite.txt").write_text(text)
    (out / "gpu_suite.json").write_text(json.dumps({"env": env, "rows": table.rows}, indent=1))


if __name__ == "__main__":
    main()
