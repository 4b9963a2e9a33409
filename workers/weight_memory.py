"""The bytes a loaded model's weights hold in memory, in whatever form its layers keep them.

A quantized layer holds more than its parameters: packed tiles, offsets, act-order
permutations, a GPU repacking (`GroupQuantizedWeight`, `PackedGroupWeight`, ...), as plain
attributes and objects. `weight_bytes` walks every module's parameters, buffers and other
attributes (into objects, dataclasses, lists and dicts, a few levels down) and counts each
tensor storage once, so a tied LM head and its embedding count once and a view adds nothing.
The figure is what the weights keep resident after loading: the loader takes it before the KV
cache exists (attention layers hold their cache as an attribute later) and keeps it on the
model (`loaded_weight_bytes`); per-step temporaries (a prefill's dense copy of a packed weight)
are not weights.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

# modules whose weights are vocabulary tables: token embeddings and the LM head
_VOCABULARY_MODULES = ("VocabParallelEmbedding", "ParallelLMHead")
_MAX_DEPTH = 4  # attribute levels followed below a module (objects holding objects of tensors)


def weight_bytes(model: nn.Module) -> dict[str, int]:
    """{"vocabulary": bytes of the embedding and LM-head tables, "layers": every other
    weight, "total": their sum}; each storage counted once, in the first module that holds it
    (vocabulary tables first, so a table tied to the LM head is vocabulary)."""
    seen: set[tuple[str, int]] = set()
    counts = {"vocabulary": 0, "layers": 0}
    modules = sorted(model.modules(), key=lambda m: type(m).__name__ not in _VOCABULARY_MODULES)
    for module in modules:
        kind = "vocabulary" if type(module).__name__ in _VOCABULARY_MODULES else "layers"
        for tensor in _module_tensors(module):
            storage = tensor.untyped_storage()
            key = (str(tensor.device), storage.data_ptr())
            if key in seen or storage.nbytes() == 0:
                continue
            seen.add(key)
            counts[kind] += storage.nbytes()
    return {**counts, "total": counts["vocabulary"] + counts["layers"]}


def _module_tensors(module: nn.Module):
    """The tensors `module` itself holds (not its submodules'): parameters, buffers, and any
    reachable through its other attributes."""
    yield from (p for p in module._parameters.values() if p is not None)
    yield from (b for b in module._buffers.values() if b is not None)
    for name, value in vars(module).items():
        if name.startswith("_") or isinstance(value, nn.Module):
            continue
        yield from _tensors_in(value, _MAX_DEPTH, set())


def _tensors_in(value, depth: int, visited: set[int]):
    if isinstance(value, torch.Tensor):
        yield value
        return
    if depth == 0 or isinstance(value, (str, bytes, int, float, bool, nn.Module, type)):
        return
    if id(value) in visited:
        return
    visited.add(id(value))
    if isinstance(value, dict):
        children = list(value.values())
    elif isinstance(value, (list, tuple, set, frozenset)):
        children = list(value)
    elif dataclasses.is_dataclass(value):
        children = [getattr(value, field.name) for field in dataclasses.fields(value)]
    elif hasattr(value, "__dict__"):
        children = list(vars(value).values())
    else:
        slots = getattr(type(value), "__slots__", ())
        slots = (slots,) if isinstance(slots, str) else slots
        children = [getattr(value, slot, None) for slot in slots]
    for child in children:
        yield from _tensors_in(child, depth - 1, visited)


def loaded_weight_bytes(model: nn.Module) -> dict[str, int]:
    """`weight_bytes` as the loader took it, before the KV cache (for `LLM.apply_model`)."""
    return dict(model.loaded_weight_bytes)
