"""Builds a model from a ModelConfig: finds the architecture, creates it in the right dtype and
device, and fills its weights from safetensors, a GGUF file, or random values."""

from __future__ import annotations

import contextlib
import logging
import os
import time

import torch
from torch import nn
from transformers import AutoConfig, PretrainedConfig

from ember.workers.config import ModelConfig
from ember.workers.model_loader.gguf_loader import iterate_gguf
from ember.workers.model_loader.weight_utils import (
    checkpoint_names,
    initialize_dummy_weights,
    iterate_safetensors,
    safetensors_files,
)
from ember.workers.models.registry import get_model_class

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_hf_config(model_config: ModelConfig) -> PretrainedConfig:
    return AutoConfig.from_pretrained(
        model_config.model_dir, trust_remote_code=model_config.trust_remote_code
    )


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def get_model(model_config: ModelConfig, device: torch.device) -> nn.Module:
    """The model of `model_config` on `device`, in eval mode, with its weights loaded."""
    start = time.perf_counter()
    hf_config = load_hf_config(model_config)
    model_class = get_model_class(model_config.architecture)
    dtype = DTYPES[model_config.dtype]
    with _default_dtype(dtype), device:
        model = model_class(hf_config, max_position=model_config.max_model_len)
    model.eval()
    load_format = model_config.load_format
    if load_format == "dummy":
        initialize_dummy_weights(model, model_config.seed)
    elif model_config.gguf_file is not None:
        names = checkpoint_names(model, model_class.packed_modules_mapping)
        model.load_weights(iterate_gguf(model_config.gguf_file, hf_config, names))
    else:
        files = safetensors_files(model_config.model_dir)
        if not files:
            raise FileNotFoundError(
                f"no *.safetensors weights in {model_config.model_dir!r} "
                f"(contents: {sorted(os.listdir(model_config.model_dir))})"
            )
        model.load_weights(iterate_safetensors(files))
    logger.info(
        "loaded %s (%s, %s) in %.1f s",
        model_config.architecture,
        model_config.dtype,
        load_format,
        time.perf_counter() - start,
    )
    return model
