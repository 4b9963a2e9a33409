"""The model's default sampling parameters (vLLM's `generation_config` and
`override_generation_config`): read from generation_config.json as plain JSON when
`EngineArgs.create_engine_config` runs, and logged by `LLM.get_default_sampling_params`."""

from __future__ import annotations

import json
import logging
import os
from typing import Any

logger = logging.getLogger(__name__)

GENERATION_CONFIG_FILE = "generation_config.json"
# vLLM's list (`ModelConfig.get_diff_sampling_param`): the generation-config fields that become
# sampling defaults. Hugging Face's max_new_tokens is vLLM's max_tokens; do_sample is not read.
SAMPLING_FIELDS = (
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "max_new_tokens",
)
_NAMED_SOURCES = ("auto", "vllm")


def generation_config_source(generation_config: Any) -> str:
    """`generation_config` checked: "auto" (the model's generation_config.json), "vllm" (no
    generation config: SamplingParams() defaults), or a local directory, made absolute.

    A directory without generation_config.json but with a config.json is accepted and gives no
    defaults, as vLLM (`GenerationConfig.from_model_config` keeps no sampling field since
    transformers 5); with neither, vLLM refuses it, and so does ember."""
    if isinstance(generation_config, os.PathLike):
        generation_config = os.fspath(generation_config)
    if not isinstance(generation_config, str):
        raise TypeError(
            "generation_config must be 'auto', 'vllm' or a directory path, got "
            f"{type(generation_config).__name__}"
        )
    if generation_config in _NAMED_SOURCES:
        return generation_config
    directory = os.path.abspath(os.path.expanduser(generation_config))
    has_config = any(
        os.path.isfile(os.path.join(directory, name))
        for name in (GENERATION_CONFIG_FILE, "config.json")
    )
    if not has_config:
        raise ValueError(
            "generation_config must be 'auto', 'vllm' or a directory holding a "
            f"{GENERATION_CONFIG_FILE}, got {generation_config!r}"
        )
    return directory


def read_generation_config(source: str, model_dir: str) -> dict[str, Any]:
    """The fields of generation_config.json that are set (not null): what transformers'
    `GenerationConfig.from_pretrained(...).to_diff_dict()` keeps, since every sampling field
    defaults to None there. Read from `model_dir` for "auto" and "vllm" (its EOS ids count either
    way), from the directory `source` otherwise; {} when there is no such file (a GGUF model's
    converted directory has none: its file holds no generation config)."""
    directory = model_dir if source in _NAMED_SOURCES else source
    path = os.path.join(directory, GENERATION_CONFIG_FILE)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            config = json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"generation_config: {path} is not valid JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise TypeError(
            f"generation_config: {path} must hold a JSON object, got {type(config).__name__}"
        )
    return {name: value for name, value in config.items() if value is not None}


def override_fields(override_generation_config: Any) -> dict[str, Any]:
    """`override_generation_config` as a dict: None, a dict, or a JSON object string (how the
    standalone engine core's `--override-generation-config` flag arrives)."""
    if override_generation_config is None:
        return {}
    if isinstance(override_generation_config, str):
        try:
            override_generation_config = json.loads(override_generation_config)
        except json.JSONDecodeError as exc:
            raise ValueError(f"override_generation_config is not a JSON object: {exc}") from exc
    if not isinstance(override_generation_config, dict):
        raise TypeError(
            "override_generation_config must be a dict, got "
            f"{type(override_generation_config).__name__}"
        )
    return dict(override_generation_config)


def diff_sampling_params(
    generation_config: dict[str, Any], source: str, override: dict[str, Any]
) -> dict[str, Any]:
    """vLLM's `get_diff_sampling_param`: the SamplingParams fields the generation config sets
    (none for "vllm"), with `override` applied on top; max_new_tokens becomes max_tokens."""
    config = {} if source == "vllm" else dict(generation_config)
    config.update(override)
    fields = {name: config[name] for name in SAMPLING_FIELDS if config.get(name) is not None}
    if "max_new_tokens" in fields:
        fields["max_tokens"] = fields.pop("max_new_tokens")
    return fields


def log_sampling_defaults(fields: dict[str, Any], source: str) -> None:
    """vLLM's warning when a generation config changes the defaults (not for "vllm", where only
    `override_generation_config` can set them)."""
    if not fields or source == "vllm":
        return
    origin = "the model's `generation_config.json`" if source == "auto" else source
    logger.warning(
        "Default sampling parameters have been overridden by %s: `%s`. If this is not "
        "intended, pass generation_config='vllm' to LLM().",
        origin,
        fields,
    )
