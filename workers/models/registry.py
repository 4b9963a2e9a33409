"""Model architectures ember runs, by the name `architectures` in config.json gives."""

from __future__ import annotations

import importlib

from ember.workers.hf_config import HFConfig

# architecture name -> (module in ember.workers.models, class name)
_MODELS: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("llama", "LlamaForCausalLM"),
    "Qwen2ForCausalLM": ("qwen2", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("qwen3", "Qwen3ForCausalLM"),
    "Gemma2ForCausalLM": ("gemma2", "Gemma2ForCausalLM"),
    "Gemma3ForCausalLM": ("gemma2", "Gemma3ForCausalLM"),
    "Phi3ForCausalLM": ("phi3", "Phi3ForCausalLM"),
    "OPTForCausalLM": ("opt", "OPTForCausalLM"),
    "GPT2LMHeadModel": ("gpt2", "GPT2LMHeadModel"),
    "GPTNeoXForCausalLM": ("gpt_neox", "GPTNeoXForCausalLM"),
    "MixtralForCausalLM": ("mixtral", "MixtralForCausalLM"),
    "Qwen2MoeForCausalLM": ("qwen2_moe", "Qwen2MoeForCausalLM"),
    "Qwen3MoeForCausalLM": ("qwen3_moe", "Qwen3MoeForCausalLM"),
    "GraniteMoeForCausalLM": ("granitemoe", "GraniteMoeForCausalLM"),
    # pooling models (runner="pooling"): encoders, decoders as embedders and as classifiers
    "BertModel": ("bert", "BertModel"),
    "BertForSequenceClassification": ("bert", "BertForSequenceClassification"),
    "LlamaModel": ("adapters", "LlamaEmbeddingModel"),
    "MistralModel": ("adapters", "LlamaEmbeddingModel"),
    "Qwen2Model": ("adapters", "Qwen2EmbeddingModel"),
    "Qwen3Model": ("adapters", "Qwen3EmbeddingModel"),
    "LlamaForSequenceClassification": ("adapters", "LlamaForSequenceClassification"),
    "MistralForSequenceClassification": ("adapters", "LlamaForSequenceClassification"),
    "Qwen2ForSequenceClassification": ("adapters", "Qwen2ForSequenceClassification"),
    "Qwen3ForSequenceClassification": ("adapters", "Qwen3ForSequenceClassification"),
}


def supported_architectures() -> list[str]:
    return sorted(_MODELS)


def resolve_architecture(config: HFConfig) -> str:
    """The first architecture of the config that ember supports, or a ValueError naming them."""
    architectures = list(getattr(config, "architectures", None) or [])
    if not architectures:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(getattr(config, "model_type", ""))
        architectures = [name] if name else []
    for name in architectures:
        if name in _MODELS:
            return name
    raise ValueError(
        f"unsupported model architecture {architectures or config.model_type!r}; "
        f"ember supports: {', '.join(supported_architectures())}"
    )


def get_model_class(architecture: str) -> type:
    if architecture not in _MODELS:
        raise ValueError(
            f"unsupported model architecture {architecture!r}; "
            f"ember supports: {', '.join(supported_architectures())}"
        )
    module_name, class_name = _MODELS[architecture]
    module = importlib.import_module(f"ember.workers.models.{module_name}")
    return getattr(module, class_name)
