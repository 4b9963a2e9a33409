"""A model's Hugging Face config as plain data, read as attributes.

transformers builds the config once, in the user's process (`load_hf_config`); what the models
read of it (every serialized field, plus the aliases of `attribute_map` and the derived
properties such as GPT-2's `hidden_size` or `num_labels`) is taken as JSON (`snapshot_config`),
kept in ~/.cache/ember/configs for the next start, and sent to the workers in the
`ModelConfig`. Nothing below the user's process imports transformers to read a config, and a
warm start imports it nowhere before the tokenizer: importing a model's config class costs
1.5-2 s on a 2-core machine (transformers' validators pull in its kernel and sharding code).

The few transformers functions that need the real class (the scaled rotary tables of
`modeling_rope_utils`) get it from `HFConfig.to_transformers()`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from importlib import metadata
from typing import Any

from ember.workers.cache_dir import ember_cache_dir, write_atomically

# vLLM's `hf_overrides`: fields to set on the config, or a function of the config.
HFOverrides = dict[str, Any] | Callable[[Any], Any] | None

# Bump when `snapshot_config` changes what it records: older cache files are then ignored.
_SNAPSHOT_FORMAT = 1
_SUB_CONFIG = "__hf_config__"


class HFConfig:
    """Attribute access over a config snapshot: `config.hidden_size`, `getattr(config, name,
    default)`; a missing name raises AttributeError, as on the transformers object."""

    def __init__(self, snapshot: dict[str, Any]):
        self._snapshot = snapshot
        self._values: dict[str, Any] = {
            name: _from_json(value)
            for name, value in {**snapshot["config"], **snapshot["attributes"]}.items()
        }
        if isinstance(self._values.get("id2label"), dict):  # JSON made its int keys strings
            self._values["id2label"] = {int(k): v for k, v in self._values["id2label"].items()}

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["_values"][name]
        except KeyError:
            raise AttributeError(f"{type(self).__name__} has no attribute {name!r}") from None

    def __repr__(self) -> str:
        return f"HFConfig({self._values.get('model_type', '')!r})"

    def to_dict(self) -> dict[str, Any]:
        """The serialized fields, as transformers' `to_dict()` gave them."""
        return dict(self._snapshot["config"])

    def snapshot(self) -> dict[str, Any]:
        return self._snapshot

    def to_transformers(self) -> Any:
        """The transformers config object of these fields (imports its class)."""
        from transformers import AutoConfig, PretrainedConfig

        fields = self.to_dict()
        try:
            return AutoConfig.for_model(**fields)
        except ValueError:  # a model type transformers does not know (remote code)
            return PretrainedConfig.from_dict(fields)


def snapshot_config(config: Any) -> dict[str, Any]:
    """What the models may read of a transformers config, as JSON-able data."""
    from transformers.utils import logging as transformers_logging

    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()  # reading deprecated aliases warns
    try:
        return _snapshot(config)
    finally:
        transformers_logging.set_verbosity(verbosity)


def _snapshot(config: Any) -> dict[str, Any]:
    fields = config.to_dict()
    attributes: dict[str, Any] = {}
    aliases = list(getattr(config, "attribute_map", None) or {})  # not listed by dir()
    for name in [*dir(config), *aliases]:
        if name.startswith("__") or name in fields:
            continue
        value = _read_attribute(config, name)
        if callable(value):
            continue
        encoded = _to_json(value)
        if encoded is not _UNSET:
            attributes[name] = encoded
    for name, value in vars(config).items():  # sub-configs to_dict() flattened into dicts
        if _is_config(value):
            attributes[name] = _to_json(value)
    return {"config": fields, "attributes": attributes}


_UNSET = object()


def _read_attribute(config: Any, name: str) -> Any:
    try:
        return getattr(config, name)
    except (AttributeError, TypeError, ValueError, NotImplementedError, KeyError):
        return _UNSET  # a property that does not apply to this config


def _is_config(value: Any) -> bool:
    return (
        not isinstance(value, type) and hasattr(value, "to_dict") and hasattr(value, "model_type")
    )


def _to_json(value: Any) -> Any:
    if _is_config(value):
        return {_SUB_CONFIG: _snapshot(value)}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        items = [_to_json(item) for item in value]
        return _UNSET if any(item is _UNSET for item in items) else items
    if isinstance(value, dict):
        if not all(isinstance(key, (str, int)) for key in value):
            return _UNSET
        items = {str(key): _to_json(item) for key, item in value.items()}
        if any(item is _UNSET for item in items.values()):
            return _UNSET
        return items
    if type(value).__module__ == "torch" and type(value).__name__ == "dtype":
        return str(value).removeprefix("torch.")
    return _UNSET


def _from_json(value: Any) -> Any:
    if isinstance(value, dict) and _SUB_CONFIG in value:
        return HFConfig(value[_SUB_CONFIG])
    return value


