"""W8A8 FP8 matmul of `quantization="fp8"` layers (and compressed-tensors' float-quantized ones):
y = (x_q * s_x) @ (w_q * s_w).T with e4m3 codes on both sides. Called by `layers/quantization/
fp8.py` on CUDA; the plain-torch path here (dequantize, then a float32 matmul) is the reference
and vLLM's numerics (its `QuantFP8.forward_native` activation quantization) live here too.

A weight (`FP8Weight`) is its e4m3 codes [N, K], row-major, and float32 scales per output row:

    scales [N, 1]                  per tensor or per channel (`one_scale`: every row the same)
    scales [N, ceil(K / group_k)]  128 x 128 blocks: row n holds its block row, group g the
                                   inputs g * group_k .. (g + 1) * group_k - 1

Activations are quantized per call (`quantize_activations`): scales [] (static, the checkpoint's
input_scale), [M, 1] (dynamic per token) or [M, G] (per token and group of group_k inputs).

On CUDA (`fp8_matmul`), by output dtype and GPU:

    bf16 / fp16, sm_89+   one scale a side (static x, per-tensor w)  torch._scaled_mm tensorwise
                          per token / row, bf16 out, M > 16          torch._scaled_mm rowwise
                          otherwise (blocks, fp16 rowwise, rowwise   Triton, fp8 tl.dot
                          at M <= 16, N or K not multiples of 16)
    float32, or < sm_89   any                                        Triton, codes widened to fp16

Hopper's FP8 MMA does not add in full float32 (~2e-4 of the largest output on an H200), so a
float32 model takes the exact kernel and agrees with the CPU's emulation to float32 rounding;
`fp8_tensor_cores=True` forces the fast path.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
# vLLM's smallest dynamic scale (input_quant_fp8.py `_FP8_MIN_SCALING_FACTOR`)
MIN_SCALING_FACTOR = 1.0 / (FP8_MAX * 512.0)
DEQUANTIZE_ROWS = 1024  # rows dequantized at a time (bounds the float32 temporary)
SCALED_MM_ALIGNMENT = 16  # torch._scaled_mm: K and N multiples of this
# decode batches up to this many tokens take the Triton kernel rather than torch._scaled_mm's
# rowwise GEMM: on an H200 (Llama-3.1-8B shapes, tools/gpu_check_fp8.py) Triton took 11-33 us
# where rowwise took 17-46 us at M = 1 and 16; at M = 512 rowwise was 1.4-2.7x the faster
ROWWISE_MIN_TOKENS = 17


@dataclass(frozen=True, slots=True)
class FP8Weight:
    """A [N, K] weight for x @ w.T as `fp8_matmul` reads it (see the module docstring)."""

    codes: torch.Tensor  # float8_e4m3fn [N, K], row-major
    scales: torch.Tensor  # float32 [N, 1] or [N, ceil(K / group_k)]
    group_k: int | None = None  # inputs per scale group (block-wise), None: one scale a row
    one_scale: bool = False  # every row has the same scale (per tensor): tensorwise GEMMs

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """w [N, K] in `dtype` (float32 products, rounded once)."""
        return dequantize_weight(self.codes, self.scales, self.group_k, dtype)


# ---- numerics: vLLM's activation quantization and weight (de)quantization, plain torch ----------


def _quantize_groups(x32: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(codes [..., G, group_size], scales [..., G, 1], inputs) of float32 x [..., K]; vLLM pads
    a last partial group with zeros and divides by the scale."""
    inputs = x32.shape[-1]
    padding = -inputs % group_size
    groups = F.pad(x32, (0, padding)).unflatten(-1, (-1, group_size))
    scale = (groups.abs().amax(-1, keepdim=True) / FP8_MAX).clamp(min=MIN_SCALING_FACTOR)
    return (groups / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale, inputs


def quantize_activations(
    x: torch.Tensor, input_scale: torch.Tensor | None = None, group_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_q e4m3 [..., K], float32 scales) of x [..., K], vLLM's `QuantFP8.forward_native`:
    `input_scale` (static) gives scales [] and x * (1 / s); dynamic, scales max(|x|) / 448 (at
    least `MIN_SCALING_FACTOR`) per token, [..., 1], or per token and group of `group_size`
    inputs, [..., G] (x / s)."""
    x32 = x.float()
    if input_scale is not None:
        scale = input_scale.float()
        return (x32 * scale.reciprocal()).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale
    if group_size is None:
        scale = (x32.abs().amax(-1, keepdim=True) / FP8_MAX).clamp(min=MIN_SCALING_FACTOR)
        return (x32 * scale.reciprocal()).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale
    codes, scale, inputs = _quantize_groups(x32, group_size)
    return codes.flatten(-2)[..., :inputs], scale.squeeze(-1)


def quantize_dequantize_activations(
    x: torch.Tensor, input_scale: torch.Tensor | None = None, group_size: int | None = None
) -> torch.Tensor:
    """x [..., K] as vLLM's FP8 GEMMs see it, float32: x_q * s (`quantize_activations`)."""
    if input_scale is None and group_size is not None:
        codes, scale, inputs = _quantize_groups(x.float(), group_size)
        return (codes.float() * scale).flatten(-2)[..., :inputs]
    codes, scale = quantize_activations(x, input_scale)
    return codes.float() * scale


def dequantize_activations(
    codes: torch.Tensor, scales: torch.Tensor, group_size: int | None = None
) -> torch.Tensor:
    """x_q * s, float32 [M, K], of `quantize_activations`' (codes, scales)."""
    if scales.dim() == 2 and scales.shape[1] > 1:
        scales = scales.repeat_interleave(group_size, dim=1)[:, : codes.shape[1]]
    return codes.float() * scales


def dequantize_weight(
    codes: torch.Tensor,
    row_scales: torch.Tensor,
    block_k: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """codes e4m3 [N, K] times their scales -> [N, K] in `dtype` (float32 products, rounded
    once), a few rows at a time. `row_scales`: [N, 1] (per tensor or channel), [] (one), or
    [N, ceil(K / block_k)] (each row's block row of a block-wise checkpoint)."""
    out = torch.empty(codes.shape, dtype=dtype, device=codes.device)
    inputs = codes.shape[1]
    for start in range(0, codes.shape[0], DEQUANTIZE_ROWS):
        rows = slice(start, start + DEQUANTIZE_ROWS)
        scale = row_scales if row_scales.dim() == 0 else row_scales[rows].float()
        if block_k is not None:
            scale = scale.repeat_interleave(block_k, dim=1)[:, :inputs]
        out[rows] = codes[rows].float() * scale
    return out


WEIGHT_LAYOUTS = ("tensor", "row", "block")


def quantize_weight(
    weight: torch.Tensor, layout: str, block_size: tuple[int, int] = (128, 128)
) -> FP8Weight:
    """An `FP8Weight` of a dense [N, K] weight: one scale amax / 448 ("tensor"), one a row
    ("row"), or one a `block_size` block ("block", DeepSeek's / transformers' rule), each
    block's scale held by its rows. For tests and benchmarks."""
    if layout not in WEIGHT_LAYOUTS:
        raise ValueError(f"layout must be one of {WEIGHT_LAYOUTS}, got {layout!r}")
    w32 = weight.float()
    outputs, inputs = w32.shape
    if layout == "block":
        block_n, block_k = block_size
        padded = F.pad(w32, (0, -inputs % block_k, 0, -outputs % block_n))
        blocks = padded.unflatten(0, (-1, block_n)).unflatten(2, (-1, block_k))  # [Nb, bn, Kb, bk]
        scale = (blocks.abs().amax((1, 3)) / FP8_MAX).clamp(min=MIN_SCALING_FACTOR)  # [Nb, Kb]
        row_scales = scale.repeat_interleave(block_n, dim=0)[:outputs]
        expanded = row_scales.repeat_interleave(block_k, dim=1)[:, :inputs]
        codes = (w32 / expanded).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
        return FP8Weight(codes, row_scales.contiguous(), block_k)
    if layout == "tensor":
        scale = (w32.abs().amax() / FP8_MAX).clamp(min=MIN_SCALING_FACTOR).expand(outputs, 1)
    else:
        scale = (w32.abs().amax(1, keepdim=True) / FP8_MAX).clamp(min=MIN_SCALING_FACTOR)
    codes = (w32 / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return FP8Weight(codes, scale.contiguous(), None, one_scale=layout == "tensor")


# ---- the matmul ---------------------------------------------------------------------------------


def fp8_linear(
    x: torch.Tensor,
    weight: FP8Weight,
    input_scale: torch.Tensor | None = None,
    *,
    fp8_tensor_cores: bool | None = None,
) -> torch.Tensor:
    """x [..., K] @ w.T -> [..., N] in x's dtype, the activations quantized as vLLM's: static
    by `input_scale`, else per token (per token and group of `weight.group_k` inputs for a
    block-wise weight)."""
    outputs, inputs = weight.shape
    leading = x.shape[:-1]
    x = x.reshape(-1, inputs)
    if x.shape[0] == 0:
        return x.new_empty(*leading, outputs)
    codes, scales = quantize_activations(x, input_scale, weight.group_k)
    out = fp8_matmul(codes, scales, weight, x.dtype, fp8_tensor_cores=fp8_tensor_cores)
    return out.view(*leading, outputs)


def fp8_linear_torch(
    x: torch.Tensor, weight: FP8Weight, input_scale: torch.Tensor | None = None
) -> torch.Tensor:
    """The oracle (ember's CPU emulation): x quantized and dequantized as vLLM's GEMMs see it,
    times the dequantized weight, float32; -> [..., N] in x's dtype."""
    x_dq = quantize_dequantize_activations(x, input_scale, weight.group_k)
    return F.linear(x_dq, weight.dequantize()).to(x.dtype)


def fp8_matmul(
    codes: torch.Tensor,
    scales: torch.Tensor,
    weight: FP8Weight,
    out_dtype: torch.dtype,
    *,
    fp8_tensor_cores: bool | None = None,
) -> torch.Tensor:
    """(codes [M, K] * scales) @ w.T -> [M, N] in `out_dtype`, activations as
    `quantize_activations` gives them. CPU tensors take the reference; CUDA ones the table of
    the module docstring (`fp8_tensor_cores`: default for half-precision outputs on sm_89+)."""
    if codes.device.type != "cuda":
        return fp8_matmul_torch(codes, scales, weight, out_dtype)
    if fp8_tensor_cores is None:
        fp8_tensor_cores = out_dtype != torch.float32
    fp8_tensor_cores = fp8_tensor_cores and has_fp8_tensor_cores(codes.device)
    if fp8_tensor_cores and weight.group_k is None:
        out = _scaled_mm_or_none(codes, scales, weight, out_dtype)
        if out is not None:
            return out
    from ember.kernels.fp8_matmul_triton import fp8_matmul_triton, triton_takes

    if triton_takes(weight):
        return fp8_matmul_triton(codes, scales, weight, out_dtype, fp8_dot=fp8_tensor_cores)
    return fp8_matmul_torch(codes, scales, weight, out_dtype)


def fp8_matmul_torch(
    codes: torch.Tensor, scales: torch.Tensor, weight: FP8Weight, out_dtype: torch.dtype
) -> torch.Tensor:
    """The reference: both sides dequantized to float32, multiplied in float32."""
    x_dq = dequantize_activations(codes, scales, weight.group_k)
    return F.linear(x_dq, weight.dequantize()).to(out_dtype)


@functools.cache
def has_fp8_tensor_cores(device: torch.device) -> bool:
    """sm_89+ (Ada, Hopper, Blackwell): FP8 MMA, torch._scaled_mm and Triton's fp8 tl.dot."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


@functools.cache
def rowwise_scaled_mm_works(device: torch.device) -> bool:
    """Whether torch._scaled_mm takes per-row scales here (CUTLASS's kernel on sm_89 and
    sm_90, in most builds): tried once on a 16 x 16 product. Its checks raise before any launch,
    so a first call inside a CUDA graph capture is safe; FP8 layers call it at load."""
    if not has_fp8_tensor_cores(device):
        return False
    size = SCALED_MM_ALIGNMENT
    a = torch.zeros(size, size, device=device).to(FP8_DTYPE)
    ones = torch.ones(size, 1, device=device)
    try:
        torch._scaled_mm(a, a.t(), scale_a=ones, scale_b=ones.t(), out_dtype=torch.bfloat16)
    except RuntimeError:
        return False
    return True


def _scaled_mm_or_none(
    codes: torch.Tensor, scales: torch.Tensor, weight: FP8Weight, out_dtype: torch.dtype
) -> torch.Tensor | None:
    """torch._scaled_mm where it takes the call: K and N multiples of 16, codes row-major and
    the weight column-major (`codes.t()` of the row-major [N, K]); one scale on both sides
    (tensorwise: any output dtype), or per token and per row (rowwise: bfloat16 output)."""
    outputs, inputs = weight.shape
    if inputs % SCALED_MM_ALIGNMENT or outputs % SCALED_MM_ALIGNMENT:
        return None
    if codes.stride(1) != 1 or codes.stride(0) != inputs:
        codes = codes.contiguous()
    tokens = codes.shape[0]
    if scales.numel() == 1 and weight.one_scale:
        scale_a, scale_b = scales.reshape(()), weight.scales[0, 0]
    elif (
        out_dtype == torch.bfloat16
        and tokens >= ROWWISE_MIN_TOKENS
        and rowwise_scaled_mm_works(codes.device)
    ):
        scale_a = scales.reshape(1, 1).expand(tokens, 1) if scales.numel() == 1 else scales
        scale_a, scale_b = scale_a.contiguous(), weight.scales.view(1, outputs)
    else:
        return None
    return torch._scaled_mm(
        codes, weight.codes.t(), scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype
    )
