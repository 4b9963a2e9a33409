"""GPTQ and AWQ checkpoints (#20): detection from config.json, every layout option of each
format at TP=1 and TP=2 against Hugging Face on the reference-dequantized weights, the packed
forms against the plain-torch reference under each CPU ISA, and the errors.

The checkpoints are written by `tests/quantized_checkpoints.py` (checked bit for bit against
AutoGPTQ's, GPTQModel's and AutoAWQ's own packers). The oracle is HF `transformers` on the
dequantized weights (it does not load GPTQ/AWQ on a CPU without those packages).

Tolerance: ember runs these layers in its CPU fast path: activations in 15-bit groups in the
tiles, bfloat16 in the fused decode step and in the dense copies that prefill chunks over 64
tokens multiply by, keys and values in a bfloat16 cache. On the random test model (wide
weights, logits of tens) that moves a log-probability by up to 0.2 (measured 0.06-0.20 over
the cases below); HF's own bfloat16 run of the same dequantized weights is 0.25-0.36 off its
float32 run. So the check is: each token ember picks is HF's argmax, or within `NEAR_TIE` of it
in HF's log-probabilities, and its log-probability is within `LOGPROB_TOLERANCE` of HF's for the
same sequence.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from ember import LLM, SamplingParams
from ember.kernels import tile_matmul
from ember.workers.layers.packed_int4 import QuantizedWeight
from ember.workers.layers.quantization.group_quant import (
    OFFSET_ROUNDING,
    GroupQuantLinearMethod,
    pack_groups,
    reference_dequantize,
)
from ember.workers.layers.tiled_weight import TiledWeight
from tests.helpers import cache_facts, random_prompts, write_random_llama
from tests.quantized_checkpoints import (
    write_awq_checkpoint,
    write_dequantized_checkpoint,
    write_gptq_checkpoint,
)

LOGPROB_TOLERANCE = 0.3
NEAR_TIE = 0.3
MAX_TOKENS = 16

CASES = {
    "gptq-4bit-sym-g32-v1": ("gptq", {"bits": 4, "group_size": 32, "sym": True}),
    "gptq-4bit-asym-g64-v2": (
        "gptq",
        {"bits": 4, "group_size": 64, "sym": False, "checkpoint_format": "gptq_v2"},
    ),
    "gptq-4bit-act-order-g32": (
        "gptq",
        {"bits": 4, "group_size": 32, "sym": False, "desc_act": True},
    ),
    "gptq-8bit-sym-g128": ("gptq", {"bits": 8, "group_size": 128, "sym": True}),
    "gptq-8bit-asym-per-channel": ("gptq", {"bits": 8, "group_size": -1, "sym": False}),
    "awq-g32": ("awq", {"group_size": 32}),
    "awq-g128": ("awq", {"group_size": 128}),
    # groups of 16 do not fill the tiles' 32-input blocks: dequantised once, dense (the form
    # CUDA takes too until it has its own kernels)
    "gptq-4bit-g16-dense": ("gptq", {"bits": 4, "group_size": 16, "sym": True}),
}
TP2_CASES = ["gptq-4bit-act-order-g32", "gptq-8bit-asym-per-channel", "awq-g32"]


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory) -> str:
    return write_random_llama(
        tmp_path_factory.mktemp("dense"), hidden_size=128, intermediate_size=256
    )


@pytest.fixture(scope="module")
def checkpoints(dense_dir, tmp_path_factory) -> dict[str, tuple[str, str]]:
    """(quantized directory, dequantized directory) of each case, written once."""
    written = {}
    for name, (kind, options) in CASES.items():
        root = tmp_path_factory.mktemp(name)
        writer = write_gptq_checkpoint if kind == "gptq" else write_awq_checkpoint
        quantized = writer(dense_dir, str(root / "quantized"), **options)
        written[name] = (quantized, write_dequantized_checkpoint(quantized, str(root / "dense")))
    return written


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    # the 80-token prompt is prefilled through the dense copy, the others through the codes
    return random_prompts(3, 512, [7, 12, 80], seed=3)


def packed_forms(model: torch.nn.Module) -> list[str]:
    """What each quantized linear of a worker's model computes with (by `apply_model`)."""
    forms = []
    for module in model.modules():
        if isinstance(getattr(module, "quant_method", None), GroupQuantLinearMethod):
            quantized = module.quantized_weight
            if quantized is None:
                forms.append("dense")
            else:
                extra = "+offsets" if quantized.offsets is not None else ""
                extra += "+order" if quantized.order is not None else ""
                forms.append(type(quantized.packed).__name__ + extra)
    return forms


