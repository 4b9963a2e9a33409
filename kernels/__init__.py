"""Compute kernels of ember, called by the layers in `ember.workers.layers` and the sampler.

Each public function dispatches on the device: Triton kernels (`<op>_triton.py`, imported
only for CUDA tensors, so CPU users never import triton) or the plain-torch reference beside it
(`<op>_torch`, used on CPU and as the oracle in tests).
"""

from ember.kernels.activation import gelu_and_mul, silu_and_mul
from ember.kernels.attention import paged_attention, write_kv_cache
from ember.kernels.layernorm import fused_add_rms_norm, rms_norm
from ember.kernels.rotary import apply_rotary_emb
from ember.kernels.sampling import apply_top_k_top_p, sample_from_probs

__all__ = [
    "apply_rotary_emb",
    "apply_top_k_top_p",
    "fused_add_rms_norm",
    "gelu_and_mul",
    "paged_attention",
    "rms_norm",
    "sample_from_probs",
    "silu_and_mul",
    "write_kv_cache",
]
