"""Compute kernels of ember, called by the layers in `ember.workers.layers` and the sampler.

Each public function dispatches on the device: Triton kernels (`<op>_triton.py`, imported
only for CUDA tensors, so CPU users never import triton) or the plain-torch reference beside it
(`<op>_torch`, used on CPU and as the oracle in tests).

The names below load their module on first use, so that torch-free modules of this package
(`cpu_features`, which the engine's argument resolution reads) import without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "apply_rotary_emb": "rotary",
    "apply_top_k_top_p": "sampling",
    "fused_add_rms_norm": "layernorm",
    "gelu_and_mul": "activation",
    "paged_attention": "attention",
    "rms_norm": "layernorm",
    "sample_from_probs": "sampling",
    "silu_and_mul": "activation",
    "write_kv_cache": "attention",
}

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


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