def hf_model(dequantized_dir: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(dequantized_dir, dtype=torch.float32).eval()


def check_against_hf(
    llm: LLM, hf: torch.nn.Module | str, prompts: list[list[int]], lora_request=None
) -> None:
    """ember's greedy tokens and their log-probabilities against HF's model `hf` (or the
    dense directory it loads from) on the same sequences (see the module's tolerance)."""
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True, logprobs=1)
    outputs = llm.generate(
        [{"prompt_token_ids": p} for p in prompts],
        params,
        use_tqdm=False,
        lora_request=lora_request,
    )
    if isinstance(hf, str):
        hf = hf_model(hf)
    for prompt, output in zip(prompts, outputs):
        tokens = list(output.outputs[0].token_ids)
        assert len(tokens) == MAX_TOKENS
        with torch.no_grad():
            logits = hf(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1 : -1]
        reference = torch.log_softmax(logits.float(), dim=-1)
        for step, token in enumerate(tokens):
            best = reference[step].max().item()
            assert best - reference[step, token].item() <= NEAR_TIE, (
                f"step {step}: ember took {token} ({reference[step, token].item():.3f} in HF), "
                f"HF's argmax {reference[step].argmax().item()} ({best:.3f})"
            )
            ours = output.outputs[0].logprobs[step][token].logprob
            assert abs(ours - reference[step, token].item()) <= LOGPROB_TOLERANCE


@pytest.mark.parametrize("case", list(CASES))
def test_checkpoint_generates_as_hf_on_its_dequantized_weights(case, checkpoints, prompts):
    quantized, dequantized = checkpoints[case]
    with LLM(quantized, skip_tokenizer_init=True) as llm:
        assert llm.llm_engine.model_config.quantization == CASES[case][0]
        forms = llm.apply_model(packed_forms)[0]
        check_against_hf(llm, dequantized, prompts)
    assert len(forms) == 2 * 4  # qkv, o, gate_up, down of two layers
    expected = {
        "gptq-4bit-sym-g32-v1": "",  # 4-bit offsets go into the tiles (float16)
        "gptq-4bit-asym-g64-v2": "",
        "gptq-4bit-act-order-g32": "+order",
        "gptq-8bit-sym-g128": "",  # zero 128: no offsets
        "gptq-8bit-asym-per-channel": "+offsets",  # 8-bit tiles have none
        "awq-g32": "",
        "awq-g128": "",
        "gptq-4bit-g16-dense": "dense",
    }[case]
    if expected == "dense":
        assert set(forms) == {"dense"}, forms
    elif tile_matmul.available():
        assert all(form == "TiledWeight" + expected for form in forms), forms


@pytest.mark.slow
@pytest.mark.parametrize("case", TP2_CASES)
def test_checkpoint_at_tp2_generates_as_hf(case, checkpoints, prompts):
    quantized, dequantized = checkpoints[case]
    with LLM(quantized, tensor_parallel_size=2, skip_tokenizer_init=True) as llm:
        check_against_hf(llm, dequantized, prompts)


def test_quantization_argument_is_checked_against_the_checkpoint(checkpoints, dense_dir):
    gptq_dir = checkpoints["gptq-4bit-sym-g32-v1"][0]
    with pytest.raises(ValueError, match="quantization='awq' contradicts .*'gptq'"):
        LLM(gptq_dir, quantization="awq", skip_tokenizer_init=True)
    with pytest.raises(ValueError, match="quantization='gguf' contradicts"):
        LLM(gptq_dir, quantization="gguf", skip_tokenizer_init=True)
    with pytest.raises(ValueError, match="no quantization_config"):
        LLM(dense_dir, quantization="gptq", skip_tokenizer_init=True)
    with pytest.raises(NotImplementedError, match="quantization='bitsandbytes'"):
        LLM(dense_dir, quantization="bitsandbytes", skip_tokenizer_init=True)


def test_unknown_quant_method_lists_the_supported_ones(checkpoints, tmp_path):
    target = _edited_checkpoint(
        checkpoints["awq-g32"][0], tmp_path / "unknown", lambda c: c.update(quant_method="hqq")
    )
    with pytest.raises(
        ValueError, match="quant_method='hqq'.*supported: awq, compressed-tensors, fp8, gptq"
    ):
        LLM(target, skip_tokenizer_init=True)


def test_vllm_kernel_names_select_the_checkpoint_format(checkpoints, prompts):
    quantized, dequantized = checkpoints["awq-g32"]
    with LLM(quantized, quantization="awq_marlin", skip_tokenizer_init=True) as llm:
        assert llm.llm_engine.model_config.quantization == "awq"
        check_against_hf(llm, dequantized, prompts[:1])


def test_a_shard_that_cuts_a_group_is_refused_before_any_process_starts(checkpoints):
    # group_size 128 and o_proj's 128 inputs: 64 a rank at TP=2
    with pytest.raises(ValueError, match="o_proj: input size per rank 64 .* group_size 128"):
        LLM(checkpoints["gptq-8bit-sym-g128"][0], tensor_parallel_size=2, skip_tokenizer_init=True)


def _edited_checkpoint(source: str, target, edit_config=None, edit_tensors=None) -> str:
    import json
    import shutil

    shutil.copytree(source, target)
    if edit_config is not None:
        config = json.loads((target / "config.json").read_text())
        edit_config(config["quantization_config"])
        (target / "config.json").write_text(json.dumps(config))
    if edit_tensors is not None:
        tensors = load_file(str(target / "model.safetensors"))
        edit_tensors(tensors)
        save_file(tensors, str(target / "model.safetensors"))
    return str(target)


