"""Structured outputs through the three processes, on SmolLM2's real weights.

The oracle for greedy decoding is Hugging Face `generate` on the same weights with xgrammar's own
Hugging Face logits processor: ember's constrained token ids must equal it. Sampled outputs are
checked by what they must satisfy (`jsonschema`, `re.fullmatch`, the choices, a parser).
"""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from ember import LLM, GuidedDecodingParams, SamplingParams, StructuredOutputsParams
from tests.helpers import hf_greedy, write_random_llama

PERSON_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 12}},
            "required": ["city"],
        },
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 2},
    },
    "required": ["name", "age", "role", "address", "tags"],
    "additionalProperties": False,
}

ARITHMETIC_GRAMMAR = r"""
root ::= expr
expr ::= term (("+" | "-") term)*
term ::= factor (("*" | "/") factor)*
factor ::= number | "(" expr ")"
number ::= [1-9] [0-9]{0,2}
"""


def _chat_prompt(tokenizer, text: str) -> str:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    )


@pytest.fixture(scope="module")
def llm(default_gguf):
    with LLM(default_gguf, dtype="float32") as engine:
        yield engine


@pytest.fixture(scope="module")
def tokenizer(llm):
    return llm.get_tokenizer()


@pytest.fixture(scope="module")
def xgrammar_compiler(tokenizer, hf_smollm2):
    xgr = pytest.importorskip("xgrammar")
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=hf_smollm2.config.vocab_size)
    return xgr.GrammarCompiler(info)


def _hf_constrained_greedy(model, compiled, prompt_ids: list[int], max_new_tokens: int):
    """Hugging Face greedy decoding under xgrammar's own logits processor: the oracle."""
    import xgrammar as xgr

    processor = xgr.contrib.hf.LogitsProcessor(compiled)
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt_ids]),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            logits_processor=[processor],
            pad_token_id=model.generation_config.eos_token_id,
        )
    return out[0, len(prompt_ids) :].tolist()


def _parse_arithmetic(text: str) -> None:
    """A recursive-descent checker of ARITHMETIC_GRAMMAR; raises ValueError when it fails."""
    position = 0

    def number() -> None:
        nonlocal position
        match = re.compile(r"[1-9][0-9]{0,2}").match(text, position)
        if match is None:
            raise ValueError(f"number expected at {position} in {text!r}")
        position = match.end()

    def factor() -> None:
        nonlocal position
        if text.startswith("(", position):
            position += 1
            expr()
            if not text.startswith(")", position):
                raise ValueError(f"')' expected at {position} in {text!r}")
            position += 1
        else:
            number()

    def term() -> None:
        nonlocal position
        factor()
        while position < len(text) and text[position] in "*/":
            position += 1
            factor()

    def expr() -> None:
        nonlocal position
        term()
        while position < len(text) and text[position] in "+-":
            position += 1
            term()

    expr()
    if position != len(text):
        raise ValueError(f"trailing text at {position} in {text!r}")


# ---- greedy against the oracle -------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "spec", "question"),
    [
        ("json", PERSON_SCHEMA, "Describe a person called Ann as JSON."),
        ("regex", r"\d{3}-\d{4}", "Give me a phone number."),
        ("choice", ["positive", "negative", "neutral"], "Is 'I love it' positive or negative?"),
    ],
)
def test_greedy_matches_hf_under_xgrammar_processor(
    llm, tokenizer, hf_smollm2, xgrammar_compiler, kind, spec, question
):
    prompt = _chat_prompt(tokenizer, question)
    constraint = StructuredOutputsParams(**{kind: spec})
    params = SamplingParams(temperature=0.0, max_tokens=120, structured_outputs=constraint)
    output = llm.generate([prompt], params, use_tqdm=False)[0]
    completion = output.outputs[0]
    if kind == "json":
        compiled = xgrammar_compiler.compile_json_schema(json.dumps(spec))
    elif kind == "regex":
        compiled = xgrammar_compiler.compile_regex(spec)
    else:
        compiled = xgrammar_compiler.compile_regex("|".join(re.escape(c) for c in spec))
    expected = _hf_constrained_greedy(hf_smollm2, compiled, output.prompt_token_ids, 120)
    assert completion.token_ids == expected
    assert completion.finish_reason == "stop"
    assert constraint._backend == "xgrammar"
    text = completion.text
    if kind == "json":
        jsonschema.validate(json.loads(text), spec)
    elif kind == "regex":
        assert re.fullmatch(spec, text)
    else:
        assert text in spec


# ---- sampled outputs satisfy their constraint ------------------------------------------------


def test_sampled_json_schema_outputs_validate(llm, tokenizer):
    prompt = _chat_prompt(tokenizer, "Describe a person as JSON.")
    params = SamplingParams(
        n=4,
        temperature=0.8,
        seed=11,
        max_tokens=200,
        structured_outputs=StructuredOutputsParams(json=json.dumps(PERSON_SCHEMA)),
    )
    output = llm.generate([prompt], params, use_tqdm=False)[0]
    assert len(output.outputs) == 4
    for completion in output.outputs:
        assert completion.finish_reason == "stop", completion.text
        jsonschema.validate(json.loads(completion.text), PERSON_SCHEMA)


