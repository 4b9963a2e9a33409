"""Sampling parameters of one request, with vLLM's fields, defaults and validation.

Built by the user (re-exported as `ember.SamplingParams`), sent to the engine core inside an add
request, and read by the worker's sampler; validation runs on construction and on msgspec decode.
"""

from __future__ import annotations

import copy
import logging
import math
import numbers
from enum import Enum, IntEnum
from typing import Any

import msgspec

from ember.workers.structured_outputs_params import GuidedDecodingParams, StructuredOutputsParams

logger = logging.getLogger(__name__)

_SAMPLING_EPS = 1e-5  # a temperature below this means greedy sampling
_MAX_TEMP = 1e-2  # a positive temperature below this is raised to it (as vLLM does)
_INT64_MIN, _UINT64_MAX = -(2**63), 2**64 - 1  # what msgpack and torch.Generator can hold


class SamplingType(IntEnum):
    GREEDY = 0
    RANDOM = 1
    RANDOM_SEED = 2


class RequestOutputKind(Enum):
    """How a request's outputs are returned while it runs (vLLM's enum and values)."""

    CUMULATIVE = 0  # every output holds the whole output so far
    DELTA = 1  # every output holds only what is new since the previous one
    FINAL_ONLY = 2  # no intermediate outputs: only the finished one


