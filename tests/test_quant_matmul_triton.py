"""The W4A16 / W8A16 Triton GEMM (`kernels/quant_matmul_triton.py`) against the plain-torch
reference beside it (`kernels/quant_matmul.py`), the packed form against the formats' rule
(`group_quant.reference_dequantize`) for GPTQ, AWQ and compressed-tensors layers, and the
layers' CUDA path.

Without a GPU the kernel runs in Triton's interpreter (TRITON_INTERPRET=1, set by
`tests/conftest.py`) on small shapes: N = 72 and K = 200 are not multiples of the tiles. The
kernel rounds the weight to x's dtype as the reference does and both add in float32, so float16
outputs agree to an ulp; bfloat16 ones to a few (the interpreter truncates to bfloat16 where
torch rounds).
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from torch import nn

from ember.kernels.quant_matmul import (
    PackedGroupWeight,
    pack_group_weight,
    quant_matmul,
    quant_matmul_torch,
)
from ember.workers.layers.linear import default_weight_loader
from ember.workers.layers.quantization.awq import AWQLinearMethod
from ember.workers.layers.quantization.compressed_tensors import CompressedTensorsWNA16Method
from ember.workers.layers.quantization.gptq import GPTQLinearMethod
from ember.workers.layers.quantization.group_quant import reference_dequantize
from tests.quantized_checkpoints import AWQ_ORDER, pack_int32, quantize_groups

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
OUTPUTS = 72
TOKENS = (1, 3, 17, 64)  # decode tiles (16 rows), mid-sized ones (64 rows)
TOLERANCES = {
    torch.float16: {"rtol": 1e-3, "atol": 1e-3},
    torch.bfloat16: {"rtol": 1.6e-2, "atol": 2e-2},
}
# layout: (group size, how the inputs are assigned to groups)
LAYOUTS = {
    "g32": (32, "positional"),
    "g64": (64, "positional"),
    "g128": (128, "positional"),
    "one-group": (-1, "positional"),
    "act-order": (32, "permuted"),  # GPTQ desc_act: sorted into positional groups
    "irregular": (32, "random"),  # a rank's share of act-order groups: read per input
}


@pytest.fixture(scope="module")
def triton_kernel():
    if importlib.util.find_spec("triton") is None:
        pytest.fail("triton is not installed (make setup installs it)")
    if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.fail("without a GPU the kernel needs TRITON_INTERPRET=1 (set in tests/conftest.py)")
    from ember.kernels import quant_matmul_triton

    return quant_matmul_triton


def random_groups(
    bits: int, layout: str, outputs: int = OUTPUTS, seed: int = 0
) -> tuple[torch.Tensor, ...]:
    """(codes [N, K], scales [N, G], asymmetric zeros [N, G], group of each input [K]) as
    `GroupQuantLinearMethod.unpacked` gives them."""
    group_size, assignment = LAYOUTS[layout]
    generator = torch.Generator().manual_seed(seed)
    inputs = 200 if group_size == -1 else 256
    groups = 1 if group_size == -1 else inputs // group_size
    codes = torch.randint(0, 2**bits, (outputs, inputs), generator=generator, dtype=torch.int32)
    codes[0, :4] = torch.tensor([0, 2**bits - 1, 0, 2**bits - 1])
    scales = (torch.rand(outputs, groups, generator=generator) * 0.02 + 1e-3).half().float()
    zeros = torch.randint(0, 2**bits, (outputs, groups), generator=generator, dtype=torch.int32)
    group_of_input = torch.arange(inputs) // (inputs if group_size == -1 else group_size)
    if assignment == "permuted":
        group_of_input = group_of_input[torch.randperm(inputs, generator=generator)]
    elif assignment == "random":
        group_of_input = torch.randint(0, groups, (inputs,), generator=generator)
    return codes, scales, zeros, group_of_input


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert actual.dtype == expected.dtype == dtype
    tolerance = TOLERANCES[dtype]
    scale = float(expected.float().abs().max())
    torch.testing.assert_close(
        actual.float(),
        expected.float(),
        rtol=tolerance["rtol"],
        atol=tolerance["atol"] * scale,
    )


# ---- the packed form ---------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_packed_form_dequantizes_as_the_formats_rule(bits, layout):
    codes, scales, zeros, group_of_input = random_groups(bits, layout)
    packed = pack_group_weight(codes, scales, zeros, group_of_input, bits, torch.float16)
    inputs = codes.shape[1]
    assert packed.shape == (OUTPUTS, inputs)
    assert packed.qweight.shape == (inputs * bits // 32, OUTPUTS)
    assert packed.qweight.dtype == torch.int32
    expected_group_size = {"one-group": -1, "irregular": 0}.get(layout, LAYOUTS[layout][0])
    assert packed.group_size == expected_group_size
    assert (packed.group_of_input is not None) == (layout == "irregular")
    assert (packed.order is not None) == (layout in ("act-order", "irregular"))
    reference = reference_dequantize(codes, scales, zeros, group_of_input)
    assert torch.equal(packed.dequantize(), reference)  # float16 scales: exact


def _layer_of(method, inputs: int, outputs: int, tensors: dict[str, torch.Tensor]) -> nn.Module:
    layer = nn.Module()
    method.create_weights(layer, inputs, outputs, inputs, outputs, default_weight_loader)
    for name, tensor in tensors.items():
        getattr(layer, name).data.copy_(tensor)
    return layer


def _quantized(bits: int, group_size: int, perm: torch.Tensor | None = None):
    weight = torch.randn(OUTPUTS, 256, generator=torch.Generator().manual_seed(bits))
    perm = torch.arange(256) if perm is None else perm
    codes, scales, zeros, g_idx = quantize_groups(weight, bits, group_size, False, perm, 0)
    return codes, scales, zeros, g_idx, _dequantized(codes, scales, zeros, g_idx)


def _dequantized(codes, scales, zeros, g_idx) -> torch.Tensor:
    """w [N, K] of `quantize_groups`' codes [N, K], scales and zeros [G, N], g_idx [K]."""
    return scales.float()[g_idx].T * (codes - zeros[g_idx].T).float()


