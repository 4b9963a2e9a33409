"""GGUF files' tensors, dequantised, under their Hugging Face names (the converted config and
tokenizer, and the cache directory, are `gguf_files`'s).

Works for the architectures both the `gguf` package (tensor names) and transformers (config
and tokenizer) map: Llama/Mistral/Mixtral (arch "llama"), Qwen2, Qwen2-MoE, Qwen3, Qwen3-MoE,
Phi-3, GPT-2, Gemma 2, Gemma 3. llama.cpp's converter permutes the rows of Llama's q/k
projections for its rotary layout; the permutation is undone here, as Hugging Face's GGUF
loader does, and so are its other changes (see `iterate_gguf`).
"""

from __future__ import annotations

import itertools
import logging
import math
import mmap
import os
import re
import struct
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import gguf
import numpy as np
import torch

from ember.workers.hf_config import HFConfig

logger = logging.getLogger(__name__)


def _reverse_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's rotary row permutation of a q or k projection [num_heads * D, H]."""
    head_dim_half = weight.shape[0] // num_heads // 2
    w = weight.reshape(num_heads, head_dim_half, 2, *weight.shape[1:])
    return w.swapaxes(2, 1).reshape(weight.shape)


_EXPERT_INDEX = re.compile(r"\.experts\.(\d+)\.")
# llama.cpp's converter transposes GPT-2's Conv1D weights to [out, in]; Hugging Face's are
# [in, out] (its GGUF loader transposes them back, and so does this one).
_GPT2_TRANSPOSED = ("attn_qkv.weight", "attn_output.weight", "ffn_up.weight", "ffn_down.weight")


