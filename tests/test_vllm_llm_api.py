"""vLLM's `LLM` API table (`ember.enginecore.vllm_llm_api`): what it says ember has, ember's
`LLM` has; what ember's `LLM` has is not marked missing; the README's section is the table's.
No engine starts: ember's `LLM` is read with `inspect`."""

from __future__ import annotations

import ast
import inspect
import json
import os
import subprocess
import textwrap
from functools import cache

import pytest

from ember.enginecore import vllm_engine_args, vllm_llm_api
from ember.enginecore.arg_utils import EngineArgs
from ember.enginecore.vllm_llm_api import (
    MISSING,
    SECTION_HEADER,
    VLLM_LLM_ATTRIBUTES,
    VLLM_LLM_METHODS,
    keys,
    markdown,
    status,
    status_kind,
)
from ember.llm import LLM

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


@cache
def _init_attributes() -> frozenset[str]:
    """The attributes ember's `LLM.__init__` (and the methods it calls) set on `self`."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(LLM)))
    return frozenset(
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.ctx, ast.Store)
        and isinstance(node.value, ast.Name)
        and node.value.id == "self"
    )


def _ember_has_member(name: str) -> bool:
    return hasattr(LLM, name) or name in _init_attributes()


def _ember_parameters(method: str) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(getattr(LLM, method)).parameters)


def _ember_accepts(method: str, argument: str) -> bool:
    """Whether ember's `LLM.<method>` takes `argument` by name (`**kwargs` for a VAR_KEYWORD).
    `LLM(**kwargs)` takes ember's `EngineArgs` fields and the names vLLM's table checks."""
    parameters = _ember_parameters(method)
    if argument == "**kwargs":
        return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    if argument in parameters:
        return True
    return method == "__init__" and (
        argument in EngineArgs.field_names() or argument in vllm_engine_args.checked_names()
    )


def test_every_status_is_one_of_the_four_kinds():
    for key in keys():
        status_kind(status(key))  # raises for any other text


def test_what_the_table_says_ember_has_ember_s_llm_has():
    """Supported, accepted with no effect, or raising NotImplementedError: ember's `LLM` has
    the method or attribute and takes the argument by that name."""
    for key in keys():
        if status(key) == MISSING:
            continue
        method, _, argument = key.partition(".")
        assert _ember_has_member(method), f"{key}: the table says {status(key)!r}"
        if argument:
            assert _ember_accepts(method, argument), f"{key}: the table says {status(key)!r}"


def test_what_ember_s_llm_has_is_not_marked_missing():
    for method in VLLM_LLM_METHODS:
        if not _ember_has_member(method.name):
            continue
        assert status(method.name) != MISSING, f"ember's LLM has {method.name}"
        for argument, _ in method.params:
            if _ember_accepts(method.name, argument):
                key = f"{method.name}.{argument}"
                assert status(key) != MISSING, f"ember's LLM.{method.name} takes {argument}"
    for name in VLLM_LLM_ATTRIBUTES:
        if _ember_has_member(name):
            assert status(name) != MISSING, f"ember's LLM has {name}"


def test_readme_section_is_the_module_s_markdown():
    with open(README) as f:
        readme = f.read()
    assert SECTION_HEADER + "\n" in readme, f"README has no {SECTION_HEADER!r} section"
    section = SECTION_HEADER + readme.split(SECTION_HEADER, 1)[1].split("\n## ", 1)[0]
    assert section.rstrip("\n") == markdown().rstrip("\n"), (
        "README is stale: python -m ember.enginecore.vllm_llm_api --update-readme README.md"
    )
    assert readme.index(SECTION_HEADER) < readme.index("## vLLM's engine arguments")


_PROBE = """
import inspect, json
import vllm
out = {"version": vllm.__version__, "methods": []}
for name, member in inspect.getmembers(vllm.LLM):
    if name.startswith("_") and name != "__init__":
        continue
    params = []
    for p in list(inspect.signature(member).parameters.values()):
        if p.name in ("self", "cls"):
            continue
        label = "**" + p.name if p.kind is p.VAR_KEYWORD else p.name
        params.append([label, None if p.default is p.empty else repr(p.default)])
    out["methods"].append([name, params])
print(json.dumps(out))
"""


def test_method_list_matches_installed_vllm():
    """With `$EMBER_BENCH_VLLM_PYTHON` naming a vLLM venv's interpreter, vLLM's `LLM` methods,
    arguments and defaults (by `inspect`, importing vLLM: about 20 s) are the table's."""
    python = os.environ.get("EMBER_BENCH_VLLM_PYTHON")
    if not python:
        pytest.skip("set EMBER_BENCH_VLLM_PYTHON to a vLLM venv's python to compare")
    found = json.loads(
        subprocess.run(
            [python, "-c", _PROBE], capture_output=True, text=True, check=True, cwd="/"
        ).stdout.splitlines()[-1]
    )
    assert found["version"] == vllm_llm_api.VLLM_VERSION
    table = {m.name: [list(p) for p in m.params] for m in VLLM_LLM_METHODS}
    assert dict(found["methods"]) == table
