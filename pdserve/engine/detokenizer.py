"""Token ids → streamed text, one request at a time, with stop strings.

Decoding is incremental: each new token is decoded together with a small window of the tokens
before it (the "prefix offset / read offset" technique) and only the text past the window's old
end is new. The window is what makes context-dependent tokens come out right: SentencePiece drops
the leading space of the first token it decodes, and byte-level or byte-fallback tokens only form
a character together with their neighbours.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pdserve.sampling_params import SamplingParams

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerBase

# What a tokenizer decodes an incomplete (or invalid) UTF-8 sequence to.
REPLACEMENT_CHAR = "\ufffd"
# Prompt tokens decoded ahead of the first output token, so it gets its context-dependent text.
_NUM_PROMPT_CONTEXT_TOKENS = 4


def fast_backend(tokenizer: PreTrainedTokenizerBase) -> Tokenizer | None:
    """The Rust `tokenizers` object behind a stock fast tokenizer, or None if its decode may do more.

    `tokenizer.decode(ids, skip_special_tokens=s, clean_up_tokenization_spaces=False)` on such a
    tokenizer is exactly `backend.decode(ids, skip_special_tokens=s)`, but its Python wrapper (input
    conversion, batching checks, keyword plumbing) costs several times the decode itself, twice per
    generated token. A subclass that overrides decode or _decode keeps the wrapper.
    """
    from transformers import PreTrainedTokenizerFast
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

    cls = type(tokenizer)
    if (
        isinstance(tokenizer, PreTrainedTokenizerFast)
        and cls.decode is PreTrainedTokenizerBase.decode
        and cls._decode is PreTrainedTokenizerFast._decode
    ):
        return tokenizer.backend_tokenizer
    return None


class IncrementalDetokenizer:
    """Text is built from three parts:

    - committed: decoded text of tokens the window has moved past; never changes again;
    - pending: text of the tokens still in the window's read part, not committed because it ends
      in U+FFFD (a character whose remaining bytes may come with the next token). Its U+FFFD tail
      can still change, the rest cannot;
    - after a stop string, the final (truncated) text, fixed.

    Deltas concatenate to `tokenizer.decode(output_ids, skip_special_tokens=...,
    clean_up_tokenization_spaces=False)`, cut at a stop string. The space clean-up heuristic is
    off because it rewrites text across token boundaries, which can't be streamed. One deliberate
    difference: where a tokenizer drops the leading space of the first token it decodes
    (SentencePiece), the output keeps it, since it continues the prompt's text.
    """

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, prompt_token_ids: list[int], params: SamplingParams
    ) -> None:
        self.tokenizer = tokenizer
        self._backend = fast_backend(tokenizer)
        self.skip_special_tokens = params.skip_special_tokens
        self.stop = list(params.stop)
        self.include_stop_str_in_output = params.include_stop_str_in_output
        self.min_tokens = params.min_tokens
        self._max_stop_len = max((len(s) for s in self.stop), default=0)

        context = list(prompt_token_ids[-_NUM_PROMPT_CONTEXT_TOKENS:])
        context_text = self._decode(context)
        if context_text.endswith(REPLACEMENT_CHAR):
            # The prompt ends mid-character: the output's first bytes would complete a character
            # that half belongs to the prompt. Decode the output on its own instead.
            context, context_text = [], ""
        self._ids = context  # window context + all output ids
        self._prefix_offset = 0  # start of the decode window in _ids
        self._read_offset = len(context)  # end of what is committed
        self._prefix_text = context_text  # decode(_ids[_prefix_offset:_read_offset])

        self._committed = ""
        self._pending = ""
        self._final: str | None = None  # set once a stop string is found
        self._searched = 0  # stable text up to here has been searched for stop strings
        self._num_output_tokens = 0
        self._emitted = 0  # characters already handed out by take_delta

    @property
    def output_text(self) -> str:
        """The output text so far; while not stopped it may end in U+FFFD (incomplete char)."""
        if self._final is not None:
            return self._final
        return self._committed + self._pending

    def update(self, new_token_ids: list[int]) -> str | None:
        """Append tokens; return the stop string if one now occurs in the output text (which is
        then cut before it, or after it with include_stop_str_in_output), else None.

        Like stop tokens, stop strings count only from the `min_tokens`-th output token on: a
        match that is complete before then is ignored and the text goes on.
        """
        if self._final is not None:
            raise RuntimeError("update() after a stop string ended the output")
        for token_id in new_token_ids:
            self._ids.append(token_id)
            self._num_output_tokens += 1
            self._decode_last()
            if self._num_output_tokens < self.min_tokens:
                self._searched = self._stable_len()  # text this early may not stop the output
        return self._find_stop() if self.stop else None

    def take_delta(self, finished: bool) -> str:
        """Text not yet handed out. Until finished, an incomplete character at the end and the
        longest tail that starts a stop string are held back."""
        if self._final is not None:
            delta = self._final[self._emitted :]
            self._emitted = max(self._emitted, len(self._final))
            return delta
        committed = len(self._committed)
        if finished:
            end = committed + len(self._pending)
        else:
            end = self._stable_len()
            if self.stop:
                end -= self._stop_prefix_len(self._stable_tail(max(0, end - self._max_stop_len)))
        # Sliced from the parts: joining the whole text for every token grows with its length.
        start = self._emitted
        if end <= start:
            delta = ""
        elif start >= committed:
            delta = self._pending[start - committed : end - committed]
        else:
            delta = self._committed[start:end] + self._pending[: max(end - committed, 0)]
        self._emitted = max(start, end)
        return delta

    def _decode(self, token_ids: list[int]) -> str:
        if self._backend is not None:
            return self._backend.decode(token_ids, skip_special_tokens=self.skip_special_tokens)
        text = self.tokenizer.decode(
            token_ids, skip_special_tokens=self.skip_special_tokens, clean_up_tokenization_spaces=False
        )
        assert isinstance(text, str)  # a list only comes back for batched input
        return text

    def _decode_last(self) -> None:
        """Decode the window with the newest token; commit and slide the window if the text grew
        and ends on a whole character."""
        window_text = self._decode(self._ids[self._prefix_offset :])
        new_text = window_text[len(self._prefix_text) :]
        if len(window_text) > len(self._prefix_text) and not window_text.endswith(REPLACEMENT_CHAR):
            self._committed += new_text
            self._pending = ""
            self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
            self._prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        else:
            # Nothing new (a skipped special token) or a character still waiting for its bytes.
            self._pending = new_text

    def _stable_len(self) -> int:
        """Length of the text that later tokens cannot change: all but the U+FFFD tail."""
        return len(self._committed) + len(self._pending.rstrip(REPLACEMENT_CHAR))

    def _stable_tail(self, start: int) -> str:
        """Stable text from character `start` on, without building the whole text."""
        stable_pending = self._pending.rstrip(REPLACEMENT_CHAR)
        if start >= len(self._committed):
            return stable_pending[start - len(self._committed) :]
        return self._committed[start:] + stable_pending

    def _find_stop(self) -> str | None:
        """Search only where a new match can be: it must end in text that became stable since
        the last search, so it starts at most max_stop_len - 1 characters before that."""
        start = max(0, self._searched - self._max_stop_len + 1)
        tail = self._stable_tail(start)
        self._searched = start + len(tail)
        found = [(i, s) for s in self.stop if (i := tail.find(s)) >= 0]
        if not found:
            return None
        # The stop string that completes first wins, as if the text had arrived one character at
        # a time; among those ending together, the one starting first.
        index, stop = min(found, key=lambda m: (m[0] + len(m[1]), m[0]))
        end = start + index + (len(stop) if self.include_stop_str_in_output else 0)
        self._final = (self._committed + self._pending)[:end]
        return stop

    def _stop_prefix_len(self, tail: str) -> int:
        """Length of the longest end of `tail` that is a proper prefix of some stop string."""
        best = 0
        for stop in self.stop:
            for length in range(min(len(stop) - 1, len(tail)), best, -1):
                if tail.endswith(stop[:length]):
                    best = length
                    break
        return best
