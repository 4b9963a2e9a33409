"""Cold start: the model config read once and kept as a snapshot, the tokenizer kept pickled, and
a warm start whose user process imports neither torch nor a transformers config class."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import transformers

from ember.workers import hf_config
from ember.workers.hf_config import HFConfig, load_hf_config, snapshot_config
from ember.workers.model_loader.gguf_files import (
    gguf_cache_dir,
    gguf_model_dir,
    gguf_tokenizer_dir,
)
from ember.workers.tokenizer_loader import load_tokenizer
from tests.helpers import _BASE_SETTINGS, RANDOM_MODEL_SETTINGS

_CONFIGS = [
    (name, settings) for name, settings in RANDOM_MODEL_SETTINGS.values() if name != "GPT2Config"
]
_CONFIGS += [
    # GPT-2 spells hidden_size n_embd (attribute_map); BERT's num_labels is a property.
    ("GPT2Config", {"n_embd": 64, "n_layer": 2, "n_head": 4}),
    ("BertConfig", {"hidden_size": 64, "num_labels": 3}),
    # Nested sub-configs, and a scaled rope the rotary table needs transformers' class for.
    ("Gemma3Config", {}),
    ("LlamaConfig", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}),
]


def _readable_attributes(config) -> dict:
    names = [*dir(config), *(getattr(config, "attribute_map", None) or {})]
    values = {}
    for name in names:
        if name.startswith("__"):
            continue
        try:
            value = getattr(config, name)
        except (AttributeError, TypeError, ValueError, NotImplementedError, KeyError):
            continue
        if callable(value):
            continue
        values[name] = value
    return values


@pytest.mark.parametrize(("class_name", "settings"), _CONFIGS, ids=[c for c, _ in _CONFIGS])
def test_a_config_snapshot_reads_as_the_transformers_config(class_name, settings):
    config = getattr(transformers, class_name)(**{**_BASE_SETTINGS, **settings})
    view = HFConfig(json.loads(json.dumps(snapshot_config(config))))  # as the workers get it
    compared = 0
    for name, value in _readable_attributes(config).items():
        if isinstance(value, transformers.PretrainedConfig):
            sub_config = json.loads(json.dumps(value.to_dict()))
            assert getattr(view, name).to_dict() == sub_config, name
            continue
        try:
            expected = json.loads(json.dumps(value))
        except TypeError:  # not data (a dtype, a class): no model reads it
            continue
        if name == "id2label":  # int keys, as transformers restores them
            expected = value
        if name == "transformers_version":  # to_dict() stamps it; the object holds None
            continue
        assert getattr(view, name) == expected, name
        compared += 1
    assert compared > 20
    assert view.hidden_size == config.hidden_size
    with pytest.raises(AttributeError):
        _ = view.no_such_field
    assert getattr(view, "no_such_field", 7) == 7
    assert view.to_transformers().to_dict() == config.to_dict()


def test_the_config_is_read_through_transformers_once(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    model_dir = tmp_path / "model"
    transformers.LlamaConfig(**_BASE_SETTINGS).save_pretrained(model_dir)
    first = load_hf_config(str(model_dir))
    assert os.listdir(tmp_path / "cache" / "ember" / "configs")

    def refuse(*args):
        raise AssertionError("transformers read the config again")

    monkeypatch.setattr(hf_config, "_transformers_config", refuse)
    again = load_hf_config(str(model_dir))
    assert again.snapshot() == first.snapshot()
    assert again.vocab_size == 512

    # A changed config.json is read afresh.
    transformers.LlamaConfig(**{**_BASE_SETTINGS, "vocab_size": 640}).save_pretrained(model_dir)
    stat = os.stat(model_dir / "config.json")
    os.utime(model_dir / "config.json", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    monkeypatch.undo()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert load_hf_config(str(model_dir)).vocab_size == 640


_TEXTS = ["Hello world", "  leading spaces and ünïcödé — 😀", "<|im_start|>user\nhi<|im_end|>", ""]


def _assert_same_tokenizer(cached, fresh) -> None:
    assert type(cached) is type(fresh)
    for text in _TEXTS:
        ids = fresh(text).input_ids
        assert cached(text).input_ids == ids, text
        assert cached.decode(ids) == fresh.decode(ids)
        assert cached.convert_ids_to_tokens(ids) == fresh.convert_ids_to_tokens(ids)
    messages = [{"role": "user", "content": "What is 2 + 2?"}]
    assert cached.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    ) == fresh.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert cached.all_special_ids == fresh.all_special_ids
    assert cached.eos_token_id == fresh.eos_token_id
    assert len(cached) == len(fresh)


def test_a_cached_tokenizer_equals_a_fresh_one(default_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    tokenizer_dir = tmp_path / "tokenizer"
    source = gguf_tokenizer_dir(default_gguf)
    shutil.copytree(source, tokenizer_dir, ignore=shutil.ignore_patterns("*.safetensors"))
    fresh = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir))
    load_tokenizer(str(tokenizer_dir), revision=None)  # fills the cache
    assert os.listdir(tmp_path / "cache" / "ember" / "tokenizers")

    def refuse(*args, **kwargs):
        raise AssertionError("AutoTokenizer was called again")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", refuse)
    _assert_same_tokenizer(load_tokenizer(str(tokenizer_dir), revision=None), fresh)

    # A changed tokenizer file is loaded afresh.
    monkeypatch.undo()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    config_file = tokenizer_dir / "tokenizer_config.json"
    settings = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**settings, "model_max_length": 321}))
    assert load_tokenizer(str(tokenizer_dir), revision=None).model_max_length == 321


def test_remote_code_and_hub_names_are_not_cached(tmp_path, monkeypatch):
    from ember.workers import tokenizer_loader

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert tokenizer_loader._cache_file("org/model", True, False, None) is None
    assert tokenizer_loader._cache_file(str(tmp_path), True, True, None) is None
    assert tokenizer_loader._cache_file(str(tmp_path), True, False, None) is not None


_WARM_START = textwrap.dedent(
    """
    import json, sys
    from ember import LLM, SamplingParams
    with LLM() as llm:
        greedy = SamplingParams(max_tokens=8, temperature=0.0)
        text = llm.generate("The capital of France is", greedy, use_tqdm=False)[0].outputs[0].text
        chat = llm.chat([{"role": "user", "content": "Hi"}], greedy, use_tqdm=False)
    print(json.dumps({
        "text": text,
        "chat": chat[0].outputs[0].text,
        "torch": "torch" in sys.modules,
        "config_class": "transformers.models.llama.configuration_llama" in sys.modules,
    }))
    """
)


@pytest.mark.slow
def test_a_warm_start_imports_no_torch_in_the_users_process():
    """The second start of the default model: the config and tokenizer come from ember's cache,
    so the user's process never loads torch or a transformers config class (the first start,
    which may convert and cache them, does)."""
    runs = []
    for _ in range(2):
        proc = subprocess.run(
            [sys.executable, "-c", _WARM_START],
            check=False,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    first, second = runs
    assert second["torch"] is False
    assert second["config_class"] is False
    assert second["text"] == first["text"] and second["text"]
    assert second["chat"] == first["chat"] and second["chat"]


def test_the_plain_array_reader_reads_what_ggufs_reader_reads(default_gguf):
    import gguf
    import numpy as np

    from ember.workers.model_loader.gguf_files import plain_array_reader_class

    expected = gguf.GGUFReader(default_gguf)
    got = plain_array_reader_class()(default_gguf)
    assert list(got.fields) == list(expected.fields)
    for name, field in expected.fields.items():
        other = got.fields[name]
        assert (other.offset, other.types, other.data) == (field.offset, field.types, field.data)
        assert len(other.parts) == len(field.parts), name
        for part, expected_part in zip(other.parts, field.parts, strict=True):
            assert part.dtype == expected_part.dtype and np.array_equal(part, expected_part), name
    assert [t.name for t in got.tensors] == [t.name for t in expected.tensors]
    for tensor, expected_tensor in zip(got.tensors, expected.tensors, strict=True):
        assert tensor.tensor_type == expected_tensor.tensor_type
        assert tensor.data_offset == expected_tensor.data_offset
        assert np.array_equal(tensor.data, expected_tensor.data)


def test_a_gguf_files_tokenizer_converts_when_first_loaded(default_gguf, tmp_path, monkeypatch):
    """The engine's config needs only config.json: the tokenizer of a GGUF file is converted by
    the first `load_tokenizer` (the frontend's, on the thread beside the engine's start), and
    equals transformers' own conversion; two threads converting at once agree."""
    from concurrent.futures import ThreadPoolExecutor

    from ember.enginecore.arg_utils import EngineArgs

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    config = EngineArgs(model=default_gguf).create_engine_config()
    cache = gguf_cache_dir(default_gguf)
    assert config.model.model_dir == cache
    assert config.model.tokenizer == default_gguf
    assert sorted(os.listdir(cache)) == ["config.json", "source.json"]
    directory, filename = os.path.split(default_gguf)
    expected_config = transformers.AutoConfig.from_pretrained(directory, gguf_file=filename)
    with open(os.path.join(cache, "config.json")) as written:
        assert json.load(written) == {
            **json.loads(expected_config.to_json_string()),
            "architectures": ["LlamaForCausalLM"],
        }

    with ThreadPoolExecutor(2) as pool:
        loads = [pool.submit(load_tokenizer, default_gguf, revision=None) for _ in range(2)]
        tokenizers = [load.result() for load in loads]
    fresh = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=filename)
    for tokenizer in tokenizers:
        _assert_same_tokenizer(tokenizer, fresh)
    assert not [name for name in os.listdir(cache) if name.startswith(".staging")]
    assert sorted(os.listdir(os.path.join(cache, "tokenizer"))) == [
        "chat_template.jinja",
        "tokenizer.json",
        "tokenizer_config.json",
    ]


