"""Sampling parameters end to end through `LLM.generate`, each against a reference: a greedy loop
over Hugging Face's logits with the rule applied by hand (penalties, logit_bias,
allowed_token_ids, min_tokens, bad words), and Hugging Face's log_softmax for logprobs."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from ember import LLM, SamplingParams
from ember.sampling_params import BeamSearchParams
from tests.helpers import random_prompts, write_random_llama
from tests.test_sampling_rules import _reference_penalties

MAX_TOKENS = 12


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_random_llama(tmp_path_factory.mktemp("tiny_sampling"), max_position_embeddings=256)


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    # Prefill in chunks of 16 tokens, so that prompt logprobs span several steps.
    with LLM(
        tiny_dir,
        dtype="float32",
        skip_tokenizer_init=True,
        block_size=4,
        long_prefill_token_threshold=16,
    ) as llm:
        yield llm


@pytest.fixture(scope="module")
def hf_tiny(tiny_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def smollm2(default_gguf):
    with LLM(default_gguf, dtype="float32") as llm:
        yield llm


def _reference_greedy(model, prompt, max_tokens, rule, stop_token_ids=()):
    """Greedy decoding over the model's float32 logits, with `rule(logits, outputs)` applied
    before each argmax; stops after a stop token as the engine does."""
    outputs: list[int] = []
    with torch.no_grad():
        for _ in range(max_tokens):
            logits = model(torch.tensor([prompt + outputs])).logits[0, -1].double()
            token = int(rule(logits, outputs).argmax())
            outputs.append(token)
            if token in stop_token_ids:
                break
    return outputs


def _hf_logprobs(model, token_ids: list[int]) -> torch.Tensor:
    """log_softmax of the model's logits at every position of token_ids: [len, V]."""
    with torch.no_grad():
        return model(torch.tensor([token_ids])).logits[0].double().log_softmax(-1)


PENALTY_CASES = {
    "repetition": {"repetition_penalty": 1.8},
    "frequency": {"frequency_penalty": 1.5},
    "presence": {"presence_penalty": 2.0},
    "all": {"repetition_penalty": 0.7, "frequency_penalty": -0.5, "presence_penalty": 1.0},
}


@pytest.mark.parametrize("case", sorted(PENALTY_CASES))
def test_penalties_end_to_end_match_reference(tiny, hf_tiny, case):
    penalties = PENALTY_CASES[case]
    prompts = random_prompts(3, 512, [5, 23, 40], seed=3)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, **penalties)
    outputs = tiny.generate(prompts, params, use_tqdm=False)
    plain = tiny.generate(prompts, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS))
    for prompt, output, unpenalised in zip(prompts, outputs, plain):

        def rule(logits, out, prompt=prompt):
            return _reference_penalties(
                logits.unsqueeze(0),
                [prompt],
                [out],
                [penalties.get("presence_penalty", 0.0)],
                [penalties.get("frequency_penalty", 0.0)],
                [penalties.get("repetition_penalty", 1.0)],
            )[0]

        expected = _reference_greedy(hf_tiny, prompt, MAX_TOKENS, rule)
        assert output.outputs[0].token_ids == expected
    # The penalty changed something, so the comparison above is not vacuous.
    assert any(o.outputs[0].token_ids != p.outputs[0].token_ids for o, p in zip(outputs, plain))


def test_logit_bias_and_allowed_token_ids_end_to_end(tiny, hf_tiny):
    prompt = random_prompts(1, 512, [17], seed=4)[0]
    bias = {7: 4.0, 100: 6.0, 300: -100.0}
    allowed = [7, 100, 300, 301, 302, 450]
    params = [
        SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logit_bias=bias),
        SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, allowed_token_ids=allowed),
    ]
    biased, restricted = tiny.generate([prompt, prompt], params, use_tqdm=False)

    def bias_rule(logits, out):
        logits = logits.clone()
        for token_id, value in bias.items():
            logits[token_id] += value
        return logits

    def allowed_rule(logits, out):
        masked = torch.full_like(logits, -math.inf)
        masked[allowed] = logits[allowed]
        return masked

    assert biased.outputs[0].token_ids == _reference_greedy(hf_tiny, prompt, MAX_TOKENS, bias_rule)
    restricted_ids = restricted.outputs[0].token_ids
    assert restricted_ids == _reference_greedy(hf_tiny, prompt, MAX_TOKENS, allowed_rule)
    assert set(restricted_ids) <= set(allowed)


