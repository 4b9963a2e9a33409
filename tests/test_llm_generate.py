"""`LLM.generate` through the three processes: parity with Hugging Face, input forms, order,
per-prompt parameters, stop strings, and bad input refused in the user's process."""

from __future__ import annotations

import pytest
from transformers import AutoModelForCausalLM

from ember import LLM, SamplingParams
from tests.helpers import hf_greedy, random_prompts, write_random_llama
from tests.test_llama_parity import PROMPTS


@pytest.fixture(scope="module")
def smollm2(default_gguf):
    with LLM(default_gguf, dtype="float32") as llm:
        yield llm


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_random_llama(tmp_path_factory.mktemp("tiny"), max_position_embeddings=256)


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    with LLM(tiny_dir, dtype="float32", skip_tokenizer_init=True, block_size=4) as llm:
        yield llm


def test_smollm2_batch_matches_hf_greedy_through_processes(smollm2, hf_smollm2):
    params = SamplingParams(temperature=0.0, max_tokens=32)
    outputs = smollm2.generate(PROMPTS, params, use_tqdm=False)
    tokenizer = smollm2.get_tokenizer()
    for prompt, output in zip(PROMPTS, outputs):
        assert output.prompt == prompt
        assert output.prompt_token_ids == tokenizer(prompt).input_ids
        completion = output.outputs[0]
        assert completion.token_ids == hf_greedy(hf_smollm2, output.prompt_token_ids, 32)
        assert completion.text == tokenizer.decode(completion.token_ids, skip_special_tokens=True)
        assert output.finished and completion.finish_reason in ("stop", "length")


def test_random_llama_matches_hf_greedy_through_processes(tiny, tiny_dir):
    hf_model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    prompts = random_prompts(8, 512, [3, 9, 31, 64, 100, 17, 5, 44], seed=7)
    outputs = tiny.generate(prompts, SamplingParams(temperature=0.0, max_tokens=24))
    for prompt, output in zip(prompts, outputs):
        assert output.outputs[0].token_ids == hf_greedy(hf_model, prompt, 24)


def test_200_prompts_come_back_in_order_with_their_own_max_tokens(tiny):
    prompts = random_prompts(200, 512, [1, 7, 40, 13, 90, 2, 66], seed=2)
    params = [
        SamplingParams(temperature=0.0, max_tokens=1 + i % 9, ignore_eos=True) for i in range(200)
    ]
    outputs = tiny.generate(prompts, params, use_tqdm=False)
    assert len(outputs) == 200
    for i, (prompt, output) in enumerate(zip(prompts, outputs)):
        assert output.prompt_token_ids == prompt
        assert len(output.outputs[0].token_ids) == 1 + i % 9
        assert output.outputs[0].finish_reason == "length"
    assert len({o.request_id for o in outputs}) == 200


def test_every_prompt_form_is_accepted(smollm2):
    tokenizer = smollm2.get_tokenizer()
    ids = tokenizer("Hello there").input_ids
    params = SamplingParams(temperature=0.0, max_tokens=3)
    forms = [
        "Hello there",
        ["Hello there", "Hello there"],
        ids,
        [ids, ids],
        {"prompt": "Hello there"},
        [{"prompt_token_ids": ids}],
    ]
    expected = smollm2.generate("Hello there", params, use_tqdm=False)[0].outputs[0].token_ids
    for form in forms:
        for output in smollm2.generate(form, params, use_tqdm=False):
            assert output.prompt_token_ids == ids
            assert output.outputs[0].token_ids == expected


def test_stop_string_ends_the_text_and_is_reported(smollm2):
    params = SamplingParams(temperature=0.0, max_tokens=40, stop=["answer"])
    output = smollm2.generate("The capital of France is", params, use_tqdm=False)[0]
    completion = output.outputs[0]
    assert completion.finish_reason == "stop" and completion.stop_reason == "answer"
    assert completion.text == " Paris.\n\nThe "
    # The engine was told to stop: the next call starts from a clean engine.
    again = smollm2.generate("The capital of France is", params, use_tqdm=False)[0]
    assert again.outputs[0].text == completion.text


def test_generate_empty_list_returns_empty_list(tiny):
    assert tiny.generate([]) == []


