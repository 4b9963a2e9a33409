"""Adapters on one worker: reads PEFT directories (this rank's shards of them), keeps
`max_cpu_loras` in host memory (LRU), and puts the adapters of each step into the `max_loras`
device slots of the LoRA layers (LRU among the slots this step does not use). Called by the
model runner before each forward.
"""

from __future__ import annotations

import logging
import math
import re
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ember.workers.config import LoRAConfig
from ember.workers.layers.linear import check_shape
from ember.workers.layers.lora import (
    LoRALinearMethod,
    LoRAStep,
    LoRATarget,
    add_lora_layers,
)
from ember.workers.lora_request import (
    LoRARequest,
    adapter_weights_file,
    lora_module,
    read_adapter_config,
)

logger = logging.getLogger(__name__)

# per LoRA layer: shard id -> (this rank's A [r, in], B [rows, r], scale)
LayerWeights = dict[str | int | None, tuple[torch.Tensor, torch.Tensor, float]]


@dataclass(slots=True)
class LoadedAdapter:
    lora_request: LoRARequest
    weights: dict[LoRALinearMethod, LayerWeights]


class LoRAManager:
    def __init__(
        self, model: nn.Module, config: LoRAConfig, dtype: torch.dtype, device: torch.device
    ):
        self.config = config
        self.dtype = dtype
        self.device = device
        self.step = LoRAStep()
        self.targets = add_lora_layers(
            model, config.max_loras, config.max_lora_rank, self.step, dtype, device
        )
        self.methods = list({id(t.method): t.method for t in self.targets.values()}.values())
        self.cpu_adapters: OrderedDict[int, LoadedAdapter] = OrderedDict()
        self.slot_adapter: list[int | None] = [None] * config.max_loras  # lora_int_id per slot
        self.slot_last_used = [0] * config.max_loras
        self.slot_of: dict[int, int] = {}  # this step's adapters: lora_int_id -> slot
        self.num_steps = 0
        logger.info(
            "LoRA: %d layers, %d slots of rank <= %d, %d adapters in host memory",
            len(self.methods),
            config.max_loras,
            config.max_lora_rank,
            config.num_cpu_loras,
        )

    # ---- per step ----------------------------------------------------------------------

    def activate(self, lora_requests: list[LoRARequest]) -> tuple[dict[int, int], dict[int, str]]:
        """Put the adapters of this step into slots: the slot of each lora_int_id, and the
        adapters that could not be loaded (their requests fail; the engine runs on)."""
        self.num_steps += 1
        wanted = {r.lora_int_id: r for r in lora_requests}
        slot_of, errors = {}, {}
        for lora_int_id in wanted:
            if lora_int_id in self.slot_adapter:
                slot = self.slot_adapter.index(lora_int_id)
                slot_of[lora_int_id] = slot
                self.slot_last_used[slot] = self.num_steps
        for lora_int_id, lora_request in wanted.items():
            if lora_int_id in slot_of:
                continue
            try:
                adapter = self._get_adapter(lora_request)
            except Exception as exc:  # noqa: BLE001 -- a bad adapter fails its requests alone
                logger.warning("LoRA adapter %r failed: %s", lora_request.lora_name, exc)
                errors[lora_int_id] = str(exc)
                continue
            slot = self._free_slot(set(slot_of.values()))
            for method in self.methods:
                method.set_slot(slot, adapter.weights.get(method, {}))
            self.slot_adapter[slot] = lora_int_id
            self.slot_last_used[slot] = self.num_steps
            slot_of[lora_int_id] = slot
        self.slot_of = slot_of
        return slot_of, errors

    def set_token_slots(self, token_slots: np.ndarray | None) -> None:
        """Which slot each token of the step uses (-1: none); None: no adapter this step."""
        step = self.step
        if token_slots is None or not (token_slots >= 0).any():
            step.token_slots, step.groups = None, []
            return
        # grouped on the host: no device sync per step
        device = self.device
        step.token_slots = torch.from_numpy(token_slots).to(device)
        slots = np.unique(token_slots)
        if len(slots) == 1:  # every token one adapter: whole activations, no gather or scatter
            step.groups = [(int(slots[0]), None)]
            return
        step.groups = [
            (int(slot), torch.from_numpy(np.flatnonzero(token_slots == slot)).to(device))
            for slot in slots
            if slot >= 0
        ]

    def _free_slot(self, in_use: set[int]) -> int:
        """An empty slot, else the least recently used one this step does not use (the
        scheduler never puts more than max_loras adapters in one step)."""
        candidates = [s for s in range(len(self.slot_adapter)) if s not in in_use]
        empty = [s for s in candidates if self.slot_adapter[s] is None]
        if empty:
            return empty[0]
        return min(candidates, key=lambda s: self.slot_last_used[s])

    # ---- host memory -------------------------------------------------------------------

    def _get_adapter(self, lora_request: LoRARequest) -> LoadedAdapter:
        lora_int_id = lora_request.lora_int_id
        adapter = self.cpu_adapters.get(lora_int_id)
        if adapter is not None:
            self.cpu_adapters.move_to_end(lora_int_id)
            return adapter
        adapter = self.load_adapter(lora_request)
        while len(self.cpu_adapters) >= self.config.num_cpu_loras:
            evicted, _ = self.cpu_adapters.popitem(last=False)
            logger.info("LoRA adapter %d evicted from host memory", evicted)
        self.cpu_adapters[lora_int_id] = adapter
        return adapter

    def load_adapter(self, lora_request: LoRARequest) -> LoadedAdapter:
        """Read a PEFT directory: this rank's shard of each A and B, checked against the
        layers (ValueError naming the tensor for an adapter of another base model)."""
        name = lora_request.lora_name
        config = read_adapter_config(lora_request, self.config.max_lora_rank)
        tensors = _read_tensors(adapter_weights_file(lora_request))
        pairs: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
        for tensor_name, tensor in tensors.items():
            module, part = lora_module(tensor_name, name)
            pairs.setdefault(module, {})[part] = (tensor_name, tensor)
        weights: dict[LoRALinearMethod, LayerWeights] = {}
        for module, parts in pairs.items():
            target = self.targets.get(module) or self.targets.get(f"model.{module}")
            if target is None:
                raise ValueError(
                    f"LoRA adapter {name!r}: module {module!r} is not in this model "
                    "(an adapter of another base model?)"
                )
            if len(parts) != 2:
                raise ValueError(f"LoRA adapter {name!r}: {module} lacks its lora_A or lora_B")
            (a_name, lora_a), (b_name, lora_b) = parts["lora_A"], parts["lora_B"]
            rank = lora_a.shape[0]
            if rank > self.config.max_lora_rank:
                raise ValueError(
                    f"LoRA adapter {name!r}: {a_name} has rank {rank}, greater than "
                    f"max_lora_rank {self.config.max_lora_rank}"
                )
            lora_a, lora_b = _shard(target, lora_a, lora_b, a_name, b_name, name, self.dtype)
            scale = _scale(config, module, rank)
            weights.setdefault(target.method, {})[target.shard_id] = (lora_a, lora_b, scale)
        return LoadedAdapter(lora_request, weights)


