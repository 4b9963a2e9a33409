"""FP8 checkpoints and FP8 at load (#20, FP8 part): every checkpoint layout (per tensor static or
dynamic, per channel, 128x128 blocks) and online FP8 against Hugging Face on the reference-
dequantized weights with vLLM's activation quantization reproduced by hooks, layer by layer and
over the whole model, at TP=1 and at TP=2 (two ranks in threads), the checkpoints against
transformers' own FP8 quantizer and loader, and the errors.

The checkpoints are written by `tests/fp8_checkpoints.py` (AutoFP8's and DeepSeek / transformers'
layouts). The models are built in-process with `get_model`, and through `LLM` at the end.

Tolerance. Layer by layer ember computes what the oracle computes (the same e4m3 activations
times the same dequantized weights, float32): outputs agree to float32 rounding. Over a model
they agree so at most positions, but activation quantization is a step function: where a value
that float32 summation order moved by an ulp (ember batches the prompts and prefills them in two
chunks, HF runs each whole) lies on an e4m3 rounding boundary, it moves by one e4m3 step (up to
2^-3 of it); this wide random model (logits of ~12) carries that to the log-probabilities of its
position and, through its keys and values, of the later ones of its prompt: up to 0.5 measured
against HF, 1.6 between ember on an H200 and on the CPU, at 0-20% of the positions. So the
check is: at least `MIN_EXACT_SHARE` of the positions agree within `FLOAT32_LOGPROB`, every one
within `STEP_LOGPROB`; and, so that it has teeth, HF without the activation quantization
(weights alone: 2 to 9 apart) agrees within `FLOAT32_LOGPROB` at almost none. A wrong scale or
a layer left unquantized moves most positions by more than that.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import threading
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ember.workers.config import ModelConfig
from ember.workers.distributed import SINGLE_RANK, ParallelContext
from ember.workers.layers.context import ModelContext
from ember.workers.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from ember.workers.layers.quantization.fp8 import (
    FP8_DTYPE,
    FP8Config,
    FP8LinearMethod,
    quantize_dequantize_activations,
)
from ember.workers.model_loader import loader
from ember.workers.quantization_settings import check_tensor_parallel_blocks, fp8_settings
from tests.fp8_checkpoints import (
    activation_quantization,
    dequantize_fp8_checkpoint,
    linear_modules,
    online_fp8_weights,
    quantize_activations_in,
    quantize_blocks,
    reference_activation_quantization,
    write_dequantized_checkpoint,
    write_fp8_checkpoint,
)
from tests.helpers import forward_prompts, random_prompts, write_random_llama

CPU = torch.device("cpu")
DTYPES_BY_NAME = {"float32": torch.float32, "bfloat16": torch.bfloat16}
FLOAT32_LOGPROB = 1e-4
MIN_EXACT_SHARE = 0.5
STEP_LOGPROB = 2.0
VOCAB = 512

CASES = {
    "per-tensor-dynamic": ("per-tensor", "dynamic"),
    "per-tensor-static": ("per-tensor", "static"),
    "per-channel-dynamic": ("per-channel", "dynamic"),
    "per-channel-static": ("per-channel", "static"),
    "block-dynamic": ("block", "dynamic"),
    "ct-block-dynamic": ("block", "dynamic"),  # compressed-tensors' FP8_BLOCK layout
}
LAYOUTS = {"ct-block-dynamic": "compressed-tensors"}
# head_dim 128: q 512 rows, k and v 256, so that 128-row blocks fit each module at TP=1 and 2
MODEL = {
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 128,
}


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory) -> str:
    return write_random_llama(tmp_path_factory.mktemp("dense"), **MODEL)


@pytest.fixture(scope="module")
def checkpoints(dense_dir, tmp_path_factory) -> dict[str, tuple[str, str]]:
    """(FP8 directory, dequantized float32 directory) of each case, written once."""
    written = {}
    for name, (scheme, activations) in CASES.items():
        root = tmp_path_factory.mktemp(name)
        quantized = write_fp8_checkpoint(
            dense_dir,
            str(root / "fp8"),
            scheme=scheme,
            activation_scheme=activations,
            layout=LAYOUTS.get(name, "fp8"),
        )
        written[name] = (quantized, write_dequantized_checkpoint(quantized, str(root / "dense")))
    return written


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    return random_prompts(4, VOCAB, [9, 30, 4, 40], seed=5)


def model_config(model_dir: str, dtype: str = "float32") -> ModelConfig:
    with open(f"{model_dir}/config.json") as f:
        settings = json.load(f).get("quantization_config") or {}
    return ModelConfig(
        model=model_dir,
        model_dir=model_dir,
        architecture="LlamaForCausalLM",
        dtype=dtype,
        max_model_len=512,
        vocab_size=VOCAB,
        eos_token_ids=(2,),
        quantization=settings.get("quant_method", "fp8"),  # a dense directory: online FP8
    )


def load(model_dir: str, parallel: ParallelContext = SINGLE_RANK, dtype: str = "float32"):
    return loader.get_model(model_config(model_dir, dtype), CPU, parallel)


def hf_model(model_dir: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def hf_logprobs(model: torch.nn.Module, prompts: list[list[int]]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(torch.tensor([p])).logits[0].log_softmax(-1) for p in prompts]


def position_errors(ours: list[torch.Tensor], reference: list[torch.Tensor]) -> torch.Tensor:
    """The largest log-probability difference at each position of every prompt."""
    return torch.cat(
        [(a.log_softmax(-1) - b).abs().amax(-1) for a, b in zip(ours, reference, strict=True)]
    )


def assert_matches_oracle(ours, oracle, weights_only) -> None:
    """See the module's tolerance."""
    errors = position_errors(ours, oracle)
    exact = (errors <= FLOAT32_LOGPROB).float().mean().item()
    assert exact >= MIN_EXACT_SHARE, f"{exact:.0%} of positions within {FLOAT32_LOGPROB}"
    assert errors.max().item() <= STEP_LOGPROB, f"a position differs by {errors.max():.3f}"
    without = (position_errors(ours, weights_only) <= FLOAT32_LOGPROB).float().mean().item()
    assert without < 0.1, f"{without:.0%} of positions agree without activation quantization"


