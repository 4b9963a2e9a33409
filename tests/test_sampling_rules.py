"""Each sampling rule on fixed logits against a plain-torch reference written out per row and per
token: penalties, min_p, logit_bias, allowed_token_ids, bad words, min_tokens stops, logprobs."""

from __future__ import annotations

import math

import torch

from ember.kernels.penalties import apply_penalties
from ember.workers.sampler import (
    PenaltyInputs,
    Sampler,
    SamplingMetadata,
    apply_logits_processors,
    apply_min_p,
    bad_word_bans,
    compute_logprobs,
)

VOCAB = 40


def _metadata(batch_size: int, **fields) -> SamplingMetadata:
    return SamplingMetadata(
        temperature=torch.zeros(batch_size),
        top_k=None,
        top_p=None,
        generators={},
        all_greedy=True,
        all_random=False,
        **fields,
    )


def _reference_penalties(logits, prompt, output, presence, frequency, repetition):
    """The OpenAI / vLLM definition, one row and one token at a time."""
    result = logits.clone()
    for row in range(logits.shape[0]):
        for token in range(logits.shape[1]):
            value = float(logits[row, token])
            if token in prompt[row] or token in output[row]:
                value = value / repetition[row] if value > 0 else value * repetition[row]
            count = output[row].count(token)
            value -= frequency[row] * count
            value -= presence[row] * (1.0 if count else 0.0)
            result[row, token] = value
    return result


def _padded(rows: list[list[int]]) -> torch.Tensor:
    width = max(max(len(r) for r in rows), 1)
    return torch.tensor([r + [VOCAB] * (width - len(r)) for r in rows])


def test_penalties_match_the_per_token_definition():
    torch.manual_seed(0)
    logits = torch.randn(3, VOCAB) * 3
    prompt = [[1, 2, 3, 3], [5], [7, 8]]
    output = [[3, 9, 9, 9], [], [8, 8, 20]]
    presence, frequency, repetition = [0.5, 0.0, -1.0], [0.3, 1.0, 0.7], [1.3, 0.8, 1.0]
    got = apply_penalties(
        logits,
        _padded(prompt),
        _padded(output),
        torch.tensor(presence),
        torch.tensor(frequency),
        torch.tensor(repetition),
    )
    expected = _reference_penalties(logits, prompt, output, presence, frequency, repetition)
    torch.testing.assert_close(got, expected)


def test_penalties_apply_only_to_their_rows():
    torch.manual_seed(1)
    logits = torch.randn(3, VOCAB)
    penalties = PenaltyInputs(
        rows=torch.tensor([1]),
        prompt_token_ids=_padded([[4]]),
        output_token_ids=_padded([[4, 6]]),
        presence=torch.tensor([1.0]),
        frequency=torch.tensor([0.0]),
        repetition=torch.tensor([2.0]),
    )
    got = apply_logits_processors(logits.clone(), _metadata(3, penalties=penalties))
    expected = logits.clone()
    expected[1] = _reference_penalties(logits[1:2], [[4]], [[4, 6]], [1.0], [0.0], [2.0])[0]
    torch.testing.assert_close(got, expected)


def test_min_p_keeps_tokens_at_least_min_p_times_the_top_probability():
    torch.manual_seed(2)
    logits = torch.randn(4, VOCAB) * 2
    min_p = [0.0, 0.1, 0.5, 1.0]
    got = apply_min_p(logits, torch.tensor(min_p))
    for row in range(4):
        probs = logits[row].softmax(-1)
        for token in range(VOCAB):
            kept = probs[token] >= min_p[row] * probs.max()
            assert (got[row, token] == logits[row, token]) if kept else got[row, token] == -math.inf


def test_min_p_sampling_never_draws_a_masked_token():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(2000, 1)
    metadata = _metadata(2000, min_p=torch.full((2000,), 0.4))
    metadata.temperature = torch.ones(2000)
    metadata.all_greedy, metadata.all_random = False, True
    tokens = Sampler(torch.Generator().manual_seed(0))(logits, metadata).sampled_token_ids
    counts = torch.bincount(tokens, minlength=4).float() / 2000
    assert counts[2:].sum() == 0  # 0.15 and 0.05 are below 0.4 × 0.5
    torch.testing.assert_close(counts[:2], torch.tensor([0.625, 0.375]), atol=0.04, rtol=0)