def test_min_tokens_holds_back_stop_tokens(tiny, hf_tiny):
    prompt = random_prompts(1, 512, [9], seed=5)[0]
    free = tiny.generate([prompt], SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS))
    stop_id = free[0].outputs[0].token_ids[1]  # greedy would stop at the second token
    params = SamplingParams(
        temperature=0.0, max_tokens=MAX_TOKENS, stop_token_ids=[stop_id], min_tokens=6
    )
    output = tiny.generate([prompt], params, use_tqdm=False)[0].outputs[0]

    def rule(logits, out):
        if len(out) < 6:
            logits = logits.clone()
            logits[stop_id] = -math.inf
        return logits

    assert output.token_ids == _reference_greedy(hf_tiny, prompt, MAX_TOKENS, rule, [stop_id])
    assert stop_id not in output.token_ids[:6]
    assert len(output.token_ids) >= 6


def test_min_p_sampled_tokens_are_within_min_p_of_the_top(tiny):
    prompts = random_prompts(4, 512, [6, 11, 19, 27], seed=12)

    def ratios(min_p):
        params = SamplingParams(
            temperature=1.0, min_p=min_p, max_tokens=20, ignore_eos=True, logprobs=1, seed=3
        )
        result = []
        for output in tiny.generate(prompts, params, use_tqdm=False):
            completion = output.outputs[0]
            for entry, token_id in zip(completion.logprobs, completion.token_ids):
                top = max(logprob.logprob for logprob in entry.values())
                result.append(math.exp(entry[token_id].logprob - top))
        return result

    assert min(ratios(0.3)) >= 0.3 - 1e-5
    assert min(ratios(0.0)) < 0.3  # without min_p such tokens are drawn: the check can fail


def test_logprobs_and_prompt_logprobs_match_hf_log_softmax(tiny, hf_tiny):
    prompts = random_prompts(3, 512, [3, 37, 50], seed=6)  # 37 and 50: several prefill chunks
    params = SamplingParams(temperature=0.0, max_tokens=8, logprobs=5, prompt_logprobs=3)
    outputs = tiny.generate(prompts, params, use_tqdm=False)
    for prompt, output in zip(prompts, outputs):
        completion = output.outputs[0]
        reference = _hf_logprobs(hf_tiny, prompt + completion.token_ids)
        assert output.prompt_logprobs[0] is None
        assert len(output.prompt_logprobs) == len(prompt)
        for position, entry in enumerate(output.prompt_logprobs[1:], 1):
            _check_position(entry, reference[position - 1], prompt[position], 3)
        assert len(completion.logprobs) == len(completion.token_ids)
        for step, (entry, token_id) in enumerate(zip(completion.logprobs, completion.token_ids)):
            _check_position(entry, reference[len(prompt) + step - 1], token_id, 5)
            assert entry[token_id].rank == 1  # greedy
        expected_sum = sum(e[t].logprob for e, t in zip(completion.logprobs, completion.token_ids))
        assert completion.cumulative_logprob == pytest.approx(expected_sum)


def _check_position(entry, reference_row, chosen_id, num_logprobs):
    order = reference_row.argsort(descending=True).tolist()
    assert chosen_id in entry
    assert set(order[:num_logprobs]) <= set(entry)
    assert len(entry) in (num_logprobs, num_logprobs + 1)
    for token_id, logprob in entry.items():
        assert abs(logprob.logprob - reference_row[token_id].item()) < 1e-4
        assert logprob.rank == order.index(token_id) + 1


def test_smollm2_logprobs_within_1e4_and_decoded(smollm2, hf_smollm2):
    tokenizer = smollm2.get_tokenizer()
    prompts = ["The capital of France is", "Ünïcödé test: 東京 and 🚀 rockets"]
    params = SamplingParams(temperature=0.0, max_tokens=10, logprobs=3, prompt_logprobs=2)
    for prompt, output in zip(prompts, smollm2.generate(prompts, params, use_tqdm=False)):
        completion = output.outputs[0]
        reference = _hf_logprobs(hf_smollm2, output.prompt_token_ids + completion.token_ids)
        num_prompt = len(output.prompt_token_ids)
        for position in range(1, num_prompt):
            entry = output.prompt_logprobs[position]
            _check_position(entry, reference[position - 1], output.prompt_token_ids[position], 2)
        for step, token_id in enumerate(completion.token_ids):
            entry = completion.logprobs[step]
            _check_position(entry, reference[num_prompt + step - 1], token_id, 3)
            for candidate, logprob in entry.items():
                assert logprob.decoded_token == tokenizer.decode([candidate])


