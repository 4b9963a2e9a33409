"""FP8 checkpoints for tests (`quant_method: "fp8"`): written from a dense Llama directory the way
the tools write them, a plain-torch dequantizer that reads one back, and vLLM's activation
quantization written out independently of ember's (the oracle for `layers/quantization/fp8.py`).

Layouts followed (W is a linear's weight [N out, K in], q its e4m3 codes):

  per tensor, AutoFP8 (neuralmagic/AutoFP8 `auto_fp8/quantize.py` `per_tensor_quantize`,
  `static_per_tensor_quantize`, `save_quantized_model`; vLLM's "fp8" format):
    weight        float8_e4m3fn [N, K]   q = e4m3(clamp(W * (448 / amax)))
    weight_scale  float32 []             (448 / amax) ** -1;   W ~ q * weight_scale
    input_scale   float32 []             "static": the largest amax / 448 of the calibration
                                         inputs (its `FP8StaticLinearQuantizer`)
    quantization_config {"quant_method": "fp8", "activation_scheme": ..., "ignored_layers":
                         [..., "lm_head"]} (AutoFP8 always ignores lm_head)
  per channel: the same with weight_scale [N, 1], one scale a row (the tensors of
    compressed-tensors' "channel" strategy; vLLM's "fp8" reader does not take it, ember does)
  block-wise, DeepSeek-V3 / Qwen3-FP8 and transformers' `Fp8Quantize` (finegrained_fp8.py):
    weight            float8_e4m3fn [N, K]   each [bn, bk] block: q = e4m3(clamp(W * 448 / amax))
    weight_scale_inv  float32 [N / bn, K / bk]   amax / 448 (1 for an all-zero block)
    quantization_config {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                         "weight_block_size": [bn, bk]} (+ "modules_to_not_convert" when some
                         layers stay dense, as Qwen3-FP8 lists them)

Activations (vLLM's `QuantFP8.forward_native`, input_quant_fp8.py; 448 = e4m3's largest):
static x_q = e4m3(clamp(x * (1 / s))), s = the checkpoint's input_scale, the largest of a fused
layer's; dynamic per token s = max(max|x_t| / 448, 1 / (448 * 512)); block-wise per token and
group of bk inputs, x / s. The GEMM then computes on x_q * s.
"""

from __future__ import annotations

import torch

from tests.quantized_checkpoints import (
    _quantized_module,
    _read_config,
    _write_checkpoint,
    read_tensors,
)

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
MIN_SCALING_FACTOR = 1.0 / (FP8_MAX * 512.0)
SCHEMES = ("per-tensor", "per-channel", "block")
# A decoder layer's linears that read one input: vLLM fuses them, and takes their largest
# input_scale.
FUSED_INPUTS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
ROW_PARALLEL = ("o_proj", "down_proj")  # their inputs are split over tensor-parallel ranks


# ---- quantizers, as the tools write ------------------------------------------------------------


def quantize_per_tensor(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """AutoFP8's `per_tensor_quantize`: (e4m3 codes, float32 scale [] = amax / 448)."""
    min_val, max_val = weight.aminmax()
    amax = torch.maximum(min_val.abs(), max_val.abs())
    scale = FP8_MAX / amax.clamp(min=1e-12)
    codes = (weight * scale).clamp(min=-FP8_MAX, max=FP8_MAX).to(FP8)
    return codes, scale.float().reciprocal()


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One scale a row, [N, 1], by AutoFP8's rule row by row."""
    amax = weight.abs().amax(dim=1, keepdim=True)
    scale = FP8_MAX / amax.clamp(min=1e-12)
    codes = (weight * scale).clamp(min=-FP8_MAX, max=FP8_MAX).to(FP8)
    return codes, scale.float().reciprocal()


def quantize_blocks(
    weight: torch.Tensor, block_size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' `Fp8Quantize._quantize_one` (DeepSeek-V3's layout): (e4m3 codes [N, K],
    weight_scale_inv float32 [N / bn, K / bk])."""
    block_n, block_k = block_size
    rows, cols = weight.shape
    if rows % block_n or cols % block_k:
        raise ValueError(f"shape {tuple(weight.shape)} is not whole blocks of {block_size}")
    blocks = weight.float().reshape(rows // block_n, block_n, cols // block_k, block_k)
    max_abs = blocks.abs().amax(dim=(1, 3))
    safe = torch.where(max_abs > 0, max_abs, torch.ones_like(max_abs))
    scales = FP8_MAX / safe
    scales = torch.where(max_abs > 0, scales, torch.ones_like(scales))
    inverse = (1.0 / scales).to(torch.float32)
    scaled = blocks * scales[:, None, :, None]
    codes = scaled.clamp(min=-FP8_MAX, max=FP8_MAX).to(FP8).reshape(rows, cols)
    return codes, inverse


# ---- calibration (static activation scales) ---------------------------------------------------


def calibrate_input_scales(
    dense_dir: str, modules: list[str], prompts: list[list[int]]
) -> dict[str, torch.Tensor]:
    """AutoFP8's static input scale of each module: the largest amax / 448 of its input over
    the calibration prompts (run here on the dense model; AutoFP8 runs its weight-quantized
    one, which only moves the numbers)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32).eval()
    scales: dict[str, torch.Tensor] = {}

    def record(name):
        def hook(module, args):
            _, scale = quantize_per_tensor(args[0])
            if name not in scales or scale > scales[name]:
                scales[name] = scale

        return hook

    handles = [
        model.get_submodule(name).register_forward_pre_hook(record(name)) for name in modules
    ]
    with torch.no_grad():
        for prompt in prompts:
            model(torch.tensor([prompt]))
    for handle in handles:
        handle.remove()
    return scales


