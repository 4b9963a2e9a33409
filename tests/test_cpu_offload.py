"""`cpu_offload_gb` (vLLM's weight offloading, `ember.workers.cpu_offload`): which parameters
go to host memory under a budget (vLLM's rule), and that offloaded layers, run through
`functional_call` on copies of their state, give the model's own hidden states. On this CPU
machine the copies stay on the CPU; the rule and the wrapped forward are what is checked."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ember.enginecore.arg_utils import EngineArgs
from ember.workers.cpu_offload import WeightOffloader, decoder_layers
from ember.workers.gpu_memory import dummy_batch
from ember.workers.model_runner import ModelRunner
from tests.helpers import write_random_llama


@pytest.fixture(scope="module")
def three_layer_llama(tmp_path_factory) -> str:
    return write_random_llama(tmp_path_factory.mktemp("offload"), num_hidden_layers=3)


def _runner(model_dir: str, cpu_offload_bytes: int) -> ModelRunner:
    config = EngineArgs(model=model_dir, device="cpu", dtype="float32").create_engine_config()
    device = dataclasses.replace(config.device, cpu_offload_bytes=cpu_offload_bytes)
    return ModelRunner(dataclasses.replace(config, device=device), torch.device("cpu"))


def _layer_bytes(layer: torch.nn.Module) -> list[int]:
    return [p.numel() * p.element_size() for p in layer.parameters()]


def _prefill_hidden_states(runner: ModelRunner) -> torch.Tensor:
    input_ids, positions, metadata, num_blocks = dummy_batch([7, 12], 4, torch.device("cpu"))
    runner.block_size = 4
    runner.initialize_kv_cache(num_blocks + 1)
    input_ids.copy_(torch.arange(input_ids.numel()) % 97 + 3)
    with torch.inference_mode():
        return runner.model(input_ids, positions, metadata)


def test_offloaded_layers_give_the_models_own_hidden_states(three_layer_llama):
    reference = _runner(three_layer_llama, 0)
    first_layer_bytes = _layer_bytes(decoder_layers(reference.model)[0])
    # The whole first layer and the first parameter of the second: the budget ends inside it.
    budget = sum(first_layer_bytes) + 1
    offloaded = _runner(three_layer_llama, budget)
    layers = decoder_layers(offloaded.model)
    marks = [
        [getattr(p, "_ember_offloaded", False) for p in layer.parameters()] for layer in layers
    ]
    assert all(marks[0])
    assert marks[1][0] and not any(marks[1][1:])  # the crossing parameter still goes (vLLM)
    assert not any(flag for layer_marks in marks[2:] for flag in layer_marks)
    assert "forward" in vars(layers[0]) and "forward" in vars(layers[1])  # streamed in
    assert "forward" not in vars(layers[-1])
    torch.testing.assert_close(
        _prefill_hidden_states(offloaded), _prefill_hidden_states(reference), rtol=0, atol=0
    )


def test_the_budget_is_spent_in_order_and_an_offloaded_parameter_is_not_counted_twice():
    layer = torch.nn.Linear(8, 4)  # weight 128 bytes, bias 16 bytes
    offloader = WeightOffloader(max_bytes=100, pin_memory=False)
    assert offloader.offload(layer, torch.device("cpu")) is True
    assert offloader.offloaded_bytes == 128  # the weight crossed the budget; the bias stays
    assert offloader.offload(torch.nn.Linear(2, 2), torch.device("cpu")) is False  # spent
    again = WeightOffloader(max_bytes=10**6, pin_memory=False)
    again.offload(layer, torch.device("cpu"))
    assert again.offloaded_bytes == 16  # the weight was offloaded already
    x = torch.randn(3, 8)
    expected = x @ layer.weight.T + layer.bias
    torch.testing.assert_close(layer(x), expected)


def test_a_model_without_a_layer_list_is_refused():
    with pytest.raises(ValueError, match="cpu_offload_gb"):
        decoder_layers(torch.nn.Linear(2, 2))
