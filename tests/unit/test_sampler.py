from __future__ import annotations

import pytest
import torch

from pdserve.engine.sampler import Sampler, make_generator
from pdserve.sampling_params import SamplingParams

CPU = torch.device("cpu")
# Chi-square critical value for 4 degrees of freedom at p = 1e-6: a correct sampler fails the
# frequency tests about once in a million runs; a wrong distribution scores in the thousands.
CHI2_4DOF_P1E6 = 33.4


def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def _counts(token_ids: list[int], vocab_size: int) -> torch.Tensor:
    return torch.bincount(torch.tensor(token_ids), minlength=vocab_size).double()


def _sample_many(logits_row: torch.Tensor, params: SamplingParams, num_samples: int) -> list[int]:
    """Sample the same row `num_samples` times in one batch (torch's default RNG)."""
    logits = logits_row.expand(num_samples, -1).contiguous()
    return Sampler()(logits, [params] * num_samples, [None] * num_samples).token_ids


@pytest.fixture(autouse=True)
def _seed_default_rng() -> None:
    torch.manual_seed(0)


def test_greedy_is_argmax() -> None:
    logits = torch.randn(6, 50)
    out = Sampler()(logits, [SamplingParams(temperature=0.0)] * 6, [None] * 6)
    assert out.token_ids == logits.argmax(dim=-1).tolist()
    assert out.logprobs == [None] * 6


def test_greedy_tie_takes_lowest_id() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0, 3.0]])
    assert Sampler()(logits, [SamplingParams(temperature=0.0)], [None]).token_ids == [1]


@pytest.mark.parametrize("temperature", [0.3, 1.0, 5.0])
def test_top_k_one_is_greedy(temperature: float) -> None:
    logits = torch.randn(8, 100)
    params = [SamplingParams(temperature=temperature, top_k=1)] * 8
    generators = [make_generator(i, CPU) if i % 2 else None for i in range(8)]
    assert Sampler()(logits, params, generators).token_ids == logits.argmax(dim=-1).tolist()


def test_tiny_top_p_is_greedy() -> None:
    logits = torch.randn(8, 100)
    params = [SamplingParams(temperature=2.0, top_p=1e-6)] * 8
    assert Sampler()(logits, params, [None] * 8).token_ids == logits.argmax(dim=-1).tolist()


def test_temperature_sampling_follows_softmax() -> None:
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    temperature = 0.7
    counts = _counts(_sample_many(logits, SamplingParams(temperature=temperature), 20_000), 5)
    assert _chi_square(counts, (logits / temperature).softmax(-1).double()) < CHI2_4DOF_P1E6
    # The test can tell temperatures apart: the same counts against T = 1 fail badly.
    assert _chi_square(counts, logits.softmax(-1).double()) > 10 * CHI2_4DOF_P1E6


def test_seeded_rows_follow_softmax() -> None:
    # The per-row generator path draws its noise row by row; it must sample the same distribution.
    logits = torch.tensor([1.0, 0.0, 0.0, -0.5, -2.0])
    num = 5_000
    generators = [make_generator(seed, CPU) for seed in range(num)]
    out = Sampler()(logits.expand(num, -1).contiguous(), [SamplingParams(seed=0)] * num, generators)
    assert _chi_square(_counts(out.token_ids, 5), logits.softmax(-1).double()) < CHI2_4DOF_P1E6


def test_top_k_renormalises_over_the_k_best() -> None:
    logits = torch.tensor([0.0, 2.0, -1.0, 1.0, 1.5, -3.0])
    counts = _counts(_sample_many(logits, SamplingParams(temperature=1.0, top_k=3), 20_000), 6)
    assert counts[[0, 2, 5]].sum() == 0
    kept = torch.tensor([1, 3, 4])
    assert _chi_square(counts[kept], logits[kept].softmax(-1).double()) < CHI2_4DOF_P1E6


def test_top_p_keeps_smallest_nucleus() -> None:
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    logits = probs.log()
    # Sorted: 0.5, 0.3 (cumulative 0.8 >= 0.7: stop), so ids 1 and 3 survive, renormalised.
    counts = _counts(_sample_many(logits, SamplingParams(top_p=0.7), 20_000), 4)
    assert counts[[0, 2]].sum() == 0
    assert _chi_square(counts[[1, 3]], torch.tensor([0.625, 0.375], dtype=torch.float64)) < CHI2_4DOF_P1E6


def test_top_p_applies_after_top_k() -> None:
    # top_k=2 leaves {1: 0.5, 3: 0.3} → renormalised {0.625, 0.375}; top_p=0.6 then keeps only id 1.
    logits = torch.tensor([0.05, 0.5, 0.15, 0.3]).log()
    tokens = _sample_many(logits, SamplingParams(top_k=2, top_p=0.6), 2_000)
    assert set(tokens) == {1}


