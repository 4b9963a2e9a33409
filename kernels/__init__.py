"""Compute kernels of ember, called by the layers in `ember.workers.layers` and the sampler.

Each public function dispatches on the device: Triton kernels (`<op>_triton.py`, imported
only for CUDA tensors, so CPU users never import triton) or the plain-torch reference beside it
(`<op>_torch`, used on CPU and as the oracle in tests).

The names below load their module on first use, so that torch-free modules of this package
(`cpu_features`, which the engine's argument resolution reads) import without torch.

This directory sits at the checkout's root, so a process started there (`python -m pytest`, a
script in the root) can also find it as a top-level `kernels`, the name of Hugging Face's kernel
package that `transformers` >= 5.25 depends on and imports. Imported under that name, this
module hands the name over to the installed package (`_hand_over_shadowed_name`).
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import os
import sys
from typing import Any

_EXPORTS = {
    "apply_rotary_emb": "rotary",
    "apply_token_bitmask_": "token_bitmask",
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
    "apply_token_bitmask_",
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


def _hand_over_shadowed_name() -> None:
    """Put the installed top-level `kernels` package in `sys.modules` in place of this module.

    Python returns `sys.modules[name]` once a package's `__init__` has run, so `import kernels`
    then yields the installed package. With none installed, this module stays (and is unused).
    """
    checkout_root = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
    other_entries = [
        entry for entry in sys.path if os.path.realpath(entry or os.getcwd()) != checkout_root
    ]
    spec = importlib.machinery.PathFinder.find_spec(__name__, other_entries)
    if spec is None or spec.loader is None:
        return
    package = importlib.util.module_from_spec(spec)
    sys.modules[__name__] = package
    spec.loader.exec_module(package)


if __name__ == "kernels":
    _hand_over_shadowed_name()
