"""Imports from a process started at the checkout's root, where `kernels/` is a top-level name.

`transformers` >= 5.25 imports Hugging Face's `kernels` package while loading its model code.
The checkout's `kernels/` directory (ember.kernels) must not shadow it there.
"""

from __future__ import annotations

import importlib.machinery
import json
import os
import subprocess
import sys

CHECKOUT_ROOT = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))

PROBE = """
import json, sys
import transformers.models.llama.modeling_llama
import kernels
import ember.kernels
print(json.dumps({"kernels": getattr(kernels, "__file__", None),
                  "ember_kernels": ember.kernels.__file__,
                  "rms_norm": callable(ember.kernels.rms_norm)}))
"""


def _installed_kernels_origin() -> str | None:
    entries = [e for e in sys.path if os.path.realpath(e or os.getcwd()) != CHECKOUT_ROOT]
    spec = importlib.machinery.PathFinder.find_spec("kernels", entries)
    return None if spec is None else spec.origin


def test_process_started_at_checkout_root_gets_installed_kernels_package():
    result = subprocess.run(
        [sys.executable, "-c", PROBE],
        check=False,
        cwd=CHECKOUT_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    checkout_kernels = os.path.join(CHECKOUT_ROOT, "kernels", "__init__.py")
    assert os.path.realpath(seen["ember_kernels"]) == checkout_kernels
    assert seen["rms_norm"]
    installed = _installed_kernels_origin()
    if installed is None:
        # Nothing to hand over to: the top-level name stays this directory, unused.
        assert os.path.realpath(seen["kernels"]) == checkout_kernels
    else:
        assert os.path.realpath(seen["kernels"]) == os.path.realpath(installed)