class SamplingParams(msgspec.Struct, omit_defaults=True, kw_only=True):
    """Sampling parameters for text generation, as vLLM's (v1) `SamplingParams`.

    Fields follow the OpenAI completion API as vLLM does:

    - n: number of output sequences for the prompt.
    - presence_penalty, frequency_penalty: in [-2, 2]; > 0 favours new tokens.
    - repetition_penalty: > 0; > 1 favours new tokens (prompt tokens count too).
    - temperature: >= 0; 0 means greedy. A positive value below 0.01 is raised to 0.01.
    - top_p: in (0, 1]. top_k: 0 disables it (-1 is accepted and stored as 0). min_p: in [0, 1].
    - seed: random seed of this request (-1 means none).
    - stop: strings that end generation; excluded from the text unless
      include_stop_str_in_output. stop_token_ids: token ids that end generation.
    - bad_words: words that are never generated.
    - ignore_eos: keep generating after EOS.
    - max_tokens (None: up to the model's length), min_tokens: bounds on output tokens; EOS,
      stop_token_ids and stop strings are ignored before min_tokens tokens.
    - logprobs / prompt_logprobs: number of top log probabilities per output / prompt token
      (-1: the whole vocabulary; the sampled token is always included).
    - detokenize, skip_special_tokens, spaces_between_special_tokens: how text is made.
    - truncate_prompt_tokens: keep only the last k prompt tokens (-1: the model's length).
    - logit_bias: token id -> bias added to its logit. allowed_token_ids: sample only these.
    - output_kind: a `RequestOutputKind`. The offline `LLM` returns finished outputs only and
      sends FINAL_ONLY to the engine whatever is given, as vLLM's `LLM` does.
    - extra_args: a dict for custom logits processors and plugins, carried unchanged to the
      workers; it must be msgpack-encodable (no pickle), with integers that fit in 64 bits.

    Decisions where vLLM leaves room (see also `__post_init__`): a wrong type raises TypeError
    naming the field (vLLM lets most of them fail later); float fields are stored as float, so an
    error reads "top_p must be in (0, 1], got 0.0."; `logprobs=True` means 1 and `logprobs=False`
    means None; token ids must be non-negative and a seed must fit in 64 bits.
    """

    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    detokenize: bool = True
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    truncate_prompt_tokens: int | None = None
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    structured_outputs: StructuredOutputsParams | None = None
    # The older spelling of structured_outputs; moved there on construction.
    guided_decoding: GuidedDecodingParams | None = None
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    extra_args: dict[str, Any] | None = None
    # Set by the engine, not by users: stop_token_ids plus the model's EOS ids, which min_tokens
    # must also hold back (vLLM's field of the same name).
    _all_stop_token_ids: set[int] = msgspec.field(default_factory=set)
    # Set by the frontend from bad_words (`update_from_tokenizer`): the token sequences that
    # spell each bad word, with and without a leading space.
    _bad_words_token_ids: list[list[int]] = msgspec.field(default_factory=list)

    def __post_init__(self) -> None:
        self._normalize_types()
        if 0 < self.temperature < _MAX_TEMP:
            logger.warning(
                "temperature %s is less than %s, which may cause numerical errors nan or inf "
                "in tensors. We have maxed it out to %s.",
                self.temperature,
                _MAX_TEMP,
                _MAX_TEMP,
            )
            self.temperature = _MAX_TEMP
        if self.seed == -1:
            self.seed = None
        if self.top_k == -1:
            self.top_k = 0  # vLLM quietly accepts -1 as "disabled"; one spelling downstream
        self._verify_args()
        if self.temperature < _SAMPLING_EPS:
            # Zero temperature means greedy sampling.
            self.top_p = 1.0
            self.top_k = 0
            self.min_p = 0.0
            if self.n > 1:
                raise ValueError(f"n must be 1 when using greedy sampling, got {self.n}.")
        self._all_stop_token_ids.update(self.stop_token_ids)

    def _normalize_types(self) -> None:
        """Check each field's type (TypeError naming it) and store one canonical form."""
        for name in ("n", "top_k", "min_tokens"):
            setattr(self, name, _as_int(name, getattr(self, name)))
        for name in ("seed", "max_tokens", "truncate_prompt_tokens"):
            value = getattr(self, name)
            setattr(self, name, None if value is None else _as_int(name, value))
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if isinstance(value, bool):  # OpenAI style: True means the sampled token's logprob
                value = 1 if value else None
            setattr(self, name, None if value is None else _as_int(name, value))
        for name in (
            "presence_penalty",
            "frequency_penalty",
            "repetition_penalty",
            "temperature",
            "top_p",
            "min_p",
        ):
            setattr(self, name, _as_float(name, getattr(self, name)))
        for name in (
            "ignore_eos",
            "detokenize",
            "skip_special_tokens",
            "spaces_between_special_tokens",
            "include_stop_str_in_output",
        ):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {type(getattr(self, name)).__name__}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        elif self.stop is not None and not isinstance(self.stop, (list, tuple)):
            raise TypeError(f"stop must be a str or a list of str, got {type(self.stop).__name__}")
        self.stop = _as_str_list("stop", self.stop)
        self.bad_words = _as_str_list("bad_words", self.bad_words)
        self.stop_token_ids = _as_token_ids("stop_token_ids", self.stop_token_ids)
        if self.allowed_token_ids is not None:
            self.allowed_token_ids = _as_token_ids("allowed_token_ids", self.allowed_token_ids)
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise TypeError(
                    "logit_bias must be a dict of token id to bias, got "
                    f"{type(self.logit_bias).__name__}"
                )
            # String keys are accepted as JSON (and vLLM's OpenAI server) sends them.
            self.logit_bias = {
                _as_token_id("logit_bias", int(k) if isinstance(k, str) and k.isdigit() else k): (
                    _as_float("logit_bias", v)
                )
                for k, v in self.logit_bias.items()
            }
        if self.guided_decoding is not None:
            if self.structured_outputs is not None:
                raise ValueError("give structured_outputs or guided_decoding, not both")
            if not isinstance(self.guided_decoding, GuidedDecodingParams):
                raise TypeError(
                    "guided_decoding must be a GuidedDecodingParams, got "
                    f"{type(self.guided_decoding).__name__}"
                )
            self.structured_outputs = self.guided_decoding.to_structured_outputs()
            self.guided_decoding = None
        if self.structured_outputs is not None and not isinstance(
            self.structured_outputs, StructuredOutputsParams
        ):
            raise TypeError(
                "structured_outputs must be a StructuredOutputsParams, got "
                f"{type(self.structured_outputs).__name__}"
            )
        if not isinstance(self.output_kind, RequestOutputKind):
            raise TypeError(
                f"output_kind must be a RequestOutputKind, got {type(self.output_kind).__name__}"
            )
        if self.extra_args is not None:
            _check_extra_args(self.extra_args)
        if not isinstance(self._all_stop_token_ids, set):
            self._all_stop_token_ids = set(
                _as_token_ids("_all_stop_token_ids", self._all_stop_token_ids)
            )

    def _verify_args(self) -> None:
        if self.n < 1:
            raise ValueError(f"n must be at least 1, got {self.n}.")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise ValueError(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}.")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise ValueError(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}.")
        if not math.isfinite(self.repetition_penalty):
            raise ValueError(
                f"repetition_penalty must be a finite number, got {self.repetition_penalty}."
            )
        if self.repetition_penalty <= 0.0:
            raise ValueError(
                f"repetition_penalty must be greater than zero, got {self.repetition_penalty}."
            )
        if not math.isfinite(self.temperature):
            raise ValueError(f"temperature must be a finite number, got {self.temperature}.")
        if self.temperature < 0.0:
            raise ValueError(f"temperature must be non-negative, got {self.temperature}.")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")
        if self.top_k < -1:
            raise ValueError(f"top_k must be 0 (disable), or at least 1, got {self.top_k}.")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}.")
        if self.seed is not None and not _INT64_MIN <= self.seed <= _UINT64_MAX:
            raise ValueError(f"seed must be in [-2**63, 2**64 - 1], got {self.seed}.")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}.")
        if self.min_tokens < 0:
            raise ValueError(
                f"min_tokens must be greater than or equal to 0, got {self.min_tokens}."
            )
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens must be less than or equal to max_tokens={self.max_tokens}, "
                f"got {self.min_tokens}."
            )
        if self.logprobs is not None and self.logprobs < -1:
            raise ValueError(f"logprobs must be non-negative or -1, got {self.logprobs}.")
        if self.prompt_logprobs is not None and self.prompt_logprobs < -1:
            raise ValueError(
                f"prompt_logprobs must be non-negative or -1, got {self.prompt_logprobs}."
            )
        if self.truncate_prompt_tokens is not None and (
            self.truncate_prompt_tokens == 0 or self.truncate_prompt_tokens < -1
        ):
            raise ValueError(
                "truncate_prompt_tokens must be an integer >= 1 or -1, "
                f"got {self.truncate_prompt_tokens}."
            )
        if any(not stop_str for stop_str in self.stop):
            raise ValueError("stop cannot contain an empty string.")
        if self.stop and not self.detokenize:
            raise ValueError(
                "stop strings are only supported when detokenize is True. "
                "Set detokenize=True to use stop."
            )
        if any(not bad_word for bad_word in self.bad_words):
            raise ValueError(
                f"bad_words cannot contain an empty string. Got bad_words={self.bad_words}."
            )
        if self.allowed_token_ids is not None and not self.allowed_token_ids:
            raise ValueError("allowed_token_ids must be None or a non-empty list, got [].")

    def update_from_generation_config(
        self, generation_config: dict[str, Any], model_eos_token_id: int | None = None
    ) -> None:
        """Add the model's EOS ids (from `generation_config.json`) as vLLM's processor does."""
        if model_eos_token_id is not None:
            self._all_stop_token_ids.add(model_eos_token_id)
        eos_ids = generation_config.get("eos_token_id")
        if eos_ids is None:
            return
        eos_ids = {eos_ids} if isinstance(eos_ids, int) else set(eos_ids)
        # The primary EOS id is handled by the engine itself; only the extra ones become stops.
        eos_ids.discard(model_eos_token_id)
        if eos_ids:
            self._all_stop_token_ids.update(eos_ids)
            if not self.ignore_eos:
                eos_ids.update(self.stop_token_ids)
                self.stop_token_ids = sorted(eos_ids)

    def update_from_tokenizer(self, tokenizer: Any) -> None:
        """Tokenize bad_words, as vLLM does: each word alone and after a space (a different
        token sequence in most tokenizers), the second kept only when it is a new spelling of
        the same length."""
        self._bad_words_token_ids = []
        for bad_word in self.bad_words:
            word = bad_word.lstrip()
            alone = tokenizer.encode(word, add_special_tokens=False)
            spaced = tokenizer.encode(" " + word, add_special_tokens=False)
            self._bad_words_token_ids.append(alone)
            if spaced and alone and spaced[0] != alone[0] and len(spaced) == len(alone):
                self._bad_words_token_ids.append(spaced)

    @property
    def bad_words_token_ids(self) -> list[list[int]]:
        return self._bad_words_token_ids

    @property
    def sampling_type(self) -> SamplingType:
        if self.temperature < _SAMPLING_EPS:
            return SamplingType.GREEDY
        if self.seed is not None:
            return SamplingType.RANDOM_SEED
        return SamplingType.RANDOM

    @property
    def all_stop_token_ids(self) -> set[int]:
        return self._all_stop_token_ids

    @property
    def output_text_buffer_length(self) -> int:
        """Characters a streaming client holds back so it never shows a stop string's start."""
        if self.stop and not self.include_stop_str_in_output:
            return max(len(s) for s in self.stop) - 1
        return 0

    def clone(self) -> SamplingParams:
        """A deep copy (lists and dicts are not shared)."""
        return copy.deepcopy(self)

    def __repr__(self) -> str:
        return (
            f"SamplingParams(n={self.n}, "
            f"presence_penalty={self.presence_penalty}, "
            f"frequency_penalty={self.frequency_penalty}, "
            f"repetition_penalty={self.repetition_penalty}, "
            f"temperature={self.temperature}, "
            f"top_p={self.top_p}, "
            f"top_k={self.top_k}, "
            f"min_p={self.min_p}, "
            f"seed={self.seed}, "
            f"stop={self.stop}, "
            f"stop_token_ids={self.stop_token_ids}, "
            f"bad_words={self.bad_words}, "
            f"include_stop_str_in_output={self.include_stop_str_in_output}, "
            f"ignore_eos={self.ignore_eos}, "
            f"max_tokens={self.max_tokens}, "
            f"min_tokens={self.min_tokens}, "
            f"logprobs={self.logprobs}, "
            f"prompt_logprobs={self.prompt_logprobs}, "
            f"skip_special_tokens={self.skip_special_tokens}, "
            f"spaces_between_special_tokens={self.spaces_between_special_tokens}, "
            f"truncate_prompt_tokens={self.truncate_prompt_tokens}, "
            f"logit_bias={self.logit_bias}, "
            f"allowed_token_ids={self.allowed_token_ids}, "
            f"structured_outputs={self.structured_outputs}, "
            f"extra_args={self.extra_args})"
        )