def test_settings_ember_does_not_take_are_refused_naming_them(checkpoints, tmp_path):
    source = checkpoints["gptq-4bit-sym-g32-v1"][0]
    cases = [
        (ValueError, "bits must be 4 or 8, got 3", {"bits": 3}),
        (ValueError, "checkpoint_format must be one of", {"checkpoint_format": "marlin"}),
    ]
    for index, (error, message, change) in enumerate(cases):
        target = _edited_checkpoint(
            source, tmp_path / str(index), lambda c, change=change: c.update(change)
        )
        with pytest.raises(error, match=message):
            LLM(target, skip_tokenizer_init=True)


def quantized_bits(model: torch.nn.Module) -> dict[str, int]:
    """Each group-quantized linear layer's bits, by module name (`apply_model`)."""
    return {
        name: module.quant_method.bits
        for name, module in model.named_modules()
        if isinstance(getattr(module, "quant_method", None), GroupQuantLinearMethod)
    }


def test_gptq_dynamic_gives_modules_their_own_settings_or_keeps_them_dense(
    checkpoints, dense_dir, prompts, tmp_path
):
    """GPTQModel's `dynamic`: layer 0's attention kept dense ("-:" rule, stored as `weight`),
    every MLP in 8 bits with groups of 128 ("+:" rule) over the checkpoint's 4 bits in groups
    of 32. ember gives each layer its own method and matches HF on the same mixture of
    dequantized weights (vLLM's first-match rule)."""
    from tests.quantized_checkpoints import _PACKED_SUFFIXES, dequantize_checkpoint, read_tensors

    base, _ = checkpoints["gptq-4bit-sym-g32-v1"]
    eight_bit, _ = checkpoints["gptq-8bit-sym-g128"]
    original = read_tensors(dense_dir)
    wide = read_tensors(eight_bit)
    dense_attention = [f"model.layers.0.self_attn.{p}_proj" for p in "qkvo"]

    def mixed(tensors: dict[str, torch.Tensor], mlp: dict[str, torch.Tensor]) -> None:
        for name in list(tensors):
            module = name.rsplit(".", 1)[0]
            if module in dense_attention:
                del tensors[name]
            elif ".mlp." in name and name in mlp:
                tensors[name] = mlp[name]
        for module in dense_attention:
            tensors[f"{module}.weight"] = original[f"{module}.weight"].half()

    dynamic = {r"-:model\.layers\.0\.self_attn\..*": {}}
    dynamic[r"+:.*\.mlp\..*"] = {"bits": 8, "group_size": 128}
    quantized = _edited_checkpoint(
        base,
        tmp_path / "dynamic",
        lambda c: c.update(dynamic=dynamic),
        lambda tensors: mixed(tensors, wide),
    )
    stored = read_tensors(quantized)
    assert all(f"{module}.weight" in stored for module in dense_attention)
    assert not any(
        name.endswith(_PACKED_SUFFIXES) and name.rsplit(".", 1)[0] in dense_attention
        for name in stored
    )
    reference = dequantize_checkpoint(base)
    mixed(reference, dequantize_checkpoint(eight_bit))
    for module in dense_attention:
        reference[f"{module}.weight"] = reference[f"{module}.weight"].float()
    dense = tmp_path / "dense"
    shutil.copytree(checkpoints["gptq-4bit-sym-g32-v1"][1], dense)
    save_file(
        {k: v.float().contiguous() for k, v in reference.items()}, str(dense / "model.safetensors")
    )
    with LLM(quantized, skip_tokenizer_init=True) as llm:
        bits = llm.apply_model(quantized_bits)[0]
        check_against_hf(llm, str(dense), prompts)
    assert bits == {
        "model.layers.0.mlp.gate_up_proj": 8,
        "model.layers.0.mlp.down_proj": 8,
        "model.layers.1.self_attn.qkv_proj": 4,
        "model.layers.1.self_attn.o_proj": 4,
        "model.layers.1.mlp.gate_up_proj": 8,
        "model.layers.1.mlp.down_proj": 8,
    }


@pytest.mark.parametrize("tp", [1, 2])
def test_gptq_quantized_lm_head(dense_dir, prompts, tmp_path, tp):
    """GPTQModel's lm_head=True: `lm_head.qweight` / `qzeros` / `scales` / `g_idx` (4-bit,
    groups of 32, act-order), multiplied as a group-quantized layer by each rank's rows of the
    padded vocabulary (qzeros packed along them); greedy tokens and log-probabilities equal
    HF on the dequantized head and layers. The embedding stays the checkpoint's dense table."""
    from tests.quantized_checkpoints import read_tensors

    options = {"bits": 4, "group_size": 32, "sym": False, "desc_act": True, "lm_head": True}
    quantized = write_gptq_checkpoint(dense_dir, str(tmp_path / "q"), **options)
    assert "lm_head.qweight" in read_tensors(quantized)
    dense = write_dequantized_checkpoint(quantized, str(tmp_path / "dense"))
    with LLM(quantized, skip_tokenizer_init=True, tensor_parallel_size=tp) as llm:
        methods = llm.apply_model(head_method_name)
        check_against_hf(llm, dense, prompts)
    assert methods == ["GroupQuantLMHeadMethod"] * tp


