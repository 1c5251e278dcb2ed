"""Prefill side of a remote prefill: ship each request's KV to its decode worker layer group by
layer group, from inside the forward pass, so the transfer overlaps the remaining layers.

A job the router queued early (router/early_prefill.py) starts before its decode worker has
reserved blocks: its destination arrives while the prompt runs (`offer_destination`, from any
thread). Until then nothing is pushed; at the first layer after it arrives, everything computed so
far goes out in one catch-up push (earlier chunks: all layers; this step: the layers done), and
the rest streams as usual. A job whose forward ends before its destination is *parked*: its first
token waits, and the engine holds its blocks, until the destination comes (`flush_parked`) or the
job is dropped.

With `push="after"` nothing leaves during the forward: the whole prompt's KV goes out in one push
queued behind the step's sampling (`after_launch`, before the token is read), so the copy starts
on the GPU once the first token exists. Where a copy beside the forward slows it by more than the
copy takes (two GPUs of one host, measured in benchmarks/stream_cost.py), that is faster for the
first token and no slower for the decode worker.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from pdserve.engine.request import Request
from pdserve.engine.scheduler import ScheduledRequest
from pdserve.kv_transfer.base import KVSender, read_kv, slots_for
from pdserve.outputs import TokenLogprob
from pdserve.protocol import PrefillDestination, PrefillDone, PrefillJob, logprob_to_wire
from pdserve.trace import mark


@dataclass
class _Parked:
    req: Request
    token_id: int
    logprob: TokenLogprob | None


class KVStreamer:
    def __init__(
        self,
        sender: KVSender,
        kv_caches: list[torch.Tensor],
        block_size: int,
        layers_per_chunk: int = 1,
        push: str = "stream",
    ) -> None:
        if layers_per_chunk < 1:
            raise ValueError(f"layers_per_chunk must be >= 1, got {layers_per_chunk}")
        if push not in ("stream", "after"):
            raise ValueError(f"push must be stream|after, got {push!r}")
        self.sender = sender
        # "stream": layer groups from inside the forward; "after": the whole prompt in one push once
        # its first token is sampled (config.resolve_kv_push says when which).
        self.push = push
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.num_layers = len(kv_caches)
        self.layers_per_chunk = layers_per_chunk
        # K and V of one token in one layer
        self.token_layer_bytes = kv_caches[0][:, 0, 0].numel() * kv_caches[0].element_size()
        self.bytes_sent: dict[str, int] = {}
        # Destinations that arrived for jobs without one: written by the worker's event loop while
        # the engine thread may be inside a forward; a dict store is atomic, and only this thread pops.
        self._arrived: dict[str, PrefillDestination] = {}
        # request id -> (first position, slots) of each range computed in every layer but not pushed
        # (no destination yet)
        self._unsent: dict[str, list[tuple[int, torch.Tensor]]] = {}
        self.parked: dict[str, _Parked] = {}
        # "after" mode: requests whose whole prompt has been queued for sending
        self._prompt_pushed: set[str] = set()
        # Called with each job's first token as soon as it is sampled, destination or not (the
        # worker streams it to the router: router/direct_first_token.py). Engine thread.
        self.on_first_token: Callable[[Request, int, TokenLogprob | None], None] | None = None

    # ---- destinations that come late ----

    def offer_destination(self, dest: PrefillDestination) -> None:
        """Any thread: where a started job's KV goes."""
        self._arrived[dest.request_id] = dest

    def _resolve(self, job: PrefillJob) -> bool:
        """Engine thread: whether the job has its destination, taking one that arrived."""
        if job.has_destination:
            return True
        dest = self._arrived.pop(job.request_id, None)
        if dest is None:
            return False
        job.set_destination(dest)
        return True

    def expire_arrivals(self, now: float) -> None:
        """Forget destinations past their deadline (their job never ran here)."""
        for rid, dest in list(self._arrived.items()):  # one C call: safe against the loop's stores
            if dest.deadline >= now:
                continue
            self._arrived.pop(rid, None)

    def flush_parked(self, request_id: str) -> bool:
        """Engine thread, after a destination arrived: push a parked job's KV and its first token.
        True if it was parked and is now sent (the engine may then free its blocks)."""
        parked = self.parked.get(request_id)
        if parked is None or parked.req.kv_job is None or not self._resolve(parked.req.kv_job):
            return False
        del self.parked[request_id]
        self._send_done(parked.req, parked.token_id, parked.logprob)
        return True

    def drop(self, request_id: str) -> bool:
        """Forget everything held for a request (aborted, expired). True if it was parked."""
        self._arrived.pop(request_id, None)
        self._unsent.pop(request_id, None)
        self._prompt_pushed.discard(request_id)
        self.bytes_sent.pop(request_id, None)
        return self.parked.pop(request_id, None) is not None

    # ---- pushes ----

    def _push(
        self, job: PrefillJob, layer_start: int, layer_end: int, start: int, slots: torch.Tensor
    ) -> None:
        """Positions [start, start + len(slots)) of layers [layer_start, layer_end), less the prefix
        the decode worker already holds (not sent)."""
        skip = job.skip_tokens - start
        if skip > 0:
            start, slots = start + skip, slots[skip:]
        if slots.numel() == 0 or layer_end <= layer_start:
            return
        rid = job.request_id
        if self.sender.copies_from_cache:  # it copies from our cache: no gathered copy
            self.sender.send_kv_from_cache(job, layer_start, layer_end, self.kv_caches, slots, start)
            nbytes = self.token_layer_bytes * len(slots) * (layer_end - layer_start)
        else:
            kv = read_kv(self.kv_caches, layer_start, layer_end, slots)  # [layers, 2, tokens, H_kv, D]
            self.sender.send_kv(job, layer_start, kv, start)
            nbytes = kv.numel() * kv.element_size()
        self.bytes_sent[rid] = self.bytes_sent.get(rid, 0) + nbytes

    def _push_unsent(self, job: PrefillJob) -> None:
        """Every earlier chunk of a job whose destination just arrived: all layers, one push each."""
        for start, slots in self._unsent.pop(job.request_id, []):
            self._push(job, 0, self.num_layers, start, slots)

    def layer_hook_for(self, scheduled: list[ScheduledRequest]) -> Callable[[int], None] | None:
        """The hook for this step's forward, or None when no scheduled request ships KV during it."""
        items: list[tuple[PrefillJob, Request, int, int]] = []  # job, request, first and end position
        completes: set[str] = set()  # jobs whose prompt this step finishes
        for s in scheduled:
            req = s.request
            job = req.kv_job
            if job is None:
                continue
            start, end = req.num_computed_tokens, req.num_computed_tokens + s.num_new_tokens
            if end > start:
                mark(job.trace, "prefill.launched")
                items.append((job, req, start, end))
                if end >= req.num_prompt_tokens:
                    completes.add(job.request_id)
        if not items or self.push == "after":
            return None  # "after": after_launch / _send_done push the whole prompt
        # Nothing more before the forward: the GPU idles until its first kernels are queued, so the
        # slots, a catch-up of earlier chunks and a copying sender's slot tables wait for the first
        # layer's hook, when the GPU is busy.
        slots: dict[str, torch.Tensor] = {}  # request id -> this step's slots
        ready: dict[str, bool] = {}  # has its destination
        next_layer: dict[str, int] = {}  # the first layer of its next push

        def hook(layer: int) -> None:
            last = layer == self.num_layers - 1
            for job, req, start, end in items:
                rid = job.request_id
                arrived = False  # the destination came during this forward
                if rid not in slots:
                    slots[rid] = slots_for(req.block_table, self.block_size, start, end)
                    ready[rid], next_layer[rid] = self._resolve(job), 0
                    if ready[rid]:
                        self._push_unsent(job)
                elif not ready[rid]:
                    ready[rid] = arrived = self._resolve(job)
                    if arrived:
                        self._push_unsent(job)  # caught up below, from layer 0, in one push
                if not ready[rid]:
                    if last:  # the forward ends without a destination: send it all later
                        self._unsent.setdefault(rid, []).append((start, slots[rid]))
                    continue
                if not arrived and (layer + 1) % self.layers_per_chunk and not last:
                    continue
                self._push(job, next_layer[rid], layer + 1, start, slots[rid])
                next_layer[rid] = layer + 1
                if last and rid in completes:
                    self.sender.seal(job)  # everything is pushed: summarise it

        return hook

    # ---- completion ----

    def send_first_token(self, req: Request, token_id: int, logprob: TokenLogprob | None) -> bool:
        """Report the prompt done with its first token. False if the job has no destination yet:
        it is parked, and the caller must hold its blocks until flush_parked or drop."""
        job = req.kv_job
        assert job is not None
        mark(job.trace, "prefill.sampled")
        if self.on_first_token is not None:
            self.on_first_token(req, token_id, logprob)
        if not self._resolve(job):
            self.parked[req.request_id] = _Parked(req, token_id, logprob)
            return False
        self._send_done(req, token_id, logprob)
        return True

    def after_launch(self, scheduled: list[ScheduledRequest]) -> None:
        """Engine thread, once a step's forward and sampling are queued and accounted, before its
        tokens are read: in "after" mode, queue the push of every prompt the step completes. The
        copy waits on the GPU for the sampling queued before it, so it never runs beside the
        forward, and the host's work for it overlaps the forward instead of following the token."""
        if self.push != "after":
            return
        for s in scheduled:
            req, job = s.request, s.request.kv_job
            if job is None or req.num_computed_tokens < req.num_prompt_tokens or not self._resolve(job):
                continue  # not its last chunk, or no destination yet (pushed by _send_done)
            self._push_prompt(req, job)
            self.sender.seal(job)  # its summary too, before the token is read

    def _push_prompt(self, req: Request, job: PrefillJob) -> None:
        """Every position of the prompt, all layers, one push (once)."""
        if job.request_id in self._prompt_pushed:
            return
        self._prompt_pushed.add(job.request_id)
        self._push(
            job, 0, self.num_layers, 0, slots_for(req.block_table, self.block_size, 0, req.num_prompt_tokens)
        )

    def _send_done(self, req: Request, token_id: int, logprob: TokenLogprob | None) -> None:
        job = req.kv_job
        assert job is not None
        if self.push == "after":
            self._push_prompt(req, job)  # a destination that came after the step was queued
            self._prompt_pushed.discard(job.request_id)
        self._push_unsent(job)  # a destination that came after the last layer's hook
        nbytes = self.bytes_sent.pop(req.request_id, 0)
        wire = None if logprob is None else logprob_to_wire(logprob)
        done = PrefillDone(req.request_id, token_id, wire, req.num_prompt_tokens, nbytes, trace=job.trace)
        self.sender.send_done(job, done)

    def send_failed(self, job: PrefillJob, error: str) -> None:
        """Tell the decode side the job failed; without a destination there is no one to tell."""
        self.drop(job.request_id)
        if job.has_destination:
            self.sender.send_failed(job, error)
