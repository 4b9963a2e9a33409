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


# ---- weight formats, dtype, max_model_len, remote code, peak memory ------------------------


def _prompts():
    from tests.helpers import random_prompts

    return random_prompts(3, 512, [9, 30, 4], seed=5)


def _hf_logprobs(model_dir: str):
    from transformers import AutoModelForCausalLM

    from tests.helpers import hf_prompt_logprobs

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return hf_prompt_logprobs(model, _prompts())


def _to_pytorch_bin(model_dir) -> None:
    """Replace model.safetensors by pytorch_model.bin holding the same tensors."""
    torch.save(load_file(model_dir / "model.safetensors"), model_dir / "pytorch_model.bin")
    (model_dir / "model.safetensors").unlink()


def test_pytorch_model_bin_loads_like_safetensors(tmp_path):
    from tests.helpers import assert_logprobs_close, ember_prompt_logprobs, write_random_model

    model_dir = write_random_model(tmp_path, "Qwen2ForCausalLM")
    reference = _hf_logprobs(model_dir)
    _to_pytorch_bin(tmp_path)
    assert_logprobs_close(ember_prompt_logprobs(model_dir, _prompts()), reference)


def test_pytorch_model_bin_is_read_with_weights_only(tmp_path):
    import pickle

    model_dir = write_random_llama(tmp_path)
    tensors = load_file(f"{model_dir}/model.safetensors")
    tensors["model.norm.weight"] = _NotATensor()  # unpickling it would run arbitrary code
    torch.save(tensors, f"{model_dir}/pytorch_model.bin")
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        _load(model_dir)


class _NotATensor:
    pass


def test_safetensors_are_preferred_over_pytorch_bin(tmp_path):
    model_dir = write_random_llama(tmp_path)
    with open(f"{model_dir}/pytorch_model.bin", "wb") as f:
        f.write(b"not a checkpoint")
    _load(model_dir)  # never opens the .bin


def test_no_weights_names_the_directory(tmp_path):
    model_dir = write_random_llama(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors or \*\.bin weights"):
        _load(model_dir)


@pytest.mark.parametrize(
    "dtype,expected",
    [
        ("auto", "float32"),  # decision: float32 on CPU for now
        ("float32", "float32"),
        ("float", "float32"),
        ("bfloat16", "bfloat16"),
        (torch.bfloat16, "bfloat16"),
        ("half", "float16"),
        ("float16", "float16"),
    ],
)
def test_dtype_rules_on_cpu(tiny_llama_dir, dtype, expected):
    config = EngineArgs(model=tiny_llama_dir, dtype=dtype, device="cpu").create_engine_config()
    assert config.model.dtype == expected


def test_unknown_dtype_lists_allowed_ones(tiny_llama_dir):
    with pytest.raises(ValueError, match=r"dtype must be 'auto' or one of .*'bfloat16'"):
        EngineArgs(model=tiny_llama_dir, dtype="float8").create_engine_config()


def test_float16_refused_on_cpu_when_torch_cannot_compute_it(tiny_llama_dir, monkeypatch):
    from ember.enginecore import arg_utils

    monkeypatch.setattr(arg_utils, "_cpu_computes", lambda dtype: False)
    with pytest.raises(ValueError, match=r"cannot compute in float16 on CPU.*'bfloat16'"):
        EngineArgs(model=tiny_llama_dir, dtype="float16", device="cpu").create_engine_config()


def test_float16_refused_for_gemma2(tmp_path):
    from transformers import Gemma2Config

    Gemma2Config(vocab_size=64, hidden_size=16, num_hidden_layers=1, head_dim=8).save_pretrained(
        tmp_path
    )
    with pytest.raises(ValueError, match=r"gemma2 overflows in float16"):
        EngineArgs(model=str(tmp_path), dtype="float16").create_engine_config()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_is_as_close_to_float32_as_hf_in_that_dtype(tmp_path, dtype):
    from transformers import AutoModelForCausalLM

    from tests.helpers import ember_prompt_logprobs, hf_prompt_logprobs, write_random_model

    model_dir = write_random_model(tmp_path, "Qwen2ForCausalLM")
    reference = _hf_logprobs(model_dir)
    hf_half = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    mine = ember_prompt_logprobs(model_dir, _prompts(), dtype=dtype)
    theirs = hf_prompt_logprobs(hf_half, _prompts())
    mine_error = max((a - b).abs().max().item() for a, b in zip(mine, reference))
    hf_error = max((a - b).abs().max().item() for a, b in zip(theirs, reference))
    assert mine_error <= max(2 * hf_error, 0.05)


def _config_dir(tmp_path, config) -> str:
    config.save_pretrained(tmp_path)
    return str(tmp_path)


@pytest.mark.parametrize(
    "rope_scaling,default,limit",
    [
        (None, 128, 128),
        ({"rope_type": "linear", "factor": 4.0}, 512, 512),
        ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}, 256, 256),
        ({"rope_type": "dynamic", "factor": 2.0}, 128, 256),
        (
            {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
            128,
            128,
        ),
    ],
    ids=["none", "linear", "yarn", "dynamic", "llama3"],
)
def test_max_model_len_derived_from_config_with_rope_scaling(
    tmp_path, rope_scaling, default, limit
):
    from transformers import LlamaConfig

    model_dir = _config_dir(
        tmp_path,
        LlamaConfig(
            vocab_size=64,
            hidden_size=16,
            num_attention_heads=2,
            max_position_embeddings=128,
            rope_scaling=rope_scaling,
        ),
    )
    assert EngineArgs(model=model_dir).create_engine_config().model.max_model_len == default
    assert EngineArgs(model=model_dir, max_model_len=limit).create_engine_config()
    with pytest.raises(ValueError, match=rf"max_model_len={limit + 1} .* maximum of {limit}"):
        EngineArgs(model=model_dir, max_model_len=limit + 1).create_engine_config()