def head_method_name(model: torch.nn.Module) -> str:
    return type(model.lm_head.quant_method).__name__


def test_gptq_quantized_lm_head_of_a_tied_model_is_refused(checkpoints, tmp_path):
    source = checkpoints["gptq-4bit-sym-g32-v1"][0]
    target = _edited_checkpoint(source, tmp_path / "tied", lambda c: c.update(lm_head=True))
    config = json.loads((tmp_path / "tied" / "config.json").read_text())
    config["tie_word_embeddings"] = True
    (tmp_path / "tied" / "config.json").write_text(json.dumps(config))
    with pytest.raises(NotImplementedError, match=r"lm_head=True\) with tie_word_embeddings"):
        LLM(target, skip_tokenizer_init=True)


def test_gptq_dynamic_rules_ember_cannot_read_are_refused(checkpoints, tmp_path):
    source = checkpoints["gptq-4bit-sym-g32-v1"][0]
    cases = [
        (ValueError, "is not a regex", {"+:model.(": {}}),
        (ValueError, "bits must be 4 or 8, got 3", {".*mlp.*": {"bits": 3}}),
        (NotImplementedError, r"sets \['v2'\]", {".*mlp.*": {"v2": True}}),
        (TypeError, "must be a mapping", {".*mlp.*": 8}),
    ]
    for index, (error, message, dynamic) in enumerate(cases):
        target = _edited_checkpoint(
            source, tmp_path / str(index), lambda c, d=dynamic: c.update(dynamic=d)
        )
        with pytest.raises(error, match=message):
            LLM(target, skip_tokenizer_init=True)


def test_awq_modules_to_not_convert_stay_dense(checkpoints, prompts, tmp_path):
    """A module AutoAWQ left unquantized is stored as a dense `weight` and listed in
    `modules_to_not_convert`; ember loads it dense, and the fused gate|up asks both halves."""
    from tests.quantized_checkpoints import dequantize_checkpoint

    quantized, dequantized = checkpoints["awq-g32"]
    dense = dequantize_checkpoint(quantized)
    kept = ["model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"]

    def keep_dense(tensors):
        for module in kept:
            for suffix in (".qweight", ".qzeros", ".scales"):
                del tensors[module + suffix]
            tensors[module + ".weight"] = dense[module + ".weight"].half()

    target = _edited_checkpoint(
        quantized,
        tmp_path / "partly-dense",
        lambda c: c.update(
            modules_to_not_convert=["layers.1.mlp.gate_proj", "layers.1.mlp.up_proj"]
        ),
        keep_dense,
    )
    with LLM(target, skip_tokenizer_init=True) as llm:
        assert len(llm.apply_model(packed_forms)[0]) == 2 * 4 - 1  # gate_up of layer 1 dense
        check_against_hf(llm, dequantized, prompts)
    half_listed = _edited_checkpoint(
        target, tmp_path / "half", lambda c: c.update(modules_to_not_convert=["gate_proj"])
    )
    with pytest.raises(Exception, match="quantizes some of .*gate_proj.*up_proj"):
        LLM(half_listed, skip_tokenizer_init=True)


def test_fused_shards_with_different_act_orders_are_refused(checkpoints, tmp_path):
    name = "model.layers.0.self_attn.k_proj.g_idx"

    def flip(tensors):
        tensors[name] = tensors[name].flip(0).contiguous()

    source = checkpoints["gptq-4bit-act-order-g32"][0]
    target = _edited_checkpoint(source, tmp_path / "mixed", edit_tensors=flip)
    with pytest.raises(Exception, match="different values"):
        LLM(target, skip_tokenizer_init=True)


# ---- the packed forms against the reference, under each ISA -----------------------------------


