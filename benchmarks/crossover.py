"""Crossover study with `pdserve plan`: when does disaggregation win? Long-prompt share 0%, 20%,
60% x fabrics NVLink, PCIe, RDMA, TCP, on the *modelled* Llama-3-8B / H100 perf file
(benchmarks/perf/llama3-8b-h100-modelled.json, from modelled_perf_llama3_8b_h100.py: first
principles, not a measurement). Writes a table (markdown) and docs/crossover.png.

    .venv/bin/python benchmarks/crossover.py --out results/crossover

Each cell is one `pdserve plan` run (the exact command is printed); the workload is bimodal:
short prompts 50-200 tokens, long prompts 4,000-8,000 (document/RAG-sized), outputs 128-256.
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path
from typing import Any

from pdserve.cli import main as pdserve_main

SHARES = (0.0, 0.2, 0.6)
FABRICS = ("nvlink", "pcie", "rdma", "tcp")


def plan_argv(args: argparse.Namespace, share: float, fabric: str, out: Path) -> list[str]:
    return [
        "plan", "--perf", str(args.perf), "--workload", "bimodal", "--long-share", str(share),
        "--short-range", "50,200", "--long-range", "4000,8000", "--output-range", "128,256",
        "--slo-ttft-ms", str(args.slo_ttft_ms), "--slo-tpot-ms", str(args.slo_tpot_ms),
        "--gpus", str(args.gpus), "--fabric", fabric, "--num-requests", str(args.num_requests),
        "--max-num-batched-tokens", "2048", "--remote-prefill-threshold", "1024",
        "--served-model", "meta-llama/Meta-Llama-3-8B-Instruct", "--json", str(out),
    ]  # fmt: skip


def best_of(cands: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    pick = [
        c for c in cands
        if (kind == "colocated") == c["deployment"].startswith("colocated")
        and (kind != "conditional" or c["deployment"].startswith("conditional"))
        and (kind != "xpyd" or not c["deployment"].startswith("conditional"))
    ]  # fmt: skip
    return max(pick, key=lambda c: c["goodput_per_gpu"])


def table(cells: dict[tuple[float, str], dict[str, Any]]) -> str:
    head = (
        "| long share | fabric | winner | goodput/GPU co-located | best xPyD (goodput/GPU) | "
        "best conditional (goodput/GPU) | p99 TTFT / TPOT of winner |\n|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for (share, fabric), res in cells.items():
        c = res["candidates"]
        co, xp, cond = best_of(c, "colocated"), best_of(c, "xpyd"), best_of(c, "conditional")
        b = res["best"]
        lines.append(
            f"| {share:.0%} | {fabric} | **{b['deployment']}** | {co['goodput_per_gpu']:.2f} | "
            f"{xp['deployment']} ({xp['goodput_per_gpu']:.2f}) | {cond['deployment']} ({cond['goodput_per_gpu']:.2f}) | "
            f"{b['p99_ttft_s']:.2f} s / {b['p99_tpot_s'] * 1e3:.1f} ms |"
        )
    return "\n".join(lines)


def figure(cells: dict[tuple[float, str], dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(SHARES), figsize=(13, 4), sharey=False)
    width = 0.27
    for ax, share in zip(axes, SHARES, strict=True):
        for k, kind in enumerate(("colocated", "xpyd", "conditional")):
            vals = [best_of(cells[(share, f)]["candidates"], kind)["goodput_per_gpu"] for f in FABRICS]
            ax.bar([i + (k - 1) * width for i in range(len(FABRICS))], vals, width,
                   label={"colocated": "co-located", "xpyd": "best xPyD", "conditional": "best conditional xPyD"}[kind])  # fmt: skip
        ax.set_xticks(range(len(FABRICS)), FABRICS)
        ax.set(title=f"long prompts: {share:.0%}", ylabel="goodput per GPU (req/s)")
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Llama-3-8B on H100 (modelled perf), 4 GPUs: goodput per GPU under the SLOs")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--perf", type=Path, default=Path("benchmarks/perf/llama3-8b-h100-modelled.json"))
    ap.add_argument("--gpus", type=int, default=4)
    ap.add_argument("--slo-ttft-ms", type=float, default=1000)
    ap.add_argument("--slo-tpot-ms", type=float, default=25)
    ap.add_argument("--num-requests", type=int, default=150)
    ap.add_argument("--out", type=Path, default=Path("results/crossover"))
    ap.add_argument("--figure", type=Path, default=Path("docs/crossover.png"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    cells: dict[tuple[float, str], dict[str, Any]] = {}
    for share in SHARES:
        for fabric in FABRICS:
            out = args.out / f"plan-{share}-{fabric}.json"
            argv = plan_argv(args, share, fabric, out)
            print("$ pdserve " + shlex.join(argv), flush=True)
            pdserve_main(argv)
            cells[(share, fabric)] = json.loads(out.read_text())
    md = table(cells)
    (args.out / "crossover.md").write_text(md + "\n")
    figure(cells, args.figure)
    print(md)


if __name__ == "__main__":
    run()
