"""Turns a scheduled batch into tensors, runs the model and samples next tokens. On a GPU with the
triton backend, decode-only steps replay captured CUDA graphs (see cuda_graphs.py)."""

from __future__ import annotations

from array import array
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from pdserve.engine.attention.base import AttentionBackend, AttentionMetadata, ForwardContext
from pdserve.engine.model import CausalLM, ModelArch
from pdserve.engine.sampler import PendingSamples, Sampler, SamplerOutput, to_device
from pdserve.engine.scheduler import ScheduledRequest

if TYPE_CHECKING:
    from pdserve.engine.cuda_graphs import DecodeGraphs


@dataclass
class ModelInputs:
    input_ids: torch.Tensor  # [num_tokens]
    positions: torch.Tensor  # [num_tokens]
    meta: AttentionMetadata
    logits_indices: torch.Tensor  # [num_sampled] row of each sampling request's last token
    sampled: list[ScheduledRequest]  # the requests that get a new token this step, in row order


@dataclass
class DeviceFeed:
    """Input ids of a decode step that follows one whose samples are still on the device: row i
    of the new step reads `token_ids[rows[i]]` of the previous one."""

    token_ids: torch.Tensor  # [num_prev_rows] int64, the previous step's samples
    rows: list[int]

    def input_ids(self) -> torch.Tensor:  # [len(rows)]
        if self.rows == list(range(len(self.token_ids))):
            return self.token_ids
        index = to_device(self.rows, torch.int64, self.token_ids.device)  # queued, not waited for
        return self.token_ids.index_select(0, index)


def allocate_kv_caches(
    arch: ModelArch, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device
) -> list[torch.Tensor]:
    """One [2, num_blocks, block_size, num_kv_heads, head_dim] tensor per layer. Layer-major, so a KV
    transfer can ship (and later overlap) one layer at a time."""
    shape = (2, num_blocks, block_size, arch.num_kv_heads, arch.head_dim)
    return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(arch.num_layers)]


