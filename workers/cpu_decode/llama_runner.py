"""The fused CPU decode runner: a decode step of a Llama-shaped model on CPU in about ten calls
per layer, or in one C call. `ModelRunner` selects it (`LlamaCPUDecodeRunner.select`, an explicit
capability check) and runs it for the steps it can serve (`can_run`), as it does CUDA graphs.

At batch size 1 the packed 4-bit matmuls (`packed_int4`) take about 5.6 ms of a 13.5 ms step;
the rest was some 25 torch operators and a dozen module calls per layer (casts around each
packed matmul, norms, rotary, the KV write, SiLU), a few microseconds each. Here a layer is
(the matmuls packed for up to the packed weights' `max_tokens` decodes, on dense bfloat16
weights for more, up to `MAX_DECODES`):

    C  add + RMSNorm        residual (float32) += x; bfloat16 normalised rows
    .  packed qkv matmul    bfloat16 out
    C  rotary + KV write    query float32, key/value into the bfloat16 (or e4m3) cache
    C  decode attention     (`attention_cpu`), float32 out, copied to bfloat16
    .  packed o matmul
    C  add + RMSNorm
    .  packed gate_up matmul
    C  SiLU-and-mul         bfloat16 in and out
    .  packed down matmul   -> the next layer's add + RMSNorm

With VNNI tiles (`tiled_weight`, AVX-512 only) every one of these is C, and `decode_step.py`
makes all the layers' calls from C in one call from Python (at batch size 1 the ctypes calls had
cost about as much as the kernels); the loop below serves the other cases (e.g. AVX2 CPUs, where
the packed matmuls are torch's 4-bit kernel).

The values rounded to bfloat16 are the ones the layer-by-layer path rounds (the packed
kernel's inputs and outputs), and all other math is float32, so both paths agree to float32
rounding (tests/test_fused_cpu_decode.py). It serves steps of decodes only, on one
tensor-parallel rank (it calls no all-reduce after `RowParallelLinear`), for models whose
forward is their `LlamaModel`'s and whose every layer is the plain Llama layer with packed
weights and no biases (`unsupported_reason` checks); anything else takes the model's forward.
The cache is bfloat16, or e4m3 (`kv_cache_dtype="fp8"`): the KV write stores key / k_scale and
value / v_scale in e4m3 as the layers' write does, and attention reads the e4m3 cache.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ember.kernels import decode_cpu
from ember.kernels.attention import AttentionMetadata
from ember.kernels.attention_cpu import paged_decode_attention_cpu
from ember.kernels.layernorm import rms_norm_c
from ember.workers.cpu_decode import decode_step
from ember.workers.layers.activation import SiluAndMul
from ember.workers.layers.layernorm import RMSNorm
from ember.workers.layers.quantization.gguf_packed import dense_weight
from ember.workers.layers.tiled_weight import TiledWeight, dense_dtype
from ember.workers.models.llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaMLP, LlamaModel

if TYPE_CHECKING:
    from ember.workers.config import EngineConfig

logger = logging.getLogger(__name__)

# Decodes per step the fused path serves: up to the packed weights' `max_tokens` through them,
# more through the layers' dense bfloat16 copies (as the layer-by-layer forward does).
MAX_DECODES = 256


def _matmul(x: torch.Tensor, linear: nn.Module, packed: bool, lora: bool = False) -> torch.Tensor:
    """x [T, K] bfloat16 @ the layer's weight -> [T, N] bfloat16: its packed 4-bit groups, or
    its dense bfloat16 weight; with `lora`, plus the step's adapter deltas (a layer that
    LoRA wraps has a `quant_method` with `add_delta`)."""
    out = linear.packed_weight.matmul_bfloat16(x) if packed else F.linear(x, dense_weight(linear))
    if lora:
        add_delta = getattr(linear.quant_method, "add_delta", None)
        if add_delta is not None:
            add_delta(x, out)
    return out


def _silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[T, 2I] bfloat16 -> silu(gate) * up, [T, I] bfloat16, float32 math."""
    size = gate_up.shape[1] // 2
    out = torch.empty(gate_up.shape[0], size, dtype=torch.bfloat16)
    if decode_cpu.silu_mul(gate_up, out) == 0:
        return out
    wide = gate_up.float()
    return (F.silu(wide[:, :size]) * wide[:, size:]).to(torch.bfloat16)


