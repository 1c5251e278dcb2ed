"""Per-request state inside the engine: tokens, status, block table, computed/cached counts."""

from __future__ import annotations

import enum
import time
from typing import TYPE_CHECKING

import torch

from pdserve.outputs import TokenLogprob
from pdserve.sampling_params import SamplingParams

if TYPE_CHECKING:
    from pdserve.protocol import PrefillJob


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    # Blocks reserved on a decode worker while another worker prefills the prompt into them.
    WAITING_FOR_KV = "waiting_for_kv"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"

    @property
    def finished(self) -> bool:
        return self in _FINISHED


_FINISHED = {
    RequestStatus.FINISHED_STOPPED,
    RequestStatus.FINISHED_LENGTH,
    RequestStatus.FINISHED_ABORTED,
    RequestStatus.FINISHED_ERROR,
}


class Request:
    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        max_tokens: int,
        generator: torch.Generator | None = None,
    ) -> None:
        if not prompt_token_ids:
            raise ValueError(f"[{request_id}] empty prompt")
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        # Read several times per token per step: a plain int, not len() behind a property.
        self._num_prompt_tokens = len(self.prompt_token_ids)
        self.params = params
        self.max_tokens = max_tokens  # resolved: never None, fits the context
        self.generator = generator
        self.arrival_time = time.monotonic()
        self.status = RequestStatus.WAITING
        self.all_token_ids: list[int] = list(prompt_token_ids)
        self.output_logprobs: list[TokenLogprob] = []
        # Tokens whose KV is in this request's blocks (prefix-cache hits included).
        self.num_computed_tokens = 0
        # Prompt tokens served from the prefix cache at first schedule (for usage reporting).
        self.num_cached_tokens = 0
        self.block_table: list[int] = []
        # Hash of each full block in block_table, in order (the prefix-cache chain).
        self.block_hashes: list[int] = []
        # The hash chain of the request's full blocks of tokens, as far as computed: a function of
        # the tokens alone (which only grow), kept across preemption, so each block is hashed once
        # (prefix lookup at admission, naming the blocks once filled).
        self.hash_chain: list[int] = []
        self.num_preemptions = 0
        self.stop_reason: str | int | None = None
        # Prefill side of a remote prefill: where this request's KV goes.
        self.kv_job: PrefillJob | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return self._num_prompt_tokens

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.all_token_ids[self._num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.all_token_ids) - self._num_prompt_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.all_token_ids) - self.num_computed_tokens

    def append_token(self, token_id: int, logprob: TokenLogprob | None) -> None:
        self.all_token_ids.append(token_id)
        if logprob is not None:
            self.output_logprobs.append(logprob)

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id}, {self.status.value}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens}, blocks={len(self.block_table)})"
        )