def _check_extra_args(extra_args: object) -> None:
    """extra_args travels to the workers as msgpack: a dict of plain data, 64-bit integers."""
    if not isinstance(extra_args, dict):
        raise TypeError(f"extra_args must be a dict or None, got {type(extra_args).__name__}")
    pending: list[Any] = [extra_args]
    visited: set[int] = set()
    while pending:  # vLLM's check, without recursion (a deep dict cannot overflow the stack)
        value = pending.pop()
        if isinstance(value, int) and not _INT64_MIN <= value <= _UINT64_MAX:
            raise ValueError(f"extra_args integers must be in [-2**63, 2**64 - 1], got {value}.")
        if isinstance(value, (dict, list, tuple)) and id(value) not in visited:
            visited.add(id(value))
            if isinstance(value, dict):
                pending.extend(value.keys())
                pending.extend(value.values())
            else:
                pending.extend(value)
    try:
        msgspec.msgpack.encode(extra_args)
    except (TypeError, ValueError, OverflowError) as exc:
        raise TypeError(f"extra_args must hold only msgpack-encodable data: {exc}") from None


def _as_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return int(value)


def _as_float(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    return float(value)


def _as_token_id(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must contain only integer token ids, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must contain only non-negative token ids, got {value}.")
    return int(value)


def _as_token_ids(name: str, value: object) -> list[int]:
    if value is None:
        return []
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple, set, frozenset)):
        raise TypeError(f"{name} must be a list of ints, got {type(value).__name__}")
    return [_as_token_id(name, token_id) for token_id in value]


def _as_str_list(name: str, value: object) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise TypeError(f"{name} must be a list of str, got {type(value).__name__}")
    if not all(isinstance(item, str) for item in value):
        raise TypeError(f"{name} must contain only str, got {value!r}")
    return list(value)