def _random_groups(bits: int, rows: int, inputs: int, group_size: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    groups = 1 if group_size == -1 else inputs // group_size
    codes = torch.randint(0, 2**bits, (rows, inputs), generator=generator)
    codes[0, :4] = torch.tensor([0, 2**bits - 1, 0, 2**bits - 1])  # the extremes: -128 in 8 bits
    scales = (torch.rand(rows, groups, generator=generator) * 0.02 + 1e-3).half().float()
    zeros = torch.randint(0, 2**bits, (rows, groups), generator=generator)
    group_of_input = torch.arange(inputs) // (inputs if group_size == -1 else group_size)
    return codes, scales, zeros, group_of_input


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("layout", ["symmetric", "asymmetric", "act-order", "per-channel"])
def test_packed_groups_multiply_as_the_reference(bits, layout, cpu_isa):
    codes, scales, zeros, group_of_input = _random_groups(bits, 48, 256, 64, seed=bits)
    if layout == "symmetric":
        zeros = torch.full_like(zeros, 2 ** (bits - 1))
    elif layout == "act-order":
        group_of_input = group_of_input[
            torch.randperm(256, generator=torch.Generator().manual_seed(1))
        ]
    elif layout == "per-channel":
        codes, scales, zeros, group_of_input = _random_groups(bits, 48, 256, -1, seed=bits)
    reference = reference_dequantize(codes, scales, zeros, group_of_input)
    packed = pack_groups(codes, scales, zeros, group_of_input, bits)
    assert packed is not None
    atol = 1e-6
    if tile_matmul.available():  # 4-bit offsets in the tiles in float16; 8-bit ones beside
        assert isinstance(packed.packed, TiledWeight)
        assert (packed.offsets is None) == (layout == "symmetric" or bits == 4)
        atol = float(scales.max()) * OFFSET_ROUNDING if bits == 4 else atol
    else:  # 4-bit compact groups hold float32 offsets; 8-bit ones have none
        assert isinstance(packed.packed, QuantizedWeight)
        assert (packed.offsets is None) == (layout == "symmetric" or bits == 4)
    assert (packed.order is not None) == (layout == "act-order")
    torch.testing.assert_close(packed.dequantize(), reference, rtol=0, atol=atol)
    for rows in (1, 5, 100):  # decode batches on the codes, a prefill chunk on a dense copy
        x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(rows))
        expected = x @ reference.T
        # 15-bit activation groups on the codes; bfloat16 dense copies above 64 rows
        tolerance = 1e-3 if rows <= 64 else 1e-2
        error = (packed.matmul(x) - expected).abs().max() / expected.abs().max()
        assert error < tolerance, f"{rows} rows: relative error {error:.2e}"


def test_groups_that_do_not_fill_32_inputs_are_left_to_the_dense_form():
    codes, scales, zeros, _ = _random_groups(4, 16, 64, 16, seed=0)
    group_of_input = torch.arange(64) // 16  # groups of 16: a 32-input block holds two
    assert pack_groups(codes, scales, zeros, group_of_input, 4) is None


def test_lora_adapter_on_a_gptq_base_matches_peft_on_the_dequantized_base(
    checkpoints, prompts, tmp_path
):
    from peft import LoraConfig, PeftModel, get_peft_model

    from ember.lora.request import LoRARequest

    quantized, dequantized = checkpoints["gptq-4bit-asym-g64-v2"]
    torch.manual_seed(0)
    settings = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj", "down_proj"]}
    peft_model = get_peft_model(
        hf_model(dequantized), LoraConfig(init_lora_weights=False, **settings)
    )
    for name, param in peft_model.named_parameters():
        if "lora_" in name:
            param.data.normal_(0, 0.1)
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    reference = PeftModel.from_pretrained(hf_model(dequantized), str(tmp_path / "adapter"))
    adapter = LoRARequest("adapter", 1, str(tmp_path / "adapter"))
    with LLM(quantized, enable_lora=True, max_lora_rank=8, skip_tokenizer_init=True) as llm:
        check_against_hf(llm, reference.eval(), prompts, lora_request=adapter)


# ---- MoE experts --------------------------------------------------------------------------------

MOE_CASES = {
    "MixtralForCausalLM": ("gptq", {"bits": 4, "group_size": 32, "sym": False, "desc_act": True}),
    "Qwen3MoeForCausalLM": ("awq", {"group_size": 32}),
}


@pytest.fixture(scope="module")
def moe_checkpoints(tmp_path_factory) -> dict[str, tuple[str, str]]:
    from tests.helpers import write_random_model

    written = {}
    for architecture, (kind, options) in MOE_CASES.items():
        root = tmp_path_factory.mktemp(architecture)
        dense = write_random_model(
            root / "dense-source",
            architecture,
            hidden_size=128,
            intermediate_size=256,
            **({"moe_intermediate_size": 128} if architecture.startswith("Qwen") else {}),
        )
        writer = write_gptq_checkpoint if kind == "gptq" else write_awq_checkpoint
        quantized = writer(dense, str(root / "quantized"), **options)
        written[architecture] = (
            quantized,
            write_dequantized_checkpoint(quantized, str(root / "dense")),
        )
    return written


@pytest.mark.parametrize("tp", [1, pytest.param(2, marks=pytest.mark.slow)])
@pytest.mark.parametrize("architecture", list(MOE_CASES))
def test_moe_experts_of_a_quantized_checkpoint(architecture, tp, moe_checkpoints, prompts):
    """Every expert's gate, up and down projections are quantized (Mixtral's w1/w3/w2), and
    run as the format's linear layers. The short prompts only: routing makes the random MoE
    model sensitive (weights moved by 1e-3 of themselves move HF's log-probabilities by up to
    0.26 on the 80-token prompt), and that prompt's prefill runs on bfloat16 dense copies."""
    quantized, dequantized = moe_checkpoints[architecture]
    with LLM(quantized, tensor_parallel_size=tp, skip_tokenizer_init=True) as llm:
        forms = llm.apply_model(packed_forms)[0]
        check_against_hf(llm, dequantized, prompts[:2])
    # attention's qkv and o, then each of 4 experts' gate|up and down, in 2 layers
    assert len(forms) == 2 * (2 + 4 * 2)


