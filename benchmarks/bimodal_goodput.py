"""SLO attainment per rate and goodput (DistServe: the highest rate with >= 90% of requests meeting
both the TTFT and the TPOT target) from the per-request files of benchmarks/bimodal_cpu.py runs,
under any SLO, without rerunning.

    .venv/bin/python benchmarks/bimodal_goodput.py results/bimodal_low results/bimodal \\
        --slo 5:0.25 --slo 10:0.15
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pdserve.bench.client import RequestResult
from pdserve.bench.report import SLO, goodput


def load(dirs: list[Path]) -> dict[str, dict[float, list[RequestResult]]]:
    runs: dict[str, dict[float, list[RequestResult]]] = {}
    for d in dirs:
        for f in sorted(d.glob("*@*.requests.json")):
            config, _, rate = f.name.removesuffix(".requests.json").partition("@")
            runs.setdefault(config, {})[float(rate)] = [RequestResult(**r) for r in json.loads(f.read_text())]
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dirs", type=Path, nargs="+")
    ap.add_argument("--slo", action="append", required=True, help="TTFT_S:TPOT_S, repeatable")
    args = ap.parse_args()
    runs = load(args.dirs)
    for spec in args.slo:
        ttft, tpot = (float(x) for x in spec.split(":"))
        slo = SLO(ttft, tpot)
        print(f"SLO: TTFT <= {ttft:g} s, TPOT <= {tpot:g} s")
        for config, by_rate in sorted(runs.items()):
            points = [
                (rate, sum(slo.met(r) for r in res) / len(res)) for rate, res in sorted(by_rate.items())
            ]
            cells = ", ".join(f"{rate:g}: {att:.0%}" for rate, att in points)
            print(f"  {config:10s} attainment {cells}; goodput {goodput(points):g} req/s")


if __name__ == "__main__":
    main()
