"""What a request's output must match: vLLM's `StructuredOutputsParams`, and the older spelling
`GuidedDecodingParams`.

Built by the user inside `SamplingParams(structured_outputs=...)` (or `guided_decoding=...`),
checked on construction (exactly one constraint, types, empty or unparsable specs), then checked
against a grammar engine by the engine core before any request is added (`ember.llm`), and
compiled and matched there (`ember.enginecore.structured_output`).
"""

from __future__ import annotations

import json
from typing import Any

import msgspec

# The constraint fields; exactly one is set.
CONSTRAINT_FIELDS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")
# vLLM's `StructuredOutputsConfig.backend` values.
BACKENDS = ("auto", "xgrammar", "guidance", "outlines")
# How deep a JSON schema may nest before it is refused (vLLM's `check_json_nesting` bound).
MAX_JSON_NESTING = 128


class StructuredOutputsParams(msgspec.Struct, omit_defaults=True, kw_only=True):
    """One constraint on the output, as vLLM's `StructuredOutputsParams`:

    - json: a JSON schema (dict or JSON text) the output must validate against.
    - regex: a regular expression the whole output must match.
    - choice: the output is exactly one of these strings.
    - grammar: an EBNF (GBNF) or Lark grammar.
    - json_object: any JSON object.
    - structural_tag: xgrammar's structural tag (JSON text).
    - disable_any_whitespace, disable_additional_properties, whitespace_pattern: JSON options.

    `_backend` and `_backend_was_auto` are set by the engine when it accepts the request.
    """

    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: str | None = None
    structural_tag: str | None = None
    _backend: str | None = None
    _backend_was_auto: bool = False

    def __post_init__(self) -> None:
        self._check_types()
        given = [name for name in CONSTRAINT_FIELDS if getattr(self, name) is not None]
        if len(given) > 1:
            raise ValueError(
                "structured_outputs takes exactly one constraint, got " + ", ".join(given)
            )
        if not given:
            raise ValueError(
                "structured_outputs needs one constraint: " + ", ".join(CONSTRAINT_FIELDS)
            )
        if self.choice is not None and not self.choice:
            raise ValueError("structured_outputs.choice cannot be an empty list")
        for name in ("grammar", "json", "structural_tag"):
            value = getattr(self, name)
            if isinstance(value, str) and not value.strip():
                raise ValueError(f"structured_outputs.{name} cannot be an empty string")
        if self.json_object is False:
            raise ValueError(
                "structured_outputs.json_object must be True if set; omit "
                "structured_outputs to disable structured outputs"
            )
        if self.regex is not None and "\x00" in self.regex:
            raise ValueError("structured_outputs.regex must not contain a NUL character")
        if self.json is not None:
            check_json_nesting(self.json_schema(), "json")
        if self.structural_tag is not None:
            try:
                tag = json.loads(self.structural_tag)
            except json.JSONDecodeError as exc:
                raise ValueError(f"structured_outputs.structural_tag is not JSON: {exc}") from None
            check_json_nesting(tag, "structural_tag")

    def _check_types(self) -> None:
        def wrong(name: str, expected: str) -> TypeError:
            got = type(getattr(self, name)).__name__
            return TypeError(f"structured_outputs.{name} must be {expected}, got {got}")

        if self.json is not None and not isinstance(self.json, (str, dict)):
            raise wrong("json", "a dict or a str")
        for name in ("regex", "grammar", "whitespace_pattern", "structural_tag"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise wrong(name, "a str")
        if self.choice is not None:
            if not isinstance(self.choice, (list, tuple)) or not all(
                isinstance(c, str) for c in self.choice
            ):
                raise wrong("choice", "a list of str")
            self.choice = list(self.choice)
        for name in ("json_object", "disable_any_whitespace", "disable_additional_properties"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, bool):
                raise wrong(name, "a bool")

    @property
    def kind(self) -> str:
        """Which constraint is set: one of `CONSTRAINT_FIELDS`."""
        return next(name for name in CONSTRAINT_FIELDS if getattr(self, name) is not None)

    def json_schema(self) -> Any:
        """The JSON schema as an object (parsed when given as text)."""
        if not isinstance(self.json, str):
            return self.json
        try:
            return json.loads(self.json)
        except json.JSONDecodeError as exc:
            raise ValueError(f"structured_outputs.json is not valid JSON: {exc}") from None

    def cache_key(self) -> str:
        """The constraint and its options as one string: equal keys compile to one grammar
        (under one backend; which backend is not part of the key)."""
        fields = {
            name: getattr(self, name)
            for name in self.__struct_fields__
            if not name.startswith("_") and name not in ("backend", "disable_fallback")
        }
        return json.dumps(fields, sort_keys=True, separators=(",", ":"))


class GuidedDecodingParams(StructuredOutputsParams, kw_only=True):
    """The older spelling (`SamplingParams(guided_decoding=GuidedDecodingParams(...))`), with
    its per-request `backend`, which must agree with the engine's backend (as vLLM requires)."""

    backend: str | None = None
    disable_fallback: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.backend is not None and not isinstance(self.backend, str):
            raise TypeError(
                f"guided_decoding.backend must be a str, got {type(self.backend).__name__}"
            )

    def to_structured_outputs(self) -> StructuredOutputsParams:
        fields = {
            name: getattr(self, name)
            for name in StructuredOutputsParams.__struct_fields__
            if not name.startswith("_")
        }
        params = StructuredOutputsParams(**fields)
        if self.backend is not None:
            params._backend = self.backend
        return params


def check_json_nesting(value: Any, name: str) -> None:
    """Refuse a schema nested deeper than `MAX_JSON_NESTING` (a ValueError naming the field),
    before a grammar engine walks it recursively."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_JSON_NESTING:
            raise ValueError(
                f"structured_outputs.{name} nests deeper than {MAX_JSON_NESTING} levels"
            )
        if isinstance(item, dict):
            stack.extend((child, depth + 1) for child in item.values())
        elif isinstance(item, list):
            stack.extend((child, depth + 1) for child in item)
