"""GGUF files: a cached Hugging Face directory (config and tokenizer converted once) and the
dequantised tensors under their Hugging Face names.

llama.cpp's converter permutes the rows of Llama's q/k projections for its rotary layout; the
permutation is undone here, as Hugging Face's GGUF loader does.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator

import gguf
import numpy as np
import torch
from transformers import AutoConfig, PretrainedConfig

logger = logging.getLogger(__name__)


def ember_cache_dir() -> str:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "ember")


def _file_key(path: str) -> str:
    stat = os.stat(path)
    key = f"{os.path.realpath(path)}:{stat.st_size}:{stat.st_mtime_ns}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def gguf_model_dir(gguf_path: str) -> str:
    """A directory holding config.json and tokenizer files converted from `gguf_path`.

    Converting the tokenizer from GGUF takes seconds, so the result is cached under
    ~/.cache/ember/gguf/<key of path, size and mtime>/ and reused on the next start.
    """
    target = os.path.join(ember_cache_dir(), "gguf", _file_key(gguf_path))
    if os.path.exists(os.path.join(target, "config.json")):
        return target
    from transformers import AutoTokenizer

    from ember.workers.models.registry import resolve_architecture

    directory, filename = os.path.split(os.path.abspath(gguf_path))
    logger.info("converting config and tokenizer of %s (cached for the next start)", gguf_path)
    config = AutoConfig.from_pretrained(directory, gguf_file=filename)
    config.architectures = [resolve_architecture(config)]
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=filename)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".staging-", dir=os.path.dirname(target))
    try:
        config.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.rename(staging, target)
    except OSError:
        # Another process finished the same conversion first; its copy is as good as ours.
        shutil.rmtree(staging, ignore_errors=True)
        if not os.path.exists(os.path.join(target, "config.json")):
            raise
    return target


def _reverse_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's rotary row permutation of a q or k projection [num_heads * D, H]."""
    head_dim_half = weight.shape[0] // num_heads // 2
    w = weight.reshape(num_heads, head_dim_half, 2, *weight.shape[1:])
    return w.swapaxes(2, 1).reshape(weight.shape)


def iterate_gguf(
    gguf_path: str, config: PretrainedConfig, hf_names: set[str]
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (Hugging Face name, float32 tensor) for each tensor of the file.

    `hf_names` are the checkpoint names the model expects; gguf's own name map turns each into
    its GGUF name, and the file is read through the inverse of that map.
    """
    reader = gguf.GGUFReader(gguf_path)
    arch_name = reader.fields["general.architecture"].contents()
    arch = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == arch_name)
    name_map = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    to_hf: dict[str, str] = {}
    for hf_name in hf_names:
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is not None:
            to_hf[gguf_name] = hf_name
    num_heads = config.num_attention_heads
    num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
    for tensor in reader.tensors:
        hf_name = to_hf.get(tensor.name)
        if hf_name is None:
            raise ValueError(f"GGUF tensor {tensor.name!r} has no counterpart in the model")
        data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        data = data.reshape([int(d) for d in reversed(tensor.shape)])
        if arch_name == "llama" and hf_name.endswith("q_proj.weight"):
            data = _reverse_permute(data, num_heads)
        elif arch_name == "llama" and hf_name.endswith("k_proj.weight"):
            data = _reverse_permute(data, num_kv_heads)
        data = np.ascontiguousarray(data, dtype=np.float32)
        if not data.flags.writeable:  # unquantised tensors are read-only views of the file
            data = data.copy()
        yield hf_name, torch.from_numpy(data)
