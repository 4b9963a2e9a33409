"""The layers of a fused CPU decode step in one C call (`decode_step.c` beside this file): the
same kernels the Python loop of `llama_runner.py` calls one by one (RMSNorm, the VNNI tile
matmuls, rotary + KV write, decode attention, SiLU-and-mul), strung together in C so that a
layer costs no Python at all (at batch size 1 the per-call overhead was about half the step).

`DecodeStepModel` holds the C description of a model's layers (pointers into its tensors and
the kernels' entry points); `run` makes one step. Where a library cannot be built, `build`
returns None and the Python loop serves.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from ember.kernels import attention_cpu, decode_cpu, layernorm, lora_cpu, tile_matmul
from ember.kernels.cpu_library import isa_cached, load_c_library

_i64, _ptr, _f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float


class _LoraWeights(ctypes.Structure):
    """One linear layer's adapters (`kernels.lora_cpu.LoRACWeights`); a NULL: none."""

    _fields_ = [
        ("at", _ptr),
        ("bt", _ptr),
        ("slice_ends", _ptr),
        ("n_rank", _i64),
        ("rank", _i64),
        ("slices", _i64),
    ]


class _Layer(ctypes.Structure):
    _fields_ = [
        ("norm_in", _ptr),
        ("norm_post", _ptr),
        ("qkv", _ptr),
        ("o", _ptr),
        ("gate_up", _ptr),
        ("down", _ptr),
        ("qkv_bits", _i64),
        ("o_bits", _i64),
        ("gate_up_bits", _i64),
        ("down_bits", _i64),
        ("cos_sin", _ptr),
        ("kv_cache", _ptr),
        ("k_scale", _ptr),
        ("v_scale", _ptr),
        ("qkv_lora", _LoraWeights),
        ("o_lora", _LoraWeights),
        ("gate_up_lora", _LoraWeights),
        ("down_lora", _LoraWeights),
    ]


class _Model(ctypes.Structure):
    _fields_ = [
        ("norm", _ptr),
        ("matmul", _ptr),
        ("rope", _ptr),
        ("attention", _ptr),
        ("silu", _ptr),
        ("lora", _ptr),
        ("layers", ctypes.POINTER(_Layer)),
        ("final_norm", _ptr),
        ("num_layers", _i64),
        ("hidden", _i64),
        ("intermediate", _i64),
        ("num_heads", _i64),
        ("num_kv_heads", _i64),
        ("head_dim", _i64),
        ("rotary_dim", _i64),
        ("num_blocks", _i64),
        ("block_size", _i64),
        ("sliding_window", _i64),
        ("cache_format", _i64),
        ("eps", _f32),
        ("scale", _f32),
    ]


@isa_cached
def _library() -> ctypes.CDLL | None:
    library = load_c_library(Path(__file__).with_name("decode_step.c"))
    if library is None:
        return None
    library.ember_decode_step.argtypes = [ctypes.POINTER(_Model), _i64, _ptr, _ptr, _ptr, _ptr]
    library.ember_decode_step.argtypes += [_i64, _ptr, _ptr, _ptr]
    library.ember_decode_step.restype = ctypes.c_int
    return library


def _kernels() -> list[int | None] | None:
    """The entry points of norm, matmul, rope, attention and SiLU, or None if one is missing;
    then LoRA's (None where its library is not built: steps with adapters are not taken)."""
    libraries = [
        layernorm._library(),
        tile_matmul._library(),
        decode_cpu._library(),
        attention_cpu._library(),
    ]
    if _library() is None or any(library is None for library in libraries):
        return None
    norm, tiles, decode, attention = libraries
    functions = [
        norm.ember_rms_norm,
        tiles.ember_tile_matmul,
        decode.ember_rope_write_kv,
        attention.ember_paged_decode_attention,
        decode.ember_silu_mul,
    ]
    pointers = [ctypes.cast(function, ctypes.c_void_p).value for function in functions]
    return [*pointers, lora_cpu.function_pointer()]


