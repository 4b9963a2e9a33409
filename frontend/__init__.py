"""ember: an offline LLM inference engine with vLLM's `LLM` API.

    from ember import LLM, SamplingParams

Names are imported lazily, so that the engine-core process (a child that imports
`ember.enginecore`) does not load torch or transformers through this package.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "LLM": "ember.llm",
    "SamplingParams": "ember.workers.sampling_params",
    "PoolingParams": "ember.workers.pooling_params",
    "PoolingOutput": "ember.pooling_outputs",
    "PoolingRequestOutput": "ember.pooling_outputs",
    "EmbeddingOutput": "ember.pooling_outputs",
    "EmbeddingRequestOutput": "ember.pooling_outputs",
    "ClassificationOutput": "ember.pooling_outputs",
    "ClassificationRequestOutput": "ember.pooling_outputs",
    "ScoringOutput": "ember.pooling_outputs",
    "ScoringRequestOutput": "ember.pooling_outputs",
    "RequestOutput": "ember.outputs",
    "CompletionOutput": "ember.outputs",
    "Logprob": "ember.outputs",
    "EngineArgs": "ember.enginecore.arg_utils",
    "EngineDeadError": "ember.enginecore.exceptions",
    "BeamSearchParams": "ember.beam_search",
    "BeamSearchOutput": "ember.beam_search",
    "BeamSearchSequence": "ember.beam_search",
    "StructuredOutputsParams": "ember.workers.structured_outputs_params",
    "GuidedDecodingParams": "ember.workers.structured_outputs_params",
    "LoRARequest": "ember.workers.lora_request",
    "PromptType": "ember.prompt_types",
    "TextPrompt": "ember.prompt_types",
    "TokensPrompt": "ember.prompt_types",
}

__all__ = [
    "LLM",
    "BeamSearchOutput",
    "BeamSearchParams",
    "BeamSearchSequence",
    "ClassificationOutput",
    "ClassificationRequestOutput",
    "CompletionOutput",
    "EmbeddingOutput",
    "EmbeddingRequestOutput",
    "EngineArgs",
    "EngineDeadError",
    "GuidedDecodingParams",
    "LoRARequest",
    "Logprob",
    "PoolingOutput",
    "PoolingParams",
    "PoolingRequestOutput",
    "PromptType",
    "RequestOutput",
    "SamplingParams",
    "ScoringOutput",
    "ScoringRequestOutput",
    "StructuredOutputsParams",
    "TextPrompt",
    "TokensPrompt",
]

if TYPE_CHECKING:
    from ember.beam_search import BeamSearchOutput, BeamSearchParams, BeamSearchSequence
    from ember.enginecore.arg_utils import EngineArgs
    from ember.enginecore.exceptions import EngineDeadError
    from ember.llm import LLM
    from ember.outputs import CompletionOutput, Logprob, RequestOutput
    from ember.pooling_outputs import (
        ClassificationOutput,
        ClassificationRequestOutput,
        EmbeddingOutput,
        EmbeddingRequestOutput,
        PoolingOutput,
        PoolingRequestOutput,
        ScoringOutput,
        ScoringRequestOutput,
    )
    from ember.prompt_types import PromptType, TextPrompt, TokensPrompt
    from ember.workers.lora_request import LoRARequest
    from ember.workers.pooling_params import PoolingParams
    from ember.workers.sampling_params import SamplingParams
    from ember.workers.structured_outputs_params import (
        GuidedDecodingParams,
        StructuredOutputsParams,
    )


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ember' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
