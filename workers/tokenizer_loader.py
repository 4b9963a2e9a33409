"""The tokenizer of a model: transformers' `AutoTokenizer`, kept pickled in ember's cache (read by
the frontend, and by the engine core when a grammar needs the vocabulary).

`AutoTokenizer.from_pretrained` loads the model's config class to choose the tokenizer class,
and importing that class costs transformers' validators, kernels and sharding code: 3.7 s to the
first tokenizer on a 2-core machine. Unpickling the same tokenizer object takes 0.6 s and
imports neither torch nor the config class. The pickle is keyed by every tokenizer file of the
directory (name, size, mtime), the arguments, and the transformers and tokenizers versions, so a
changed file or upgrade loads afresh. Only local directories without remote code are cached;
pickles are read only from ember's cache directory, where only this module writes them.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from importlib import metadata
from typing import Any

from ember.workers.cache_dir import ember_cache_dir, write_atomically

# Files a tokenizer never reads (weights can be gigabytes; their mtimes do not matter).
_NOT_TOKENIZER_FILES = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".h5", ".msgpack")
# Bump when what is pickled changes meaning.
_CACHE_FORMAT = 1


def load_tokenizer(
    name: str,
    *,
    tokenizer_mode: str = "auto",
    trust_remote_code: bool = False,
    revision: str | None,
) -> Any:
    """`AutoTokenizer.from_pretrained(name, ...)`, from ember's cache when it holds it;
    tokenizer_mode "slow" asks for the slow class, "mistral" loads mistral_common's tokenizer
    (`ember.workers.mistral_tokenizer`). A GGUF file's tokenizer is converted by
    transformers the first time (`gguf_tokenizer_dir`), then read from that directory."""
    if name.endswith(".gguf") and os.path.isfile(name):
        from ember.workers.model_loader.gguf_files import gguf_tokenizer_dir

        name = gguf_tokenizer_dir(name)
    if tokenizer_mode == "mistral":
        from ember.workers.mistral_tokenizer import load_mistral_tokenizer

        return load_mistral_tokenizer(name, revision=revision)
    use_fast = tokenizer_mode != "slow"
    cache_file = _cache_file(name, use_fast, trust_remote_code, revision)
    if cache_file is not None:
        tokenizer = _read_cached(cache_file)
        if tokenizer is not None:
            return tokenizer
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        name, use_fast=use_fast, trust_remote_code=trust_remote_code, revision=revision
    )
    if cache_file is not None:
        try:
            data = pickle.dumps(tokenizer, protocol=pickle.HIGHEST_PROTOCOL)
        except (pickle.PicklingError, TypeError, AttributeError):  # an unpicklable tokenizer
            return tokenizer
        write_atomically(cache_file, data)
    return tokenizer


def _read_cached(cache_file: str) -> Any | None:
    try:
        with open(cache_file, "rb") as f:
            return pickle.load(f)  # ember's own cache, written by this module
    except FileNotFoundError:
        return None
    except (OSError, EOFError, pickle.UnpicklingError, AttributeError, ImportError, TypeError):
        return None  # torn, or from a tokenizer class this install no longer has


def _cache_file(
    name: str, use_fast: bool, trust_remote_code: bool, revision: str | None
) -> str | None:
    if trust_remote_code or not os.path.isdir(name):
        return None
    directory = os.path.realpath(name)
    files = []
    try:
        for entry in sorted(os.scandir(directory), key=lambda e: e.name):
            hidden = entry.name.startswith(".")  # another process's staging files
            if entry.is_file() and not hidden and not entry.name.endswith(_NOT_TOKENIZER_FILES):
                stat = entry.stat()
                files.append(f"{entry.name}:{stat.st_size}:{stat.st_mtime_ns}")
        versions = [metadata.version(package) for package in ("transformers", "tokenizers")]
    except (OSError, metadata.PackageNotFoundError):
        return None
    key = "\n".join(
        [str(_CACHE_FORMAT), directory, str(use_fast), str(revision), *versions, *files]
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:24]
    return os.path.join(ember_cache_dir(), "tokenizers", f"{digest}.pickle")