def fp8_oracle(
    quant_dir: str, dequantized_dir: str, prompts, tp_size: int = 1
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(HF's log-probabilities with vLLM's activation quantization, without it)."""
    model = hf_model(dequantized_dir)
    weights_only = hf_logprobs(model, prompts)
    quantize_activations_in(model, activation_quantization(quant_dir, tp_size))
    return hf_logprobs(model, prompts), weights_only


# ---- the checkpoints against transformers -------------------------------------------------------


def test_block_writer_quantizes_as_transformers_fp8_quantizer(dense_dir):
    import types

    from transformers.integrations.finegrained_fp8 import Fp8Quantize
    from transformers.utils.quantization_config import FineGrainedFP8Config

    hf_quantizer = types.SimpleNamespace(quantization_config=FineGrainedFP8Config())
    tensors = load_file(f"{dense_dir}/model.safetensors")
    for name in ("model.layers.0.self_attn.k_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        expected = Fp8Quantize(hf_quantizer)._quantize_one(name, tensors[name])
        codes, scale = quantize_blocks(tensors[name], (128, 128))
        assert torch.equal(codes.view(torch.uint8), expected[name].view(torch.uint8))
        assert torch.equal(scale, expected[name.replace(".weight", ".weight_scale_inv")])


def test_transformers_dequantizes_the_block_checkpoint_as_the_oracle(checkpoints):
    """transformers loads a block-wise FP8 checkpoint on a CPU by dequantizing it."""
    quant_dir = checkpoints["block-dynamic"][0]
    state = hf_model(quant_dir).state_dict()
    reference = dequantize_fp8_checkpoint(quant_dir)
    assert set(reference) <= set(state)
    for name, tensor in reference.items():
        assert torch.equal(state[name], tensor.float()), name


def test_checkpoints_hold_what_the_tools_write(checkpoints):
    per_tensor = load_file(f"{checkpoints['per-tensor-static'][0]}/model.safetensors")
    module = "model.layers.0.self_attn.q_proj"
    assert per_tensor[f"{module}.weight"].dtype == FP8_DTYPE
    assert per_tensor[f"{module}.weight_scale"].shape == ()
    assert per_tensor[f"{module}.input_scale"].shape == ()
    block = load_file(f"{checkpoints['block-dynamic'][0]}/model.safetensors")
    assert block[f"{module}.weight_scale_inv"].shape == (4, 2)  # [512 / 128, 256 / 128]
    with open(f"{checkpoints['block-dynamic'][0]}/config.json") as f:
        config = json.load(f)
    assert config["quantization_config"] == {
        "quant_method": "fp8",
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "weight_block_size": [128, 128],
    }


# ---- layers, one by one, on the inputs HF's model gives them ------------------------------------


# ember's linears of a decoder layer: (parent, name, the checkpoint modules it fuses)
LAYER_LINEARS = (
    ("self_attn", "qkv_proj", ("q_proj", "k_proj", "v_proj")),
    ("self_attn", "o_proj", ("o_proj",)),
    ("mlp", "gate_up_proj", ("gate_proj", "up_proj")),
    ("mlp", "down_proj", ("down_proj",)),
)


@pytest.mark.parametrize("case", list(CASES))
def test_each_layer_computes_as_the_oracle_on_hf_inputs(case, checkpoints, prompts):
    quant_dir, dequantized_dir = checkpoints[case]
    model = load(quant_dir)
    reference = hf_model(dequantized_dir)
    inputs, outputs = {}, {}
    for name in linear_modules(dequantized_dir):
        module = reference.get_submodule(name)
        module.register_forward_pre_hook(lambda m, a, name=name: inputs.setdefault(name, a[0]))
        module.register_forward_hook(lambda m, a, o, name=name: outputs.setdefault(name, o))
    quantize_activations_in(reference, activation_quantization(quant_dir))  # after: sees x raw
    with torch.no_grad():
        reference(torch.tensor([prompts[1]]))
    for index, layer in enumerate(model.model.layers):
        for parent, fused, parts in LAYER_LINEARS:
            names = [f"model.layers.{index}.{parent}.{part}" for part in parts]
            ours = getattr(getattr(layer, parent), fused)
            assert isinstance(ours.quant_method, FP8LinearMethod)
            with torch.no_grad():
                got = ours(inputs[names[0]][0])
            expected = torch.cat([outputs[name][0] for name in names], dim=-1)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max())


def test_processed_layers_hold_the_dense_weight_in_the_model_dtype(checkpoints):
    model = load(checkpoints["per-tensor-static"][0], dtype="bfloat16")
    qkv = model.model.layers[0].self_attn.qkv_proj
    params = dict(qkv.named_parameters())
    assert set(params) == {"weight", "input_scale"}
    assert qkv.weight.dtype == torch.bfloat16
    reference = dequantize_fp8_checkpoint(checkpoints["per-tensor-static"][0])
    expected = torch.cat(
        [reference[f"model.layers.0.self_attn.{p}_proj.weight"] for p in "qkv"]
    ).bfloat16()
    assert torch.equal(qkv.weight, expected)


# ---- the whole model -----------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_checkpoint_logits_match_hf_with_vllm_activation_quantization(case, checkpoints, prompts):
    quant_dir, dequantized_dir = checkpoints[case]
    ours = forward_prompts(load(quant_dir), prompts)
    assert_matches_oracle(ours, *fp8_oracle(quant_dir, dequantized_dir, prompts))


@pytest.mark.parametrize("scheme", ["per-channel", "per-tensor"])
def test_weight_only_fp8_matches_hf_on_the_dequantized_weights(
    scheme, dense_dir, prompts, tmp_path
):
    """compressed-tensors FP8 weights without input_activations (vLLM's W8A16 FP8): the
    activations are not quantized, so ember's logits are HF's on the dequantized weights to
    float32 rounding at every position; with vLLM's per-token activation quantization HF
    differs (teeth)."""
    quant_dir = write_fp8_checkpoint(
        dense_dir,
        str(tmp_path / "fp8"),
        scheme=scheme,
        activation_scheme="none",
        layout="compressed-tensors",
    )
    dequantized_dir = write_dequantized_checkpoint(quant_dir, str(tmp_path / "dense"))
    model = load(quant_dir)
    qkv = model.model.layers[0].self_attn.qkv_proj
    assert isinstance(qkv.quant_method, FP8LinearMethod) and qkv.quant_method.weight_only
    ours = forward_prompts(model, prompts)
    reference = hf_model(dequantized_dir)
    errors = position_errors(ours, hf_logprobs(reference, prompts))
    assert errors.max().item() <= FLOAT32_LOGPROB, errors.max()
    per_token = {module: {"group_size": None, "splits": 1} for module in linear_modules(quant_dir)}
    quantize_activations_in(reference, per_token)
    assert (
        position_errors(ours, hf_logprobs(reference, prompts)).max().item() > 10 * FLOAT32_LOGPROB
    )


def test_bfloat16_model_is_as_close_to_the_oracle_as_hf_in_bfloat16(checkpoints, prompts):
    """bfloat16 rounds the dequantized weights and the activations x_q * s: compared, as
    test_model_loading does for dense models, with HF in bfloat16 under the same hooks."""
    from transformers import AutoModelForCausalLM

    quant_dir, dequantized_dir = checkpoints["block-dynamic"]
    ours = forward_prompts(load(quant_dir, dtype="bfloat16"), prompts)
    oracle, _ = fp8_oracle(quant_dir, dequantized_dir, prompts)
    hf_half = AutoModelForCausalLM.from_pretrained(dequantized_dir, dtype=torch.bfloat16).eval()
    quantize_activations_in(hf_half, activation_quantization(quant_dir))
    theirs = [logits.float() for logits in hf_logprobs(hf_half, prompts)]
    ours_error = position_errors([logits.float() for logits in ours], oracle).max().item()
    hf_error = position_errors(theirs, oracle).max().item()
    assert ours_error <= max(2 * hf_error, 0.05), (ours_error, hf_error)


def test_online_fp8_matches_hf_on_per_tensor_rounded_weights(dense_dir, prompts, tmp_path):
    model = load(dense_dir)
    qkv = model.model.layers[0].self_attn.qkv_proj
    assert isinstance(qkv.quant_method, FP8LinearMethod) and qkv.weight.dtype == torch.float32
    ours = forward_prompts(model, prompts)
    rounded = online_fp8_weights(dense_dir, str(tmp_path / "rounded"))
    reference = hf_model(rounded)
    weights_only = hf_logprobs(reference, prompts)
    options = {name: {"group_size": None} for name in linear_modules(dense_dir)}
    quantize_activations_in(reference, options)
    assert_matches_oracle(ours, hf_logprobs(reference, prompts), weights_only)
    # the fused q|k|v has one scale, amax / 448 of all three
    rounded_tensors = load_file(f"{rounded}/model.safetensors")
    parts = [rounded_tensors[f"model.layers.0.self_attn.{p}_proj.weight"] for p in "qkv"]
    assert torch.equal(qkv.weight, torch.cat(parts))


def test_ignored_layers_stay_dense(dense_dir, prompts, tmp_path):
    kept = ("model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj")
    quant_dir = write_fp8_checkpoint(dense_dir, str(tmp_path / "fp8"), ignored_layers=kept)
    dequantized_dir = write_dequantized_checkpoint(quant_dir, str(tmp_path / "dense"))
    model = load(quant_dir)
    gate_up = model.model.layers[1].mlp.gate_up_proj
    assert not isinstance(gate_up.quant_method, FP8LinearMethod)
    dense = load_file(f"{dense_dir}/model.safetensors")
    expected = torch.cat([dense[f"{name}.weight"] for name in kept])
    assert torch.equal(gate_up.weight, expected)
    ours = forward_prompts(model, prompts)
    assert_matches_oracle(ours, *fp8_oracle(quant_dir, dequantized_dir, prompts))
    # vLLM's rule is the full module name: a part of it matches nothing
    config = FP8Config({"activation_scheme": "dynamic", "ignored_layers": ["gate_proj"]})
    assert not config.is_layer_skipped("model.layers.1.mlp.gate_proj")
    half = _edited(quant_dir, tmp_path / "half", {"ignored_layers": [kept[0]]})
    with pytest.raises(ValueError, match="quantizes some of .*gate_proj.*up_proj"):
        load(half)


def test_modules_to_not_convert_is_read_when_there_is_no_ignored_layers():
    config = FP8Config({"activation_scheme": "dynamic", "modules_to_not_convert": ["m.x_proj"]})
    assert config.is_layer_skipped("m.x_proj")


def test_static_input_scale_of_a_fused_layer_is_the_largest_of_its_modules(checkpoints, tmp_path):
    source = checkpoints["per-tensor-static"][0]
    tensors = load_file(f"{source}/model.safetensors")
    name = "model.layers.0.self_attn.k_proj.input_scale"
    tensors[name] = tensors[name] * 3
    target = tmp_path / "k-larger"
    shutil.copytree(source, target)
    save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})
    model = load(str(target))
    assert torch.equal(model.model.layers[0].self_attn.qkv_proj.input_scale, tensors[name])
    assert activation_quantization(str(target))["model.layers.0.self_attn.q_proj"] == {
        "input_scale": float(tensors[name])
    }


# ---- tensor parallelism --------------------------------------------------------------------------


def _rank_slice(tensor: torch.Tensor, index: int, parts: int, dim: int) -> torch.Tensor:
    return tensor.chunk(parts, dim=dim)[index]


@pytest.mark.parametrize("tp_size", [2, 4])  # at 4 ranks each of the 2 KV heads is on two
@pytest.mark.parametrize("case", list(CASES))
def test_tensor_parallel_shards_are_the_reference_slices(case, tp_size, checkpoints):
    quant_dir = checkpoints[case][0]
    weights = dequantize_fp8_checkpoint(quant_dir)
    tensors = load_file(f"{quant_dir}/model.safetensors")
    kv_heads = MODEL["num_key_value_heads"]
    for rank in range(tp_size):
        model = load(quant_dir, ParallelContext(rank=rank, world_size=tp_size))
        replicas = max(tp_size // kv_heads, 1)
        kv_index, kv_parts = rank // replicas, tp_size // replicas
        for index, layer in enumerate(model.model.layers):
            w = {
                name.rpartition(".")[2]: weights[f"model.layers.{index}.{name}.weight"]
                for name in linear_modules_of_layer()
            }
            attention, mlp = layer.self_attn, layer.mlp
            qkv = [_rank_slice(w["q_proj"], rank, tp_size, 0)] + [
                _rank_slice(w[f"{p}_proj"], kv_index, kv_parts, 0) for p in "kv"
            ]
            assert torch.equal(attention.qkv_proj.weight, torch.cat(qkv))
            assert torch.equal(attention.o_proj.weight, _rank_slice(w["o_proj"], rank, tp_size, 1))
            gate_up = [_rank_slice(w[f"{p}_proj"], rank, tp_size, 0) for p in ("gate", "up")]
            assert torch.equal(mlp.gate_up_proj.weight, torch.cat(gate_up))
            assert torch.equal(mlp.down_proj.weight, _rank_slice(w["down_proj"], rank, tp_size, 1))
            if CASES[case][1] == "static":
                prefix = f"model.layers.{index}.self_attn"
                scales = [tensors[f"{prefix}.{p}_proj.input_scale"] for p in "qkv"]
                assert torch.equal(attention.qkv_proj.input_scale, torch.stack(scales).max())


def linear_modules_of_layer() -> list[str]:
    """The checkpoint modules of one decoder layer, relative to it ("self_attn.q_proj", ...)."""
    return [f"{parent}.{part}" for parent, _, parts in LAYER_LINEARS for part in parts]


class _ThreadRank(ParallelContext):
    """One of `world_size` ranks run as threads of this process: the collectives meet at a
    barrier and every rank sums (gathers) the parts in rank order."""

    def __init__(self, rank: int, world_size: int, hub: dict):
        super().__init__(rank=rank, world_size=world_size)
        object.__setattr__(self, "hub", hub)

    def _exchange(self, x: torch.Tensor) -> list[torch.Tensor]:
        self.hub["parts"][self.rank] = x.clone()
        self.hub["barrier"].wait()
        parts = list(self.hub["parts"])
        self.hub["barrier"].wait()
        return parts

    def all_reduce(self, x):
        parts = self._exchange(x)
        return x.copy_(sum(parts[1:], parts[0]))

    def all_gather(self, x, dim=-1):
        return torch.cat(self._exchange(x), dim=dim)

    def gather(self, x, dim=-1):  # every rank gets it (the test reads rank 0's)
        return self.all_gather(x, dim)

    def broadcast(self, x):
        return x.copy_(self._exchange(x)[0])


def forward_at_tp2(
    quant_dir: str, prompts, config: ModelConfig | None = None
) -> list[torch.Tensor]:
    hub = {"parts": [None, None], "barrier": threading.Barrier(2, timeout=120)}
    config = config or model_config(quant_dir)
    models = [loader.get_model(config, CPU, _ThreadRank(rank, 2, hub)) for rank in range(2)]
    results: dict[int, object] = {}

    def run(rank):
        try:
            results[rank] = forward_prompts(models[rank], prompts)
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            hub["barrier"].abort()
            results[rank] = exc

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for result in results.values():
        if isinstance(result, BaseException):
            raise result
    return results[0]


@pytest.mark.parametrize("case", ["per-tensor-dynamic", "per-channel-static", "block-dynamic"])
def test_tp2_logits_match_hf_with_each_ranks_activation_scales(case, checkpoints, prompts):
    """A row-parallel rank quantizes its slice of the inputs (o_proj, down_proj): dynamic
    per-token scales are then per rank, as in vLLM; the oracle quantizes the slices apart."""
    quant_dir, dequantized_dir = checkpoints[case]
    ours = forward_at_tp2(quant_dir, prompts)
    assert_matches_oracle(ours, *fp8_oracle(quant_dir, dequantized_dir, prompts, tp_size=2))
    if case == "per-tensor-dynamic":  # the slices matter: one scale a row fits less well
        whole, _ = fp8_oracle(quant_dir, dequantized_dir, prompts, tp_size=1)
        errors = position_errors(ours, whole)
        assert (errors <= FLOAT32_LOGPROB).float().mean().item() < 0.1


# ---- activation quantization, the numbers -------------------------------------------------------


@pytest.mark.parametrize(
    "options", [{"input_scale": 0.02}, {"group_size": None}, {"group_size": 128}]
)
def test_activation_quantization_is_vllms(options):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(7, 256, generator=generator) * 3
    x[2] = 0  # an all-zero token takes the smallest scale
    x[3, :5] = torch.tensor([1e4, -1e4, 1e-9, 0.0, 5.0])  # saturation under a static scale
    scale = options.get("input_scale")
    ours = quantize_dequantize_activations(
        x, None if scale is None else torch.tensor(scale), options.get("group_size")
    )
    assert torch.equal(ours, reference_activation_quantization(x, **options))
    steps = ours / (ours.abs().amax(-1, keepdim=True).clamp(min=1e-30) / 448)
    if "group_size" in options and options["group_size"] is None:  # each token's e4m3 grid
        torch.testing.assert_close(steps.to(FP8_DTYPE).float(), steps, rtol=1e-6, atol=1e-6)
    if scale is not None:
        assert ours.abs().max().item() == pytest.approx(448 * scale)


# ---- the FP8 GEMM (kernels/fp8_matmul.py, kernels/fp8_matmul_triton.py) -----------------------

# Without a GPU the Triton kernel runs in Triton's interpreter (TRITON_INTERPRET=1, set by
# tests/conftest.py), which cannot load float8 tensors: the kernel takes the codes as uint8
# and bitcasts them. N = 48 and K = 80 are not multiples of the tiles; 16 x 32 blocks make a
# last partial group of inputs. Both sides add exact e4m3 products in float32 and scale them
# in another order, so they agree to float32 rounding (~3e-7 of the largest output
# measured); on a GPU, FP8 tensor cores (`fp8_dot`) add less exactly (~2e-4 on an H200).
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KERNEL_SHAPE = (48, 80)  # (N, K)
KERNEL_BLOCK = (16, 32)
EXACT = 1e-5  # of the largest output
# on a GPU: fp16 tensor cores add the exact products in float32, not necessarily rounding each
# sum as IEEE does; FP8 ones keep fewer bits (2.2e-4 measured: torch._scaled_mm, per tensor,
# H200)
CUDA_EXACT = 1e-4
FP8_TENSOR_CORES = 1e-3


@pytest.fixture(scope="module")
def fp8_triton():
    import importlib.util
    import os

    if importlib.util.find_spec("triton") is None:
        pytest.fail("triton is not installed (make setup installs it)")
    if KERNEL_DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.fail("without a GPU the kernel needs TRITON_INTERPRET=1 (set in tests/conftest.py)")
    from ember.kernels import fp8_matmul_triton

    return fp8_matmul_triton


def kernel_case(layout: str, tokens: int, seed: int = 0):
    """(x [tokens, K], FP8Weight) on KERNEL_DEVICE: random, a few outliers in x."""
    from ember.kernels.fp8_matmul import quantize_weight

    generator = torch.Generator().manual_seed(seed)
    outputs, inputs = KERNEL_SHAPE
    weight = torch.randn(outputs, inputs, generator=generator) * 0.05
    weight[:, 7] *= 20  # a column of large weights: other rows' and blocks' scales differ
    x = torch.randn(tokens, inputs, generator=generator) * 2
    x[0, 3] = 40.0
    fp8_weight = quantize_weight(weight.to(KERNEL_DEVICE), layout, KERNEL_BLOCK)
    return x.to(KERNEL_DEVICE), fp8_weight


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).abs().max() / expected.abs().max()).item()


@pytest.mark.parametrize("fp8_dot", [False, True], ids=["fp16-widened", "fp8-dot"])
@pytest.mark.parametrize("tokens", [1, 5, 33])
@pytest.mark.parametrize(  # block-wise checkpoints are dynamic only
    "layout, activations",
    [("tensor", "static"), ("tensor", "dynamic"), ("row", "static"), ("row", "dynamic"),
     ("block", "dynamic")],
)  # fmt: skip
def test_fp8_triton_kernel_matches_the_emulation(fp8_triton, layout, tokens, activations, fp8_dot):
    from ember.kernels.fp8_matmul import (
        fp8_linear_torch,
        has_fp8_tensor_cores,
        quantize_activations,
    )

    if fp8_dot and KERNEL_DEVICE == "cuda" and not has_fp8_tensor_cores(torch.device("cuda")):
        pytest.skip("FP8 tensor cores need sm_89+")
    x, weight = kernel_case(layout, tokens)
    input_scale = torch.tensor(0.02, device=x.device) if activations == "static" else None
    expected = fp8_linear_torch(x, weight, input_scale)
    codes, scales = quantize_activations(x, input_scale, weight.group_k)
    tolerance = EXACT
    if KERNEL_DEVICE == "cuda":
        tolerance = FP8_TENSOR_CORES if fp8_dot else CUDA_EXACT
    configs = [None, fp8_triton.BlockConfig(16, 16, 32, split_k=2)]  # default; small, split K
    for config in configs:
        out = fp8_triton.fp8_matmul_triton(
            codes, scales, weight, torch.float32, fp8_dot=fp8_dot, config=config
        )
        assert out.shape == (tokens, KERNEL_SHAPE[0]) and out.dtype == torch.float32
        assert relative_error(out, expected) < tolerance, (config, relative_error(out, expected))


def test_fp8_triton_kernel_writes_bfloat16(fp8_triton):
    from ember.kernels.fp8_matmul import fp8_linear_torch, quantize_activations

    x, weight = kernel_case("block", 5)
    expected = fp8_linear_torch(x, weight)
    codes, scales = quantize_activations(x, None, weight.group_k)
    out = fp8_triton.fp8_matmul_triton(codes, scales, weight, torch.bfloat16, fp8_dot=False)
    assert out.dtype == torch.bfloat16
    assert relative_error(out, expected) < 1e-2  # bfloat16's rounding (truncation, interpreted)


def test_fp8_triton_kernel_widens_every_e4m3_code_exactly(fp8_triton):
    """`_e4m3_bits_to_fp16` moves the bits: every finite code, subnormals included, exactly
    (times 2^16, the two operands' 2^8)."""
    from ember.kernels.fp8_matmul import FP8Weight

    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(FP8_DTYPE)
    finite = codes[~codes.float().isnan()].to(KERNEL_DEVICE)  # 0x7f, 0xff: NaN, never quantized
    ones = torch.ones(finite.numel(), 1, device=KERNEL_DEVICE)
    one = torch.ones(1, 1, device=KERNEL_DEVICE).to(FP8_DTYPE)
    weight = FP8Weight(finite.view(-1, 1), ones, one_scale=True)  # each code its own row
    unit = torch.tensor(1.0, device=KERNEL_DEVICE)
    out = fp8_triton.fp8_matmul_triton(one, unit, weight, torch.float32, fp8_dot=False)
    assert torch.equal(out.view(-1).cpu(), finite.float().cpu())


def test_fp8_triton_kernel_is_wrong_when_a_scale_is():
    """The comparison has teeth: one row's scale doubled moves its outputs far past EXACT."""
    from ember.kernels.fp8_matmul import FP8Weight, fp8_linear_torch

    x, weight = kernel_case("row", 5)
    scales = weight.scales.clone()
    scales[3] *= 2
    broken = FP8Weight(weight.codes, scales)
    assert relative_error(fp8_linear_torch(x, broken), fp8_linear_torch(x, weight)) > 100 * EXACT


def test_activation_codes_and_scales_are_the_emulations():
    from ember.kernels.fp8_matmul import dequantize_activations, quantize_activations

    generator = torch.Generator().manual_seed(1)
    x = torch.randn(6, 80, generator=generator) * 3
    x[1] = 0
    for input_scale, group_size, shape in [
        (torch.tensor(0.02), None, ()),
        (None, None, (6, 1)),
        (None, 32, (6, 3)),  # 80 inputs: groups of 32, 32 and 16
    ]:
        codes, scales = quantize_activations(x, input_scale, group_size)
        assert codes.dtype == FP8_DTYPE and codes.shape == x.shape and scales.shape == shape
        expected = quantize_dequantize_activations(x, input_scale, group_size)
        assert torch.equal(dequantize_activations(codes, scales, group_size), expected)


@pytest.mark.parametrize("layout", ["tensor", "row", "block"])
def test_quantized_weights_of_each_layout_dequantize_within_an_e4m3_step(layout):
    from ember.kernels.fp8_matmul import quantize_weight

    generator = torch.Generator().manual_seed(2)
    dense = torch.randn(40, 72, generator=generator)
    weight = quantize_weight(dense, layout, (16, 32))
    groups = {"tensor": 1, "row": 1, "block": 3}[layout]
    assert weight.codes.dtype == FP8_DTYPE and weight.scales.shape == (40, groups)
    assert weight.one_scale == (layout == "tensor")
    # half an e4m3 step (2^-4 of a value) of the largest value a scale covers
    bound = weight.scales.repeat_interleave(weight.group_k or 72, dim=1)[:, :72] * 448 / 16
    assert ((weight.dequantize() - dense).abs() <= bound).all()


def test_fp8_matmul_of_cpu_tensors_is_the_reference():
    from ember.kernels.fp8_matmul import fp8_linear, fp8_linear_torch, quantize_weight

    generator = torch.Generator().manual_seed(3)
    weight = quantize_weight(torch.randn(48, 80, generator=generator), "block", (16, 32))
    x = torch.randn(2, 3, 80, generator=generator)
    out = fp8_linear(x, weight)
    assert out.shape == (2, 3, 48)
    assert torch.equal(out, fp8_linear_torch(x, weight))


def _keep_float8_on_cpu(monkeypatch) -> None:
    """Layers processed as on CUDA (e4m3 weight, per-row scales, `fp8_linear`), on the CPU."""

    def keep(self, layer):
        self._keep_float8(layer)

    monkeypatch.setattr(FP8LinearMethod, "process_weights_after_loading", keep)


@pytest.mark.parametrize("case", [*CASES, "online"])
def test_layers_in_the_cuda_form_compute_as_the_cpu_form(case, checkpoints, dense_dir, monkeypatch):
    """The CUDA form, e4m3 codes and per-row scales read by `fp8_linear` (whose CPU path is the
    reference), on the CPU: the same outputs as the dense CPU layers, fused shards by their
    own scales."""
    quant_dir = dense_dir if case == "online" else checkpoints[case][0]
    scheme = "per-tensor" if case == "online" else CASES[case][0]
    dense = load(quant_dir)
    _keep_float8_on_cpu(monkeypatch)
    kept = load(quant_dir)
    generator = torch.Generator().manual_seed(4)
    for parent, fused, _ in LAYER_LINEARS:
        ours = getattr(getattr(kept.model.layers[0], parent), fused)
        reference = getattr(getattr(dense.model.layers[0], parent), fused)
        assert ours.weight.dtype == FP8_DTYPE
        groups = ours.input_size_per_partition // 128 if scheme == "block" else 1
        assert ours.weight_scale.shape == (ours.output_size_per_partition, groups)
        torch.testing.assert_close(ours.quant_method.dequantized_weight(ours), reference.weight)
        x = torch.randn(7, ours.input_size_per_partition, generator=generator)
        with torch.no_grad():
            expected = reference(x)
            got = ours(x)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max())
    attention = kept.model.layers[0].self_attn
    # the checkpoint's q, k and v scales differ (online: one scale for the fused q|k|v)
    assert attention.qkv_proj.fp8_one_scale == (case == "online")
    assert attention.o_proj.fp8_one_scale == (scheme == "per-tensor")


def test_a_layer_in_the_cuda_form_computes_through_the_triton_kernel(
    checkpoints, monkeypatch, fp8_triton
):
    from ember.kernels.fp8_matmul import FP8Weight, fp8_linear_torch, quantize_activations

    _keep_float8_on_cpu(monkeypatch)
    model = load(checkpoints["per-tensor-static"][0])
    qkv = model.model.layers[0].self_attn.qkv_proj
    weight = qkv.quant_method.fp8_weight(qkv)
    x = torch.randn(5, qkv.input_size_per_partition, generator=torch.Generator().manual_seed(5))
    expected = fp8_linear_torch(x, weight, qkv.input_scale)
    codes, scales = quantize_activations(x, qkv.input_scale)
    device = torch.device(KERNEL_DEVICE)
    on_device = FP8Weight(weight.codes.to(device), weight.scales.to(device))
    out = fp8_triton.fp8_matmul_triton(
        codes.to(device), scales.to(device), on_device, torch.float32, fp8_dot=False
    )
    assert relative_error(out.cpu(), expected) < (EXACT if KERNEL_DEVICE == "cpu" else CUDA_EXACT)


def test_fp8_triton_kernel_compiles_for_h100_and_a100():
    """Triton's compiler (no GPU needed: its MLIR passes and ptxas) takes the kernel where the
    interpreter does not look: fp8 tl.dot for sm_90 and sm_89, the fp16 widening for sm_80."""
    import os
    import subprocess
    import sys

    program = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from ember.kernels.fp8_matmul_triton import _fp8_matmul_kernel as kernel
for arch, fp8_dot, group_k, out in [(90, True, 0, "*bf16"), (90, True, 128, "*fp32"),
                                    (89, True, 128, "*bf16"), (80, False, 0, "*fp32")]:
    constexprs = {"GROUP_K": group_k, "BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128,
                  "FP8_DOT": fp8_dot}
    pointers = {"out_ptr": out, "x_ptr": "*u8", "w_ptr": "*u8", "x_scales_ptr": "*fp32",
                "w_scales_ptr": "*fp32"}
    signature = {name: "constexpr" if name in constexprs else pointers.get(name, "i32")
                 for name in kernel.arg_names}
    compiled = triton.compile(ASTSource(kernel, signature, constexprs),
                              target=GPUTarget("cuda", arch, 32))
    assert compiled.asm["cubin"], arch
    print("compiled", arch)
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run(
        [sys.executable, "-c", program],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("compiled") == 4


# ---- errors --------------------------------------------------------------------------------------


def _edited(source: str, target, change: dict) -> str:
    shutil.copytree(source, target)
    config = json.loads((target / "config.json").read_text())
    config["quantization_config"].update(change)
    (target / "config.json").write_text(json.dumps(config))
    return str(target)


def _block_ctx(tp_size: int, rank: int = 0, block=(128, 128)) -> ModelContext:
    settings = {"activation_scheme": "dynamic", "weight_block_size": list(block)}
    return ModelContext(ParallelContext(rank=rank, world_size=tp_size), FP8Config(settings))


def test_a_shard_that_cuts_a_block_is_refused_naming_the_layer_and_sizes():
    # k/v of 2 heads of 64 at TP=2: 64 rows a rank
    with pytest.raises(
        ValueError,
        match=r"QKVParallelLinear: weight output_partition_size = 64 .* not divisible by "
        r"weight quantization block_n = 128",
    ):
        QKVParallelLinear(256, 64, 4, 2, ctx=_block_ctx(2))
    # down_proj of 384 inputs at TP=2: 192 a rank
    with pytest.raises(
        ValueError,
        match=r"RowParallelLinear: weight input_size_per_partition = 192 \(input size 384, "
        r"tensor_parallel_size 2\) is not divisible by weight quantization block_k = 128",
    ):
        RowParallelLinear(384, 256, ctx=_block_ctx(2))
    # at one rank a fused layer may end in a partial block, not hold one inside (vLLM's rule)
    MergedColumnParallelLinear(256, [256, 64], ctx=_block_ctx(1))
    with pytest.raises(ValueError, match="output_partition_size = 64"):
        MergedColumnParallelLinear(256, [64, 256], ctx=_block_ctx(1))
    # whole blocks a rank load
    RowParallelLinear(512, 256, ctx=_block_ctx(2, rank=1))


def test_tensor_parallel_block_cuts_are_found_from_the_config_alone():
    from types import SimpleNamespace

    settings = fp8_settings({"activation_scheme": "dynamic", "weight_block_size": [128, 128]})
    config = SimpleNamespace(**MODEL)
    check_tensor_parallel_blocks(settings, config, 2)  # the test model fits TP=2 and 4
    check_tensor_parallel_blocks(settings, config, 4)
    narrow_mlp = SimpleNamespace(**{**MODEL, "intermediate_size": 384})
    with pytest.raises(ValueError, match=r"gate_proj: output size per rank 192 \(of 384"):
        check_tensor_parallel_blocks(settings, narrow_mlp, 2)
    small_heads = SimpleNamespace(**{**MODEL, "head_dim": 64, "hidden_size": 256})
    with pytest.raises(ValueError, match="k_proj: output size per rank 64"):
        check_tensor_parallel_blocks(settings, small_heads, 2)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"activation_scheme": "dynamic", "weight_block_size": [128]}, "two positive integers"),
        ({"activation_scheme": "dynamic", "weight_block_size": [128, 0]}, "two positive"),
        ({"activation_scheme": "dynamic", "weight_block_size": "128x128"}, "two positive"),
        ({"activation_scheme": "dynamic", "weight_block_size": [128, 128, 1]}, "two positive"),
        ({"activation_scheme": "per_token"}, r"activation_scheme must be one of .*'per_token'"),
        ({"weight_block_size": [128, 128]}, "has no activation_scheme"),
        (
            {"activation_scheme": "static", "weight_block_size": [128, 128]},
            "'dynamic' only",
        ),
    ],
)
def test_settings_ember_does_not_take_are_refused_naming_them(settings, message):
    with pytest.raises(ValueError, match=message):
        FP8Config({"quant_method": "fp8", **settings})


