"""Turns what users pass to `LLM.generate` into token ids, and checks them before anything is
sent to the engine: every accepted form of vLLM's prompts, lengths, vocabulary and parameters.
Also `ember.inputs`, where vLLM users import the prompt schemas (`TokensPrompt`, `TextPrompt`,
`PromptType`, defined in `ember.prompt_types`)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from ember.prompt_types import (
    PROMPT_KEYS,
    UNSUPPORTED_PROMPT_KEYS,
    EmbedsPrompt,
    PromptType,
    SingletonPrompt,
    TextPrompt,
    TokensPrompt,
)
from ember.workers.sampling_params import RequestOutputKind, SamplingParams

__all__ = [
    "EmbedsPrompt",
    "EngineLimits",
    "ProcessedPrompt",
    "PromptType",
    "SingletonPrompt",
    "TextPrompt",
    "TokenizeOptions",
    "TokensPrompt",
    "check_prompt",
    "check_sampling_params",
    "normalize_prompts",
    "one_per_prompt",
    "per_prompt_params",
    "tokenize_options",
    "tokenize_prompt",
    "truncate_prompt",
]

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class ProcessedPrompt:
    prompt: str | None
    prompt_token_ids: list[int]
    cache_salt: str | None = None  # keeps this prompt's prefix-cache blocks apart


def _is_token_ids(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(
        isinstance(x, int) and not isinstance(x, bool) for x in value
    )


def normalize_prompts(prompts: Any) -> list[str | list[int] | dict]:
    """A string, a list of strings, a list of token ids, a list of lists of token ids, or prompt
    dicts, as a list with one entry per prompt."""
    if isinstance(prompts, (str, dict)):
        return [prompts]
    if not isinstance(prompts, (list, tuple)):
        raise TypeError(
            "prompts must be a string, a list of strings, a list of token ids, a list of lists "
            f"of token ids, or prompt dicts; got {type(prompts).__name__}"
        )
    if prompts and _is_token_ids(prompts):
        return [list(prompts)]
    return list(prompts)


def tokenize_prompt(
    prompt: Any, tokenizer: Any, index: int, options: TokenizeOptions | None = None
) -> ProcessedPrompt:
    """One prompt (a string, token ids, or a `TextPrompt` / `TokensPrompt` dict) as token ids.
    `options` (from `tokenization_kwargs`) shape the tokenization and truncate or pad the
    tokens; without them text is encoded as `tokenizer.encode` does."""
    if isinstance(prompt, dict):
        unknown = set(prompt) - PROMPT_KEYS
        if unknown:
            raise ValueError(f"prompt {index}: unknown keys {sorted(unknown)}")
        for key in UNSUPPORTED_PROMPT_KEYS:
            if prompt.get(key) is not None:
                raise NotImplementedError(
                    f"prompt {index}: {key} is not supported (ember takes text or token ids)"
                )
        cache_salt = prompt.get("cache_salt")
        if cache_salt is not None and not isinstance(cache_salt, str):
            raise TypeError(f"prompt {index}: cache_salt must be a str")
        if "prompt_token_ids" in prompt:
            token_ids = prompt["prompt_token_ids"]
            if not _is_token_ids(token_ids):
                raise TypeError(f"prompt {index}: prompt_token_ids must be a list of ints")
            processed = ProcessedPrompt(prompt.get("prompt"), list(token_ids), cache_salt)
        elif "prompt" not in prompt:
            raise ValueError(f"prompt {index}: a prompt dict needs 'prompt' or 'prompt_token_ids'")
        elif not isinstance(prompt["prompt"], str):
            raise TypeError(f"prompt {index}: 'prompt' must be a str")
        else:
            text = prompt["prompt"]
            processed = ProcessedPrompt(text, _encode_text(text, tokenizer, options), cache_salt)
    elif isinstance(prompt, str):
        processed = ProcessedPrompt(prompt, _encode_text(prompt, tokenizer, options))
    elif _is_token_ids(prompt):
        processed = ProcessedPrompt(None, list(prompt))
    else:
        raise TypeError(
            f"prompt {index} must be a string, a list of token ids or a prompt dict, "
            f"got {type(prompt).__name__}"
        )
    if options is not None:
        _apply_token_options(processed, tokenizer, options)
    return processed


@dataclass(frozen=True, slots=True)
class TokenizeOptions:
    """vLLM's `TokenizeParams`, as `tokenize_options` builds them from `tokenization_kwargs`.

    truncate_prompt_tokens: how many tokens to keep (-1: as many as the model takes; None: all).
    truncation_side: "left" keeps the last tokens, "right" the first; None: "left" as the
    tokenizer would truncate it (vLLM loads a generative model's tokenizer with
    truncation_side="left"), keeping the special tokens it adds. pad_prompt_tokens: pad with the
    tokenizer's pad token up to this length (-1: max_model_len). max_output_tokens: the output
    room an explicit `max_length` leaves (max_model_len - max_length), else 0.
    """

    max_model_len: int
    max_output_tokens: int = 0
    truncate_prompt_tokens: int | None = None
    truncation_side: str | None = None
    pad_prompt_tokens: int | None = None
    add_special_tokens: bool = True
    do_lower_case: bool = False
    needs_detokenization: bool = False

    def keep_tokens(self) -> int | None:
        """The number of tokens truncation keeps (vLLM: -1 is max_model_len, less the one
        token held back for output when max_length left output room)."""
        keep = self.truncate_prompt_tokens
        if keep is not None and keep < 0:
            keep = self.max_model_len if self.max_output_tokens == 0 else self.max_model_len - 1
        return keep


def tokenize_options(
    tokenization_kwargs: dict[str, Any] | None,
    max_model_len: int,
    *,
    add_special_tokens: bool = True,
) -> TokenizeOptions:
    """vLLM's `TokenizeParams.with_kwargs` over the defaults of `generate` (special tokens
    added) or `chat` (add_special_tokens=False: the template writes them). Keys: max_length
    (default max_model_len), truncation (True / "longest_first": keep max_length tokens;
    "do_not_truncate": none), truncate_prompt_tokens, truncation_side, padding ("max_length"),
    pad_prompt_tokens, add_special_tokens, do_lower_case, needs_detokenization. Other keys are
    ignored with vLLM's warning."""
    if tokenization_kwargs is None:
        tokenization_kwargs = {}
    if not isinstance(tokenization_kwargs, dict):
        raise TypeError(
            f"tokenization_kwargs must be a dict, got {type(tokenization_kwargs).__name__}"
        )
    kwargs = dict(tokenization_kwargs)
    has_max_length = "max_length" in kwargs
    max_length = kwargs.pop("max_length", max_model_len)
    truncate = kwargs.pop("truncate_prompt_tokens", None)
    side = kwargs.pop("truncation_side", None)
    pad = kwargs.pop("pad_prompt_tokens", None)
    options = {
        "add_special_tokens": kwargs.pop("add_special_tokens", add_special_tokens),
        "do_lower_case": kwargs.pop("do_lower_case", False),
        "needs_detokenization": kwargs.pop("needs_detokenization", False),
    }
    padding = kwargs.pop("padding", None)
    if padding:
        if padding == "max_length":
            pad = max_length
        elif padding == "do_not_pad":
            pad = None
        else:
            kwargs["padding"] = padding
    truncation = kwargs.pop("truncation", None)
    if truncation:
        if truncation in (True, "longest_first"):
            truncate = max_length
        elif truncation == "do_not_truncate":
            truncate = None
        else:
            kwargs["truncation"] = truncation
    if kwargs:
        logger.warning(
            "The following tokenization arguments are not supported by ember and will be "
            "ignored: %s",
            kwargs,
        )
    for name, value in (("max_length", max_length), ("truncate_prompt_tokens", truncate)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            raise TypeError(f"tokenization_kwargs: {name} must be an int, got {value!r}")
    if side not in (None, "left", "right"):
        raise ValueError(
            f"tokenization_kwargs: truncation_side must be 'left' or 'right', got {side!r}"
        )
    max_output_tokens = 0
    if has_max_length and max_length is not None:
        if max_length < 0:  # vLLM: more output tokens than the model's length
            raise ValueError(f"tokenization_kwargs: max_length must be >= 0, got {max_length}")
        max_output_tokens = max_model_len - max_length
    if truncate is not None and truncate > max_model_len:
        raise ValueError(
            f"tokenization_kwargs: truncate_prompt_tokens={truncate} cannot be greater than "
            f"max_model_len={max_model_len}"
        )
    return TokenizeOptions(max_model_len, max_output_tokens, truncate, side, pad, **options)


def _encode_text(text: str, tokenizer: Any, options: TokenizeOptions | None) -> list[int]:
    if tokenizer is None:
        raise ValueError("text prompts need a tokenizer (skip_tokenizer_init=True was given)")
    if options is None:
        return tokenizer.encode(text)
    if options.do_lower_case:
        text = text.lower()
    token_ids = list(tokenizer.encode(text, add_special_tokens=options.add_special_tokens))
    keep = options.keep_tokens()
    if keep is None or len(token_ids) <= keep or options.truncation_side is not None:
        return token_ids  # an explicit side slices the tokens, special ones included (vLLM)
    if not options.add_special_tokens:
        return token_ids[len(token_ids) - keep :]
    return _truncate_between_special_tokens(text, token_ids, tokenizer, keep)


def _truncate_between_special_tokens(
    text: str, token_ids: list[int], tokenizer: Any, keep: int
) -> list[int]:
    """What a Hugging Face tokenizer loaded with truncation_side="left" returns for
    `tokenizer(text, truncation=True, max_length=keep)`, as vLLM loads a generative model's
    tokenizer: the special tokens `encode` adds (a BOS) stay, the text's first tokens go."""
    plain = list(tokenizer.encode(text, add_special_tokens=False))
    for start in range(len(token_ids) - len(plain) + 1):
        if token_ids[start : start + len(plain)] == plain:
            prefix, suffix = token_ids[:start], token_ids[start + len(plain) :]
            body = keep - len(prefix) - len(suffix)
            if body >= 0:
                return prefix + plain[len(plain) - body :] + suffix
            break
    return token_ids[len(token_ids) - keep :]


def _apply_token_options(
    processed: ProcessedPrompt, tokenizer: Any, options: TokenizeOptions
) -> None:
    """vLLM's steps after tokenization: the text of a token prompt when asked for, then
    truncation, then padding (the length check is `check_prompt`)."""
    token_ids = processed.prompt_token_ids
    if options.needs_detokenization and processed.prompt is None:
        if tokenizer is None:
            raise ValueError(
                "tokenization_kwargs: needs_detokenization needs a tokenizer "
                "(skip_tokenizer_init=True was given)"
            )
        processed.prompt = tokenizer.decode(token_ids)
    keep = options.keep_tokens()
    if keep is not None and keep < len(token_ids):
        if options.truncation_side == "right":
            token_ids = token_ids[:keep]
        else:
            token_ids = token_ids[len(token_ids) - keep :]
    pad_to = options.pad_prompt_tokens
    if pad_to is not None and pad_to < 0:
        pad_to = options.max_model_len
    if pad_to is not None and pad_to > len(token_ids):
        pad_token_id = None if tokenizer is None else tokenizer.pad_token_id
        if pad_token_id is None:
            raise ValueError("tokenization_kwargs: padding needs a tokenizer with a pad token")
        token_ids = token_ids + [pad_token_id] * (pad_to - len(token_ids))
    processed.prompt_token_ids = token_ids


def check_prompt(
    processed: ProcessedPrompt, index: int, max_model_len: int, vocab_size: int
) -> None:
    token_ids = processed.prompt_token_ids
    if not token_ids:
        raise ValueError(f"prompt {index} is empty")
    if len(token_ids) > max_model_len:
        raise ValueError(
            f"prompt {index} is {len(token_ids)} tokens long, longer than "
            f"max_model_len={max_model_len}"
        )
    low, high = min(token_ids), max(token_ids)
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise ValueError(
            f"prompt {index} holds token id {bad}, outside the vocabulary [0, {vocab_size})"
        )


def truncate_prompt(processed: ProcessedPrompt, params: SamplingParams, max_model_len: int) -> None:
    """Keep the last `truncate_prompt_tokens` prompt tokens (-1: the last max_model_len)."""
    keep = params.truncate_prompt_tokens
    if keep is None:
        return
    if keep == -1:
        keep = max_model_len
    if len(processed.prompt_token_ids) > keep:
        processed.prompt_token_ids = processed.prompt_token_ids[-keep:]


@dataclass(frozen=True, slots=True)
class EngineLimits:
    """What a request's parameters are checked against: facts of the engine and tokenizer."""

    vocab_size: int
    max_model_len: int
    max_logprobs: int
    tokenizer: Any | None


def check_sampling_params(params: Any, index: int, limits: EngineLimits) -> SamplingParams:
    """Check what SamplingParams cannot check alone (token ids against the vocabulary, logprobs
    against max_logprobs) and tokenize bad_words. Returns the params the engine gets: the
    user's object, or a copy when the frontend had to fill in engine-side fields."""
    if not isinstance(params, SamplingParams):
        raise TypeError(
            f"sampling_params[{index}] must be a SamplingParams, got {type(params).__name__}"
        )
    vocab_size = limits.vocab_size
    for name in ("allowed_token_ids", "stop_token_ids"):
        token_ids = getattr(params, name) or ()
        if any(token_id >= vocab_size for token_id in token_ids):
            raise ValueError(
                f"{name} holds token id {max(token_ids)}, outside the vocabulary [0, {vocab_size})"
            )
    if params.logit_bias and max(params.logit_bias) >= vocab_size:
        raise ValueError(
            f"logit_bias holds token id {max(params.logit_bias)}, outside the vocabulary "
            f"[0, {vocab_size})"
        )
    max_logprobs = limits.max_logprobs
    for name in ("logprobs", "prompt_logprobs"):
        requested = getattr(params, name)
        if requested is None or max_logprobs == -1:
            continue
        if requested == -1 or requested > max_logprobs:
            raise ValueError(
                f"{name}={requested} is more than max_logprobs={max_logprobs}; raise "
                "LLM(max_logprobs=...)"
            )
    if params.output_kind is not RequestOutputKind.FINAL_ONLY:
        # The offline API returns finished outputs only; vLLM's `LLM` sets FINAL_ONLY too.
        params = msgspec.structs.replace(params, output_kind=RequestOutputKind.FINAL_ONLY)
    if params.bad_words:
        if limits.tokenizer is None:
            raise ValueError("bad_words needs a tokenizer (skip_tokenizer_init=True was given)")
        params = params.clone()
        params.update_from_tokenizer(limits.tokenizer)
    return params


def one_per_prompt(params: Any, num_prompts: int, name: str) -> list[Any]:
    """`params` given once or once per prompt (a list or tuple), as one entry per prompt."""
    if not isinstance(params, (list, tuple)):
        return [params] * num_prompts
    if len(params) != num_prompts:
        raise ValueError(
            f"{name} has {len(params)} entries for {num_prompts} prompts; "
            "give one, or one per prompt"
        )
    return list(params)


def per_prompt_params(
    params: Any, num_prompts: int, limits: EngineLimits
) -> Sequence[SamplingParams]:
    if params is None:
        params = SamplingParams()
    if not isinstance(params, (list, tuple)):  # checked once, shared by every prompt
        return [check_sampling_params(params, 0, limits)] * num_prompts
    params = one_per_prompt(params, num_prompts, "sampling_params")
    return [check_sampling_params(p, i, limits) for i, p in enumerate(params)]
