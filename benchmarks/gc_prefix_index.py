"""What a full garbage collection costs the router for its prefix index: the same number of cached
blocks held as a set of workers per block (tracked by the collector) and as the index's bit masks
(ints, which it does not track), side by side in one process.

    python benchmarks/gc_prefix_index.py --entries 480000
"""

from __future__ import annotations

import argparse
import gc
import random
import time
from collections import defaultdict

from pdserve.router.prefix_index import PrefixIndex


def full_collection_ms(repeats: int = 3) -> float:
    """The fastest of `repeats` full collections, in ms."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        gc.collect()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--entries", type=int, default=480_000, help="cached blocks across the workers")
    args = ap.parse_args()
    rng = random.Random(0)
    gc.collect()
    gc.freeze()  # as the router does after start-up: only what comes after is walked
    empty = full_collection_ms()
    sets: defaultdict[int, set[str]] = defaultdict(set)
    for _ in range(args.entries):
        sets[rng.getrandbits(63)].add("decode-0")
    with_sets = full_collection_ms()
    del sets
    gc.collect()
    index = PrefixIndex(16)
    index.apply("decode-0", [("stored", rng.getrandbits(63)) for _ in range(args.entries)])
    with_masks = full_collection_ms()
    print(
        f"full collection: nothing added {empty:.1f} ms, {args.entries:,} blocks as sets {with_sets:.1f} ms, "
        f"as bit masks {with_masks:.1f} ms"
    )


if __name__ == "__main__":
    main()