def _read_tensors(path: str) -> dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def _shard(
    target: LoRATarget,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    a_name: str,
    b_name: str,
    lora_name: str,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's A and B through the layer's own weight loader: a row-parallel layer splits
    A's input columns, a column-parallel one B's output rows (q/k/v heads, gate/up halves)."""
    layer = target.layer
    rank = lora_a.shape[0]
    if lora_a.dim() != 2 or lora_b.dim() != 2 or lora_b.shape[1] != rank:
        raise ValueError(
            f"LoRA adapter {lora_name!r}: {a_name} {tuple(lora_a.shape)} and {b_name} "
            f"{tuple(lora_b.shape)} are not a LoRA pair"
        )
    try:
        current = a_name
        if target.row_parallel:
            shard_a = torch.zeros(rank, layer.input_size_per_partition, dtype=dtype)
            layer.weight_loader(shard_a, lora_a.to(dtype))
            current = b_name
            check_shape(lora_b, (layer.output_size_per_partition, rank))
            return shard_a, lora_b.to(dtype)
        check_shape(lora_a, (rank, layer.input_size_per_partition))
        current = b_name
        rows = torch.zeros(layer.output_size_per_partition, rank, dtype=dtype)
        if target.shard_id is None:
            layer.weight_loader(rows, lora_b.to(dtype))
            return lora_a.to(dtype), rows
        layer.weight_loader(rows, lora_b.to(dtype), target.shard_id)
    except ValueError as exc:
        raise ValueError(
            f"LoRA adapter {lora_name!r} does not fit this model (another base model?): "
            f"{current}: {exc}"
        ) from exc
    part = next(p for p in target.method.slices if p.shard_id == target.shard_id)
    return lora_a.to(dtype), rows[part.offset : part.offset + part.size].clone()


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern: the value of the first key matching the module."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _scale(config: dict, module: str, rank: int) -> float:
    """alpha / r, or alpha / sqrt(r) under use_rslora (PEFT's)."""
    alpha = _pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", 8))
    if config.get("use_rslora"):
        return alpha / math.sqrt(rank)
    return alpha / rank
