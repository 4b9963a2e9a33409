"""The `quantization_config` of a GPTQ, AWQ, compressed-tensors or FP8 checkpoint, read and checked
without torch: the user's process checks it before any process starts
(`enginecore/checkpoint_quantization.py`), and the workers' formats (`layers/quantization/`)
are built from it."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

GPTQ_CHECKPOINT_FORMATS = ("gptq", "gptq_v2")


@dataclass(frozen=True)
class GroupQuantSettings:
    """bits, group_size (-1: one group a row), act-order, and how zeros are stored."""

    method: str
    bits: int
    group_size: int
    desc_act: bool = False
    zero_offset: int = 0  # added to each stored zero point (GPTQ v1 stores zero - 1)
    modules_to_not_convert: tuple[str, ...] = ()
    # GPTQModel's per-module settings (`dynamic`), in the checkpoint's order
    dynamic: tuple[DynamicRule, ...] = ()
    lm_head: bool = False  # GPTQModel's lm_head=True: the LM head is quantized too


@dataclass(frozen=True)
class DynamicRule:
    """One entry of GPTQModel's `dynamic`: modules whose name matches `pattern` (re.match,
    from the start) are kept dense ("-:" rules, `skip`) or take these settings over the
    checkpoint's (None: the checkpoint's). The first rule that matches decides, as vLLM's
    `get_dynamic_override` does."""

    pattern: str
    skip: bool
    bits: int | None = None
    group_size: int | None = None
    desc_act: bool | None = None

    def matches(self, module: str) -> bool:
        return re.match(self.pattern, module) is not None


def group_quant_settings(method: str, settings: dict[str, Any]) -> GroupQuantSettings:
    """The settings of a "gptq" or "awq" checkpoint; `ValueError` / `NotImplementedError`
    naming the field ember does not take."""
    if method == "gptq":
        return _gptq(settings)
    if method == "awq":
        return _awq(settings)
    raise ValueError(f"not a GPTQ or AWQ quant_method: {method!r}")


def _group_size(value: Any, method: str) -> int:
    size = int(value)
    if size != -1 and size <= 0:
        raise ValueError(f"{method} checkpoint: group_size must be -1 or positive, got {value!r}")
    return size


def _gptq(settings: dict[str, Any]) -> GroupQuantSettings:
    bits = settings.get("bits", 4)
    if bits not in (4, 8):
        raise ValueError(f"GPTQ checkpoint: bits must be 4 or 8, got {bits!r}")
    checkpoint_format = settings.get("checkpoint_format") or settings.get("format") or "gptq"
    if checkpoint_format not in GPTQ_CHECKPOINT_FORMATS:
        raise ValueError(
            f"GPTQ checkpoint: checkpoint_format must be one of {GPTQ_CHECKPOINT_FORMATS}, got "
            f"{checkpoint_format!r}"
        )
    return GroupQuantSettings(
        method="gptq",
        bits=bits,
        group_size=_group_size(settings.get("group_size", 128), "GPTQ"),
        desc_act=bool(settings.get("desc_act", False)),
        zero_offset=1 if checkpoint_format == "gptq" else 0,
        dynamic=_gptq_dynamic(settings.get("dynamic")),
        lm_head=bool(settings.get("lm_head", False)),
    )


# Keys of a `dynamic` entry that only steered the quantization run (nothing to read back).
_DYNAMIC_RUN_ONLY = ("sym", "damp_percent", "damp_auto_increment", "mse", "static_groups")


def _gptq_dynamic(dynamic: Any) -> tuple[DynamicRule, ...]:
    """GPTQModel's `dynamic`: {"-:<regex>": {}} keeps the matching modules dense,
    {"+:<regex>" or "<regex>": {"bits": 8, "group_size": 64, "desc_act": ...}} gives them
    their own settings."""
    if not dynamic:
        return ()
    name = "GPTQ checkpoint"
    if not isinstance(dynamic, dict):
        raise TypeError(f"{name}: dynamic must be a mapping of patterns, got {dynamic!r}")
    rules = []
    for key, overrides in dynamic.items():
        skip = key.startswith("-:")
        pattern = key[2:] if key[:2] in ("-:", "+:") else key
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"{name}: dynamic pattern {key!r} is not a regex: {exc}") from None
        if not isinstance(overrides, dict):
            raise TypeError(f"{name}: dynamic[{key!r}] must be a mapping, got {overrides!r}")
        unknown = set(overrides) - {"bits", "group_size", "desc_act", *_DYNAMIC_RUN_ONLY}
        if unknown:
            raise NotImplementedError(
                f"{name}: dynamic[{key!r}] sets {sorted(unknown)}, which ember does not read "
                "(it reads bits, group_size and desc_act)"
            )
        bits = overrides.get("bits")
        if bits is not None and bits not in (4, 8):
            raise ValueError(f"{name}: dynamic[{key!r}] bits must be 4 or 8, got {bits!r}")
        group_size = overrides.get("group_size")
        rules.append(
            DynamicRule(
                pattern=pattern,
                skip=skip,
                bits=bits,
                group_size=None if group_size is None else _group_size(group_size, "GPTQ"),
                desc_act=None if "desc_act" not in overrides else bool(overrides["desc_act"]),
            )
        )
    return tuple(rules)


def _awq(settings: dict[str, Any]) -> GroupQuantSettings:
    bits = settings.get("bits", settings.get("w_bit", 4))
    if bits != 4:
        raise ValueError(f"AWQ checkpoint: bits must be 4, got {bits!r}")
    version = str(settings.get("version", "gemm")).lower()
    if version != "gemm":
        raise NotImplementedError(f"AWQ checkpoint: version {version!r} is not supported ('gemm')")
    if not settings.get("zero_point", True):
        raise NotImplementedError("AWQ checkpoint: zero_point=False is not supported")
    return GroupQuantSettings(
        method="awq",
        bits=4,
        group_size=_group_size(
            settings.get("group_size", settings.get("q_group_size", 128)), "AWQ"
        ),
        modules_to_not_convert=tuple(settings.get("modules_to_not_convert") or ()),
    )


@dataclass(frozen=True)
class CompressedTensorsSettings:
    """One scheme of compressed-tensors for all targets: weight-only integers
    ("pack-quantized"), or FP8 weights ("float-quantized", `weight_type` "float") with FP8
    activations (`activation_scheme` "dynamic" per token or group, "static" per tensor) or
    without ("none": weight-only)."""

    method: str
    bits: int
    group_size: int
    targets: tuple[str, ...]
    ignore: tuple[str, ...]
    desc_act: bool = False
    weight_type: str = "int"
    activation_scheme: str | None = None
    weight_block_size: tuple[int, int] | None = None  # FP8 "block" strategy: (bn, bk)
    symmetric: bool = True  # integer schemes: False stores `weight_zero_point`


def compressed_tensors_settings(settings: dict[str, Any]) -> CompressedTensorsSettings:
    """The settings of a "compressed-tensors" checkpoint; `NotImplementedError` naming what
    ember does not read yet (activation quantization, FP8, sparsity, several groups, ...)."""
    name = "compressed-tensors checkpoint"
    groups = settings.get("config_groups") or {}
    if len(groups) != 1:
        raise NotImplementedError(f"{name}: {len(groups)} config_groups (ember reads one)")
    group = next(iter(groups.values()))
    weights = group.get("weights") or {}
    fmt = group.get("format") or settings.get("format")
    if settings.get("sparsity_config"):
        raise NotImplementedError(f"{name}: sparsity_config is not supported")
    check_kv_cache_scheme(name, settings.get("kv_cache_scheme"))
    if fmt == "float-quantized":
        return _compressed_tensors_fp8(settings, group)
    unsupported = {
        "format": (fmt, ("pack-quantized",)),
        "weights.type": (weights.get("type"), ("int",)),
        "weights.num_bits": (weights.get("num_bits"), (4, 8)),
        "weights.strategy": (weights.get("strategy"), ("group", "channel")),
        "weights.symmetric": (weights.get("symmetric"), (True, False, None)),
        "weights.zp_dtype": (weights.get("zp_dtype"), (None, "torch.int8")),
        # "weight": GPTQ quantized the columns in activation order and stored them in their
        # own, with positional groups; "group" (older llm-compressor) adds `weight_g_idx`
        "weights.actorder": (weights.get("actorder"), (None, "weight", "group")),
        "input_activations": (group.get("input_activations"), (None,)),
    }
    _refuse_unsupported(name, unsupported)
    group_size = -1 if weights["strategy"] == "channel" else int(weights.get("group_size") or 0)
    if weights["strategy"] == "group" and group_size <= 0:
        raise ValueError(f"{name}: strategy 'group' without a positive group_size")
    return CompressedTensorsSettings(
        method="compressed-tensors",
        bits=weights["num_bits"],
        group_size=group_size,
        targets=tuple(group.get("targets") or ("Linear",)),
        ignore=tuple(settings.get("ignore") or ()),
        symmetric=weights.get("symmetric") is not False,
        desc_act=weights.get("actorder") == "group" and group_size != -1,
    )


def _compressed_tensors_fp8(settings: dict[str, Any], group: dict) -> CompressedTensorsSettings:
    """llm-compressor's FP8 schemes (FP8_DYNAMIC, FP8, FP8_BLOCK): e4m3 weights with one scale
    a row ("channel"), a tensor, or a block of `block_structure` ("block": `weight_scale`
    [ceil(N / bn), ceil(K / bk)], DeepSeek's layout under compressed-tensors' name);
    activations quantized per token on the fly, with a static per-tensor `input_scale`, or,
    with blocks, per token and group of bk inputs on the fly (vLLM's
    `CompressedTensorsW8A8Fp8`)."""
    name = "compressed-tensors checkpoint"
    weights = group.get("weights") or {}
    activations = group.get("input_activations")
    _refuse_unsupported(
        name,
        {
            "weights.type": (weights.get("type"), ("float",)),
            "weights.num_bits": (weights.get("num_bits"), (8,)),
            "weights.strategy": (weights.get("strategy"), ("channel", "tensor", "block")),
            "weights.symmetric": (weights.get("symmetric"), (True,)),
            "weights.dynamic": (weights.get("dynamic"), (False, None)),
        },
    )
    block = _block_structure(name, weights) if weights["strategy"] == "block" else None
    if activations is None:  # weight-only FP8 (vLLM's CompressedTensorsW8A16Fp8)
        if block is not None:
            raise NotImplementedError(
                f"{name}: weight-only FP8 (no input_activations) with weights.strategy='block' "
                "is not supported yet (ember reads 'channel' and 'tensor')"
            )
        activation_scheme = "none"
    else:
        activation_scheme = _fp8_activation_scheme(name, activations, block)
    return CompressedTensorsSettings(
        method="compressed-tensors",
        bits=8,
        group_size=-1,
        targets=tuple(group.get("targets") or ("Linear",)),
        ignore=tuple(settings.get("ignore") or ()),
        weight_type="float",
        activation_scheme=activation_scheme,
        weight_block_size=block,
    )


def _block_structure(name: str, weights: dict) -> tuple[int, int]:
    block = weights.get("block_structure")
    valid = isinstance(block, list | tuple) and len(block) == 2
    if not valid or not all(isinstance(b, int) and b > 0 for b in block):
        raise ValueError(
            f"{name}: weights.block_structure must be two positive integers [bn, bk], got {block!r}"
        )
    return block[0], block[1]


def _fp8_activation_scheme(name: str, activations: dict, block: tuple[int, int] | None) -> str:
    """ "dynamic" (per token; with blocks, per token and group of bk) or "static" (per tensor)
    for compressed-tensors' FP8 input_activations; NotImplementedError for the others."""
    scheme = (
        activations.get("type"),
        activations.get("num_bits"),
        activations.get("strategy"),
        bool(activations.get("dynamic")),
    )
    schemes = {("float", 8, "token", True): "dynamic", ("float", 8, "tensor", False): "static"}
    if block is not None:  # vLLM's FP8 block scheme: per token and group of bk, dynamic
        schemes = {("float", 8, "group", True): "dynamic"}
        if scheme in schemes and activations.get("group_size") != block[1]:
            raise NotImplementedError(
                f"{name}: input_activations.group_size={activations.get('group_size')!r} with "
                f"weight blocks of {block[1]} inputs (ember reads groups of the block's width)"
            )
    if scheme not in schemes:
        raise NotImplementedError(
            f"{name}: input_activations (type, num_bits, strategy, dynamic)={scheme!r} is not "
            f"supported yet (ember reads: {', '.join(map(repr, schemes))})"
        )
    return schemes[scheme]


