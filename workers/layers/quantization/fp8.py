"""quantization="fp8": checkpoints whose config.json says `quant_method: "fp8"`, and FP8 of a dense
checkpoint's linear weights at load (`FP8Config.online()`), as vLLM's `Fp8Config` and
`Fp8LinearMethod` (vllm/model_executor/layers/quantization/fp8.py) read and run them.

Each quantized linear layer stores its weight W [N out, K in] as `weight` float8_e4m3fn and:

    per tensor (AutoFP8, neuralmagic/AutoFP8 auto_fp8/quantize.py; vLLM's first "fp8" format)
      weight_scale      float32 [] or [1]                W = weight * weight_scale
      input_scale       float32 [] or [1]                activation_scheme "static" only
      config            {"activation_scheme": "static" | "dynamic", "ignored_layers": [...]}
    block-wise (DeepSeek-V3, Qwen3-FP8, transformers' FineGrainedFP8)
      weight_scale_inv  float32 [ceil(N / bn), ceil(K / bk)]
                        W[n, k] = weight[n, k] * weight_scale_inv[n // bn, k // bk]
      config            {"activation_scheme": "dynamic", "weight_block_size": [bn, bk],
                         "modules_to_not_convert": [...]}     (vLLM reads either skip-list key)
    per channel: weight_scale float32 [N, 1] is taken as well (ember only: vLLM's "fp8" loads
      one scale a shard, `PerTensorScaleParameter`; [N, 1] is compressed-tensors' "channel"
      strategy and fbgemm_fp8's layout).

A fused layer (qkv_proj, gate_up_proj) takes one scale per checkpoint module. ember holds every
scale per output row, so each shard is dequantized by its own scales, exactly:

    QKVParallelLinear, per tensor:  weight_scale [out_per_rank, 1] = [ sq .. | sk .. | sv .. ]
    block-wise:                     weight_scale_inv [out_per_rank, ceil(K_rank / bk)], row n
                                    of a shard holding its block row s[n // bn, :]

(vLLM's W8A8 path instead requantizes a fused layer's shards to the largest of their scales,
`requantize_with_max_scale`, which rounds the other shards' weights once more; its Marlin path
keeps them per shard, as ember does.) The layers' loaders shard these rows as any weight's; a
block-wise checkpoint is refused when a rank's shard would cut a block (vLLM's
`validate_fp8_block_shape`, same rule and words).

Activations are quantized as vLLM does on GPUs with FP8 (sm89+), in plain torch after its
`QuantFP8.forward_native` (quantization/input_quant_fp8.py): x_q = e4m3(clamp(x / s, +-448)),
then the matmul takes x_q * s, with s
    static              the checkpoint's input_scale (the largest of a fused layer's shards)
    dynamic             per token: max(|x_t|) / 448, at least 1 / (448 * 512)   (CUTLASS's
                        per-token choice; vLLM's per-tensor fallback is not reproduced)
    dynamic, block-wise per token and group of bk inputs, the same rule
On an H200, FP8 tensor cores' sums differ from this float32 emulation by ~2e-4 of the largest
output (Hopper's FP8 accumulation; tests/test_fp8.py measures it). A row-parallel rank
(o_proj, down_proj) quantizes its slice of the inputs, so at TP > 1 dynamic per-token scales
are per rank, as in vLLM. (On GPUs without FP8, vLLM's Marlin kernel leaves activations
unquantized; that is not reproduced.)

Compute, CPU: the weights are dequantized once at load to the model's dtype, each shard by its
own scales, and the activations rounded through e4m3 in torch. Measured on a 576 x 1536 weight
(SmolLM2's MLP), one thread of this 2-core machine, per-token activation quantization included:
dense float32 0.09 ms a decode token, 0.77 ms for 16 tokens, 9.9 ms for 256 (the activations'
rounding through float8 is 0.02, 0.12 and 2.4 ms of it); keeping the weight in float8 (1 byte a
value, a quarter of float32's 3.5 MB) and converting it for each matmul in chunks of 64 rows:
4.4, 5.1 and 13.9 ms, since torch converts float8 on the CPU at ~4.5 ns a value (a 256-entry
table gather instead: 2.7 ms a token). Dense it is, at 4 bytes a weight in float32 (2 in
bfloat16).

Compute, CUDA: the weight stays e4m3 (1 byte a value) with float32 scales per output row, and
each matmul quantizes the activations (codes and scales, torch ops as above) for an FP8 GEMM,
`ember.kernels.fp8_matmul`: in a bfloat16 / float16 model on sm_89+, torch._scaled_mm for per
tensor and per channel weights (tensorwise where the layer has one scale and the activations
one, rowwise with bfloat16 output otherwise), else the Triton kernel on the FP8 tensor cores
(block-wise weights: DeepSeek's per-group scaling); a float32 model, and GPUs before sm_89, take
the Triton kernel with the codes widened to fp16 (exact products, float32 sums), which agrees
with the CPU's emulation to float32 rounding. A fused layer's shards keep their own scales
(per-row scales, a rowwise GEMM) rather than vLLM's `requantize_with_max_scale`, which would
round them again and make CUDA compute other weights than the CPU. `weight` is then float8 on
CUDA: whoever needs the dense matrix asks `FP8LinearMethod.dequantized_weight` (LoRA wraps
`apply` and reads none).

A `kv_cache_scheme` ("static", compressed-tensors' per-tensor one) is read: its scales go to
the attention layers (`model_loader/kv_scales.py`). Not yet: MoE experts, transformers' own
per-tensor names (`weight_scale_inv` without blocks, `activation_scale`; vLLM reads neither).

Online (`quantization="fp8"` on a dense checkpoint): each linear weight of this rank, fused
shards together, gets one scale amax / 448 and is rounded to e4m3 at load (vLLM's
`ops.scaled_fp8_quant(weight, scale=None)`), then runs as a dynamic checkpoint.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ember.kernels.fp8_matmul import (
    DEQUANTIZE_ROWS,
    FP8_DTYPE,
    FP8_MAX,
    MIN_SCALING_FACTOR,
    FP8Weight,
    dequantize_weight,
    fp8_linear,
    quantize_dequantize_activations,
    rowwise_scaled_mm_works,
)
from ember.workers.layers.quantization.base import (
    LinearMethodBase,
    QuantizationConfig,
    WeightLoader,
)
from ember.workers.layers.quantization.group_quant import quantized_parameter
from ember.workers.layers.quantization.unquantized import make_parameter
from ember.workers.quantization_settings import FP8Settings, fp8_settings

# ---- online FP8's weight rounding (the other numerics: ember.kernels.fp8_matmul) ----------------


def quantize_weight_per_tensor(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 codes, float32 scale []) of a dense weight with one dynamic scale, amax / 448:
    vLLM's `ops.scaled_fp8_quant(weight, scale=None)` (forward_native's per-tensor rule)."""
    scale = (weight.abs().amax().float() / FP8_MAX).clamp(min=MIN_SCALING_FACTOR)
    inverse = scale.reciprocal()
    codes = torch.empty(weight.shape, dtype=FP8_DTYPE, device=weight.device)
    for start in range(0, weight.shape[0], DEQUANTIZE_ROWS):
        rows = weight[start : start + DEQUANTIZE_ROWS].float()
        codes[start : start + DEQUANTIZE_ROWS] = (rows * inverse).clamp(-FP8_MAX, FP8_MAX)
    return codes, scale


