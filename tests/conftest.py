"""Shared fixtures: the embedded model, its Hugging Face reference, and small random models."""

from __future__ import annotations

import os

import pytest
import torch

from ember.kernels.cpu_features import ISAS, supported_isas
from tests.helpers import write_random_llama

# Without a GPU, ember's Triton kernels are tested in Triton's interpreter. Triton reads
# TRITON_INTERPRET when `@triton.jit` wraps a function, its own helpers (`tl.sum`, ...) included,
# which it wraps when it is imported; and transformers imports triton as soon as a test builds a
# Hugging Face model. So the variable is set here, before any test module is imported. Nothing
# else on CPU runs triton code, so other tests (and the engine processes that inherit the
# variable) are not affected by it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session", autouse=True)
def session_cache_dir(tmp_path_factory) -> str:
    """The suite's own `$XDG_CACHE_HOME`, for ember and every engine it starts: what ember
    converts from the suite's models (weights, configs, tokenizers: a few GB a run, most of it
    from files that live only as long as the run) goes with the run's temporary directory
    instead of piling up in the user's cache. The built C kernels, keyed by their source, flags
    and CPU, stay the user's (a link): building them afresh would add a minute to every run."""
    from ember.kernels.cpu_library import kernel_cache_dir

    kernels = kernel_cache_dir()
    cache = tmp_path_factory.mktemp("cache")
    os.makedirs(cache / "ember")
    try:
        os.makedirs(kernels, exist_ok=True)
    except OSError:  # a read-only home: the kernels are built into the run's directory too
        pass
    else:
        os.symlink(kernels, cache / "ember" / "kernels")
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
        yield str(cache)


@pytest.fixture(scope="session")
def default_gguf() -> str:
    from ember.workers.model_loader.resolve import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def hf_smollm2(default_gguf):
    """Hugging Face's own model on the same GGUF weights, in float32: the oracle."""
    from transformers import AutoModelForCausalLM

    directory, filename = os.path.split(default_gguf)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=filename, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> str:
    """A random Llama (GQA, untied head) saved as one safetensors file."""
    return write_random_llama(tmp_path_factory.mktemp("tiny_llama"))


def _use_isa(isa: str, monkeypatch: pytest.MonkeyPatch) -> str:
    if isa not in supported_isas():
        pytest.skip(f"this CPU has no {isa} (it runs {', '.join(supported_isas())})")
    monkeypatch.setenv("EMBER_CPU_ISA", isa)
    return isa


@pytest.fixture(params=ISAS)
def cpu_isa(request, monkeypatch) -> str:
    """The test once per ISA of the C kernels (`EMBER_CPU_ISA`: avx512, avx2-vnni, avx2,
    generic); an ISA this CPU lacks skips, saying so. Each kernel module caches its library per
    ISA."""
    return _use_isa(request.param, monkeypatch)


@pytest.fixture(scope="module", params=ISAS)
def module_cpu_isa(request) -> str:
    """`cpu_isa` for a module whose fixtures (a model, its runner) hold kernels of one ISA."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        yield _use_isa(request.param, monkeypatch)
