"""Which grammar backend takes a request, by vLLM's rules for its `structured_outputs_config.backend`,
proved by compiling the request's constraint with it. Called by the structured-output manager
before a request is added.
"""

from __future__ import annotations

from collections.abc import Callable

from ember.enginecore.structured_output.grammar import GrammarBackend
from ember.enginecore.structured_output.guidance_backend import (
    unsupported_json_feature as guidance_unsupported_json_feature,
)
from ember.workers.structured_outputs_params import BACKENDS, StructuredOutputsParams


def select_backend(
    params: StructuredOutputsParams,
    configured: str,
    get_backend: Callable[[str], GrammarBackend],
) -> tuple[str, bool]:
    """(backend name, whether "auto" chose it) for `params` under the engine's `configured`
    backend; raises ValueError("structured_outputs.<field>: ...") when no backend takes it.

    - "xgrammar", "guidance", "outlines": that backend or an error, never a fallback.
    - "auto": xgrammar; when it refuses (a JSON-schema feature it would ignore, or any compile
      error), guidance; or outlines instead when the schema has a feature vLLM keeps away from
      guidance (patternProperties). The fallback's own error is raised when it refuses too.
    - `params._backend` must match `configured`, unless "auto" set it on an earlier request
      (`_backend_was_auto`: the params object is being reused).

    `params` is left unchanged: the caller records the answer in `_backend`/`_backend_was_auto`.
    `get_backend(name)` returns the (cached) backend; its compile is thread-safe.
    """
    if configured not in BACKENDS:
        raise ValueError(
            f"structured outputs backend must be one of {', '.join(BACKENDS)}, got {configured!r}"
        )
    requested = params._backend
    if (
        requested is not None
        and requested != configured
        and not (configured == "auto" and params._backend_was_auto)
    ):
        raise ValueError(
            f"structured_outputs backend {requested!r} was requested, but the engine runs "
            f"{configured!r}; choosing a backend per request is not supported (remove it from "
            "the request, or start the engine with that backend)"
        )
    if configured != "auto":
        get_backend(configured).compile(params)
        return configured, False
    try:
        get_backend("xgrammar").compile(params)
        return "xgrammar", True
    except (ValueError, ImportError):  # ImportError: xgrammar is not installed
        pass
    fallback = "guidance"
    if params.json is not None and guidance_unsupported_json_feature(params.json_schema()):
        fallback = "outlines"
    get_backend(fallback).compile(params)
    return fallback, True
