"""tokenizer_mode="mistral": a random Llama whose directory holds one of mistral_common's own
tokenizer files (Tekken, and SentencePiece v3), checked against mistral_common itself (prompt
ids, chat rendering, decoded text) and Hugging Face (greedy ids)."""

from __future__ import annotations

import os
import shutil

import pytest

from ember import LLM, SamplingParams
from tests.helpers import hf_greedy, write_random_llama

pytest.importorskip("mistral_common", reason="tokenizer_mode='mistral' needs mistral_common")

from mistral_common.protocol.instruct.messages import UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

_MAX_TOKENS = 12
# (file shipped in mistral_common's data, the name a model directory gives it, vocabulary size)
_TOKENIZERS = {
    "tekken": ("tekken_240911.json", "tekken.json", 131072),
    "spm_v3": ("mistral_instruct_tokenizer_240323.model.v3", "tokenizer.model.v3", 32768),
}
_PROMPTS = ["The weather in Zürich today is", "Hello, how are you? 🙂", "1, 2, 3,"]
_QUESTIONS = ["What is the capital of France?", "Name a colour."]


def _data_file(name: str) -> str:
    import mistral_common

    return os.path.join(os.path.dirname(mistral_common.__file__), "data", name)


@pytest.fixture(scope="module", params=sorted(_TOKENIZERS))
def model(request, tmp_path_factory):
    """(model directory, mistral_common tokenizer, HF model, ember LLM) for one tokenizer."""
    from transformers import AutoModelForCausalLM

    source, target, vocab_size = _TOKENIZERS[request.param]
    directory = tmp_path_factory.mktemp(f"mistral_{request.param}")
    write_random_llama(directory, vocab_size=vocab_size, hidden_size=32, intermediate_size=64)
    shutil.copy(_data_file(source), directory / target)
    reference = MistralTokenizer.from_file(str(directory / target))
    hf_model = AutoModelForCausalLM.from_pretrained(str(directory)).eval()
    llm = LLM(str(directory), tokenizer_mode="mistral", dtype="float32")
    yield directory, reference, hf_model, llm
    llm.shutdown()


def test_generate_encodes_and_decodes_as_mistral_common(model):
    _, reference, hf_model, llm = model
    params = SamplingParams(temperature=0.0, max_tokens=_MAX_TOKENS, ignore_eos=True)
    outputs = llm.generate(_PROMPTS, params, use_tqdm=False)
    inner = reference.instruct_tokenizer.tokenizer
    for prompt, output in zip(_PROMPTS, outputs):
        assert output.prompt_token_ids == inner.encode(prompt, bos=True, eos=False)
        completion = output.outputs[0]
        expected = hf_greedy(hf_model, output.prompt_token_ids, _MAX_TOKENS)
        assert completion.token_ids == expected[: len(completion.token_ids)]
        assert len(completion.token_ids) == _MAX_TOKENS
        # Decoded a few ids at a time, the text is what one decode of all of them gives
        # (the incremental decoder holds back a trailing incomplete character only).
        whole = reference.decode(completion.token_ids)
        assert whole.startswith(completion.text)
        assert len(whole) - len(completion.text) <= 1


def test_chat_renders_with_mistral_common_and_generates_as_hugging_face(model):
    _, reference, hf_model, llm = model
    params = SamplingParams(temperature=0.0, max_tokens=_MAX_TOKENS)
    conversations = [[{"role": "user", "content": q}] for q in _QUESTIONS]
    outputs = llm.chat(conversations, params, use_tqdm=False)
    for question, output in zip(_QUESTIONS, outputs):
        rendered = reference.encode_chat_completion(
            ChatCompletionRequest(messages=[UserMessage(content=question)])
        )
        assert output.prompt_token_ids == rendered.tokens
        assert output.prompt is None  # vLLM's: the conversation was rendered to ids only
        assert (
            output.outputs[0].token_ids
            == hf_greedy(hf_model, rendered.tokens, _MAX_TOKENS)[: len(output.outputs[0].token_ids)]
        )
    # OpenAI-style content parts render as the plain string does.
    parts = [{"role": "user", "content": [{"type": "text", "text": _QUESTIONS[0]}]}]
    assert llm.chat(parts, params, use_tqdm=False)[0].prompt_token_ids == (
        outputs[0].prompt_token_ids
    )


def test_chat_refusals_are_value_errors(model):
    _, _, _, llm = model
    with pytest.raises(ValueError, match="chat_template"):
        llm.chat([{"role": "user", "content": "hi"}], chat_template="{{ messages }}")
    with pytest.raises(ValueError, match="mistral_common refused"):
        llm.chat([{"role": "assistant", "content": "no user turn"}, {"role": "tool"}])


def test_structured_outputs_read_the_mistral_vocabulary(model):
    from ember.sampling_params import StructuredOutputsParams

    _, _, _, llm = model
    choices = ["yes", "no", "maybe"]
    params = SamplingParams(
        temperature=0.0,
        max_tokens=8,
        structured_outputs=StructuredOutputsParams(choice=choices),
    )
    outputs = llm.generate(_PROMPTS, params, use_tqdm=False)
    assert all(output.outputs[0].text in choices for output in outputs)


def test_a_directory_without_a_mistral_tokenizer_is_a_value_error(tiny_llama_dir):
    with pytest.raises(ValueError, match="tokenizer_mode='mistral'"):
        LLM(tiny_llama_dir, tokenizer_mode="mistral")
