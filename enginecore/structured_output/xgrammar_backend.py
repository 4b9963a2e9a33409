"""The xgrammar backend: every kind of constraint compiled by xgrammar's `GrammarCompiler` and
matched by its `GrammarMatcher`. Built by the structured-output manager on first use; xgrammar
(which imports torch) is imported only then, so importing this module stays light.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np

from ember.enginecore.structured_output.grammar import (
    allow_only_tokens,
    check_bitmask,
    choice_as_grammar,
    field_error,
    grammar_is_likely_lark,
    resolve_stop_token_ids,
)
from ember.workers.mistral_tokenizer import is_mistral_tokenizer, xgrammar_tokenizer_info

if TYPE_CHECKING:
    import xgrammar

    from ember.workers.structured_outputs_params import StructuredOutputsParams

# String formats xgrammar's JSON-schema converter implements; it ignores any other.
_STRING_FORMATS = frozenset(
    {
        "email",
        "date",
        "time",
        "date-time",
        "duration",
        "ipv4",
        "ipv6",
        "hostname",
        "uuid",
        "uri",
        "uri-reference",
        "uri-template",
        "json-pointer",
        "relative-json-pointer",
    }
)
# xgrammar starts its messages with "[hh:mm:ss] /path/to/file.cc:123: ".
_LOG_PREFIX = re.compile(r"^\[[0-9:]+\] \S+:\d+: ")


def _schema_types(node: dict) -> set[str]:
    declared = node.get("type")
    if isinstance(declared, str):
        return {declared}
    if isinstance(declared, list):
        return {name for name in declared if isinstance(name, str)}
    return set()


def _length_bound_with_pattern(node: dict) -> bool:
    return ("pattern" in node or "format" in node) and ("minLength" in node or "maxLength" in node)


def _unsupported_in_node(node: dict) -> str | None:
    types = _schema_types(node)
    if types & {"integer", "number"} and "multipleOf" in node:
        return "multipleOf"
    if "array" in types:
        for key in ("uniqueItems", "contains", "minContains", "maxContains"):
            if key in node:
                return key
    if "string" in types:
        if "format" in node and node["format"] not in _STRING_FORMATS:
            return f"string format {node['format']!r}"
        if _length_bound_with_pattern(node):
            return "minLength/maxLength together with pattern or format"
    if "object" in types and "propertyNames" in node:
        names = node["propertyNames"]
        if isinstance(names, dict) and _length_bound_with_pattern(names):
            return "propertyNames with a length bound and a pattern or format"
        for key in ("patternProperties", "properties"):
            if key in node:
                return f"propertyNames together with {key}"
        if node.get("unevaluatedProperties", True) is not True:
            return "propertyNames together with unevaluatedProperties"
    if "object" in types and isinstance(node.get("patternProperties"), dict):
        if "properties" in node:
            return "patternProperties together with properties"
        if len(node["patternProperties"]) > 1:
            return "more than one patternProperties entry"
    if isinstance(node.get("allOf"), list) and len(node["allOf"]) >= 2:
        return "allOf with several schemas"
    return None


def unsupported_json_feature(schema: Any) -> str | None:
    """The first feature of `schema` that xgrammar would ignore or get wrong (so a request
    using it must go to another backend), or None. The list follows vLLM's
    `has_xgrammar_unsupported_json_features` for xgrammar 0.2.x."""
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
            continue
        if not isinstance(node, dict):
            continue
        feature = _unsupported_in_node(node)
        if feature is not None:
            return feature
        stack.extend(value for value in node.values() if isinstance(value, (dict, list)))
    return None


def _library_message(exc: Exception) -> str:
    if isinstance(exc, KeyError):
        return f"missing key {exc}"
    return _LOG_PREFIX.sub("", str(exc).strip()) or type(exc).__name__


class XgrammarBackend:
    """xgrammar bound to one tokenizer: `TokenizerInfo` over `vocab_size` token ids (ids past
    the tokenizer's own vocabulary are never allowed), a caching `GrammarCompiler`."""

    name = "xgrammar"

    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int,
        stop_token_ids: Iterable[int],
        disable_any_whitespace: bool = False,
    ):
        import xgrammar  # imports torch: only when this backend is built

        self.vocab_size = vocab_size
        self.stop_token_ids = resolve_stop_token_ids(tokenizer, stop_token_ids)
        self.disable_any_whitespace = disable_any_whitespace
        if is_mistral_tokenizer(tokenizer):
            info = xgrammar_tokenizer_info(tokenizer, vocab_size, list(self.stop_token_ids))
        else:
            info = xgrammar.TokenizerInfo.from_huggingface(
                tokenizer, vocab_size=vocab_size, stop_token_ids=list(self.stop_token_ids)
            )
        self._compiler = xgrammar.GrammarCompiler(info, cache_enabled=True)

    def compile(self, params: StructuredOutputsParams) -> xgrammar.CompiledGrammar:
        """Compile `params` (thread-safe: xgrammar's compiler locks its own cache)."""
        kind = params.kind
        try:
            return self._compile(params, kind)
        except Exception as exc:  # xgrammar reports a bad spec as RuntimeError, ValueError, ...
            if isinstance(exc, ValueError) and str(exc).startswith("structured_outputs."):
                raise
            raise field_error(kind, _library_message(exc)) from None

    def _compile(self, params: StructuredOutputsParams, kind: str) -> xgrammar.CompiledGrammar:
        import xgrammar

        compiler = self._compiler
        # The request's flag adds to the engine's; without any whitespace, also no space
        # after "," and ":" (xgrammar's default separators carry one).
        no_whitespace = self.disable_any_whitespace or params.disable_any_whitespace
        json_options = {
            "any_whitespace": not no_whitespace,
            "separators": (",", ":") if no_whitespace else None,
        }
        if kind == "json":
            schema = params.json_schema()
            feature = unsupported_json_feature(schema)
            if feature is not None:
                raise field_error("json", f"xgrammar does not support {feature}")
            text = params.json if isinstance(params.json, str) else json.dumps(schema)
            return compiler.compile_json_schema(text, **json_options)
        if kind == "json_object":
            return compiler.compile_json_schema('{"type": "object"}', **json_options)
        if kind == "regex":
            return compiler.compile_regex(params.regex)
        if kind == "choice":
            return compiler.compile_grammar(choice_as_grammar(params.choice))
        if kind == "grammar":
            if grammar_is_likely_lark(params.grammar):
                return compiler.compile_lark(params.grammar)
            return compiler.compile_grammar(params.grammar)
        if kind == "structural_tag":
            tag = json.loads(params.structural_tag)
            if isinstance(tag, dict) and "structures" in tag:
                # The older form: {"structures": [{"begin", "schema", "end"}], "triggers": [...]}
                items = [
                    xgrammar.StructuralTagItem(
                        begin=item["begin"], schema=json.dumps(item["schema"]), end=item["end"]
                    )
                    for item in tag["structures"]
                ]
                return compiler.compile_structural_tag(items, tag["triggers"])
            return compiler.compile_structural_tag(params.structural_tag)
        raise field_error(kind, "xgrammar cannot compile this kind of constraint")

    def matcher(self, compiled: xgrammar.CompiledGrammar) -> XgrammarMatcher:
        import xgrammar

        return XgrammarMatcher(
            xgrammar.GrammarMatcher(compiled), self.stop_token_ids, self.vocab_size
        )


