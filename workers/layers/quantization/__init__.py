"""Weight formats: `get_quantization_config(name)` for the `quantization=` value of a model."""

from __future__ import annotations

from ember.workers.layers.quantization.base import (
    EmbeddingMethodBase,
    LinearMethodBase,
    QuantizationConfig,
    process_weights_after_loading,
)
from ember.workers.layers.quantization.gguf_packed import GGUFPackedConfig
from ember.workers.layers.quantization.unquantized import UnquantizedConfig

_CONFIGS: dict[str, type[QuantizationConfig]] = {"gguf": GGUFPackedConfig}


def get_quantization_config(name: str | None) -> QuantizationConfig:
    """A new config for one model (None: dense weights)."""
    if name is None:
        return UnquantizedConfig()
    if name not in _CONFIGS:
        raise ValueError(f"quantization must be one of {sorted(_CONFIGS)} or None, got {name!r}")
    return _CONFIGS[name]()


__all__ = [
    "EmbeddingMethodBase",
    "LinearMethodBase",
    "QuantizationConfig",
    "get_quantization_config",
    "process_weights_after_loading",
]
