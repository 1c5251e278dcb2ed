"""A remote prefill the router starts as it routes the request, before the decode worker has
reserved blocks (router/early_prefill.py), when the destination comes only after the prefill
worker has finished the prompt: the KV and first token wait on the prefill worker, then go out,
and the output is transformers' greedy output. A destination later than the deadline finds nothing
held: the decode worker prefills the prompt itself, and every block is freed on both sides."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from transformers import PreTrainedModel

from pdserve.engine.loader import LoadedModel
from tests.e2e.deploy import Deployment, deployment, metric
from tests.e2e.test_disagg import (
    FLAGS,
    KV_BYTES_PER_TOKEN,
    complete,
    expected,
    long_prompt,
)

pytestmark = pytest.mark.slow
DELAY_S = 2.5  # far longer than the prompt's prefill on CPU (~0.4 s for its 170 tokens)


@contextlib.contextmanager
def delayed_destinations(tmp_path: Path, delay_s: float, *flags: str) -> Iterator[Deployment]:
    """A 1P1D deployment whose router holds every destination `delay_s` (fault injection)."""
    os.environ["PDSERVE_FAULT_DESTINATION_DELAY_S"] = str(delay_s)
    try:
        with deployment(
            tmp_path, "--prefill", "1", "--decode", "1", "--transport", "tcp", *FLAGS, *flags
        ) as dep:
            os.environ.pop("PDSERVE_FAULT_DESTINATION_DELAY_S")  # the processes have their copy
            yield dep
    finally:
        os.environ.pop("PDSERVE_FAULT_DESTINATION_DELAY_S", None)


@pytest.fixture
def late_dep(tmp_path: Path) -> Iterator[Deployment]:
    with delayed_destinations(tmp_path, DELAY_S) as dep:
        yield dep


def test_first_token_waits_for_a_late_destination(
    late_dep: Deployment, smollm2: LoadedModel, smollm2_hf: PreTrainedModel
) -> None:
    prompt = long_prompt(smollm2.tokenizer, "bridges", words=16)
    m0 = late_dep.metrics()
    text = complete(late_dep, prompt)
    m1 = late_dep.metrics()
    assert text == expected(smollm2_hf, smollm2, prompt)
    moved = metric(m1, "pdserve_kv_transfer_bytes_total") - metric(m0, "pdserve_kv_transfer_bytes_total")
    assert moved == len(prompt) * KV_BYTES_PER_TOKEN
    assert "destination came after the prefill" in late_dep.logs()
    assert set(late_dep.wait_idle()) == {"prefill-0", "decode-0"}


@pytest.fixture
def too_late_dep(tmp_path: Path) -> Iterator[Deployment]:
    with delayed_destinations(tmp_path, 3.0, "--kv-timeout-s", "1.5") as dep:
        yield dep


def test_a_destination_after_the_deadline_falls_back_and_frees_both_sides(
    too_late_dep: Deployment, smollm2: LoadedModel, smollm2_hf: PreTrainedModel
) -> None:
    prompt = long_prompt(smollm2.tokenizer, "markets", words=16)
    m0 = too_late_dep.metrics()
    text = complete(too_late_dep, prompt)
    m1 = too_late_dep.metrics()
    # The decode worker gave up at its deadline and prefilled the prompt itself; the prefill worker
    # released what it held at the same deadline, and the destination that came later found nothing.
    assert text == expected(smollm2_hf, smollm2, prompt)
    assert metric(m1, "pdserve_kv_transfer_bytes_total") == metric(m0, "pdserve_kv_transfer_bytes_total")
    assert "KV and first token held" in too_late_dep.logs()
    assert set(too_late_dep.wait_idle()) == {"prefill-0", "decode-0"}
