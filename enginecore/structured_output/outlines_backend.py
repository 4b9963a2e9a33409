"""The outlines backend: a JSON schema, regex or choice becomes one regex, which outlines_core
compiles into a DFA over token ids (`Index`) and walks with a `Guide`. It takes no EBNF/Lark
grammar and no structural tag. Built by the structured-output manager on first use.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ember.enginecore.structured_output.grammar import (
    allow_only_tokens,
    allow_tokens,
    check_bitmask,
    field_error,
    resolve_stop_token_ids,
    token_allowed,
)

if TYPE_CHECKING:
    import outlines_core

    from ember.workers.structured_outputs_params import StructuredOutputsParams

# Compiled regexes kept per backend (an Index over a large vocabulary takes 10 ms to 10 s).
_MAX_CACHED_INDEXES = 128
# Tokens a matcher can roll back (a Guide keeps this many past states).
DEFAULT_MAX_ROLLBACK_TOKENS = 64
# Characters with a meaning in outlines_core's (Rust `regex` crate) syntax.
_REGEX_META = frozenset("\\.+*?()|[]{}^$#&-~")
# A SentencePiece byte-fallback token, e.g. <0x0A>, and SentencePiece's space.
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_SENTENCEPIECE_SPACE = "\u2581"


def gpt2_byte_decoder() -> dict[str, int]:
    """The byte each character of a byte-level BPE vocabulary (GPT-2, Llama 3, SmolLM) stands
    for: printable Latin-1 bytes are written as themselves, the 68 others as chr(256 + n), n
    counting them in byte order."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("\xa1"), ord("\xac") + 1),
        *range(ord("\xae"), ord("\xff") + 1),
    ]
    decoder = {chr(byte): byte for byte in printable}
    others = (byte for byte in range(256) if chr(byte) not in decoder)
    for offset, byte in enumerate(others):
        decoder[chr(256 + offset)] = byte
    return decoder


def token_bytes_table(
    tokenizer: Any, vocab_size: int, skip_token_ids: Iterable[int]
) -> dict[bytes, list[int]]:
    """The bytes each token id below `vocab_size` decodes to, grouped by bytes (what
    `outlines_core.Vocabulary` takes). Special and stop tokens are left out: a regex never
    produces them. Byte-level BPE vocabularies map each character back to a byte; others are
    read as SentencePiece (▁ for space, <0xNN> for raw bytes). Added tokens are literal text."""
    skip = set(skip_token_ids)
    vocab = tokenizer.get_vocab()
    added = set(tokenizer.get_added_vocab())
    byte_decoder = gpt2_byte_decoder()
    byte_level = all(
        char in byte_decoder for token in vocab if token not in added for char in token
    )
    table: dict[bytes, list[int]] = {}
    for token, token_id in vocab.items():
        if token_id in skip or token_id >= vocab_size:
            continue
        if token in added:
            data = token.encode()
        elif byte_level:
            data = bytes(byte_decoder[char] for char in token)
        elif byte := _BYTE_TOKEN.fullmatch(token):
            data = bytes([int(byte.group(1), 16)])
        else:
            data = token.replace(_SENTENCEPIECE_SPACE, " ").encode()
        if data:
            table.setdefault(data, []).append(token_id)
    return table


def escape_regex_literal(text: str) -> str:
    """`text` as a regex that matches exactly it, in outlines_core's regex syntax."""
    out = []
    for char in text:
        if char in _REGEX_META:
            out.append("\\" + char)
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\x{{{ord(char):x}}}")
        else:
            out.append(char)
    return "".join(out)


def choice_as_regex(choices: Sequence[str]) -> str:
    """A regex matching exactly one of `choices`."""
    return "(" + "|".join(escape_regex_literal(choice) for choice in choices) + ")"


def _regex_problem(regex: str, exc: Exception) -> str:
    """outlines_core's message, with Python's reading of the pattern when that is clearer."""
    message = str(exc).strip()
    try:
        re.compile(regex)
    except re.error as python_error:
        return f"{message} ({python_error})"
    return message