def load_hf_config(
    model_dir: str, trust_remote_code: bool = False, hf_overrides: HFOverrides = None
) -> HFConfig:
    """The config of the model in `model_dir`, with vLLM's `hf_overrides` applied (see
    `apply_hf_overrides`): from ember's cache when this config.json was read before by this
    transformers version with the same overrides, else through transformers (and then cached;
    never for a callable `hf_overrides`, whose result may change)."""
    overrides_key = _overrides_key(hf_overrides)
    cache_file = None
    if overrides_key is not None:
        cache_file = _cache_file(model_dir, trust_remote_code, overrides_key)
    if cache_file is not None:
        try:
            with open(cache_file) as f:
                return HFConfig(json.load(f))
        except (OSError, ValueError, KeyError):
            pass
    config = _transformers_config(model_dir, trust_remote_code)
    text = json.dumps(snapshot_config(apply_hf_overrides(config, hf_overrides)))
    if cache_file is not None:
        write_atomically(cache_file, text.encode())
    return HFConfig(json.loads(text))  # as a warm start and the workers read it


def _transformers_config(model_dir: str, trust_remote_code: bool) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except ValueError as exc:
        if "trust_remote_code" in str(exc) and not trust_remote_code:
            raise ValueError(
                f"the model in {model_dir!r} needs code from its repository; pass "
                "trust_remote_code=True if you trust it"
            ) from exc
        raise


def apply_hf_overrides(config: Any, hf_overrides: HFOverrides) -> Any:
    """vLLM's `hf_overrides` on a transformers config: a dict's entries are set on it (a dict
    given for a sub-config, e.g. `text_config`, updates that sub-config's fields), a callable
    takes the config and returns the one to use."""
    if hf_overrides is None:
        return config
    if callable(hf_overrides):
        result = hf_overrides(config)
        if result is None:
            raise TypeError("hf_overrides must return the config (it returned None)")
        return result
    if not isinstance(hf_overrides, dict):
        raise TypeError(
            f"hf_overrides must be a dict or a callable, got {type(hf_overrides).__name__}"
        )
    for key, value in hf_overrides.items():
        current = getattr(config, key, None)
        if isinstance(value, dict) and _is_config(current):
            _update_nested(current, value)
        else:  # a dict for a dict-valued field (rope_scaling) replaces it, as in vLLM
            setattr(config, key, value)
    return config


def _update_nested(target: Any, updates: dict[str, Any]) -> None:
    """vLLM's merge into a sub-config: dicts merge into dicts and objects, level by level."""
    for key, value in updates.items():
        current = target.get(key) if isinstance(target, dict) else getattr(target, key, None)
        if isinstance(value, dict) and (isinstance(current, dict) or hasattr(current, "__dict__")):
            _update_nested(current, value)
        elif isinstance(target, dict):
            target[key] = value
        else:
            setattr(target, key, value)


def _overrides_key(hf_overrides: HFOverrides) -> str | None:
    """The cache key part of `hf_overrides`: "" for none, the JSON of a dict, None (do not
    cache) for a callable or a dict JSON cannot hold."""
    if not hf_overrides:
        return ""
    if callable(hf_overrides):
        return None
    try:
        return json.dumps(hf_overrides, sort_keys=True)
    except (TypeError, ValueError):
        return None


def _cache_file(model_dir: str, trust_remote_code: bool, overrides_key: str = "") -> str | None:
    """Keyed by the config file (path, size, mtime), the transformers version and the
    overrides; None (no caching) for remote code, whose config class may change without
    either changing."""
    if trust_remote_code:
        return None
    try:
        stat = os.stat(os.path.join(model_dir, "config.json"))
        version = metadata.version("transformers")
    except (OSError, metadata.PackageNotFoundError):
        return None
    key = (
        f"{_SNAPSHOT_FORMAT}:{os.path.realpath(model_dir)}:{stat.st_size}:{stat.st_mtime_ns}:"
        f"{version}"
    )
    if overrides_key:  # no overrides: the key files written before hf_overrides existed
        key += f":{overrides_key}"
    name = hashlib.sha256(key.encode()).hexdigest()[:24] + ".json"
    return os.path.join(ember_cache_dir(), "configs", name)


def rope_parameters(config: Any, layer_type: str | None = None) -> dict:
    """The rope settings of a config, across transformers' old (`rope_scaling`, `rope_theta`)
    and new (`rope_parameters`, possibly one dict per layer type as in Gemma 3) spellings."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    if layer_type is not None and isinstance(params.get(layer_type), dict):
        params = dict(params[layer_type])
    scaling = getattr(config, "rope_scaling", None)
    if scaling and layer_type is None:
        params = {**scaling, **params}
    if "rope_theta" not in params:
        params["rope_theta"] = getattr(config, "rope_theta", 10000.0)
    if "partial_rotary_factor" not in params:
        params["partial_rotary_factor"] = getattr(config, "partial_rotary_factor", 1.0)
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def rope_layer_type(config: Any, layer_idx: int) -> str | None:
    """The layer type whose own rope settings layer `layer_idx` uses (Gemma 3: local layers
    rotate with `sliding_attention`'s base), or None when the config has one setting for all."""
    layer_types = getattr(config, "layer_types", None)
    params = getattr(config, "rope_parameters", None) or {}
    if layer_types is not None and isinstance(params.get(layer_types[layer_idx]), dict):
        return layer_types[layer_idx]
    return None
