"""GPU check of the MoE forward (#22): on CUDA the static-shape expert forward equals the routed
one, a CUDA graph captures it (no host sync), and a random Mixtral served with CUDA graphs gives
the eager engine's greedy tokens. Run from the repository root: python3 tools/gpu_check_moe.py"""

from __future__ import annotations

import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.getcwd())

from ember.workers.layers.context import ModelContext
from ember.workers.layers.fused_moe import FusedMoE, select_experts


def _best_ms(function, repeats: int = 20) -> float:
    best = float("inf")
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        function()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def check_layer() -> None:
    hidden, intermediate, experts, top_k = 4096, 14336 // 4, 8, 2  # Mixtral, experts cut by 4
    with torch.device("cuda"):
        layer = FusedMoE(experts, top_k, hidden, intermediate, ctx=ModelContext())
    layer.w13_weight.data = torch.randn_like(layer.w13_weight, dtype=torch.bfloat16) * 0.02
    layer.w2_weight.data = torch.randn_like(layer.w2_weight, dtype=torch.bfloat16) * 0.02
    for tokens in (1, 8, 32, 256):
        x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16)
        logits = torch.randn(tokens, experts, device="cuda")
        weights, ids = select_experts(logits, top_k, True)
        routed = layer.forward_routed(x, weights, ids)
        static = layer(x, logits)  # CUDA: the static path
        error = (static.float() - routed.float()).abs().max().item()
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            layer(x, logits)
        torch.cuda.current_stream().wait_stream(stream)
        with torch.cuda.graph(graph):
            captured = layer(x, logits)
        graph.replay()
        torch.cuda.synchronize()
        graph_error = (captured.float() - static.float()).abs().max().item()
        routed_ms = _best_ms(lambda: layer.forward_routed(x, weights, ids))  # noqa: B023
        static_ms = _best_ms(lambda: layer(x, logits))  # noqa: B023
        print(
            f"T={tokens:4d} |static-routed| {error:.2e} |graph-eager| {graph_error:.2e}  "
            f"routed {routed_ms:.3f} ms  static {static_ms:.3f} ms  "
            f"graph {_best_ms(graph.replay):.3f} ms",
            flush=True,
        )
        assert error < 2e-2 * max(1.0, routed.abs().max().item()), error
        assert graph_error == 0.0, graph_error


def check_engine() -> None:
    from ember import LLM, SamplingParams
    from tests.helpers import random_prompts, write_random_model

    model_dir = write_random_model(tempfile.mkdtemp(), "MixtralForCausalLM")
    prompts = random_prompts(8, 512, [5, 17, 33, 9], seed=1)
    params = SamplingParams(temperature=0.0, max_tokens=16)
    results = {}
    for eager in (True, False):
        with LLM(model_dir, dtype="float32", skip_tokenizer_init=True, enforce_eager=eager) as llm:
            outputs = llm.generate(prompts, params, use_tqdm=False)
        results[eager] = [list(output.outputs[0].token_ids) for output in outputs]
    print("graphs == eager:", results[False] == results[True], flush=True)
    assert results[False] == results[True]


if __name__ == "__main__":
    check_layer()
    check_engine()
    print("MOE GPU CHECK OK")
