"""vLLM's prompt schemas (`vllm.inputs`): `TextPrompt`, `TokensPrompt`, `EmbedsPrompt` and the
`PromptType` union that `LLM.generate` accepts. Re-exported by `ember.inputs` and `ember`; plain
TypedDicts, so a prompt built with them is the dict `ember.inputs.tokenize_prompt` reads."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from typing_extensions import NotRequired, TypedDict  # NotRequired: Python 3.11+ in typing

if TYPE_CHECKING:
    import torch


class _PromptOptions(TypedDict):
    """Options of every single prompt. ember has no multi-modal models: the multi-modal keys are
    accepted when None and refused (NotImplementedError) otherwise."""

    multi_modal_data: NotRequired[Mapping[str, Any] | None]
    media_io_kwargs: NotRequired[dict[str, dict[str, Any]] | None]
    mm_processor_kwargs: NotRequired[dict[str, Any] | None]
    multi_modal_uuids: NotRequired[Mapping[str, Any] | None]
    cache_salt: NotRequired[str]
    """Keeps this prompt's prefix-cache blocks apart from other prompts'."""


class TextPrompt(_PromptOptions):
    """A text prompt, tokenized by the frontend (`tokenization_kwargs` apply)."""

    prompt: str


class TokensPrompt(_PromptOptions):
    """A tokenized prompt; `prompt` is its text when known (it goes into the output)."""

    prompt_token_ids: list[int]
    prompt: NotRequired[str]
    token_type_ids: NotRequired[list[int]]
    """For cross-encoders in vLLM; ignored by generation."""
    prompt_token_offsets: NotRequired[list[tuple[int, int]] | None]


class EmbedsPrompt(_PromptOptions):
    """A prompt given as embeddings: declared for vLLM's imports, refused by ember's `LLM`
    (NotImplementedError)."""

    prompt_embeds: torch.Tensor
    prompt: NotRequired[str]
    prompt_token_ids: NotRequired[list[int]]
    prompt_is_token_ids: NotRequired[list[bool]]


DecoderOnlyPrompt = str | TextPrompt | list[int] | TokensPrompt | EmbedsPrompt
SingletonPrompt = DecoderOnlyPrompt
# ember serves decoder-only models, so vLLM's encoder-decoder forms are not part of it.
PromptType = DecoderOnlyPrompt

# The keys a prompt dict may hold, and those that must be None (or absent) in ember.
PROMPT_KEYS = frozenset().union(
    *(
        schema.__required_keys__ | schema.__optional_keys__
        for schema in (TextPrompt, TokensPrompt, EmbedsPrompt)
    )
)
UNSUPPORTED_PROMPT_KEYS = (
    "multi_modal_data",
    "media_io_kwargs",
    "mm_processor_kwargs",
    "multi_modal_uuids",
    "prompt_embeds",
    "prompt_is_token_ids",
)

__all__ = [
    "DecoderOnlyPrompt",
    "EmbedsPrompt",
    "PromptType",
    "SingletonPrompt",
    "TextPrompt",
    "TokensPrompt",
]