# ---- writer -------------------------------------------------------------------------------------


def write_fp8_checkpoint(
    dense_dir: str,
    out_dir: str,
    *,
    scheme: str = "per-tensor",
    activation_scheme: str = "dynamic",
    ignored_layers: tuple[str, ...] = (),
    weight_block_size: tuple[int, int] = (128, 128),
    calibration_prompts: list[list[int]] | None = None,
    layout: str = "fp8",
) -> str:
    """Write an FP8 checkpoint of the dense directory `dense_dir` to `out_dir`.

    `layout` "compressed-tensors" (block scheme only) writes llm-compressor's FP8_BLOCK form of
    the same codes and scales: each block scale as `weight_scale`, and its config (weights
    strategy "block" with `block_structure`, activations dynamic per group of bk).

    Quantizes the decoder layers' q/k/v/o/gate/up/down projections except `ignored_layers`
    (module names such as "model.layers.1.mlp.down_proj"), which stay as they are, as do the
    embeddings, norms and lm_head. "static" (per tensor or channel only) calibrates each
    module's input_scale on `calibration_prompts` (default: 4 random prompts of 24 tokens).
    """
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    if activation_scheme not in ("dynamic", "static", "none"):
        raise ValueError(
            f"activation_scheme must be 'dynamic', 'static' or 'none', got {activation_scheme!r}"
        )
    if (activation_scheme == "none") != (layout == "compressed-tensors" and scheme != "block"):
        raise ValueError("weight-only FP8 is written in the compressed-tensors layout, unblocked")
    if scheme == "block" and activation_scheme != "dynamic":
        raise ValueError("block-wise FP8 checkpoints are written with dynamic activations only")
    config = _read_config(dense_dir)
    tensors: dict[str, torch.Tensor] = {}
    quantized: list[str] = []
    for name, tensor in read_tensors(dense_dir).items():
        module = _quantized_module(name)
        if module is None or module in ignored_layers or name.endswith(".bias"):
            tensors[name] = tensor
            continue
        quantized.append(module)
        if scheme == "block":
            codes, scale = quantize_blocks(tensor, weight_block_size)
            scale_name = "weight_scale" if layout == "compressed-tensors" else "weight_scale_inv"
            tensors[f"{module}.{scale_name}"] = scale
        else:
            quantize = quantize_per_tensor if scheme == "per-tensor" else quantize_per_channel
            codes, scale = quantize(tensor)
            tensors[f"{module}.weight_scale"] = scale
        tensors[f"{module}.weight"] = codes
    if activation_scheme == "static":
        if calibration_prompts is None:
            generator = torch.Generator().manual_seed(0)
            vocab = config["vocab_size"]
            calibration_prompts = torch.randint(3, vocab, (4, 24), generator=generator).tolist()
        for module, scale in calibrate_input_scales(
            dense_dir, quantized, calibration_prompts
        ).items():
            tensors[f"{module}.input_scale"] = scale
    if layout == "compressed-tensors":
        if ignored_layers:
            raise ValueError("the compressed-tensors layout is written without ignored layers")
        quantization_config = _compressed_tensors_config(scheme, weight_block_size)
    elif scheme == "block":
        quantization_config = {
            "quant_method": "fp8",
            "activation_scheme": "dynamic",
            "fmt": "e4m3",
            "weight_block_size": list(weight_block_size),
        }
        if ignored_layers:
            quantization_config["modules_to_not_convert"] = [*ignored_layers, "lm_head"]
    else:
        quantization_config = {
            "quant_method": "fp8",
            "activation_scheme": activation_scheme,
            "ignored_layers": [*ignored_layers, "lm_head"],
        }
    config = {**config, "quantization_config": quantization_config}
    return _write_checkpoint(dense_dir, out_dir, tensors, config)


