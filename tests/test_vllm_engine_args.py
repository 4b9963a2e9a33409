"""vLLM's engine arguments (`ember.enginecore.vllm_engine_args`): every one is covered, the
no-effect ones are logged once, the values ember cannot honour raise NotImplementedError before
any process starts, and the loading options (`hf_overrides`, `download_dir`, `hf_token`,
`tokenizer_revision`, `max_logprobs=-1`) work."""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import inspect
import logging
import os
import re
import shutil
import subprocess
import warnings

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import ember.llm
from ember import LLM, SamplingParams
from ember.enginecore import vllm_engine_args
from ember.enginecore.arg_utils import EngineArgs
from ember.enginecore.vllm_engine_args import (
    VLLM_ENGINE_ARGS,
    VLLM_LLM_ONLY_ARGS,
    ConfigDefault,
    ember_engine_kwargs,
    markdown_table,
    policy,
)
from tests.helpers import hf_greedy, random_prompts, write_random_llama

README = os.path.join(os.path.dirname(os.path.dirname(__file__)), "README.md")
# Arguments other parts of issue #24 give ember options of its own.
OWNED_ELSEWHERE = (
    "generation_config",
    "override_generation_config",
    "chat_template",
    "enable_sleep_mode",
)
VLLM_NAMES = [name for name, _ in VLLM_ENGINE_ARGS + VLLM_LLM_ONLY_ARGS]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return write_random_llama(tmp_path_factory.mktemp("llama") / "model")


@pytest.fixture
def fresh_log(caplog):
    """A process that has logged no argument yet, and caplog at INFO."""
    vllm_engine_args._logged_names().clear()
    caplog.set_level(logging.INFO, logger="ember.enginecore.vllm_engine_args")
    yield caplog
    vllm_engine_args._logged_names().clear()


@pytest.fixture
def no_engine_start(monkeypatch):
    """Fail the test if an LLM gets as far as starting its engine-core process."""

    def refuse(*args, **kwargs):
        raise AssertionError("an engine process was started")

    monkeypatch.setattr(ember.llm, "EngineCoreClient", refuse)
    monkeypatch.setattr(subprocess, "Popen", refuse)


def _llm_options() -> set[str]:
    """What LLM() takes itself, besides EngineArgs' fields."""
    names = set(inspect.signature(LLM.__init__).parameters)
    source = inspect.getsource(LLM.__init__)
    names |= set(re.findall(r'kwargs\.pop\("(\w+)"', source))
    return names


# ---- the table -----------------------------------------------------------------------------


def test_every_vllm_argument_is_covered():
    assert len(VLLM_NAMES) == len(set(VLLM_NAMES)) == 257
    ember_options = EngineArgs.field_names() | _llm_options()
    pending = []
    for name in VLLM_NAMES:
        rule = policy(name)
        assert rule is not None, f"{name} has no policy"
        if rule.kind == "ember" and name not in ember_options:
            if name in OWNED_ELSEWHERE:
                pending.append(name)
            else:
                raise AssertionError(f"{name} is marked an ember option but ember has none")
        if rule.kind == "only":
            assert name not in ember_options, f"ember now has {name}: mark it 'ember'"
        if rule.kind == "no_effect" and name in EngineArgs.field_names():
            assert name in vllm_engine_args._NO_EFFECT_EMBER_FIELDS, name
    if pending:
        warnings.warn(f"pending in other parts of issue #24: {pending}", stacklevel=1)


def test_table_has_no_argument_vllm_lacks():
    assert set(vllm_engine_args._POLICIES) == set(VLLM_NAMES)


def test_field_list_matches_installed_vllm_source():
    """With `$EMBER_BENCH_VLLM_PYTHON` naming a vLLM venv's interpreter, its EngineArgs fields
    and LLM.__init__ arguments (read from the source, vLLM is not imported) are the table's."""
    python = os.environ.get("EMBER_BENCH_VLLM_PYTHON")
    if not python:
        pytest.skip("set EMBER_BENCH_VLLM_PYTHON to a vLLM venv's python to compare")
    probe = "import importlib.util as u; print(u.find_spec('vllm').submodule_search_locations[0])"
    root = subprocess.run(
        [python, "-c", probe], capture_output=True, text=True, check=True, cwd="/"
    ).stdout.strip()
    with open(os.path.join(root, "_version.py")) as f:
        version = re.search(r"__version__ = version = '([^']+)'", f.read()).group(1)
    assert version == vllm_engine_args.VLLM_VERSION
    with open(os.path.join(root, "engine", "arg_utils.py")) as f:
        engine_args = _class_node(ast.parse(f.read()), "EngineArgs")
    fields = [
        node.target.id
        for node in engine_args.body
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
    ]
    assert fields == [name for name, _ in VLLM_ENGINE_ARGS]
    with open(os.path.join(root, "entrypoints", "llm.py")) as f:
        llm = _class_node(ast.parse(f.read()), "LLM")
    init = next(n for n in llm.body if isinstance(n, ast.FunctionDef) and n.name == "__init__")
    arguments = [a.arg for a in init.args.args[1:] + init.args.kwonlyargs]
    assert [a for a in arguments if a not in fields] == [n for n, _ in VLLM_LLM_ONLY_ARGS]


