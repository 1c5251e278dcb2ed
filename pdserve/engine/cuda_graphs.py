"""CUDA graphs for decode steps: the model forward and the logits of a decode-only batch, captured
once per padded batch size and replayed, so a step costs a few input copies and one graph launch
instead of hundreds of kernel launches from Python.

Inputs live in static device buffers; a step writes its rows into pinned host buffers and copies
them over without waiting. Two sets of host buffers alternate: with decode steps launched ahead
(decode_pipeline.py) the host fills the next step's inputs while the previous copy may still be
queued behind the step before it. Padding rows get slot -1 (the store kernel skips them) and context
length 0 (attention writes zeros), so they neither touch the cache nor make NaNs.
"""

from __future__ import annotations

import logging
import time

import torch

from pdserve.engine.attention.base import AttentionBackend, AttentionMetadata, ForwardContext
from pdserve.engine.model import CausalLM
from pdserve.engine.scheduler import ScheduledRequest

logger = logging.getLogger(__name__)


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, 16, then every 16 up to max_num_seqs (always included)."""
    sizes = [s for s in (1, 2, 4, 8) if s < max_num_seqs]
    sizes += list(range(16, max_num_seqs, 16))
    return [*sizes, max_num_seqs]


class DecodeGraphs:
    def __init__(
        self,
        model: CausalLM,
        backend: AttentionBackend,
        kv_caches: list[torch.Tensor],
        block_size: int,
        max_num_seqs: int,
        max_model_len: int,
        device: torch.device,
    ) -> None:
        self.model = model
        self.backend = backend
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = device
        self.sizes = graph_batch_sizes(max_num_seqs)
        max_bs = self.sizes[-1]
        max_blocks = (max_model_len + block_size - 1) // block_size

        def static(*shape: int) -> torch.Tensor:
            return torch.zeros(shape, dtype=torch.int64, device=device)

        # Rows: input ids, positions, slots, context lengths; each [max_bs].
        self.vectors = static(4, max_bs)
        self.block_tables = static(max_bs, max_blocks)  # [max_bs, max_blocks]
        self._host = [_HostInputs(max_bs, max_blocks) for _ in range(2)]
        self._turn = 0
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}  # [bs, vocab] fp32 outputs of each graph

    @property
    def max_batch_size(self) -> int:
        return self.sizes[-1]

    def fits(self, scheduled: list[ScheduledRequest]) -> bool:
        """Decode-only batches that sample every row and fit the largest graph."""
        return len(scheduled) <= self.max_batch_size and all(
            s.num_new_tokens == 1 and s.samples for s in scheduled
        )

    def _forward(self, bs: int) -> torch.Tensor:
        vec = self.vectors[:, :bs]
        meta = AttentionMetadata(
            slot_mapping=vec[2],
            query_start_loc=list(range(bs + 1)),
            seq_lens=[1] * bs,  # host lengths are not used by a decode step of the triton backend
            block_tables=self.block_tables[:bs],
            seq_lens_tensor=vec[3],
        )
        ctx = ForwardContext(self.backend, meta, self.kv_caches)
        hidden = self.model(vec[0], vec[1], ctx)  # [bs, hidden]
        return self.model.compute_logits(hidden)  # [bs, vocab]

    @torch.inference_mode()
    def capture(self) -> None:
        t0 = time.monotonic()
        self.vectors.zero_()
        self.vectors[2].fill_(-1)  # warm-up and capture write nothing into the cache
        pool = None
        # Largest first: the smaller graphs then fit in the memory pool the largest one made.
        for bs in reversed(self.sizes):
            self._forward(bs)  # compile kernels and create library handles outside the capture
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.logits[bs] = self._forward(bs)
            pool = graph.pool()
            self.graphs[bs] = graph
        torch.cuda.synchronize(self.device)
        logger.info(
            "captured decode CUDA graphs for batch sizes %s in %.1f s", self.sizes, time.monotonic() - t0
        )

    def run(self, scheduled: list[ScheduledRequest], input_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Replay the smallest graph that holds the batch; returns its logits [len(scheduled), vocab].
        input_ids [len(scheduled)]: the rows' input tokens when only the device has them."""
        n = len(scheduled)
        bs = next(s for s in self.sizes if s >= n)
        host = self._host[self._turn]
        self._turn ^= 1
        vec, tables, rows, block_size = host.np_vectors, host.np_tables, host.rows, self.block_size
        vec[:, n:bs] = 0
        vec[2, n:bs] = -1
        for i, s in enumerate(scheduled):
            req = s.request
            pos = req.num_computed_tokens
            table = req.block_table
            if input_ids is None:
                vec[0, i] = req.all_token_ids[pos]
            vec[1, i] = pos
            vec[2, i] = table[pos // block_size] * block_size + pos % block_size
            vec[3, i] = pos + 1
            row = rows[i]
            written = row[1] if row is not None and row[0] is table else 0
            if written < len(table):
                tables[i, written : len(table)] = table[written:]
                rows[i] = (table, len(table))
        # Whole rows (contiguous copies). Columns past a row's own blocks hold stale ids that are
        # never read: attention stops at the row's context length.
        self.vectors.copy_(host.vectors, non_blocking=True)
        self.block_tables[:bs].copy_(host.tables[:bs], non_blocking=True)
        if input_ids is not None:
            self.vectors[0, :n].copy_(input_ids)  # after the host copy on the same stream
        self.graphs[bs].replay()
        return self.logits[bs][:n]


class _HostInputs:
    """Pinned host copies of the graphs' input buffers, and what their table rows hold."""

    def __init__(self, max_bs: int, max_blocks: int) -> None:
        self.vectors = torch.zeros((4, max_bs), dtype=torch.int64, pin_memory=True)
        self.tables = torch.zeros((max_bs, max_blocks), dtype=torch.int64, pin_memory=True)
        self.np_vectors = self.vectors.numpy()
        self.np_tables = self.tables.numpy()
        # What each table row holds: (the request's block-table list, entries written). A list
        # only grows while it lives (freeing a request gives it a new one), so only new entries
        # need writing; holding the list keeps its identity from being reused.
        self.rows: list[tuple[list[int], int] | None] = [None] * max_bs
