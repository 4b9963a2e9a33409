"""Weight formats: `get_quantization_config(name)` for the `quantization=` value of a model."""

from __future__ import annotations

from torch import nn

from ember.workers.layers.quantization.awq import AWQConfig
from ember.workers.layers.quantization.base import (
    EmbeddingMethodBase,
    LinearMethodBase,
    QuantizationConfig,
    process_weights_after_loading,
    skip_dense_layers,
)
from ember.workers.layers.quantization.compressed_tensors import CompressedTensorsConfig
from ember.workers.layers.quantization.fp8 import FP8Config
from ember.workers.layers.quantization.gguf_packed import GGUFPackedConfig, GGUFPackedLinearMethod
from ember.workers.layers.quantization.gptq import GPTQConfig
from ember.workers.layers.quantization.group_quant import GroupQuantLinearMethod
from ember.workers.layers.quantization.unquantized import UnquantizedConfig

# Formats read from a checkpoint's `quantization_config`, built from its settings.
_CHECKPOINT_CONFIGS: dict[str, type[QuantizationConfig]] = {
    "gptq": GPTQConfig,
    "awq": AWQConfig,
    "compressed-tensors": CompressedTensorsConfig,
    "fp8": FP8Config,
}


def get_quantization_config(
    name: str | None, checkpoint_settings: dict | None = None
) -> QuantizationConfig:
    """A new config for one model (None: dense weights); a checkpoint's format takes the
    `quantization_config` of its config.json; "fp8" without one is FP8 at load."""
    if name is None:
        return UnquantizedConfig()
    if name == "gguf":
        return GGUFPackedConfig()
    if name not in _CHECKPOINT_CONFIGS:
        known = sorted(["gguf", *_CHECKPOINT_CONFIGS])
        raise ValueError(f"quantization must be one of {known} or None, got {name!r}")
    if name == "fp8" and not checkpoint_settings:
        return FP8Config.online()
    return _CHECKPOINT_CONFIGS[name](dict(checkpoint_settings or {}))


def has_integer_codes(model: nn.Module) -> bool:
    """Whether linear layers of `model` hold integer codes (GGUF's groups, GPTQ / AWQ /
    compressed-tensors integer schemes) rather than dense or FP8-dequantized weights."""
    integer_methods = (GGUFPackedLinearMethod, GroupQuantLinearMethod)
    return any(
        isinstance(getattr(module, "quant_method", None), integer_methods)
        for module in model.modules()
    )


__all__ = [
    "EmbeddingMethodBase",
    "LinearMethodBase",
    "QuantizationConfig",
    "get_quantization_config",
    "has_integer_codes",
    "process_weights_after_loading",
    "skip_dense_layers",
]