def test_json_object_regex_choice_and_grammar_sampled(llm, tokenizer):
    prompts = [
        _chat_prompt(tokenizer, "Give a JSON object about a cat."),
        _chat_prompt(tokenizer, "Write a date."),
        _chat_prompt(tokenizer, "Pick a colour."),
        _chat_prompt(tokenizer, "Write an arithmetic expression."),
    ]
    constraints = [
        StructuredOutputsParams(json_object=True),
        StructuredOutputsParams(regex=r"20[0-9]{2}-(0[1-9]|1[0-2])-[0-2][0-9]"),
        StructuredOutputsParams(choice=["red", "green", "blue"]),
        StructuredOutputsParams(grammar=ARITHMETIC_GRAMMAR),
    ]
    params = [
        SamplingParams(temperature=0.7, seed=3, max_tokens=150, structured_outputs=c)
        for c in constraints
    ]
    obj, date, colour, expression = [
        o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)
    ]
    assert obj.finish_reason == "stop" and isinstance(json.loads(obj.text), dict)
    assert re.fullmatch(r"20[0-9]{2}-(0[1-9]|1[0-2])-[0-2][0-9]", date.text)
    assert colour.text in ("red", "green", "blue")
    assert expression.finish_reason == "stop"
    _parse_arithmetic(expression.text)


def test_mixed_batch_leaves_unconstrained_requests_alone(llm, tokenizer, hf_smollm2):
    free_prompts = ["The capital of France is", "def fibonacci(n):"]
    prompts = [free_prompts[0], _chat_prompt(tokenizer, "Yes or no?"), free_prompts[1]]
    free = SamplingParams(temperature=0.0, max_tokens=16)
    choice = SamplingParams(
        temperature=0.0,
        max_tokens=8,
        structured_outputs=StructuredOutputsParams(choice=["yes", "no"]),
    )
    outputs = llm.generate(prompts, [free, choice, free], use_tqdm=False)
    assert outputs[1].outputs[0].text in ("yes", "no")
    for index in (0, 2):
        ids = outputs[index].prompt_token_ids
        assert outputs[index].outputs[0].token_ids == hf_greedy(hf_smollm2, ids, 16)


def test_chat_under_schema(llm):
    schema = {
        "type": "object",
        "properties": {"answer": {"type": "integer", "minimum": 0, "maximum": 100}},
        "required": ["answer"],
    }
    params = SamplingParams(
        temperature=0.0, max_tokens=40, structured_outputs=StructuredOutputsParams(json=schema)
    )
    output = llm.chat(
        [{"role": "user", "content": "What is 2 + 3? Answer in JSON."}], params, use_tqdm=False
    )[0]
    jsonschema.validate(json.loads(output.outputs[0].text), schema)


def test_guided_decoding_spelling_gives_the_same_output(llm, tokenizer):
    prompt = _chat_prompt(tokenizer, "Give me a phone number.")
    new = SamplingParams(
        temperature=0.0,
        max_tokens=20,
        structured_outputs=StructuredOutputsParams(regex=r"\d{3}-\d{4}"),
    )
    old = SamplingParams(
        temperature=0.0, max_tokens=20, guided_decoding=GuidedDecodingParams(regex=r"\d{3}-\d{4}")
    )
    new_out, old_out = llm.generate([prompt, prompt], [new, old], use_tqdm=False)
    assert old_out.outputs[0].token_ids == new_out.outputs[0].token_ids
    assert re.fullmatch(r"\d{3}-\d{4}", old_out.outputs[0].text)


def test_unfinishable_grammar_ends_with_length_and_partial_text(llm, tokenizer):
    prompt = _chat_prompt(tokenizer, "Count.")
    params = SamplingParams(
        temperature=0.0, max_tokens=5, structured_outputs=StructuredOutputsParams(regex="a{500}")
    )
    completion = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
    assert completion.finish_reason == "length"
    assert len(completion.token_ids) == 5
    assert completion.text and set(completion.text) == {"a"}


# ---- bad input: refused in the user's process, and the engine serves on ---------------------


@pytest.mark.parametrize(
    ("constraint", "field"),
    [
        ({"json": {"type": "object", "properties": {"a": {"type": "nonsense"}}}}, "json"),
        ({"regex": "a(b"}, "regex"),
        ({"grammar": "root ::= ("}, "grammar"),
    ],
)
def test_invalid_constraint_raises_before_any_work(llm, tokenizer, constraint, field):
    bad = SamplingParams(max_tokens=4, structured_outputs=StructuredOutputsParams(**constraint))
    good = SamplingParams(temperature=0.0, max_tokens=4)
    with pytest.raises(ValueError, match=f"structured_outputs.{field}"):
        llm.generate(["Hello", "Hello"], [good, bad], use_tqdm=False)
    assert llm.get_metrics().get("num_requests_running", 0) == 0
    again = llm.generate(["Hello"], good, use_tqdm=False)[0]
    assert len(again.outputs[0].token_ids) == 4


