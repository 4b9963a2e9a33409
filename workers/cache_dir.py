"""ember's cache directory (`$XDG_CACHE_HOME/ember`, else ~/.cache/ember) and whole-file writes
into it: what one start converts (GGUF weights, configs, tokenizers) the next one reads."""

from __future__ import annotations

import logging
import os
import tempfile

logger = logging.getLogger(__name__)


def ember_cache_dir() -> str:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "ember")


def write_atomically(path: str, data: bytes) -> bool:
    """Write `path` so that readers see it whole or not at all (staged, then renamed). A
    read-only or full cache only costs the next start: it logs and returns False."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, staging = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".staging-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(staging, path)
        except BaseException:
            os.unlink(staging)
            raise
    except OSError as exc:
        logger.warning("could not cache %s: %s", path, exc)
        return False
    return True