# ---- checkpoints the real tools wrote -----------------------------------------------------------

TOOL_CHECKPOINTS = os.path.join(os.path.dirname(__file__), "data", "quantized")


def check_activation_quantized(
    top: dict, expected: torch.Tensor, weight_only: torch.Tensor
) -> None:
    """ember's top log-probabilities against the tool's run of a format that rounds activations
    (FP8 per token). One activation that lands a rounding step (1/16 of itself in e4m3) apart,
    because the matmul's sums came in another order (BLAS kernels differ between CPUs), moves
    everything after it: on a Sapphire Rapids CPU one of the three prompts came 0.32 at most
    and 0.10 at the median from the tool's run, the others within 0.001 (on a Zen 4, all within
    0.02). So per prompt: within twice the tolerance, and at the median nearer the tool's run
    than half its distance from the same weights without activation rounding (the weight-only
    run, 0.16-0.34 away at the median), which a loader that skips the rounding misses."""
    tokens = list(top)
    to_tool = torch.tensor([abs(top[t].logprob - expected[t].item()) for t in tokens])
    tools_apart = torch.tensor([abs(weight_only[t].item() - expected[t].item()) for t in tokens])
    assert float(to_tool.max()) <= 2 * LOGPROB_TOLERANCE, to_tool
    assert float(to_tool.median()) < 0.5 * float(tools_apart.median()), (to_tool, tools_apart)


@pytest.mark.parametrize(
    "name",
    [
        "gptq-4bit-g32-act-order",
        "gptq-8bit-g64",
        "awq-4bit-g32",
        "ct-w4a16",
        "ct-fp8-dynamic",
        "ct-fp8-block",
        "ct-fp8-kv",
        "ct-w4a16-asym-g32",
        "ct-gptq-w4a16-actorder-weight-g32",
    ],
)
def test_checkpoints_the_tools_wrote(name, tmp_path):
    """GPTQModel 7.7, AutoAWQ 0.2.9 and llm-compressor 0.14 wrote these
    (`tests/data/quantized/README.md`). ember's next-token log-probabilities after each prompt
    match the tool's own float32 run (GPTQModel's `dequantize_weight`, AutoAWQ's
    `dequantize_gemm`, transformers decompressing compressed-tensors), and its greedy
    continuations match HF on the test packer's dequantization (GPTQ, AWQ). ct-fp8-kv's KV
    scales are not used by the default cache: its reference is the tool's run without them."""
    directory = os.path.join(TOOL_CHECKPOINTS, name)
    with open(os.path.join(directory, "reference.json")) as f:
        reference = json.load(f)
    tool_logits = reference.get("fp32_dequant_prompt_last_logits", reference["prompt_last_logits"])
    tool_logits = reference.get("kv_off_prompt_last_logits", tool_logits)
    prompts = reference["prompts"]
    params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=20)
    weight_only_logits = reference.get("weight_only_prompt_last_logits")
    with LLM(directory, skip_tokenizer_init=True) as llm:
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        for index, (output, logits) in enumerate(zip(outputs, tool_logits)):
            expected = torch.log_softmax(torch.tensor(logits, dtype=torch.float32), dim=-1)
            top = output.outputs[0].logprobs[0]
            assert len(top) >= 20
            if weight_only_logits is None:
                for token, logprob in top.items():
                    assert abs(logprob.logprob - expected[token].item()) <= LOGPROB_TOLERANCE
            else:
                weight_only = torch.tensor(weight_only_logits[index], dtype=torch.float32)
                check_activation_quantized(top, expected, torch.log_softmax(weight_only, dim=-1))
        if not name.startswith("ct-"):
            dense = write_dequantized_checkpoint(directory, str(tmp_path / "dense"))
            check_against_hf(llm, dense, prompts)


def test_compressed_tensors_fp8_rounds_activations_per_token_as_llm_compressor():
    """ct-fp8-dynamic (FP8_DYNAMIC) runs as FP8 layers and matches llm-compressor's own run
    (with activation rounding) rather than the same weights without it: ember is nearer the
    former than half their distance at the median for every prompt
    (`check_activation_quantized`), so the check sees the activations' rounding, not only the
    weights'."""
    directory = os.path.join(TOOL_CHECKPOINTS, "ct-fp8-dynamic")
    with open(os.path.join(directory, "reference.json")) as f:
        reference = json.load(f)
    params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=20)
    with LLM(directory, skip_tokenizer_init=True, dtype="float32") as llm:
        assert llm.apply_model(qkv_method_name) == ["FP8LinearMethod"]
        prompts = [{"prompt_token_ids": p} for p in reference["prompts"]]
        outputs = llm.generate(prompts, params, use_tqdm=False)
    check_nearer_the_tool_run(outputs, reference, "weight_only_prompt_last_logits")