def test_construction_errors_name_the_field():
    with pytest.raises(ValueError, match="exactly one constraint"):
        StructuredOutputsParams(regex="a", choice=["a"])
    with pytest.raises(ValueError, match="needs one constraint"):
        StructuredOutputsParams()
    with pytest.raises(ValueError, match="structured_outputs.choice"):
        StructuredOutputsParams(choice=[])
    with pytest.raises(ValueError, match="structured_outputs.json"):
        StructuredOutputsParams(json="{not json")
    with pytest.raises(TypeError, match="structured_outputs.regex"):
        StructuredOutputsParams(regex=3)
    with pytest.raises(ValueError, match="json_object"):
        StructuredOutputsParams(json_object=False)
    with pytest.raises(TypeError, match="structured_outputs must be"):
        SamplingParams(structured_outputs={"regex": "a"})
    with pytest.raises(ValueError, match="not both"):
        SamplingParams(
            structured_outputs=StructuredOutputsParams(regex="a"),
            guided_decoding=GuidedDecodingParams(regex="a"),
        )


def test_engine_config_errors_name_the_field(default_gguf):
    with pytest.raises(ValueError, match="structured_outputs_config.backend"):
        LLM(default_gguf, structured_outputs_config={"backend": "nonsense"})
    with pytest.raises(TypeError, match="no field 'colour'"):
        LLM(default_gguf, structured_outputs_config={"colour": "red"})
    with pytest.raises(ValueError, match="disable_additional_properties"):
        LLM(
            default_gguf,
            structured_outputs_config={
                "backend": "xgrammar",
                "disable_additional_properties": True,
            },
        )


# ---- backends, preemption and tensor parallelism ----------------------------------------------


@pytest.fixture(scope="module")
def random_model_with_tokenizer(tmp_path_factory, tokenizer):
    """A small random Llama over SmolLM2's vocabulary, with its tokenizer, for engines that
    need a second configuration (tensor parallelism, a tiny KV cache)."""
    path = tmp_path_factory.mktemp("random_smollm2_vocab")
    write_random_llama(path, vocab_size=len(tokenizer), max_position_embeddings=512)
    tokenizer.save_pretrained(str(path))
    return str(path)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["guidance", "outlines"])
def test_other_backends_constrain_outputs(random_model_with_tokenizer, backend):
    with LLM(
        random_model_with_tokenizer,
        dtype="float32",
        structured_outputs_config={"backend": backend},
    ) as engine:
        params = [
            SamplingParams(
                temperature=1.0,
                seed=5,
                max_tokens=12,
                structured_outputs=StructuredOutputsParams(regex=r"[0-9]{2}-[a-c]{3}"),
            ),
            SamplingParams(
                temperature=1.0,
                seed=6,
                max_tokens=12,
                structured_outputs=StructuredOutputsParams(choice=["alpha", "beta"]),
            ),
        ]
        regex_out, choice_out = engine.generate(["One", "Two"], params, use_tqdm=False)
    assert params[0].structured_outputs._backend == backend
    assert re.fullmatch(r"[0-9]{2}-[a-c]{3}", regex_out.outputs[0].text)
    assert choice_out.outputs[0].text in ("alpha", "beta")


@pytest.mark.slow
def test_tensor_parallel_and_preemption_keep_grammar_state(random_model_with_tokenizer):
    """The same constrained greedy requests at TP=1, at TP=2, and with a KV cache so small
    that requests are preempted and recomputed: the same tokens, all matching."""
    # At least one token per character: six requests of 10 + 42 tokens outgrow the small
    # cache's 27 blocks of 4 tokens, so some are preempted and recomputed.
    pattern = r"[0-9]( [0-9]){20}"
    prompts = [[5 + i, 17, 300 + 7 * i, 29, 41] * 2 for i in range(6)]
    params = SamplingParams(
        temperature=0.0, max_tokens=60, structured_outputs=StructuredOutputsParams(regex=pattern)
    )
    results = {}
    settings = {
        "tp1": {},
        "tp2": {"tensor_parallel_size": 2},
        "preempted": {"block_size": 4, "num_gpu_blocks_override": 28, "max_model_len": 96},
    }
    for name, options in settings.items():
        with LLM(random_model_with_tokenizer, dtype="float32", **options) as engine:
            outputs = engine.generate(prompts, params, use_tqdm=False)
            stats = engine.engine.call_utility("get_stats")
        results[name] = [o.outputs[0].token_ids for o in outputs]
        for output in outputs:
            assert re.fullmatch(pattern, output.outputs[0].text)
        if name == "preempted":
            assert stats["num_preemptions"] > 0
    assert results["tp2"] == results["tp1"]
    assert results["preempted"] == results["tp1"]
