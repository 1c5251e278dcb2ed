"""Batch-1 matrix-vector products of the Llama-3-8B shape under each BLAS library torch can use.

A batch-1 decode step is ~90% weight reads through these products; the rest of the step is what
the library adds (split-K reduction kernels, tails). Each product is timed inside a CUDA graph of
many back-to-back calls, so launch overhead is excluded, and reported as GB/s of weights read
against the device's copy bandwidth measured in the same run.

    python3 benchmarks/gemv_blas.py [--rows 1 2 4] [--json out.json]
"""

from __future__ import annotations

import argparse
import json

import torch

# (name, in_features, out_features, per layer)
SHAPES = [
    ("qkv_proj", 4096, 6144, 32),
    ("o_proj", 4096, 4096, 32),
    ("gate_up_proj", 4096, 28672, 32),
    ("down_proj", 14336, 4096, 32),
    ("lm_head", 4096, 128256, 1),
]
CALLS = 50


def graph_time_ms(fn: object, calls: int = CALLS, repeats: int = 5) -> float:
    """Median ms per call of `fn` replayed `calls` times from one CUDA graph."""
    assert callable(fn)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return sorted(times)[len(times) // 2]


def copy_bandwidth() -> float:
    """Bytes per second read + written by a 1 GiB device-to-device copy."""
    src = torch.empty(1 << 29, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    ms = graph_time_ms(lambda: dst.copy_(src), calls=5)
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, nargs="+", default=[1])
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    bw = copy_bandwidth()
    print(f"D2D copy: {bw / 1e12:.2f} TB/s (read + write); a product reads its weights once")
    results = []
    libraries = ["cublas", "cublaslt"]
    for rows in args.rows:
        step_ms = dict.fromkeys(libraries, 0.0)
        for name, k, n, per_layer in SHAPES:
            w = torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02  # [out, in] like nn.Linear
            x = torch.randn(rows, k, dtype=torch.bfloat16, device="cuda")  # [rows, in]
            out = torch.empty(rows, n, dtype=torch.bfloat16, device="cuda")
            row = {"rows": rows, "name": name, "k": k, "n": n}
            for lib in libraries:
                torch.backends.cuda.preferred_blas_library(lib)
                ms = graph_time_ms(lambda w=w, x=x, out=out: torch.matmul(x, w.t(), out=out))
                row[f"{lib}_ms"] = ms
                row[f"{lib}_bw_share"] = (w.numel() * 2 / (ms * 1e-3)) / bw
                step_ms[lib] += ms * per_layer
            results.append(row)
            print(
                f"rows {rows} {name:13s} {k:6d}x{n:6d}: "
                + "  ".join(
                    f"{lib} {row[f'{lib}_ms'] * 1e3:7.1f} us ({100 * row[f'{lib}_bw_share']:.0f}%)"
                    for lib in libraries
                )
            )
        print(
            f"rows {rows}: all products of a step "
            + "  ".join(f"{lib} {ms:.3f} ms" for lib, ms in step_ms.items())
        )
        results.append({"rows": rows, "name": "step", **{f"{lib}_ms": ms for lib, ms in step_ms.items()}})
    torch.backends.cuda.preferred_blas_library("cublas")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"copy_bw": bw, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
