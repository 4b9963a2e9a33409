"""SamplingParams: vLLM's defaults, validation messages, greedy normalisation, msgspec transport."""

from __future__ import annotations

import msgspec
import pytest

from ember.workers.sampling_params import SamplingParams, SamplingType


def test_defaults_match_vllm():
    params = SamplingParams()
    assert (params.n, params.temperature, params.top_p, params.top_k, params.min_p) == (
        1,
        1.0,
        1.0,
        0,
        0.0,
    )
    assert (params.presence_penalty, params.frequency_penalty, params.repetition_penalty) == (
        0.0,
        0.0,
        1.0,
    )
    assert params.max_tokens == 16 and params.min_tokens == 0
    assert params.seed is None and params.logprobs is None and params.prompt_logprobs is None
    assert params.stop == [] and params.stop_token_ids == [] and params.bad_words == []
    assert params.detokenize and params.skip_special_tokens
    assert params.spaces_between_special_tokens
    assert not params.ignore_eos and not params.include_stop_str_in_output
    assert params.logit_bias is None and params.allowed_token_ids is None
    assert params.truncate_prompt_tokens is None
    assert params.sampling_type is SamplingType.RANDOM


def test_arguments_are_keyword_only():
    with pytest.raises(TypeError):
        SamplingParams(2)


INVALID_VALUES = [
    ({"n": 0}, r"^n must be at least 1, got 0\."),
    ({"presence_penalty": 2.5}, r"^presence_penalty must be in \[-2, 2\], got 2\.5\."),
    ({"frequency_penalty": -2.1}, r"^frequency_penalty must be in \[-2, 2\], got -2\.1\."),
    ({"repetition_penalty": 0.0}, r"^repetition_penalty must be greater than zero, got 0\.0\."),
    ({"repetition_penalty": float("inf")}, r"^repetition_penalty must be a finite number"),
    ({"temperature": -0.5}, r"^temperature must be non-negative, got -0\.5\."),
    ({"temperature": float("nan")}, r"^temperature must be a finite number"),
    ({"top_p": 0}, r"^top_p must be in \(0, 1\], got 0\.0\."),
    ({"top_p": 1.5}, r"^top_p must be in \(0, 1\], got 1\.5\."),
    ({"top_k": -2}, r"^top_k must be 0 \(disable\), or at least 1, got -2\."),
    ({"min_p": 1.5}, r"^min_p must be in \[0, 1\], got 1\.5\."),
    ({"min_p": -0.1}, r"^min_p must be in \[0, 1\], got -0\.1\."),
    ({"seed": 2**64}, r"^seed must be in \[-2\*\*63, 2\*\*64 - 1\]"),
    ({"max_tokens": 0}, r"^max_tokens must be at least 1, got 0\."),
    ({"min_tokens": -1}, r"^min_tokens must be greater than or equal to 0, got -1\."),
    (
        {"min_tokens": 5, "max_tokens": 4},
        r"^min_tokens must be less than or equal to max_tokens=4, got 5\.",
    ),
    ({"logprobs": -2}, r"^logprobs must be non-negative or -1, got -2\."),
    ({"prompt_logprobs": -3}, r"^prompt_logprobs must be non-negative or -1, got -3\."),
    ({"truncate_prompt_tokens": 0}, r"^truncate_prompt_tokens must be an integer >= 1 or -1"),
    ({"truncate_prompt_tokens": -2}, r"^truncate_prompt_tokens must be an integer >= 1 or -1"),
    ({"stop": ["ok", ""]}, r"^stop cannot contain an empty string\."),
    ({"stop": "x", "detokenize": False}, r"^stop strings are only supported when detokenize"),
    ({"bad_words": [""]}, r"^bad_words cannot contain an empty string"),
    ({"stop_token_ids": [-1]}, r"^stop_token_ids must contain only non-negative token ids"),
    ({"allowed_token_ids": []}, r"^allowed_token_ids must be None or a non-empty list"),
    ({"logit_bias": {-5: 1.0}}, r"^logit_bias must contain only non-negative token ids"),
    ({"n": 2, "temperature": 0.0}, r"^n must be 1 when using greedy sampling, got 2\."),
]


@pytest.mark.parametrize(("kwargs", "message"), INVALID_VALUES)
def test_invalid_value_raises_value_error_naming_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


WRONG_TYPES = [
    ("max_tokens", "3"),
    ("n", 1.5),
    ("top_k", 2.0),
    ("min_tokens", None),
    ("seed", "42"),
    ("logprobs", 1.0),
    ("temperature", "0.7"),
    ("top_p", None),
    ("presence_penalty", True),
    ("ignore_eos", 1),
    ("skip_special_tokens", "yes"),
    ("stop", 42),
    ("stop", ["a", 1]),
    ("stop_token_ids", [1, "2"]),
    ("stop_token_ids", "12"),
    ("bad_words", "word"),
    ("allowed_token_ids", [1.0]),
    ("logit_bias", [1, 2]),
    ("logit_bias", {1: "x"}),
    ("truncate_prompt_tokens", 1.5),
]


