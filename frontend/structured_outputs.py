"""Structured outputs in the user's process: each constraint is checked by the engine core's
grammar engine before any request of the call is added, so that a bad JSON schema, regex or
grammar raises a `ValueError` here, naming the field, and nothing runs.

The engine core chooses the backend (vLLM's rules for "auto") and compiles the grammar on its
compile threads; the compiled grammar stays cached there, so the requests that follow are
scheduled at once. This process imports no grammar library (xgrammar imports torch).
"""

from __future__ import annotations

from typing import Any

from ember.workers.sampling_params import SamplingParams
from ember.workers.structured_outputs_params import StructuredOutputsParams

# A first grammar also loads the library and the tokenizer's vocabulary in the engine core.
_VALIDATE_TIMEOUT_S = 600.0


def check_structured_outputs(engine: Any, params: list[SamplingParams]) -> None:
    """Validate and compile every constraint in `params` (one call for all the distinct ones);
    record the backend chosen on each (`_backend`, `_backend_was_auto`, as vLLM does)."""
    keys = [p.structured_outputs and p.structured_outputs.cache_key() for p in params]
    distinct: dict[str, StructuredOutputsParams] = {}
    for key, request_params in zip(keys, params):
        if key is not None:
            distinct.setdefault(key, request_params.structured_outputs)
    if not distinct:
        return
    results = engine.call_utility(
        "validate_structured_outputs", list(distinct.values()), timeout_s=_VALIDATE_TIMEOUT_S
    )
    verdicts = dict(zip(distinct, results))
    for index, key in enumerate(keys):
        backend, detail = verdicts[key] if key is not None else ("", None)
        if backend is None:
            where = f" (prompt {index})" if len(params) > 1 else ""
            raise ValueError(f"{detail}{where}")
    for key, request_params in zip(keys, params):
        if key is not None:
            backend, was_auto = verdicts[key]
            spec = request_params.structured_outputs
            spec._backend, spec._backend_was_auto = backend, bool(was_auto)
