"""`ember.sampling_params`, where vLLM users import `SamplingParams`, `BeamSearchParams`,
`RequestOutputKind` and `StructuredOutputsParams` from
(`from vllm.sampling_params import StructuredOutputsParams`)."""

from ember.beam_search import BeamSearchParams
from ember.workers.sampling_params import RequestOutputKind, SamplingParams, SamplingType
from ember.workers.structured_outputs_params import GuidedDecodingParams, StructuredOutputsParams

__all__ = [
    "BeamSearchParams",
    "GuidedDecodingParams",
    "RequestOutputKind",
    "SamplingParams",
    "SamplingType",
    "StructuredOutputsParams",
]