def num_blocks_for_budget(arch: ModelArch, block_size: int, dtype: torch.dtype, budget_bytes: int) -> int:
    return max(budget_bytes // (arch.kv_bytes_per_token(dtype) * block_size), 2)


def int64_tensor(values: list[int], device: torch.device) -> torch.Tensor:
    """torch.tensor(values, dtype=torch.int64, device=device), ~4x faster: torch.tensor walks the
    list element by element, array() packs it in C and the tensor shares the array's memory."""
    if not values:
        return torch.empty(0, dtype=torch.int64, device=device)
    tensor = torch.frombuffer(array("q", values), dtype=torch.int64)
    return tensor if device.type == "cpu" else tensor.to(device)


def prepare_inputs(scheduled: list[ScheduledRequest], block_size: int, device: torch.device) -> ModelInputs:
    input_ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    query_start_loc = [0]
    seq_lens: list[int] = []
    logits_indices: list[int] = []
    sampled: list[ScheduledRequest] = []
    max_blocks = max(len(s.request.block_table) for s in scheduled)
    tables: list[int] = []  # [num_seqs * max_blocks], row-major and zero-padded
    num_tokens = 0
    for s in scheduled:
        req = s.request
        start, n = req.num_computed_tokens, s.num_new_tokens
        end = start + n
        table = req.block_table
        if n == 1:  # a decode token: the common case, without building ranges
            # A token still on the device (s.ahead) gets a placeholder: the runner feeds it.
            input_ids.append(req.all_token_ids[start] if not s.ahead else 0)
            positions.append(start)
            slots.append(table[start // block_size] * block_size + start % block_size)
        else:
            input_ids.extend(req.all_token_ids[start:end])
            pos = range(start, end)
            positions.extend(pos)
            slots.extend(table[p // block_size] * block_size + p % block_size for p in pos)
        num_tokens += n
        query_start_loc.append(num_tokens)
        seq_lens.append(end)
        if end == req.num_tokens + s.ahead:  # s.samples
            logits_indices.append(num_tokens - 1)
            sampled.append(s)
        tables += table
        if len(table) < max_blocks:
            tables += [0] * (max_blocks - len(table))

    meta = AttentionMetadata(
        slot_mapping=int64_tensor(slots, device),
        query_start_loc=query_start_loc,
        seq_lens=seq_lens,
        block_tables=int64_tensor(tables, device).view(len(scheduled), max_blocks),
        seq_lens_tensor=int64_tensor(seq_lens, device),
    )
    return ModelInputs(
        int64_tensor(input_ids, device),
        int64_tensor(positions, device),
        meta,
        int64_tensor(logits_indices, device),
        sampled,
    )


class ModelRunner:
    def __init__(
        self,
        model: CausalLM,
        arch: ModelArch,
        backend: AttentionBackend,
        kv_caches: list[torch.Tensor],
        block_size: int,
        device: torch.device,
        eos_token_ids: tuple[int, ...] = (),
    ) -> None:
        self.model = model
        self.arch = arch
        self.backend = backend
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = device
        self.eos_token_ids = eos_token_ids
        self.sampler = Sampler()
        self.graphs: DecodeGraphs | None = None
        self.last_step_graph = False  # whether the last execute() replayed a CUDA graph

    def capture_cuda_graphs(self, max_num_seqs: int, max_model_len: int) -> None:
        from pdserve.engine.cuda_graphs import DecodeGraphs

        self.graphs = DecodeGraphs(
            self.model,
            self.backend,
            self.kv_caches,
            self.block_size,
            max_num_seqs,
            max_model_len,
            self.device,
        )
        self.graphs.capture()

    @torch.inference_mode()
    def execute(
        self, scheduled: list[ScheduledRequest], layer_hook: Callable[[int], None] | None = None
    ) -> tuple[list[ScheduledRequest], SamplerOutput | None]:
        """Run one step and wait for its samples. Returns the requests that sampled a token, with
        their samples."""
        sampled, pending = self.launch(scheduled, layer_hook)
        return sampled, pending.result() if pending is not None else None

    @torch.inference_mode()
    def launch(
        self,
        scheduled: list[ScheduledRequest],
        layer_hook: Callable[[int], None] | None = None,
        feed: DeviceFeed | None = None,
    ) -> tuple[list[ScheduledRequest], PendingSamples | None]:
        """Queue one step on the device without waiting for it (on a GPU). `feed` gives the input
        ids of `ahead` rows, which only the device knows yet."""
        input_ids = feed.input_ids() if feed is not None else None
        self.last_step_graph = self.graphs is not None and layer_hook is None and self.graphs.fits(scheduled)
        if self.last_step_graph:
            assert self.graphs is not None
            return scheduled, self._sample(self.graphs.run(scheduled, input_ids), scheduled)
        inputs = prepare_inputs(scheduled, self.block_size, self.device)
        if input_ids is not None:
            assert input_ids.shape == inputs.input_ids.shape, "a fed step holds decode rows only"
            inputs.input_ids = input_ids
        ctx = ForwardContext(self.backend, inputs.meta, self.kv_caches, layer_hook)
        hidden = self.model(inputs.input_ids, inputs.positions, ctx)  # [num_tokens, hidden]
        if not inputs.sampled:
            return [], None
        logits = self.model.compute_logits(hidden[inputs.logits_indices])  # [num_sampled, vocab]
        return inputs.sampled, self._sample(logits, inputs.sampled)

    def _sample(self, logits: torch.Tensor, sampled: list[ScheduledRequest]) -> PendingSamples:
        params = [s.request.params for s in sampled]
        generators = [s.request.generator for s in sampled]
        return self.sampler.launch(logits, params, generators, self._suppressed(sampled))

    def _suppressed(self, sampled: list[ScheduledRequest]) -> list[list[int]] | None:
        """Stop tokens are banned until a request has produced its min_tokens."""
        rows = []
        for s in sampled:
            req = s.request
            if req.num_output_tokens + s.ahead < req.params.min_tokens:
                eos = [] if req.params.ignore_eos else list(self.eos_token_ids)
                rows.append(eos + req.params.stop_token_ids)
            else:
                rows.append([])
        return rows if any(rows) else None
