"""`ember.sampling_params`, where vLLM users import `SamplingParams` and `BeamSearchParams`
from (`from vllm.sampling_params import BeamSearchParams`)."""

from ember.beam_search import BeamSearchParams
from ember.workers.sampling_params import SamplingParams, SamplingType

__all__ = ["BeamSearchParams", "SamplingParams", "SamplingType"]