def _compressed_tensors_config(scheme: str, block: tuple[int, int]) -> dict:
    """llm-compressor's quantization_config: its FP8_BLOCK preset ("block"), or FP8 weights
    alone per channel or tensor (no input_activations: vLLM's W8A16 FP8)."""
    strategy = {"block": "block", "per-channel": "channel", "per-tensor": "tensor"}[scheme]
    weights = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": strategy}
    weights["dynamic"] = False
    activations = None
    if scheme == "block":
        weights["block_structure"] = list(block)
        activations = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "group"}
        activations.update(dynamic=True, group_size=block[1])
    group = {"targets": ["Linear"], "weights": weights, "input_activations": activations}
    return {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": {**group, "format": "float-quantized"}},
        "ignore": ["lm_head"],
    }


def fp8_layout(settings: dict) -> tuple[str, tuple[int, int] | None, str]:
    """(activation scheme, block size or None, the block scales' name) of an FP8
    quantization_config in either layout."""
    if settings.get("quant_method") == "compressed-tensors":
        group = settings["config_groups"]["group_0"]
        if group["input_activations"] is None:
            return "none", None, "weight_scale"
        return "dynamic", tuple(group["weights"]["block_structure"]), "weight_scale"
    block = settings.get("weight_block_size")
    return settings["activation_scheme"], block and tuple(block), "weight_scale_inv"


# ---- the oracle ---------------------------------------------------------------------------------


def _expand_blocks(scale: torch.Tensor, shape: torch.Size, block_size) -> torch.Tensor:
    block_n, block_k = block_size
    rows = scale.float().repeat_interleave(block_n, dim=0)[: shape[0]]
    return rows.repeat_interleave(block_k, dim=1)[:, : shape[1]]


def dequantize_fp8_checkpoint(quant_dir: str) -> dict[str, torch.Tensor]:
    """Every tensor of an FP8 checkpoint, each quantized weight float32 codes * scale
    (`weight_scale`: one, or one a row; `weight_scale_inv`: one a block), the scales and
    input scales left out."""
    _, block_size, block_scale = fp8_layout(_read_config(quant_dir)["quantization_config"])
    tensors = read_tensors(quant_dir)
    dense: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if name.endswith((".weight_scale", ".weight_scale_inv", ".input_scale")):
            continue
        module = name[: -len(".weight")]
        if tensor.dtype != FP8:
            dense[name] = tensor
        elif block_size is not None:
            scale = _expand_blocks(tensors[f"{module}.{block_scale}"], tensor.shape, block_size)
            dense[name] = tensor.float() * scale
        else:
            scale = tensors[f"{module}.weight_scale"].float()
            dense[name] = tensor.float() * (scale if scale.dim() == 2 else scale.reshape(()))
    return dense


def write_dequantized_checkpoint(quant_dir: str, out_dir: str) -> str:
    """The dense float32 directory of an FP8 checkpoint, for transformers'
    `AutoModelForCausalLM`."""
    tensors = {
        name: tensor.float() if tensor.is_floating_point() else tensor
        for name, tensor in dequantize_fp8_checkpoint(quant_dir).items()
    }
    config = _read_config(quant_dir)
    config.pop("quantization_config")
    for key in ("dtype", "torch_dtype"):
        if key in config:
            config[key] = "float32"
    return _write_checkpoint(quant_dir, out_dir, tensors, config)


def activation_quantization(quant_dir: str, tp_size: int = 1) -> dict[str, dict]:
    """How vLLM quantizes the input of each quantized module of an FP8 checkpoint, as keyword
    arguments of `reference_activation_quantization`: static, the input_scale (the largest of
    the modules vLLM fuses); dynamic, per token group (block-wise) or per token, each rank's
    inputs apart at `tp_size` ranks (a row-parallel layer's rank sees its slice only)."""
    scheme, block, _ = fp8_layout(_read_config(quant_dir)["quantization_config"])
    tensors = read_tensors(quant_dir)
    modules = [name[: -len(".weight")] for name, t in tensors.items() if t.dtype == FP8]
    result: dict[str, dict] = {}
    for module in modules:
        prefix, _, leaf = module.rpartition(".")
        if scheme == "none":  # weight-only: the activations as they are
            continue
        if scheme == "static":
            group = next((g for g in FUSED_INPUTS if leaf in g), (leaf,))
            scale = max(float(tensors[f"{prefix}.{part}.input_scale"]) for part in group)
            result[module] = {"input_scale": scale}
        else:
            splits = tp_size if leaf in ROW_PARALLEL else 1
            result[module] = {"group_size": None if block is None else block[1], "splits": splits}
    return result


