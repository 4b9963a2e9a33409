"""The sampler: greedy rows, seeded rows reproducible in any batch, and sampled frequencies that
follow the filtered distribution."""

from __future__ import annotations

import torch

from ember.workers.sampler import Sampler, SamplingMetadata


def _metadata(temperatures, top_k=None, top_p=None, generators=None):
    temperature = torch.tensor(temperatures, dtype=torch.float32)
    greedy = [t < 1e-5 for t in temperatures]
    return SamplingMetadata(
        temperature=temperature,
        top_k=None if top_k is None else torch.tensor(top_k),
        top_p=None if top_p is None else torch.tensor(top_p, dtype=torch.float32),
        generators=generators or {},
        all_greedy=all(greedy),
        all_random=not any(greedy),
    )


def test_greedy_rows_take_the_argmax_in_a_mixed_batch():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    sampler = Sampler(torch.Generator().manual_seed(0))
    out = sampler(logits, _metadata([0.0, 1.0, 0.0, 1.0])).sampled_token_ids
    assert out[0] == logits[0].argmax() and out[2] == logits[2].argmax()


def test_seeded_row_is_the_same_whatever_the_batch():
    torch.manual_seed(0)
    row = torch.randn(1, 1000)
    draws = []
    for batch_size, position in [(1, 0), (5, 3), (9, 8)]:
        logits = torch.randn(batch_size, 1000)
        logits[position] = row[0]
        sampler = Sampler(torch.Generator().manual_seed(batch_size))
        generator = torch.Generator().manual_seed(1234)
        tokens = [
            sampler(logits, _metadata([1.0] * batch_size, generators={position: generator}))
            .sampled_token_ids[position]
            .item()
            for _ in range(5)
        ]
        draws.append(tokens)
    assert draws[0] == draws[1] == draws[2]
    assert len(set(draws[0])) > 1  # it really samples


def test_frequencies_follow_softmax_within_top_k():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]]).repeat(4000, 1)
    sampler = Sampler(torch.Generator().manual_seed(0))
    tokens = sampler(logits, _metadata([1.0] * 4000, top_k=[3] * 4000)).sampled_token_ids
    counts = torch.bincount(tokens, minlength=5).float() / 4000
    expected = torch.softmax(torch.tensor([2.0, 1.0, 0.5]), dim=0)
    assert counts[3:].sum() == 0
    torch.testing.assert_close(counts[:3], expected, atol=0.03, rtol=0)


def test_low_temperature_concentrates_on_the_argmax():
    logits = torch.tensor([[1.0, 0.9, 0.0]]).repeat(500, 1)
    sampler = Sampler(torch.Generator().manual_seed(0))
    tokens = sampler(logits, _metadata([0.01] * 500)).sampled_token_ids
    assert (tokens == 0).float().mean() > 0.99
