"""Quantized Hugging Face checkpoints for tests: GPTQ and AWQ GEMM directories written from a dense
Llama the way the ecosystem's tools write them, and a plain-torch dequantizer that reads one back
(the oracle for ember's quantized loaders).

Layouts followed (W is a linear's weight [N out, K in], q its codes, z its zero points, s its scales):

  GPTQ, AutoGPTQ 0.7.1 `qlinear_cuda(_old).QuantLinear.pack`, GPTQModel 7.7 `pack_original` and
  `convert_gptq_v2_to_v1_format_module` (vLLM: `gptq.py`, `quant_utils.py`), pack = 32 // bits:
    qweight int32 [K / pack, N]   word (i, n) = sum_p q[n, i*pack + p] << (p * bits)
    qzeros  int32 [G, N / pack]   word (g, j) = sum_p z'[g, j*pack + p] << (p * bits)
    scales  fp16  [G, N]          g_idx int32 [K]: the group of input column k
    W[n, k] = s[g_idx[k], n] * (q[n, k] - z[g_idx[k], n])
    z' = z - 1 for checkpoint_format "gptq" (v1: loaders add 1 back), z' = z for "gptq_v2".

  AWQ GEMM, AutoAWQ 0.2.9 `awq/modules/linear/gemm.py` `WQLinear_GEMM.from_linear` (readers:
  AutoAWQ `utils/packing_utils.py`, vLLM `awq_triton.py`, with AWQ_REVERSE_ORDER), 4-bit only:
    qweight int32 [K, N / 8]      nibble i of word (k, c) holds column 8c + AWQ_ORDER[i]
    qzeros  int32 [G, N / 8]      the same interleave, zero points stored as they are
    scales  fp16  [G, N]          W[n, k] = (q[n, k] - z[k // group, n]) * s[k // group, n]
"""

from __future__ import annotations

import glob
import json
import os
import shutil

import torch
from safetensors.torch import load_file, save_file

# Llama's projections, and Mixtral's expert names (w1 gate, w3 up, w2 down)
QUANTIZED_LINEARS = (
    *("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    *("w1", "w2", "w3"),
)

# nibble i of an AWQ word holds column 8c + AWQ_ORDER[i]; column 8c + j sits in nibble
# AWQ_REVERSE_ORDER[j] (the inverse permutation, which readers apply after unpacking).
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)

GPTQ_FORMATS = ("gptq", "gptq_v2")
GPTQMODEL_VERSION = "7.7.0"  # the version whose config keys `write_gptq_checkpoint` reproduces

_PACKED_SUFFIXES = (".qweight", ".qzeros", ".scales", ".g_idx")
_WEIGHT_FILE = "model.safetensors"


# ---- packing ----------------------------------------------------------------------------------


