"""GPU suite, KV transfer: a 4096-token Llama-3-8B KV (512 MiB, bf16) from a prefill-side paged cache
into a decode-side paged cache in another process (cuda_ipc), and over loopback tcp, against the
measured device-to-device copy bandwidth."""

from __future__ import annotations

import multiprocessing as mp
import statistics
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from gpu_suite_common import Table

from pdserve.kv_transfer import cuda_ipc, make_receiver, make_sender
from pdserve.kv_transfer.base import read_kv, slots_for
from pdserve.protocol import KVLayout, PrefillDone, PrefillJob

LAYOUT = KVLayout("dummy:llama-3-8b", "bfloat16", block_size=16, num_layers=32, num_kv_heads=8, head_dim=128)
NUM_TOKENS = 4096
NUM_BLOCKS = NUM_TOKENS // 16 + 16
SECRET = b"suite-secret"
REPEATS = 5


def new_caches(fill: bool) -> list[torch.Tensor]:
    shape = (2, NUM_BLOCKS, LAYOUT.block_size, LAYOUT.num_kv_heads, LAYOUT.head_dim)
    make = torch.randn if fill else torch.zeros
    return [make(shape, device="cuda").bfloat16() for _ in range(LAYOUT.num_layers)]


def receiver_main(conn: Any, transport: str) -> None:
    """The decode side in its own process: expect what we are told, report when it is done."""
    caches = new_caches(fill=False)
    done = threading.Event()
    outcome: list[Any] = []

    def on_done(msg: PrefillDone, stats: Any) -> None:
        outcome.append((time.monotonic(), "done", stats.nbytes))
        done.set()

    def on_failed(request_id: str, error: str) -> None:
        outcome.append((time.monotonic(), "failed", error))
        done.set()

    rx = make_receiver(transport, LAYOUT, caches, on_done, on_failed, SECRET)
    # When the last header and the completion arrived (the completion's check ends at on_done).
    marks: dict[str, float] = {}
    on_chunk, on_completion = rx._on_chunk, rx._on_prefill_done  # type: ignore[attr-defined]

    def chunk(*args: Any) -> None:
        on_chunk(*args)
        marks["last_chunk"] = time.monotonic()

    def completion(msg: PrefillDone) -> None:
        marks["done_in"] = time.monotonic()
        on_completion(msg)

    rx._on_chunk, rx._on_prefill_done = chunk, completion  # type: ignore[attr-defined]
    check_parts: dict[str, float] = defaultdict(float)
    cuda_ipc.slots_for = timed(check_parts, "rx_slots_for", cuda_ipc.slots_for)
    cuda_ipc.fingerprint_slots = timed(check_parts, "rx_fingerprint_launch", cuda_ipc.fingerprint_slots)
    conn.send(rx.endpoint)
    while (msg := conn.recv()) is not None:
        rid, blocks = msg
        rx.expect(rid, blocks, 0)
        check_parts.clear()
        conn.send("ready")
        done.wait(60)
        done.clear()
        conn.send((*outcome.pop(), dict(marks), dict(check_parts)))
    rx.close()


