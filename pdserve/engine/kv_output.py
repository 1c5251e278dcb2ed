"""Prefill side of a remote prefill: ship each request's KV to its decode worker layer group by
layer group, from inside the forward pass, so the transfer overlaps the remaining layers."""

from __future__ import annotations

from collections.abc import Callable

import torch

from pdserve.engine.request import Request
from pdserve.engine.scheduler import ScheduledRequest
from pdserve.kv_transfer.base import KVSender, read_kv, slots_for
from pdserve.outputs import TokenLogprob
from pdserve.protocol import PrefillDone, PrefillJob
from pdserve.trace import mark


def logprob_to_wire(lp: TokenLogprob | None) -> list[object] | None:
    return None if lp is None else [lp.token_id, lp.logprob, [list(t) for t in lp.top]]


class KVStreamer:
    def __init__(
        self, sender: KVSender, kv_caches: list[torch.Tensor], block_size: int, layers_per_chunk: int = 1
    ) -> None:
        if layers_per_chunk < 1:
            raise ValueError(f"layers_per_chunk must be >= 1, got {layers_per_chunk}")
        self.sender = sender
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.num_layers = len(kv_caches)
        self.layers_per_chunk = layers_per_chunk
        # K and V of one token in one layer
        self.token_layer_bytes = kv_caches[0][:, 0, 0].numel() * kv_caches[0].element_size()
        self.bytes_sent: dict[str, int] = {}

    def layer_hook_for(self, scheduled: list[ScheduledRequest]) -> Callable[[int], None] | None:
        """The hook for this step's forward, or None when no scheduled request ships KV."""
        items: list[tuple[PrefillJob, int, torch.Tensor]] = []
        for s in scheduled:
            req = s.request
            job = req.kv_job
            if job is None:
                continue
            # Positions the decode worker already holds (its prefix-cache hit) are not sent.
            start = max(req.num_computed_tokens, job.skip_tokens)
            end = req.num_computed_tokens + s.num_new_tokens
            if end > start:
                mark(job.trace, "prefill.launched")
                items.append((job, start, slots_for(req.block_table, self.block_size, start, end)))
        if not items:
            return None
        if self.sender.copies_from_cache:
            for job, start, slots in items:
                self.sender.prepare_from_cache(job, slots, start, self.kv_caches[0].device)

        def hook(layer: int) -> None:
            if (layer + 1) % self.layers_per_chunk and layer != self.num_layers - 1:
                return
            first = layer - layer % self.layers_per_chunk
            for job, start, slots in items:
                if self.sender.copies_from_cache:  # it copies from our cache: no gathered copy
                    self.sender.send_kv_from_cache(job, first, layer + 1, self.kv_caches, slots, start)
                    nbytes = self.token_layer_bytes * len(slots) * (layer + 1 - first)
                    self.bytes_sent[job.request_id] = self.bytes_sent.get(job.request_id, 0) + nbytes
                    continue
                kv = read_kv(self.kv_caches, first, layer + 1, slots)  # [layers, 2, tokens, H_kv, D]
                self.sender.send_kv(job, first, kv, start)
                self.bytes_sent[job.request_id] = (
                    self.bytes_sent.get(job.request_id, 0) + kv.numel() * kv.element_size()
                )

        return hook

    def send_first_token(self, req: Request, token_id: int, logprob: TokenLogprob | None) -> None:
        job = req.kv_job
        assert job is not None
        nbytes = self.bytes_sent.pop(req.request_id, 0)
        mark(job.trace, "prefill.sampled")
        wire = logprob_to_wire(logprob)
        done = PrefillDone(req.request_id, token_id, wire, req.num_prompt_tokens, nbytes, trace=job.trace)
        self.sender.send_done(job, done)

    def send_failed(self, job: PrefillJob, error: str) -> None:
        self.bytes_sent.pop(job.request_id, None)
        self.sender.send_failed(job, error)
