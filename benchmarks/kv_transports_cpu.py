"""KV transports side by side on CPU caches: GB/s of one request's KV pushed layer by layer and
completed (the measurement `pdserve profile` makes per transport), interleaved over rounds.

    .venv/bin/python benchmarks/kv_transports_cpu.py [--tokens 4096] [--rounds 2]

Sender and receiver run as threads of one process; nixl is included when the package is installed.
"""

from __future__ import annotations

import argparse
import json

from pdserve.kv_transfer.nixl import available
from pdserve.planner.profile import time_transport
from pdserve.protocol import KVLayout

# SmolLM2-135M's KV in fp32: 30 layers x 2 x 3 heads x 64 dims x 4 bytes = 46,080 bytes per token.
LAYOUT = KVLayout("smollm2", "float32", block_size=16, num_layers=30, num_kv_heads=3, head_dim=64)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    transports = ["tcp", "shm", *(["nixl"] if available() else [])]
    gbps: dict[str, list[float]] = {t: [] for t in transports}
    for _ in range(args.rounds):
        for t in transports:
            gbps[t].append(round(time_transport(t, LAYOUT, args.tokens, args.repeats), 3))
    mbytes = args.tokens * LAYOUT.bytes_per_token / 1e6
    print(json.dumps({"tokens": args.tokens, "MB": round(mbytes, 1), "GB/s": gbps}))


if __name__ == "__main__":
    main()
