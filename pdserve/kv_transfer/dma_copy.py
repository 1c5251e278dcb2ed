"""KV slot copies by the GPU's copy engines (DMA) instead of its SMs: one driver call per layer
group, `cuMemcpyBatchAsync` (CUDA 12.8 and later), over runs of slots that are consecutive on
both sides.

Copy engines move the bytes without SMs. The batch carries one copy per run per layer half, so a
destination scattered block by block costs descriptors, not launches. Measured on H100s
(benchmarks/stream_cost.py): with both sides contiguous they move a prompt's KV faster than the
copy kernel, block by block 6-12x slower (far slower within one GPU), and beside a forward they
slow it as much as the kernel does; so they are an option (`PDSERVE_KV_COPY=dma`), not the default.

The run planning is pure (numpy, testable anywhere); only `BatchCopier.copy` needs a GPU.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import numpy as np

_SRC_ACCESS_ORDER_STREAM = 1  # the source is read in stream order (after the layer that wrote it)
_LOCATION_DEVICE = 1
_FLAG_PREFER_OVERLAP_WITH_COMPUTE = 1  # ask for the copy engines: the SMs are busy with the forward


@dataclass(frozen=True)
class SlotRuns:
    """Maximal runs of positions whose slots are consecutive on both sides."""

    src: np.ndarray  # [R] int64 first source slot of each run
    dst: np.ndarray  # [R] int64 first destination slot
    length: np.ndarray  # [R] int64 slots in the run


def slot_runs(src_slots: np.ndarray, dst_slots: np.ndarray) -> SlotRuns:
    """Split two equally long slot lists into runs that are consecutive in both (a slot's rows lie
    next to the following slot's in a paged cache, across block boundaries too)."""
    if len(src_slots) != len(dst_slots):
        raise ValueError(f"{len(src_slots)} source slots but {len(dst_slots)} destination slots")
    if len(src_slots) == 0:
        empty = np.zeros(0, dtype=np.int64)
        return SlotRuns(empty, empty, empty)
    src, dst = np.asarray(src_slots, dtype=np.int64), np.asarray(dst_slots, dtype=np.int64)
    breaks = np.flatnonzero((np.diff(src) != 1) | (np.diff(dst) != 1)) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [len(src)]))
    return SlotRuns(src[starts], dst[starts], ends - starts)


def descriptors(
    runs: SlotRuns,
    src_bases: np.ndarray,  # [L] uint64 address of each layer's source cache (the layers copied)
    dst_bases: np.ndarray,  # [L] uint64
    src_half_bytes: int,  # bytes from a cache's K half to its V half
    dst_half_bytes: int,
    row_bytes: int,  # one slot's K (or V) of one layer
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(destinations, sources, sizes) of every run of every layer half: [L * 2 * R] uint64 each."""
    halves = np.arange(2, dtype=np.uint64)[None, :, None]  # [1, 2, 1]
    src = (
        src_bases.astype(np.uint64)[:, None, None]
        + halves * np.uint64(src_half_bytes)
        + (runs.src.astype(np.uint64) * np.uint64(row_bytes))[None, None, :]
    )
    dst = (
        dst_bases.astype(np.uint64)[:, None, None]
        + halves * np.uint64(dst_half_bytes)
        + (runs.dst.astype(np.uint64) * np.uint64(row_bytes))[None, None, :]
    )
    sizes = np.broadcast_to((runs.length.astype(np.uint64) * np.uint64(row_bytes))[None, None, :], src.shape)
    return dst.reshape(-1).copy(), src.reshape(-1).copy(), np.ascontiguousarray(sizes.reshape(-1))


class _Location(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class _Attributes(ctypes.Structure):
    _fields_ = [
        ("src_access_order", ctypes.c_int),
        ("src_loc_hint", _Location),
        ("dst_loc_hint", _Location),
        ("flags", ctypes.c_uint),
    ]


class BatchCopier:
    """cuMemcpyBatchAsync through the driver library (the CUDA 13 entry point has no failure-index
    argument; the 12.8 one does)."""

    def __init__(self, device_index: int) -> None:
        try:
            lib = ctypes.CDLL("libcuda.so.1")
        except OSError as e:
            raise RuntimeError(f"copy engines: no CUDA driver library ({e})") from None
        self._v2 = hasattr(lib, "cuMemcpyBatchAsync_v2")
        if not self._v2 and not hasattr(lib, "cuMemcpyBatchAsync"):
            raise RuntimeError("copy engines: this CUDA driver has no cuMemcpyBatchAsync (needs 12.8+)")
        self._fn = lib.cuMemcpyBatchAsync_v2 if self._v2 else lib.cuMemcpyBatchAsync
        self._error_string = lib.cuGetErrorString
        hint = _Location(_LOCATION_DEVICE, device_index)  # ignored for device memory; must be valid
        self._attrs = _Attributes(_SRC_ACCESS_ORDER_STREAM, hint, hint, _FLAG_PREFER_OVERLAP_WITH_COMPUTE)
        self._attr_index = (ctypes.c_size_t * 1)(0)

    def copy(self, dsts: np.ndarray, srcs: np.ndarray, sizes: np.ndarray, stream_handle: int) -> None:
        """Queue the copies (uint64 arrays of equal length) on the stream; returns at once."""
        count = len(sizes)
        if count == 0:
            return
        if not (dsts.dtype == srcs.dtype == sizes.dtype == np.uint64) or not (
            len(dsts) == len(srcs) == count
        ):
            raise ValueError("copy engines: dsts, srcs and sizes must be uint64 arrays of one length")
        args: list[object] = [
            dsts.ctypes.data_as(ctypes.c_void_p),
            srcs.ctypes.data_as(ctypes.c_void_p),
            sizes.ctypes.data_as(ctypes.c_void_p),
            ctypes.c_size_t(count),
            ctypes.byref(self._attrs),
            self._attr_index,
            ctypes.c_size_t(1),
        ]
        fail = ctypes.c_size_t(0)
        if not self._v2:
            args.append(ctypes.byref(fail))
        args.append(ctypes.c_void_p(stream_handle))
        result = self._fn(*args)
        if result != 0:
            text = ctypes.c_char_p()
            self._error_string(result, ctypes.byref(text))
            name = text.value.decode() if text.value else "unknown"
            raise RuntimeError(f"copy engines: cuMemcpyBatchAsync failed ({result}: {name})")