def test_bad_words_are_never_generated(smollm2, hf_smollm2):
    prompt = "Write one sentence about the sea:"
    free = smollm2.generate(prompt, SamplingParams(temperature=0.0, max_tokens=16))[0]
    words = free.outputs[0].text.split()
    bad_word = words[1]  # a word greedy decoding produces
    params = SamplingParams(temperature=0.0, max_tokens=16, bad_words=[bad_word])
    output = smollm2.generate(prompt, params, use_tqdm=False)[0]
    word_ids = [
        smollm2.get_tokenizer().encode(text, add_special_tokens=False)
        for text in (bad_word, " " + bad_word)
    ]

    def rule(logits, out):
        logits = logits.clone()
        for ids in word_ids:
            if len(ids) - 1 <= len(out) and (len(ids) == 1 or out[-(len(ids) - 1) :] == ids[:-1]):
                logits[ids[-1]] = -math.inf
        return logits

    expected = _reference_greedy(
        hf_smollm2, output.prompt_token_ids, 16, rule, [smollm2.get_tokenizer().eos_token_id]
    )
    assert output.outputs[0].token_ids == expected
    assert output.outputs[0].token_ids != free.outputs[0].token_ids


def test_same_seed_same_text_alone_or_in_a_sampled_batch(smollm2):
    prompt = "Once upon a time"
    seeded = SamplingParams(temperature=1.0, top_p=0.95, seed=1234, max_tokens=24)
    alone = smollm2.generate(prompt, seeded, use_tqdm=False)[0].outputs[0].text
    others = [f"Story number {i}:" for i in range(32)]
    batch_params = [SamplingParams(temperature=1.0, max_tokens=20 + i % 7) for i in range(32)]
    batch = smollm2.generate(
        others[:20] + [prompt] + others[20:], batch_params[:20] + [seeded] + batch_params[20:]
    )
    assert batch[20].outputs[0].text == alone
    other_seed = SamplingParams(temperature=1.0, top_p=0.95, seed=4321, max_tokens=24)
    assert smollm2.generate(prompt, other_seed)[0].outputs[0].text != alone


def test_n_sequences_share_the_prompt_blocks(tiny_dir):
    """n=4 children of one 41-token prompt: 10 full prompt blocks computed once and hit three
    times. 23 blocks hold one copy plus four tails, not four copies (4 × 12), so sharing is
    also what lets the request run without preemption."""
    with LLM(
        tiny_dir,
        dtype="float32",
        skip_tokenizer_init=True,
        block_size=4,
        max_model_len=64,
        num_gpu_blocks_override=24,
    ) as llm:
        prompt = random_prompts(1, 512, [41], seed=8)[0]
        params = SamplingParams(n=4, temperature=1.0, seed=7, max_tokens=4, ignore_eos=True)
        output = llm.generate([prompt], params, use_tqdm=False)[0]
        stats = llm.engine.call_utility("get_stats")
    assert [c.index for c in output.outputs] == [0, 1, 2, 3]
    assert all(len(c.token_ids) == 4 for c in output.outputs)
    assert len({tuple(c.token_ids) for c in output.outputs}) > 1
    assert stats["prefix_cache_hits"] == 3 * 10 * 4
    assert stats["num_preemptions"] == 0


def test_n_with_seed_gives_each_child_its_own_seed(tiny):
    prompt = random_prompts(1, 512, [12], seed=9)[0]
    params = SamplingParams(n=3, temperature=1.0, seed=50, max_tokens=10, ignore_eos=True)
    output = tiny.generate([prompt], params, use_tqdm=False)[0]
    singles = [
        tiny.generate(
            [prompt], SamplingParams(temperature=1.0, seed=50 + i, max_tokens=10, ignore_eos=True)
        )[0]
        for i in range(3)
    ]
    assert [c.token_ids for c in output.outputs] == [s.outputs[0].token_ids for s in singles]


def test_truncate_prompt_tokens_keeps_the_last_tokens(tiny):
    prompt = random_prompts(1, 512, [30], seed=10)[0]
    params = SamplingParams(temperature=0.0, max_tokens=4, truncate_prompt_tokens=8)
    output = tiny.generate([prompt], params, use_tqdm=False)[0]
    direct = tiny.generate([prompt[-8:]], SamplingParams(temperature=0.0, max_tokens=4))[0]
    assert output.prompt_token_ids == prompt[-8:]
    assert output.outputs[0].token_ids == direct.outputs[0].token_ids