@pytest.mark.parametrize(
    "prompt,match",
    [
        ([], "empty"),
        ([5] * 300, r"300 tokens.*max_model_len=256"),
        ([5, 512], r"token id 512.*\[0, 512\)"),
        ([-1, 5], r"token id -1"),
    ],
)
def test_bad_prompts_raise_before_anything_is_sent(tiny, prompt, match):
    with pytest.raises(ValueError, match=match):
        tiny.generate([[7, 8], prompt], use_tqdm=False)
    # Nothing was queued: the engine serves the next call normally.
    output = tiny.generate([[7, 8]], SamplingParams(max_tokens=2, ignore_eos=True))
    assert len(output[0].outputs[0].token_ids) == 2


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"temperature": -0.5}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
    ],
)
def test_bad_sampling_params_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_unsupported_and_unknown_options_are_refused(tiny, tiny_dir):
    with pytest.raises(ValueError, match="max_logprobs=20"):
        tiny.generate([[1, 2]], SamplingParams(logprobs=21))
    with pytest.raises(ValueError, match="allowed_token_ids holds token id 512"):
        tiny.generate([[1, 2]], SamplingParams(allowed_token_ids=[3, 512]))
    with pytest.raises(ValueError, match="logit_bias holds token id 900"):
        tiny.generate([[1, 2]], SamplingParams(logit_bias={900: 1.0}))
    with pytest.raises(ValueError, match="bad_words needs a tokenizer"):
        tiny.generate([[1, 2]], SamplingParams(bad_words=["x"]))
    with pytest.raises(ValueError, match="one per prompt"):
        tiny.generate([[1, 2], [3]], [SamplingParams()])
    with pytest.raises(TypeError, match="max_num_seqqs"):
        LLM(tiny_dir, max_num_seqqs=4)
    with pytest.raises(NotImplementedError, match="quantization='bitsandbytes'"):
        LLM(tiny_dir, quantization="bitsandbytes")
    with pytest.raises(ValueError, match="no quantization_config"):
        LLM(tiny_dir, quantization="awq")
    with pytest.raises(ValueError, match="max_model_len=100000"):
        LLM(tiny_dir, max_model_len=100000)


def test_cache_salt_keeps_prefix_cache_blocks_apart(tiny):
    prompt = random_prompts(1, 512, [41], seed=11)[0]
    params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)

    def cached(salt):
        request = {"prompt_token_ids": prompt, "cache_salt": salt}
        return tiny.generate([request], params, use_tqdm=False)[0].num_cached_tokens

    assert cached("alice") == 0
    assert cached("bob") == 0  # same tokens, other salt: no hit
    assert cached("alice") == 40  # ten full blocks of 4; the last prompt token is computed


def test_enqueue_then_wait_for_completion_equals_generate(smollm2):
    """vLLM's enqueue / enqueue_chat / wait_for_completion: the same outputs as generate and
    chat, in enqueue order; a generate call in between keeps the enqueued outputs."""
    from ember import RequestOutput

    params = SamplingParams(temperature=0.0, max_tokens=8)
    prompts = ["The capital of France is", "Water boils at", "One, two,"]
    conversation = [{"role": "user", "content": "Name a colour."}]
    expected = [o.outputs[0].token_ids for o in smollm2.generate(prompts, params, use_tqdm=False)]
    expected_chat = smollm2.chat(conversation, params, use_tqdm=False)[0].outputs[0].token_ids

    ids = smollm2.enqueue(prompts[:2], params)
    ids += smollm2.enqueue_chat(conversation, params)
    assert len(ids) == len(set(ids)) == 3
    between = smollm2.generate(prompts[2:], params, use_tqdm=False)  # served meanwhile
    assert between[0].outputs[0].token_ids == expected[2]
    outputs = smollm2.wait_for_completion(RequestOutput, use_tqdm=False)
    assert [o.request_id for o in outputs] == ids
    assert [o.outputs[0].token_ids for o in outputs] == [*expected[:2], expected_chat]
    assert smollm2.wait_for_completion() == []  # nothing left
    with pytest.raises(NotImplementedError, match="mm_processor_kwargs"):
        smollm2.enqueue(prompts, params, mm_processor_kwargs={"size": 1})
    smollm2.reset_mm_cache()  # no multimodal cache: accepted


def test_from_engine_args_builds_the_same_engine(tiny_dir):
    from ember import EngineArgs

    args = EngineArgs(model=tiny_dir, dtype="float32", skip_tokenizer_init=True, max_model_len=64)
    with LLM.from_engine_args(args) as llm:
        assert llm.max_model_len == 64
        output = llm.generate([[1, 2, 3]], SamplingParams(temperature=0.0, max_tokens=4))[0]
        assert len(output.outputs[0].token_ids) == 4
    with pytest.raises(TypeError, match="engine_args"):
        LLM.from_engine_args({"model": tiny_dir})
