"""Causal LMs adapted for pooling: as embedders (e5-mistral, Qwen3-Embedding; vLLM's
`convert="embed"`) and as sequence classifiers (`*ForSequenceClassification`, `convert="classify"`).

Used by the registry (bare `*Model` and `*ForSequenceClassification` architectures) and by the
model loader for `convert`. The decoder stack is the causal model's; the LM head is dropped and
a classifier gets a `score` head. Checkpoints of bare models, whose names lack the `model.`
prefix, load too.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ember.workers.hf_config import HFConfig
from ember.workers.layers.context import ModelContext
from ember.workers.layers.linear import ReplicatedLinear
from ember.workers.models.llama import LlamaForCausalLM
from ember.workers.models.qwen2 import Qwen2ForCausalLM
from ember.workers.models.qwen3 import Qwen3ForCausalLM


def _decoder_weights(
    weights: Iterable[tuple[str, torch.Tensor]], keep: tuple[str, ...] = ()
) -> Iterable[tuple[str, torch.Tensor]]:
    """Checkpoint tensors for the decoder stack: no LM head, every name under `model.`."""
    for name, tensor in weights:
        if name.startswith("lm_head."):
            continue
        if not name.startswith(("model.",) + keep):
            name = "model." + name
        yield name, tensor


def as_embedding_model(causal_class: type) -> type:
    """`causal_class` without its LM head: the runner pools its last hidden states."""

    class EmbeddingModel(causal_class):
        def __init__(self, config: HFConfig, max_position: int, ctx: ModelContext):
            super().__init__(config, max_position, ctx)
            del self.lm_head

        def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
            raise TypeError("an embedding model has no LM head")

        def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
            super().load_weights(_decoder_weights(weights))

    EmbeddingModel.__name__ = causal_class.__name__.replace("ForCausalLM", "EmbeddingModel")
    EmbeddingModel.__qualname__ = EmbeddingModel.__name__
    return EmbeddingModel


def as_classification_model(causal_class: type) -> type:
    """`causal_class` with a `score` head ([H] -> num_labels logits, no bias) instead of its LM
    head, as transformers' `*ForSequenceClassification`."""

    class ClassificationModel(causal_class):
        def __init__(self, config: HFConfig, max_position: int, ctx: ModelContext):
            super().__init__(config, max_position, ctx)
            del self.lm_head
            self.score = ReplicatedLinear(
                config.hidden_size, config.num_labels, bias=False, ctx=ctx
            )

        def pooling_head(self, pooled: torch.Tensor) -> torch.Tensor:
            """Logits [N, num_labels] of hidden states [N, H]."""
            return self.score(pooled)

        def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
            raise TypeError("a classification model has no LM head")

        def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
            super().load_weights(_decoder_weights(weights, keep=("score.",)))

    name = causal_class.__name__.replace("ForCausalLM", "ForSequenceClassification")
    ClassificationModel.__name__ = ClassificationModel.__qualname__ = name
    return ClassificationModel


def adapt_for_pooling(model_class: type, convert: str) -> type:
    """The class the loader builds for `convert` ("embed" / "classify"; "none": unchanged)."""
    if convert == "embed":
        return as_embedding_model(model_class)
    if convert == "classify":
        return as_classification_model(model_class)
    return model_class


LlamaEmbeddingModel = as_embedding_model(LlamaForCausalLM)
Qwen2EmbeddingModel = as_embedding_model(Qwen2ForCausalLM)
Qwen3EmbeddingModel = as_embedding_model(Qwen3ForCausalLM)
LlamaForSequenceClassification = as_classification_model(LlamaForCausalLM)
Qwen2ForSequenceClassification = as_classification_model(Qwen2ForCausalLM)
Qwen3ForSequenceClassification = as_classification_model(Qwen3ForCausalLM)
