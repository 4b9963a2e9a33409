"""Vocabulary tables kept in half precision on CPU (`kernels/half_matmul.py`): the kernel under
each ISA against a float64 reference, and engines: on a bfloat16 checkpoint, whose tables stay
bfloat16 and whose LM head runs through the kernel, against HF in float32 on the same weights;
on a float32 checkpoint, whose tables stay float32."""

from __future__ import annotations

import pytest
import torch

from ember import LLM, SamplingParams
from ember.kernels import half_matmul
from tests.helpers import random_prompts, write_random_llama

pytestmark = pytest.mark.usefixtures("cpu_isa")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("rows", "n", "k"), [(1, 3, 16), (3, 70, 64), (9, 257, 96)])
def test_half_matmul_equals_the_float64_product(dtype, rows, n, k):
    torch.manual_seed(rows + n)
    weight = torch.randn(n, k).to(dtype)
    x = torch.randn(rows, k)
    out = half_matmul.half_matmul(x, weight)
    assert out is not None and out.dtype == torch.float32 and out.shape == (rows, n)
    exact = x.double() @ weight.double().T
    # float32 sums of k products: within a few ulps of the sum of the products' magnitudes
    bound = 4 * k * 2.0**-24 * (x.double().abs() @ weight.double().abs().T)
    assert bool(((out.double() - exact).abs() <= bound).all())
    # each row alone gives the same values (nothing depends on the other rows of the batch)
    for row in range(rows):
        assert torch.equal(half_matmul.half_matmul(x[row : row + 1], weight)[0], out[row])


def test_half_matmul_refuses_a_width_off_the_vectors_and_the_fallback_serves():
    weight = torch.randn(5, 12).bfloat16()  # 12: not a multiple of 8 or 16 lanes
    x = torch.randn(2, 12)
    direct = half_matmul.half_matmul(x, weight)
    expected = x @ weight.float().T
    if direct is not None:  # the generic build has one lane: any width
        torch.testing.assert_close(direct, expected)
    torch.testing.assert_close(half_matmul.widened_matmul(x, weight), expected)


def tables(model) -> list:
    """The LM head's and the embedding's storage dtype and compute dtype, and whether tied."""
    head, embedding = model.lm_head.weight, model.model.embed_tokens.weight
    return [
        str(head.dtype),
        str(getattr(head, "compute_dtype", None)),
        str(embedding.dtype),
        head is embedding,
    ]


@pytest.fixture(scope="module")
def bfloat16_checkpoint(tmp_path_factory):
    """A random Llama saved in bfloat16 (as most checkpoints are), with untied tables."""
    directory = write_random_llama(tmp_path_factory.mktemp("bf16") / "source", seed=3)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16)
    target = str(tmp_path_factory.mktemp("bf16") / "model")
    model.save_pretrained(target)
    return target


def test_a_float32_engine_keeps_a_bfloat16_checkpoint_s_tables_half_and_matches_hf(
    bfloat16_checkpoint,
):
    """On CPU, dtype "auto" computes in float32; the tables stay bfloat16 (every value exact),
    and the greedy tokens and their log-probabilities are HF's float32 run on the same
    weights: the products are float32's, only summed in another order."""
    from transformers import AutoModelForCausalLM

    prompts = random_prompts(3, 512, [5, 17, 33], seed=1)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=1)
    with LLM(bfloat16_checkpoint, skip_tokenizer_init=True) as llm:
        assert llm.apply_model(tables)[0] == [
            "torch.bfloat16",
            "torch.float32",
            "torch.bfloat16",
            False,
        ]
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    hf = AutoModelForCausalLM.from_pretrained(bfloat16_checkpoint, dtype=torch.float32).eval()
    for prompt, output in zip(prompts, outputs):
        tokens = list(output.outputs[0].token_ids)
        with torch.no_grad():
            logits = hf(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1 : -1]
        reference = torch.log_softmax(logits.float(), dim=-1)
        assert tokens == reference.argmax(-1).tolist()
        for step, token in enumerate(tokens):
            ours = output.outputs[0].logprobs[step][token].logprob
            assert abs(ours - reference[step, token].item()) <= 1e-4


def test_a_float32_checkpoint_s_tables_stay_float32(tmp_path):
    """Values no half format holds (a float32 checkpoint's) are not rounded into one."""
    directory = write_random_llama(tmp_path / "model", seed=4)
    with LLM(directory, skip_tokenizer_init=True) as llm:
        assert llm.apply_model(tables)[0][:3] == ["torch.float32", "None", "torch.float32"]


def test_the_loader_keeps_a_half_table_only_while_every_piece_is_that_format():
    """`_keeping_half` swaps the float32 storage for the first half tensor it loads; a later
    piece in another format widens the table back to float32 (nothing rounded)."""
    from torch import nn

    from ember.workers.layers.quantization.unquantized import _keeping_half

    def copy_rows(param, loaded):  # stands for a layer's loader: rows 0..n of the table
        param.data[: loaded.shape[0]].copy_(loaded)

    load = _keeping_half(copy_rows)
    param = nn.Parameter(torch.empty(6, 16), requires_grad=False)
    first = torch.randn(4, 16).bfloat16()
    load(param, first)
    assert param.dtype == torch.bfloat16 and param.compute_dtype == torch.float32
    assert torch.equal(param.data[:4], first) and not param.data[4:].any()  # padding zero
    exact = torch.randn(2, 16)  # float32 values no half format holds
    load(param, exact)
    assert param.dtype == torch.float32 and not hasattr(param, "compute_dtype")
    assert torch.equal(param.data[:2], exact) and torch.equal(param.data[2:4], first[2:].float())
