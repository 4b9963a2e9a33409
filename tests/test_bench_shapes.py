"""`tools/bench_throughput.py --model-shape`: the config.json it writes has the real models'
shapes (parameter counts from their model cards) and is one ember accepts with dummy weights."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from ember.enginecore.arg_utils import EngineArgs

TOOL = Path(__file__).resolve().parent.parent / "tools" / "bench_throughput.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_throughput", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _parameter_counts(directory: str) -> tuple[int, int]:
    """(all parameters, parameters outside the embedding and LM head), built on the meta device."""
    config = AutoConfig.from_pretrained(directory)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())  # a tied head counts once
    embedding = model.get_input_embeddings().weight.numel()
    if not config.tie_word_embeddings:
        embedding += model.get_output_embeddings().weight.numel()
    return total, total - embedding


def test_qwen3_shape_has_the_model_cards_parameter_counts(bench, tmp_path):
    directory = bench.write_shape_config("qwen3-0.6b", str(tmp_path))
    total, non_embedding = _parameter_counts(directory)
    assert round(total / 1e9, 1) == 0.6 and round(non_embedding / 1e9, 2) == 0.44
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForCausalLM"]
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"


def test_llama_3_1_8b_shape_has_the_model_cards_parameter_count(bench, tmp_path):
    directory = bench.write_shape_config("llama-3.1-8b", str(tmp_path))
    total, _ = _parameter_counts(directory)
    assert total == 8_030_261_248  # "8.03B"


@pytest.mark.parametrize("shape", ["qwen3-0.6b", "llama-3.1-8b"])
def test_ember_accepts_the_shape_with_dummy_weights(bench, tmp_path, shape):
    directory = bench.write_shape_config(shape, str(tmp_path))
    config = EngineArgs(
        model=directory, load_format="dummy", skip_tokenizer_init=True, device="cpu"
    ).create_engine_config()
    _, settings = bench.MODEL_SHAPES[shape]
    assert config.model.vocab_size == settings["vocab_size"]
    assert config.model.load_format == "dummy"
    assert config.model.architecture in ("Qwen3ForCausalLM", "LlamaForCausalLM")


def test_shape_workload_draws_prompts_below_the_special_tokens(bench):
    args = bench.parse_args(
        ["--model-shape", "llama-3.1-8b", "--device", "cuda", "--num-prompts", "64"]
    )
    work = bench.make_workload(args)
    ids = [token for prompt in work["prompts"] for token in prompt]
    assert len(work["prompts"]) == 64 and max(ids) < 128000 and min(ids) >= 100
    assert bench.check_available("llama.cpp", args) is not None  # no GGUF, no GPU path
