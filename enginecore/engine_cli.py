"""vLLM's command line for engine arguments: `EngineArgs.add_cli_args(parser)` adds a
`--kebab-case` flag (and vLLM's short aliases such as `-tp`) for every field of vLLM's
`EngineArgs`, with vLLM's defaults, so that vLLM's example scripts, which end in
`LLM(**vars(parser.parse_args()))`, run with ember unchanged.

Types come from ember's own `EngineArgs` annotations where ember has the field; a field only
vLLM has takes its default's type, or, when that is None or a config object, JSON (`--hf-overrides
'{"a": 1}'`) with plain text as the fallback. Booleans are `--flag` / `--no-flag`, as in vLLM.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any

from ember.enginecore.vllm_engine_args import VLLM_ENGINE_ARGS, ConfigDefault

# vLLM 0.32.0's short options.
_SHORT_OPTIONS = {
    "quantization": "-q",
    "pipeline_parallel_size": "-pp",
    "nnodes": "-n",
    "node_rank": "-r",
    "tensor_parallel_size": "-tp",
    "decode_context_parallel_size": "-dcp",
    "prefill_context_parallel_size": "-pcp",
    "data_parallel_size": "-dp",
    "data_parallel_rank": "-dpn",
    "data_parallel_start_rank": "-dpr",
    "data_parallel_size_local": "-dpl",
    "data_parallel_address": "-dpa",
    "data_parallel_rpc_port": "-dpp",
    "data_parallel_backend": "-dpb",
    "data_parallel_hybrid_lb": "-dph",
    "data_parallel_external_lb": "-dpe",
    "data_parallel_multi_port_external_lb": "-dpm",
    "enable_expert_parallel": "-ep",
    "speculative_config": "-sc",
    "diffusion_config": "-dc",
    "compilation_config": "-cc",
    "attention_config": "-ac",
}


def json_or_text(text: str) -> Any:
    """A command-line value as JSON (numbers, booleans, lists, objects), else as the text."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _value_type(annotation: str | None, default: Any) -> Any:
    """The argparse `type` of a field: from ember's annotation, else from vLLM's default."""
    if annotation is not None:
        kinds = {part.strip() for part in annotation.split("|")}
        if kinds <= {"int", "None"}:
            return int
        if kinds <= {"float", "None"} or kinds <= {"int", "float", "None"}:
            return float
        if kinds <= {"str", "None"}:
            return str
        return json_or_text
    if isinstance(default, int) and not isinstance(default, bool):
        return int
    if isinstance(default, float):
        return float
    if isinstance(default, str):
        return str
    return json_or_text


def add_engine_cli_args(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup, ember_fields: dict[str, str]
) -> argparse.ArgumentParser | argparse._ArgumentGroup:
    """Add a flag for every vLLM engine argument to `parser` (or an argument group);
    `ember_fields` maps ember's `EngineArgs` field names to their annotations."""
    for name, default in VLLM_ENGINE_ARGS:
        flags = [f"--{name.replace('_', '-')}"]
        if name in _SHORT_OPTIONS:
            flags.append(_SHORT_OPTIONS[name])
        if isinstance(default, ConfigDefault):
            default = None  # vLLM builds the config object; None asks ember for its default
        elif isinstance(default, (dict, list, set)):
            default = type(default)(default)  # each parser gets its own container
        annotation = ember_fields.get(name)
        if isinstance(default, bool) or (annotation is not None and annotation.startswith("bool")):
            parser.add_argument(
                *flags, dest=name, action=argparse.BooleanOptionalAction, default=default
            )
        else:
            parser.add_argument(
                *flags, dest=name, type=_value_type(annotation, default), default=default
            )
    return parser


def ember_field_annotations(engine_args_class: type) -> dict[str, str]:
    """Field name -> annotation text of a dataclass (annotations are strings here)."""
    return {field.name: str(field.type) for field in dataclasses.fields(engine_args_class)}
