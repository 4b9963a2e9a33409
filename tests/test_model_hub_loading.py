"""Loading by Hugging Face repo id from a hub cache built on disk (refs, snapshots, blobs), with
`HF_HUB_OFFLINE=1`: the default revision, a branch, a commit, and a revision not in the cache."""

from __future__ import annotations

import hashlib
import os
import shutil

import pytest
from transformers import AutoModelForCausalLM

from ember import LLM, SamplingParams
from ember.enginecore.arg_utils import EngineArgs
from ember.enginecore.engine_core import EngineCore
from tests.helpers import hf_greedy, random_prompts, run_engine, write_random_model

REPO_ID = "ember-tests/tiny-llama"
MAIN_COMMIT = "a" * 40
V2_COMMIT = "b" * 40
PROMPTS = random_prompts(4, 512, [7, 30, 3, 51], seed=3)
GREEDY = SamplingParams(temperature=0.0, max_tokens=16)


def _add_snapshot(repo_dir, commit: str, source_dir: str, ref: str | None) -> str:
    """Lay `source_dir`'s files out as huggingface_hub does: content in blobs/<hash>,
    snapshots/<commit>/<file> a relative symlink to it, refs/<ref> holding the commit."""
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo_dir / "blobs").mkdir(exist_ok=True)
    for name in sorted(os.listdir(source_dir)):
        with open(os.path.join(source_dir, name), "rb") as f:
            blob_name = hashlib.sha256(f.read()).hexdigest()
        blob = repo_dir / "blobs" / blob_name
        if not blob.exists():
            shutil.copyfile(os.path.join(source_dir, name), blob)
        os.symlink(os.path.join("..", "..", "blobs", blob_name), snapshot / name)
    if ref is not None:
        (repo_dir / "refs").mkdir(exist_ok=True)
        (repo_dir / "refs" / ref).write_text(commit)
    return str(snapshot)


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    """A hub cache holding REPO_ID at two commits: main (seed 0) and branch v2 (seed 1)."""
    root = tmp_path_factory.mktemp("hf_home")
    repo_dir = root / "hub" / ("models--" + REPO_ID.replace("/", "--"))
    sources = tmp_path_factory.mktemp("sources")
    main_src = write_random_model(sources / "main", "LlamaForCausalLM", seed=0)
    v2_src = write_random_model(sources / "v2", "LlamaForCausalLM", seed=1)
    snapshots = {
        "main": _add_snapshot(repo_dir, MAIN_COMMIT, main_src, "main"),
        "v2": _add_snapshot(repo_dir, V2_COMMIT, v2_src, "v2"),
    }
    return root, snapshots


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)


def test_repo_id_loads_from_hf_home_cache_offline(hub_cache, offline, monkeypatch):
    root, snapshots = hub_cache
    monkeypatch.setenv("HF_HOME", str(root))
    hf_model = AutoModelForCausalLM.from_pretrained(snapshots["main"]).eval()
    with LLM(REPO_ID, dtype="float32", skip_tokenizer_init=True) as llm:
        assert os.path.samefile(llm.config.model.model_dir, snapshots["main"])
        outputs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    for prompt, output in zip(PROMPTS, outputs):
        assert output.outputs[0].token_ids == hf_greedy(hf_model, prompt, 16)


@pytest.mark.parametrize("revision", ["v2", V2_COMMIT, MAIN_COMMIT])
def test_revision_picks_its_snapshot_offline(hub_cache, offline, monkeypatch, revision):
    root, snapshots = hub_cache
    monkeypatch.setenv("HF_HUB_CACHE", str(root / "hub"))
    config = EngineArgs(model=REPO_ID, revision=revision, dtype="float32").create_engine_config()
    expected = snapshots["main"] if revision == MAIN_COMMIT else snapshots["v2"]
    assert os.path.samefile(config.model.model_dir, expected)
    assert config.model.revision == revision


def test_revision_generates_with_its_own_weights(hub_cache, offline, monkeypatch):
    root, snapshots = hub_cache
    monkeypatch.setenv("HF_HUB_CACHE", str(root / "hub"))
    config = EngineArgs(model=REPO_ID, revision="v2", dtype="float32").create_engine_config()
    core = EngineCore(config)
    try:
        tokens = run_engine(core, PROMPTS, GREEDY)
    finally:
        core.shutdown()
    v2_model = AutoModelForCausalLM.from_pretrained(snapshots["v2"]).eval()
    main_model = AutoModelForCausalLM.from_pretrained(snapshots["main"]).eval()
    assert tokens == [hf_greedy(v2_model, p, 16) for p in PROMPTS]
    assert tokens != [hf_greedy(main_model, p, 16) for p in PROMPTS]


def test_revision_missing_from_cache_offline_is_a_clear_error(hub_cache, offline, monkeypatch):
    root, _ = hub_cache
    monkeypatch.setenv("HF_HUB_CACHE", str(root / "hub"))
    with pytest.raises(FileNotFoundError, match=r"tiny-llama.*'v3'.*HF_HUB_OFFLINE"):
        EngineArgs(model=REPO_ID, revision="v3").create_engine_config()
    with pytest.raises(FileNotFoundError, match=r"other/model.*not in the Hugging Face cache"):
        EngineArgs(model="other/model").create_engine_config()
