"""Builds a model from a ModelConfig: finds the architecture, creates it in the right dtype and
device, and fills its weights from safetensors, `pytorch_model.bin`, a GGUF file, or random
values. Called by the model runner of each worker.

Memory: parameters are created uninitialised (`torch.empty`, no random init to overwrite) and
each checkpoint tensor is copied straight from the memory-mapped file into its parameter, so
loading peaks near the weights' size (tests/test_model_loading.py measures it).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time

import torch
from torch import nn

from ember.workers.config import ModelConfig
from ember.workers.distributed import SINGLE_RANK, ParallelContext
from ember.workers.hf_config import HFConfig, load_hf_config
from ember.workers.layers.context import ModelContext
from ember.workers.layers.packed_int4 import packed_cache_key
from ember.workers.layers.quantization import (
    get_quantization_config,
    process_weights_after_loading,
    skip_dense_layers,
)
from ember.workers.layers.quantization.gguf_packed import (
    attach_packed_tensors,
    packed_layers,
    packed_tensors,
    reset_packed_layers,
)
from ember.workers.model_loader.gguf_files import gguf_cache_dir
from ember.workers.model_loader.weight_utils import (
    checkpoint_names,
    initialize_dummy_weights,
    iterate_pytorch_bin,
    iterate_safetensors,
    pytorch_bin_files,
    safetensors_files,
)
from ember.workers.model_loader.weights_cache import (
    cached_weights_path,
    load_model_weights,
    map_tensors,
    save_model_weights,
    save_tensors,
)
from ember.workers.models.adapters import adapt_for_pooling
from ember.workers.models.registry import get_model_class
from ember.workers.weight_memory import weight_bytes

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def model_hf_config(model_config: ModelConfig) -> HFConfig:
    """The config the user's process read (sent in `model_config`), or, for a `ModelConfig`
    built by hand, the one in its directory."""
    if model_config.hf_config:
        return HFConfig(model_config.hf_config)
    return load_hf_config(model_config.model_dir, model_config.trust_remote_code)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


@contextlib.contextmanager
def _one_torch_thread():
    """Copies into parameters on one thread: they are bound by page faults and memory, and
    torch's OpenMP workers spin at barriers against GGUF's dequantising threads (2-core
    machine: 500 MB of safetensors 0.25 s instead of 0.6-0.9 s; the default GGUF 1.1-1.5 s
    instead of 3.0-3.6 s)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def get_model(
    model_config: ModelConfig, device: torch.device, parallel: ParallelContext = SINGLE_RANK
) -> nn.Module:
    """This rank's shard of the model of `model_config` on `device`, in eval mode, with its
    weights loaded and turned into their quantization method's format."""
    start = time.perf_counter()
    hf_config = model_hf_config(model_config)
    model_class = adapt_for_pooling(
        get_model_class(model_config.architecture), model_config.convert
    )
    dtype = DTYPES[model_config.dtype]
    quant_config = get_quantization_config(
        model_config.quantization, getattr(hf_config, "quantization_config", None)
    )
    ctx = ModelContext(parallel, quant_config)
    with _default_dtype(dtype), device:
        model = model_class(hf_config, max_position=model_config.max_model_len, ctx=ctx)
        skip_dense_layers(model, quant_config, getattr(model, "packed_modules_mapping", {}))
    model.eval()
    load_format = model_config.load_format
    with _one_torch_thread():
        if load_format == "dummy":
            initialize_dummy_weights(model, model_config.seed)
            process_weights_after_loading(model)
        elif model_config.gguf_file is not None:
            _load_gguf(model, model_config, hf_config, parallel)
        else:
            model.load_weights(iterate_checkpoint(model_config.model_dir, load_format))
            process_weights_after_loading(model)
    held = weight_bytes(model)
    model.loaded_weight_bytes = held  # read through `weight_memory.loaded_weight_bytes`
    logger.info(
        "loaded %s (%s, %s) in %.1f s: weights hold %.1f MiB (vocabulary tables %.1f MiB)",
        model_config.architecture,
        model_config.dtype,
        load_format,
        time.perf_counter() - start,
        held["total"] / 2**20,
        held["vocabulary"] / 2**20,
    )
    return model


