"""Compute kernels of ember: plain-torch references (CPU, and the oracle in tests).

Triton versions for CUDA come behind the same signatures; callers import from here.
"""

from ember.kernels.activation import silu_and_mul
from ember.kernels.attention import paged_attention, write_kv_cache
from ember.kernels.layernorm import fused_add_rms_norm, rms_norm
from ember.kernels.rotary import apply_rotary_emb
from ember.kernels.sampling import apply_top_k_top_p, sample_from_probs

__all__ = [
    "apply_rotary_emb",
    "apply_top_k_top_p",
    "fused_add_rms_norm",
    "paged_attention",
    "rms_norm",
    "sample_from_probs",
    "silu_and_mul",
    "write_kv_cache",
]
