"""Per-request SLO checks: TTFT, mean TPOT, and the optional longest stall between chunks."""

from __future__ import annotations

from pdserve.bench.client import RequestResult
from pdserve.bench.report import SLO, longest_gap, summarize


def result(chunk_times: list[float], tokens: int) -> RequestResult:
    return RequestResult(
        index=0, prompt_len=10, output_len=tokens, start=0.0, ttft_s=chunk_times[0],
        chunk_times=chunk_times, e2e_s=chunk_times[-1], output_tokens=tokens,
    )  # fmt: skip


def test_a_stall_fails_the_gap_target_but_not_the_mean_tpot() -> None:
    smooth = result([0.1 + 0.02 * i for i in range(11)], 11)  # 20 ms per token
    stalled = result([0.1, 0.12, 0.14, 0.39, 0.41, 0.43, 0.45, 0.47, 0.49, 0.51, 0.53], 11)
    assert abs(longest_gap(stalled) - 0.25) < 1e-9 and abs(longest_gap(smooth) - 0.02) < 1e-9
    assert stalled.tpot_s is not None and stalled.tpot_s < 0.05  # the mean hides the stall
    loose, strict = SLO(1.0, 0.05), SLO(1.0, 0.05, max_gap_s=0.1)
    assert loose.met(smooth) and loose.met(stalled)
    assert strict.met(smooth) and not strict.met(stalled)
    assert summarize([smooth, stalled], strict)["slo_attainment"] == 0.5


def test_one_chunk_has_no_gap() -> None:
    assert longest_gap(result([0.2], 1)) == 0.0
    assert SLO(1.0, 0.05, max_gap_s=0.0).met(result([0.2], 1))
