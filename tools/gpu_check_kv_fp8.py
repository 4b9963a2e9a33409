"""The e4m3 KV cache's Triton kernels on a CUDA GPU (`kv_cache_dtype="fp8"`), in about 30 s:
the write stores the bytes torch's `to_fp8_e4m3` stores (scaled, saturated, subnormals, NaN),
and paged attention over the e4m3 cache (decodes beside prefill chunks, GQA, a sliding window)
matches plain attention over the dequantized cache, for bfloat16, float16 and float32 queries;
then one timing of decode attention over the same values in a bfloat16 and an e4m3 cache. Each
check prints PASS or FAIL; the exit status is the number of failures. Imports torch, triton
and `ember.kernels` only (no pyzmq, no msgspec).

    python tools/gpu_check_kv_fp8.py     # on a GPU; without one, a small dry run interpreted
"""

from __future__ import annotations

import os
import sys
import time
import traceback

import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:  # before triton is imported: the kernels run in its interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")
DEVICE = "cuda" if ON_GPU else "cpu"

from ember.kernels.attention import (
    FP8_E4M3,
    AttentionMetadata,
    to_fp8_e4m3,
    write_kv_cache_torch,
)
from ember.kernels.attention_triton import (
    paged_attention_triton,
    write_kv_cache_triton,
)

K_SCALE, V_SCALE = 0.37, 1.9
failures = 0


def check(name: str, run) -> None:
    global failures
    start_s = time.perf_counter()
    try:
        detail = run()
        print(f"PASS {name}: {detail} ({time.perf_counter() - start_s:.1f} s)", flush=True)
    except Exception:  # noqa: BLE001 - a failed check is reported, and the run goes on
        failures += 1
        print(f"FAIL {name} ({time.perf_counter() - start_s:.1f} s)", flush=True)
        traceback.print_exc()


def scales() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(K_SCALE, device=DEVICE), torch.tensor(V_SCALE, device=DEVICE)