def check_nearer_the_tool_run(outputs, reference: dict, other: str) -> None:
    """`check_activation_quantized` for every prompt: ember's next-token log-probabilities
    against the tool's run (`prompt_last_logits`), nearer it than the run `other` is."""
    for output, logits, other_logits in zip(
        outputs, reference["prompt_last_logits"], reference[other], strict=True
    ):
        check_activation_quantized(
            output.outputs[0].logprobs[0],
            torch.log_softmax(torch.tensor(logits), dim=-1),
            torch.log_softmax(torch.tensor(other_logits), dim=-1),
        )


def test_compressed_tensors_zero_points_shard_over_two_ranks():
    """ct-w4a16-asym-g32 (llm-compressor, asymmetric: `weight_zero_point` packed 8 to an int32
    along the outputs) at tensor_parallel_size=2: each rank's zero points are its own rows'
    (the fused q|k|v and gate|up shards included), so the log-probabilities are the tool's as
    at TP=1."""
    directory = os.path.join(TOOL_CHECKPOINTS, "ct-w4a16-asym-g32")
    with open(os.path.join(directory, "reference.json")) as f:
        reference = json.load(f)
    params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=20)
    with LLM(directory, skip_tokenizer_init=True, tensor_parallel_size=2) as llm:
        prompts = [{"prompt_token_ids": p} for p in reference["prompts"]]
        outputs = llm.generate(prompts, params, use_tqdm=False)
    for output, logits in zip(outputs, reference["prompt_last_logits"], strict=True):
        expected = torch.log_softmax(torch.tensor(logits), dim=-1)
        for token, logprob in output.outputs[0].logprobs[0].items():
            assert abs(logprob.logprob - expected[token].item()) <= LOGPROB_TOLERANCE


def test_compressed_tensors_kv_cache_scales_llm_compressor_calibrated():
    """ct-fp8-kv: llm-compressor calibrated a static per-tensor FP8 KV cache
    (`kv_cache_scheme`, `self_attn.k_scale` / `v_scale` in float16). With
    kv_cache_dtype="fp8" ember caches e4m3 keys and values on those scales and matches the
    tool's run, in which compressed-tensors rounds keys and values the same way, rather than
    the run without that rounding (0.25-0.37 apart at the median)."""
    directory = os.path.join(TOOL_CHECKPOINTS, "ct-fp8-kv")
    with open(os.path.join(directory, "reference.json")) as f:
        reference = json.load(f)
    params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=20)
    with LLM(directory, skip_tokenizer_init=True, kv_cache_dtype="fp8") as llm:
        facts = llm.apply_model(cache_facts)[0]
        prompts = [{"prompt_token_ids": p} for p in reference["prompts"]]
        outputs = llm.generate(prompts, params, use_tqdm=False)
    file_scales = [
        [float(torch.tensor(k, dtype=torch.float16)), float(torch.tensor(v, dtype=torch.float16))]
        for k, v in _kv_scales_of(directory)
    ]
    assert [[dtype, k, v] for dtype, k, v in facts] == [
        ["torch.float8_e4m3fn", k, v] for k, v in file_scales
    ]
    check_nearer_the_tool_run(outputs, reference, "kv_off_prompt_last_logits")


def _kv_scales_of(directory: str) -> list[tuple[float, float]]:
    """Each layer's (k_scale, v_scale) as the checkpoint stores them."""
    from safetensors import safe_open

    with safe_open(os.path.join(directory, "model.safetensors"), "pt") as f:
        layers = sum(1 for name in f.keys() if name.endswith("self_attn.k_scale"))  # noqa: SIM118
        return [
            (
                float(f.get_tensor(f"model.layers.{i}.self_attn.k_scale")),
                float(f.get_tensor(f"model.layers.{i}.self_attn.v_scale")),
            )
            for i in range(layers)
        ]


def qkv_method_name(model: torch.nn.Module) -> str:
    """The linear method of the first layer's qkv_proj (run in a worker by `apply_model`)."""
    return type(model.model.layers[0].self_attn.qkv_proj.quant_method).__name__


def _edited_ct_fp8(tmp_path, weights: dict, activations: dict | str | None = None) -> str:
    """The llm-compressor FP8_DYNAMIC checkpoint with its weights (and activations) settings
    edited; activations "none": weight-only."""
    directory = tmp_path / "ct-fp8-edited"
    shutil.copytree(os.path.join(TOOL_CHECKPOINTS, "ct-fp8-dynamic"), directory)
    config = json.loads((directory / "config.json").read_text())
    group = config["quantization_config"]["config_groups"]["group_0"]
    group["weights"].update(weights)
    if activations == "none":
        group["input_activations"] = None
    else:
        group["input_activations"].update(activations or {})
    (directory / "config.json").write_text(json.dumps(config))
    return str(directory)


