"""The guidance backend: constraints turned into llguidance grammars and matched by its
`LLMatcher` (Rust, no torch). Built by the structured-output manager on first use; needs a fast
(Rust-backed) Hugging Face tokenizer.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np

from ember.enginecore.structured_output.grammar import (
    allow_only_tokens,
    bitmask_words,
    check_bitmask,
    disallow_tokens_from,
    field_error,
    resolve_stop_token_ids,
)

if TYPE_CHECKING:
    import llguidance

    from ember.workers.structured_outputs_params import StructuredOutputsParams

logger = logging.getLogger(__name__)

# Keywords whose value maps names to subschemas, and keywords whose value is a subschema (or a
# list of them): where `closed_objects` looks for nested object schemas.
_SCHEMA_MAPS = (
    "properties",
    "patternProperties",
    "$defs",
    "definitions",
    "dependentSchemas",
    "dependencies",
)
_SUBSCHEMAS = (
    "items",
    "prefixItems",
    "additionalItems",
    "unevaluatedItems",
    "contains",
    "additionalProperties",
    "unevaluatedProperties",
    "propertyNames",
    "allOf",
    "anyOf",
    "oneOf",
    "not",
    "if",
    "then",
    "else",
    "contentSchema",
)


def unsupported_json_feature(schema: Any) -> str | None:
    """The JSON-schema feature that makes vLLM's "auto" send a request to outlines instead of
    guidance (`has_guidance_unsupported_json_features`: patternProperties), or None."""
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, dict):
            if "patternProperties" in node:
                return "patternProperties"
            stack.extend(value for value in node.values() if isinstance(value, (dict, list)))
    return None


def closed_objects(schema: Any) -> Any:
    """A copy of `schema` in which every object schema that lists properties (or
    patternProperties) but says nothing about others gets `"additionalProperties": false`
    (vLLM's `disable_additional_properties`)."""
    schema = copy.deepcopy(schema)
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(item for item in node if isinstance(item, (dict, list)))
            continue
        if not isinstance(node, dict):
            continue
        for key in _SCHEMA_MAPS:
            if isinstance(node.get(key), dict):
                stack.extend(sub for sub in node[key].values() if isinstance(sub, dict))
        for key in _SUBSCHEMAS:
            if isinstance(node.get(key), (dict, list)):
                stack.append(node[key])
        lists_properties = isinstance(node.get("properties"), dict) or isinstance(
            node.get("patternProperties"), dict
        )
        if lists_properties and "additionalProperties" not in node:
            node["additionalProperties"] = False
    return schema


class GuidanceBackend:
    """llguidance bound to one tokenizer. `compile` builds a matcher for the grammar (and
    refuses it when llguidance reports an error); `matcher` hands out copies of it."""

    name = "guidance"

    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int,
        stop_token_ids: Iterable[int],
        disable_any_whitespace: bool = False,
        disable_additional_properties: bool = False,
    ):
        import llguidance.hf

        self.vocab_size = vocab_size
        self.stop_token_ids = resolve_stop_token_ids(tokenizer, stop_token_ids)
        self.disable_any_whitespace = disable_any_whitespace
        self.disable_additional_properties = disable_additional_properties
        # llguidance needs room for every id the tokenizer has, even past the model's vocab.
        self.ll_vocab_size = max(vocab_size, len(tokenizer))
        try:
            self._ll_tokenizer = llguidance.hf.from_tokenizer(
                tokenizer, self.ll_vocab_size, eos_token=list(self.stop_token_ids)
            )
        except ValueError as exc:
            raise ValueError(
                "the guidance structured outputs backend needs a fast Hugging Face tokenizer, "
                f"got {type(tokenizer).__name__} ({exc})"
            ) from None

    def compile(self, params: StructuredOutputsParams) -> llguidance.LLMatcher:
        """A matcher at the start of `params`' grammar, never advanced itself (thread-safe:
        llguidance builds it without the GIL and the tokenizer is read-only)."""
        import llguidance

        kind = params.kind
        try:
            grammar = self._grammar(params, kind)
        except Exception as exc:  # llguidance reports bad JSON or GBNF as ValueError
            if isinstance(exc, ValueError) and str(exc).startswith("structured_outputs."):
                raise
            message = f"missing key {exc}" if isinstance(exc, KeyError) else str(exc)
            raise field_error(kind, message) from None
        matcher = llguidance.LLMatcher(self._ll_tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise field_error(kind, matcher.get_error())
        for warning in matcher.get_grammar_warnings():
            logger.warning("structured_outputs.%s: %s", kind, warning)
        return matcher

    def _json_options(self, params: StructuredOutputsParams) -> dict[str, Any]:
        # The request's flag adds to the engine's; a whitespace_pattern (a vLLM field that its
        # own backends ignore today) replaces llguidance's default flexible whitespace.
        if self.disable_any_whitespace or params.disable_any_whitespace:
            return {"whitespace_flexible": False}
        if params.whitespace_pattern is not None:
            return {"whitespace_pattern": params.whitespace_pattern}
        return {"whitespace_flexible": True}

    def _json_grammar(self, schema: Any, params: StructuredOutputsParams) -> str:
        import llguidance

        if self.disable_additional_properties or params.disable_additional_properties:
            schema = closed_objects(schema)
        return llguidance.LLMatcher.grammar_from_json_schema(
            schema, defaults=self._json_options(params)
        )

    def _grammar(self, params: StructuredOutputsParams, kind: str) -> str:
        import llguidance

        if kind == "json":
            return self._json_grammar(params.json_schema(), params)
        if kind == "json_object":
            return self._json_grammar({"type": "object"}, params)
        if kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(params.regex)
        if kind == "choice":
            return llguidance.grammar_from("choice", json.dumps(params.choice))
        if kind == "grammar":  # Lark, or GBNF converted to Lark by llguidance
            return llguidance.grammar_from("grammar", params.grammar)
        if kind == "structural_tag":
            return self._structural_tag_grammar(json.loads(params.structural_tag), params)
        raise field_error(kind, "guidance cannot compile this kind of constraint")

    def _structural_tag_grammar(self, tag: Any, params: StructuredOutputsParams) -> str:
        import llguidance

        if not isinstance(tag, dict) or "structures" not in tag:
            raise field_error(
                "structural_tag",
                'guidance takes only the {"structures": [...], "triggers": [...]} form',
            )
        triggers = tag["triggers"]
        tags = []
        for item in tag["structures"]:
            trigger = next((t for t in triggers if item["begin"].startswith(t)), None)
            if trigger is None:
                raise field_error(
                    "structural_tag", f"no trigger in {triggers} starts {item['begin']!r}"
                )
            tags.append(
                llguidance.StructTag(
                    trigger=trigger,
                    begin=item["begin"],
                    grammar=self._json_grammar(item["schema"], params),
                    end=item["end"],
                )
            )
        if not tags:
            raise field_error("structural_tag", "lists no structures")
        return llguidance.StructTag.to_grammar(tags)

    def matcher(self, compiled: llguidance.LLMatcher) -> GuidanceMatcher:
        return GuidanceMatcher(
            compiled.deep_copy(), self.stop_token_ids, self.vocab_size, self.ll_vocab_size
        )


class GuidanceMatcher:
    """A request's `LLMatcher`.

    llguidance never leaves an error state, so a token is offered with `try_consume_tokens`,
    which refuses without consuming. Once the grammar is complete llguidance stops and takes no
    token at all, not even EOS: that EOS is accepted here without reaching llguidance, and
    `rollback` counts it (vLLM's `rollback_lag`).
    """

    __slots__ = (
        "_error_logged",
        "_ll_vocab_size",
        "_matcher",
        "_stop_outside_matcher",
        "_stop_token_ids",
        "_terminated",
        "_vocab_size",
    )

    def __init__(
        self,
        matcher: llguidance.LLMatcher,
        stop_token_ids: tuple[int, ...],
        vocab_size: int,
        ll_vocab_size: int,
    ):
        self._matcher = matcher
        self._stop_token_ids = stop_token_ids
        self._vocab_size = vocab_size
        self._ll_vocab_size = ll_vocab_size
        self._terminated = False
        self._stop_outside_matcher = False
        self._error_logged = False

    def accept_token(self, token_id: int) -> bool:
        if self._terminated or not 0 <= token_id < self._vocab_size:
            return False
        is_stop = token_id in self._stop_token_ids
        if is_stop and self._matcher.is_stopped():
            self._terminated = self._stop_outside_matcher = True
            return True
        if self._matcher.try_consume_tokens([token_id]) != 1:
            return False
        self._terminated = is_stop
        return True

    def fill_bitmask(self, bitmask: np.ndarray, row: int) -> None:
        import llguidance.numpy

        check_bitmask(bitmask, row, self._vocab_size)
        if self._terminated:
            allow_only_tokens(bitmask, row, self._stop_token_ids)
            return
        if bitmask_words(self._ll_vocab_size) == bitmask.shape[1]:
            llguidance.numpy.fill_next_token_bitmask(self._matcher, bitmask, row)
        else:  # the tokenizer has more ids than the model: fill a wider row, keep the start
            wide = np.zeros((1, bitmask_words(self._ll_vocab_size)), dtype=np.int32)
            llguidance.numpy.fill_next_token_bitmask(self._matcher, wide, 0)
            bitmask[row] = wide[0, : bitmask.shape[1]]
        if self._ll_vocab_size > self._vocab_size:
            disallow_tokens_from(bitmask, row, self._vocab_size)
        if not self._error_logged and self._matcher.is_error():  # its mask now allows only EOS
            self._error_logged = True
            logger.error("guidance matcher failed: %s", self._matcher.get_error())

    def is_terminated(self) -> bool:
        return self._terminated

    def rollback(self, num_tokens: int) -> None:
        if num_tokens <= 0:
            return
        if self._stop_outside_matcher:
            num_tokens -= 1
            self._stop_outside_matcher = False
        self._terminated = False
        if num_tokens:
            self._matcher.rollback(num_tokens)
