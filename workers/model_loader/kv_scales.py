"""KV-cache scales read from a checkpoint: the per-layer `k_scale` / `v_scale` that FP8
checkpoints carry for an e4m3 KV cache (vLLM's `maybe_remap_kv_scale_name`), routed to the
attention layer's own scales (`workers/layers/attention.py`), which an e4m3 cache
(`kv_cache_dtype="fp8"`) divides by when it stores and multiplies by when it reads; other
caches ignore them.

The names the tools write, each for the attention block `<prefix>` (e.g.
`model.layers.0.self_attn`):

    <prefix>.k_scale, <prefix>.v_scale                  llm-compressor (kv_cache_scheme), ModelOpt
    <prefix>.k_proj.k_scale, <prefix>.v_proj.v_scale    older ModelOpt
    <prefix>.k_proj.output_scale, .v_proj.output_scale  older llm-compressor
    <prefix>.kv_scale                                   AutoFP8 (kv_cache_scheme "static"): both

Query and softmax scales (`q_scale`, `prob_scale`, `q_proj.output_scale`) are for FP8
attention kernels that quantize queries, which ember does not have: they are skipped, as on
vLLM's backends without such kernels. A scale must be one positive finite number (per-tensor:
vLLM's "fp8" cache); `calculate_kv_scales=True` still replaces it with the first step's.
"""

from __future__ import annotations

import torch
from torch import nn

# checkpoint suffix -> the attention scales it sets
_KV_SCALE_SUFFIXES = (
    (".k_proj.output_scale", ("k_scale",)),
    (".v_proj.output_scale", ("v_scale",)),
    (".k_proj.k_scale", ("k_scale",)),
    (".v_proj.v_scale", ("v_scale",)),
    (".kv_scale", ("k_scale", "v_scale")),
    (".k_scale", ("k_scale",)),
    (".v_scale", ("v_scale",)),
)
_SKIPPED_SUFFIXES = (".q_proj.output_scale", ".q_scale", ".prob_scale", ".prob_output_scale")


def is_skipped_attention_scale(name: str) -> bool:
    """Whether `name` is a query or softmax scale of FP8 attention (not read)."""
    return name.endswith(_SKIPPED_SUFFIXES)


def kv_scale_target(name: str) -> tuple[str, tuple[str, ...]] | None:
    """(the attention block's checkpoint prefix, the scales the tensor sets) for a KV-scale
    tensor's name; None for any other tensor."""
    for suffix, scales in _KV_SCALE_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)], scales
    return None


def attention_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The model's attention layers (modules holding KV scales) by their parent's name: the
    checkpoint prefix of their block (`model.layers.0.self_attn` for the layer at
    `model.layers.0.self_attn.attn`)."""
    layers = {}
    for name, module in model.named_modules():
        if isinstance(getattr(module, "k_scale", None), torch.Tensor) and hasattr(
            module, "kv_cache"
        ):
            layers[name.rpartition(".")[0]] = module
    return layers


def load_kv_scale(
    layers: dict[str, nn.Module], name: str, tensor: torch.Tensor, prefix: str, scales: tuple
) -> None:
    """Set the scales of the attention layer of `prefix` from the checkpoint tensor `name`;
    ValueError naming the tensor when no layer has that prefix or the value is not one
    positive finite number."""
    layer = layers.get(prefix)
    if layer is None:
        raise ValueError(f"checkpoint tensor {name!r} names no attention layer of the model")
    if tensor.numel() != 1:
        raise ValueError(
            f"checkpoint tensor {name!r}: a KV-cache scale of shape {tuple(tensor.shape)}; "
            "ember reads one scale a layer (per-tensor, vLLM's 'fp8' cache)"
        )
    value = float(tensor.float().reshape(()))
    if not (value > 0.0 and value != float("inf")):
        raise ValueError(f"checkpoint tensor {name!r}: a KV-cache scale must be > 0, got {value}")
    for scale in scales:
        getattr(layer, scale).fill_(value)
