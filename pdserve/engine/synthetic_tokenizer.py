"""A tokenizer for `dummy:<shape>` models: one word per token id (`t0`, `t1`, ...).

Random weights have no tokenizer of their own, yet the whole serving path (the router's prompt
checks, streaming text, stop strings, chat) needs one, and benchmarks count streamed tokens by
their text. Every id decodes to a non-empty word, so each generated token is visible to a client;
words join with spaces, so the text of a sequence is the join of its tokens' texts. Text that is
not a `t<N>` word maps to the unknown id 0. Built in memory (no download); ~1 s for 128k ids.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

# Every message as "role content" words, then the assistant's turn.
_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}assistant {% endif %}"
)


def word(token_id: int) -> str:
    return f"t{token_id}"


def synthetic_tokenizer(
    vocab_size: int, bos_token_id: int | None, eos_token_ids: tuple[int, ...]
) -> PreTrainedTokenizerBase:
    if vocab_size < 2:
        raise ValueError(f"vocab_size must be >= 2, got {vocab_size}")
    vocab = {word(i): i for i in range(vocab_size)}
    core = Tokenizer(models.WordLevel(vocab, unk_token=word(0)))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # Joins tokens with spaces; a lone token decodes to its word.
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    special = {"unk_token": word(0)}
    if bos_token_id is not None and 0 <= bos_token_id < vocab_size:
        special["bos_token"] = word(bos_token_id)
    eos = [e for e in eos_token_ids if 0 <= e < vocab_size]
    if eos:
        special["eos_token"] = word(eos[0])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, chat_template=_CHAT_TEMPLATE, **special)
    # BOS is not prepended: a prompt of ids is sent as ids, and text prompts stay exactly their words.
    return tokenizer