# kv_cache_scheme as llm-compressor writes it for vLLM's "fp8" cache: one e4m3 scale a layer
# for the keys and one for the values (`<block>.k_scale`, `.v_scale`), fixed at calibration
_KV_CACHE_SCHEME = {
    "type": ("float",),
    "num_bits": (8,),
    "strategy": ("tensor",),
    "symmetric": (True, None),
    "dynamic": (False, None),
}


def check_kv_cache_scheme(name: str, scheme: Any) -> None:
    """A checkpoint's `kv_cache_scheme`: None; AutoFP8's "static" (one `kv_scale` a layer);
    or compressed-tensors' per-tensor FP8 scheme. The scales it names are read from the
    checkpoint (`model_loader/kv_scales.py`) and used with `kv_cache_dtype="fp8"`; any other
    scheme is a `NotImplementedError` naming the field."""
    if scheme is None or scheme == "static":
        return
    if not isinstance(scheme, dict):
        raise NotImplementedError(
            f"{name}: kv_cache_scheme={scheme!r} is not supported (ember reads 'static' and "
            "compressed-tensors' per-tensor FP8 scheme)"
        )
    _refuse_unsupported(
        name,
        {f"kv_cache_scheme.{key}": (scheme.get(key), ok) for key, ok in _KV_CACHE_SCHEME.items()},
    )