@pytest.mark.parametrize(("field", "value"), WRONG_TYPES)
def test_wrong_type_raises_type_error_naming_field(field, value):
    with pytest.raises(TypeError, match=rf"^{field} must"):
        SamplingParams(**{field: value})


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"temperature": 0.0},
        {
            "n": 3,
            "presence_penalty": 0.5,
            "frequency_penalty": -0.5,
            "repetition_penalty": 1.2,
            "temperature": 0.7,
            "top_p": 0.9,
            "top_k": 40,
            "min_p": 0.05,
            "seed": 1234,
            "stop": ["\n\n", "END"],
            "stop_token_ids": [2, 7],
            "ignore_eos": True,
            "max_tokens": None,
            "min_tokens": 3,
            "logprobs": 5,
            "prompt_logprobs": -1,
            "detokenize": True,
            "skip_special_tokens": False,
            "spaces_between_special_tokens": False,
            "include_stop_str_in_output": True,
            "truncate_prompt_tokens": 128,
            "logit_bias": {5: -100.0, 9: 2.5},
            "allowed_token_ids": [1, 2, 3],
            "bad_words": ["darn"],
        },
    ],
)
def test_msgpack_round_trip_gives_equal_params(kwargs):
    params = SamplingParams(**kwargs)
    decoded = msgspec.msgpack.decode(msgspec.msgpack.encode(params), type=SamplingParams)
    assert decoded == params
    assert repr(decoded) == repr(params)


def test_round_trip_keeps_engine_stop_token_ids():
    params = SamplingParams(stop_token_ids=[7])
    params.update_from_generation_config({"eos_token_id": [2, 3]}, model_eos_token_id=2)
    decoded = msgspec.msgpack.decode(msgspec.msgpack.encode(params), type=SamplingParams)
    assert decoded.all_stop_token_ids == {2, 3, 7}
    assert decoded.stop_token_ids == [3, 7]


def test_decode_validates_values_and_types():
    with pytest.raises(msgspec.ValidationError, match="top_p must be in"):
        msgspec.msgpack.decode(msgspec.msgpack.encode({"top_p": 0.0}), type=SamplingParams)
    with pytest.raises(msgspec.ValidationError, match="max_tokens"):
        msgspec.msgpack.decode(msgspec.msgpack.encode({"max_tokens": "3"}), type=SamplingParams)


def test_zero_temperature_is_greedy_and_disables_truncation():
    params = SamplingParams(temperature=0.0, top_p=0.5, top_k=5, min_p=0.2, seed=3)
    assert params.sampling_type is SamplingType.GREEDY
    assert (params.top_p, params.top_k, params.min_p) == (1.0, 0, 0.0)


def test_tiny_positive_temperature_is_raised_to_minimum():
    params = SamplingParams(temperature=1e-6, top_k=5)
    assert params.temperature == 0.01
    assert params.top_k == 5
    assert params.sampling_type is SamplingType.RANDOM


def test_seed_selects_seeded_sampling_and_minus_one_means_none():
    assert SamplingParams(seed=0).sampling_type is SamplingType.RANDOM_SEED
    assert SamplingParams(seed=-1).seed is None


def test_values_are_normalised():
    params = SamplingParams(
        stop="###", stop_token_ids=(4, 5), top_k=-1, logprobs=True, temperature=1, top_p=1
    )
    assert params.stop == ["###"]
    assert params.stop_token_ids == [4, 5]
    assert params.top_k == 0
    assert params.logprobs == 1
    assert isinstance(params.temperature, float) and isinstance(params.top_p, float)
    assert params.all_stop_token_ids == {4, 5}
    assert SamplingParams(logit_bias={"12": 3}).logit_bias == {12: 3.0}


def test_output_text_buffer_length_is_longest_stop_minus_one():
    assert SamplingParams(stop=["ab", "abcd"]).output_text_buffer_length == 3
    assert (
        SamplingParams(stop=["abcd"], include_stop_str_in_output=True).output_text_buffer_length
        == 0
    )
    assert SamplingParams().output_text_buffer_length == 0


def test_generation_config_eos_ids_become_stop_token_ids_unless_ignore_eos():
    params = SamplingParams()
    params.update_from_generation_config({"eos_token_id": 9}, model_eos_token_id=2)
    assert params.stop_token_ids == [9] and params.all_stop_token_ids == {2, 9}
    ignoring = SamplingParams(ignore_eos=True)
    ignoring.update_from_generation_config({"eos_token_id": [2, 9]}, model_eos_token_id=2)
    assert ignoring.stop_token_ids == [] and ignoring.all_stop_token_ids == {2, 9}


def test_clone_is_deep():
    params = SamplingParams(stop=["x"], logit_bias={1: 1.0})
    copy = params.clone()
    assert copy == params and copy is not params
    copy.stop.append("y")
    copy.logit_bias[2] = 2.0
    assert params.stop == ["x"] and params.logit_bias == {1: 1.0}


def test_repr_names_fields():
    text = repr(SamplingParams(temperature=0.5, stop="x"))
    assert text.startswith("SamplingParams(n=1, ")
    assert "temperature=0.5" in text and "stop=['x']" in text
