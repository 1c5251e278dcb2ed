"""Where a request's time to first token goes, hop by hop, across processes.

Each process on a request's control path stamps wall-clock marks (`time.time()`) into a dict that
travels with the request's own messages (PrefillJob, PrefillDone, the first TokenChunk), so tracing
costs no extra message. The router turns them into the finished request's `phases` on its own clock,
beside its own marks (routed, enqueued, pulled, first_token). Marks taken on another host carry that
host's clock offset.

The marks, in the order a remote prefill passes them (a local prefill has the worker.* ones):
    worker.received       the serving worker (decode, co-located, or prefill serving whole) got
                          the generate request
    worker.admitted       its engine thread decided where to prefill (and reserved blocks)
    prefill.received      the prefill worker got the job from the router's queue
    prefill.admitted      its engine thread queued the job
    prefill.launched      the job's first forward was launched
    prefill.sampled       its first token was read on the host
    prefill.first_token_sent  the first token left for the router (router/direct_first_token.py;
                          the router's own `first_token` is when it streamed it)
    prefill.done_queued   cuda_ipc: the fingerprint launched, the completion queued to the send thread
    prefill.done_dequeued cuda_ipc: the send thread took it
    prefill.fingerprint_read  cuda_ipc: the fingerprint read back from the GPU
    prefill.done_sent     the completion was written to the KV channel
    decode.done_received  the decode worker's KV channel read the completion
    decode.fingerprint_launched  cuda_ipc: the decode side's fingerprint launched
    decode.kv_checked     the completion was accepted (KV complete, fingerprint matched)
    decode.completed      the decode engine thread took the first token
    decode.delivered      ... and handed it to the worker's event loop
    worker.output_received  the event loop got the request's first output
    worker.first_frame    the first token's frame left the serving worker
"""

from __future__ import annotations

import time

Trace = dict[str, float]


def mark(trace: Trace, name: str) -> None:
    """Stamp `name` now, unless it is already stamped (a mark is the first time a thing happens)."""
    if name not in trace:
        trace[name] = time.time()


def on_monotonic_clock(trace: Trace) -> dict[str, float]:
    """The marks as this process's time.monotonic() values (what the router's phases use)."""
    offset = time.monotonic() - time.time()
    return {name: t + offset for name, t in trace.items()}