def test_compressed_tensors_schemes_not_read_yet_are_refused_naming_them(tmp_path):
    directory = _edited_ct_fp8(tmp_path, {"strategy": "group", "group_size": 128})
    with pytest.raises(NotImplementedError, match="weights.strategy='group'"):
        LLM(directory, skip_tokenizer_init=True)


def _ct_group_order_checkpoint(target) -> tuple[str, str]:
    """(checkpoint, dense reference) in older llm-compressor's `actorder: "group"` layout,
    made from the tool's positional checkpoint: each quantized layer's inputs permuted by one
    seeded order per input (q/k/v share one, gate/up one, as GPTQ's act-order gives them),
    `weight_g_idx` the group each permuted input came from. The reference holds w[n, k] =
    scale[n, g_idx[k]] * (q[n, k] - 8) in float32."""
    from tests.quantized_checkpoints import pack_int32, read_tensors, unpack_int32

    source = os.path.join(TOOL_CHECKPOINTS, "ct-gptq-w4a16-actorder-weight-g32")
    quantized, dense = target / "quantized", target / "dense"
    shutil.copytree(source, quantized)
    shutil.copytree(source, dense)
    config = json.loads((quantized / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["weights"]["actorder"] = "group"
    (quantized / "config.json").write_text(json.dumps(config))
    del config["quantization_config"]
    config["dtype"] = "float32"
    (dense / "config.json").write_text(json.dumps(config))
    tensors, reference = read_tensors(source), {}
    generator, orders = torch.Generator().manual_seed(5), {}
    for name in [n for n in tensors if n.endswith(".weight_packed")]:
        module = name[: -len(".weight_packed")]
        codes = unpack_int32(tensors.pop(name), 4, dim=1)  # [N, K] unsigned
        scales = tensors.pop(f"{module}.weight_scale")
        key = module.rsplit(".", 1)[0] + module.rsplit(".", 1)[1].replace("k_", "q_").replace(
            "v_", "q_"
        ).replace("up_", "gate_")
        if key not in orders:
            orders[key] = torch.randperm(codes.shape[1], generator=generator)
        order = orders[key]
        codes, g_idx = codes[:, order], order // 32
        tensors[name] = pack_int32(codes, 4, dim=1)
        tensors[f"{module}.weight_scale"] = scales
        tensors[f"{module}.weight_g_idx"] = g_idx.to(torch.int32)
        weight = scales.float()[:, g_idx] * (codes.float() - 8)
        reference[f"{module}.weight"] = weight
    save_file(tensors, str(quantized / "model.safetensors"))
    rest = read_tensors(source)
    for name, tensor in rest.items():
        if not name.rsplit(".", 1)[1].startswith("weight_") and name not in reference:
            reference[name] = tensor.float()
    save_file(reference, str(dense / "model.safetensors"))
    return str(quantized), str(dense)


@pytest.mark.parametrize("tp", [1, 2])
def test_compressed_tensors_group_act_order_reads_weight_g_idx(prompts, tmp_path, tp):
    """actorder "group" (older llm-compressor): `weight_g_idx` gives each input's group, any
    rank's inputs may be in any group (each rank holds all scales); greedy tokens and their
    log-probabilities equal HF on the dequantized weights at TP=1 and 2."""
    quantized, dense = _ct_group_order_checkpoint(tmp_path)
    with LLM(quantized, skip_tokenizer_init=True, tensor_parallel_size=tp) as llm:
        forms = llm.apply_model(packed_forms)[0]
        check_against_hf(llm, dense, prompts)
    # the inputs sorted by group at load; at TP=2 a row-parallel shard's inputs come from
    # every group, which the packed forms do not take: those run dense
    assert sum(form.endswith("+order") for form in forms) == (8 if tp == 1 else 4), forms


@pytest.mark.parametrize(
    "weights, activations, error, message",
    [
        ({"strategy": "block"}, None, ValueError, "block_structure must be two positive"),
        (
            {"strategy": "block", "block_structure": [128, 128]},
            {"strategy": "group", "group_size": 64},
            NotImplementedError,
            "group_size=64 with weight blocks of 128 inputs",
        ),
        (  # blocks take per-group activations, not per-token ones
            {"strategy": "block", "block_structure": [128, 128]},
            None,
            NotImplementedError,
            r"input_activations \(type, num_bits, strategy, dynamic\)=\('float', 8, 'token'",
        ),
        (
            {"strategy": "block", "block_structure": [128, 128]},
            "none",
            NotImplementedError,
            "weight-only FP8 \\(no input_activations\\) with weights.strategy='block'",
        ),
    ],
    ids=["no-block-structure", "group-not-block-width", "token-activations", "weight-only"],
)
def test_compressed_tensors_fp8_blocks_that_ember_cannot_read_are_refused(
    tmp_path, weights, activations, error, message
):
    with pytest.raises(error, match=message):
        LLM(_edited_ct_fp8(tmp_path, weights, activations), skip_tokenizer_init=True)