@pytest.mark.parametrize(
    "checkpoint", ["gptq-4bit", "gptq-8bit-act-order", "awq", "compressed-tensors-8bit"]
)
def test_each_formats_layer_packs_into_the_gptq_layout(checkpoint):
    """AWQ's outputs-packed, interleaved words and compressed-tensors' [out, in / pack] words
    go through `unpacked` into one layout; act-order groups get sorted."""
    if checkpoint.startswith("gptq"):
        bits = 8 if "8bit" in checkpoint else 4
        desc_act = "act-order" in checkpoint
        perm = torch.randperm(256, generator=torch.Generator().manual_seed(1)) if desc_act else None
        codes, scales, zeros, g_idx, expected = _quantized(bits, 64, perm)
        method = GPTQLinearMethod(bits, 64, desc_act, zero_offset=0)
        tensors = {
            "qweight": pack_int32(codes.T, bits, dim=0),
            "qzeros": pack_int32(zeros, bits, dim=1),
            "scales": scales,
            "g_idx": g_idx.to(torch.int32),
        }
    elif checkpoint == "awq":
        bits = 4
        codes, scales, zeros, g_idx, expected = _quantized(bits, 32)
        order = torch.arange(OUTPUTS).view(-1, 8)[:, list(AWQ_ORDER)].flatten()
        method = AWQLinearMethod(bits, 32)
        tensors = {
            "qweight": pack_int32(codes.T[:, order], 4, dim=1),
            "qzeros": pack_int32(zeros[:, order], 4, dim=1),
            "scales": scales,
        }
    else:
        bits = 8
        weight = torch.randn(OUTPUTS, 256, generator=torch.Generator().manual_seed(2))
        codes, scales, zeros, g_idx = quantize_groups(weight, bits, 128, True, torch.arange(256), 0)
        expected = _dequantized(codes, scales, zeros, g_idx)
        method = CompressedTensorsWNA16Method(bits, 128)
        tensors = {"weight_packed": pack_int32(codes, bits, dim=1), "weight_scale": scales.T}
    layer = _layer_of(method, 256, OUTPUTS, tensors)
    packed = pack_group_weight(*method.unpacked(layer), bits, torch.float16)
    assert packed.order is not None if "act-order" in checkpoint else packed.order is None
    assert packed.group_size > 0
    assert torch.equal(packed.dequantize(), expected)


