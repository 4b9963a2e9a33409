"""vLLM's generation config: `generation_config` ("auto", "vllm", a directory),
`override_generation_config`, `LLM.get_default_sampling_params()` against Hugging Face's
`GenerationConfig` as the oracle, and `generate(..., sampling_params=None)` using them."""

from __future__ import annotations

import json
import logging

import pytest
from transformers import GenerationConfig

from ember import LLM, EngineArgs, SamplingParams
from ember.enginecore.generation_config import SAMPLING_FIELDS
from tests.helpers import random_prompts, write_random_llama

_GENERATION_CONFIG = {
    "bos_token_id": 1,
    "eos_token_id": 2,
    "do_sample": True,
    "temperature": 0.6,
    "top_p": 0.9,
    "top_k": 20,
    "min_p": 0.05,
    "repetition_penalty": 1.1,
    "presence_penalty": 0.2,
    "max_new_tokens": 9,
    "max_length": 100,  # not a sampling field: vLLM ignores it
}
_OVERRIDE = {"temperature": 0.0}  # greedy, so that generate(None) can be checked exactly


def _write_generation_config(directory, config: dict) -> str:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "generation_config.json").write_text(json.dumps(config))
    return str(directory)


def _hf_defaults(directory: str, override: dict | None = None) -> dict:
    """The oracle: Hugging Face's reading of the directory, through vLLM's field mapping."""
    config = GenerationConfig.from_pretrained(directory).to_diff_dict()
    config.update(override or {})
    fields = {name: config[name] for name in SAMPLING_FIELDS if config.get(name) is not None}
    if "max_new_tokens" in fields:
        fields["max_tokens"] = fields.pop("max_new_tokens")
    return fields


def _defaults(model: str, **kwargs) -> dict:
    return EngineArgs(model=model, **kwargs).create_engine_config().model.default_sampling_params


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("gen_config")
    write_random_llama(directory, vocab_size=256)
    return _write_generation_config(directory, _GENERATION_CONFIG)  # over transformers' own


@pytest.fixture(scope="module")
def llm(model_dir):
    with LLM(
        model_dir,
        dtype="float32",
        skip_tokenizer_init=True,
        override_generation_config=_OVERRIDE,
    ) as engine:
        yield engine


def test_default_params_are_the_model_generation_config_with_override(llm, model_dir):
    expected = _hf_defaults(model_dir, _OVERRIDE)
    assert expected["temperature"] == 0.0 and expected["max_tokens"] == 9
    assert llm.get_default_sampling_params() == SamplingParams(**expected)
    params = llm.get_default_sampling_params()
    assert (params.top_k, params.top_p, params.min_p) == (0, 1.0, 0.0)  # greedy resets them
    assert (params.repetition_penalty, params.presence_penalty) == (1.1, 0.2)


def test_generate_without_params_uses_the_defaults(llm):
    prompts = random_prompts(3, 256, [5, 9, 7], seed=3)
    defaults = llm.generate(prompts, use_tqdm=False)
    explicit = llm.generate(prompts, llm.get_default_sampling_params(), use_tqdm=False)
    plain_greedy = llm.generate(prompts, SamplingParams(temperature=0.0), use_tqdm=False)
    for default, same, other in zip(defaults, explicit, plain_greedy):
        assert default.outputs[0].token_ids == same.outputs[0].token_ids
        assert len(default.outputs[0].token_ids) <= 9  # max_new_tokens
        assert default.outputs[0].token_ids != other.outputs[0].token_ids


def test_first_call_logs_the_overridden_defaults(llm, caplog):
    llm.default_sampling_params = None  # as after construction
    with caplog.at_level(logging.WARNING, logger="ember.enginecore.generation_config"):
        llm.get_default_sampling_params()
        llm.get_default_sampling_params()
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1
    assert "overridden by the model's `generation_config.json`" in messages[0]
    assert "'max_tokens': 9" in messages[0]


def test_vllm_source_gives_sampling_params_defaults(model_dir):
    assert _defaults(model_dir, generation_config="vllm") == {}
    override = {"temperature": 0.5, "max_new_tokens": 3}
    assert _defaults(model_dir, generation_config="vllm", override_generation_config=override) == {
        "temperature": 0.5,
        "max_tokens": 3,
    }


def test_auto_reads_the_model_directory(model_dir):
    assert _defaults(model_dir) == _hf_defaults(model_dir)


def test_directory_source_and_override_win(model_dir, tmp_path):
    # do_sample=false is not read (vLLM): the temperature counts as written
    other = _write_generation_config(
        tmp_path / "other", {"do_sample": False, "temperature": 0.7, "eos_token_id": [2, 7]}
    )
    assert (
        _defaults(model_dir, generation_config=other) == _hf_defaults(other) == {"temperature": 0.7}
    )
    override = {"temperature": 0.3, "top_k": None, "max_new_tokens": 4}
    assert _defaults(model_dir, override_generation_config=override) == _hf_defaults(
        model_dir, override
    )
    config = EngineArgs(model=model_dir, generation_config=other).create_engine_config()
    assert config.model.eos_token_ids == (2, 7)  # the directory's extra EOS id stops too


def test_gguf_model_has_no_generation_defaults(default_gguf):
    assert _defaults(default_gguf) == {}


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"generation_config": "/no/such/dir"}, ValueError),
        ({"generation_config": 3}, TypeError),
        ({"override_generation_config": ["temperature"]}, TypeError),
        ({"override_generation_config": "{not json"}, ValueError),
    ],
)
def test_bad_generation_config_arguments_are_refused(model_dir, kwargs, error):
    name = next(iter(kwargs))
    with pytest.raises(error, match=name):
        EngineArgs(model=model_dir, **kwargs).create_engine_config()