def test_seeded_row_reproducible_across_batches() -> None:
    vocab = 1000
    steps = [torch.randn(vocab) for _ in range(6)]
    mine = SamplingParams(temperature=1.2, top_k=50, top_p=0.9, seed=1234)

    def run(batch_size: int, position: int) -> list[int]:
        generator = make_generator(1234, CPU)
        others = [make_generator(7 + i, CPU) if i % 2 else None for i in range(batch_size)]
        other_params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.8, seed=7)]
        tokens = []
        for step in steps:
            logits = torch.randn(batch_size, vocab)
            logits[position] = step
            params = [other_params[i % 2] for i in range(batch_size)]
            params[position] = mine
            generators = list(others)
            generators[position] = generator
            tokens.append(Sampler()(logits, params, generators).token_ids[position])
        return tokens

    alone = run(1, 0)
    assert run(5, 3) == alone
    assert run(8, 0) == alone
    assert len(set(alone)) > 1  # really sampling, not stuck on one token


def test_different_seeds_differ() -> None:
    logits = torch.zeros(1, 1000)

    def run(seed: int) -> list[int]:
        generator = make_generator(seed, CPU)
        return [Sampler()(logits, [SamplingParams(seed=seed)], [generator]).token_ids[0] for _ in range(5)]

    assert run(1) == run(1)
    assert run(1) != run(2)


def test_make_generator() -> None:
    assert make_generator(None, CPU) is None
    a, b = make_generator(5, CPU), make_generator(5, CPU)
    assert a is not None and b is not None
    assert torch.equal(torch.rand(4, generator=a), torch.rand(4, generator=b))


def test_suppressed_ids_never_sampled() -> None:
    vocab, num = 8, 4_000
    logits = torch.zeros(num, vocab)
    logits[:, 3] = 5.0  # the favourite, suppressed below
    suppress = [[3, 5, 6]] * num
    params = [SamplingParams(temperature=3.0)] * num
    tokens = Sampler()(logits, params, [None] * num, suppress).token_ids
    assert not {3, 5, 6} & set(tokens)
    assert set(tokens) == {0, 1, 2, 4, 7}
    assert logits[0, 3] == 5.0  # the caller's logits are untouched


def test_suppression_is_per_row_and_applies_to_greedy() -> None:
    logits = torch.tensor([[0.0, 3.0, 2.0, 1.0], [0.0, 3.0, 2.0, 1.0]])
    greedy = SamplingParams(temperature=0.0)
    out = Sampler()(logits, [greedy, greedy], [None, None], [[1], []])
    assert out.token_ids == [2, 1]


def test_logprobs_are_raw_log_softmax() -> None:
    logits = torch.randn(4, 30)
    params = [
        SamplingParams(temperature=2.0, top_k=5, logprobs=3),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.0, logprobs=0),
        SamplingParams(temperature=0.5, top_p=0.5, logprobs=20, seed=3),
    ]
    generators = [None, None, None, make_generator(3, CPU)]
    out = Sampler()(logits, params, generators, [[0], [], [int(logits[2].argmax())], []])
    expected = logits.double().log_softmax(-1)

    assert out.logprobs[1] is None
    for row, k in [(0, 3), (2, 0), (3, 20)]:
        lp = out.logprobs[row]
        assert lp is not None
        assert lp.token_id == out.token_ids[row]
        # The model's distribution: no temperature, filtering or suppression in these numbers.
        assert lp.logprob == pytest.approx(float(expected[row, lp.token_id]), abs=1e-5)
        assert len(lp.top) == k
        top_ids = expected[row].argsort(descending=True)[:k].tolist()
        assert [t for t, _ in lp.top] == top_ids
        for token_id, value in lp.top:
            assert value == pytest.approx(float(expected[row, token_id]), abs=1e-5)
        values = [v for _, v in lp.top]
        assert values == sorted(values, reverse=True)


def test_batch_size_mismatch_is_rejected() -> None:
    with pytest.raises(ValueError, match="logit rows"):
        Sampler()(torch.zeros(2, 4), [SamplingParams()], [None, None])
    with pytest.raises(ValueError, match="suppress"):
        Sampler()(torch.zeros(2, 4), [SamplingParams()] * 2, [None, None], [[1]])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"logprobs": 21}, "logprobs"),
        ({"logprobs": -1}, "logprobs"),
        ({"n": 0}, "n must"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"min_tokens": 5, "max_tokens": 4}, "min_tokens"),
        ({"stop": [""]}, "stop"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ],
)
def test_sampling_params_validation(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)  # type: ignore[arg-type]


def test_top_k_minus_one_means_disabled() -> None:
    assert SamplingParams(top_k=-1).top_k == 0


def test_gpu_wait_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    from pdserve import envs

    monkeypatch.delenv("PDSERVE_GPU_WAIT", raising=False)
    assert envs.gpu_wait() == "spin"
    monkeypatch.setenv("PDSERVE_GPU_WAIT", "Block")
    assert envs.gpu_wait() == "block"
    monkeypatch.setenv("PDSERVE_GPU_WAIT", "poll")
    with pytest.raises(ValueError, match=r"spin\|block"):
        envs.gpu_wait()