def reference_activation_quantization(
    x: torch.Tensor,
    input_scale: float | None = None,
    group_size: int | None = None,
    splits: int = 1,
) -> torch.Tensor:
    """x as vLLM's FP8 GEMM sees it (float32 x_q * s); written from vLLM's `QuantFP8`
    `forward_native` / `_quantize_group_native`, apart from ember's copy. `splits`: the
    inputs quantized in that many equal slices (tensor-parallel ranks), each on its own."""
    x = x.float()
    if splits > 1:
        parts = x.chunk(splits, dim=-1)
        return torch.cat(
            [reference_activation_quantization(p, input_scale, group_size) for p in parts], -1
        )
    if input_scale is not None:
        scale = torch.tensor(input_scale, dtype=torch.float32)
        return (x * scale.reciprocal()).clamp(-FP8_MAX, FP8_MAX).to(FP8).float() * scale
    if group_size is None:
        x_max = x.abs().max(dim=-1).values.unsqueeze(-1)
        scale = (x_max / FP8_MAX).clamp(min=MIN_SCALING_FACTOR)
        return (x * scale.reciprocal()).clamp(-FP8_MAX, FP8_MAX).to(FP8).float() * scale
    shape = x.shape
    if shape[-1] % group_size:
        raise ValueError(f"{shape[-1]} inputs are not whole groups of {group_size}")
    grouped = x.reshape(-1, shape[-1] // group_size, group_size)
    absmax = grouped.abs().max(dim=-1, keepdim=True).values
    scale = (absmax / FP8_MAX).clamp(min=MIN_SCALING_FACTOR)
    quantized = (grouped / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return (quantized.float() * scale).reshape(shape)


def quantize_activations_in(model: torch.nn.Module, options: dict[str, dict]) -> list:
    """Make a transformers model quantize the input of each module of `options` (module name
    -> `reference_activation_quantization` arguments) as vLLM does, by forward pre-hooks;
    returns their handles."""
    handles = []
    for module, kwargs in options.items():

        def hook(layer, args, kwargs=kwargs):
            x = args[0]
            return (reference_activation_quantization(x, **kwargs).to(x.dtype), *args[1:])

        handles.append(model.get_submodule(module).register_forward_pre_hook(hook))
    return handles


def online_fp8_weights(dense_dir: str, out_dir: str) -> str:
    """The dense directory as vLLM's online FP8 (`quantization="fp8"`) computes with it at one
    rank: each linear of a decoder layer, fused modules together (q|k|v, gate|up), rounded
    to e4m3 with one scale amax / 448 (`ops.scaled_fp8_quant`), back in float32."""
    tensors = read_tensors(dense_dir)
    out = dict(tensors)
    layers = sorted({name.rpartition(".")[0] for name in tensors if _quantized_module(name)})
    done = set()
    for module in layers:
        if module in done:
            continue
        prefix, _, leaf = module.rpartition(".")
        group = next((g for g in FUSED_INPUTS if leaf in g), (leaf,))
        names = [f"{prefix}.{part}.weight" for part in group]
        fused = torch.cat([tensors[name].float() for name in names])
        scale = (fused.abs().max() / FP8_MAX).clamp(min=MIN_SCALING_FACTOR)
        codes = (fused * scale.reciprocal()).clamp(-FP8_MAX, FP8_MAX).to(FP8)
        parts = (codes.float() * scale).split([tensors[name].shape[0] for name in names])
        for name, part in zip(names, parts):
            out[name] = part.contiguous()
        done.update(f"{prefix}.{part}" for part in group)
    return _write_checkpoint(dense_dir, out_dir, out, _read_config(dense_dir))


def dense_modules(quant_dir: str) -> list[str]:
    """The decoder-layer linears an FP8 checkpoint keeps dense (its skip-list, less lm_head)."""
    settings = _read_config(quant_dir)["quantization_config"]
    listed = settings.get("ignored_layers") or settings.get("modules_to_not_convert") or []
    return [name for name in listed if name != "lm_head"]


def linear_modules(model_dir: str) -> list[str]:
    """The decoder layers' q/k/v/o/gate/up/down projections of a checkpoint, by module name."""
    names = {_quantized_module(name) for name in read_tensors(model_dir)}
    return sorted(name for name in names if name is not None)
