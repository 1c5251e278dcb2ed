"""Which token positions a cuda_ipc completion's fingerprint covers.

The fingerprint is there to catch KV that did not land where the decode side will read it (a wrong
block, a copy that had not finished). Summing every byte of a request on both sides reads its KV
twice more, once on each GPU, on top of the copy itself: for a 4,096-token Llama-3-8B prompt that
is 1 GiB of extra HBM traffic against the copy's 1 GiB. One position in `stride` checks every block
of every layer when `stride` is at most the block size, at 1/stride of that cost. The offset is
drawn from the request id, so a fault at a fixed position inside blocks is not missed by every
request. Both sides derive the same positions from (request id, stride), whatever the chunking.
"""

from __future__ import annotations

import zlib


def sample_offset(request_id: str, stride: int) -> int:
    """The residue (position % stride) this request's fingerprint covers."""
    if stride < 1:
        raise ValueError(f"fingerprint stride must be >= 1, got {stride}")
    return zlib.crc32(request_id.encode()) % stride


def sampled(start: int, count: int, stride: int, offset: int) -> slice:
    """Indices, within the positions [start, start + count), of those p with p % stride == offset."""
    return slice((offset - start) % stride, count, stride)


def num_sampled(start: int, count: int, stride: int, offset: int) -> int:
    """How many of the positions [start, start + count) the fingerprint covers: the sampled positions
    of a shorter range are a prefix of those of a longer one from the same start."""
    return len(range(*sampled(start, count, stride, offset).indices(count)))
