"""BERT encoders: `BertModel` (sentence embeddings, e.g. all-MiniLM-L6-v2) and
`BertForSequenceClassification` (cross-encoders). Bidirectional attention over each whole
prompt; no KV cache (the runner schedules a pooling request's prompt in one step).

Returns the last hidden states of every token; `ember.workers.layers.pooler` pools them.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ember.kernels.attention import AttentionMetadata
from ember.kernels.encoder_attention import encoder_attention
from ember.workers.hf_config import HFConfig
from ember.workers.layers.context import ModelContext
from ember.workers.layers.embedding import VocabParallelEmbedding
from ember.workers.layers.linear import (
    ColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from ember.workers.model_loader.weight_utils import load_weights_into

_ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}
# Buffers BERT checkpoints carry that are no parameters.
_BUFFERS = ("embeddings.position_ids", "bert.embeddings.position_ids")


class BertEmbedding(nn.Module):
    def __init__(self, config: HFConfig, ctx: ModelContext):
        super().__init__()
        self.word_embeddings = VocabParallelEmbedding(
            config.vocab_size, config.hidden_size, ctx=ctx
        )
        self.position_embeddings = VocabParallelEmbedding(
            config.max_position_embeddings, config.hidden_size, ctx=ctx
        )
        self.token_type_embeddings = VocabParallelEmbedding(
            config.type_vocab_size, config.hidden_size, ctx=ctx
        )
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, token_type_ids: torch.Tensor
    ) -> torch.Tensor:
        hidden = self.word_embeddings(input_ids) + self.position_embeddings(positions)
        return self.LayerNorm(hidden + self.token_type_embeddings(token_type_ids))


class BertSelfAttention(nn.Module):
    def __init__(self, config: HFConfig, ctx: ModelContext):
        super().__init__()
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size,
            self.head_dim,
            config.num_attention_heads,
            config.num_attention_heads,
            bias=True,
            ctx=ctx,
        )
        self.num_heads = self.qkv_proj.num_heads
        self.scale = self.head_dim**-0.5

    def forward(self, hidden_states: torch.Tensor, seq_lens: list[int]) -> torch.Tensor:
        q, k, v = self.qkv_proj(hidden_states).chunk(3, dim=-1)
        shape = (-1, self.num_heads, self.head_dim)
        out = encoder_attention(q.view(shape), k.view(shape), v.view(shape), seq_lens, self.scale)
        return out.reshape(hidden_states.shape[0], -1)


class BertOutput(nn.Module):
    """dense, then LayerNorm over the residual sum (BERT is post-norm)."""

    def __init__(self, input_size: int, config: HFConfig, ctx: ModelContext):
        super().__init__()
        self.dense = RowParallelLinear(input_size, config.hidden_size, bias=True, ctx=ctx)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden_states: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(hidden_states) + residual)


class BertAttention(nn.Module):
    def __init__(self, config: HFConfig, ctx: ModelContext):
        super().__init__()
        self.self = BertSelfAttention(config, ctx)  # the checkpoint's name
        self.output = BertOutput(config.hidden_size, config, ctx)

    def forward(self, hidden_states: torch.Tensor, seq_lens: list[int]) -> torch.Tensor:
        return self.output(self.self(hidden_states, seq_lens), hidden_states)


class BertIntermediate(nn.Module):
    def __init__(self, config: HFConfig, ctx: ModelContext):
        super().__init__()
        self.dense = ColumnParallelLinear(
            config.hidden_size, config.intermediate_size, bias=True, ctx=ctx
        )
        if config.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"BERT hidden_act {config.hidden_act!r} is not supported")
        self.act_fn = _ACTIVATIONS[config.hidden_act]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.act_fn(self.dense(hidden_states))


class BertLayer(nn.Module):
    def __init__(self, config: HFConfig, ctx: ModelContext):
        super().__init__()
        self.attention = BertAttention(config, ctx)
        self.intermediate = BertIntermediate(config, ctx)
        self.output = BertOutput(config.intermediate_size, config, ctx)

    def forward(self, hidden_states: torch.Tensor, seq_lens: list[int]) -> torch.Tensor:
        attention_output = self.attention(hidden_states, seq_lens)
        return self.output(self.intermediate(attention_output), attention_output)


class BertEncoder(nn.Module):
    def __init__(self, config: HFConfig, ctx: ModelContext):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config, ctx) for _ in range(config.num_hidden_layers))

    def forward(self, hidden_states: torch.Tensor, seq_lens: list[int]) -> torch.Tensor:
        for layer in self.layer:
            hidden_states = layer(hidden_states, seq_lens)
        return hidden_states


class BertPooler(nn.Module):
    """BERT's own pooler: dense + tanh over the [CLS] token (classification heads use it)."""

    def __init__(self, config: HFConfig, ctx: ModelContext):
        super().__init__()
        self.dense = ReplicatedLinear(config.hidden_size, config.hidden_size, bias=True, ctx=ctx)

    def forward(self, cls_hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(cls_hidden))


def _seq_lens(attn_metadata: AttentionMetadata) -> list[int]:
    starts = attn_metadata.query_start_loc_cpu
    return [end - start for start, end in itertools.pairwise(starts)]


class BertModel(nn.Module):
    """Token embeddings for pooling (the sentence-transformers `Transformer` module)."""

    packed_modules_mapping: ClassVar[dict[str, tuple[str, str]]] = {
        "query": ("qkv_proj", "q"),
        "key": ("qkv_proj", "k"),
        "value": ("qkv_proj", "v"),
    }
    uses_token_type_ids = True

    def __init__(
        self, config: HFConfig, max_position: int, ctx: ModelContext, with_pooler: bool = False
    ):
        super().__init__()
        self.config = config
        self.embeddings = BertEmbedding(config, ctx)
        self.encoder = BertEncoder(config, ctx)
        self.pooler = BertPooler(config, ctx) if with_pooler else None

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attn_metadata: AttentionMetadata,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        hidden_states = self.embeddings(input_ids, positions, token_type_ids)
        return self.encoder(hidden_states, _seq_lens(attn_metadata))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        # An embedding model does not use BERT's pooler; its weights may or may not be there.
        skip = _BUFFERS + (() if self.pooler is not None else ("pooler.",))
        load_weights_into(self, weights, self.packed_modules_mapping, skip_prefixes=skip)


class BertForSequenceClassification(nn.Module):
    """A cross-encoder: [CLS] -> BERT's pooler -> classifier, `num_labels` logits."""

    packed_modules_mapping = BertModel.packed_modules_mapping
    uses_token_type_ids = True

    def __init__(self, config: HFConfig, max_position: int, ctx: ModelContext):
        super().__init__()
        self.bert = BertModel(config, max_position, ctx, with_pooler=True)
        self.classifier = ReplicatedLinear(
            config.hidden_size, config.num_labels, bias=True, ctx=ctx
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attn_metadata: AttentionMetadata,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.bert(input_ids, positions, attn_metadata, token_type_ids)

    def pooling_head(self, pooled: torch.Tensor) -> torch.Tensor:
        """Logits [N, num_labels] of the [CLS] hidden states [N, H]."""
        return self.classifier(self.bert.pooler(pooled))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        load_weights_into(self, weights, self.packed_modules_mapping, skip_prefixes=_BUFFERS)