def _refuse_unsupported(name: str, fields: dict[str, tuple[Any, tuple]]) -> None:
    for field, (value, supported) in fields.items():
        if value not in supported:
            raise NotImplementedError(
                f"{name}: {field}={value!r} is not supported yet (ember reads: "
                f"{', '.join(map(repr, supported))})"
            )


def check_tensor_parallel_groups(
    settings: GroupQuantSettings | CompressedTensorsSettings, hf_config: Any, tp_size: int
) -> None:
    """Refuse, before any process starts, a tensor-parallel size that cuts the groups of a
    row-parallel layer (attention's output and the MLP's down projection of a Llama-shaped
    config); the layers check every layer again when they are built."""
    if (
        tp_size == 1
        or settings.group_size == -1
        or (settings.desc_act and settings.method == "gptq")
    ):
        return
    heads = getattr(hf_config, "num_attention_heads", None)
    head_dim = getattr(hf_config, "head_dim", None) or (
        getattr(hf_config, "hidden_size", 0) // heads if heads else None
    )
    inputs = {
        "o_proj": heads * head_dim if heads and head_dim else None,
        "down_proj": getattr(hf_config, "intermediate_size", None),
    }
    for layer, size in inputs.items():
        if size and size % tp_size == 0 and (size // tp_size) % settings.group_size:
            raise ValueError(
                f"{layer}: input size per rank {size // tp_size} (of {size}, "
                f"tensor_parallel_size={tp_size}) is not aligned with the checkpoint's "
                f"group_size {settings.group_size}; use another tensor_parallel_size"
            )


# ---- FP8 (vLLM's Fp8Config) ----

ACTIVATION_SCHEMES = ("dynamic", "static")


@dataclass(frozen=True)
class FP8Settings:
    """What a `quant_method: "fp8"` config says; `serialized=False` is online FP8.
    `block_scale_name`: the checkpoint's name of the block scales (compressed-tensors writes
    "weight_scale")."""

    activation_scheme: str = "dynamic"
    weight_block_size: tuple[int, int] | None = None  # (block_n outputs, block_k inputs)
    ignored_layers: tuple[str, ...] = ()
    serialized: bool = True
    block_scale_name: str = "weight_scale_inv"


def fp8_settings(settings: dict[str, Any], serialized: bool = True) -> FP8Settings:
    """The settings of an FP8 `quantization_config` (vLLM's `Fp8Config.from_config`), or a
    `ValueError` / `NotImplementedError` naming the field ember does not take."""
    scheme = settings.get("activation_scheme")
    if scheme is None:
        raise ValueError(
            "FP8 checkpoint: quantization_config has no activation_scheme (vLLM requires it); "
            f"one of {ACTIVATION_SCHEMES}"
        )
    if scheme not in ACTIVATION_SCHEMES:
        raise ValueError(
            f"FP8 checkpoint: activation_scheme must be one of {ACTIVATION_SCHEMES}, got {scheme!r}"
        )
    block = settings.get("weight_block_size")
    if block is not None:
        if not serialized:
            raise ValueError(
                "online FP8 quantizes per tensor; weight_block_size needs a checkpoint"
            )
        valid = isinstance(block, list | tuple) and len(block) == 2
        valid = valid and all(isinstance(b, int) and not isinstance(b, bool) for b in block)
        if not valid or min(block) <= 0:
            raise ValueError(
                "FP8 checkpoint: weight_block_size must be two positive integers "
                f"[block_n, block_k], got {block!r}"
            )
        if scheme != "dynamic":
            raise ValueError(
                "FP8 checkpoint: block-wise weights (weight_block_size) take activation_scheme "
                f"'dynamic' only (as vLLM), got {scheme!r}"
            )
        block = (block[0], block[1])
    check_kv_cache_scheme("FP8 checkpoint", settings.get("kv_cache_scheme"))
    # vLLM: "ignored_layers", else "modules_to_not_convert" (transformers' key, Qwen3-FP8)
    ignored = settings.get("ignored_layers") or settings.get("modules_to_not_convert") or ()
    return FP8Settings(scheme, block, tuple(ignored), serialized)


def check_tensor_parallel_blocks(settings: FP8Settings, hf_config: Any, tp_size: int) -> None:
    """Refuse, before any process starts, a tensor-parallel size whose shards cut the weight
    blocks of a Llama-shaped config's layers (the layers check every layer again when built)."""
    if settings.weight_block_size is None or tp_size == 1:
        return
    block_n, block_k = settings.weight_block_size
    heads = getattr(hf_config, "num_attention_heads", None)
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
    head_dim = getattr(hf_config, "head_dim", None) or (
        getattr(hf_config, "hidden_size", 0) // heads if heads else None
    )
    intermediate = getattr(hf_config, "intermediate_size", None)
    sizes = []  # (layer, what, whole size, per-rank size, block)
    if heads and head_dim and heads % tp_size == 0:
        sizes.append(("q_proj", "output", heads * head_dim, heads * head_dim // tp_size, block_n))
        sizes.append(("o_proj", "input", heads * head_dim, heads * head_dim // tp_size, block_k))
        if kv_heads:
            per_rank = max(kv_heads // tp_size, 1) * head_dim
            sizes.append(("k_proj", "output", kv_heads * head_dim, per_rank, block_n))
    if intermediate and intermediate % tp_size == 0:
        sizes.append(("gate_proj", "output", intermediate, intermediate // tp_size, block_n))
        sizes.append(("down_proj", "input", intermediate, intermediate // tp_size, block_k))
    for layer, what, whole, per_rank, block in sizes:
        if per_rank % block:
            raise ValueError(
                f"{layer}: {what} size per rank {per_rank} (of {whole}, tensor_parallel_size="
                f"{tp_size}) is not divisible by the checkpoint's weight block size {block}; "
                "use another tensor_parallel_size"
            )