def pack_int32(codes: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Pack `bits`-bit codes along `dim` into int32 words, lowest bits first.

    Word i holds codes i*pack .. i*pack + pack - 1 (pack = 32 // bits) at bit offsets
    0, bits, 2*bits, ...; words are two's complement, so a high code in the top field makes
    a negative int32, as in the tools' numpy uint32 -> int32 casts.
    """
    mask = (1 << bits) - 1
    if bool((codes < 0).any()) or bool((codes > mask).any()):
        raise ValueError(f"codes must be in [0, {mask}] for bits={bits}")
    pack = 32 // bits
    moved = codes.to(torch.int64).movedim(dim, -1)
    if moved.shape[-1] % pack:
        raise ValueError(f"dimension {dim} ({moved.shape[-1]}) is not a multiple of {pack}")
    shifts = torch.arange(0, 32, bits, dtype=torch.int64)
    words = (moved.unflatten(-1, (-1, pack)) << shifts).sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return words.movedim(-1, dim).contiguous()


def unpack_int32(words: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Codes (int64) of int32 words packed along `dim` by `pack_int32`."""
    moved = words.to(torch.int64).movedim(dim, -1) & 0xFFFFFFFF
    shifts = torch.arange(0, 32, bits, dtype=torch.int64)
    codes = (moved.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return codes.flatten(-2).movedim(-1, dim).contiguous()


def _awq_interleave(columns: int) -> torch.Tensor:
    """Column index whose code goes to each packed position: position 8c + i <- 8c + AWQ_ORDER[i]."""
    return torch.arange(columns).view(-1, 8)[:, list(AWQ_ORDER)].flatten()


def _awq_deinterleave(columns: int) -> torch.Tensor:
    """Packed position of each column: column 8c + j <- position 8c + AWQ_REVERSE_ORDER[j]."""
    return torch.arange(columns).view(-1, 8)[:, list(AWQ_REVERSE_ORDER)].flatten()


# ---- quantization -----------------------------------------------------------------------------


def _fp16_at_least(values: torch.Tensor) -> torch.Tensor:
    """`values` in float16, rounded up, so that a range sized by them stays covered."""
    half = values.to(torch.float16)
    up = torch.nextafter(half, torch.full_like(half, float("inf")))
    return torch.where(half.float() < values, up, half)


def quantize_groups(
    weight: torch.Tensor, bits: int, group_size: int, sym: bool, perm: torch.Tensor, min_zero: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest group quantization of weight [N, K] in the column order `perm`.

    Group g is the columns perm[g*size : (g+1)*size] (GPTQ's act-order: g_idx[perm[i]] =
    i // size). The range of a group includes 0, as GPTQ's quantizer has it; sym uses zero
    2**(bits-1) and scale 2*amax / maxq. Scales are rounded up to float16 so that every value
    lies within half a step of a code. `min_zero` 1 keeps zero points >= 1 (GPTQ v1 stores
    z - 1 and cannot hold 0) by widening the scale of groups that would get 0.
    Returns (codes [N, K] int64, scales [G, N] fp16, zeros [G, N] int64, g_idx [K] int64).
    """
    weight = weight.float()
    in_features = weight.shape[1]
    size = in_features if group_size == -1 else group_size
    g_idx = torch.empty(in_features, dtype=torch.int64)
    g_idx[perm] = torch.arange(in_features) // size
    grouped = weight[:, perm].unflatten(1, (in_features // size, size))
    xmin = grouped.amin(-1).clamp(max=0)
    xmax = grouped.amax(-1).clamp(min=0)
    maxq = 2**bits - 1
    if sym:
        scale = 2 * torch.maximum(-xmin, xmax) / maxq
        scale = _fp16_at_least(torch.where(scale > 0, scale, torch.ones_like(scale)))
        zero = torch.full(scale.shape, 2 ** (bits - 1), dtype=torch.int64)
    else:
        scale = (xmax - xmin) / maxq
        scale = _fp16_at_least(torch.where(scale > 0, scale, torch.ones_like(scale)))
        zero = torch.round(-xmin / scale.float()).to(torch.int64)
        if min_zero:
            widened = _fp16_at_least(torch.maximum(xmax / (maxq - 1), -xmin).clamp(min=1e-6))
            scale = torch.where(zero < min_zero, widened, scale)
            zero = zero.clamp(min=min_zero)
    scale_per_column = scale.float()[:, g_idx]
    codes = torch.round(weight / scale_per_column + zero[:, g_idx]).clamp(0, maxq)
    return codes.to(torch.int64), scale.T.contiguous(), zero.T.contiguous(), g_idx


# ---- checkpoint files -------------------------------------------------------------------------


def _quantized_module(name: str) -> str | None:
    """The module name of a decoder-layer linear's weight or bias, else None."""
    module, _, param = name.rpartition(".")
    if param not in ("weight", "bias") or ".layers." not in module:
        return None
    return module if module.rpartition(".")[2] in QUANTIZED_LINEARS else None


def _input_key(module: str) -> str:
    """The linears of one decoder layer that read the same input share a key."""
    for group in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("w1", "w3")):
        for part in group:
            if module.endswith("." + part):
                return module[: -len(part)] + "+".join(group)
    return module


def read_tensors(model_dir: str) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors files of a directory (one file or shards)."""
    paths = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if not paths:
        raise FileNotFoundError(f"no .safetensors file in {model_dir}")
    tensors: dict[str, torch.Tensor] = {}
    for path in paths:
        tensors.update(load_file(path))
    return tensors


def _read_config(model_dir: str) -> dict:
    with open(os.path.join(model_dir, "config.json")) as f:
        return json.load(f)


def _write_json(path: str, content: dict) -> None:
    with open(path, "w") as f:
        f.write(json.dumps(content, indent=2, sort_keys=True) + "\n")


def _copy_side_files(src_dir: str, out_dir: str, skip: tuple[str, ...] = ()) -> None:
    """Copy tokenizer, generation config and other files; not weights or config.json."""
    for entry in os.listdir(src_dir):
        path = os.path.join(src_dir, entry)
        weights = entry.endswith((".safetensors", ".bin", ".safetensors.index.json"))
        if os.path.isfile(path) and not weights and entry not in ("config.json", *skip):
            shutil.copy2(path, os.path.join(out_dir, entry))


def _write_checkpoint(
    src_dir: str,
    out_dir: str,
    tensors: dict[str, torch.Tensor],
    config: dict,
    skip: tuple[str, ...] = (),
) -> str:
    os.makedirs(out_dir, exist_ok=True)
    _copy_side_files(src_dir, out_dir, skip)
    contiguous = {name: tensor.contiguous() for name, tensor in tensors.items()}
    save_file(contiguous, os.path.join(out_dir, _WEIGHT_FILE), metadata={"format": "pt"})
    _write_json(os.path.join(out_dir, "config.json"), config)
    return out_dir


def _check_shape(
    name: str, weight: torch.Tensor, group_size: int, out_multiple: int, in_multiple: int
) -> None:
    out_features, in_features = weight.shape
    if group_size != -1 and in_features % group_size:
        raise ValueError(f"{name}: in_features {in_features} is not a multiple of {group_size}")
    if in_features % in_multiple or out_features % out_multiple:
        raise ValueError(
            f"{name}: shape {tuple(weight.shape)} needs out % {out_multiple} == 0 and "
            f"in % {in_multiple} == 0"
        )


# ---- writers ----------------------------------------------------------------------------------


def gptq_quantization_config(
    bits: int, group_size: int, sym: bool, desc_act: bool, checkpoint_format: str
) -> dict:
    """`quantization_config` as GPTQModel 7.7 writes it (`QuantizeConfig.to_dict` after
    `save_quantized` fills `meta`; run-time-only meta such as offload paths left out)."""
    return {
        "bits": bits,
        "group_size": group_size,
        "desc_act": desc_act,
        "sym": sym,
        "lm_head": False,
        "method": "gptq",
        "quant_method": "gptq",
        "format": checkpoint_format,
        "checkpoint_format": checkpoint_format,
        "pack_dtype": "int32",
        "meta": {
            "quantizer": [f"gptqmodel:{GPTQMODEL_VERSION}"],
            "uri": "https://github.com/modelcloud/gptqmodel",
            "damp_percent": 0.05,
            "damp_auto_increment": 0.01,
            "static_groups": False,
            "true_sequential": True,
            "mse": 0.0,
            "act_group_aware": False,
        },
    }


def write_gptq_checkpoint(
    dense_dir: str,
    out_dir: str,
    *,
    bits: int = 4,
    group_size: int = 128,
    sym: bool = True,
    desc_act: bool = False,
    checkpoint_format: str = "gptq",
    seed: int = 0,
    lm_head: bool = False,
) -> str:
    """Write a GPTQ checkpoint of the dense directory `dense_dir` to `out_dir`.

    Quantizes the decoder layers' q/k/v/o/gate/up/down projections (and with `lm_head` the
    LM head, as GPTQModel's lm_head=True does); other tensors are kept
    as they are, biases of quantized linears become float16 (as the tools' `pack` stores them).
    desc_act draws a random column order from `seed` per input: q/k/v share one, gate/up one,
    as GPTQ's act-order (by the Hessian of the shared input) gives them.
    """
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    if group_size != -1 and group_size <= 0:
        raise ValueError(f"group_size must be -1 or positive, got {group_size}")
    if checkpoint_format not in GPTQ_FORMATS:
        raise ValueError(
            f"checkpoint_format must be one of {GPTQ_FORMATS}, got {checkpoint_format}"
        )
    pack = 32 // bits
    generator = torch.Generator().manual_seed(seed)
    orders: dict[str, torch.Tensor] = {}
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in read_tensors(dense_dir).items():
        module = _quantized_module(name)
        if lm_head and name == "lm_head.weight":
            module = "lm_head"
        if module is None:
            tensors[name] = tensor
        elif name.endswith(".bias"):
            tensors[name] = tensor.to(torch.float16)
        else:
            _check_shape(name, tensor, group_size, out_multiple=pack, in_multiple=pack)
            in_features = tensor.shape[1]
            if desc_act:  # one order per input, as GPTQ's shared Hessian gives q/k/v, gate/up
                key = _input_key(module)
                if key not in orders:
                    orders[key] = torch.randperm(in_features, generator=generator)
                perm = orders[key]
            else:
                perm = torch.arange(in_features)
            min_zero = 1 if checkpoint_format == "gptq" else 0
            codes, scales, zeros, g_idx = quantize_groups(
                tensor, bits, group_size, sym, perm, min_zero
            )
            stored_zeros = zeros - 1 if checkpoint_format == "gptq" else zeros
            tensors[f"{module}.qweight"] = pack_int32(codes.T, bits, dim=0)
            tensors[f"{module}.qzeros"] = pack_int32(stored_zeros, bits, dim=1)
            tensors[f"{module}.scales"] = scales
            tensors[f"{module}.g_idx"] = g_idx.to(torch.int32)
    quantization_config = gptq_quantization_config(
        bits, group_size, sym, desc_act, checkpoint_format
    )
    quantization_config["lm_head"] = lm_head
    config = {**_read_config(dense_dir), "quantization_config": quantization_config}
    _write_checkpoint(dense_dir, out_dir, tensors, config)
    _write_json(os.path.join(out_dir, "quantize_config.json"), quantization_config)
    return out_dir


def write_awq_checkpoint(
    dense_dir: str, out_dir: str, *, group_size: int = 128, seed: int = 0
) -> str:
    """Write an AutoAWQ GEMM checkpoint (4-bit, zero points) of `dense_dir` to `out_dir`.

    `seed` is accepted for symmetry with `write_gptq_checkpoint`; AWQ draws nothing.
    """
    del seed
    if group_size != -1 and group_size <= 0:
        raise ValueError(f"group_size must be -1 or positive, got {group_size}")
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in read_tensors(dense_dir).items():
        module = _quantized_module(name)
        if module is None:
            tensors[name] = tensor
        elif name.endswith(".bias"):
            tensors[name] = tensor.to(torch.float16)
        else:
            _check_shape(name, tensor, group_size, out_multiple=8, in_multiple=1)
            out_features, in_features = tensor.shape
            codes, scales, zeros, _ = quantize_groups(
                tensor, 4, group_size, False, torch.arange(in_features), min_zero=0
            )
            order = _awq_interleave(out_features)
            tensors[f"{module}.qweight"] = pack_int32(codes.T[:, order], 4, dim=1)
            tensors[f"{module}.qzeros"] = pack_int32(zeros[:, order], 4, dim=1)
            tensors[f"{module}.scales"] = scales
    quantization_config = {
        "quant_method": "awq",
        "bits": 4,
        "group_size": group_size,
        "zero_point": True,
        "version": "gemm",
        "modules_to_not_convert": None,
    }
    config = {**_read_config(dense_dir), "quantization_config": quantization_config}
    return _write_checkpoint(dense_dir, out_dir, tensors, config)


# ---- the oracle -------------------------------------------------------------------------------


def _dequantize_gptq(
    tensors: dict[str, torch.Tensor], module: str, bits: int, group_size: int, v2: bool
) -> torch.Tensor:
    codes = unpack_int32(tensors[f"{module}.qweight"], bits, dim=0)  # [K, N]
    zeros = unpack_int32(tensors[f"{module}.qzeros"], bits, dim=1)  # [G, N]
    if not v2:
        zeros = zeros + 1
    scales = tensors[f"{module}.scales"].float()
    in_features = codes.shape[0]
    if f"{module}.g_idx" in tensors:
        g_idx = tensors[f"{module}.g_idx"].long()
    else:
        g_idx = torch.arange(in_features) // (in_features if group_size == -1 else group_size)
    weight = scales[g_idx] * (codes - zeros[g_idx]).float()
    return weight.T.contiguous()


def _dequantize_awq(tensors: dict[str, torch.Tensor], module: str, group_size: int) -> torch.Tensor:
    packed = unpack_int32(tensors[f"{module}.qweight"], 4, dim=1)  # [K, N], interleaved
    order = _awq_deinterleave(packed.shape[1])
    codes = packed[:, order]
    zeros = unpack_int32(tensors[f"{module}.qzeros"], 4, dim=1)[:, order]
    scales = tensors[f"{module}.scales"].float()
    in_features = codes.shape[0]
    g_idx = torch.arange(in_features) // (in_features if group_size == -1 else group_size)
    weight = (codes - zeros[g_idx]).float() * scales[g_idx]
    return weight.T.contiguous()


def dequantize_checkpoint(quant_dir: str) -> dict[str, torch.Tensor]:
    """Every tensor of a GPTQ or AWQ GEMM checkpoint, each quantized linear's packed tensors
    replaced by `<module>.weight` float32 [out, in], dequantized by the format's rule."""
    quantization_config = _read_config(quant_dir).get("quantization_config")
    if not quantization_config:
        raise ValueError(f"{quant_dir}/config.json has no quantization_config")
    method = quantization_config["quant_method"]
    bits = quantization_config["bits"]
    group_size = quantization_config["group_size"]
    tensors = read_tensors(quant_dir)
    modules = [name[: -len(".qweight")] for name in tensors if name.endswith(".qweight")]
    dense: dict[str, torch.Tensor] = {}
    for module in modules:
        if method == "gptq":
            fmt = quantization_config.get(
                "checkpoint_format", quantization_config.get("format", "gptq")
            )
            if fmt not in GPTQ_FORMATS:
                raise ValueError(f"checkpoint_format must be one of {GPTQ_FORMATS}, got {fmt}")
            weight = _dequantize_gptq(tensors, module, bits, group_size, v2=fmt == "gptq_v2")
        elif method == "awq":
            if quantization_config.get("version", "gemm") != "gemm" or bits != 4:
                raise ValueError("only 4-bit AWQ GEMM checkpoints are supported")
            weight = _dequantize_awq(tensors, module, group_size)
        else:
            raise ValueError(f"quant_method must be 'gptq' or 'awq', got {method!r}")
        dense[f"{module}.weight"] = weight
    packed = {module + suffix for module in modules for suffix in _PACKED_SUFFIXES}
    for name, tensor in tensors.items():
        if name not in packed:
            dense[name] = tensor
    return dense


def write_dequantized_checkpoint(quant_dir: str, out_dir: str) -> str:
    """Write the dense float32 directory of a quantized checkpoint, for transformers'
    `AutoModelForCausalLM`: the reference a quantized ember model is compared with."""
    tensors = {
        name: tensor.float() if tensor.is_floating_point() else tensor
        for name, tensor in dequantize_checkpoint(quant_dir).items()
    }
    config = _read_config(quant_dir)
    config.pop("quantization_config")
    for key in ("dtype", "torch_dtype"):
        if key in config:
            config[key] = "float32"
    return _write_checkpoint(quant_dir, out_dir, tensors, config, skip=("quantize_config.json",))