def _gguf_to_hf_names(
    name_map, hf_names: set[str]
) -> tuple[dict[str, str], dict[str, dict[int, str]]]:
    """GGUF name -> Hugging Face name, and for merged expert tensors (`ffn_gate_exps`, one
    [E, ...] tensor for all experts) GGUF name -> {expert id: Hugging Face name}."""
    to_hf: dict[str, str] = {}
    experts: dict[str, dict[int, str]] = {}
    for hf_name in hf_names:
        match = _EXPERT_INDEX.search(hf_name)
        lookup = _EXPERT_INDEX.sub(".experts.", hf_name) if match else hf_name
        gguf_name = name_map.get_name(lookup, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            continue
        if match:
            experts.setdefault(gguf_name, {})[int(match.group(1))] = hf_name
        else:
            to_hf[gguf_name] = hf_name
    return to_hf, experts


def iterate_gguf(
    gguf_path: str, config: HFConfig, hf_names: set[str]
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (Hugging Face name, float32 tensor) for each tensor of the file, in Hugging Face's
    layout: what llama.cpp's converter changed is changed back, as Hugging Face's GGUF loader
    does (Llama q/k rows unpermuted, Gemma norms stored +1, GPT-2 Conv1D transposed, merged
    expert tensors split per expert).

    `hf_names` are the checkpoint names the model expects; gguf's own name map turns each into
    its GGUF name, and the file is read through the inverse of that map. Tensors are
    dequantised a few ahead on a small thread pool (numpy releases the GIL), in file order.
    """
    metadata, tensors, mapped = read_gguf_index(gguf_path)
    arch_name = metadata["general.architecture"]
    arch = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == arch_name)
    name_map = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    to_hf, experts = _gguf_to_hf_names(name_map, hf_names)
    to_hf.setdefault("output.weight", "lm_head.weight")  # a tied model may still ship it
    for tensor in tensors:
        if tensor.name not in experts and tensor.name not in to_hf:
            raise ValueError(f"GGUF tensor {tensor.name!r} has no counterpart in the model")
    num_heads = config.num_attention_heads
    num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads

    def load(tensor: GGUFTensor) -> list[tuple[str, torch.Tensor]]:
        data = tensor.dequantize(mapped)
        name = tensor.name
        if arch_name == "llama" and name.endswith("attn_q.weight"):
            data = _reverse_permute(data, num_heads)
        elif arch_name == "llama" and name.endswith("attn_k.weight"):
            data = _reverse_permute(data, num_kv_heads)
        elif arch_name in ("gemma2", "gemma3") and name.endswith("norm.weight"):
            data = data - 1
        elif arch_name == "gpt2" and name.endswith(_GPT2_TRANSPOSED):
            data = data.T
        elif name.endswith("ffn_gate_inp_shexp.weight") and data.ndim == 1:
            data = data[None, :]  # Qwen2-MoE's shared_expert_gate [1, H]
        if name in experts:
            return [(hf, _to_tensor(data[i])) for i, hf in sorted(experts[name].items())]
        return [(to_hf[name], _to_tensor(data))]

    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        pending: deque[Future] = deque()
        remaining = iter(tensors)
        for tensor in itertools.islice(remaining, _DEQUANTIZE_AHEAD):
            pending.append(pool.submit(load, tensor))
        while pending:
            loaded = pending.popleft().result()
            following = next(remaining, None)
            if following is not None:
                pending.append(pool.submit(load, following))
            yield from loaded


def _to_tensor(data: np.ndarray) -> torch.Tensor:
    data = np.ascontiguousarray(data, dtype=np.float32)
    if not data.flags.writeable:  # unquantised tensors are read-only views of the file
        data = data.copy()
    return torch.from_numpy(data)


# ---- reading the file --------------------------------------------------------------------
# gguf's GGUFReader builds a numpy view for every part of every metadata field; for a
# tokenizer's 49k-token vocabulary that takes seconds. Loading weights needs only the tensor
# index and two metadata values, so the header is walked here with struct, skipping arrays.

_DEQUANTIZE_AHEAD = 4
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?"}
_SCALARS |= {10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True, slots=True)
class GGUFTensor:
    name: str
    ggml_type: gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # numpy order (GGUF's dims reversed)
    offset: int  # of its data in the file
    num_bytes: int

    def dequantize(self, mapped: mmap.mmap) -> np.ndarray:
        """The tensor as a float32 array of `shape`, from the file's mapping."""
        raw = np.frombuffer(mapped, dtype=np.uint8, count=self.num_bytes, offset=self.offset)
        byte_shape = gguf.quants.quant_shape_to_byte_shape(self.shape, self.ggml_type)
        data = gguf.quants.dequantize(raw.reshape(byte_shape), self.ggml_type)
        return data.reshape(self.shape)


def read_gguf_index(path: str) -> tuple[dict, list[GGUFTensor], mmap.mmap]:
    """(scalar and string metadata, tensors in file order, a read-only mapping of the file)."""
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    magic, version = struct.unpack_from("<II", mapped, 0)
    if magic != gguf.GGUF_MAGIC or version & 0xFFFF == 0:
        raise ValueError(f"{path} is not a little-endian GGUF file")
    tensor_count, kv_count = struct.unpack_from("<QQ", mapped, 8)
    offset = 24

    def read_string(at: int) -> tuple[str, int]:
        (length,) = struct.unpack_from("<Q", mapped, at)
        return mapped[at + 8 : at + 8 + length].decode("utf-8", "replace"), at + 8 + length

    def skip_value(value_type: int, at: int) -> int:
        if value_type in _SCALARS:
            return at + struct.calcsize(_SCALARS[value_type])
        if value_type == _STRING:
            return at + 8 + struct.unpack_from("<Q", mapped, at)[0]
        element_type, count = struct.unpack_from("<IQ", mapped, at)
        at += 12
        if element_type in _SCALARS:
            return at + count * struct.calcsize(_SCALARS[element_type])
        for _ in range(count):
            at = skip_value(element_type, at)
        return at

    metadata: dict = {}
    for _ in range(kv_count):
        key, offset = read_string(offset)
        (value_type,) = struct.unpack_from("<I", mapped, offset)
        offset += 4
        if value_type in _SCALARS:
            metadata[key] = struct.unpack_from(_SCALARS[value_type], mapped, offset)[0]
        elif value_type == _STRING:
            metadata[key] = read_string(offset)[0]
        offset = skip_value(value_type, offset)
    infos = []
    for _ in range(tensor_count):
        name, offset = read_string(offset)
        (num_dims,) = struct.unpack_from("<I", mapped, offset)
        dims = struct.unpack_from(f"<{num_dims}Q", mapped, offset + 4)
        ggml_type, data_offset = struct.unpack_from("<IQ", mapped, offset + 4 + 8 * num_dims)
        offset += 4 + 8 * num_dims + 12
        infos.append((name, dims, gguf.GGMLQuantizationType(ggml_type), data_offset))
    alignment = metadata.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT)
    data_start = -(-offset // alignment) * alignment
    tensors = []
    for name, dims, ggml_type, data_offset in infos:
        block_size, type_size = gguf.GGML_QUANT_SIZES[ggml_type]
        num_bytes = math.prod(dims) * type_size // block_size
        shape = tuple(int(d) for d in reversed(dims))
        tensors.append(GGUFTensor(name, ggml_type, shape, data_start + data_offset, num_bytes))
    return metadata, tensors, mapped
