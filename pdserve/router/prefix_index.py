"""Which decode worker holds which prompt blocks: block hash → workers, fed by the workers'
KV events (blocks named and evicted). The router hashes an incoming prompt with the same chain
as the block manager and counts how many leading blocks each worker has.

The index holds one entry per cached block of every worker: hundreds of thousands on GPUs. Each
entry's holders are a bit mask (an int), not a set: a dict of ints is invisible to the garbage
collector, where a set per block made every full collection in the router walk them all (50-140 ms
pauses, every stream stalled).
"""

from __future__ import annotations

from pdserve.engine.block_manager import hash_prefix_blocks


class PrefixIndex:
    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self._holders: dict[int, int] = {}  # block hash -> bit mask of the workers holding it
        self._bits: dict[str, int] = {}  # worker id -> its bit

    def _bit(self, worker_id: str) -> int:
        bit = self._bits.get(worker_id)
        if bit is None:
            used = 0
            for b in self._bits.values():
                used |= b
            bit = (~used & (used + 1)) or 1  # the lowest free bit (reused after remove_worker)
            self._bits[worker_id] = bit
        return bit

    def apply(self, worker_id: str, events: list[tuple[str, int]] | list[list[object]]) -> None:
        bit = self._bit(worker_id)
        holders = self._holders
        for kind, block_hash in events:
            h = int(block_hash)  # type: ignore[call-overload]
            if kind == "stored":
                holders[h] = holders.get(h, 0) | bit
            elif kind == "removed":
                mask = holders.get(h, 0) & ~bit
                if mask:
                    holders[h] = mask
                else:
                    holders.pop(h, None)

    def remove_worker(self, worker_id: str) -> None:
        bit = self._bits.pop(worker_id, None)
        if bit is None:
            return
        holders = self._holders
        for h, mask in list(holders.items()):
            if mask & bit:
                if mask == bit:
                    del holders[h]
                else:
                    holders[h] = mask & ~bit

    def overlap(self, token_ids: list[int], workers: list[str]) -> dict[str, int]:
        """Leading prompt tokens each worker has cached (block-aligned)."""
        result = dict.fromkeys(workers, 0)
        bits = {w: self._bits[w] for w in workers if w in self._bits}
        alive = 0
        for b in bits.values():
            alive |= b
        if not alive:
            return result
        hashes = hash_prefix_blocks(token_ids[: max(len(token_ids) - 1, 0)], self.block_size)
        for i, h in enumerate(hashes):
            alive &= self._holders.get(h, 0)
            if not alive:
                break
            for w, b in bits.items():
                if alive & b:
                    result[w] = (i + 1) * self.block_size
        return result

    def __len__(self) -> int:
        return len(self._holders)