class XgrammarMatcher:
    """A request's `xgrammar.GrammarMatcher`. xgrammar counts an accepted stop token like any
    other token (it ends the grammar, and `rollback` undoes it)."""

    __slots__ = ("_matcher", "_stop_token_ids", "_vocab_size")

    def __init__(
        self, matcher: xgrammar.GrammarMatcher, stop_token_ids: tuple[int, ...], vocab_size: int
    ):
        self._matcher = matcher
        self._stop_token_ids = stop_token_ids
        self._vocab_size = vocab_size

    def accept_token(self, token_id: int) -> bool:
        # Past a stop token xgrammar logs a warning for every token offered: refuse quietly.
        if self._matcher.is_terminated() or not 0 <= token_id < self._vocab_size:
            return False
        return self._matcher.accept_token(token_id)

    def fill_bitmask(self, bitmask: np.ndarray, row: int) -> None:
        check_bitmask(bitmask, row, self._vocab_size)
        if self._matcher.is_terminated():  # xgrammar raises when asked for a mask here
            allow_only_tokens(bitmask, row, self._stop_token_ids)
            return
        # xgrammar takes the numpy array through DLPack and writes the row in place.
        self._matcher.fill_next_token_bitmask(bitmask, row)

    def is_terminated(self) -> bool:
        return self._matcher.is_terminated()

    def rollback(self, num_tokens: int) -> None:
        if num_tokens > 0:
            self._matcher.rollback(num_tokens)
