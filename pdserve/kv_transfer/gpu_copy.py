"""One-pass GPU copy of KV slots between two paged caches (the cuda_ipc transport's data path), and a
fingerprint of slots to check what landed.

The copy reads each token's K and V straight from the sender's paged cache and writes them into the
receiver's reserved slots: no gathered intermediate, so a transfer moves each byte once. One launch
covers a whole layer group: the layers' base addresses come from pointer tables. A launch may be
held to a few programs per layer (each walks a stride of token tiles), so a copy beside the
prompt's forward occupies a few SMs for longer instead of all of them for a moment; on two H100s
neither that nor the copy engines slowed the forward measurably less than one program per tile
(benchmarks/copy_interference.py). The fingerprint
is the int64 sum of the values' bit patterns (order-free, so both sides get the same number from
their own slot order), one launch over all layers of a request.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

TOKENS_PER_PROGRAM = 8
_ELEMENT_TYPES = {
    torch.bfloat16: tl.bfloat16,
    torch.float16: tl.float16,
    torch.float32: tl.float32,
    torch.float8_e4m3fn: tl.float8e4nv,
}
_BIT_TYPES = {1: tl.int8, 2: tl.int16, 4: tl.int32}


# Token counts and first layers vary per push: specialising on them (divisible by 16, equal to 1)
# would compile a new variant the first time each kind appears while serving (~0.2 s on an H100).
@triton.jit(do_not_specialize=["num_tokens", "layer_start"])
def _slots_kernel(
    src_table,  # [num_layers] int64 base address of each source cache
    dst_table,  # [num_layers] int64 base address of each destination cache (COPY)
    src_slots,  # [T]
    dst_slots,  # [T] (COPY)
    fingerprint_ptr,  # [1] int64, accumulated (not COPY)
    num_tokens,
    layer_start,
    src_half,  # elements between the K and V halves of a source cache
    dst_half,
    ROW: tl.constexpr,  # num_kv_heads * head_dim
    BLOCK_ROW: tl.constexpr,
    TOKENS: tl.constexpr,
    DTYPE: tl.constexpr,
    BITS: tl.constexpr,
    COPY: tl.constexpr,  # copy the slots; else sum their bits into the fingerprint
):
    layer = layer_start + tl.program_id(1) // 2
    half = (tl.program_id(1) % 2).to(tl.int64)
    src = tl.load(src_table + layer).to(tl.pointer_type(DTYPE)) + half * src_half
    if COPY:
        dst = tl.load(dst_table + layer).to(tl.pointer_type(DTYPE)) + half * dst_half
    r = tl.arange(0, BLOCK_ROW)
    # Program p takes token tiles p, p + P, p + 2P, ... (P programs per layer half).
    for tile in range(tl.program_id(0), tl.cdiv(num_tokens, TOKENS), tl.num_programs(0)):
        t = tile * TOKENS + tl.arange(0, TOKENS)
        tmask = t < num_tokens
        src_slot = tl.load(src_slots + t, mask=tmask, other=0).to(tl.int64)
        mask = tmask[:, None] & (r < ROW)[None, :]
        x = tl.load(src + src_slot[:, None] * ROW + r[None, :], mask=mask, other=0.0)
        if COPY:
            dst_slot = tl.load(dst_slots + t, mask=tmask, other=0).to(tl.int64)
            tl.store(dst + dst_slot[:, None] * ROW + r[None, :], x, mask=mask)
        else:
            bits = x.to(BITS, bitcast=True).to(tl.int64)
            tl.atomic_add(fingerprint_ptr, tl.sum(tl.sum(bits, 1), 0))


def pointer_table(caches: list[torch.Tensor]) -> torch.Tensor:
    """[num_layers] int64 device tensor of the caches' base addresses."""
    return torch.tensor([c.data_ptr() for c in caches], dtype=torch.int64, device=caches[0].device)


def _launch(
    src_table: torch.Tensor,
    dst_table: torch.Tensor,
    like: torch.Tensor,
    src_half: int,
    dst_half: int,
    layer_start: int,
    layer_end: int,
    src_slots: torch.Tensor,
    dst_slots: torch.Tensor,
    fingerprint: torch.Tensor,
    copy: bool,
    max_programs: int = 0,
) -> None:
    num_tokens = src_slots.shape[0]
    if num_tokens == 0 or layer_end <= layer_start:
        return
    row = like.shape[-2] * like.shape[-1]
    tiles = triton.cdiv(num_tokens, TOKENS_PER_PROGRAM)
    grid = (min(tiles, max_programs) if max_programs > 0 else tiles, 2 * (layer_end - layer_start))
    _slots_kernel[grid](
        src_table, dst_table, src_slots, dst_slots, fingerprint, num_tokens, layer_start, src_half, dst_half,
        ROW=row, BLOCK_ROW=triton.next_power_of_2(row), TOKENS=TOKENS_PER_PROGRAM,
        DTYPE=_ELEMENT_TYPES[like.dtype], BITS=_BIT_TYPES[like.element_size()], COPY=copy, num_warps=4,
    )  # fmt: skip


def copy_slots(
    src_table: torch.Tensor,
    dst_table: torch.Tensor,
    like: torch.Tensor,  # one source cache [2, num_blocks, block_size, H_kv, D] (dtype, row size)
    src_half: int,
    dst_half: int,
    layer_start: int,
    layer_end: int,
    src_slots: torch.Tensor,  # [T] device
    dst_slots: torch.Tensor,  # [T] device
    max_programs: int = 0,
) -> None:
    """Copy layers [layer_start, layer_end) of the slots, on the current stream, with at most
    `max_programs` programs per layer half (0: one per tile of tokens)."""
    _launch(
        src_table, dst_table, like, src_half, dst_half, layer_start, layer_end,
        src_slots, dst_slots, src_slots, copy=True, max_programs=max_programs,
    )  # fmt: skip


def fingerprint_slots(
    table: torch.Tensor,
    like: torch.Tensor,
    layer_start: int,
    layer_end: int,
    slots: torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The bit-pattern sum of `slots` in layers [layer_start, layer_end), added into `out` (a [1] int64
    device tensor; a new zeroed one if None), which it returns."""
    if out is None:
        out = torch.zeros(1, dtype=torch.int64, device=like.device)
    half = like.stride(0)
    _launch(table, table, like, half, half, layer_start, layer_end, slots, slots, out, copy=False)
    return out