def timed(spent: dict[str, float], name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            spent[name] += time.perf_counter() - t0

    return wrapper


def run(table: Table, copy_bw: float) -> None:
    nbytes = NUM_TOKENS * LAYOUT.bytes_per_token
    payload_bw = copy_bw / 2  # the copy's own payload rate: bytes moved once
    src = new_caches(fill=True)
    src_blocks = torch.randperm(NUM_BLOCKS)[: NUM_TOKENS // 16].tolist()
    dst_blocks = torch.randperm(NUM_BLOCKS)[: NUM_TOKENS // 16].tolist()
    src_slots = slots_for(src_blocks, 16, 0, NUM_TOKENS)
    table.add("transfer", "D2D copy payload rate", f"{payload_bw / 1e9:.0f} GB/s", "half the read+write rate")

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=receiver_main, args=(child, "cuda_ipc"), daemon=True)
    proc.start()
    try:
        host, port = parent.recv()
        sender = make_sender("cuda_ipc", LAYOUT, "p0", SECRET)
        spent: dict[str, float] = defaultdict(float)  # host seconds in the sender's parts, per rep
        sender._device_slots = timed(spent, "slots", sender._device_slots)  # type: ignore[method-assign]
        cuda_ipc.copy_slots = timed(spent, "launch", cuda_ipc.copy_slots)
        for layers_per_chunk in (1, 4, LAYOUT.num_layers):
            copies, ends, hosts, devices = [], [], [], []
            parts: dict[str, list[float]] = defaultdict(list)
            for rep in range(REPEATS + 1):  # the first one connects and compiles
                rid = f"ipc-{layers_per_chunk}-{rep}"
                parent.send((rid, dst_blocks))
                assert parent.recv() == "ready"
                job = PrefillJob(rid, [], {}, "d0", host, port, dst_blocks, 0, time.time() + 60, LAYOUT)
                start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize()
                spent.clear()
                t0 = time.monotonic()
                start.record()
                for first in range(0, LAYOUT.num_layers, layers_per_chunk):
                    sender.send_kv_from_cache(job, first, first + layers_per_chunk, src, src_slots, 0)
                stop.record()
                t_host = time.monotonic()
                torch.cuda.synchronize()
                t_copy = time.monotonic()
                sender.send_done(job, PrefillDone(rid, 0, None, NUM_TOKENS, nbytes))
                t_done, kind, detail, marks, check_parts = parent.recv()
                if kind != "done":
                    raise RuntimeError(f"cuda_ipc transfer failed: {detail}")
                if rep:
                    copies.append(t_copy - t0)
                    ends.append(t_done - t0)
                    hosts.append(t_host - t0)
                    devices.append(start.elapsed_time(stop) * 1e-3)
                    for name, seconds in spent.items():
                        parts[name].append(seconds)
                    for name, when in marks.items():
                        parts[name].append(when - t0)
                    for name, seconds in check_parts.items():
                        parts[name].append(seconds)
            copy_s, end_s = statistics.median(copies), statistics.median(ends)
            host_s, device_s = statistics.median(hosts), statistics.median(devices)
            breakdown = ", ".join(f"{k} {statistics.median(v) * 1e3:.2f}" for k, v in parts.items())
            print(f"cuda_ipc {layers_per_chunk} layer(s)/chunk, ms: {breakdown}", flush=True)
            table.add("transfer", f"cuda_ipc 512 MiB, {layers_per_chunk} layer(s)/chunk",
                      f"{nbytes / copy_s / 1e9:.0f} GB/s",
                      f"{100 * nbytes / copy_s / payload_bw:.0f}% of D2D payload rate, call to copies done "
                      f"{copy_s * 1e3:.2f} ms (host enqueue {host_s * 1e3:.2f} ms, stream {device_s * 1e3:.2f} "
                      f"ms); decode side done (fingerprint checked) after {end_s * 1e3:.1f} ms; ms: {breakdown}",
                      gbps=nbytes / copy_s / 1e9)  # fmt: skip
        sender.close()
    finally:
        parent.send(None)
        proc.join(30)

    run_tcp(table, src, src_slots, dst_blocks, nbytes)


def run_tcp(
    table: Table, src: list[torch.Tensor], src_slots: torch.Tensor, dst_blocks: list[int], nbytes: int
) -> None:
    """tcp over loopback in one process: the receiver's threads scatter into a GPU cache."""
    dst = new_caches(fill=False)
    finished = threading.Event()
    result: list[str] = []

    def on_done(msg: PrefillDone, stats: Any) -> None:
        result.append("done")
        finished.set()

    def on_failed(request_id: str, error: str) -> None:
        result.append(error)
        finished.set()

    rx = make_receiver("tcp", LAYOUT, dst, on_done, on_failed, SECRET)
    sender = make_sender("tcp", LAYOUT, "p0", SECRET)
    host, port = rx.endpoint
    times = []
    for rep in range(3):  # the first one connects
        rid = f"tcp-{rep}"
        rx.expect(rid, dst_blocks, 0)
        job = PrefillJob(rid, [], {}, "d0", host, port, dst_blocks, 0, time.time() + 120, LAYOUT)
        finished.clear()
        t0 = time.monotonic()
        for layer in range(LAYOUT.num_layers):
            sender.send_kv(job, layer, read_kv(src, layer, layer + 1, src_slots), 0)
        sender.send_done(job, PrefillDone(rid, 0, None, NUM_TOKENS, nbytes))
        finished.wait(120)
        if result.pop() != "done":
            raise RuntimeError("tcp transfer failed")
        if rep:
            times.append(time.monotonic() - t0)
    ok = torch.equal(
        read_kv(dst, 0, LAYOUT.num_layers, slots_for(dst_blocks, 16, 0, NUM_TOKENS)),
        read_kv(src, 0, LAYOUT.num_layers, src_slots),
    )
    t = statistics.median(times)
    table.add("transfer", "tcp loopback 512 MiB (GPU -> host -> GPU)", f"{nbytes / t / 1e9:.2f} GB/s",
              f"{t * 1e3:.0f} ms, crc32 checked, data identical: {ok}")  # fmt: skip
    sender.close()
    rx.close()