class OutlinesBackend:
    """outlines_core bound to one tokenizer: its `Vocabulary` (token bytes, the first stop
    token as EOS) and an LRU of compiled regexes, shared by threads under a lock."""

    name = "outlines"

    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int,
        stop_token_ids: Iterable[int],
        disable_any_whitespace: bool = False,
        *,
        max_rollback_tokens: int = DEFAULT_MAX_ROLLBACK_TOKENS,
    ):
        import outlines_core

        self.vocab_size = vocab_size
        self.stop_token_ids = resolve_stop_token_ids(tokenizer, stop_token_ids)
        self.disable_any_whitespace = disable_any_whitespace
        self.max_rollback_tokens = max_rollback_tokens
        special_ids = getattr(tokenizer, "all_special_ids", ())
        table = token_bytes_table(tokenizer, vocab_size, [*special_ids, *self.stop_token_ids])
        self._vocabulary = outlines_core.Vocabulary(self.stop_token_ids[0], table)
        self._indexes: OrderedDict[str, outlines_core.Index] = OrderedDict()
        self._lock = threading.Lock()

    def compile(self, params: StructuredOutputsParams) -> outlines_core.Index:
        kind = params.kind
        return self._index(self._regex(params, kind), kind)

    def _regex(self, params: StructuredOutputsParams, kind: str) -> str:
        from outlines_core.json_schema import build_regex_from_schema

        if kind in ("json", "json_object"):
            if kind == "json":
                schema = params.json_schema()  # refuses text that is not JSON
                text = params.json if isinstance(params.json, str) else json.dumps(schema)
            else:
                text = '{"type": "object"}'
            # No whitespace when asked (the request's flag adds to the engine's); else the
            # request's whitespace_pattern, else outlines' default (an optional space).
            no_whitespace = self.disable_any_whitespace or params.disable_any_whitespace
            whitespace = "" if no_whitespace else params.whitespace_pattern
            try:
                return build_regex_from_schema(text, whitespace)
            except (ValueError, TypeError, RuntimeError) as exc:
                raise field_error(kind, str(exc).strip().splitlines()[0]) from None
        if kind == "regex":
            return params.regex
        if kind == "choice":
            return choice_as_regex(params.choice)
        what = {"grammar": "grammars", "structural_tag": "structural tags"}.get(kind, kind)
        raise field_error(kind, f"the outlines backend does not support {what}")

    def _index(self, regex: str, kind: str) -> outlines_core.Index:
        import outlines_core

        with self._lock:
            index = self._indexes.get(regex)
            if index is not None:
                self._indexes.move_to_end(regex)
                return index
        try:
            index = outlines_core.Index(regex, self._vocabulary)
        except (ValueError, TypeError, RuntimeError) as exc:
            problem = _regex_problem(regex, exc) if kind == "regex" else str(exc).strip()
            raise field_error(kind, problem) from None
        with self._lock:
            self._indexes[regex] = index
            while len(self._indexes) > _MAX_CACHED_INDEXES:
                self._indexes.popitem(last=False)
        return index

    def matcher(self, compiled: outlines_core.Index) -> OutlinesMatcher:
        import outlines_core

        guide = outlines_core.Guide(compiled, max_rollback=self.max_rollback_tokens)
        return OutlinesMatcher(guide, self.stop_token_ids, self.vocab_size)


class OutlinesMatcher:
    """A request's `outlines_core.Guide`. The DFA has no edge for EOS (its mask allows EOS in a
    final state, but `advance` refuses it), so a stop token is accepted here, in a final state,
    without reaching the guide; `rollback` counts it."""

    __slots__ = ("_guide", "_stop_token_ids", "_terminated", "_vocab_size")

    def __init__(
        self, guide: outlines_core.Guide, stop_token_ids: tuple[int, ...], vocab_size: int
    ):
        self._guide = guide
        self._stop_token_ids = stop_token_ids
        self._vocab_size = vocab_size
        self._terminated = False

    def accept_token(self, token_id: int) -> bool:
        if self._terminated or not 0 <= token_id < self._vocab_size:
            return False
        if token_id in self._stop_token_ids:
            self._terminated = self._guide.is_finished()
            return self._terminated
        if not self._guide.accepts_tokens([token_id]):
            return False
        try:  # `advance` also refuses a token that leads into a dead state
            self._guide.advance(token_id, return_tokens=False)
        except ValueError:
            return False
        return True

    def fill_bitmask(self, bitmask: np.ndarray, row: int) -> None:
        check_bitmask(bitmask, row, self._vocab_size)
        if self._terminated:
            allow_only_tokens(bitmask, row, self._stop_token_ids)
            return
        target = bitmask[row]
        # Writes every word of the row: the vocabulary's tokens, zeros past them.
        self._guide.write_mask_into(target.ctypes.data, target.size, target.itemsize)
        # The vocabulary knows one EOS; the other stop tokens go where it goes.
        if len(self._stop_token_ids) > 1 and token_allowed(bitmask, row, self._stop_token_ids[0]):
            allow_tokens(bitmask, row, self._stop_token_ids[1:])

    def is_terminated(self) -> bool:
        return self._terminated

    def rollback(self, num_tokens: int) -> None:
        if num_tokens <= 0:
            return
        if self._terminated:
            self._terminated = False
            num_tokens -= 1
        if num_tokens:
            self._guide.rollback_state(num_tokens)
