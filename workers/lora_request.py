"""`LoRARequest`: which LoRA adapter a request runs with (vLLM's `vllm.lora.request`). Defined
here, the lowest layer that reads it (the worker loads the adapter); re-exported as
`ember.LoRARequest` and `ember.lora.request.LoRARequest`."""

from __future__ import annotations

import json
import os
import re
import struct
from typing import Any

import msgspec

# The checkpoint modules an adapter may target (vLLM's supported Llama targets).
SUPPORTED_TARGETS = frozenset(
    {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
)
ADAPTER_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")


class LoRARequest(msgspec.Struct, omit_defaults=True, kw_only=False):
    """A PEFT adapter directory (`adapter_config.json` + `adapter_model.safetensors` or
    `.bin`) named `lora_name`, known to the engine by `lora_int_id` (>= 1, unique per adapter,
    as in vLLM). Requests with the same `lora_int_id` share the adapter's slot and their
    prefix-cache blocks; the base model's blocks are never reused under an adapter."""

    lora_name: str
    lora_int_id: int
    lora_path: str = ""
    base_model_name: str | None = None  # vLLM's field; not checked
    load_inplace: bool = False  # vLLM's; accepted, no effect (ember reads an adapter once)

    def __post_init__(self) -> None:
        if not isinstance(self.lora_int_id, int) or isinstance(self.lora_int_id, bool):
            raise TypeError(f"lora_int_id must be an int, got {type(self.lora_int_id).__name__}")
        if self.lora_int_id < 1:
            raise ValueError(f"id must be > 0, got {self.lora_int_id}")
        if not isinstance(self.lora_name, str) or not self.lora_name:
            raise ValueError(f"lora_name must be a non-empty string, got {self.lora_name!r}")

    # vLLM's aliases
    @property
    def adapter_id(self) -> int:
        return self.lora_int_id

    @property
    def name(self) -> str:
        return self.lora_name

    @property
    def path(self) -> str:
        return self.lora_path

    def __hash__(self) -> int:
        return hash(self.lora_name)


def adapter_weights_file(lora_request: LoRARequest) -> str:
    """The adapter's weights file; ValueError naming the path when there is none."""
    path = lora_request.lora_path
    for name in ADAPTER_WEIGHT_FILES:
        candidate = os.path.join(path, name)
        if os.path.isfile(candidate):
            return candidate
    raise ValueError(
        f"LoRA adapter {lora_request.lora_name!r}: no {' or '.join(ADAPTER_WEIGHT_FILES)} "
        f"in {path!r}"
    )


def read_adapter_config(
    lora_request: LoRARequest,
    max_lora_rank: int,
    module_shapes: dict[str, list[int]] | None = None,
) -> dict:
    """The adapter's `adapter_config.json`, checked without loading any tensor: the path
    exists, it is a LoRA of rank <= max_lora_rank on supported targets (NotImplementedError for
    DoRA, LoRA biases, embeddings, lm_head and other modules), and, given the model's
    `module_shapes` (`lora_module_shapes`), a safetensors file's A and B fit them. Called by the
    frontend before it sends the request, and by the worker before it loads the adapter."""
    name, path = lora_request.lora_name, lora_request.lora_path
    config_path = os.path.join(path, "adapter_config.json")
    if not path or not os.path.isdir(path):
        raise ValueError(f"LoRA adapter {name!r}: lora_path {path!r} is not a directory")
    try:
        with open(config_path) as f:
            config = json.load(f)
    except (OSError, ValueError) as exc:
        raise ValueError(f"LoRA adapter {name!r}: cannot read {config_path}: {exc}") from exc
    if not isinstance(config, dict):
        raise ValueError(f"LoRA adapter {name!r}: {config_path} is not a JSON object")  # noqa: TRY004
    peft_type = config.get("peft_type", "LORA")
    if str(peft_type).upper() != "LORA":
        raise NotImplementedError(
            f"LoRA adapter {name!r}: peft_type {peft_type!r} is not supported (only LORA)"
        )
    if config.get("use_dora"):
        raise NotImplementedError(f"LoRA adapter {name!r}: DoRA (use_dora) is not supported")
    if config.get("lora_bias"):
        raise NotImplementedError(f"LoRA adapter {name!r}: lora_bias is not supported")
    for key in ("modules_to_save", "layers_to_transform"):
        if config.get(key):
            raise NotImplementedError(f"LoRA adapter {name!r}: {key} is not supported")
    ranks = [config.get("r", 8), *(config.get("rank_pattern") or {}).values()]
    for rank in ranks:
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(f"LoRA adapter {name!r}: rank r must be a positive int, got {rank!r}")
        if rank > max_lora_rank:
            raise ValueError(
                f"LoRA adapter {name!r}: LoRA rank {rank} is greater than max_lora_rank "
                f"{max_lora_rank}"
            )
    targets = config.get("target_modules")
    if isinstance(targets, str) and targets != "all-linear":
        targets = [targets] if re.fullmatch(r"[A-Za-z_]\w*", targets) else None
    if isinstance(targets, list):
        for target in targets:
            if target not in SUPPORTED_TARGETS:
                raise NotImplementedError(
                    f"LoRA adapter {name!r}: target module {target!r} is not supported "
                    f"(supported: {', '.join(sorted(SUPPORTED_TARGETS))})"
                )
    weights_file = adapter_weights_file(lora_request)
    if weights_file.endswith(".safetensors"):
        shapes = _safetensors_shapes(weights_file, name)
        for tensor_name in shapes:
            lora_module(tensor_name, name)  # raises for a module ember cannot serve
        if module_shapes:
            _check_shapes(shapes, module_shapes, name)
    return config


def _safetensors_shapes(path: str, lora_name: str) -> dict[str, list[int]]:
    """The tensor names and shapes of a safetensors file, from its header (no tensor read)."""
    try:
        with open(path, "rb") as f:
            (header_bytes,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_bytes))
        return {key: list(value["shape"]) for key, value in header.items() if key != "__metadata__"}
    except (OSError, ValueError, struct.error, TypeError, KeyError) as exc:
        raise ValueError(f"LoRA adapter {lora_name!r}: cannot read {path}: {exc}") from exc


