from __future__ import annotations

from pdserve.engine.block_manager import BlockManager, hash_block, hash_prefix_blocks
from pdserve.engine.request import Request
from pdserve.sampling_params import SamplingParams


def make_req(rid: str, tokens: list[int]) -> Request:
    return Request(rid, tokens, SamplingParams(max_tokens=8), max_tokens=8)


def prefill(bm: BlockManager, req: Request) -> None:
    """Admit the request the way the scheduler does: prefix hits, then the rest, then name full blocks."""
    hit = bm.get_computed_blocks(req)
    assert bm.allocate(req, req.num_tokens - len(hit) * bm.block_size, hit)
    req.num_computed_tokens = req.num_tokens
    bm.cache_full_blocks(req)


def test_hash_is_stable_and_chained() -> None:
    a = hash_block(0, [1, 2, 3, 4])
    assert a == hash_block(0, [1, 2, 3, 4])
    assert a != hash_block(0, [1, 2, 3, 5])
    assert hash_block(a, [5, 6, 7, 8]) != hash_block(0, [5, 6, 7, 8])
    assert hash_prefix_blocks(list(range(10)), 4) == [
        hash_block(0, [0, 1, 2, 3]),
        hash_block(hash_block(0, [0, 1, 2, 3]), [4, 5, 6, 7]),
    ]


def test_allocate_free_round_trip() -> None:
    bm = BlockManager(num_blocks=10, block_size=4)
    req = make_req("a", list(range(9)))
    prefill(bm, req)
    assert len(req.block_table) == 3
    assert bm.num_free_blocks == 7
    bm.free(req)
    bm.free(req)  # idempotent
    assert bm.num_free_blocks == 10


def test_allocation_failure_changes_nothing() -> None:
    bm = BlockManager(num_blocks=3, block_size=4)
    req = make_req("a", list(range(20)))
    assert not bm.allocate(req, 20)
    assert req.block_table == [] and bm.num_free_blocks == 3


def test_prefix_hit_shares_blocks_and_leaves_last_token() -> None:
    bm = BlockManager(num_blocks=20, block_size=4)
    a = make_req("a", list(range(12)))
    prefill(bm, a)
    b = make_req("b", list(range(12)) + [99, 98])
    hit = bm.get_computed_blocks(b)
    assert hit == a.block_table  # all three full blocks of a
    # A prompt that *is* a cached prefix still computes its last token (needs logits).
    c = make_req("c", list(range(12)))
    assert bm.get_computed_blocks(c) == a.block_table[:2]
    assert bm.allocate(b, 2, hit)
    assert b.num_computed_tokens == 12
    assert bm.blocks[a.block_table[0]].ref_count == 2
    bm.free(a)
    bm.free(b)
    assert bm.num_free_blocks == 20


def test_freed_blocks_stay_cached_until_evicted() -> None:
    bm = BlockManager(num_blocks=4, block_size=4)
    a = make_req("a", list(range(8)) + [7])
    prefill(bm, a)
    bm.free(a)
    again = make_req("again", list(range(8)) + [5])
    assert len(bm.get_computed_blocks(again)) == 2  # revived from the free queue
    # Fill the whole cache with unrelated tokens: the old blocks are evicted and renamed.
    other = make_req("other", list(range(100, 116)))
    assert bm.allocate(other, 16)
    assert bm.get_computed_blocks(again) == []
    events = bm.drain_events()
    assert ("removed", hash_block(0, [0, 1, 2, 3])) in events
    bm.free(other)
    assert bm.num_free_blocks == 4


def test_reviving_a_free_cached_block_counts_against_capacity() -> None:
    bm = BlockManager(num_blocks=3, block_size=4)
    a = make_req("a", list(range(8)) + [1])
    prefill(bm, a)  # 3 blocks, two of them named
    bm.free(a)
    b = make_req("b", list(range(8)) + [1, 2, 3, 4, 5, 6, 7, 8])  # 16 tokens: 4 blocks, 2 hits
    hit = bm.get_computed_blocks(b)
    assert len(hit) == 2
    assert not bm.can_allocate(b, 8, hit)  # 2 revived + 2 new > 3 free
    assert bm.num_free_blocks == 3


def test_prefix_caching_off() -> None:
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    a = make_req("a", list(range(9)))
    prefill(bm, a)
    assert bm.get_computed_blocks(make_req("b", list(range(9)))) == []


def test_each_block_is_hashed_once_from_lookup_to_naming(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Admission looks the prompt up, and the blocks are named once filled (on a decode worker: when
    a remote prefill's KV arrives, on the way to the first token): the chain is computed once."""
    import pdserve.engine.block_manager as bm_module

    calls = 0

    def counting(parent: int, tokens: list[int]) -> int:
        nonlocal calls
        calls += 1
        return hash_block(parent, tokens)

    want_prompt = hash_prefix_blocks(list(range(17)), 4)
    want_more = hash_prefix_blocks([*range(17), 99, 98, 97], 4)
    monkeypatch.setattr(bm_module, "hash_block", counting)
    bm = BlockManager(num_blocks=20, block_size=4)
    req = make_req("a", list(range(17)))  # 4 full blocks
    prefill(bm, req)
    assert calls == 4
    assert req.block_hashes == want_prompt
    req.append_token(99, None)
    req.append_token(98, None)
    req.append_token(97, None)  # 20 tokens: a fifth full block
    req.num_computed_tokens = 20
    bm.cache_full_blocks(req)
    assert calls == 5 and req.block_hashes == want_more
    # Another request with the same prompt hits every block the first one named.
    other = make_req("b", list(range(17)))
    assert bm.get_computed_blocks(other) == req.block_table[:4]