def test_bad_bits_and_inputs_are_refused_naming_them():
    codes, scales, zeros, group_of_input = random_groups(4, "g32")
    with pytest.raises(ValueError, match="bits must be one of"):
        pack_group_weight(codes, scales, zeros, group_of_input, 3, torch.float16)
    with pytest.raises(ValueError, match="inputs .* multiple of 8"):
        pack_group_weight(codes[:, :252], scales, zeros, group_of_input[:252], 4, torch.float16)


# ---- the kernel --------------------------------------------------------------------------------


def _packed_on_device(bits: int, layout: str, dtype: torch.dtype) -> PackedGroupWeight:
    codes, scales, zeros, group_of_input = random_groups(bits, layout)
    return pack_group_weight(codes, scales, zeros, group_of_input, bits, dtype, DEVICE)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_kernel_matches_the_reference_float16(triton_kernel, bits, layout):
    packed = _packed_on_device(bits, layout, torch.float16)
    for tokens in TOKENS:
        generator = torch.Generator().manual_seed(tokens)
        x = torch.randn(tokens, packed.shape[1], generator=generator).half().to(DEVICE)
        actual = triton_kernel.quant_matmul_triton(x, packed)
        assert actual.shape == (tokens, OUTPUTS)
        assert_close(actual, quant_matmul_torch(x, packed), torch.float16)


@pytest.mark.parametrize("layout", ["g32", "irregular"])
def test_kernel_prefill_tiles_match_the_reference(triton_kernel, layout):
    packed = _packed_on_device(4, layout, torch.float16)
    x = torch.randn(130, packed.shape[1], generator=torch.Generator().manual_seed(0))
    x = x.half().to(DEVICE)  # two tiles of 128 rows, the second masked
    assert_close(
        triton_kernel.quant_matmul_triton(x, packed), quant_matmul_torch(x, packed), torch.float16
    )


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("layout", ["g128", "act-order", "irregular"])
def test_kernel_matches_the_reference_bfloat16(triton_kernel, bits, layout):
    packed = _packed_on_device(bits, layout, torch.bfloat16)
    for tokens in (1, 17):
        generator = torch.Generator().manual_seed(tokens)
        x = torch.randn(tokens, packed.shape[1], generator=generator).bfloat16().to(DEVICE)
        assert_close(
            triton_kernel.quant_matmul_triton(x, packed),
            quant_matmul_torch(x, packed),
            torch.bfloat16,
        )


def test_kernel_without_split_k_and_with_strided_and_batched_activations(triton_kernel):
    packed = _packed_on_device(4, "g64", torch.float16)
    inputs = packed.shape[1]
    wide = torch.randn(5, 2 * inputs, generator=torch.Generator().manual_seed(0)).half()
    x = wide.to(DEVICE)[:, ::2]  # a strided view
    expected = quant_matmul_torch(x, packed)
    whole_k = triton_kernel.BlockConfig(16, 32, 32, split_k=1)  # stores in float16 directly
    assert_close(triton_kernel.quant_matmul_triton(x, packed, whole_k), expected, torch.float16)
    batched = x.reshape(5, 1, inputs).expand(5, 2, inputs)
    out = triton_kernel.quant_matmul_triton(batched, packed)
    assert out.shape == (5, 2, OUTPUTS)
    assert_close(out[:, 1], expected, torch.float16)
    assert triton_kernel.quant_matmul_triton(x[:0], packed).shape == (0, OUTPUTS)
    with pytest.raises(ValueError, match="block_k 128 must divide the group size 64"):
        triton_kernel.quant_matmul_triton(x, packed, triton_kernel.BlockConfig(16, 32, 128))


def test_block_configs_fill_the_gpu_and_fit_shared_memory(triton_kernel):
    h100 = (132, 227 * 1024)
    decode = triton_kernel.block_config(1, 4096, 4096, 128, 2, h100)
    assert (decode.block_m, decode.block_k) == (16, 128)
    assert decode.split_k * 4096 // decode.block_n >= 2 * 132
    prefill = triton_kernel.block_config(2048, 4096, 4096, 128, 2, h100)
    assert (prefill.block_m, prefill.block_n, prefill.split_k) == (128, 128, 1)
    assert triton_kernel.block_config(1, 4096, 4096, 32, 2, h100).block_k == 32  # one group
    small_gpu = triton_kernel.block_config(2048, 4096, 4096, 128, 4, (28, 99 * 1024))
    assert small_gpu.num_stages == 1  # float32 tiles of 64 KiB a stage


# ---- the layers --------------------------------------------------------------------------------