def _class_node(tree: ast.Module, name: str) -> ast.ClassDef:
    return next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name)


def test_readme_table_is_the_module_s():
    with open(README) as f:
        readme = f.read()
    section = readme.split("## vLLM's engine arguments\n", 1)[1].split("\n## ", 1)[0]
    assert markdown_table() in section, (
        "README is stale: python -m ember.enginecore.vllm_engine_args --update-readme README.md"
    )


# ---- checking arguments --------------------------------------------------------------------


def test_no_effect_argument_is_logged_once_and_builds_an_engine_config(fresh_log, llama_dir):
    given = {
        "model": llama_dir,
        "enable_chunked_prefill": True,
        "compilation_config": {"mode": 3},
        "served_model_name": None,  # vLLM's default: not logged
        "disable_custom_all_reduce": True,  # an option of ember's, which changes nothing
    }
    for _ in range(2):
        kwargs = ember_engine_kwargs(given, EngineArgs.field_names())
    assert kwargs == {"model": llama_dir, "disable_custom_all_reduce": True}
    messages = [record.getMessage() for record in fresh_log.records]
    assert len(messages) == 3, messages
    chunked = [m for m in messages if m.startswith("enable_chunked_prefill=True")]
    assert len(chunked) == 1 and "max_num_batched_tokens" in chunked[0]
    assert any(m.startswith("compilation_config=") for m in messages)
    assert any(m.startswith("disable_custom_all_reduce=True") for m in messages)
    assert all(record.levelno == logging.INFO for record in fresh_log.records)
    config = EngineArgs(**kwargs).create_engine_config()
    assert config.model.architecture == "LlamaForCausalLM"


def test_every_vllm_argument_at_its_default_builds_an_engine_config(fresh_log, llama_dir):
    """What `LLM(**vars(vllm.EngineArgs(model)))` passes (config objects given as None)."""
    given = {
        name: None if isinstance(default, ConfigDefault) else default
        for name, default in VLLM_ENGINE_ARGS
    }
    given.update(model=llama_dir, disable_log_stats=True)
    llm_options = {"disable_log_stats", "data_parallel_size"}  # LLM takes these itself
    kwargs = ember_engine_kwargs(given, EngineArgs.field_names() | llm_options)
    kwargs.pop("disable_log_stats")
    assert kwargs.pop("data_parallel_size") == 1
    config = EngineArgs(**kwargs).create_engine_config()
    assert (config.cache.block_size, config.scheduler.max_num_seqs) == (16, 256)
    assert config.cache.enable_prefix_caching
    assert fresh_log.records == []  # vLLM's defaults are not logged


def test_none_is_ember_s_default_where_vllm_s_default_is_none():
    vllm_defaults = dict(VLLM_ENGINE_ARGS)
    expected = {
        field.name
        for field in dataclasses.fields(EngineArgs)
        if field.name in vllm_defaults
        and vllm_defaults[field.name] is None
        and field.default is not None
        and field.default is not dataclasses.MISSING
    }
    assert vllm_engine_args._NONE_IS_EMBER_DEFAULT == expected


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("pipeline_parallel_size", 2),
        ("enable_chunked_prefill", False),
        ("kv_cache_dtype_skip_layers", ["0"]),
        ("profiler_config", {"profiler": "torch", "torch_profiler_dir": "/tmp/trace"}),
    ],
)
def test_value_ember_cannot_honour_raises_before_any_process_starts(
    name, value, llama_dir, no_engine_start
):
    with pytest.raises(NotImplementedError, match=rf"^{name}={re.escape(repr(value))}"):
        LLM(llama_dir, **{name: value})


def test_cpu_offload_is_honoured_on_cuda_and_no_effect_on_cpu(fresh_log, llama_dir):
    cuda = EngineArgs(model=llama_dir, device="cuda", cpu_offload_gb=2).create_engine_config()
    assert cuda.device.cpu_offload_bytes == 2 * 2**30
    cpu = EngineArgs(model=llama_dir, device="cpu", cpu_offload_gb=2).create_engine_config()
    assert cpu.device.cpu_offload_bytes == 0
    assert [r.getMessage().split(" ")[0] for r in fresh_log.records] == ["cpu_offload_gb=2"]


def test_name_vllm_does_not_have_raises_type_error(llama_dir, no_engine_start):
    with pytest.raises(TypeError, match="enable_chunked_prefil'"):
        LLM(llama_dir, enable_chunked_prefil=True)
    with pytest.raises(TypeError, match="enable_chunked_prefill"):
        EngineArgs(model=llama_dir, enable_chunked_prefill=True)  # EngineArgs is ember's own


# ---- loading options -----------------------------------------------------------------------


