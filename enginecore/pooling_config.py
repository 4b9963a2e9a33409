"""Decides whether a model runs as a generator or a pooling model, and how it pools.

Called by `EngineArgs.create_engine_config`. vLLM's rules: `runner="auto"` picks "pooling" for
pooling architectures (`BertModel`, `*ForSequenceClassification`, bare `*Model` decoders such
as e5-mistral and Qwen3-Embedding) and "generate" otherwise; `convert="embed"`/`"classify"`
adapts a causal LM (and implies the pooling runner); `runner="pooling"` on a causal LM converts
it to an embedder. The pooling method and normalisation come from the sentence-transformers
files (`modules.json`, `1_Pooling/config.json`) when the model has them.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

from ember.workers.config import ModelConfig, PoolerConfig

if TYPE_CHECKING:  # the engine-core process imports this module without transformers
    from ember.workers.hf_config import HFConfig

RUNNERS = ("auto", "generate", "pooling")
CONVERTS = ("auto", "none", "embed", "classify")
_EMBED_TASKS = ("embed", "token_embed")

# sentence-transformers' pooling modes ember computes -> pooling_type
_ST_POOLING_MODES = {
    "pooling_mode_cls_token": "CLS",
    "pooling_mode_mean_tokens": "MEAN",
    "pooling_mode_lasttoken": "LAST",
}


def is_pooling_architecture(architecture: str) -> bool:
    if architecture.endswith("LMHeadModel"):  # GPT-2's causal LM
        return False
    return architecture.startswith("Bert") or architecture.endswith(
        ("ForSequenceClassification", "Model")
    )


def resolve_runner(architecture: str, runner: str, convert: str) -> tuple[str, str]:
    """(runner, convert) after vLLM's "auto" rules; ValueError for a combination that cannot be."""
    if runner not in RUNNERS:
        raise ValueError(f"runner must be one of {RUNNERS}, got {runner!r}")
    if convert not in CONVERTS:
        raise ValueError(f"convert must be one of {CONVERTS}, got {convert!r}")
    native_pooling = is_pooling_architecture(architecture)
    if runner == "auto":
        runner = "pooling" if native_pooling or convert in ("embed", "classify") else "generate"
    if runner == "generate":
        if native_pooling:
            raise ValueError(
                f"runner='generate': {architecture} is a pooling model and cannot generate; "
                "use runner='pooling' (or leave runner='auto')"
            )
        if convert in ("embed", "classify"):
            raise ValueError(f"convert={convert!r} needs runner='pooling', got runner='generate'")
        return runner, "none"
    if native_pooling:
        if convert in ("embed", "classify"):
            raise ValueError(
                f"convert={convert!r}: {architecture} is a pooling model already; leave "
                "convert='auto'"
            )
        return runner, "none"
    return runner, "embed" if convert in ("auto", "none") else convert


def pooler_config(
    architecture: str, convert: str, hf_config: HFConfig, model_dir: str
) -> PoolerConfig:
    """How the model pools: its head, default pooling type, normalisation and tasks."""
    hidden_size = hf_config.hidden_size
    is_bert = architecture.startswith("Bert")
    if architecture.endswith("ForSequenceClassification") or convert == "classify":
        tasks = ("classify", "score") if is_bert else ("classify", "score", "token_classify")
        return PoolerConfig(
            pooling_type="CLS" if is_bert else "LAST",
            normalize=False,
            head="classify",
            num_labels=hf_config.num_labels,
            hidden_size=hidden_size,
            tasks=tasks,
        )
    pooling_type, normalize = "CLS" if is_bert else "LAST", True
    st_pooling = sentence_transformers_pooling(model_dir)
    if st_pooling is not None:
        pooling_type, normalize = st_pooling
    return PoolerConfig(
        pooling_type=pooling_type,
        normalize=normalize,
        head="embed",
        hidden_size=hidden_size,
        tasks=_EMBED_TASKS,
    )


def sentence_transformers_pooling(model_dir: str) -> tuple[str, bool] | None:
    """(pooling_type, normalize) from sentence-transformers' `modules.json`, or None when the
    model has no such file. Modules ember cannot compute (Dense, max pooling) are refused."""
    modules_path = os.path.join(model_dir, "modules.json")
    if not os.path.exists(modules_path):
        return None
    with open(modules_path) as f:
        modules = json.load(f)
    pooling_type, normalize = None, False
    for module in modules:
        kind = module.get("type", "").rsplit(".", 1)[-1]
        if kind == "Transformer":
            continue
        if kind == "Normalize":
            normalize = True
        elif kind == "Pooling":
            with open(os.path.join(model_dir, module.get("path", ""), "config.json")) as f:
                modes = [k for k, v in json.load(f).items() if k.startswith("pooling_mode") and v]
            if len(modes) != 1 or modes[0] not in _ST_POOLING_MODES:
                raise NotImplementedError(
                    f"sentence-transformers pooling {modes} is not supported; ember pools "
                    f"with one of {sorted(_ST_POOLING_MODES)}"
                )
            pooling_type = _ST_POOLING_MODES[modes[0]]
        else:
            raise NotImplementedError(
                f"the sentence-transformers module {module.get('type')!r} in {modules_path} "
                "is not supported"
            )
    if pooling_type is None:
        return None
    return pooling_type, normalize


def sentence_transformers_max_seq_length(model_dir: str) -> int | None:
    """`max_seq_length` of `sentence_bert_config.json` (vLLM caps max_model_len with it)."""
    path = os.path.join(model_dir, "sentence_bert_config.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        value = json.load(f).get("max_seq_length")
    return value if isinstance(value, int) and value > 0 else None


def pooling_ready_info(model_config: ModelConfig) -> dict:
    """The pooling facts of the handshake's `EngineCoreReadyInfo` (empty for a generator)."""
    pooler = model_config.pooler
    if model_config.runner != "pooling" or pooler is None:
        return {}
    return {
        "runner": "pooling",
        "pooling_tasks": list(pooler.tasks),
        "pooling_size": pooler.hidden_size,
        "num_labels": pooler.num_labels,
    }