# ---- the linear method --------------------------------------------------------------------------


def _layer_classes():
    from ember.workers.layers import linear  # linear imports this package: import when used

    return linear


def output_partition_sizes(layer: nn.Module) -> list[int]:
    """This rank's output rows of each checkpoint module the layer fuses (vLLM's
    `output_partition_sizes`): [q, k, v] heads, [gate, up], or the whole output."""
    linear = _layer_classes()
    if isinstance(layer, linear.QKVParallelLinear):
        kv_rows = layer.num_kv_heads * layer.head_size
        return [layer.num_heads * layer.head_size, kv_rows, kv_rows]
    if isinstance(layer, linear.MergedColumnParallelLinear):
        return [size // layer.tp_size for size in layer.output_sizes]
    return [layer.output_size_per_partition]


def checkpoint_rows(layer: nn.Module, shard_id: Any = None) -> int:
    """Output rows of the checkpoint tensor a loader call brings: one fused module's whole
    (all ranks), or the fused tensor of all of them (`shard_id` None)."""
    linear = _layer_classes()
    if isinstance(layer, linear.QKVParallelLinear):
        q_rows = layer.total_num_heads * layer.head_size
        kv_rows = layer.total_num_kv_heads * layer.head_size
        rows = {None: q_rows + 2 * kv_rows, "q": q_rows, "k": kv_rows, "v": kv_rows}
        if shard_id not in rows:
            raise ValueError(f"QKVParallelLinear takes shard_id 'q', 'k' or 'v', got {shard_id!r}")
        return rows[shard_id]
    if isinstance(layer, linear.MergedColumnParallelLinear):
        return sum(layer.output_sizes) if shard_id is None else layer.output_sizes[shard_id]
    if isinstance(layer, linear.ColumnParallelLinear):
        return layer.output_size_per_partition * layer.tp_size
    return layer.output_size_per_partition  # row-parallel and replicated: every output


def validate_block_shape(
    layer: nn.Module, input_size: int, output_size: int, block_size: tuple[int, int]
) -> None:
    """vLLM's `validate_fp8_block_shape`: a row-parallel rank's inputs, and a column-parallel
    rank's (or a fused layer's) outputs of each module, must be whole blocks; a fused layer on
    one rank may end in a partial block."""
    block_n, block_k = block_size
    name = type(layer).__name__
    inputs = layer.input_size_per_partition
    if layer.tp_size > 1 and inputs != input_size and inputs % block_k:
        raise ValueError(
            f"{name}: weight input_size_per_partition = {inputs} (input size {input_size}, "
            f"tensor_parallel_size {layer.tp_size}) is not divisible by weight quantization "
            f"block_k = {block_k}; use another tensor_parallel_size"
        )
    sizes = output_partition_sizes(layer)
    split = layer.tp_size > 1 and layer.output_size_per_partition != output_size
    if not split and len(sizes) == 1:
        return
    for size in sizes if split else sizes[:-1]:
        if size % block_n:
            raise ValueError(
                f"{name}: weight output_partition_size = {size} (of {sizes}, "
                f"tensor_parallel_size {layer.tp_size}) is not divisible by weight quantization "
                f"block_n = {block_n}"
            )


def _shard_args(shard_id: Any) -> tuple:
    return () if shard_id is None else (shard_id,)


class FP8LinearMethod(LinearMethodBase):
    """A linear layer of an FP8 checkpoint (or FP8 at load): e4m3 codes and their scales are
    loaded; on CPU dequantized to the model's dtype once (`weight`), each matmul taking
    activations quantized as vLLM's (`quantize_dequantize_activations`); on CUDA kept in e4m3
    (`weight` float8_e4m3fn [N, K], `weight_scale` float32 per row) for the FP8 GEMM
    (`ember.kernels.fp8_matmul.fp8_linear`)."""

    def __init__(self, settings: FP8Settings):
        self.settings = settings
        self.block_size = settings.weight_block_size
        self.static = settings.activation_scheme == "static"
        # compressed-tensors' weight-only FP8: activations as they are, on the dense weight
        # (on CUDA too: no FP8 GEMM takes unquantized activations)
        self.weight_only = settings.activation_scheme == "none"

    def create_weights(
        self,
        layer: nn.Module,
        input_size_per_partition: int,
        output_size_per_partition: int,
        input_size: int,
        output_size: int,
        weight_loader: WeightLoader,
    ) -> None:
        layer.model_dtype = torch.get_default_dtype()
        if not self.settings.serialized:  # online: a dense weight, quantized once loaded
            layer.weight = make_parameter(
                output_size_per_partition, input_size_per_partition, weight_loader=weight_loader
            )
            return
        if self.block_size is not None:
            validate_block_shape(layer, input_size, output_size, self.block_size)
        scale_loader = partial(self._load_scale_rows, layer, weight_loader)
        layer.weight = quantized_parameter(
            (output_size_per_partition, input_size_per_partition),
            FP8_DTYPE,
            partial(self._load_codes, weight_loader),
            input_dim=1,
            output_dim=0,
        )
        if self.block_size is None:
            layer.weight_scale = quantized_parameter(
                (output_size_per_partition, 1),
                torch.float32,
                scale_loader,
                input_dim=None,
                output_dim=0,
            )
        else:  # the checkpoint's name: weight_scale_inv, or compressed-tensors' weight_scale
            block_scales = quantized_parameter(
                (
                    output_size_per_partition,
                    math.ceil(input_size_per_partition / self.block_size[1]),
                ),
                torch.float32,
                scale_loader,
                input_dim=1,
                output_dim=0,
            )
            setattr(layer, self.settings.block_scale_name, block_scales)
        if self.static:
            layer.input_scale = quantized_parameter(
                (), torch.float32, self._load_input_scale, input_dim=None, output_dim=None
            )
            layer.input_scale.data.fill_(-math.inf)

    @staticmethod
    def _load_codes(
        weight_loader: WeightLoader, param: nn.Parameter, loaded: torch.Tensor, shard_id=None
    ) -> None:
        if loaded.dtype != FP8_DTYPE:
            raise ValueError(
                f"an FP8 checkpoint's quantized weight must be float8_e4m3fn, got {loaded.dtype} "
                "(a layer the checkpoint keeps dense must be in its ignored_layers)"
            )
        weight_loader(param, loaded, *_shard_args(shard_id))

    def _load_scale_rows(
        self,
        layer: nn.Module,
        weight_loader: WeightLoader,
        param: nn.Parameter,
        loaded: torch.Tensor,
        shard_id=None,
    ) -> None:
        """Expand one checkpoint module's scales to its output rows (all ranks), then shard
        them as the layer shards its weight: a scalar to every row, [rows, 1] as it is, a
        block row of [ceil(rows / bn), .] to each of its bn rows."""
        if not loaded.is_floating_point():
            raise ValueError(f"FP8 weight scales must be floating point, got {loaded.dtype}")
        rows = checkpoint_rows(layer, shard_id)
        shape = tuple(loaded.shape)
        if self.block_size is not None:
            block_n = self.block_size[0]
            if loaded.dim() != 2 or shape[0] != math.ceil(rows / block_n):
                raise ValueError(
                    f"{self.settings.block_scale_name} of shape {shape} for {rows} output rows "
                    f"in blocks of "
                    f"{block_n}: expected [{math.ceil(rows / block_n)}, ceil(inputs / "
                    f"{self.block_size[1]})]"
                )
            expanded = loaded.repeat_interleave(block_n, dim=0)[:rows]
        elif loaded.numel() == 1:
            expanded = loaded.reshape(1, 1).expand(rows, 1)
        elif shape in ((rows, 1), (rows,)):
            expanded = loaded.reshape(rows, 1)
        else:
            raise ValueError(
                f"weight_scale of shape {shape}: expected one scale ([] or [1]) or one per "
                f"output row ([{rows}, 1])"
            )
        weight_loader(param, expanded, *_shard_args(shard_id))

    @staticmethod
    def _load_input_scale(param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        """The largest input scale of a fused layer's modules (vLLM: `input_scale.max()`)."""
        if loaded.numel() != 1:
            raise ValueError(f"input_scale must be one value, got shape {tuple(loaded.shape)}")
        value = loaded.reshape(()).to(param.device, torch.float32)
        param.data.copy_(torch.maximum(param.data, value))

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        if layer.weight.device.type == "cuda" and not self.weight_only:
            self._keep_float8(layer)
            return
        if not self.settings.serialized:
            codes, scale = quantize_weight_per_tensor(layer.weight.data)
            dense = dequantize_weight(codes, scale, dtype=layer.model_dtype)
        elif self.block_size is None:
            dense = dequantize_weight(
                layer.weight.data, layer.weight_scale.data, dtype=layer.model_dtype
            )
            del layer.weight_scale
        else:
            scales = getattr(layer, self.settings.block_scale_name).data
            dense = dequantize_weight(
                layer.weight.data, scales, self.block_size[1], dtype=layer.model_dtype
            )
            delattr(layer, self.settings.block_scale_name)
        layer.weight = nn.Parameter(dense, requires_grad=False)

    def _keep_float8(self, layer: nn.Module) -> None:
        """CUDA: `weight` stays e4m3 [N, K] (row-major: `weight.t()` is the column-major
        operand torch._scaled_mm takes), `weight_scale` float32 [N, 1] or, block-wise,
        [N, ceil(K / bk)]: each row its scales, so a fused layer's shards keep their own
        (`fp8_one_scale`: every row the same, which torch._scaled_mm's tensorwise GEMM takes)."""
        if not self.settings.serialized:
            codes, scale = quantize_weight_per_tensor(layer.weight.data)
            scales = scale.reshape(1, 1).expand(codes.shape[0], 1)
        elif self.block_size is None:
            codes, scales = layer.weight.data, layer.weight_scale.data
        else:
            codes = layer.weight.data
            scales = getattr(layer, self.settings.block_scale_name).data
            delattr(layer, self.settings.block_scale_name)
        layer.weight = nn.Parameter(codes.contiguous(), requires_grad=False)
        layer.weight_scale = nn.Parameter(scales.float().contiguous(), requires_grad=False)
        layer.fp8_one_scale = self.block_size is None and bool(
            (layer.weight_scale == layer.weight_scale[:1]).all()
        )
        rowwise_scaled_mm_works(layer.weight.device)  # probed once, before any graph capture

    def fp8_weight(self, layer: nn.Module) -> FP8Weight:
        """The CUDA layer's weight as the FP8 GEMM reads it."""
        group_k = None if self.block_size is None else self.block_size[1]
        return FP8Weight(layer.weight, layer.weight_scale, group_k, layer.fp8_one_scale)

    def dequantized_weight(self, layer: nn.Module) -> torch.Tensor:
        """The layer's weight [N, K] in the model's dtype, dense whatever form it is held in
        (made on demand on CUDA, for whoever needs the dense matrix)."""
        if layer.weight.dtype == FP8_DTYPE:
            return self.fp8_weight(layer).dequantize(layer.model_dtype)
        return layer.weight

    def apply(
        self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        input_scale = layer.input_scale if self.static else None
        weight = layer.weight
        if weight.dtype == FP8_DTYPE:  # CUDA: the FP8 GEMM
            out = fp8_linear(x, self.fp8_weight(layer), input_scale)
        elif self.weight_only:
            out = F.linear(x.to(weight.dtype), weight).to(x.dtype)
        else:
            group_size = None if self.block_size is None else self.block_size[1]
            x_dq = quantize_dequantize_activations(x, input_scale, group_size)
            out = F.linear(x_dq.to(weight.dtype), weight).to(x.dtype)
        return out if bias is None else out + bias


class FP8Config(QuantizationConfig):
    """The `quantization_config` of an FP8 checkpoint, or FP8 at load (`online`). MoE experts
    are FP8 linear layers too, one per expert and projection (`fused_moe.FusedMoE`)."""

    quantizes_experts = True

    def __init__(self, settings: dict[str, Any], *, serialized: bool = True):
        self.settings = fp8_settings(settings, serialized)

    @classmethod
    def online(cls) -> FP8Config:
        """`quantization="fp8"` for a checkpoint without a quantization_config: each linear
        weight quantized per tensor at load, activations per token (vLLM's
        `Fp8Config(is_checkpoint_fp8_serialized=False)`)."""
        return cls({"activation_scheme": "dynamic"}, serialized=False)

    @classmethod
    def get_name(cls) -> str:
        return "fp8"

    def is_layer_skipped(self, checkpoint_name: str) -> bool:
        """vLLM's `is_layer_skipped` for "fp8": the module's full name is listed (no prefix or
        substring match); a fused layer's parts must agree (`skip_dense_layers`)."""
        return checkpoint_name in self.settings.ignored_layers

    def get_quant_method(self, layer: nn.Module):
        from ember.workers.layers.embedding import VocabParallelEmbedding
        from ember.workers.layers.quantization.unquantized import UnquantizedEmbeddingMethod

        if isinstance(layer, VocabParallelEmbedding):  # vLLM's LM head stays dense too
            return UnquantizedEmbeddingMethod()
        return FP8LinearMethod(self.settings)
