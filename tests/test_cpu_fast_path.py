"""The CPU fast path: converted GGUF weights cached and mapped back, and an engine-core process
that never loads torch."""

from __future__ import annotations

import os

import torch

from ember import LLM, SamplingParams
from ember.workers.model_loader import loader, weights_cache
from tests.helpers import default_model_config


def test_cached_gguf_weights_equal_the_dequantised_ones(default_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    config = default_model_config(default_gguf, "float32")
    cache_file = loader.gguf_weights_cache_file(config)
    assert cache_file.startswith(str(tmp_path))
    assert not os.path.exists(cache_file)
    converted = loader.get_model(config, torch.device("cpu"))  # dequantises, writes the cache
    assert os.path.exists(cache_file)
    mapped = loader.get_model(config, torch.device("cpu"))  # maps the cache
    converted_state, mapped_state = converted.state_dict(), mapped.state_dict()
    assert converted_state.keys() == mapped_state.keys()
    for name, tensor in converted_state.items():
        assert torch.equal(tensor, mapped_state[name]), name
    # Tied embeddings stay one tensor, and no parameter owns a private copy of the file.
    assert mapped.lm_head.weight.data_ptr() == mapped.model.embed_tokens.weight.data_ptr()


def test_a_stale_cache_is_converted_again(default_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    config = default_model_config(default_gguf, "float32")
    cache_file = loader.gguf_weights_cache_file(config)
    os.makedirs(os.path.dirname(cache_file), exist_ok=True)
    tiny = torch.nn.Linear(2, 2)
    weights_cache.save_model_weights(tiny, cache_file)  # the wrong model's weights
    model = loader.get_model(config, torch.device("cpu"))
    assert model.lm_head.weight.shape == (49152, 576)
    reloaded = loader.get_model(config, torch.device("cpu"))
    assert torch.equal(model.model.norm.weight, reloaded.model.norm.weight)


def test_engine_core_process_does_not_load_torch(default_gguf):
    with LLM(default_gguf, dtype="float32") as llm:
        llm.generate("Hi", SamplingParams(max_tokens=2), use_tqdm=False)
        with open(f"/proc/{llm.engine.process.pid}/maps") as maps:
            assert "libtorch" not in maps.read()