def test_max_model_len_from_gpt2_n_positions(tmp_path):
    from transformers import GPT2Config

    model_dir = _config_dir(tmp_path, GPT2Config(vocab_size=64, n_embd=16, n_positions=300))
    assert EngineArgs(model=model_dir).create_engine_config().model.max_model_len == 300


def test_config_needing_remote_code_is_refused_without_trust_remote_code(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "model_type": "fancy_custom",
                "architectures": ["FancyForCausalLM"],
                "auto_map": {"AutoConfig": "configuration_fancy.FancyConfig"},
            }
        )
    )
    (tmp_path / "configuration_fancy.py").write_text(
        "from transformers import PretrainedConfig\n\n\n"
        "class FancyConfig(PretrainedConfig):\n    model_type = 'fancy_custom'\n"
    )
    with pytest.raises(ValueError, match=r"needs code from its repository.*trust_remote_code=True"):
        EngineArgs(model=str(tmp_path)).create_engine_config()


# VmHWM, the peak resident set of this process image (ru_maxrss would carry over the forking
# pytest process's peak across exec).
_PEAK_MEMORY_SCRIPT = """
import json, re, sys
import psutil, torch
from ember.enginecore.arg_utils import EngineArgs
from ember.workers.model_loader.loader import get_model

def peak_rss():
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\\s+(\\d+) kB", f.read()).group(1)) * 1024

config = EngineArgs(model=sys.argv[1], dtype="float32").create_engine_config()
before = max(psutil.Process().memory_info().rss, peak_rss())
model = get_model(config.model, torch.device("cpu"))
peak = peak_rss()
weights = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps({"before": before, "peak": peak, "weights": weights}))
"""


