"""Where ember keeps what it derives from a GGUF file: a cache directory keyed by the file's
path, size and mtime, and in it the Hugging Face config and tokenizer converted once.

Imported in the user's process (to resolve a model), so it imports nothing heavy: transformers
loads only when a file is converted for the first time.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator

from ember.workers.cache_dir import ember_cache_dir

logger = logging.getLogger(__name__)


def _file_key(path: str) -> str:
    stat = os.stat(path)
    key = f"{os.path.realpath(path)}:{stat.st_size}:{stat.st_mtime_ns}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def gguf_cache_dir(gguf_path: str) -> str:
    """~/.cache/ember/gguf/<key of the file's path, size and mtime>/: what ember converts from
    one GGUF file (config, tokenizer, weights) lives there."""
    return os.path.join(ember_cache_dir(), "gguf", _file_key(gguf_path))


@contextlib.contextmanager
def _one_metadata_parse() -> Iterator[None]:
    """transformers parses a GGUF file's metadata with `gguf.GGUFReader` for the config, and
    again for the tokenizer's config: each parse reads the whole vocabulary string by string
    (about 3 s for SmolLM2's 49152 tokens on 2 cores). Within this block one reader per file
    serves both (readers only read their memory-mapped file)."""
    import gguf

    original = gguf.GGUFReader
    readers: dict[tuple[str, str], object] = {}

    def shared_reader(path: str | os.PathLike, mode: str = "r") -> object:
        key = (os.path.realpath(path), mode)
        if key not in readers:
            readers[key] = original(path, mode)
        return readers[key]

    gguf.GGUFReader = shared_reader
    try:
        yield
    finally:
        gguf.GGUFReader = original


def gguf_model_dir(gguf_path: str) -> str:
    """A directory holding config.json and tokenizer files converted from `gguf_path`.

    Converting the tokenizer from GGUF takes seconds, so the result is cached in
    `gguf_cache_dir(gguf_path)` and reused on the next start.
    """
    target = gguf_cache_dir(gguf_path)
    if os.path.exists(os.path.join(target, "config.json")):
        return target
    from transformers import AutoConfig, AutoTokenizer

    from ember.workers.models.registry import resolve_architecture

    directory, filename = os.path.split(os.path.abspath(gguf_path))
    logger.info("converting config and tokenizer of %s (cached for the next start)", gguf_path)
    with _one_metadata_parse():
        config = AutoConfig.from_pretrained(directory, gguf_file=filename)
        config.architectures = [resolve_architecture(config)]
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=filename)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".staging-", dir=os.path.dirname(target))
    try:
        config.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.rename(staging, target)
    except OSError:
        # Another process finished the same conversion first; its copy is as good as ours.
        shutil.rmtree(staging, ignore_errors=True)
        if not os.path.exists(os.path.join(target, "config.json")):
            raise
    return target
