"""Loading: GGUF and safetensors checkpoints, dummy weights, and the errors a broken checkpoint
must give (naming the tensor or the architecture)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from ember.enginecore.arg_utils import EngineArgs
from ember.workers.model_loader.loader import get_model
from tests.helpers import write_random_llama

CPU = torch.device("cpu")


def _load(model_dir: str, **kwargs):
    config = EngineArgs(model=model_dir, dtype="float32", **kwargs).create_engine_config()
    return get_model(config.model, CPU)


def _rewrite_checkpoint(model_dir: str, change) -> None:
    path = f"{model_dir}/model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_missing_weight_is_named(tmp_path):
    model_dir = write_random_llama(tmp_path)
    _rewrite_checkpoint(model_dir, lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(ValueError, match=r"missing .*model\.layers\.1\.self_attn\.k_proj\.weight"):
        _load(model_dir)


def test_wrong_shape_is_named(tmp_path):
    model_dir = write_random_llama(tmp_path)

    def shrink(tensors):
        tensors["model.layers.0.mlp.down_proj.weight"] = torch.zeros(64, 100)

    _rewrite_checkpoint(model_dir, shrink)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.down_proj\.weight.*\(64, 100\)"):
        _load(model_dir)


def test_unexpected_tensor_is_named(tmp_path):
    model_dir = write_random_llama(tmp_path)
    _rewrite_checkpoint(model_dir, lambda t: t.update({"model.extra.weight": torch.zeros(2)}))
    with pytest.raises(ValueError, match=r"model\.extra\.weight"):
        _load(model_dir)


def test_unknown_architecture_lists_supported_ones(tmp_path):
    model_dir = write_random_llama(tmp_path)
    config_path = tmp_path / "config.json"
    config = json.loads(config_path.read_text())
    config["architectures"] = ["FancyNewForCausalLM"]
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"FancyNewForCausalLM.*supports: .*LlamaForCausalLM"):
        EngineArgs(model=model_dir).create_engine_config()


def test_dummy_weights_load_without_a_checkpoint(tmp_path):
    model_dir = write_random_llama(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    model = _load(model_dir, load_format="dummy")
    weight = model.model.layers[0].self_attn.qkv_proj.weight
    assert weight.abs().max() <= 1e-3 and weight.abs().sum() > 0


def test_gguf_q_and_k_rows_are_unpermuted_like_transformers(default_gguf, hf_smollm2):
    config = EngineArgs(model=default_gguf, dtype="float32").create_engine_config()
    assert config.model.architecture == "LlamaForCausalLM"
    model = get_model(config.model, CPU)
    layer = model.model.layers[3].self_attn
    reference = hf_smollm2.model.layers[3].self_attn
    q, k, v = layer.qkv_proj.weight.split([layer.q_size, layer.kv_size, layer.kv_size])
    torch.testing.assert_close(q, reference.q_proj.weight)
    torch.testing.assert_close(k, reference.k_proj.weight)
    torch.testing.assert_close(v, reference.v_proj.weight)
    torch.testing.assert_close(model.lm_head.weight, hf_smollm2.lm_head.weight)