@pytest.mark.slow
def test_loading_peak_memory_is_below_one_and_a_half_times_the_weights(tmp_path):
    """A ~200 MB checkpoint: parameters are not initialised before loading, and the mapped file
    is not held beside them (safe_open would keep all its pages resident: ~2x)."""
    import subprocess
    import sys

    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=8192,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=3,
        num_attention_heads=16,
        num_key_value_heads=4,
        tie_word_embeddings=False,
    )
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(tmp_path)
    with torch.device("meta"):
        from transformers import LlamaForCausalLM

        shapes = {name: p.shape for name, p in LlamaForCausalLM(config).state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    tensors = {
        name: torch.randn(shape, generator=generator) * 0.02 for name, shape in shapes.items()
    }
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    del tensors
    result = subprocess.run(
        [sys.executable, "-c", _PEAK_MEMORY_SCRIPT, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    assert measured["weights"] > 190e6
    growth = measured["peak"] - measured["before"]
    assert growth < 1.5 * measured["weights"], measured


_GPT2_CONV1D = ("attn_qkv.weight", "attn_output.weight", "ffn_up.weight", "ffn_down.weight")


def _write_gguf_like_llama_cpp(path: str, arch_name: str, model_dir: str, config) -> None:
    """Write a safetensors checkpoint as llama.cpp's converter lays it out (F32): GGUF names,
    Llama q/k rows permuted, Gemma norms + 1, GPT-2 Conv1D weights transposed to [out, in] and
    an `output.weight` copy of the tied embedding, each MoE projection merged over experts."""
    import re

    import gguf
    import numpy as np

    arch = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == arch_name)
    name_map = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    num_heads = config.num_attention_heads
    num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads

    def permute(weights, heads):
        half = weights.shape[0] // heads // 2
        return weights.reshape(heads, 2, half, -1).swapaxes(1, 2).reshape(weights.shape)

    writer = gguf.GGUFWriter(path, arch_name)
    merged: dict[str, dict[int, np.ndarray]] = {}
    for hf_name, tensor in load_file(f"{model_dir}/model.safetensors").items():
        data = tensor.float().numpy()
        expert = re.search(r"\.experts\.(\d+)\.", hf_name)
        lookup = re.sub(r"\.experts\.\d+\.", ".experts.", hf_name)
        name = name_map.get_name(lookup, try_suffixes=(".weight", ".bias"))
        if arch_name == "llama" and name.endswith("attn_q.weight"):
            data = permute(data, num_heads)
        elif arch_name == "llama" and name.endswith("attn_k.weight"):
            data = permute(data, num_kv_heads)
        elif arch_name == "gemma2" and name.endswith("norm.weight"):
            data = data + 1
        elif arch_name == "gpt2" and name.endswith(_GPT2_CONV1D):
            data = data.T
        elif name.endswith("ffn_gate_inp_shexp.weight"):
            data = data[0]
        if expert:
            merged.setdefault(name, {})[int(expert.group(1))] = data
            continue
        writer.add_tensor(name, np.ascontiguousarray(data))
        if arch_name == "gpt2" and name == "token_embd.weight":
            writer.add_tensor("output.weight", np.ascontiguousarray(data))
    for name, experts in merged.items():
        writer.add_tensor(name, np.stack([experts[i] for i in sorted(experts)]))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize(
    "architecture,arch_name,overrides",
    [
        ("LlamaForCausalLM", "llama", {}),
        ("MixtralForCausalLM", "llama", {}),
        ("Qwen2ForCausalLM", "qwen2", {}),
        ("Qwen2MoeForCausalLM", "qwen2moe", {"mlp_only_layers": []}),  # llama.cpp: no dense
        ("Phi3ForCausalLM", "phi3", {}),
        ("Gemma2ForCausalLM", "gemma2", {}),
        ("GPT2LMHeadModel", "gpt2", {}),
    ],
    ids=lambda value: value if isinstance(value, str) else "",
)
def test_gguf_tensors_of_each_architecture_load_like_hf(
    tmp_path, architecture, arch_name, overrides
):
    import dataclasses

    from transformers import AutoConfig

    from tests.helpers import assert_logprobs_close, forward_prompts, write_random_model

    model_dir = write_random_model(tmp_path / "hf", architecture, **overrides)
    gguf_path = str(tmp_path / "model.gguf")
    _write_gguf_like_llama_cpp(
        gguf_path, arch_name, model_dir, AutoConfig.from_pretrained(model_dir)
    )
    config = EngineArgs(model=model_dir, dtype="float32").create_engine_config()
    model = get_model(dataclasses.replace(config.model, gguf_file=gguf_path), CPU)
    ember = [logits.log_softmax(-1) for logits in forward_prompts(model, _prompts())]
    assert_logprobs_close(ember, _hf_logprobs(model_dir))
