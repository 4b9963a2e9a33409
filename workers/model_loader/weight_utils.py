"""Checkpoint readers that yield (Hugging Face tensor name, tensor), and the generic loop that
routes each tensor to its parameter's `weight_loader`."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator

import torch
from safetensors import safe_open
from torch import nn


def safetensors_files(model_dir: str) -> list[str]:
    """The safetensors files of a model directory, sharded (with an index) or not."""
    index_path = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index_path):
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
        return [os.path.join(model_dir, name) for name in sorted(set(weight_map.values()))]
    return sorted(
        os.path.join(model_dir, name)
        for name in os.listdir(model_dir)
        if name.endswith(".safetensors")
    )


def iterate_safetensors(files: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    for path in files:
        with safe_open(path, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                yield name, f.get_tensor(name)


def _split_packed(name: str, packed_modules_mapping: dict) -> tuple[str, object]:
    """Map a checkpoint name to (parameter name, shard id) through the model's fused modules."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part in packed_modules_mapping:
            fused, shard_id = packed_modules_mapping[part]
            return ".".join(parts[:i] + [fused] + parts[i + 1 :]), shard_id
    return name, None


def checkpoint_names(model: nn.Module, packed_modules_mapping: dict) -> set[str]:
    """The checkpoint tensor names a model needs, with fused parameters split back."""
    shards_of: dict[str, list[str]] = {}
    for checkpoint_part, (fused, _) in packed_modules_mapping.items():
        shards_of.setdefault(fused, []).append(checkpoint_part)
    names = set()
    for param_name, _ in model.named_parameters():
        parts = param_name.split(".")
        fused_at = [i for i, p in enumerate(parts) if p in shards_of]
        if not fused_at:
            names.add(param_name)
            continue
        i = fused_at[0]
        for checkpoint_part in shards_of[parts[i]]:
            names.add(".".join(parts[:i] + [checkpoint_part] + parts[i + 1 :]))
    return names


def load_weights_into(
    model: nn.Module,
    weights: Iterable[tuple[str, torch.Tensor]],
    packed_modules_mapping: dict,
    skip_prefixes: tuple[str, ...] = (),
) -> None:
    """Copy every checkpoint tensor into its parameter; fail naming any missing, unknown or
    mis-shaped tensor."""
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    for name, tensor in weights:
        if name.startswith(skip_prefixes) or name.endswith("rotary_emb.inv_freq"):
            continue
        param_name, shard_id = _split_packed(name, packed_modules_mapping)
        if param_name not in params:
            raise ValueError(
                f"checkpoint tensor {name!r} has no parameter in {type(model).__name__}"
            )
        param = params[param_name]
        loader = getattr(param, "weight_loader", None)
        try:
            if loader is None:
                _copy_whole(param, tensor)
            elif shard_id is None:
                loader(param, tensor)
            else:
                loader(param, tensor, shard_id)
        except ValueError as exc:
            raise ValueError(f"checkpoint tensor {name!r}: {exc}") from None
        loaded.add(name)
    missing = sorted(checkpoint_names(model, packed_modules_mapping) - loaded)
    missing = [name for name in missing if not name.startswith(skip_prefixes)]
    if missing:
        shown = ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else "")
        raise ValueError(f"checkpoint is missing {len(missing)} weight(s): {shown}")


def _copy_whole(param: torch.Tensor, tensor: torch.Tensor) -> None:
    if param.shape != tensor.shape:
        raise ValueError(
            f"shape mismatch: checkpoint has {tuple(tensor.shape)}, "
            f"model expects {tuple(param.shape)}"
        )
    param.data.copy_(tensor)


def initialize_dummy_weights(model: nn.Module, seed: int, low: float = -1e-3, high: float = 1e-3):
    """Random weights for benchmarks (`load_format="dummy"`); norms keep scale around one."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    for name, param in model.named_parameters():
        values = torch.empty(param.shape, dtype=torch.float32)
        values.uniform_(low, high, generator=generator)
        if name.endswith("norm.weight"):
            values += 1.0
        param.data.copy_(values)
