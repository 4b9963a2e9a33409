"""vLLM's prompt and call forms: `TokensPrompt` / `TextPrompt` / `PromptType` from `ember` and
`ember.inputs`, `tokenization_kwargs` (truncation against a Hugging Face tokenizer loaded as
vLLM loads it), `chat_template_content_format`, `LLM(chat_template=...)` and `tokenizer_mode`."""

from __future__ import annotations

import os
import shutil

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

import ember
import ember.inputs
from ember import LLM, EngineArgs, PromptType, SamplingParams, TextPrompt, TokensPrompt
from ember.chat_content import detect_content_format, load_chat_template
from ember.chat_utils import render_chat_prompts
from ember.inputs import tokenize_options, tokenize_prompt
from ember.workers.model_loader.gguf_files import gguf_tokenizer_dir
from tests.helpers import write_random_llama

_TEXT = "The quick brown fox jumps over the lazy dog and runs far away"
_GREEDY = SamplingParams(temperature=0.0, max_tokens=4)
# LLM(chat_template=...): the role and the content, as a string, of each message
_DEFAULT_TEMPLATE = "{% for m in messages %}[{{ m['role'] }}:{{ m['content'] }}]{% endfor %}"
# a template that iterates over the parts of each message's content ("openai" format)
_PARTS_TEMPLATE = (
    "{% for m in messages %}[{{ m.role }}:{% for p in m['content'] %}<{{ p.text }}>"
    "{% endfor %}]{% endfor %}"
)
_MESSAGES = [
    {"role": "system", "content": [{"type": "text", "text": "Be terse."}, "Very."]},
    {"role": "user", "content": "Hi"},
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, default_gguf):
    """A random Llama with SmolLM2's tokenizer and chat template."""
    directory = tmp_path_factory.mktemp("prompt_types")
    write_random_llama(directory, vocab_size=49152)
    tokenizer_dir = gguf_tokenizer_dir(default_gguf)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(os.path.join(tokenizer_dir, name), directory)
    return str(directory)


@pytest.fixture(scope="module")
def llm(model_dir):
    with LLM(
        model_dir, dtype="float32", tokenizer_mode="hf", chat_template=_DEFAULT_TEMPLATE
    ) as engine:
        yield engine


@pytest.fixture(scope="module")
def left_tokenizer(model_dir):
    """The oracle: the model's tokenizer loaded as vLLM loads a generative model's."""
    return AutoTokenizer.from_pretrained(model_dir, truncation_side="left")


def test_prompt_types_import_from_ember_and_ember_inputs():
    assert ember.inputs.TokensPrompt is TokensPrompt
    assert ember.inputs.TextPrompt is TextPrompt
    assert ember.inputs.PromptType is PromptType
    assert {"TokensPrompt", "TextPrompt", "PromptType"} <= set(ember.__all__)
    assert TokensPrompt(prompt_token_ids=[1, 2]) == {"prompt_token_ids": [1, 2]}


def test_generate_accepts_tokens_and_text_prompts(llm):
    token_ids = llm.get_tokenizer().encode(_TEXT)
    forms = [_TEXT, token_ids, TextPrompt(prompt=_TEXT), TokensPrompt(prompt_token_ids=token_ids)]
    outputs = llm.generate(forms, _GREEDY, use_tqdm=False)
    for output in outputs:
        assert output.prompt_token_ids == token_ids
        assert output.outputs[0].token_ids == outputs[0].outputs[0].token_ids
    assert outputs[2].prompt == _TEXT and outputs[3].prompt is None


def test_embeds_and_multimodal_prompts_are_not_supported(llm):
    with pytest.raises(NotImplementedError, match="prompt_embeds"):
        llm.generate({"prompt_embeds": [[0.0]]}, _GREEDY, use_tqdm=False)
    with pytest.raises(NotImplementedError, match="multi_modal_data"):
        llm.generate({"prompt": "x", "multi_modal_data": {"image": 1}}, _GREEDY, use_tqdm=False)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"truncation": True, "max_length": 5},
        {"truncate_prompt_tokens": 3},
        {"truncate_prompt_tokens": 4, "truncation_side": "right"},
    ],
)
def test_tokenization_kwargs_truncate_as_the_tokenizer_does(llm, left_tokenizer, kwargs):
    keep = kwargs.get("max_length") or kwargs["truncate_prompt_tokens"]
    left_tokenizer.truncation_side = kwargs.get("truncation_side", "left")
    try:
        expected = left_tokenizer(_TEXT, truncation=True, max_length=keep)["input_ids"]
    finally:
        left_tokenizer.truncation_side = "left"
    (text_output, ids_output) = llm.generate(
        [_TEXT, TokensPrompt(prompt_token_ids=left_tokenizer.encode(_TEXT))],
        _GREEDY,
        use_tqdm=False,
        tokenization_kwargs=kwargs,
    )
    assert text_output.prompt_token_ids == expected == ids_output.prompt_token_ids
    assert len(expected) == keep


