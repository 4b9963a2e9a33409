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
    "RequestOutput": "ember.outputs",
    "CompletionOutput": "ember.outputs",
    "Logprob": "ember.outputs",
    "EngineArgs": "ember.enginecore.arg_utils",
    "EngineDeadError": "ember.enginecore.exceptions",
    "BeamSearchParams": "ember.beam_search",
    "BeamSearchOutput": "ember.beam_search",
    "BeamSearchSequence": "ember.beam_search",
}

__all__ = [
    "LLM",
    "BeamSearchOutput",
    "BeamSearchParams",
    "BeamSearchSequence",
    "CompletionOutput",
    "EngineArgs",
    "EngineDeadError",
    "Logprob",
    "RequestOutput",
    "SamplingParams",
]

if TYPE_CHECKING:
    from ember.beam_search import BeamSearchOutput, BeamSearchParams, BeamSearchSequence
    from ember.enginecore.arg_utils import EngineArgs
    from ember.enginecore.exceptions import EngineDeadError
    from ember.llm import LLM
    from ember.outputs import CompletionOutput, Logprob, RequestOutput
    from ember.workers.sampling_params import SamplingParams


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ember' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