def test_a_checkpoint_of_other_tensors_than_it_declares_is_refused(checkpoints, tmp_path):
    source = checkpoints["per-tensor-dynamic"][0]
    tensors = load_file(f"{source}/model.safetensors")
    name = "model.layers.0.mlp.up_proj"
    cases = {
        "not e4m3": ({f"{name}.weight": tensors[f"{name}.weight"].float()}, "float8_e4m3fn"),
        "scale shape": ({f"{name}.weight_scale": torch.ones(3)}, "weight_scale of shape"),
    }
    for label, (change, message) in cases.items():
        target = tmp_path / label.replace(" ", "-")
        shutil.copytree(source, target)
        save_file({**tensors, **change}, str(target / "model.safetensors"))
        with pytest.raises(ValueError, match=message):
            load(str(target))
    block = _edited(source, tmp_path / "declared-block", {"weight_block_size": [128, 128]})
    with pytest.raises(ValueError, match="weight_scale"):  # its tensors are per tensor
        load(block)


# ---- on a GPU (skipped without one) ------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def forward_whole(model, prompts, device: torch.device, block_size: int = 16):
    """Logits (float32, on the CPU) of each prompt at every position, the prompts prefilled
    in one forward on `device` (blocks laid out in order)."""
    from ember.kernels.attention import AttentionMetadata
    from ember.workers.layers.attention import Attention

    blocks = [-(-len(p) // block_size) for p in prompts]
    dtype = next(model.parameters()).dtype
    for layer in (m for m in model.modules() if isinstance(m, Attention)):
        shape = (2, sum(blocks) + 1, block_size, layer.num_kv_heads, layer.head_dim)
        layer.kv_cache = torch.zeros(shape, dtype=dtype, device=device)
    first, tables, slots, starts = 1, [], [], [0]
    for prompt, count in zip(prompts, blocks):
        table = list(range(first, first + count))
        first += count
        tables.append(table + [0] * (max(blocks) - count))
        slots += [table[i // block_size] * block_size + i % block_size for i in range(len(prompt))]
        starts.append(starts[-1] + len(prompt))
    lengths = [len(p) for p in prompts]
    metadata = AttentionMetadata(
        slot_mapping=torch.tensor(slots, device=device),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(lengths, dtype=torch.int32, device=device),
        block_table=torch.tensor(tables, dtype=torch.int32, device=device),
        num_decodes=0,
        max_query_len=max(lengths),
        max_seq_len=max(lengths),
        query_start_loc_cpu=starts,
        seq_lens_cpu=lengths,
    )
    input_ids = torch.tensor([t for p in prompts for t in p], device=device)
    positions = torch.tensor([i for p in prompts for i in range(len(p))], device=device)
    with torch.inference_mode():
        logits = model.compute_logits(model(input_ids, positions, metadata)).float().cpu()
    return [logits[starts[i] : starts[i + 1]] for i in range(len(prompts))]


@cuda
def test_cuda_fp8_gemm_agrees_with_the_emulation():
    """The emulation's claim, on FP8 hardware: e4m3 rounding on the GPU is the CPU's, and
    torch._scaled_mm (vLLM's per-tensor GEMM; CUTLASS's per-token one computes the same sums)
    gives x_q * s_x @ (w_q * s_w).T, up to its accumulation: Hopper's FP8 tensor cores do not
    accumulate in full float32 (measured on an H200: 2.2e-4 of the largest output, where
    float32 summation order alone gives ~1e-6)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 512, generator=generator) * 2
    weight = torch.randn(384, 512, generator=generator) * 0.05
    values = (torch.randn(1 << 20, generator=generator) * 100).clamp(-448, 448)  # as quantized
    assert torch.equal(values.to(FP8_DTYPE).float(), values.cuda().to(FP8_DTYPE).float().cpu())
    w_scale = weight.abs().max() / 448
    w_q = (weight / w_scale).to(FP8_DTYPE)
    x_scale = torch.tensor(0.02)
    x_dq = quantize_dequantize_activations(x, x_scale)
    expected = x_dq @ (w_q.float() * w_scale).T
    x_q = (x * x_scale.reciprocal()).clamp(-448, 448).to(FP8_DTYPE)
    out = torch._scaled_mm(
        x_q.cuda(),
        w_q.cuda().T,
        scale_a=x_scale.cuda(),
        scale_b=w_scale.cuda(),
        out_dtype=torch.float32,
    )
    error = ((out.cpu() - expected).abs().max() / expected.abs().max()).item()
    print(f"per tensor: _scaled_mm against the emulation, {error:.1e} of the largest output")
    assert error < 1e-3
    # per token and per output row (rowwise scales: bfloat16 out)
    row_scales = weight.abs().amax(1, keepdim=True) / 448
    w_rows = (weight / row_scales).to(FP8_DTYPE)
    x_dq = quantize_dequantize_activations(x)
    token_scales = (x.abs().amax(1, keepdim=True) / 448).clamp(min=1 / (448 * 512))
    x_q = (x * token_scales.reciprocal()).clamp(-448, 448).to(FP8_DTYPE)
    assert torch.equal(x_q.float() * token_scales, x_dq)
    expected = x_dq @ (w_rows.float() * row_scales).T
    out = torch._scaled_mm(
        x_q.cuda(),
        w_rows.cuda().T,
        scale_a=token_scales.cuda(),
        scale_b=row_scales.T.contiguous().cuda(),
        out_dtype=torch.bfloat16,
    )
    error = ((out.float().cpu() - expected).abs().max() / expected.abs().max()).item()
    print(f"per token x per row: _scaled_mm (bfloat16 out) against the emulation, {error:.1e}")
    assert error < 1e-2


@cuda
@pytest.mark.parametrize("case", ["per-tensor-static", "per-channel-dynamic", "block-dynamic"])
def test_cuda_model_computes_as_the_cpu_model(case, checkpoints, prompts):
    quant_dir, dequantized_dir = checkpoints[case]
    gpu = torch.device("cuda")
    ours = forward_whole(loader.get_model(model_config(quant_dir), gpu), prompts, gpu)
    cpu = forward_whole(load(quant_dir), prompts, CPU)
    errors = position_errors(ours, [logits.log_softmax(-1) for logits in cpu])
    # float32 on both (a float32 model's FP8 GEMM on CUDA adds the exact products in float32;
    # TF32 is off by default), so the same e4m3 steps at most positions
    assert (errors <= 1e-3).float().mean().item() >= MIN_EXACT_SHARE, errors
    assert errors.max().item() <= STEP_LOGPROB
    # bfloat16, as vLLM runs: as close to the float32 oracle as HF in bfloat16 on the GPU
    from transformers import AutoModelForCausalLM

    half = forward_whole(loader.get_model(model_config(quant_dir, "bfloat16"), gpu), prompts, gpu)
    oracle, _ = fp8_oracle(quant_dir, dequantized_dir, prompts)
    hf_half = AutoModelForCausalLM.from_pretrained(dequantized_dir, dtype=torch.bfloat16)
    hf_half = hf_half.to(gpu).eval()
    quantize_activations_in(hf_half, activation_quantization(quant_dir))
    with torch.no_grad():
        theirs = [hf_half(torch.tensor([p], device=gpu)).logits[0].float().cpu() for p in prompts]
    ours_error = position_errors(half, oracle).max().item()
    hf_error = position_errors(theirs, oracle).max().item()
    assert ours_error <= max(2 * hf_error, 0.05), (ours_error, hf_error)


@cuda
@pytest.mark.parametrize("case", list(CASES))
def test_cuda_layers_hold_float8_weights_and_compute_as_the_emulation(case, checkpoints):
    """On CUDA the weights stay e4m3 and each layer computes the CPU's emulation: a float32
    model through the exact kernel (`CUDA_EXACT`), a bfloat16 one through torch._scaled_mm or
    the FP8 Triton kernel, its bfloat16 output rounded (1e-2 of the largest output)."""
    from ember.kernels.fp8_matmul import FP8Weight, fp8_linear_torch

    quant_dir = checkpoints[case][0]
    gpu = torch.device("cuda")
    generator = torch.Generator().manual_seed(6)
    for dtype, tolerance in (("float32", CUDA_EXACT), ("bfloat16", 1e-2)):
        model = loader.get_model(model_config(quant_dir, dtype), gpu)
        for parent, fused, _ in LAYER_LINEARS:
            layer = getattr(getattr(model.model.layers[0], parent), fused)
            assert layer.weight.dtype == FP8_DTYPE and layer.weight.is_cuda
            assert layer.weight_scale.dtype == torch.float32
            x = (torch.randn(33, layer.input_size_per_partition, generator=generator) * 2).to(
                DTYPES_BY_NAME[dtype]
            )
            with torch.no_grad():
                out = layer(x.to(gpu))
            assert out.dtype == x.dtype
            weight = layer.quant_method.fp8_weight(layer)
            on_cpu = FP8Weight(weight.codes.cpu(), weight.scales.cpu(), weight.group_k)
            input_scale = layer.input_scale.cpu() if CASES[case][1] == "static" else None
            expected = fp8_linear_torch(x.float(), on_cpu, input_scale)
            error = relative_error(out.cpu(), expected)
            print(f"{case} {dtype} {fused}: {error:.1e} of the largest output")
            assert error < tolerance, (fused, dtype, error)


@cuda
@pytest.mark.parametrize("layout", ["tensor", "row", "block"])
def test_cuda_fp8_tensor_cores_compute_as_the_emulation(layout, monkeypatch):
    """The fast path forced with float32 output (Hopper's FP8 sums, `FP8_TENSOR_CORES`), and
    in bfloat16 as a bfloat16 model runs it: per tensor and per row through torch._scaled_mm
    (rowwise where this build takes it and the batch is past decode sizes), blocks through the
    Triton kernel."""
    from ember.kernels import fp8_matmul

    gpu = torch.device("cuda")
    if not fp8_matmul.has_fp8_tensor_cores(gpu):
        pytest.skip("FP8 tensor cores need sm_89+")
    generator = torch.Generator().manual_seed(7)
    weight = fp8_matmul.quantize_weight(
        (torch.randn(384, 512, generator=generator) * 0.05).to(gpu), layout
    )
    rowwise = layout == "row" and fp8_matmul.rowwise_scaled_mm_works(weight.codes.device)
    calls = []
    scaled_mm = torch._scaled_mm

    def counted(*args, **kwargs):
        calls.append(kwargs["scale_a"].numel())
        return scaled_mm(*args, **kwargs)

    monkeypatch.setattr(torch, "_scaled_mm", counted)  # after the rowwise probe (cached)
    for tokens in (1, 64):
        x = (torch.randn(tokens, 512, generator=generator) * 2).to(gpu)
        static = torch.tensor(0.02, device=gpu) if layout == "tensor" else None
        expected = fp8_matmul.fp8_linear_torch(x, weight, static)
        calls.clear()
        out = fp8_matmul.fp8_linear(x, weight, static, fp8_tensor_cores=True)
        error = relative_error(out, expected)
        print(f"{layout}, {tokens} tokens, float32 out: {error:.1e} ({len(calls)} _scaled_mm)")
        assert error < FP8_TENSOR_CORES
        assert len(calls) == (1 if layout == "tensor" else 0)  # tensorwise: one scale a side
        calls.clear()
        out = fp8_matmul.fp8_linear(x.bfloat16(), weight, static)
        expected = fp8_matmul.fp8_linear_torch(x.bfloat16().float(), weight, static)
        error = relative_error(out, expected)  # bfloat16's rounding, once
        print(f"{layout}, {tokens} tokens, bfloat16: {error:.1e} ({len(calls)} _scaled_mm)")
        assert out.dtype == torch.bfloat16 and error < 1e-2
        rowwise_here = rowwise and tokens >= fp8_matmul.ROWWISE_MIN_TOKENS  # else Triton
        assert len(calls) == (1 if layout == "tensor" or rowwise_here else 0)


# ---- through the engine ------------------------------------------------------------------------


def assert_generation_matches_oracle(outputs, prompts, quant_dir, dequantized_dir, tp_size=1):
    """ember's greedy tokens are HF's argmax (or within `STEP_LOGPROB` of it: an e4m3 step
    apart), and their log-probabilities HF's, by the module's tolerance."""
    reference = hf_model(dequantized_dir)
    quantize_activations_in(reference, activation_quantization(quant_dir, tp_size))
    errors = []
    for prompt, output in zip(prompts, outputs, strict=True):
        tokens = list(output.outputs[0].token_ids)
        expected = hf_logprobs(reference, [prompt + tokens])[0][len(prompt) - 1 : -1]
        for step, token in enumerate(tokens):
            assert expected[step].max() - expected[step, token] <= STEP_LOGPROB
            ours = output.outputs[0].logprobs[step][token].logprob
            errors.append(abs(ours - expected[step, token].item()))
    errors = torch.tensor(errors)
    assert (errors <= FLOAT32_LOGPROB).float().mean().item() >= MIN_EXACT_SHARE, errors
    assert errors.max().item() <= STEP_LOGPROB, errors


GENERATE = {"max_tokens": 8, "temperature": 0.0, "ignore_eos": True, "logprobs": 1}


@pytest.mark.parametrize("case", ["per-tensor-static", "block-dynamic"])
def test_llm_generates_from_an_fp8_checkpoint(case, checkpoints, prompts):
    from ember import LLM, SamplingParams

    quant_dir, dequantized_dir = checkpoints[case]
    with LLM(quant_dir, dtype="float32", skip_tokenizer_init=True) as llm:
        assert llm.llm_engine.model_config.quantization == "fp8"
        outputs = llm.generate(
            [{"prompt_token_ids": p} for p in prompts], SamplingParams(**GENERATE), use_tqdm=False
        )
    assert_generation_matches_oracle(outputs, prompts, quant_dir, dequantized_dir)


@pytest.mark.slow
def test_llm_at_tp2_generates_from_an_fp8_checkpoint(checkpoints, prompts):
    from ember import LLM, SamplingParams

    quant_dir, dequantized_dir = checkpoints["per-tensor-dynamic"]
    with LLM(quant_dir, dtype="float32", tensor_parallel_size=2, skip_tokenizer_init=True) as llm:
        outputs = llm.generate(
            [{"prompt_token_ids": p} for p in prompts], SamplingParams(**GENERATE), use_tqdm=False
        )
    assert_generation_matches_oracle(outputs, prompts, quant_dir, dequantized_dir, tp_size=2)


def test_llm_quantizes_a_dense_checkpoint_with_quantization_fp8(dense_dir):
    from ember import LLM

    with LLM(dense_dir, quantization="fp8", dtype="float32", skip_tokenizer_init=True) as llm:
        assert llm.llm_engine.model_config.quantization == "fp8"
        methods = llm.apply_model(qkv_method_name)
    assert methods == ["FP8LinearMethod"]


def qkv_method_name(model: torch.nn.Module) -> str:
    """The weight format of the first layer's qkv_proj (run in a worker by `apply_model`)."""
    return type(model.model.layers[0].self_attn.qkv_proj.quant_method).__name__


def test_quantization_fp8_of_a_gguf_file_is_refused_before_any_process(default_gguf):
    from ember import LLM

    with pytest.raises(ValueError, match="quantization='fp8' reads a safetensors checkpoint"):
        LLM(default_gguf, quantization="fp8")


# ---- MoE experts ---------------------------------------------------------------------------------


def experts_with_fp8_activations(experts, hidden_states, top_k_index, top_k_weights, splits=1):
    """transformers' `MixtralExperts.forward` with each expert's inputs rounded as vLLM's FP8
    layers round them (per token; the down projection's inputs in `splits` rank slices)."""
    output = torch.zeros_like(hidden_states)
    for expert in range(experts.num_experts):
        token, slot = torch.where(top_k_index == expert)
        if token.numel() == 0:
            continue
        x = reference_activation_quantization(hidden_states[token])
        gate, up = F.linear(x, experts.gate_up_proj[expert]).chunk(2, dim=-1)
        x = reference_activation_quantization(experts.act_fn(gate) * up, splits=splits)
        x = F.linear(x, experts.down_proj[expert]) * top_k_weights[token, slot, None]
        output.index_add_(0, token, x.to(output.dtype))
    return output


def fp8_moe_oracle(quant_dir, dequantized_dir, prompts, tp_size=1):
    model = hf_model(dequantized_dir)
    weights_only = hf_logprobs(model, prompts)
    options = activation_quantization(quant_dir, tp_size)
    quantize_activations_in(model, {m: o for m, o in options.items() if ".experts." not in m})
    for module in model.modules():
        if type(module).__name__ == "MixtralExperts":
            module.forward = partial(experts_with_fp8_activations, module, splits=tp_size)
    return hf_logprobs(model, prompts), weights_only


@pytest.fixture(scope="module")
def moe_checkpoint(tmp_path_factory) -> tuple[str, str]:
    from tests.helpers import write_random_model

    root = tmp_path_factory.mktemp("fp8-moe")
    dense = write_random_model(
        root / "source", "MixtralForCausalLM", hidden_size=128, intermediate_size=256
    )
    quant_dir = write_fp8_checkpoint(
        dense, str(root / "fp8"), scheme="per-channel", activation_scheme="dynamic"
    )
    return quant_dir, write_dequantized_checkpoint(quant_dir, str(root / "dense"))


@pytest.mark.parametrize("tp_size", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_moe_experts_of_an_fp8_checkpoint_match_hf_with_vllm_activation_quantization(
    tp_size, moe_checkpoint, prompts
):
    """Every expert's w1, w3 and w2 is an FP8 linear layer (its own scales, its inputs rounded
    per token as vLLM's); the oracle patches transformers' fused experts to do the same."""
    quant_dir, dequantized_dir = moe_checkpoint
    config = dataclasses.replace(model_config(quant_dir), architecture="MixtralForCausalLM")
    if tp_size == 1:
        model = loader.get_model(config, CPU, SINGLE_RANK)
        experts = model.model.layers[0].block_sparse_moe.experts
        assert isinstance(experts.w13["0"].quant_method, FP8LinearMethod)
        ours = forward_prompts(model, prompts[:2])
    else:
        ours = forward_at_tp2(quant_dir, prompts[:2], config)
    assert_matches_oracle(
        ours, *fp8_moe_oracle(quant_dir, dequantized_dir, prompts[:2], tp_size=tp_size)
    )
