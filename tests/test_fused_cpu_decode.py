"""The fused CPU decode runner (`workers/cpu_decode/llama_runner.py`) and its C kernels
(`kernels/csrc/decode_layer.c`, the bfloat16 forms of `rms_norm.c`) against the layer-by-layer
forward and the plain-torch references, on a bfloat16 and an e4m3 KV cache, and its capability
check."""

from __future__ import annotations

import pytest
import torch

from ember.kernels import decode_cpu, layernorm, tile_matmul
from ember.kernels.activation import silu_and_mul_torch
from ember.kernels.attention import FP8_E4M3, AttentionMetadata, write_kv_cache_torch
from ember.kernels.rotary import apply_rotary_emb_torch
from ember.workers.config import EngineConfig, ParallelConfig
from ember.workers.cpu_decode.llama_runner import (
    MAX_DECODES,
    LlamaCPUDecodeRunner,
    unsupported_reason,
)
from ember.workers.layers.tiled_weight import dense_dtype
from ember.workers.model_loader import loader
from tests.helpers import default_model_config

CPU = torch.device("cpu")
# Every test once per ISA of the C kernels (the model and its runner are built per ISA).
pytestmark = pytest.mark.usefixtures("module_cpu_isa")


@pytest.mark.parametrize(
    ("num_heads", "num_kv_heads", "head_dim", "rotary_dim"), [(9, 3, 64, 64), (4, 2, 128, 64)]
)
def test_rope_and_kv_write_match_the_torch_references(
    num_heads, num_kv_heads, head_dim, rotary_dim
):
    torch.manual_seed(0)
    tokens, block_size, num_blocks = 5, 16, 8
    qkv = torch.randn(tokens, (num_heads + 2 * num_kv_heads) * head_dim).bfloat16()
    positions = torch.tensor([0, 3, 17, 100, 255])
    angles = torch.rand(256, rotary_dim // 2) * 6
    cos_sin = torch.cat((angles.cos(), angles.sin()), dim=-1)
    slots = torch.tensor([3, 40, 17, 0, 127])
    kv_cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim).bfloat16()
    expected_cache = kv_cache.clone()
    query = torch.empty(tokens, num_heads, head_dim)
    status = decode_cpu.rope_write_kv(
        qkv, positions, cos_sin, kv_cache, slots, num_heads, num_kv_heads, head_dim, query
    )
    assert status == 0
    q, k, v = qkv.float().split(
        [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1
    )
    q_ref, k_ref = apply_rotary_emb_torch(
        positions,
        q.reshape(tokens, num_heads, head_dim),
        k.reshape(tokens, num_kv_heads, head_dim),
        cos_sin,
    )
    write_kv_cache_torch(k_ref, v.reshape(tokens, num_kv_heads, head_dim), expected_cache, slots)
    torch.testing.assert_close(query, q_ref, rtol=1e-6, atol=1e-6)
    # Keys round to bfloat16 like the reference's cast; a last-bit difference from float32
    # rounding of the rotation may flip one rounding.
    torch.testing.assert_close(kv_cache.float(), expected_cache.float(), rtol=8e-3, atol=1e-6)
    assert torch.equal(kv_cache[1], expected_cache[1])  # values are copied bit for bit
    bad = torch.tensor([3, 40, 17, 0, 128])  # beyond the cache: refused, nothing computed
    assert (
        decode_cpu.rope_write_kv(
            qkv, positions, cos_sin, kv_cache, bad, num_heads, num_kv_heads, head_dim, query
        )
        != 0
    )


def test_rope_and_kv_write_into_an_fp8_cache_match_the_torch_references():
    """Keys rotated then divided by k_scale, values divided by v_scale, rounded to e4m3 as the
    layers' write (`write_kv_cache_torch`) rounds them."""
    torch.manual_seed(0)
    num_heads, num_kv_heads, head_dim, tokens = 9, 3, 64, 5
    qkv = (torch.randn(tokens, (num_heads + 2 * num_kv_heads) * head_dim) * 4).bfloat16()
    qkv[0, -8:] = torch.tensor([1000.0, -1000.0, 1e-3, -1e-3, 0.0, 0.01, 300.0, -0.2])
    positions = torch.tensor([0, 3, 17, 100, 255])
    angles = torch.rand(256, 32) * 6
    cos_sin = torch.cat((angles.cos(), angles.sin()), dim=-1)
    slots = torch.tensor([3, 40, 17, 0, 127])
    kv_cache = torch.zeros(2, 8, 16, num_kv_heads, head_dim, dtype=FP8_E4M3)
    expected_cache = kv_cache.clone()
    k_scale, v_scale = torch.tensor(0.37), torch.tensor(1.9)
    query = torch.empty(tokens, num_heads, head_dim)
    status = decode_cpu.rope_write_kv(
        qkv, positions, cos_sin, kv_cache, slots, num_heads, num_kv_heads, head_dim, query,
        k_scale=k_scale, v_scale=v_scale,
    )  # fmt: skip
    assert status == 0
    q, k, v = qkv.float().split(
        [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1
    )
    _, k_ref = apply_rotary_emb_torch(
        positions,
        q.reshape(tokens, num_heads, head_dim),
        k.reshape(tokens, num_kv_heads, head_dim),
        cos_sin,
    )
    write_kv_cache_torch(
        k_ref, v.reshape(tokens, num_kv_heads, head_dim), expected_cache, slots,
        k_scale=k_scale, v_scale=v_scale,
    )  # fmt: skip
    codes, expected_codes = kv_cache.view(torch.uint8), expected_cache.view(torch.uint8)
    assert torch.equal(codes[1], expected_codes[1])  # values: bit for bit
    # keys: the rotation rounds as torch's does (no fused multiply-adds), so bit for bit too
    assert torch.equal(codes[0], expected_codes[0])


@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, FP8_E4M3])
@pytest.mark.parametrize(("tokens", "rotary_dim"), [(3, 64), (200, 32)])
@pytest.mark.parametrize("qkv_dtype", [torch.float32, torch.bfloat16])
def test_prefill_rotates_into_the_cache_as_the_torch_layers_do(
    cache_dtype, tokens, rotary_dim, qkv_dtype
):
    """`Attention.rotate_into_cache` (a float32 qkv, as a float32 model's prefill chunk has it,
    or the bfloat16 output of its packed projection; 200 tokens share the threads) against the
    layer's torch path on the float32 values, apply_rotary_emb_torch then write_kv_cache_torch:
    the same bits in the query and the cache; a slot of -1 declines."""
    from types import SimpleNamespace

    from ember.workers.layers.attention import Attention

    torch.manual_seed(0)
    num_heads, num_kv_heads, head_dim = 9, 3, 64
    attn = Attention(num_heads, head_dim, head_dim**-0.5, num_kv_heads)
    attn.kv_cache = torch.zeros(2, 16, 16, num_kv_heads, head_dim, dtype=cache_dtype)
    if cache_dtype == FP8_E4M3:
        attn.k_scale.fill_(0.37)
        attn.v_scale.fill_(1.9)
    angles = torch.rand(512, rotary_dim // 2) * 6
    rope = SimpleNamespace(
        cos_sin_cache=torch.cat((angles.cos(), angles.sin()), dim=-1), is_neox_style=True
    )
    given = (torch.randn(tokens, (num_heads + 2 * num_kv_heads) * head_dim) * 4).to(qkv_dtype)
    qkv = given.float()
    positions = torch.randperm(512)[:tokens]
    metadata = SimpleNamespace(slot_mapping=torch.randperm(256)[:tokens])
    expected_cache = attn.kv_cache.clone()

    query = attn.rotate_into_cache(given, positions, rope, metadata)

    kv_width = num_kv_heads * head_dim
    q, k, v = qkv.split([num_heads * head_dim, kv_width, kv_width], dim=-1)
    q_ref, k_ref = apply_rotary_emb_torch(
        positions,
        q.reshape(tokens, num_heads, head_dim),
        k.reshape(tokens, num_kv_heads, head_dim),
        rope.cos_sin_cache,
    )
    write_kv_cache_torch(
        k_ref, v.reshape(tokens, num_kv_heads, head_dim), expected_cache, metadata.slot_mapping,
        k_scale=attn.k_scale, v_scale=attn.v_scale,
    )  # fmt: skip
    assert torch.equal(query, q_ref)
    assert torch.equal(attn.kv_cache.view(torch.uint8), expected_cache.view(torch.uint8))

    metadata.slot_mapping[-1] = -1  # a padded token: the torch path skips it, this declines
    before = attn.kv_cache.clone()
    assert attn.rotate_into_cache(given, positions, rope, metadata) is None
    assert torch.equal(attn.kv_cache.view(torch.uint8), before.view(torch.uint8))
    metadata.slot_mapping[-1] = 3
    assert attn.rotate_into_cache(qkv.half(), positions, rope, metadata) is None  # not read


def test_silu_mul_and_bf16_norms_match_the_torch_references():
    torch.manual_seed(0)
    # vectors of 16 only; a scalar tail; rows shared over the threads (16 and more)
    for rows, size in ((3, 96), (3, 100), (40, 100)):
        gate_up = (torch.randn(rows, 2 * size) * 3).bfloat16()
        gate_up[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -0.0])  # exp's far ends, both zeros
        out = torch.empty(rows, size, dtype=torch.bfloat16)
        assert decode_cpu.silu_mul(gate_up, out) == 0
        expected = silu_and_mul_torch(gate_up.float()).bfloat16()
        torch.testing.assert_close(out.float(), expected.float(), rtol=8e-3, atol=1e-6)

    for rows in (4, 40):  # on the caller's thread; shared over the threads
        x = torch.randn(rows, 576).bfloat16()
        residual, weight = torch.randn(rows, 576), torch.rand(576) + 0.5
        normed = torch.empty(rows, 576, dtype=torch.bfloat16)
        new_residual = residual.clone()
        assert layernorm.rms_norm_c(x, weight, 1e-5, normed, new_residual, new_residual) == 0
        expected, expected_residual = layernorm.fused_add_rms_norm_torch(
            x.float(), residual, weight, 1e-5
        )
        assert torch.equal(new_residual, expected_residual)
        expected = expected.bfloat16().float()
        torch.testing.assert_close(normed.float(), expected, rtol=8e-3, atol=1e-6)