class DecodeStepModel:
    """The C description of a model's decoder layers. `layers`: per layer (norm_in weight,
    norm_post weight, qkv, o, gate_up, down tiles (`TiledWeight`), cos_sin cache, the
    attention module, whose `kv_cache` is read at each step)."""

    def __init__(self, kernels: list[int], layers: list[tuple], final_norm: torch.Tensor, **shape):
        self.kernels, self.layer_tensors, self.final_norm = kernels, layers, final_norm
        self.shape = shape  # hidden, intermediate, heads, kv heads, head_dim, rotary_dim, ...
        self._model: _Model | None = None
        self._cache_ptrs: tuple[int, ...] = ()
        # per layer, the LoRA weights of qkv, o, gate_up and down (None: not wrapped)
        self.lora: list[tuple[lora_cpu.LoRACWeights | None, ...]] | None = None

    @property
    def serves_lora(self) -> bool:
        """Whether steps with adapters can run here (the LoRA kernel is built)."""
        return self.kernels[-1] is not None

    def set_lora(self, lora: list[tuple[lora_cpu.LoRACWeights | None, ...]]) -> None:
        """The adapters' weights of every layer's four linears (their tensors stay in place
        while adapters come and go: `LoRALinearMethod.set_slot` copies into them)."""
        self.lora, self._model = lora, None

    @classmethod
    def build(
        cls, layers: list[tuple], final_norm: torch.Tensor, **shape
    ) -> DecodeStepModel | None:
        kernels = _kernels()
        return None if kernels is None else cls(kernels, layers, final_norm, **shape)

    def _c_model(self, block_size: int, num_blocks: int) -> _Model:
        """The struct for the current KV caches (rebuilt when they were reallocated) and the
        layers' scales (an e4m3 cache's)."""
        attns = [entry[7] for entry in self.layer_tensors]
        caches = [attn.kv_cache for attn in attns]
        key = (
            block_size,
            num_blocks,
            caches[0].dtype,
            *(cache.data_ptr() for cache in caches),
            *(attn.k_scale.data_ptr() for attn in attns),
            *(attn.v_scale.data_ptr() for attn in attns),
        )
        if self._model is not None and key == self._cache_ptrs:
            return self._model
        entries = (_Layer * len(caches))()
        for entry, (norm_in, norm_post, qkv, o, gate_up, down, cos_sin, attn), cache in zip(
            entries, self.layer_tensors, caches
        ):
            entry.norm_in, entry.norm_post = norm_in.data_ptr(), norm_post.data_ptr()
            entry.qkv, entry.o = qkv.tiles.data_ptr(), o.tiles.data_ptr()
            entry.gate_up, entry.down = gate_up.tiles.data_ptr(), down.tiles.data_ptr()
            entry.qkv_bits, entry.o_bits = qkv.bits, o.bits
            entry.gate_up_bits, entry.down_bits = gate_up.bits, down.bits
            entry.cos_sin, entry.kv_cache = cos_sin.data_ptr(), cache.data_ptr()
            entry.k_scale, entry.v_scale = attn.k_scale.data_ptr(), attn.v_scale.data_ptr()
        for entry, weights in zip(entries, self.lora or []):
            for name, lora in zip(("qkv_lora", "o_lora", "gate_up_lora", "down_lora"), weights):
                if lora is not None:
                    setattr(entry, name, _lora_struct(lora))
        model = _Model(
            *self.kernels,
            entries,
            self.final_norm.data_ptr(),
            len(caches),
            num_blocks=num_blocks,
            block_size=block_size,
            cache_format=int(caches[0].dtype == torch.float8_e4m3fn),  # else bfloat16
            **self.shape,
        )
        model._entries = entries  # keeps the array alive with the struct
        self._model, self._cache_ptrs = model, key
        return model

    def run(
        self,
        residual: torch.Tensor,
        positions: torch.Tensor,
        slot_mapping: torch.Tensor,
        block_table: torch.Tensor,
        seq_lens: torch.Tensor,
        token_slots: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """The final normalised hidden states [T, H] float32 of a step whose embeddings are
        `residual` [T, H] float32 (overwritten); None when a kernel refused (nothing to trust
        but the KV writes, which the caller's other path makes again). `token_slots` [T]
        int64: each token's LoRA slot (-1: none), after `set_lora`."""
        kv_cache = self.layer_tensors[0][7].kv_cache
        _, num_blocks, block_size = kv_cache.shape[:3]
        model = self._c_model(block_size, num_blocks)
        hidden = torch.empty_like(residual)
        status = _library().ember_decode_step(
            ctypes.byref(model),
            residual.shape[0],
            residual.data_ptr(),
            positions.data_ptr(),
            slot_mapping.data_ptr(),
            block_table.data_ptr(),
            block_table.stride(0),
            seq_lens.data_ptr(),
            hidden.data_ptr(),
            None if token_slots is None else token_slots.data_ptr(),
        )
        return hidden if status == 0 else None


def _lora_struct(weights: lora_cpu.LoRACWeights) -> _LoraWeights:
    return _LoraWeights(
        weights.lora_at.data_ptr(),
        weights.lora_bt.data_ptr(),
        weights.slice_ends.data_ptr(),
        weights.lora_at.shape[2],
        weights.rank,
        weights.slice_ends.numel(),
    )
