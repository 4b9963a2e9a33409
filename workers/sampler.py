"""Turns the logits of a batch into one token per request: greedy, temperature, top-k, top-p,
each request with its own parameters and, when seeded, its own random generator."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ember.kernels import apply_top_k_top_p, sample_from_probs

_GREEDY_TEMPERATURE = 1e-5


@dataclass(slots=True)
class SamplingMetadata:
    """Per-row sampling parameters of one step's logits."""

    temperature: torch.Tensor  # [B] float32; < 1e-5 means greedy
    top_k: torch.Tensor | None  # [B] int64, vocab size = off; None when no row uses it
    top_p: torch.Tensor | None  # [B] float32, 1.0 = off; None when no row uses it
    generators: dict[int, torch.Generator]  # row -> the request's own generator (seeded)
    all_greedy: bool
    all_random: bool


class Sampler:
    def __init__(self, default_generator: torch.Generator):
        # Rows without a seed draw from the engine-wide generator (seeded by LLM(seed=...)).
        self.default_generator = default_generator

    def __call__(self, logits: torch.Tensor, metadata: SamplingMetadata) -> torch.Tensor:
        """logits [B, V] float32 -> sampled token ids [B] int64."""
        greedy = None if metadata.all_random else logits.argmax(dim=-1)
        if metadata.all_greedy:
            return greedy
        temperature = metadata.temperature.clamp(min=_GREEDY_TEMPERATURE)
        logits = logits / temperature.unsqueeze(1)
        logits = apply_top_k_top_p(logits, metadata.top_k, metadata.top_p)
        probs = logits.softmax(dim=-1)
        noise = torch.empty_like(probs).exponential_(generator=self.default_generator)
        for row, generator in metadata.generators.items():
            noise[row].exponential_(generator=generator)
        sampled = sample_from_probs(probs, noise)
        if greedy is None:
            return sampled
        return torch.where(metadata.temperature < _GREEDY_TEMPERATURE, greedy, sampled)