def test_hf_overrides_dict_changes_the_engine_config(llama_dir):
    config = EngineArgs(
        model=llama_dir, hf_overrides={"max_position_embeddings": 64, "rms_norm_eps": 0.25}
    ).create_engine_config()
    assert config.model.max_model_len == 64
    assert config.model.hf_config["config"]["rms_norm_eps"] == 0.25
    plain = EngineArgs(model=llama_dir).create_engine_config()  # not the cached override
    assert plain.model.max_model_len == 512
    with pytest.raises(TypeError, match="hf_overrides"):
        EngineArgs(model=llama_dir, hf_overrides=["rms_norm_eps"]).create_engine_config()


def test_hf_overrides_callable_builds_the_workers_model_and_max_logprobs_minus_one(
    llama_dir, fresh_log
):
    """One engine start: the workers' model follows a callable override (greedy tokens equal
    Hugging Face's with the same override, not without); max_logprobs=-1 lets a request ask
    for the whole vocabulary; a no-effect argument given to LLM is logged."""

    def widen_norm_eps(config):
        config.rms_norm_eps = 0.5
        return config

    prompts = random_prompts(2, 512, [9, 17], seed=5)
    with LLM(
        llama_dir,
        dtype="float32",
        skip_tokenizer_init=True,
        hf_overrides=widen_norm_eps,
        max_logprobs=-1,
        enable_chunked_prefill=True,
    ) as llm:
        params = SamplingParams(temperature=0.0, max_tokens=8, logprobs=-1)
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    overridden = AutoModelForCausalLM.from_pretrained(
        llama_dir, config=widen_norm_eps(AutoConfig.from_pretrained(llama_dir))
    ).eval()
    plain = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    tokens = [output.outputs[0].token_ids for output in outputs]
    assert tokens == [hf_greedy(overridden, p, 8) for p in prompts]
    assert tokens != [hf_greedy(plain, p, 8) for p in prompts]
    for output in outputs:
        assert all(len(step) == 512 for step in output.outputs[0].logprobs)
    with torch.no_grad():  # ember's logprob of its first token is Hugging Face's
        logits = overridden(torch.tensor([prompts[0]])).logits[0, -1]
    first = outputs[0].outputs[0]
    expected = torch.log_softmax(logits, -1)[first.token_ids[0]].item()
    assert first.logprobs[0][first.token_ids[0]].logprob == pytest.approx(expected, abs=1e-4)
    assert any(r.getMessage().startswith("enable_chunked_prefill=True") for r in fresh_log.records)


REPO_ID = "ember-tests/tiny-llama-args"


def _add_snapshot(repo_dir, commit: str, source_dir: str, ref: str) -> str:
    """`source_dir`'s files as huggingface_hub lays a snapshot out (blobs, links, a ref)."""
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo_dir / "blobs").mkdir(exist_ok=True)
    (repo_dir / "refs").mkdir(exist_ok=True)
    for name in sorted(os.listdir(source_dir)):
        with open(os.path.join(source_dir, name), "rb") as f:
            blob_name = hashlib.sha256(f.read()).hexdigest()
        if not (repo_dir / "blobs" / blob_name).exists():
            shutil.copyfile(os.path.join(source_dir, name), repo_dir / "blobs" / blob_name)
        os.symlink(os.path.join("..", "..", "blobs", blob_name), snapshot / name)
    (repo_dir / "refs" / ref).write_text(commit)
    return str(snapshot)


def test_download_dir_token_and_tokenizer_revision_reach_huggingface_hub(
    llama_dir, tmp_path, monkeypatch
):
    """An offline hub cache in `download_dir` (not the environment's) holding the repo at main
    and at v2: the model comes from main, the tokenizer from v2, and huggingface_hub is asked
    with the token and that cache."""
    import huggingface_hub

    download_dir = tmp_path / "downloads"
    repo_dir = download_dir / ("models--" + REPO_ID.replace("/", "--"))
    main = _add_snapshot(repo_dir, "a" * 40, llama_dir, "main")
    v2 = _add_snapshot(repo_dir, "b" * 40, llama_dir, "v2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    calls = []
    real_snapshot_download = huggingface_hub.snapshot_download

    def recording_snapshot_download(repo_id, **kwargs):
        calls.append({"repo_id": repo_id, **kwargs})
        return real_snapshot_download(repo_id, **kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", recording_snapshot_download)
    config = EngineArgs(
        model=REPO_ID,
        download_dir=str(download_dir),
        hf_token="hf_secret",
        tokenizer_revision="v2",
    ).create_engine_config()
    assert os.path.samefile(config.model.model_dir, main)
    assert os.path.samefile(config.model.tokenizer, v2)
    assert [(c["repo_id"], c["revision"]) for c in calls] == [(REPO_ID, None), (REPO_ID, "v2")]
    assert all(c["cache_dir"] == str(download_dir) and c["token"] == "hf_secret" for c in calls)
    assert "*.safetensors" not in calls[1]["allow_patterns"]  # the tokenizer's: no weights
    calls.clear()
    same = EngineArgs(model=REPO_ID, download_dir=str(download_dir)).create_engine_config()
    assert same.model.tokenizer == same.model.model_dir and len(calls) == 1
    with pytest.raises(FileNotFoundError, match=r"tokenizer .*'v3'.*downloads"):
        EngineArgs(
            model=REPO_ID, download_dir=str(download_dir), tokenizer_revision="v3"
        ).create_engine_config()
