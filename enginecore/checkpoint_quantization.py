"""Which weight format a model runs with: `LLM(quantization=...)` checked against the
`quantization_config` of the checkpoint's config.json, in the user's process (no torch).

A checkpoint that declares a format is read in it (`quantization=None` takes it); an explicit
`quantization` that contradicts it, a format ember does not read, or a checkpoint format named
for a checkpoint without one is a `ValueError` before any process starts. vLLM's names for
its GPU kernels of the same checkpoints (`awq_marlin`, `gptq_marlin`) select the same format.
"""

from __future__ import annotations

from typing import Any

from ember.workers.quantization_settings import (
    FP8Settings,
    check_tensor_parallel_blocks,
    check_tensor_parallel_groups,
    compressed_tensors_settings,
    fp8_settings,
    group_quant_settings,
)

# quant_method values of config.json that ember reads, and vLLM's aliases for them.
CHECKPOINT_FORMATS = ("awq", "compressed-tensors", "fp8", "gptq")
# Formats that also quantize a dense checkpoint at load (vLLM's online FP8).
ONLINE_FORMATS = ("fp8",)
ALIASES = {"awq_marlin": "awq", "gptq_marlin": "gptq"}
# Every `quantization=` value ember takes ("gguf": a GGUF file's groups, see arg_utils).
QUANTIZATION_VALUES = ("gguf", *CHECKPOINT_FORMATS, *ALIASES)


def checkpoint_quant_method(hf_config: Any) -> str | None:
    """The `quant_method` of the config's `quantization_config` (lower case), or None."""
    settings = getattr(hf_config, "quantization_config", None)
    if not settings:
        return None
    if not isinstance(settings, dict) or not settings.get("quant_method"):
        raise ValueError(
            f"the model's config.json has a quantization_config without a quant_method: "
            f"{settings!r}"
        )
    return str(settings["quant_method"]).lower()


def resolve_checkpoint_quantization(
    quantization: str | None, hf_config: Any, tensor_parallel_size: int = 1
) -> str | None:
    """The checkpoint format the model loads in (one of `CHECKPOINT_FORMATS`), or None for a
    checkpoint that declares none (`quantization` then is None or "gguf", which the caller
    checks; "fp8" quantizes such a checkpoint at load). Its
    settings are checked here, and its groups against `tensor_parallel_size`."""
    method = checkpoint_quant_method(hf_config)
    requested = ALIASES.get(quantization, quantization)
    if method is None:
        if requested in ONLINE_FORMATS:
            return requested
        if requested in CHECKPOINT_FORMATS:
            raise ValueError(
                f"quantization={quantization!r} needs a checkpoint quantized in that format; "
                "the model's config.json has no quantization_config"
            )
        return None
    if method not in CHECKPOINT_FORMATS:
        raise ValueError(
            f"the checkpoint's quantization_config has quant_method={method!r}, which ember "
            f"does not read; supported: {', '.join(CHECKPOINT_FORMATS)}"
        )
    if requested is not None and requested != method:
        raise ValueError(
            f"quantization={quantization!r} contradicts the checkpoint, whose "
            f"quantization_config has quant_method={method!r}"
        )
    if method == "fp8":
        settings = fp8_settings(hf_config.quantization_config)
        check_tensor_parallel_blocks(settings, hf_config, tensor_parallel_size)
        return method
    if method == "compressed-tensors":
        settings = compressed_tensors_settings(hf_config.quantization_config)
        if settings.weight_block_size is not None:
            blocks = FP8Settings(weight_block_size=settings.weight_block_size)
            check_tensor_parallel_blocks(blocks, hf_config, tensor_parallel_size)
            return method
    else:
        settings = group_quant_settings(method, hf_config.quantization_config)
        if settings.lm_head and getattr(hf_config, "tie_word_embeddings", False):
            raise NotImplementedError(
                "GPTQ checkpoint: a quantized lm_head (lm_head=True) with "
                "tie_word_embeddings=True is not supported (the embedding would share it)"
            )
    check_tensor_parallel_groups(settings, hf_config, tensor_parallel_size)
    return method