def test_a_gguf_files_cache_entry_goes_when_its_file_is_gone_or_changed(
    default_gguf, tmp_path, monkeypatch
):
    """Each GGUF file's cache entry is keyed by its path, size and mtime; converting a file
    removes the entries of files that were deleted or changed since (they can never be read
    again), and keeps the others, entries without a record of their file included."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    first, second = tmp_path / "first.gguf", tmp_path / "second.gguf"
    shutil.copyfile(default_gguf, first)
    shutil.copyfile(default_gguf, second)
    first_entry = gguf_model_dir(str(first))
    second_entry = gguf_model_dir(str(second))
    assert first_entry == gguf_cache_dir(str(first)) != second_entry
    with open(os.path.join(first_entry, "source.json")) as record:
        assert json.load(record) == {"path": os.path.realpath(first)}
    unrecorded = os.path.join(os.path.dirname(first_entry), "0123456789abcdef")
    os.makedirs(unrecorded)
    with open(os.path.join(unrecorded, "config.json"), "w") as config:
        config.write("{}")

    stat = os.stat(first)
    os.utime(first, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # first changed
    os.unlink(second)  # second gone
    changed_entry = gguf_model_dir(str(first))
    assert changed_entry != first_entry
    root = os.path.dirname(first_entry)
    assert sorted(os.listdir(root)) == sorted(
        os.path.basename(entry) for entry in (changed_entry, unrecorded)
    )