def _gptq_layer(device: str) -> tuple[GPTQLinearMethod, nn.Module, torch.Tensor]:
    codes, scales, zeros, g_idx, expected = _quantized(4, 32)
    method = GPTQLinearMethod(4, 32, desc_act=False, zero_offset=0)
    tensors = {
        "qweight": pack_int32(codes.T, 4, dim=0),
        "qzeros": pack_int32(zeros, 4, dim=1),
        "scales": scales,
        "g_idx": g_idx.to(torch.int32),
    }
    layer = _layer_of(method, 256, OUTPUTS, tensors)
    layer.model_dtype = torch.float16  # as a model built in float16 has it
    return method, layer.to(device), expected


def test_layer_applies_its_gpu_weight_through_quant_matmul():
    """The CPU half of the CUDA path: a layer holding `gpu_weight` multiplies through
    `quant_matmul` (here its torch path) and dequantizes on demand."""
    method, layer, expected = _gptq_layer("cpu")
    codes, scales, zeros, group_of_input = method.unpacked(layer)
    method.process_weights_after_loading(layer)
    assert layer.gpu_weight is None and layer.quantized_weight is not None  # the CPU forms
    # the CPU tiles: float16 offsets (within a 64th of a step), float16 weights
    torch.testing.assert_close(
        method.dequantized_weight(layer).float(), expected, atol=1e-2, rtol=1e-3
    )
    layer.gpu_weight = pack_group_weight(codes, scales, zeros, group_of_input, 4, torch.float16)
    x = torch.randn(3, 256).half()
    bias = torch.randn(OUTPUTS).half()
    out = method.apply(layer, x, bias)
    torch.testing.assert_close(out, quant_matmul_torch(x, layer.gpu_weight) + bias)
    torch.testing.assert_close(method.dequantized_weight(layer), expected.half())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU for the layer's memory")
def test_gptq_layer_on_cuda_keeps_its_codes_packed():
    method, layer, expected = _gptq_layer("cuda")
    method.process_weights_after_loading(layer)
    packed = layer.gpu_weight
    assert isinstance(packed, PackedGroupWeight)
    assert layer.dense_weight is None and layer.quantized_weight is None
    assert packed.qweight.is_cuda and packed.qweight.numel() * 4 == OUTPUTS * 256 // 2
    assert packed.scales.dtype == torch.float16
    x = torch.randn(17, 256, device="cuda").half()
    out = method.apply(layer, x)
    reference = (x.float() @ expected.cuda().half().float().T).half()
    assert_close(out, reference, torch.float16)
    assert_close(quant_matmul(x, packed), quant_matmul_torch(x, packed), torch.float16)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("desc_act", [False, True], ids=["grouped", "act-order"])
def test_gptq_checkpoint_loads_and_generates_on_cuda(tmp_path, desc_act):
    """A GPTQ checkpoint on the GPU end to end: every fused shard brings GPTQ's `g_idx`, which
    the loader compares on the GPU (a CPU tensor there once failed the load); greedy tokens
    are HF's on the dequantized weights for most prompts (the kernel's summation order may
    tip a near-tie of the random model; a wrong kernel agrees on none)."""
    from transformers import AutoModelForCausalLM

    from ember import LLM, SamplingParams
    from tests.helpers import hf_greedy, random_prompts, write_random_llama
    from tests.quantized_checkpoints import write_dequantized_checkpoint, write_gptq_checkpoint

    dense = write_random_llama(tmp_path / "dense", hidden_size=256, intermediate_size=512)
    quant_dir = write_gptq_checkpoint(dense, str(tmp_path / "gptq"), desc_act=desc_act)
    reference_dir = write_dequantized_checkpoint(quant_dir, str(tmp_path / "dequantized"))
    model = AutoModelForCausalLM.from_pretrained(reference_dir, dtype=torch.float32).eval()
    prompts = random_prompts(6, 512, [5, 17, 40, 3, 64, 9], seed=1)
    expected = [hf_greedy(model, prompt, 8) for prompt in prompts]
    params = SamplingParams(temperature=0.0, max_tokens=8)  # stops at EOS, as hf_greedy
    with LLM(quant_dir, device="cuda", dtype="float32", skip_tokenizer_init=True) as llm:
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    equal = sum(list(o.outputs[0].token_ids) == e for o, e in zip(outputs, expected, strict=True))
    assert equal >= len(prompts) // 2, (equal, len(prompts))
