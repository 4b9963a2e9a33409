"""Incremental detokenization and stop strings for one output sequence.

Runs in the user's process: the output processor feeds each step's new token ids to
`IncrementalDetokenizer.update`, then takes the text (or its delta) from `get_next_output_text`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

try:  # tokenizers >= 0.21.1
    from tokenizers import Tokenizer as BackendTokenizer
    from tokenizers.decoders import DecodeStream
except ImportError:  # pragma: no cover - older tokenizers: every tokenizer takes the offset path
    BackendTokenizer = DecodeStream = None

from ember.workers.mistral_tokenizer import is_mistral_tokenizer

if TYPE_CHECKING:
    from ember.workers.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

_REPLACEMENT_CHAR = "\ufffd"  # what a decoder emits for an incomplete UTF-8 sequence
# Prompt tokens that seed the decoding context (vLLM's values): the stream decoder takes the
# shortest suffix of 4..23 tokens that decodes cleanly; the offset decoder takes the last 7.
_MIN_STREAM_CONTEXT, _MAX_STREAM_CONTEXT = 4, 23
_INITIAL_INCOMPLETE_PREFIX_OFFSET = 5
_INVALID_PREFIX_ERR_MSG = "Invalid prefix encountered"
_MAX_DEAD_TOKENS = 1024  # the offset decoder drops tokens left of its window past this many


class IncrementalDetokenizer:
    """Turns one sequence's output token ids into text, a few tokens at a time, and finds stops.

    Each token costs O(1): only a window of the last few tokens is ever decoded, and a stop
    string is searched for in the new text plus the (longest stop - 1) characters before it::

        tokens   ... | t[prefix_offset] .. t[read_offset-1] | t[read_offset] .. (new)
                       \\__ decoded again as context __/      \\__ emitted as new text __/

    Multi-byte characters split across tokens are held back until complete (never a U+FFFD
    half), and the first output token is decoded after a few prompt tokens, so its leading
    space comes out as in a whole decode. With `tokenizer=None` (detokenize=False) only the
    token ids are kept.

    Stop strings (vLLM's rules): a match ends generation; the text is cut before the stop string
    or, with include_stop_str_in_output, after it. Matches are only looked for once more than
    min_tokens tokens exist, and only in text after the first min_tokens tokens. If one update
    completes several stop strings, the one that starts first wins (vLLM takes the first in list
    order), so the returned text never holds a stop string.
    """

    def __init__(
        self,
        tokenizer: Any | None,
        prompt_token_ids: Sequence[int],
        *,
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
        stop: Sequence[str] = (),
        include_stop_str_in_output: bool = False,
        min_tokens: int = 0,
    ) -> None:
        self.stop = list(stop)
        self.include_stop_str_in_output = include_stop_str_in_output
        self.min_tokens = min_tokens
        self.output_token_ids: list[int] = []
        self._max_stop_len = max((len(s) for s in self.stop), default=0)
        # Characters held back from streaming while a stop string could still begin in them.
        self.stop_buffer_length = (
            self._max_stop_len - 1 if self.stop and not include_stop_str_in_output else 0
        )
        # The text is kept as chunks, joined only when the whole of it is asked for.
        self._text_chunks: list[str] = []
        self._text_len = 0
        self._last_output_text_offset = 0
        self._decoder = (
            None
            if tokenizer is None
            else _make_token_decoder(
                tokenizer, prompt_token_ids, skip_special_tokens, spaces_between_special_tokens
            )
        )

    @classmethod
    def from_sampling_params(
        cls, tokenizer: Any | None, prompt_token_ids: Sequence[int], params: SamplingParams
    ) -> IncrementalDetokenizer:
        return cls(
            tokenizer if params.detokenize else None,
            prompt_token_ids,
            skip_special_tokens=params.skip_special_tokens,
            spaces_between_special_tokens=params.spaces_between_special_tokens,
            stop=params.stop or (),
            include_stop_str_in_output=params.include_stop_str_in_output,
            min_tokens=params.min_tokens,
        )

    @property
    def output_text(self) -> str:
        if len(self._text_chunks) > 1:
            self._text_chunks = ["".join(self._text_chunks)]
        return self._text_chunks[0] if self._text_chunks else ""

    def update(self, new_token_ids: Sequence[int], stop_terminated: bool = False) -> str | None:
        """Append new token ids and their text; return the stop string that matched, or None.

        stop_terminated: the engine ended the sequence on its last token (EOS or a stop token
        id); that token's text is then left out unless include_stop_str_in_output, and no stop
        string is looked for.
        """
        if not new_token_ids:
            return None
        skipped_stop_token_id = None
        if stop_terminated and not self.include_stop_str_in_output:
            skipped_stop_token_id = new_token_ids[-1]
            new_token_ids = new_token_ids[:-1]

        stop_check_offset = self._text_len
        for token_id in new_token_ids:
            self.output_token_ids.append(token_id)
            if self._decoder is not None:
                text = self._decoder.decode_next(token_id)
                if text:
                    self._text_chunks.append(text)
                    self._text_len += len(text)
            if self.min_tokens and len(self.output_token_ids) <= self.min_tokens:
                stop_check_offset = self._text_len
        if skipped_stop_token_id is not None:
            self.output_token_ids.append(skipped_stop_token_id)

        if stop_terminated or not self.stop or len(self.output_token_ids) <= self.min_tokens:
            return None
        return self._check_stop_strings(self._text_len - stop_check_offset)

    def get_next_output_text(self, finished: bool, delta: bool) -> str:
        """The text to report: all of it, or with delta only what is new since the last call.

        While not finished, the last `stop_buffer_length` characters are held back, as they
        may be the start of a stop string that will be cut off.
        """
        buffer_length = 0 if finished else self.stop_buffer_length
        length = max(self._text_len - buffer_length, 0)
        if not delta:
            return self.output_text[:length] if buffer_length else self.output_text
        last_offset = self._last_output_text_offset
        if last_offset >= length:
            return ""
        self._last_output_text_offset = length
        return self._tail(self._text_len - last_offset)[: length - last_offset]

    def _check_stop_strings(self, new_char_count: int) -> str | None:
        if new_char_count <= 0:
            return None
        tail = self._tail(new_char_count + self._max_stop_len - 1)
        match_index, match = -1, None
        for stop_str in self.stop:
            # Only matches that end inside the new text are new.
            start = max(len(tail) - new_char_count - len(stop_str) + 1, 0)
            index = tail.find(stop_str, start)
            if index != -1 and (match is None or index < match_index):
                match_index, match = index, stop_str
        if match is None:
            return None
        truncate_to = self._text_len - len(tail) + match_index
        if self.include_stop_str_in_output:
            truncate_to += len(match)
        if truncate_to < self._text_len:
            text = self.output_text[:truncate_to]
            self._text_chunks = [text] if text else []
            self._text_len = truncate_to
        return match

    def _tail(self, num_chars: int) -> str:
        """The last num_chars characters of the text, built from the last chunks only."""
        if num_chars <= 0:
            return ""
        pieces, count = [], 0
        for chunk in reversed(self._text_chunks):  # chunks are never empty
            pieces.append(chunk)
            count += len(chunk)
            if count >= num_chars:
                break
        return "".join(reversed(pieces))[-num_chars:]


def _make_token_decoder(
    tokenizer: Any,
    prompt_token_ids: Sequence[int],
    skip_special_tokens: bool,
    spaces_between_special_tokens: bool,
) -> _StreamDecoder | _OffsetDecoder:
    """The `tokenizers` DecodeStream for fast tokenizers (as vLLM v1), token offsets otherwise
    (over ids for mistral_common's tokenizers)."""
    if is_mistral_tokenizer(tokenizer):
        return _IdOffsetDecoder(tokenizer, prompt_token_ids, skip_special_tokens)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if DecodeStream is not None and isinstance(backend, BackendTokenizer):
        return _StreamDecoder(
            backend, prompt_token_ids, skip_special_tokens, spaces_between_special_tokens
        )
    return _OffsetDecoder(tokenizer, prompt_token_ids, skip_special_tokens)


class _StreamDecoder:
    """Decodes through `tokenizers.decoders.DecodeStream`, which keeps a window of recent ids.

    It gives exactly the text of the backend's `decode(ids, skip_special_tokens)`, which is what
    a Hugging Face fast tokenizer's `decode` returns (clean_up_tokenization_spaces aside).
    """

    def __init__(
        self,
        backend: Any,
        prompt_token_ids: Sequence[int],
        skip_special_tokens: bool,
        spaces_between_special_tokens: bool,
    ) -> None:
        self.backend = backend
        self.skip_special_tokens = skip_special_tokens
        self.stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        for token_id in self._prompt_context(prompt_token_ids):
            self._step(token_id)
        # Without spaces between special tokens, a special token right after another one is
        # emitted as its bare content (vLLM's rule; decoders that add no spaces are unchanged).
        self.added_token_contents: dict[int, str] | None = None
        self.last_was_added = False
        if not spaces_between_special_tokens:
            added = {i: t.content for i, t in backend.get_added_tokens_decoder().items()}
            self.added_token_contents = added or None

    def _prompt_context(self, prompt_token_ids: Sequence[int]) -> Sequence[int]:
        """The shortest prompt suffix of at least 4 tokens that decodes without U+FFFD."""
        num_prompt_tokens = len(prompt_token_ids)
        if num_prompt_tokens <= _MIN_STREAM_CONTEXT:
            return prompt_token_ids
        longest = min(num_prompt_tokens, _MAX_STREAM_CONTEXT)
        for length in range(_MIN_STREAM_CONTEXT, longest + 1):
            suffix = prompt_token_ids[-length:]
            if _REPLACEMENT_CHAR not in self.backend.decode(list(suffix)):
                return suffix
        return prompt_token_ids[-longest:]

    def decode_next(self, token_id: int) -> str:
        text = self._step(token_id)
        if self.added_token_contents is not None:
            content = self.added_token_contents.get(token_id)
            if content is not None and text and self.last_was_added:
                text = content
            self.last_was_added = content is not None
        return text or ""

    def _step(self, token_id: int) -> str | None:
        try:
            return self.stream.step(self.backend, token_id)
        except (OverflowError, TypeError):
            logger.exception("Skipping invalid token id %r in detokenization", token_id)
            return None
        except Exception as e:
            if not str(e).startswith(_INVALID_PREFIX_ERR_MSG):
                raise
            # A decoder whose output for a longer window does not extend its output for the
            # shorter one breaks DecodeStream's state (vLLM issue 17448): start a new stream.
            logger.warning("Invalid prefix in incremental detokenization, resetting the stream")
            self.stream = DecodeStream(skip_special_tokens=self.skip_special_tokens)
            return self.stream.step(self.backend, token_id)


class _OffsetDecoder:
    """vLLM's `detokenize_incrementally`, for tokenizers without a `tokenizers` backend.

    Converts each id to its token string once, and per step decodes the window
    tokens[prefix_offset:] and the context tokens[prefix_offset:read_offset]; the new text is
    the difference. The window moves on once it yields a complete character.
    """

    def __init__(
        self, tokenizer: Any, prompt_token_ids: Sequence[int], skip_special_tokens: bool
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.vocab_size = len(tokenizer)
        context = prompt_token_ids[-(_INITIAL_INCOMPLETE_PREFIX_OFFSET + 2) :]
        self.tokens = self._to_tokens(context)
        self.read_offset = len(self.tokens)
        self.prefix_offset = max(self.read_offset - _INITIAL_INCOMPLETE_PREFIX_OFFSET, 0)

    def _to_tokens(self, token_ids: Sequence[int]) -> list[str]:
        # Ids past the vocabulary (padded LM heads) have no text.
        valid_ids = [i for i in token_ids if 0 <= i < self.vocab_size]
        if not valid_ids:
            return []
        tokens = self.tokenizer.convert_ids_to_tokens(
            valid_ids, skip_special_tokens=self.skip_special_tokens
        )
        return [token or "" for token in tokens]

    def _to_string(self, tokens: list) -> str:
        return self.tokenizer.convert_tokens_to_string(tokens)

    def decode_next(self, token_id: int) -> str:
        new_tokens = self._to_tokens([token_id])
        if not new_tokens:  # a skipped special token or an id with no text
            return ""
        self.tokens.extend(new_tokens)
        to_string = self._to_string
        prefix_text = to_string(self.tokens[self.prefix_offset : self.read_offset])
        new_text = to_string(self.tokens[self.prefix_offset :])
        if len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT_CHAR):
            return ""  # an incomplete character: wait for the next token
        self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)
        if self.prefix_offset > _MAX_DEAD_TOKENS:
            del self.tokens[: self.prefix_offset]
            self.read_offset -= self.prefix_offset
            self.prefix_offset = 0
        return new_text[len(prefix_text) :]


class _IdOffsetDecoder(_OffsetDecoder):
    """The offset algorithm over token ids, for tokenizers whose token strings do not join back
    into text (mistral_common's byte tokens): each window is decoded from its ids."""

    def __init__(
        self, tokenizer: Any, prompt_token_ids: Sequence[int], skip_special_tokens: bool
    ) -> None:
        self.special_ids = frozenset(tokenizer.all_special_ids)
        super().__init__(tokenizer, prompt_token_ids, skip_special_tokens)

    def _to_tokens(self, token_ids: Sequence[int]) -> list[int]:
        skipped = self.special_ids if self.skip_special_tokens else ()
        return [i for i in token_ids if 0 <= i < self.vocab_size and i not in skipped]

    def _to_string(self, tokens: list) -> str:
        # Runs of ordinary ids decode as text; a special id kept in the output shows as its
        # token (SentencePiece's decode would otherwise keep the word-boundary marks).
        special_ids, decode = self.special_ids, self.tokenizer.decode
        parts, run = [], []
        for token_id in tokens:
            if token_id in special_ids:
                if run:
                    parts.append(decode(run, skip_special_tokens=True))
                    run = []
                parts.append(self.tokenizer.convert_ids_to_tokens(token_id))
            else:
                run.append(token_id)
        if run:
            parts.append(decode(run, skip_special_tokens=True))
        return "".join(parts)
