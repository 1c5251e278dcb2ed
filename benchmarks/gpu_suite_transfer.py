"""GPU suite, KV transfer: a 4096-token Llama-3-8B KV (512 MiB, bf16) from a prefill-side paged cache
into a decode-side paged cache in another process (cuda_ipc), and over loopback tcp, against the
measured device-to-device copy bandwidth.

Three cuda_ipc measurements: one push alone (call to copies done: its latency, the GPU idle before
it); the same push launched while the GPU is busy with other work, as the prefill worker's pushes
are launched during its forward (the push's own GPU time: the data path's rate); and requests pushed
back to back as a busy prefill worker does (first call to the decode side's
last checked completion: the transport's throughput, measured like the D2D ceiling, which is timed
over back-to-back copies). The third runs with the default fingerprint stride and with stride 1
(every byte checked on both sides)."""

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

from pdserve.kv_transfer import cuda_ipc, cuda_ipc_receiver, make_receiver, make_sender
from pdserve.kv_transfer.base import read_kv, slots_for
from pdserve.protocol import KVLayout, PrefillDone, PrefillJob

LAYOUT = KVLayout("dummy:llama-3-8b", "bfloat16", block_size=16, num_layers=32, num_kv_heads=8, head_dim=128)
NUM_TOKENS = 4096
NUM_BLOCKS = NUM_TOKENS // 16 + 16
SECRET = b"suite-secret"
REPEATS = 5
BACK_TO_BACK = 8  # requests in flight at once in the throughput measurement
BUSY_CYCLES = 10_000_000  # ~5 ms of GPU clock cycles queued ahead of a push launched "behind work"
DST_BLOCKS = BACK_TO_BACK * (NUM_TOKENS // 16) + 16  # each in-flight request has blocks of its own


def new_caches(fill: bool, num_blocks: int = NUM_BLOCKS) -> list[torch.Tensor]:
    shape = (2, num_blocks, LAYOUT.block_size, LAYOUT.num_kv_heads, LAYOUT.head_dim)
    make = torch.randn if fill else torch.zeros
    return [make(shape, device="cuda").bfloat16() for _ in range(LAYOUT.num_layers)]


def receiver_main(conn: Any, transport: str) -> None:
    """The decode side in its own process: expect what we are told, report when it is done."""
    caches = new_caches(fill=False, num_blocks=DST_BLOCKS)
    done = threading.Event()
    outcome: list[Any] = []

    def on_done(msg: PrefillDone, stats: Any) -> None:
        outcome.append((time.monotonic(), "done", stats.nbytes))
        done.set()

    def on_failed(request_id: str, error: str) -> None:
        outcome.append((time.monotonic(), "failed", f"{request_id}: {error}"))
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
    cuda_ipc_receiver.slots_for = timed(check_parts, "rx_slots_for", cuda_ipc_receiver.slots_for)
    cuda_ipc_receiver.fingerprint_slots = timed(
        check_parts, "rx_fingerprint_launch", cuda_ipc_receiver.fingerprint_slots
    )
    conn.send(rx.endpoint)
    while (msg := conn.recv()) is not None:
        if msg[0] == "batch":  # back to back: report when the last of them is checked
            for rid, blocks in msg[1]:
                rx.expect(rid, blocks, 0)
            conn.send("ready")
            deadline = time.monotonic() + 60
            while len(outcome) < len(msg[1]) and time.monotonic() < deadline:
                done.wait(1)
                done.clear()
            failed = [detail for _, kind, detail in outcome if kind != "done"]
            conn.send((max(t for t, _, _ in outcome), len(outcome), failed))
            outcome.clear()
            continue
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
        for layers_per_chunk, behind in [(n, b) for n in (1, 4, LAYOUT.num_layers) for b in (False, True)]:
            copies, ends, hosts, devices = [], [], [], []
            parts: dict[str, list[float]] = defaultdict(list)
            for rep in range(REPEATS + 1):  # the first one connects and compiles
                rid = f"ipc-{layers_per_chunk}-{behind}-{rep}"
                parent.send((rid, dst_blocks))
                assert parent.recv() == "ready"
                job = PrefillJob(rid, [], {}, "d0", host, port, dst_blocks, 0, time.time() + 60, LAYOUT)
                start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                # Slot tables are staged before the data exists, as the prefill worker does before
                # its forward; timed apart.
                t_stage = time.perf_counter()
                sender.prepare_from_cache(job, src_slots, 0, src[0].device)
                staged_s = time.perf_counter() - t_stage
                torch.cuda.synchronize()
                spent.clear()
                t0 = time.monotonic()
                if behind:  # the GPU busy while the host launches, as during a prefill's forward
                    torch.cuda._sleep(BUSY_CYCLES)
                start.record()
                for first in range(0, LAYOUT.num_layers, layers_per_chunk):
                    sender.send_kv_from_cache(job, first, first + layers_per_chunk, src, src_slots, 0)
                # The copies run on the sender's own stream: this one waits for them, as the
                # prefill worker's does when a job ends, so `stop` marks the last copy's end.
                sender._join_copies()  # type: ignore[attr-defined]
                stop.record()
                t_host = time.monotonic()
                torch.cuda.synchronize()
                t_copy = time.monotonic()
                sender.send_done(job, PrefillDone(rid, 0, None, NUM_TOKENS, nbytes))
                t_done, kind, detail, marks, check_parts = parent.recv()
                if kind != "done":
                    raise RuntimeError(f"cuda_ipc transfer failed: {detail}")
                if rep:
                    parts["staged_before"].append(staged_s)
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
            if behind:
                table.add("transfer", f"cuda_ipc 512 MiB, {layers_per_chunk} layer(s)/chunk, GPU busy",
                          f"{nbytes / device_s / 1e9:.0f} GB/s",
                          f"{100 * nbytes / device_s / payload_bw:.0f}% of D2D payload rate: the push's GPU time "
                          f"({device_s * 1e3:.2f} ms) when launched while the GPU works (host enqueue "
                          f"{host_s * 1e3:.2f} ms hidden); decode side done after {end_s * 1e3:.1f} ms",
                          gbps=nbytes / device_s / 1e9)  # fmt: skip
                continue
            table.add("transfer", f"cuda_ipc 512 MiB, {layers_per_chunk} layer(s)/chunk",
                      f"{nbytes / copy_s / 1e9:.0f} GB/s",
                      f"{100 * nbytes / copy_s / payload_bw:.0f}% of D2D payload rate, slots staged before; "
                      f"call to copies done "
                      f"{copy_s * 1e3:.2f} ms (host enqueue {host_s * 1e3:.2f} ms, stream {device_s * 1e3:.2f} "
                      f"ms); decode side done (fingerprint checked) after {end_s * 1e3:.1f} ms; ms: {breakdown}",
                      gbps=nbytes / copy_s / 1e9)  # fmt: skip
        default_stride = sender.fingerprint_stride
        for layers_per_chunk in (1, LAYOUT.num_layers):
            for stride in (default_stride, 1):
                back_to_back(table, parent, sender, src, src_slots, (host, port), layers_per_chunk,
                             stride, payload_bw)  # fmt: skip
        sender.close()
    finally:
        parent.send(None)
        proc.join(30)

    run_tcp(table, src, src_slots, dst_blocks, nbytes)


def back_to_back(
    table: Table,
    parent: Any,
    sender: Any,
    src: list[torch.Tensor],
    src_slots: torch.Tensor,
    endpoint: tuple[str, int],
    layers_per_chunk: int,
    stride: int,
    payload_bw: float,
) -> None:
    """BACK_TO_BACK requests pushed without waiting between them (each into blocks of its own on the
    decode side), timed from the first call (slot staging included) to the decode side's last
    checked completion; also when the host had queued everything and when our GPU had copied it."""
    nbytes = NUM_TOKENS * LAYOUT.bytes_per_token
    per_request = NUM_TOKENS // 16
    sender.fingerprint_stride = stride
    rates: list[float] = []
    marks: dict[str, list[float]] = defaultdict(list)
    for rep in range(REPEATS + 1):  # the first one sizes the sender's staging buffers
        batch = [
            (
                f"b2b-{layers_per_chunk}-{stride}-{rep}-{i}",
                list(range(i * per_request, (i + 1) * per_request)),
            )
            for i in range(BACK_TO_BACK)
        ]
        parent.send(("batch", batch))
        assert parent.recv() == "ready"
        torch.cuda.synchronize()
        t0 = time.monotonic()
        for rid, blocks in batch:
            job = PrefillJob(rid, [], {}, "d0", *endpoint, blocks, 0, time.time() + 60, LAYOUT)
            sender.prepare_from_cache(job, src_slots, 0, src[0].device)
            for first in range(0, LAYOUT.num_layers, layers_per_chunk):
                sender.send_kv_from_cache(job, first, first + layers_per_chunk, src, src_slots, 0)
            sender.send_done(job, PrefillDone(rid, 0, None, NUM_TOKENS, nbytes))
        t_queued = time.monotonic()
        torch.cuda.synchronize()  # everything is queued: waiting here delays nothing
        t_copied = time.monotonic()
        t_last, count, failed = parent.recv()
        if failed or count != BACK_TO_BACK:
            raise RuntimeError(
                f"back-to-back cuda_ipc: {count} of {BACK_TO_BACK} reported, failed: {failed[:2]}"
            )
        if rep:
            rates.append(BACK_TO_BACK * nbytes / (t_last - t0))
            marks["host queued"].append(t_queued - t0)
            marks["copied"].append(t_copied - t0)
            marks["last checked"].append(t_last - t0)
    rate = statistics.median(rates)
    at = ", ".join(f"{k} {statistics.median(v) * 1e3:.2f}" for k, v in marks.items())
    table.add("transfer", f"cuda_ipc x{BACK_TO_BACK} back to back, {layers_per_chunk} layer(s)/chunk",
              f"{rate / 1e9:.0f} GB/s",
              f"{100 * rate / payload_bw:.0f}% of D2D payload rate; fingerprint stride {stride}; first call to "
              f"last checked completion; reps {min(rates) / 1e9:.0f}-{max(rates) / 1e9:.0f} GB/s; ms after "
              f"the first call: {at}",
              gbps=rate / 1e9)  # fmt: skip


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