def write_bytes() -> str:
    torch.manual_seed(0)
    special = [float("nan"), 448.0, 449.0, -464.0, 1e9, -1e9, 0.0, -0.0, 2**-10, 3 * 2**-11]
    values = torch.cat(
        [torch.randn(1 << 16) * 60, torch.linspace(-0.03, 0.03, 1 << 14), torch.tensor(special)]
    )
    values = torch.cat([values, torch.zeros(-len(values) % 1024)]).to(DEVICE)
    for dtype in (torch.float32, torch.bfloat16):
        key = values.view(-1, 8, 128).to(dtype)
        num_tokens = key.shape[0]
        slot_mapping = torch.randperm(num_tokens + 64, device=DEVICE)[:num_tokens]
        slot_mapping[::7] = -1
        kv_cache = torch.zeros(2, num_tokens // 16 + 5, 16, 8, 128, dtype=FP8_E4M3, device=DEVICE)
        expected = kv_cache.clone()
        k_scale, v_scale = scales()
        write_kv_cache_torch(key, -key, expected, slot_mapping, k_scale=k_scale, v_scale=v_scale)
        write_kv_cache_triton(key, -key, kv_cache, slot_mapping, k_scale=k_scale, v_scale=v_scale)
        differ = (kv_cache.view(torch.uint8) != expected.view(torch.uint8)).sum().item()
        assert differ == 0, f"{dtype}: {differ} bytes differ from torch's"
    return f"{2 * num_tokens * 8 * 128} values a dtype, byte for byte"


def fp8_batch(requests, num_heads, num_kv_heads, head_dim, dtype, seed=0):
    """(query, e4m3 cache, its float32 dequantization, metadata); `requests`: (cached, new)."""
    generator = torch.Generator().manual_seed(seed)
    block_size = 16
    num_blocks = sum(-(-(c + n) // block_size) for c, n in requests) + 2
    dense = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, generator=generator)
    kv_cache = torch.stack([to_fp8_e4m3(dense[0] * 3, torch.tensor(K_SCALE)), to_fp8_e4m3(
        dense[1] * 3, torch.tensor(V_SCALE))]).to(DEVICE)  # fmt: skip
    dequantized = kv_cache.float() * torch.tensor([K_SCALE, V_SCALE], device=DEVICE).view(
        2, 1, 1, 1, 1
    )
    free_blocks = (torch.randperm(num_blocks - 1, generator=generator) + 1).tolist()
    tables = [[free_blocks.pop() for _ in range(-(-(c + n) // block_size))] for c, n in requests]
    max_blocks = max(len(t) for t in tables)
    starts = [0]
    for _, new in requests:
        starts.append(starts[-1] + new)
    seq_lens = [c + n for c, n in requests]
    metadata = AttentionMetadata(
        slot_mapping=torch.zeros(starts[-1], dtype=torch.int64, device=DEVICE),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=DEVICE),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
        block_table=torch.tensor([t + [0] * (max_blocks - len(t)) for t in tables]).to(DEVICE),
        num_decodes=sum(1 for _, n in requests if n == 1),
        max_query_len=max(n for _, n in requests),
        max_seq_len=max(seq_lens),
        query_start_loc_cpu=starts,
        seq_lens_cpu=seq_lens,
    )
    query = torch.randn(starts[-1], num_heads, head_dim, generator=generator).to(DEVICE, dtype)
    return query, kv_cache, dequantized, metadata


def dense_attention(query, dequantized, metadata, scale, sliding_window):
    """Each request's rows against its dequantized keys and values, float32."""
    block_size, num_kv_heads = dequantized.shape[2], dequantized.shape[3]
    flat = dequantized.flatten(1, 2)
    out = torch.empty(query.shape, dtype=torch.float32, device=DEVICE)
    starts = metadata.query_start_loc_cpu
    for req, seq_len in enumerate(metadata.seq_lens_cpu):
        positions = torch.arange(seq_len, device=DEVICE)
        blocks = metadata.block_table[req, positions // block_size]
        slots = blocks * block_size + positions % block_size
        q = query[starts[req] : starts[req + 1]].float()
        group = q.shape[1] // num_kv_heads
        keys = flat[0, slots].repeat_interleave(group, dim=1)
        values = flat[1, slots].repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, keys) * scale
        query_pos = torch.arange(seq_len - len(q), seq_len, device=DEVICE)[:, None]
        allowed = positions[None, :] <= query_pos
        if sliding_window:
            allowed &= positions[None, :] > query_pos - sliding_window
        scores = scores.masked_fill(~allowed, float("-inf"))
        out[starts[req] : starts[req + 1]] = torch.einsum(
            "hqk,khd->qhd", scores.softmax(-1), values
        )
    return out


def attention_case(num_heads, num_kv_heads, head_dim, dtype, sliding_window, requests):
    def run() -> str:
        query, kv_cache, dequantized, metadata = fp8_batch(
            requests, num_heads, num_kv_heads, head_dim, dtype
        )
        k_scale, v_scale = scales()
        scale = head_dim**-0.5
        out = paged_attention_triton(
            query, kv_cache, metadata, scale, sliding_window, None, k_scale, v_scale
        )
        expected = dense_attention(query, dequantized, metadata, scale, sliding_window)
        error = (out.float() - expected).abs().max().item()
        # float32 queries: float32 math; half types: probabilities and output in that type
        tolerance = 1e-4 if dtype == torch.float32 else 3e-2
        assert error <= tolerance * max(1.0, expected.abs().max().item()), error
        return f"max error {error:.2e}"

    return run


def timing() -> str:
    """Decode attention over one cache's values as bfloat16 and as e4m3 (half the bytes)."""
    num_reqs, context = (64, 2048) if ON_GPU else (2, 40)
    query, kv_cache, dequantized, metadata = fp8_batch(
        [(context - 1, 1)] * num_reqs, 32, 8, 128, torch.bfloat16
    )
    bf16_cache = dequantized.to(torch.bfloat16)
    k_scale, v_scale = scales()
    timings = {}
    for name, cache, extra in (
        ("bfloat16", bf16_cache, {}),
        ("e4m3", kv_cache, {"k_scale": k_scale, "v_scale": v_scale}),
    ):
        for _ in range(3 if ON_GPU else 1):
            out = paged_attention_triton(query, cache, metadata, 128**-0.5, **extra)
        if ON_GPU:
            torch.cuda.synchronize()
        start_s = time.perf_counter()
        repeats = 20 if ON_GPU else 1
        for _ in range(repeats):
            out = paged_attention_triton(query, cache, metadata, 128**-0.5, **extra)
        if ON_GPU:
            torch.cuda.synchronize()
        timings[name] = (time.perf_counter() - start_s) / repeats
        assert torch.isfinite(out).all()
    cache_bytes = {name: num_reqs * context * 2 * 8 * 128 * size for name, size in
                   (("bfloat16", 2), ("e4m3", 1))}  # fmt: skip
    return ", ".join(
        f"{name} {seconds * 1e6:.0f} us ({cache_bytes[name] / seconds / 1e9:.0f} GB/s of cache)"
        for name, seconds in timings.items()
    )


def main() -> int:
    print(f"device: {torch.cuda.get_device_name() if ON_GPU else 'cpu (interpreted)'}")
    check("e4m3 write (Triton vs torch bytes)", write_bytes)
    # decodes (one at a block's first slot, one long), then chunks: mid-block across blocks,
    # a fresh prompt, one after a long context
    requests = [(15, 1), (16, 1), (1500, 1), (9, 300), (0, 129), (700, 64)]
    if not ON_GPU:
        requests = [(15, 1), (16, 1), (9, 30), (0, 21)]
    shapes = [
        (32, 8, 128, torch.bfloat16, None),
        (8, 1, 64, torch.float16, 100),
        (16, 16, 128, torch.float32, None),
    ]
    for num_heads, num_kv_heads, head_dim, dtype, window in shapes:
        name = f"e4m3 attention Hq={num_heads} Hkv={num_kv_heads} D={head_dim} {dtype} w={window}"
        check(name, attention_case(num_heads, num_kv_heads, head_dim, dtype, window, requests))
    check("decode attention timing", timing)
    print(f"{failures} failed", flush=True)
    return failures


if __name__ == "__main__":
    sys.exit(main())