BEAM_PROMPTS = [
    "The best way to learn a language is",
    "def fibonacci(n):",
    # chat turns whose beams end in EOS within the budget
    "<|im_start|>user\nWhat is 2+2? Answer with one number.<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nSay hi.<|im_end|>\n<|im_start|>assistant\n",
]


def _vllm_beam_search_reference(
    model,
    prompt: list[int],
    beam_width: int,
    max_tokens: int,
    eos: int,
    length_penalty: float,
    allowed_after=None,
) -> list[tuple[list[int], float]]:
    """vLLM's beam search (its documented rules) over Hugging Face's next-token logprobs:
    each beam's top 2 x beam_width tokens are candidates, every EOS candidate is finished, the
    best beam_width others by cum_logprob / len(tokens) ** length_penalty run on (a final EOS
    not counted in the length), and after max_tokens steps the best of all are returned.

    With a grammar (`allowed_after(generated) -> set of ids, or None once it has ended`),
    vLLM 0.32's rules: a beam whose grammar ended is finished; candidates are the top tokens
    that the grammar allows, plus, when at most 1024 tokens are allowed (then the sampler is
    masked to them), the best allowed token, which the logprobs always include."""

    def score(tokens: list[int], cum: float) -> float:
        length = len(tokens) - (tokens[-1] == eos)
        return cum / max(length, 1) ** length_penalty

    beams, finished = [(list(prompt), 0.0)], []
    for _ in range(max_tokens):
        if allowed_after is not None:
            kept = []
            for tokens, cum in beams:
                if allowed_after(tokens[len(prompt) :]) is not None:
                    kept.append((tokens, cum))
                elif len(tokens) > len(prompt):
                    finished.append((tokens, cum))
            beams = kept
        if not beams:
            break
        candidates = []
        for tokens, cum in beams:
            with torch.no_grad():
                logits = model(torch.tensor([tokens])).logits[0, -1].float()
            logprobs = logits.log_softmax(-1)
            top = logprobs.topk(2 * beam_width)
            chosen = top.indices.tolist()
            allowed = None if allowed_after is None else allowed_after(tokens[len(prompt) :])
            if allowed is not None:
                if len(allowed) <= 1024:
                    ids = sorted(allowed)
                    best = ids[int(logprobs[ids].argmax())]
                    chosen = chosen + [best] if best not in chosen else chosen
                chosen = [token for token in chosen if token in allowed]
            for token in chosen:
                logprob = float(logprobs[token])
                (finished if token == eos else candidates).append((tokens + [token], cum + logprob))
        candidates.sort(key=lambda c: score(*c), reverse=True)
        beams = candidates[:beam_width]
    return sorted(finished + beams, key=lambda c: score(*c), reverse=True)[:beam_width]


@pytest.mark.parametrize("length_penalty", [1.0, 0.5])
def test_beam_search_follows_vllm_rules_on_hf_logprobs(smollm2, hf_smollm2, length_penalty):
    """vLLM's answer, EOS-finished beams included (checked once by hand against vLLM 0.32 on
    the same weights: all beams equal)."""
    tokenizer = smollm2.get_tokenizer()
    params = BeamSearchParams(beam_width=4, max_tokens=12, length_penalty=length_penalty)
    outputs = smollm2.beam_search([{"prompt": p} for p in BEAM_PROMPTS], params)
    eos_seen = False
    for prompt, output in zip(BEAM_PROMPTS, outputs):
        ids = tokenizer(prompt).input_ids
        expected = _vllm_beam_search_reference(
            hf_smollm2, ids, 4, 12, tokenizer.eos_token_id, length_penalty
        )
        assert [s.tokens for s in output.sequences] == [tokens for tokens, _ in expected]
        for sequence, (tokens, cum) in zip(output.sequences, expected):
            assert sequence.cum_logprob == pytest.approx(cum, abs=1e-3)
            assert sequence.text == tokenizer.decode(sequence.tokens, skip_special_tokens=True)
            assert len(sequence.logprobs) == len(tokens) - len(ids)
            eos_seen |= tokens[-1] == tokenizer.eos_token_id
    assert eos_seen, "no beam ended in EOS: the prompts no longer test that rule"