def lora_module_shapes(hf_config: Any) -> dict[str, list[int]]:
    """[in, out] of each supported target module of a Llama-shaped model, from its config (the
    MLP's only for a dense one: expert MLPs are left to the worker's check)."""
    hidden = getattr(hf_config, "hidden_size", None)
    heads = getattr(hf_config, "num_attention_heads", None)
    if not isinstance(hidden, int) or not isinstance(heads, int) or heads < 1:
        return {}
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
    head_dim = getattr(hf_config, "head_dim", None) or hidden // heads
    shapes = {
        "q_proj": [hidden, heads * head_dim],
        "k_proj": [hidden, kv_heads * head_dim],
        "v_proj": [hidden, kv_heads * head_dim],
        "o_proj": [heads * head_dim, hidden],
    }
    intermediate = getattr(hf_config, "intermediate_size", None)
    experts = ("num_experts", "num_local_experts", "n_routed_experts")
    if isinstance(intermediate, int) and not any(getattr(hf_config, e, None) for e in experts):
        shapes["gate_proj"] = shapes["up_proj"] = [hidden, intermediate]
        shapes["down_proj"] = [intermediate, hidden]
    return shapes


def _check_shapes(
    shapes: dict[str, list[int]], module_shapes: dict[str, list[int]], lora_name: str
) -> None:
    """A: [r, in], B: [out, r] of the module in this model; ValueError naming the tensor."""
    for tensor_name, shape in shapes.items():
        module, part = lora_module(tensor_name, lora_name)
        expected = module_shapes.get(module.rpartition(".")[2])
        if expected is None or len(shape) != 2:
            continue
        size_in, size_out = expected
        fits = shape[1] == size_in if part == "lora_A" else shape[0] == size_out
        if not fits:
            want = f"[r, {size_in}]" if part == "lora_A" else f"[{size_out}, r]"
            raise ValueError(
                f"LoRA adapter {lora_name!r} does not fit this model (an adapter of another base "
                f"model?): {tensor_name} has shape {shape}, the model expects {want}"
            )


def lora_module(tensor_name: str, lora_name: str) -> tuple[str, str]:
    """(module path, "lora_A" | "lora_B") of a PEFT tensor name such as
    `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`; NotImplementedError
    naming the module for what ember cannot serve (embeddings, lm_head, DoRA, biases)."""
    name = tensor_name.removeprefix("base_model.model.")
    for part in ("lora_A", "lora_B"):
        marker = f".{part}."
        if marker in name:
            module, _, rest = name.partition(marker)
            leaf = module.rpartition(".")[2]
            if rest != "weight":
                raise NotImplementedError(
                    f"LoRA adapter {lora_name!r}: tensor {tensor_name!r} (a LoRA {rest}) is not "
                    "supported"
                )
            if leaf not in SUPPORTED_TARGETS:
                raise NotImplementedError(
                    f"LoRA adapter {lora_name!r}: target module {leaf!r} ({module}) is not "
                    f"supported (supported: {', '.join(sorted(SUPPORTED_TARGETS))})"
                )
            return module, part
    if "lora_magnitude_vector" in name:
        raise NotImplementedError(f"LoRA adapter {lora_name!r}: DoRA (use_dora) is not supported")
    raise NotImplementedError(
        f"LoRA adapter {lora_name!r}: tensor {tensor_name!r} is not a LoRA A or B weight of a "
        "supported module (embeddings, lm_head and modules_to_save are not supported)"
    )