def gguf_weights_cache_file(
    model_config: ModelConfig, packed: bool = False, parallel: ParallelContext = SINGLE_RANK
) -> str:
    """Where the converted weights of a GGUF model live (see `weights_cache`): one file per
    model class and dtype (and quantization) and per rank of a tensor-parallel size, next to
    the converted config and tokenizer; `packed=True`: the file of the packed 4-bit weights
    (quantization="gguf")."""
    model_kind = f"{model_config.architecture}-{model_config.convert}"
    if parallel.world_size > 1:
        model_kind += f"-tp{parallel.world_size}-rank{parallel.rank}"
        if parallel.enable_expert_parallel:  # whole experts, placed by the strategy
            model_kind += f"-ep-{parallel.expert_placement_strategy}"
    label = model_config.dtype
    if model_config.quantization is not None:
        label = f"{label}-{model_config.quantization}"
        label += f"-packed4-{packed_cache_key()}" if packed else ""
    return cached_weights_path(gguf_cache_dir(model_config.gguf_file), model_kind, label)


def _load_gguf(
    model: nn.Module, model_config: ModelConfig, hf_config: HFConfig, parallel: ParallelContext
) -> None:
    """Map the converted weights when an earlier start cached them; otherwise dequantise the
    file and cache the result for the next start (dequantising takes seconds, mapping none).

    quantization="gguf": the layers whose weights are 4- or 8-bit groups also get them packed
    (`packed_int4`), in a second cached file, and the dense linear weights are kept in bfloat16.
    """
    packed = bool(packed_layers(model))
    cache_file = gguf_weights_cache_file(model_config, parallel=parallel)
    # The packed file's name needs the tile kernel's library, which a fresh start is still
    # compiling (`build_in_background`): it is asked for once the dense file is there, or
    # once the weights are converted, not before the conversion starts.
    packed_file = functools.partial(
        gguf_weights_cache_file, model_config, packed=True, parallel=parallel
    )
    if os.path.exists(cache_file) and (not packed or os.path.exists(packed_file())):
        # The packed layers first: they say which dense weights the cache holds in bfloat16.
        packed_tensors_found = _map_or_none(packed_file()) if packed else None
        packed_fit = not packed or (
            packed_tensors_found is not None and attach_packed_tensors(model, packed_tensors_found)
        )
        if packed_fit and load_model_weights(model, cache_file):
            logger.info("mapped converted GGUF weights from %s", cache_file)
            return
        reset_packed_layers(model, DTYPES[model_config.dtype])
    from ember.workers.model_loader.gguf_loader import iterate_gguf  # imports gguf, numpy

    names = checkpoint_names(
        model, type(model).packed_modules_mapping, getattr(model, "name_mapping", ())
    )
    model.load_weights(iterate_gguf(model_config.gguf_file, hf_config, names))
    process_weights_after_loading(model)
    if packed:
        count = sum(getattr(m, "packed_weight", None) is not None for _, m in packed_layers(model))
        logger.info("packed %d layers of 4- and 8-bit groups", count)
    try:
        save_model_weights(model, cache_file)
        if packed:
            save_tensors(packed_tensors(model), packed_file(), {})
    except OSError as exc:  # a read-only or full cache directory costs only the next start
        logger.warning("could not cache the converted GGUF weights in %s: %s", cache_file, exc)
        return
    # The parameters become views of the saved file, as on the next start: the converted
    # copies in memory are freed, and the dense weights that packed layers never read stay
    # on disk.
    load_model_weights(model, cache_file)


def _map_or_none(path: str) -> dict[str, torch.Tensor] | None:
    """The tensors of a cached file, or None when it cannot be read (converted again)."""
    try:
        return map_tensors(path)[0]
    except (OSError, ValueError, KeyError) as exc:
        logger.warning("ignoring the unreadable cache file %s: %s", path, exc)
        return None


def iterate_checkpoint(model_dir: str, load_format: str = "auto"):
    """The tensors of a model directory: safetensors (preferred, as vLLM does), else
    `pytorch_model*.bin`."""
    files = safetensors_files(model_dir)
    if files:
        return iterate_safetensors(files)
    bin_files = pytorch_bin_files(model_dir) if load_format in ("auto", "pt") else []
    if bin_files:
        return iterate_pytorch_bin(bin_files)
    wanted = "*.safetensors" if load_format == "safetensors" else "*.safetensors or *.bin"
    raise FileNotFoundError(
        f"no {wanted} weights in {model_dir!r} (contents: {sorted(os.listdir(model_dir))})"
    )
