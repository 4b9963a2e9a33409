"""What every grammar backend provides (`GrammarBackend`, `GrammarMatcher`), and what they share:
the token bitmask layout, field-named errors, and grammar-text helpers. Used by the backends,
`backend_selection` and the structured-output manager of the engine core.

The bitmask has one int32 row per constrained request, 32 tokens per word (xgrammar's and
llguidance's layout); a set bit allows the token:

    vocab_size 70, so bitmask_words(70) == 3 words per row:
      word 0: tokens  0..31   token t is bit t % 32 of word t // 32
      word 1: tokens 32..63
      word 2: tokens 64..69   (bits 6..31 stand for no token and are always 0)
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    from ember.workers.structured_outputs_params import StructuredOutputsParams

BITMASK_WORD_BITS = 32


def bitmask_words(vocab_size: int) -> int:
    """Words (int32) in one bitmask row for a vocabulary of `vocab_size` tokens."""
    return (vocab_size + BITMASK_WORD_BITS - 1) // BITMASK_WORD_BITS


class GrammarMatcher(Protocol):
    """One request's position in its grammar. Used by one thread at a time.

    After a stop token is accepted the matcher is terminated: it accepts nothing more, and
    `fill_bitmask` allows only the stop tokens (so no row is ever all-masked).
    """

    def accept_token(self, token_id: int) -> bool:
        """Advance by `token_id`; False (and no change) when the grammar does not allow it."""
        ...

    def fill_bitmask(self, bitmask: np.ndarray, row: int) -> None:
        """Write the tokens allowed next into `bitmask[row]` (int32, [R, bitmask_words(V)]).
        Token ids at or above the tokenizer's vocabulary (model padding) are never allowed."""
        ...

    def is_terminated(self) -> bool:
        """Whether a stop token ended the grammar."""
        ...

    def rollback(self, num_tokens: int) -> None:
        """Undo the last `num_tokens` accepted tokens (a stop token included)."""
        ...


class GrammarBackend(Protocol):
    """A grammar library bound to one tokenizer and vocabulary size."""

    name: str

    def compile(self, params: StructuredOutputsParams) -> object:
        """The compiled grammar of `params`, shared by every matcher made from it. Thread-safe.
        Raises ValueError("structured_outputs.<field>: ...") for a spec it cannot take."""
        ...

    def matcher(self, compiled: object) -> GrammarMatcher:
        """A fresh matcher at the start of a compiled grammar."""
        ...


def field_error(field: str, message: str) -> ValueError:
    """The error for a spec a backend refuses: `structured_outputs.<field>: <message>`."""
    return ValueError(f"structured_outputs.{field}: {message}")


def resolve_stop_token_ids(tokenizer: Any, stop_token_ids: Iterable[int]) -> tuple[int, ...]:
    """The ids that end a grammar: `stop_token_ids`, else the tokenizer's EOS."""
    stop = tuple(dict.fromkeys(int(token_id) for token_id in stop_token_ids))
    if not stop and getattr(tokenizer, "eos_token_id", None) is not None:
        stop = (int(tokenizer.eos_token_id),)
    if not stop:
        raise ValueError("structured outputs need a stop token id: the tokenizer has no EOS")
    return stop


def check_bitmask(bitmask: np.ndarray, row: int, vocab_size: int) -> None:
    """Refuse a bitmask a backend cannot write into safely (some write through raw pointers)."""
    if not isinstance(bitmask, np.ndarray) or bitmask.dtype != np.int32 or bitmask.ndim != 2:
        raise ValueError("bitmask must be a 2-D numpy array of int32")
    if not bitmask.flags.c_contiguous:
        raise ValueError("bitmask must be C-contiguous")
    if bitmask.shape[1] != bitmask_words(vocab_size):
        raise ValueError(
            f"bitmask must have {bitmask_words(vocab_size)} words per row for vocab_size "
            f"{vocab_size}, got {bitmask.shape[1]}"
        )
    if not 0 <= row < bitmask.shape[0]:
        raise ValueError(f"bitmask row must be in [0, {bitmask.shape[0]}), got {row}")


def allow_only_tokens(bitmask: np.ndarray, row: int, token_ids: Iterable[int]) -> None:
    """Set `bitmask[row]` to allow exactly `token_ids`."""
    words = bitmask[row].view(np.uint32)
    words[:] = 0
    for token_id in token_ids:
        words[token_id // BITMASK_WORD_BITS] |= np.uint32(1 << (token_id % BITMASK_WORD_BITS))


def allow_tokens(bitmask: np.ndarray, row: int, token_ids: Iterable[int]) -> None:
    """Also allow `token_ids` in `bitmask[row]`."""
    words = bitmask[row].view(np.uint32)
    for token_id in token_ids:
        words[token_id // BITMASK_WORD_BITS] |= np.uint32(1 << (token_id % BITMASK_WORD_BITS))


def token_allowed(bitmask: np.ndarray, row: int, token_id: int) -> bool:
    """Whether `bitmask[row]` allows `token_id`."""
    word = int(bitmask[row, token_id // BITMASK_WORD_BITS]) & 0xFFFFFFFF
    return bool((word >> (token_id % BITMASK_WORD_BITS)) & 1)


def disallow_tokens_from(bitmask: np.ndarray, row: int, first_token_id: int) -> None:
    """Clear the bits of every token id >= `first_token_id` in `bitmask[row]`."""
    words = bitmask[row].view(np.uint32)
    word, bit = divmod(first_token_id, BITMASK_WORD_BITS)
    if word >= len(words):
        return
    words[word] &= np.uint32((1 << bit) - 1)
    words[word + 1 :] = 0


def _ebnf_literal(text: str) -> str:
    """`text` as a double-quoted EBNF (GBNF) string literal."""
    named = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}
    out = []
    for char in text:
        if char in named:
            out.append(named[char])
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\x{ord(char):02x}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def choice_as_grammar(choices: Sequence[str]) -> str:
    """An EBNF grammar whose language is exactly `choices`: `root ::= "a" | "b"`."""
    if not choices:
        raise field_error("choice", "cannot be an empty list")
    return "root ::= " + " | ".join(_ebnf_literal(choice) for choice in choices)


# A `#` or `//` comment up to the end of the line.
_COMMENT = re.compile(r"(#|//).*$")


def grammar_is_likely_lark(text: str) -> bool:
    """True unless some line (comments aside) defines a rule with EBNF's `::=`; Lark writes
    `rule: ...`. vLLM tells the two syntaxes apart the same way."""
    if not isinstance(text, str) or not text:
        return False
    return not any("::=" in _COMMENT.sub("", line) for line in text.splitlines())