def unsupported_reason(model: nn.Module, config: EngineConfig, device: torch.device) -> str | None:
    """Why the fused step cannot serve `model` in this engine, or None when it can: a CPU
    device, one tensor-parallel rank, a generating model whose forward is its `LlamaModel`'s,
    and layers that fit (`_layers_unsupported_reason`)."""
    if device.type != "cpu":
        return f"device {device.type}, not cpu"
    if config.parallel.tensor_parallel_size != 1:
        # Each rank's o_proj and down_proj give partial sums that RowParallelLinear all-reduces;
        # the fused step has no all-reduce between its layers.
        return f"tensor_parallel_size {config.parallel.tensor_parallel_size}, not 1"
    if config.model.runner != "generate":
        return f"runner {config.model.runner!r}, not 'generate'"
    decoder = getattr(model, "model", None)
    if (
        not isinstance(model, LlamaForCausalLM)
        or type(model).forward is not LlamaForCausalLM.forward
        or type(decoder) is not LlamaModel
    ):
        return f"{type(model).__name__} is not a LlamaForCausalLM over a LlamaModel"
    return _layers_unsupported_reason(decoder)


def _layers_unsupported_reason(model: LlamaModel) -> str | None:
    """Why the layers of `model` do not fit the fused step (a layer that is not plain Llama with
    packed weights, the C kernels not built here), or None when they fit."""
    if model.embedding_multiplier != 1.0:
        return "an embedding multiplier"
    if not decode_cpu.available():
        return "the C kernels cannot be built here"
    if type(model.norm) is not RMSNorm:
        return "a final norm that is not RMSNorm"
    shapes = set()
    for layer in model.layers:
        if type(layer) is not LlamaDecoderLayer or layer.residual_multiplier != 1.0:
            return "a layer that is not the plain LlamaDecoderLayer"
        attention, mlp = layer.self_attn, getattr(layer, layer.mlp_name)
        if type(mlp) is not LlamaMLP or type(mlp.act_fn) is not SiluAndMul:
            return "an MLP that is not LlamaMLP with SiLU"
        norms = (layer.input_layernorm, layer.post_attention_layernorm)
        if any(type(norm) is not RMSNorm for norm in norms):
            return "a norm that is not RMSNorm"
        if attention.q_norm is not None or not attention.rotary_emb.is_neox_style:
            return "q/k norms or rotary embedding not in neox style"
        if attention.attn.logits_soft_cap:
            return "an attention soft cap"
        for linear in (attention.qkv_proj, attention.o_proj, mlp.gate_up_proj, mlp.down_proj):
            if getattr(linear, "packed_weight", None) is None:
                return (
                    "linear layers without packed tiles of their own (GGUF's groups, GPTQ/AWQ "
                    "codes without act-order or 8-bit zero points)"
                )
            if getattr(linear, "bias", None) is not None:
                return "linear layers with biases"
        shapes.add((attention.num_heads, attention.num_kv_heads, attention.head_dim))
    return None if len(shapes) == 1 else "layers of different attention shapes"


