"""The elementwise parts of a CPU decode step in C (`csrc/decode_layer.c`): rotary embedding
with the KV-cache write (bfloat16 or e4m3), and SiLU-and-mul, each one call over the step's
tokens reading the packed matmuls' bfloat16 outputs directly. `ember.workers.cpu_decode.llama_runner` strings them
between torch's packed 4-bit matmuls; their references are `rotary.apply_rotary_emb_torch` with
`attention.write_kv_cache_torch`, and `activation.silu_and_mul_torch`.

Each function returns 0, or non-zero when it computed nothing (no compiler, unsupported
shapes) and the caller must take the torch path.
"""

from __future__ import annotations

import ctypes

import torch

from ember.kernels.cpu_library import isa_cached, load_c_library


@isa_cached
def _library() -> ctypes.CDLL | None:
    # No fused multiply-adds: the rotation rounds each product as torch's reference does, so
    # that both paths give the same bits (a last-bit difference grows through 30 layers).
    # OpenMP for prefill-sized SiLU-and-mul (`silu_and_mul_bfloat16`); a decode step's stay
    # on the calling thread.
    library = load_c_library("decode_layer.c", ("-ffp-contract=off", "-fopenmp"))
    library = library or load_c_library("decode_layer.c", ("-ffp-contract=off",))
    if library is None:
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    library.ember_rope_write_kv.argtypes = [ptr, ptr, ptr, i64, i64, i64, i64, i64, ptr, i64]
    library.ember_rope_write_kv.argtypes += [ptr, ptr, i64, ptr, ptr]
    library.ember_rope_write_kv.restype = ctypes.c_int
    library.ember_rope_write_kv_rows.argtypes = [ptr, ctypes.c_int, ptr, ptr, i64, i64, i64]
    library.ember_rope_write_kv_rows.argtypes += [i64, i64, ptr, i64, ptr, ptr, i64, ptr, ptr]
    library.ember_rope_write_kv_rows.restype = ctypes.c_int
    library.ember_silu_mul.argtypes = [ptr, i64, i64, ptr]
    library.ember_silu_mul.restype = None
    return library


# The cache dtypes `rope_write_kv` writes, by its `cache_format` code.
_CACHE_FORMATS = {torch.bfloat16: 0, torch.float8_e4m3fn: 1}


def available() -> bool:
    return _library() is not None


def rope_write_kv(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    q_out: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> int:
    """qkv [T, (Hq + 2 Hkv) D] bfloat16 or float32 (contiguous) -> q_out [T, Hq, D] float32
    rotated (neox style over `cos_sin_cache`'s rotary_dim channels), keys rotated and values
    copied into the bfloat16 `kv_cache` [2, num_blocks, block_size, Hkv, D] at `slot_mapping`
    [T] int64 (no -1: returns 2, writing nothing); into an e4m3 cache, key / k_scale and
    value / v_scale (float32 scalars in host memory, None: 1) rounded as
    `attention.to_fp8_e4m3` rounds them."""
    library = _library()
    cache_format = _CACHE_FORMATS.get(kv_cache.dtype)
    if library is None or cache_format is None:
        return -1
    if cache_format == 0:
        k_scale = v_scale = None  # a bfloat16 cache stores the values as they are
    if qkv.dtype not in (torch.bfloat16, torch.float32):
        return -1
    _, num_blocks, block_size = kv_cache.shape[:3]
    return library.ember_rope_write_kv_rows(
        qkv.data_ptr(),
        qkv.dtype == torch.bfloat16,
        positions.data_ptr(),
        cos_sin_cache.data_ptr(),
        qkv.shape[0],
        num_heads,
        num_kv_heads,
        head_dim,
        cos_sin_cache.shape[-1],
        kv_cache.data_ptr(),
        num_blocks * block_size,
        slot_mapping.data_ptr(),
        q_out.data_ptr(),
        cache_format,
        None if k_scale is None else k_scale.data_ptr(),
        None if v_scale is None else v_scale.data_ptr(),
    )


def silu_and_mul_bfloat16(gate_up: torch.Tensor) -> torch.Tensor | None:
    """gate_up [..., 2I] bfloat16 -> [..., I] bfloat16 = silu(gate) * up, float32 math rounded
    once (as the float32 product rounded to bfloat16); None without the kernel."""
    rows = gate_up.reshape(-1, gate_up.shape[-1]).contiguous()
    out = torch.empty(rows.shape[0], rows.shape[1] // 2, dtype=torch.bfloat16)
    if silu_mul(rows, out):
        return None
    return out.view(*gate_up.shape[:-1], out.shape[1])


def silu_mul(gate_up: torch.Tensor, out: torch.Tensor) -> int:
    """gate_up [T, 2I] bfloat16 -> out [T, I] bfloat16 = silu(gate) * up (float32 math)."""
    library = _library()
    if library is None:
        return -1
    library.ember_silu_mul(gate_up.data_ptr(), gate_up.shape[0], out.shape[1], out.data_ptr())
    return 0
