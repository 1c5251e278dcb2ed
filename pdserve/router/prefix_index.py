"""Which decode worker holds which prompt blocks: block hash → workers, fed by the workers'
KV events (blocks named and evicted). The router hashes an incoming prompt with the same chain
as the block manager and counts how many leading blocks each worker has."""

from __future__ import annotations

from collections import defaultdict

from pdserve.engine.block_manager import hash_prefix_blocks


class PrefixIndex:
    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self._holders: dict[int, set[str]] = defaultdict(set)

    def apply(self, worker_id: str, events: list[tuple[str, int]] | list[list[object]]) -> None:
        for kind, block_hash in events:
            h = int(block_hash)  # type: ignore[call-overload]
            if kind == "stored":
                self._holders[h].add(worker_id)
            elif kind == "removed":
                holders = self._holders.get(h)
                if holders is not None:
                    holders.discard(worker_id)
                    if not holders:
                        del self._holders[h]

    def remove_worker(self, worker_id: str) -> None:
        for h in list(self._holders):
            self._holders[h].discard(worker_id)
            if not self._holders[h]:
                del self._holders[h]

    def overlap(self, token_ids: list[int], workers: list[str]) -> dict[str, int]:
        """Leading prompt tokens each worker has cached (block-aligned)."""
        hashes = hash_prefix_blocks(token_ids[: max(len(token_ids) - 1, 0)], self.block_size)
        result = dict.fromkeys(workers, 0)
        alive = set(workers)
        for i, h in enumerate(hashes):
            alive &= self._holders.get(h, set())
            if not alive:
                break
            for w in alive:
                result[w] = (i + 1) * self.block_size
        return result

    def __len__(self) -> int:
        return len(self._holders)