def test_default_truncation_keeps_the_special_tokens_the_tokenizer_adds(model_dir):
    """SmolLM2 adds no BOS; a tokenizer that does keeps it when it truncates on the left."""
    from tokenizers.processors import TemplateProcessing

    tokenizer = PreTrainedTokenizerFast(tokenizer_file=os.path.join(model_dir, "tokenizer.json"))
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", 1)]
    )
    tokenizer.truncation_side = "left"
    expected = tokenizer(_TEXT, truncation=True, max_length=5)["input_ids"]
    assert expected[0] == 1 and len(expected) == 5
    tokenizer.truncation_side = "right"  # ember's truncation does not depend on it
    options = tokenize_options({"truncation": True, "max_length": 5}, 256)
    assert tokenize_prompt(_TEXT, tokenizer, 0, options).prompt_token_ids == expected
    sliced = tokenize_options({"truncate_prompt_tokens": 5, "truncation_side": "left"}, 256)
    assert (
        tokenize_prompt(_TEXT, tokenizer, 0, sliced).prompt_token_ids
        == (tokenizer.encode(_TEXT)[-5:])
    )


def test_tokenization_kwargs_padding_lowercase_and_errors(llm, left_tokenizer):
    (padded,) = llm.generate(
        _TEXT,
        _GREEDY,
        use_tqdm=False,
        tokenization_kwargs={"padding": "max_length", "max_length": 20},
    )
    ids = left_tokenizer.encode(_TEXT)
    assert padded.prompt_token_ids == ids + [left_tokenizer.pad_token_id] * (20 - len(ids))
    (lower,) = llm.generate(
        _TEXT, _GREEDY, use_tqdm=False, tokenization_kwargs={"do_lower_case": True}
    )
    assert lower.prompt_token_ids == left_tokenizer.encode(_TEXT.lower())
    with pytest.raises(ValueError, match="truncation_side"):
        llm.generate(_TEXT, _GREEDY, tokenization_kwargs={"truncation_side": "middle"})
    with pytest.raises(ValueError, match="truncate_prompt_tokens"):
        llm.generate(_TEXT, _GREEDY, tokenization_kwargs={"truncate_prompt_tokens": 10**6})
    with pytest.raises(TypeError, match="tokenization_kwargs"):
        llm.generate(_TEXT, _GREEDY, tokenization_kwargs=[("truncation", True)])


def test_content_format_string_flattens_openai_parts(llm):
    tokenizer = llm.get_tokenizer()
    (auto,) = render_chat_prompts(tokenizer, _MESSAGES, chat_template_content_format="auto")
    (string,) = render_chat_prompts(tokenizer, _MESSAGES, chat_template_content_format="string")
    flat = [{"role": "system", "content": "Be terse.\nVery."}, {"role": "user", "content": "Hi"}]
    expected = tokenizer.apply_chat_template(flat, add_generation_prompt=True, tokenize=False)
    assert auto["prompt"] == string["prompt"] == expected
    (parts,) = render_chat_prompts(
        tokenizer, _MESSAGES, chat_template=_PARTS_TEMPLATE, chat_template_content_format="openai"
    )
    assert parts["prompt"] == "[system:<Be terse.><Very.>][user:<Hi>]"
    with pytest.raises(ValueError, match="chat_template_content_format"):
        render_chat_prompts(tokenizer, _MESSAGES, chat_template_content_format="xml")


def test_auto_content_format_reads_the_template(llm):
    assert detect_content_format(llm.get_tokenizer().chat_template) == "string"
    assert detect_content_format(_DEFAULT_TEMPLATE) == "string"
    assert detect_content_format(_PARTS_TEMPLATE) == "openai"
    through_macro = (
        "{% macro show(parts) %}{% for p in parts %}{{ p.text }}{% endfor %}{% endmacro %}"
        "{% for m in messages %}{{ show(m.content) }}{% endfor %}"
    )
    assert detect_content_format(through_macro) == "openai"
    (output,) = llm.chat(_MESSAGES, _GREEDY, chat_template=_PARTS_TEMPLATE, use_tqdm=False)
    assert output.prompt == "[system:<Be terse.><Very.>][user:<Hi>]"


def test_llm_chat_template_is_the_default_of_chat(llm, tmp_path):
    (output,) = llm.chat(_MESSAGES, _GREEDY, use_tqdm=False)
    assert output.prompt == "[system:Be terse.\nVery.][user:Hi]"
    assert output.prompt_token_ids == llm.get_tokenizer().encode(output.prompt)
    (truncated,) = llm.chat(
        _MESSAGES, _GREEDY, use_tqdm=False, tokenization_kwargs={"truncate_prompt_tokens": 4}
    )
    assert truncated.prompt_token_ids == output.prompt_token_ids[-4:]
    path = tmp_path / "template.jinja"
    path.write_text(_PARTS_TEMPLATE)
    assert load_chat_template(str(path)) == load_chat_template(path) == _PARTS_TEMPLATE
    assert load_chat_template(_DEFAULT_TEMPLATE) == _DEFAULT_TEMPLATE
    with pytest.raises(ValueError, match="chat_template"):
        load_chat_template("no_such_template.jinja")


def test_tokenizer_modes(model_dir):
    assert EngineArgs(model=model_dir, tokenizer_mode="hf").create_engine_config()
    with pytest.raises(NotImplementedError, match="deepseek_v32"):
        LLM(model_dir, tokenizer_mode="deepseek_v32")
    with pytest.raises(ValueError, match="tokenizer_mode='mistral'"):  # no mistral files here
        LLM(model_dir, tokenizer_mode="mistral")
    with pytest.raises(ValueError, match="tokenizer_mode"):
        EngineArgs(model=model_dir, tokenizer_mode="fast").create_engine_config()