class LlamaCPUDecodeRunner:
    """The fused decode forward of one `LlamaModel` (the decoder of the model `select`
    takes): `run` returns its final hidden states for a step that `can_run` accepts."""

    def __init__(self, model: LlamaModel):
        self.model = model
        self.layers = []
        for layer in model.layers:
            attention, mlp = layer.self_attn, getattr(layer, layer.mlp_name)
            self.layers.append(
                (
                    layer.input_layernorm,
                    layer.post_attention_layernorm,
                    attention.qkv_proj,
                    attention.o_proj,
                    mlp.gate_up_proj,
                    mlp.down_proj,
                    attention.rotary_emb.cos_sin_cache,
                    attention.attn,
                )
            )
        first = model.layers[0].self_attn
        self.num_heads, self.num_kv_heads = first.num_heads, first.num_kv_heads
        self.head_dim = first.head_dim
        linears = [linear for entry in self.layers for linear in entry[2:6]]
        # Beyond the packed weights' batches the loop multiplies by bfloat16 dense copies, as the
        # layer-by-layer forward does where the CPU computes in bfloat16. Elsewhere the dense
        # copies are float32 and the layers' forward (float32 activations) serves those steps.
        dense_bf16 = all(
            dense_dtype() == torch.bfloat16
            if isinstance(linear.packed_weight, TiledWeight)
            else linear.weight.dtype == torch.bfloat16
            for linear in linears
        )
        self.packed_max_tokens = min(linear.packed_weight.max_tokens for linear in linears)
        self.max_decodes = MAX_DECODES if dense_bf16 else self.packed_max_tokens
        self.step_model = self._step_model(linears)
        self.lora_step = None  # the LoRA step state the wrapped linears share (False: none)

    def _step_model(self, linears: list[nn.Module]) -> decode_step.DecodeStepModel | None:
        """The layers in one C call (`decode_step.py`) when every matmul has tiles and
        the norms and attention share one setting; else None (the loop below serves)."""
        norms = [norm for entry in self.layers for norm in entry[:2]] + [self.model.norm]
        attns = [entry[7] for entry in self.layers]
        if (
            not all(isinstance(linear.packed_weight, TiledWeight) for linear in linears)
            or any(
                norm.weight.dtype != torch.float32 or not norm.weight.is_contiguous()
                for norm in norms
            )
            or len({norm.eps for norm in norms}) != 1
            or len({(attn.scale, attn.sliding_window or 0) for attn in attns}) != 1
            or any(
                entry[6].dtype != torch.float32 or not entry[6].is_contiguous()
                for entry in self.layers
            )
        ):
            return None
        layers = [
            (
                n_in.weight,
                n_post.weight,
                *(m.packed_weight for m in (qkv, o, gate_up, down)),
                cos_sin,
                attn,
            )
            for n_in, n_post, qkv, o, gate_up, down, cos_sin, attn in self.layers
        ]
        return decode_step.DecodeStepModel.build(
            layers,
            self.model.norm.weight,
            hidden=self.layers[0][0].weight.shape[0],
            intermediate=self.layers[0][5].packed_weight.shape[1],
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            rotary_dim=self.layers[0][6].shape[-1],
            sliding_window=attns[0].sliding_window or 0,
            eps=norms[0].eps,
            scale=attns[0].scale,
        )

    @classmethod
    def select(
        cls, model: nn.Module, config: EngineConfig, device: torch.device
    ) -> LlamaCPUDecodeRunner | None:
        """The runner of `model` (a whole model, as the model runner holds it) when the
        capability check passes, else None; logs which decode path this engine takes."""
        reason = unsupported_reason(model, config, device)
        if reason is not None:
            logger.info("decode runner: the model's forward (no fused CPU step: %s)", reason)
            return None
        runner = cls(model.model)
        how = "one C call" if runner.step_model is not None else "C kernels called per layer"
        logger.info("decode runner: the fused Llama CPU step (%s)", how)
        return runner

    def can_run(
        self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata
    ) -> bool:
        """Whether a step is for the fused path: CPU tensors, decodes only (one token per
        request, no padding slots), at most `max_decodes`, and the dtypes the kernels take."""
        num_tokens = input_ids.shape[0]
        if (
            input_ids.device.type != "cpu"
            or num_tokens > self.max_decodes
            or metadata.num_decodes != num_tokens
            or metadata.num_reqs != num_tokens
            or not metadata.all_slots_valid
        ):
            return False
        kv_cache = self.layers[0][7].kv_cache
        return not (
            kv_cache.dtype not in (torch.bfloat16, torch.float8_e4m3fn)
            or not kv_cache.is_contiguous()
            or metadata.block_table.dtype != torch.int64
            or metadata.seq_lens.dtype != torch.int32
            or metadata.slot_mapping.dtype != torch.int64
            or positions.dtype != torch.int64
        )

    def run(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        metadata: AttentionMetadata,
        lora: bool = False,
    ) -> torch.Tensor | None:
        """The final hidden states [T, H] of a step that `can_run` accepted; None when a kernel
        refused it (the model's forward then serves it, making the same KV writes again).
        With `lora` (some token of the step has an adapter) each adapter's delta is added after
        its matmul: inside the one C call where the LoRA kernel is built, else by the layers'
        C calls one by one."""
        num_tokens = input_ids.shape[0]
        block_table, seq_lens = metadata.block_table, metadata.seq_lens
        slot_mapping = metadata.slot_mapping
        num_heads, num_kv_heads, head_dim = self.num_heads, self.num_kv_heads, self.head_dim
        attn_size = num_heads * head_dim
        residual = self.model.embed_tokens(input_ids).contiguous()  # float32 [T, H]
        positions, slot_mapping = positions.contiguous(), slot_mapping.contiguous()
        packed = num_tokens <= self.packed_max_tokens
        token_slots = self._lora_token_slots() if lora else None
        if packed and self.step_model is not None and (not lora or token_slots is not None):
            return self.step_model.run(
                residual,
                positions,
                slot_mapping,
                block_table.contiguous(),
                seq_lens.contiguous(),
                token_slots,
            )
        normed = torch.empty(num_tokens, residual.shape[1], dtype=torch.bfloat16)
        query = torch.empty(num_tokens, num_heads, head_dim)
        attn_bf16 = torch.empty(num_tokens, attn_size, dtype=torch.bfloat16)
        x = None  # the last matmul's output, added to the residual by the next norm
        for (
            norm_in,
            norm_post,
            qkv_proj,
            o_proj,
            gate_up_proj,
            down_proj,
            cos_sin,
            attn,
        ) in self.layers:
            if self._norm(x, residual, norm_in, normed) != 0:
                return None
            qkv = _matmul(normed, qkv_proj, packed, lora)
            status = decode_cpu.rope_write_kv(
                qkv,
                positions,
                cos_sin,
                attn.kv_cache,
                slot_mapping,
                num_heads,
                num_kv_heads,
                head_dim,
                query,
                k_scale=attn.k_scale,
                v_scale=attn.v_scale,
            )
            out = None
            if status == 0:
                out = paged_decode_attention_cpu(
                    query,
                    attn.kv_cache,
                    block_table,
                    seq_lens,
                    attn.scale,
                    attn.sliding_window,
                    k_scale=attn.k_scale,
                    v_scale=attn.v_scale,
                )
            if out is None:
                # The model's forward serves the step; the keys and values written so far are
                # the ones it writes again.
                return None
            attn_bf16.copy_(out.view(num_tokens, attn_size))
            x = _matmul(attn_bf16, o_proj, packed, lora)
            self._norm(x, residual, norm_post, normed)
            gate_up = _matmul(normed, gate_up_proj, packed, lora)
            x = _matmul(_silu_mul(gate_up), down_proj, packed, lora)
        hidden = torch.empty_like(residual)
        self._norm(x, residual, self.model.norm, hidden)
        return hidden

    def _lora_token_slots(self) -> torch.Tensor | None:
        """This step's LoRA slot of each token, for the one C call (the adapters' weights are
        handed to the step model the first time); None where that call cannot add them."""
        if self.step_model is None or not self.step_model.serves_lora:
            return None
        if self.lora_step is None:
            weights = [
                tuple(getattr(linear.quant_method, "c_weights", None) for linear in entry[2:6])
                for entry in self.layers
            ]
            self.step_model.set_lora(weights)
            wrapped = [
                linear.quant_method
                for entry in self.layers
                for linear in entry[2:6]
                if getattr(linear.quant_method, "c_weights", None) is not None
            ]
            self.lora_step = wrapped[0].step if wrapped else False
        if not self.lora_step or self.lora_step.token_slots is None:
            return None
        return self.lora_step.token_slots.contiguous()

    @staticmethod
    def _norm(
        x: torch.Tensor | None, residual: torch.Tensor, norm: RMSNorm, out: torch.Tensor
    ) -> int:
        """out = norm(x + residual), residual += x in place (x None: norm(residual))."""
        if x is None:
            return rms_norm_c(residual, norm.weight, norm.eps, out)
        return rms_norm_c(x, norm.weight, norm.eps, out, residual, residual)
