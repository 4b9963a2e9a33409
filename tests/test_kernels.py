"""Each torch kernel against an independent oracle: dense attention, transformers' rotary and
RMSNorm, and a direct top-k / top-p filter."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

from ember.kernels import (
    apply_rotary_emb,
    apply_top_k_top_p,
    fused_add_rms_norm,
    gelu_and_mul,
    rms_norm,
    silu_and_mul,
    write_kv_cache,
)
from ember.kernels.attention import AttentionMetadata, paged_attention_torch


def _dense_causal_attention(q, k, v, scale, sliding_window=None, soft_cap=None):
    """q [Q, Hq, D] for the last Q positions of k/v [L, Hkv, D]; one request, no paging."""
    q_len, seq_len = q.shape[0], k.shape[0]
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k.double()) * scale
    if soft_cap is not None:
        scores = torch.tanh(scores / soft_cap) * soft_cap
    query_pos = torch.arange(seq_len - q_len, seq_len)[:, None]
    key_pos = torch.arange(seq_len)[None, :]
    allowed = key_pos <= query_pos
    if sliding_window is not None:
        allowed &= key_pos > query_pos - sliding_window
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v.double()).float()


@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (4, 1), (8, 2)])
@pytest.mark.parametrize("sliding_window,soft_cap", [(None, None), (5, None), (None, 30.0)])
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
def test_paged_attention_reference_matches_dense_attention(
    num_heads, num_kv_heads, sliding_window, soft_cap, cache_dtype
):
    """The torch reference on a float32 or bfloat16 cache (float32 queries, so float32 math);
    the dense oracle gets the keys and values as the cache stores them."""
    torch.manual_seed(0)
    head_dim, block_size, num_blocks = 16, 4, 64
    # (cached tokens before this step, tokens this step): two decodes, then prefill chunks,
    # one starting mid-block and crossing block boundaries, one a fresh prompt.
    requests = [(9, 1), (3, 1), (6, 7), (0, 11), (16, 4)]
    kv_cache = torch.zeros(2, num_blocks, block_size, num_kv_heads, head_dim, dtype=cache_dtype)
    free_blocks = torch.randperm(num_blocks - 1).add(1).tolist()
    full_keys, full_values, block_tables, queries, slots = [], [], [], [], []
    for cached, new in requests:
        total = cached + new
        blocks = [free_blocks.pop() for _ in range(-(-total // block_size))]
        block_tables.append(blocks)
        keys = torch.randn(total, num_kv_heads, head_dim)
        values = torch.randn(total, num_kv_heads, head_dim)
        full_keys.append(keys)
        full_values.append(values)
        positions = torch.arange(total)
        req_slots = (
            torch.tensor(blocks)[positions // block_size] * block_size + positions % block_size
        )
        # The cached part is already in the cache; this step writes the new part.
        write_kv_cache(keys[:cached], values[:cached], kv_cache, req_slots[:cached])
        slots.append(req_slots[cached:])
        queries.append(torch.randn(new, num_heads, head_dim))
    query = torch.cat(queries)
    new_keys = torch.cat([k[c:] for k, (c, _) in zip(full_keys, requests)])
    new_values = torch.cat([v[c:] for v, (c, _) in zip(full_values, requests)])
    slot_mapping = torch.cat(slots)
    write_kv_cache(new_keys, new_values, kv_cache, slot_mapping)
    max_blocks = max(len(b) for b in block_tables)
    block_table = torch.tensor([b + [0] * (max_blocks - len(b)) for b in block_tables])
    query_lens = [new for _, new in requests]
    seq_lens = [c + n for c, n in requests]
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    metadata = AttentionMetadata(
        slot_mapping=slot_mapping,
        query_start_loc=torch.tensor(starts, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_table=block_table,
        num_decodes=2,
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
        query_start_loc_cpu=starts,
        seq_lens_cpu=seq_lens,
    )
    scale = head_dim**-0.5
    out = paged_attention_torch(query, kv_cache, metadata, scale, sliding_window, soft_cap)
    for i in range(len(requests)):
        cached_keys = full_keys[i].to(cache_dtype).float()  # bfloat16 -> float32 is exact
        cached_values = full_values[i].to(cache_dtype).float()
        expected = _dense_causal_attention(
            queries[i], cached_keys, cached_values, scale, sliding_window, soft_cap
        )
        torch.testing.assert_close(out[starts[i] : starts[i + 1]], expected, atol=1e-5, rtol=1e-5)


def test_write_kv_cache_skips_padding_slots():
    kv_cache = torch.zeros(2, 4, 2, 1, 3)
    key = torch.ones(3, 1, 3)
    write_kv_cache(key, key * 2, kv_cache, torch.tensor([5, -1, 0]))
    flat = kv_cache.view(2, 8, 1, 3)
    assert flat[0, 5].eq(1).all() and flat[1, 0].eq(2).all()
    assert flat[:, [1, 2, 3, 4, 6, 7]].eq(0).all()


@pytest.mark.parametrize("rotary_fraction", [1.0, 0.5])
def test_rotary_matches_transformers(rotary_fraction):
    torch.manual_seed(0)
    head_dim, tokens = 32, 7
    rotary_dim = int(head_dim * rotary_fraction)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim))
    angles = torch.outer(torch.arange(64).float(), inv_freq)
    cache = torch.cat((angles.cos(), angles.sin()), dim=-1)
    positions = torch.tensor([0, 3, 9, 10, 11, 40, 63])
    q, k = torch.randn(tokens, 4, head_dim), torch.randn(tokens, 2, head_dim)
    q_out, k_out = apply_rotary_emb(positions, q, k, cache, is_neox_style=True)
    emb = torch.cat((angles[positions], angles[positions]), dim=-1)  # HF's [T, rotary_dim]
    cos, sin = emb.cos()[None], emb.sin()[None]
    q_ref, k_ref = apply_rotary_pos_emb(
        q[..., :rotary_dim].transpose(0, 1)[None],
        k[..., :rotary_dim].transpose(0, 1)[None],
        cos,
        sin,
    )
    torch.testing.assert_close(q_out[..., :rotary_dim], q_ref[0].transpose(0, 1))
    torch.testing.assert_close(k_out[..., :rotary_dim], k_ref[0].transpose(0, 1))
    torch.testing.assert_close(q_out[..., rotary_dim:], q[..., rotary_dim:])


def test_rms_norm_matches_transformers_and_fused_form_adds_residual():
    torch.manual_seed(0)
    reference = LlamaRMSNorm(48, eps=1e-5)
    reference.weight.data = torch.randn(48)
    x, residual = torch.randn(5, 48), torch.randn(5, 48)
    torch.testing.assert_close(rms_norm(x, reference.weight, 1e-5), reference(x))
    normed, new_residual = fused_add_rms_norm(x, residual, reference.weight, 1e-5)
    torch.testing.assert_close(new_residual, x + residual)
    torch.testing.assert_close(normed, reference(x + residual))


@pytest.mark.usefixtures("cpu_isa")
@pytest.mark.parametrize("shape", [(1, 576), (32, 576), (2, 3, 64), (64, 48), (300, 576)])
def test_rms_norm_c_kernel_matches_the_torch_reference(shape, monkeypatch):
    from ember.kernels import cpu_library, layernorm

    assert layernorm._library() is not None  # the C kernel serves float32 CPU tensors here
    torch.manual_seed(0)
    x, residual = torch.randn(shape), torch.randn(shape)
    residual_before = residual.clone()
    weight = torch.randn(shape[-1])
    torch.testing.assert_close(
        rms_norm(x, weight, 1e-6), layernorm.rms_norm_torch(x, weight, 1e-6), rtol=1e-5, atol=1e-6
    )
    normed, new_residual = fused_add_rms_norm(x, residual, weight, 1e-6)
    expected, expected_residual = layernorm.fused_add_rms_norm_torch(x, residual, weight, 1e-6)
    torch.testing.assert_close(normed, expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(new_residual, expected_residual)
    assert torch.equal(residual, residual_before)  # inputs are not written
    # A strided input, and a machine without a C compiler, take the torch reference.
    strided = torch.randn(shape[-1], 4).T
    torch.testing.assert_close(
        rms_norm(strided, weight, 1e-6), layernorm.rms_norm_torch(strided, weight, 1e-6)
    )
    monkeypatch.setattr(cpu_library.shutil, "which", lambda name: None)
    cpu_library.clear_caches()
    try:
        assert layernorm._library() is None
        assert torch.equal(rms_norm(x, weight, 1e-6), layernorm.rms_norm_torch(x, weight, 1e-6))
    finally:
        cpu_library.clear_caches()


def test_silu_and_mul():
    x = torch.randn(3, 10)
    torch.testing.assert_close(silu_and_mul(x), torch.nn.functional.silu(x[:, :5]) * x[:, 5:])


@pytest.mark.usefixtures("cpu_isa")
@pytest.mark.parametrize("shape", [(3, 64), (200, 96), (2, 5, 32)])  # 200 rows: OpenMP
def test_bfloat16_gated_activations_on_cpu_round_once(shape):
    """bfloat16 in on CPU: float32 math, the product rounded once, as the float32 path rounds
    it for the next matmul (the C kernel's exp may move a value by one bfloat16 step)."""
    torch.manual_seed(1)
    x = (torch.randn(shape) * 4).bfloat16()
    gate, up = x.float().chunk(2, dim=-1)
    for ours, exact in (
        (silu_and_mul(x), torch.nn.functional.silu(gate) * up),
        (gelu_and_mul(x, "tanh"), torch.nn.functional.gelu(gate, approximate="tanh") * up),
    ):
        assert ours.dtype == torch.bfloat16 and ours.shape == exact.shape
        rounded = exact.bfloat16()
        step = (rounded.float().abs() * 2**-7).clamp_min(1e-30)  # one bfloat16 step
        assert bool(((ours.float() - rounded.float()).abs() <= step).all())
        assert (ours == rounded).float().mean() > 0.99


def test_top_k_top_p_keeps_exactly_the_allowed_tokens():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0, 0.0], [0.0, 0.0, 5.0, 0.0, 1.0]])
    out = apply_top_k_top_p(logits, torch.tensor([2, 5]), None)
    assert torch.isfinite(out[0]).tolist() == [False, True, True, False, False]
    assert torch.isfinite(out[1]).all()
    # Row 0: probabilities sorted [.64, .24, .09, .03, .01]; top_p=0.8 keeps the first two.
    out = apply_top_k_top_p(logits, None, torch.tensor([0.8, 0.01]))
    assert torch.isfinite(out[0]).tolist() == [False, True, True, False, False]
    assert torch.isfinite(out[1]).tolist() == [False, False, True, False, False]
    torch.testing.assert_close(out[0, 1:3], logits[0, 1:3])