@pytest.fixture(scope="module")
def engine_config(default_gguf, module_cpu_isa) -> EngineConfig:
    return EngineConfig(model=default_model_config(default_gguf, quantization="gguf"))


@pytest.fixture(scope="module")
def packed_model(engine_config):
    return loader.get_model(engine_config.model, CPU)


@pytest.fixture(scope="module")
def runner(packed_model, engine_config) -> LlamaCPUDecodeRunner:
    runner = LlamaCPUDecodeRunner.select(packed_model, engine_config, CPU)
    assert isinstance(runner, LlamaCPUDecodeRunner)
    # With VNNI tiles the layers run in one C call; without, the Python loop of C kernels.
    assert (runner.step_model is not None) == tile_matmul.available()
    return runner


def _decode_step(model, seq_lens: list[int], seed: int, cache_dtype=torch.bfloat16):
    """Caches filled with random keys and values, and one decode token per request."""
    torch.manual_seed(seed)
    block_size, num_blocks = 16, max(128, 8 * len(seq_lens))
    caches = []
    for layer in model.model.layers:
        attn = layer.self_attn.attn
        cache = torch.randn(2, num_blocks, block_size, attn.num_kv_heads, attn.head_dim) * 0.5
        attn.kv_cache = cache.to(cache_dtype)
        caches.append(attn.kv_cache)
    blocks = torch.randperm(num_blocks)[: len(seq_lens) * 8].reshape(len(seq_lens), 8)
    positions = torch.tensor([n - 1 for n in seq_lens])
    slots = torch.stack(
        [blocks[i, p // block_size] * block_size + p % block_size for i, p in enumerate(positions)]
    )
    metadata = AttentionMetadata(
        slot_mapping=slots.long(),
        query_start_loc=torch.arange(len(seq_lens) + 1, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_table=blocks.long(),
        num_decodes=len(seq_lens),
        max_query_len=1,
        max_seq_len=max(seq_lens),
        query_start_loc_cpu=list(range(len(seq_lens) + 1)),
        seq_lens_cpu=seq_lens,
        all_slots_valid=True,
    )
    input_ids = torch.randint(100, 40000, (len(seq_lens),))
    return input_ids, positions, metadata, caches


# One request, four and twelve, the layers in one C call (VNNI tiles only) and in the Python
# loop; twelve also in the loop on bfloat16 weights written from the packed ones (what batches
# beyond the packed weights' max_tokens take; the reference then takes them too).
TWELVE = [3, 9, 17, 33, 64, 65, 80, 100, 101, 111, 120, 128]


@pytest.mark.parametrize(
    ("seq_lens", "path"),
    [
        *[
            (lens, path)
            for lens in ([1], [40], [5, 77, 16, 120], TWELVE)
            for path in ("one_call", "loop")
        ],
        (TWELVE, "dense"),
    ],
)
def test_fused_decode_step_equals_the_layer_by_layer_forward(
    packed_model, runner, seq_lens, path, monkeypatch, module_cpu_isa
):
    model = packed_model
    if path == "one_call" and runner.step_model is None:
        pytest.skip(f"the {module_cpu_isa} build has no tiles: no one-call step (the loop serves)")
    if path != "one_call":
        monkeypatch.setattr(runner, "step_model", None)
    if path == "dense" and tile_matmul.available() and dense_dtype() == torch.float32:
        # tiles with float32 dense copies (no native bfloat16): beyond the packed batches the runner
        # refuses the step, and the layers' forward (float32 activations) serves it
        assert runner.max_decodes == runner.packed_max_tokens
        many = [3 + i for i in range(runner.packed_max_tokens + 1)]
        input_ids, positions, metadata, _ = _decode_step(model, many, seed=1)
        assert not runner.can_run(input_ids, positions, metadata)
        return
    if path == "dense":
        monkeypatch.setattr(runner, "packed_max_tokens", 0)
        for module in model.modules():  # each packed layer's own limit (AMX raises it)
            if hasattr(getattr(module, "packed_weight", None), "max_tokens"):
                monkeypatch.setattr(module.packed_weight, "max_tokens", 0)
    input_ids, positions, metadata, caches = _decode_step(model, seq_lens, seed=len(seq_lens))
    before = [cache.clone() for cache in caches]
    with torch.inference_mode():
        assert runner.can_run(input_ids, positions, metadata)
        fused = runner.run(input_ids, positions, metadata)
        assert fused is not None
        fused_caches = [cache.clone() for cache in caches]
        for cache, saved in zip(caches, before):
            cache.copy_(saved)
        reference = model(input_ids, positions, metadata)
        fused_logits = model.compute_logits(fused)
        reference_logits = model.compute_logits(reference)
    torch.testing.assert_close(fused, reference, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(fused_logits, reference_logits, rtol=2e-3, atol=2e-2)
    assert torch.equal(fused_logits.argmax(-1), reference_logits.argmax(-1))
    for fused_cache, cache in zip(fused_caches, caches):
        torch.testing.assert_close(fused_cache.float(), cache.float(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("path", ["one_call", "loop"])
def test_fused_decode_step_on_an_fp8_cache_equals_the_layer_by_layer_forward(
    packed_model, runner, path, monkeypatch, module_cpu_isa
):
    """kv_cache_dtype="fp8": both paths write e4m3 keys and values over the layers' scales and
    read them back; the fused step's hidden states and cache are the forward's."""
    model = packed_model
    if path == "one_call" and runner.step_model is None:
        pytest.skip(f"the {module_cpu_isa} build has no tiles: no one-call step (the loop serves)")
    if path != "one_call":
        monkeypatch.setattr(runner, "step_model", None)
    attns = [layer.self_attn.attn for layer in model.model.layers]
    try:
        for index, attn in enumerate(attns):  # scales other than 1, per layer
            attn.k_scale.fill_(0.05 * (index % 5 + 1))
            attn.v_scale.fill_(0.02 * (index % 3 + 1))
        input_ids, positions, metadata, caches = _decode_step(model, [5, 77, 16, 120], 4, FP8_E4M3)
        before = [cache.clone() for cache in caches]
        with torch.inference_mode():
            assert runner.can_run(input_ids, positions, metadata)
            fused = runner.run(input_ids, positions, metadata)
            assert fused is not None
            fused_caches = [cache.clone() for cache in caches]
            for cache, saved in zip(caches, before):
                cache.copy_(saved)
            reference = model(input_ids, positions, metadata)
    finally:  # the module's model is shared by the other tests
        for attn in attns:
            attn.k_scale.fill_(1.0)
            attn.v_scale.fill_(1.0)
    torch.testing.assert_close(fused, reference, rtol=2e-3, atol=2e-3)
    for fused_cache, cache in zip(fused_caches, caches):
        assert torch.equal(fused_cache.view(torch.uint8), cache.view(torch.uint8))
    assert not torch.equal(caches[0].view(torch.uint8), before[0].view(torch.uint8))


def test_steps_the_fused_path_does_not_serve_fall_back(packed_model, runner):
    input_ids, positions, metadata, _ = _decode_step(packed_model, [5, 9], seed=3)
    assert runner.can_run(input_ids, positions, metadata)
    metadata.all_slots_valid = False  # padding slots possible
    assert not runner.can_run(input_ids, positions, metadata)
    metadata.all_slots_valid = True
    metadata.num_decodes = 1  # a prefill chunk in the batch
    assert not runner.can_run(input_ids, positions, metadata)
    many = torch.randint(100, 200, (MAX_DECODES + 1,))
    assert not runner.can_run(many, positions, metadata)


def test_the_runner_is_not_selected_where_the_capability_check_fails(
    packed_model, engine_config, monkeypatch
):
    assert unsupported_reason(packed_model, engine_config, CPU) is None
    # Two ranks: each holds partial sums of o_proj and down_proj that only RowParallelLinear's
    # all-reduce completes, and the fused step has none.
    two_ranks = EngineConfig(
        model=engine_config.model, parallel=ParallelConfig(tensor_parallel_size=2)
    )
    assert "tensor_parallel_size 2" in unsupported_reason(packed_model, two_ranks, CPU)
    assert LlamaCPUDecodeRunner.select(packed_model, two_ranks, CPU) is None
    cuda = torch.device("cuda")  # only compared, never touched
    assert "device cuda" in unsupported_reason(packed_model, engine_config, cuda)
    not_llama = torch.nn.Linear(2, 2)
    assert "not a LlamaForCausalLM" in unsupported_reason(not_llama, engine_config, CPU)
    assert LlamaCPUDecodeRunner.select(not_llama, engine_config, CPU) is None
    qkv_proj = packed_model.model.layers[3].self_attn.qkv_proj
    monkeypatch.setattr(qkv_proj, "packed_weight", None)  # a layer left dense
    assert "without packed tiles" in unsupported_reason(packed_model, engine_config, CPU)


@pytest.mark.parametrize("rows", [12, 100])  # the packed tiles' batch; beyond it (dense copies)
def test_layers_keep_bfloat16_between_norms_and_projections_with_the_same_values(
    packed_model, rows, monkeypatch
):
    """Where all four projections of a layer compute in bfloat16, the layer's forward keeps its
    values in it between the norms and the projections (`LlamaDecoderLayer.forward_narrow`):
    the norms read and write bfloat16, the residual stays float32. The hidden states, the
    caches and the logits are bit for bit those of the float32 round trips."""
    from ember.workers.models.llama import LlamaDecoderLayer

    model = packed_model
    layer = model.model.layers[0]
    expected = {layer.self_attn.qkv_proj.input_dtype(rows)}
    expected = None if expected == {None} else torch.bfloat16
    assert layer.narrow_dtype(rows, torch.float32) == expected
    assert layer.narrow_dtype(rows, torch.bfloat16) is None  # nothing narrower than bfloat16
    seq_lens = [3 + (7 * i) % 120 for i in range(rows)]
    input_ids, positions, metadata, caches = _decode_step(model, seq_lens, seed=rows)
    before = [cache.clone() for cache in caches]
    with torch.inference_mode():
        narrow = model(input_ids, positions, metadata)
        narrow_caches = [cache.clone() for cache in caches]
        for cache, saved in zip(caches, before):
            cache.copy_(saved)
        monkeypatch.setattr(LlamaDecoderLayer, "narrow_dtype", lambda self, n, dtype: None)
        reference = model(input_ids, positions, metadata)
    assert narrow.dtype == reference.dtype == torch.float32
    assert torch.equal(narrow, reference)
    for narrow_cache, cache in zip(narrow_caches, caches):
        assert torch.equal(narrow_cache, cache)
