"""Compiles every Triton kernel of `ember.kernels` ahead of time for an H100 (sm_90): Triton's
front end, its MLIR passes and ptxas (shipped in the triton wheel) need no GPU. Run by
`tests/test_triton_compile.py` as `python -m tests.triton_compile` in a process without
TRITON_INTERPRET (an interpreted triton cannot compile); prints one JSON line per kernel."""

from __future__ import annotations

import json
import time

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from ember.kernels import (
    activation_triton,
    attention_triton,
    layernorm_triton,
    rotary_triton,
    sampling_triton,
    token_bitmask_triton,
)

H100 = GPUTarget("cuda", 90, 32)


def compile_for_h100(kernel, pointer_types: dict, float_args: tuple, constexprs: dict) -> dict:
    """Compile `kernel` with i32 scalars except `float_args` (fp32); return what came out."""
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointer_types:
            signature[name] = pointer_types[name]
        else:
            signature[name] = "fp32" if name in float_args else "i32"
    start_s = time.perf_counter()
    compiled = triton.compile(ASTSource(kernel, signature, constexprs), target=H100)
    return {
        "kernel": kernel.fn.__name__,
        "constexprs": constexprs,
        "pointer": next(iter(pointer_types.values())),
        "cubin_bytes": len(compiled.asm.get("cubin", b"")),
        "seconds": round(time.perf_counter() - start_s, 2),
    }


def main() -> None:
    results = []
    for dtype in ("*bf16", "*fp32"):
        results.append(compile_for_h100(
            activation_triton._gated_activation_kernel, {"out_ptr": dtype, "x_ptr": dtype}, (),
            {"ACTIVATION": 0, "BLOCK": 1024},
        ))  # fmt: skip
        norm_pointers = ("out_ptr", "residual_out_ptr", "x_ptr", "residual_ptr", "weight_ptr")
        results.append(compile_for_h100(
            layernorm_triton._rms_norm_kernel, dict.fromkeys(norm_pointers, dtype), ("eps",),
            {"HAS_RESIDUAL": True, "BLOCK": 4096},
        ))  # fmt: skip
        rotary_pointers = {
            "query_out_ptr": dtype, "key_out_ptr": dtype, "query_ptr": dtype, "key_ptr": dtype,
            "positions_ptr": "*i64", "cos_sin_ptr": "*fp32",
        }  # fmt: skip
        for is_neox, rotary_dim in ((True, 128), (False, 64)):
            results.append(compile_for_h100(
                rotary_triton._rotary_kernel, rotary_pointers, (),
                {"HEAD_DIM": 128, "ROTARY_DIM": rotary_dim, "IS_NEOX": is_neox,
                 "BLOCK_Q_HEADS": 32, "BLOCK_K_HEADS": 8, "BLOCK_HALF": rotary_dim // 2,
                 "BLOCK_DIM": 128},
            ))  # fmt: skip
        # the cache in the model's dtype, and an e4m3 one (its uint8 view) with its scales
        for cache, fp8 in ((dtype, False), ("*u8", True)):
            scales = {"k_scale_ptr": "*fp32", "v_scale_ptr": "*fp32"}
            results.append(compile_for_h100(
                attention_triton._write_kv_cache_kernel,
                {"key_ptr": dtype, "value_ptr": dtype, "kv_cache_ptr": cache,
                 "slot_mapping_ptr": "*i64", **scales},
                (), {"HEAD_DIM": 128, "BLOCK_HEADS": 8, "BLOCK_DIM": 128, "CACHE_FP8": fp8},
            ))  # fmt: skip
            attention_pointers = {
                "out_ptr": dtype, "query_ptr": dtype, "kv_cache_ptr": cache,
                "block_table_ptr": "*i64", "seq_lens_ptr": "*i32", "query_start_loc_ptr": "*i32",
                **scales,
            }  # fmt: skip
            # (queries per KV head, rows per tile, head dim, sliding window, soft-capping)
            shapes = (
                (1, 16, 64, 0, False), (4, 16, 128, 0, False), (8, 64, 128, 4096, True),
                (1, 64, 128, 0, False),
            )  # fmt: skip
            for queries_per_kv, block_m, head_dim, window, soft_cap in shapes[: 2 if fp8 else 4]:
                results.append(compile_for_h100(
                    attention_triton._paged_attention_kernel, attention_pointers,
                    ("scale", "soft_cap"),
                    {"QUERIES_PER_KV": queries_per_kv, "BLOCK_Q": block_m // queries_per_kv,
                     "BLOCK_M": block_m, "HEAD_DIM": head_dim, "BLOCK_DIM": head_dim,
                     "BLOCK_SIZE": 16, "TILE_N": 32, "SLIDING_WINDOW": window,
                     "USE_SOFT_CAP": soft_cap,
                     "DOT_PRECISION": "ieee" if dtype == "*fp32" else "tf32",
                     "DOT_IN_FLOAT32": False, "CACHE_FP8": fp8},
                ))  # fmt: skip
    for has_top_k, has_top_p in ((True, False), (False, True), (True, True)):
        results.append(compile_for_h100(
            sampling_triton._top_k_top_p_kernel,
            {"out_ptr": "*fp32", "logits_ptr": "*fp32", "top_k_ptr": "*i64", "top_p_ptr": "*fp32"},
            (), {"HAS_TOP_K": has_top_k, "HAS_TOP_P": has_top_p, "BLOCK": 4096},
        ))  # fmt: skip
    for dtype in ("*bf16", "*fp32"):
        results.append(compile_for_h100(
            token_bitmask_triton._apply_token_bitmask_kernel,
            {"logits_ptr": dtype, "bitmask_ptr": "*i32", "rows_ptr": "*i64"}, (), {"BLOCK": 1024},
        ))  # fmt: skip
    for result in results:
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