def test_logit_bias_allowed_tokens_and_bans():
    torch.manual_seed(3)
    logits = torch.randn(3, VOCAB)
    metadata = _metadata(
        3,
        logit_bias=(torch.tensor([0, 0, 2]), torch.tensor([5, 6, 7]), torch.tensor([10.0, -2, 3])),
        disallowed=(torch.tensor([1]), torch.ones(1, VOCAB, dtype=torch.bool)),
        banned=(torch.tensor([2, 2]), torch.tensor([0, 1])),
    )
    metadata.disallowed[1][0, [11, 12]] = False  # row 1 may only sample 11 or 12
    got = apply_logits_processors(logits.clone(), metadata)
    expected = logits.clone()
    expected[0, 5] += 10.0
    expected[0, 6] -= 2.0
    expected[2, 7] += 3.0
    for token in range(VOCAB):
        if token not in (11, 12):
            expected[1, token] = -math.inf
    expected[2, [0, 1]] = -math.inf
    torch.testing.assert_close(got, expected)
    sampled = Sampler(torch.Generator())(logits, metadata).sampled_token_ids
    assert sampled[0] == 5
    assert sampled[1] == (11 if logits[1, 11] > logits[1, 12] else 12)


def test_bad_word_is_banned_only_after_its_prefix():
    bad_words = [[7], [3, 4, 5]]
    # output so far ends with 3, 4: the word 3 4 5 would complete, and 7 is always banned
    assert sorted(bad_word_bans([1, 2, 3, 4], 2, bad_words)) == [5, 7]
    assert bad_word_bans([1, 2, 3, 9], 2, bad_words) == [7]
    # the prefix lies in the prompt (1 output token): it does not count
    assert bad_word_bans([3, 4], 1, bad_words) == [7]


def test_logprobs_are_the_raw_log_softmax_with_ranks():
    torch.manual_seed(4)
    logits = torch.randn(3, VOCAB)
    chosen = torch.tensor([0, 17, 39])
    result = compute_logprobs(logits, chosen, 4)
    reference = torch.log_softmax(logits.double(), dim=-1)
    for row in range(3):
        order = reference[row].argsort(descending=True).tolist()
        assert result.token_ids[row].tolist() == [chosen[row].item(), *order[:4]]
        expected = [reference[row, t].item() for t in result.token_ids[row].tolist()]
        torch.testing.assert_close(
            result.logprobs[row].double(), torch.tensor(expected, dtype=torch.float64)
        )
        assert result.ranks[row] == order.index(chosen[row].item()) + 1


def test_sampler_logprobs_ignore_processing():
    """Logprobs describe the model's distribution (vLLM's raw_logprobs), not the biased one."""
    torch.manual_seed(5)
    logits = torch.randn(1, VOCAB)
    metadata = _metadata(
        1,
        logit_bias=(torch.tensor([0]), torch.tensor([3]), torch.tensor([50.0])),
        max_num_logprobs=0,
    )
    output = Sampler(torch.Generator())(logits, metadata)
    assert output.sampled_token_ids.item() == 3
    torch.testing.assert_close(output.logprobs.logprobs[0, 0], logits.log_softmax(-1)[0, 3])


def _reference_processed_logits(logits, bias_token, bias, temperature, top_k):
    """vLLM's processed logits of one random row, step by step: bias, temperature, top-k."""
    row = logits[0].clone()
    row[bias_token] += bias
    row = row / temperature
    kth = row.sort(descending=True).values[top_k - 1]
    return torch.where(row < kth, torch.tensor(float("-inf")), row)


def test_logprobs_modes_report_vllms_four_sources():
    torch.manual_seed(6)
    logits = torch.randn(1, VOCAB)
    bias_token, bias, temperature, top_k = 7, 2.0, 0.7, 5

    def run(mode):
        metadata = SamplingMetadata(
            temperature=torch.tensor([temperature]),
            top_k=torch.tensor([top_k]),
            top_p=None,
            generators={},
            all_greedy=False,
            all_random=True,
            logit_bias=(torch.tensor([0]), torch.tensor([bias_token]), torch.tensor([bias])),
            max_num_logprobs=-1,
        )
        output = Sampler(torch.Generator().manual_seed(0), mode)(logits.clone(), metadata)
        token = output.sampled_token_ids.item()
        full = torch.empty(VOCAB)
        full[output.logprobs.token_ids[0, 1:]] = output.logprobs.logprobs[0, 1:]
        return token, output.logprobs.logprobs[0, 0].item(), full

    processed = _reference_processed_logits(logits, bias_token, bias, temperature, top_k)
    expected = {
        "raw_logprobs": logits[0].log_softmax(-1),
        "raw_logits": logits[0],
        "processed_logprobs": processed.log_softmax(-1),
        "processed_logits": processed,
    }
    for mode, reference in expected.items():
        token, chosen, full = run(mode)
        torch.testing.assert_close(full, reference, msg=mode)
        assert chosen == reference[token].item(), mode
        assert torch.isfinite(processed[token])  # drawn from the processed distribution
