"""Paged KV block allocator with ref counts and automatic prefix caching.

Every full block of a request is named by a hash chained over all tokens before it, so two
requests with the same prefix map to the same blocks. A block whose ref count drops to zero
goes to the back of the free queue but keeps its hash: until the allocator reuses it (front of
the queue first, so least recently freed first) a later request can revive it as a cache hit.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass

from pdserve.engine.request import Request

_ROOT_HASH = 0


def hash_block(parent_hash: int, token_ids: list[int]) -> int:
    """Stable across processes (unlike hash()), so routers and workers agree on block names."""
    h = hashlib.blake2b(digest_size=8)
    h.update(parent_hash.to_bytes(8, "little"))
    h.update(array("q", token_ids).tobytes())
    return int.from_bytes(h.digest(), "little")


def hash_prefix_blocks(token_ids: list[int], block_size: int) -> list[int]:
    """The hash chain of every full block of `token_ids`."""
    hashes: list[int] = []
    parent = _ROOT_HASH
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash_block(parent, token_ids[start : start + block_size])
        hashes.append(parent)
    return hashes


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: int | None = None


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Blocks with ref_count 0, least recently freed first (the eviction order).
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._cached: dict[int, int] = {}  # block hash -> block id
        self.hit_tokens = 0
        self.query_tokens = 0
        # (event, block_hash) since the last drain: "stored" / "removed"; feeds the router's prefix index.
        self.events: list[tuple[str, int]] = []

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    def _chain(self, req: Request, num_blocks: int) -> list[int]:
        """The hash chain of the request's first `num_blocks` full blocks (memoised on the request)."""
        chain = req.hash_chain
        if len(chain) < num_blocks:
            parent = chain[-1] if chain else _ROOT_HASH
            tokens = req.all_token_ids
            for i in range(len(chain), num_blocks):
                parent = hash_block(parent, tokens[i * self.block_size : (i + 1) * self.block_size])
                chain.append(parent)
        return chain[:num_blocks]

    def get_computed_blocks(self, req: Request) -> list[int]:
        """Cached blocks matching the request's longest block-aligned prefix. At least one token is
        left uncomputed, because the last prompt token must run to produce the next token's logits."""
        hit: list[int] = []
        if self.enable_prefix_caching:
            hit = self._hits(self._chain(req, (req.num_tokens - 1) // self.block_size))
        self.query_tokens += req.num_tokens
        self.hit_tokens += len(hit) * self.block_size
        return hit

    def peek_cached_prefix(self, token_ids: list[int]) -> list[int]:
        """Like get_computed_blocks, without touching hit statistics (for routing decisions)."""
        if not self.enable_prefix_caching:
            return []
        return self._hits(hash_prefix_blocks(token_ids[: len(token_ids) - 1], self.block_size))

    def _hits(self, hashes: list[int]) -> list[int]:
        """The cached blocks of the longest prefix of a hash chain."""
        hit: list[int] = []
        for h in hashes:
            block_id = self._cached.get(h)
            if block_id is None:
                break
            hit.append(block_id)
        return hit

    def can_allocate(
        self, req: Request, num_new_tokens: int, computed_blocks: list[int] | None = None
    ) -> bool:
        computed_blocks = computed_blocks or []
        total = req.num_computed_tokens + len(computed_blocks) * self.block_size + num_new_tokens
        num_new_blocks = self.blocks_needed(total) - len(req.block_table) - len(computed_blocks)
        # Reviving a cached block that sits in the free queue takes it out of the free pool too.
        revived = sum(1 for b in computed_blocks if self.blocks[b].ref_count == 0)
        return num_new_blocks + revived <= self.num_free_blocks

    def allocate(self, req: Request, num_new_tokens: int, computed_blocks: list[int] | None = None) -> bool:
        """Grow the request's block table to hold `num_new_tokens` more tokens after its computed ones
        (and after `computed_blocks`, prefix hits taken now). False, changing nothing, if memory is short."""
        if (
            not computed_blocks
            and req.num_computed_tokens + num_new_tokens <= len(req.block_table) * self.block_size
        ):
            return True  # fits the blocks held (most decode steps): nothing to take
        computed_blocks = computed_blocks or []
        if not self.can_allocate(req, num_new_tokens, computed_blocks):
            return False
        for block_id in computed_blocks:
            self._take(block_id)
            req.block_table.append(block_id)
            block_hash = self.blocks[block_id].block_hash
            assert block_hash is not None, "a prefix hit is always a named block"
            req.block_hashes.append(block_hash)
        req.num_computed_tokens += len(computed_blocks) * self.block_size
        total = req.num_computed_tokens + num_new_tokens
        for _ in range(self.blocks_needed(total) - len(req.block_table)):
            block_id = next(iter(self._free))
            self._evict(block_id)
            self._take(block_id)
            req.block_table.append(block_id)
        return True

    def cache_full_blocks(self, req: Request) -> None:
        """Name the request's newly filled blocks so later requests can hit them."""
        if not self.enable_prefix_caching:
            return
        num_full = req.num_computed_tokens // self.block_size
        if num_full <= len(req.block_hashes):
            return  # no block filled up since the last call (most decode steps)
        chain = self._chain(req, num_full)
        for i in range(len(req.block_hashes), num_full):
            parent = chain[i]
            req.block_hashes.append(parent)
            block = self.blocks[req.block_table[i]]
            if block.block_hash is None and parent not in self._cached:
                block.block_hash = parent
                self._cached[parent] = block.block_id
                self.events.append(("stored", parent))

    def free(self, req: Request) -> None:
        """Release the request's blocks. Idempotent: the table is emptied. Tail blocks are queued for
        eviction first, since a shared prefix is likelier to be reused than a request's own tail."""
        for block_id in reversed(req.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count < 0:
                raise RuntimeError(f"[{req.request_id}] block {block_id} freed twice")
            if block.ref_count == 0:
                self._free[block_id] = None
        req.block_table = []
        req.block_hashes = []

    def reset_prefix_cache(self) -> None:
        for block_id in list(self._free):
            self._evict(block_id)

    def drain_events(self) -> list[tuple[str, int]]:
        events, self.events = self.events, []
        return events

    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self._free[block_id]
        block.ref_count += 1

    def _evict(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.block_hash is not None:
            if self._cached.get(block.block_hash) == block_id:
                del self._cached[block.block_hash]
                self.events.append(("removed", block.block_hash))
            block.block_hash = None
