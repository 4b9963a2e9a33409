"""Turns what users pass to `LLM.generate` into token ids, and checks them before anything is
sent to the engine: every accepted form of vLLM's prompts, lengths, vocabulary and parameters."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ember.workers.sampling_params import SamplingParams


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


def tokenize_prompt(prompt: Any, tokenizer: Any, index: int) -> ProcessedPrompt:
    if isinstance(prompt, dict):
        unknown = set(prompt) - {"prompt", "prompt_token_ids", "multi_modal_data", "cache_salt"}
        if unknown:
            raise ValueError(f"prompt {index}: unknown keys {sorted(unknown)}")
        if prompt.get("multi_modal_data") is not None:
            raise NotImplementedError("multi_modal_data is not supported")
        cache_salt = prompt.get("cache_salt")
        if cache_salt is not None and not isinstance(cache_salt, str):
            raise TypeError(f"prompt {index}: cache_salt must be a str")
        if "prompt_token_ids" in prompt:
            token_ids = prompt["prompt_token_ids"]
            if not _is_token_ids(token_ids):
                raise TypeError(f"prompt {index}: prompt_token_ids must be a list of ints")
            return ProcessedPrompt(prompt.get("prompt"), list(token_ids), cache_salt)
        if "prompt" not in prompt:
            raise ValueError(f"prompt {index}: a prompt dict needs 'prompt' or 'prompt_token_ids'")
        if not isinstance(prompt["prompt"], str):
            raise TypeError(f"prompt {index}: 'prompt' must be a str")
        processed = tokenize_prompt(prompt["prompt"], tokenizer, index)
        processed.cache_salt = cache_salt
        return processed
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("text prompts need a tokenizer (skip_tokenizer_init=True was given)")
        return ProcessedPrompt(prompt, tokenizer.encode(prompt))
    if _is_token_ids(prompt):
        return ProcessedPrompt(None, list(prompt))
    raise TypeError(
        f"prompt {index} must be a string, a list of token ids or a prompt dict, "
        f"got {type(prompt).__name__}"
    )


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
