"""`workers/weight_memory.weight_bytes`: the bytes a loaded model's weights hold, in whatever
form the layers keep them (parameters, packed tiles behind plain attributes), each storage
once. The expectation is arithmetic on the shapes, not the walker's own traversal."""

from __future__ import annotations

import torch

from ember.enginecore.arg_utils import EngineArgs
from ember.workers.model_loader import loader
from ember.workers.weight_memory import weight_bytes
from tests.helpers import write_random_llama
from tests.quantized_checkpoints import write_gptq_checkpoint

SHAPE = {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4}
HIDDEN, INTERMEDIATE, VOCAB, LAYERS = 256, 512, 512, 2
KV_WIDTH = 2 * 64  # 2 KV heads of 64
LINEAR_PARAMS = LAYERS * (
    HIDDEN * (HIDDEN + 2 * KV_WIDTH)  # q | k | v
    + HIDDEN * HIDDEN  # o
    + 3 * HIDDEN * INTERMEDIATE  # gate | up, down
)
NORM_PARAMS = (2 * LAYERS + 1) * HIDDEN


def load(model_dir: str, dtype: str = "float32"):
    config = EngineArgs(model=model_dir, device="cpu", dtype=dtype).create_engine_config()
    return loader.get_model(config.model, torch.device("cpu"))


def test_dense_model_counts_its_parameters_and_the_tables_apart(tmp_path):
    model = load(write_random_llama(tmp_path / "dense", **SHAPE))
    held = weight_bytes(model)
    assert held["vocabulary"] == 2 * VOCAB * HIDDEN * 4  # embedding and untied LM head, float32
    buffers = sum(b.untyped_storage().nbytes() for b in model.buffers())  # rotary tables
    assert held["layers"] == (LINEAR_PARAMS + NORM_PARAMS) * 4 + buffers
    assert held["total"] == held["vocabulary"] + held["layers"]


def test_tied_tables_count_once(tmp_path):
    model = load(write_random_llama(tmp_path / "tied", tie_word_embeddings=True, **SHAPE))
    assert weight_bytes(model)["vocabulary"] == VOCAB * HIDDEN * 4


def test_packed_4bit_layers_count_their_tiles(tmp_path):
    """A 4-bit GPTQ checkpoint on CPU lives in tiles (4-bit codes, a float16 scale and offset
    per 32 inputs: 0.625 bytes a weight) behind plain attributes, not parameters: a walk of
    the parameters alone would find almost nothing."""
    dense = write_random_llama(tmp_path / "dense", **SHAPE)
    model = load(write_gptq_checkpoint(dense, str(tmp_path / "gptq"), bits=4, group_size=128))
    held = weight_bytes(model)
    parameters = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = sum(b.untyped_storage().nbytes() for b in model.buffers())
    expected_layers = LINEAR_PARAMS * 0.625 + NORM_PARAMS * 4 + buffers
    assert abs(held["layers"] - expected_layers) <= 0.02 * expected_layers, (held, expected_layers)
    assert held["total"] > parameters + LINEAR_PARAMS * 0.5


def test_engine_reports_the_weights_without_its_kv_cache(tmp_path):
    """Through `LLM.apply_model`, the figure the loader took before the KV cache existed: the
    same bytes as a fresh load, whatever the cache the attention layers hold since."""
    from ember import LLM
    from ember.workers.weight_memory import loaded_weight_bytes

    model_dir = write_random_llama(tmp_path / "dense", **SHAPE)
    expected = weight_bytes(load(model_dir))
    with LLM(model_dir, dtype="float32", skip_tokenizer_init=True) as llm:
        (held,) = llm.apply_model(loaded_weight_bytes)
        (named,) = llm.collective_rpc("loaded_weight_bytes")  # the benchmark's torch-free way
        (now,) = llm.apply_model(weight_bytes)
    assert held == expected
    assert named == held
    assert now["total"] > held["total"]  # a walk now also finds the KV cache: not the figure
