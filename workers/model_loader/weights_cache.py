"""A cache of converted weights: a model's parameters saved once in ember's own layout and dtype
(fused projections, the dtype the engine runs in) as one safetensors file, and mapped back on
the next start with no conversion and no copy.

Used by the loader for GGUF files, whose dequantisation takes seconds at every start. The file
lives next to the converted config and tokenizer (`gguf_files`), one per dtype:

    ~/.cache/ember/gguf/<key of the .gguf path, size and mtime>/
        config.json                           (gguf_files.gguf_model_dir)
        tokenizer/tokenizer.json, ...         (gguf_files.gguf_tokenizer_dir)
        weights-v1-bfloat16.safetensors       (this module)

Loading maps the file privately (copy-on-write) and builds each parameter as a view into the
mapping, so the weights are read from the page cache as the first forward touches them and are
shared by every process that maps the same file.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import struct
import tempfile

import torch
from safetensors.torch import save_file
from torch import nn

logger = logging.getLogger(__name__)

_FORMAT_VERSION = "v1"  # bump when the layout of ember's parameters changes
_DTYPES = {
    "F32": torch.float32,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "U8": torch.uint8,
    "I8": torch.int8,
}
_ALIASES_KEY = "ember.aliases"  # state-dict names that share a tensor (tied embeddings)


def cached_weights_path(cache_dir: str, architecture: str, dtype: str) -> str:
    return os.path.join(cache_dir, f"weights-{_FORMAT_VERSION}-{architecture}-{dtype}.safetensors")


def save_tensors(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str]) -> None:
    """Write `tensors` to the safetensors file `path` atomically: a reader never sees half a
    file."""
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    handle, staging = tempfile.mkstemp(prefix=".staging-", suffix=".safetensors", dir=directory)
    os.close(handle)
    try:
        save_file(tensors, staging, metadata=metadata)
        os.replace(staging, path)
    except BaseException:
        os.unlink(staging)
        raise


def map_tensors(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors of the safetensors file `path` as views into a private (copy-on-write)
    mapping of it, and the file's metadata."""
    with open(path, "rb") as file:
        (header_len,) = struct.unpack("<Q", file.read(8))
        header = json.loads(file.read(header_len))
        mapped = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY)
    metadata = header.pop("__metadata__", {})
    data_start = 8 + header_len
    tensors = {}
    for name, info in header.items():
        dtype = _DTYPES.get(info["dtype"])
        if dtype is None:
            raise ValueError(f"{path}: tensor {name!r} has an unknown dtype {info['dtype']!r}")
        begin, end = info["data_offsets"]
        count = (end - begin) // torch.empty(0, dtype=dtype).element_size()
        if count == 0:
            tensors[name] = torch.empty(info["shape"], dtype=dtype)
            continue
        flat = torch.frombuffer(mapped, dtype=dtype, count=count, offset=data_start + begin)
        tensors[name] = flat.view(info["shape"])
    return tensors, metadata


def save_model_weights(model: nn.Module, path: str) -> None:
    """Write the model's state dict to `path`. Tensors shared under several names are written
    once."""
    tensors, aliases, seen = {}, {}, {}
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape))
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = tensor.detach().contiguous().cpu()
    save_tensors(tensors, path, {_ALIASES_KEY: json.dumps(aliases)})


def load_model_weights(model: nn.Module, path: str) -> bool:
    """Point the model's parameters at the tensors of `path`; False (and the model untouched)
    when the file does not match the model's state dict."""
    tensors, metadata = map_tensors(path)
    aliases = json.loads(metadata.get(_ALIASES_KEY, "{}"))
    expected = model.state_dict()
    if set(tensors) | set(aliases) != set(expected) or any(
        tensor.dtype != expected[name].dtype or tensor.shape != expected[name].shape
        for name, tensor in tensors.items()
    ):
        logger.warning("cached weights %s do not match the model; converting again", path)
        return False
    for name, target in aliases.items():
        tensors[name] = tensors[target]
    model.load_state_dict(tensors, strict=True, assign=True)
    return True