def _regex_allowed_after(regex: str, tokenizer, vocab_size: int):
    """The tokens a regex allows after generated ids, from xgrammar's matcher used directly."""
    import numpy as np
    import xgrammar as xgr

    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
    compiled = xgr.GrammarCompiler(info).compile_regex(regex)

    def allowed_after(generated: list[int]) -> set[int] | None:
        matcher = xgr.GrammarMatcher(compiled)
        for token in generated:
            assert matcher.accept_token(token)
        if matcher.is_terminated():
            return None
        bitmask = xgr.allocate_token_bitmask(1, vocab_size)
        matcher.fill_next_token_bitmask(bitmask)
        bits = np.unpackbits(bitmask.numpy().view(np.uint8), bitorder="little")[:vocab_size]
        return set(np.flatnonzero(bits).tolist()) or None

    return allowed_after


@pytest.mark.parametrize(
    ("prompt", "regex"),
    [
        ("Is the sky blue? Answer yes or no:", "(yes|no|maybe not)"),
        ("The year the first moon landing happened was", "[0-9]{4}"),
    ],
)
def test_beam_search_with_structured_outputs_follows_vllm_rules(smollm2, hf_smollm2, prompt, regex):
    """Grammar-constrained beams (checked once by hand against vLLM 0.32 on the same weights,
    with structured_outputs_config={"backend": "xgrammar"}: all beams equal)."""
    import re

    from ember.sampling_params import StructuredOutputsParams

    tokenizer = smollm2.get_tokenizer()
    params = BeamSearchParams(
        beam_width=3, max_tokens=8, structured_outputs=StructuredOutputsParams(regex=regex)
    )
    output = smollm2.beam_search([{"prompt": prompt}], params)[0]
    ids = tokenizer(prompt).input_ids
    allowed_after = _regex_allowed_after(regex, tokenizer, hf_smollm2.config.vocab_size)
    expected = _vllm_beam_search_reference(
        hf_smollm2, ids, 3, 8, tokenizer.eos_token_id, 1.0, allowed_after
    )
    assert [s.tokens for s in output.sequences] == [tokens for tokens, _ in expected]
    for sequence, (_, cum) in zip(output.sequences, expected):
        assert sequence.cum_logprob == pytest.approx(cum, abs=1e-3)
        generated = tokenizer.decode(sequence.tokens[len(ids) :], skip_special_tokens=True)
        assert re.fullmatch(regex, generated), generated


def test_beam_search_params_are_checked():
    with pytest.raises(TypeError, match="structured_outputs"):
        BeamSearchParams(beam_width=2, max_tokens=2, structured_outputs={"regex": "a"})
    with pytest.raises(ValueError, match="beam_width"):
        BeamSearchParams(beam_width=0, max_tokens=4)
    with pytest.raises(TypeError, match="max_tokens"):
        BeamSearchParams(beam_width=2, max_tokens=2.5)


def test_logprobs_mode_raw_logits_reports_the_models_logits(tiny_dir):
    """LLM(logprobs_mode="raw_logits"): each reported value is the model's logit (HF's)."""
    hf_model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    prompt = random_prompts(1, 512, [9], seed=12)[0]
    with LLM(
        tiny_dir, dtype="float32", skip_tokenizer_init=True, logprobs_mode="raw_logits"
    ) as llm:
        params = SamplingParams(temperature=0.0, max_tokens=3, logprobs=2, ignore_eos=True)
        completion = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
    with torch.no_grad():
        logits = hf_model(torch.tensor([prompt + completion.token_ids])).logits[0]
    for step, (token, step_logprobs) in enumerate(zip(completion.token_ids, completion.logprobs)):
        row = logits[len(prompt) - 1 + step]
        assert step_logprobs[token].logprob == pytest.approx(row[token].item(), abs=1e-3)
        for token_id, entry in step_logprobs.items():
            assert entry.logprob == pytest.approx(row[token_id].item(), abs=1e-3)


def test_priority_policy_runs_the_best_priority_first(tiny_dir):
    """One sequence at a time under scheduling_policy="priority": requests are first scheduled
    in (priority, arrival) order, whatever their order in the call."""
    prompts = random_prompts(4, 512, [6], seed=13)
    with LLM(
        tiny_dir,
        dtype="float32",
        skip_tokenizer_init=True,
        scheduling_policy="priority",
        max_num_seqs=1,
    ) as llm:
        params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
        outputs = llm.generate(prompts, params, priority=[3, -1, 3, 0], use_tqdm=False)
        with pytest.raises(ValueError, match="priority"):
            llm.generate(prompts, params, priority=[1, 2], use_tqdm=False)
        with pytest.raises(TypeError, match="priority"):
            llm.generate(prompts, params, priority="high", use_tqdm=False)
    order = sorted(range(4), key=lambda i: outputs[i].metrics.scheduled_ts)
    assert order == [1, 3, 0, 2]
