"""vLLM's public `LLM` API (methods, their arguments and defaults, instance attributes) as data,
with ember's status for each; printed as the README's section by
`python -m ember.enginecore.vllm_llm_api --markdown` (`--update-readme README.md` rewrites it).

A status is "supported", "accepted, no effect: <why>", "raises NotImplementedError: <why>" or
"missing" (ember's `LLM` has no such method, or the method takes no such argument). The
arguments of `LLM(...)` take their status from `ember.enginecore.vllm_engine_args`.
"""

from __future__ import annotations

import sys
import textwrap
from dataclasses import dataclass
from typing import Literal

from ember.enginecore import vllm_engine_args

VLLM_VERSION = "0.32.0"

SUPPORTED = "supported"
MISSING = "missing"
STATUS_KINDS = ("supported", "accepted, no effect", "raises NotImplementedError", "missing")


@dataclass(frozen=True, slots=True)
class VllmMethod:
    """One public method of vLLM's `LLM`: its arguments as (name, default), the default as
    `repr` text and None for a required argument; `**kwargs` is named so."""

    name: str
    kind: Literal["method", "classmethod"]
    defined_in: str
    params: tuple[tuple[str, str | None], ...]


def _no_effect(why: str) -> str:
    return f"accepted, no effect: {why}"


def _raises(why: str) -> str:
    return f"raises NotImplementedError: {why}"


# Every public method of vLLM 0.32.0's `LLM` (`inspect.getmembers(vllm.LLM)`, names without a
# leading underscore, and `__init__`), with `inspect.signature`'s arguments less `self`.
VLLM_LLM_METHODS: tuple[VllmMethod, ...] = (
    VllmMethod(
        "__init__",
        "method",
        "vllm.entrypoints.llm",
        (
            ("model", None),
            ("runner", "'auto'"),
            ("convert", "'auto'"),
            ("tokenizer", "None"),
            ("tokenizer_mode", "'auto'"),
            ("skip_tokenizer_init", "False"),
            ("trust_remote_code", "False"),
            ("allowed_local_media_path", "''"),
            ("allowed_media_domains", "None"),
            ("tensor_parallel_size", "1"),
            ("dtype", "'auto'"),
            ("quantization", "None"),
            ("revision", "None"),
            ("tokenizer_revision", "None"),
            ("chat_template", "None"),
            ("seed", "0"),
            ("gpu_memory_utilization", "0.92"),
            ("cpu_offload_gb", "0"),
            ("offload_group_size", "0"),
            ("offload_num_in_group", "1"),
            ("offload_prefetch_step", "1"),
            ("offload_params", "None"),
            ("enforce_eager", "False"),
            ("enable_return_routed_experts", "False"),
            ("return_sampling_mask", "False"),
            ("disable_custom_all_reduce", "False"),
            ("hf_token", "None"),
            ("hf_overrides", "None"),
            ("mm_processor_kwargs", "None"),
            ("pooler_config", "None"),
            ("structured_outputs_config", "None"),
            ("profiler_config", "None"),
            ("attention_config", "None"),
            ("kv_cache_memory_bytes", "None"),
            ("compilation_config", "None"),
            ("quantization_config", "None"),
            ("logits_processors", "None"),
            ("spec_method", "None"),
            ("spec_model", "None"),
            ("spec_tokens", "None"),
            ("**kwargs", None),
        ),
    ),
    VllmMethod("apply_model", "method", "vllm.entrypoints.llm", (("func", None),)),
    VllmMethod(
        "beam_search",
        "method",
        "vllm.entrypoints.generate.beam_search.offline",
        (
            ("prompts", None),
            ("params", None),
            ("lora_request", "None"),
            ("use_tqdm", "False"),
            ("concurrency_limit", "None"),
        ),
    ),
    VllmMethod(
        "chat",
        "method",
        "vllm.entrypoints.llm",
        (
            ("messages", None),
            ("sampling_params", "None"),
            ("use_tqdm", "True"),
            ("lora_request", "None"),
            ("priority", "None"),
            ("chat_template", "None"),
            ("chat_template_content_format", "'auto'"),
            ("add_generation_prompt", "True"),
            ("continue_final_message", "False"),
            ("tools", "None"),
            ("chat_template_kwargs", "None"),
            ("tokenization_kwargs", "None"),
            ("mm_processor_kwargs", "None"),
        ),
    ),
    VllmMethod(
        "classify",
        "method",
        "vllm.entrypoints.pooling.offline",
        (
            ("prompts", None),
            ("pooling_params", "None"),
            ("use_tqdm", "True"),
            ("lora_request", "None"),
            ("tokenization_kwargs", "None"),
        ),
    ),
    VllmMethod(
        "collective_rpc",
        "method",
        "vllm.entrypoints.llm",
        (("method", None), ("timeout", "None"), ("args", "()"), ("kwargs", "None")),
    ),
    VllmMethod(
        "embed",
        "method",
        "vllm.entrypoints.pooling.offline",
        (
            ("prompts", None),
            ("use_tqdm", "True"),
            ("pooling_params", "None"),
            ("lora_request", "None"),
            ("tokenization_kwargs", "None"),
        ),
    ),
    VllmMethod(
        "encode",
        "method",
        "vllm.entrypoints.pooling.offline",
        (
            ("prompts", None),
            ("pooling_params", "None"),
            ("use_tqdm", "True"),
            ("lora_request", "None"),
            ("pooling_task", "None"),
            ("tokenization_kwargs", "None"),
        ),
    ),
    VllmMethod(
        "enqueue",
        "method",
        "vllm.entrypoints.llm",
        (
            ("prompts", None),
            ("sampling_params", "None"),
            ("lora_request", "None"),
            ("priority", "None"),
            ("use_tqdm", "True"),
            ("tokenization_kwargs", "None"),
            ("mm_processor_kwargs", "None"),
        ),
    ),
    VllmMethod(
        "enqueue_chat",
        "method",
        "vllm.entrypoints.llm",
        (
            ("messages", None),
            ("sampling_params", "None"),
            ("use_tqdm", "True"),
            ("lora_request", "None"),
            ("priority", "None"),
            ("chat_template", "None"),
            ("chat_template_content_format", "'auto'"),
            ("add_generation_prompt", "True"),
            ("continue_final_message", "False"),
            ("tools", "None"),
            ("chat_template_kwargs", "None"),
            ("tokenization_kwargs", "None"),
            ("mm_processor_kwargs", "None"),
        ),
    ),
    VllmMethod(
        "finish_weight_update",
        "method",
        "vllm.entrypoints.rl.offline",
        (("weight_version", "None"),),
    ),
    VllmMethod("from_engine_args", "classmethod", "vllm.entrypoints.llm", (("engine_args", None),)),
    VllmMethod(
        "generate",
        "method",
        "vllm.entrypoints.llm",
        (
            ("prompts", None),
            ("sampling_params", "None"),
            ("use_tqdm", "True"),
            ("lora_request", "None"),
            ("priority", "None"),
            ("tokenization_kwargs", "None"),
            ("mm_processor_kwargs", "None"),
        ),
    ),
    VllmMethod("get_default_sampling_params", "method", "vllm.entrypoints.llm", ()),
    VllmMethod("get_metrics", "method", "vllm.entrypoints.llm", ()),
    VllmMethod("get_tokenizer", "method", "vllm.entrypoints.llm", ()),
    VllmMethod("get_weight_version", "method", "vllm.entrypoints.rl.offline", ()),
    VllmMethod("get_world_size", "method", "vllm.entrypoints.llm", (("include_dp", "True"),)),
    VllmMethod(
        "init_weight_transfer_engine", "method", "vllm.entrypoints.rl.offline", (("request", None),)
    ),
    VllmMethod("release_kv_cache_memory", "method", "vllm.entrypoints.llm", ()),
    VllmMethod("reset_mm_cache", "method", "vllm.entrypoints.llm", ()),
    VllmMethod(
        "reset_prefix_cache",
        "method",
        "vllm.entrypoints.llm",
        (("reset_running_requests", "False"), ("reset_connector", "False")),
    ),
    VllmMethod(
        "score",
        "method",
        "vllm.entrypoints.pooling.offline",
        (
            ("data_1", None),
            ("data_2", None),
            ("use_tqdm", "True"),
            ("pooling_params", "None"),
            ("lora_request", "None"),
            ("tokenization_kwargs", "None"),
            ("chat_template", "None"),
        ),
    ),
    VllmMethod("shutdown_weight_transfer_engine", "method", "vllm.entrypoints.rl.offline", ()),
    VllmMethod("sleep", "method", "vllm.entrypoints.llm", (("level", "1"), ("mode", "'abort'"))),
    VllmMethod("start_draft_weight_update", "method", "vllm.entrypoints.rl.offline", ()),
    VllmMethod(
        "start_profile",
        "method",
        "vllm.entrypoints.llm",
        (("profile_prefix", "None"), ("delay_iterations", "None"), ("max_iterations", "None")),
    ),
    VllmMethod("start_weight_update", "method", "vllm.entrypoints.rl.offline", ()),
    VllmMethod("stop_profile", "method", "vllm.entrypoints.llm", ()),
    VllmMethod(
        "update_weight_version", "method", "vllm.entrypoints.rl.offline", (("new_version", None),)
    ),
    VllmMethod("update_weights", "method", "vllm.entrypoints.rl.offline", (("request", None),)),
    VllmMethod(
        "wait_for_completion",
        "method",
        "vllm.entrypoints.llm",
        (("output_type", "None"), ("use_tqdm", "True")),
    ),
    VllmMethod("wake_up", "method", "vllm.entrypoints.llm", (("tags", "None"),)),
)

# The public attributes vLLM's `LLM.__init__` (and `PoolingOfflineMixin.__init__`) sets; the
# class itself has no properties.
VLLM_LLM_ATTRIBUTES: tuple[str, ...] = (
    "llm_engine",
    "model_config",
    "engine_class",
    "request_counter",
    "default_sampling_params",
    "supported_tasks",
    "runner_type",
    "renderer",
    "chat_template",
    "input_processor",
    "pooling_task",
    "chat_template_config",
    "pooling_io_processors",
)

_LORA = (
    "supported: one `LoRARequest` for every prompt, or a list of one (or None) per prompt; "
    "needs `LLM(enable_lora=True)`, see [LoRA adapters](#lora-adapters)"
)
_MM_RAISES = _raises("anything but None: ember runs text-only models")
_RL = "weight updates from a trainer (vLLM's RL API)"

# ember's status of each method ("name") and argument ("name.argument"), read from ember's
# `LLM` (frontend/llm.py and its mixins). `__init__`'s arguments are in `_init_status`.
_STATUS: dict[str, str] = {
    "__init__": SUPPORTED,
    "__init__.**kwargs": "supported: every other field of vLLM's `EngineArgs`, see "
    "[vLLM's engine arguments](#vllms-engine-arguments)",
    "apply_model": "supported: `func` is sent to the workers by reference (its module and "
    "name), so it is a top-level function of an importable module",
    "apply_model.func": SUPPORTED,
    "beam_search": SUPPORTED,
    "beam_search.prompts": SUPPORTED,
    "beam_search.params": "supported: `structured_outputs` included (vLLM's constrained "
    "beams); `BeamSearchParams.watermarking` raises NotImplementedError",
    "beam_search.lora_request": _LORA,
    "beam_search.use_tqdm": SUPPORTED,
    "beam_search.concurrency_limit": SUPPORTED,
    "chat": SUPPORTED,
    "chat.messages": SUPPORTED,
    "chat.sampling_params": SUPPORTED,
    "chat.use_tqdm": SUPPORTED,
    "chat.lora_request": _LORA,
    "chat.priority": SUPPORTED,
    "chat.chat_template": SUPPORTED,
    "chat.chat_template_content_format": SUPPORTED,
    "chat.add_generation_prompt": SUPPORTED,
    "chat.continue_final_message": SUPPORTED,
    "chat.tools": SUPPORTED,
    "chat.chat_template_kwargs": SUPPORTED,
    "chat.tokenization_kwargs": SUPPORTED,
    "chat.mm_processor_kwargs": _MM_RAISES,
    "classify": SUPPORTED,
    "classify.prompts": SUPPORTED,
    "classify.pooling_params": SUPPORTED,
    "classify.use_tqdm": SUPPORTED,
    "classify.lora_request": _LORA,
    "classify.tokenization_kwargs": SUPPORTED,
    "collective_rpc": "supported: `method` is a `Worker` method's name or a top-level "
    "function of an importable module (sent by reference, never pickled); arguments and "
    "results are plain data",
    "collective_rpc.method": SUPPORTED,
    "collective_rpc.timeout": SUPPORTED,
    "collective_rpc.args": SUPPORTED,
    "collective_rpc.kwargs": SUPPORTED,
    "embed": SUPPORTED,
    "embed.prompts": SUPPORTED,
    "embed.use_tqdm": SUPPORTED,
    "embed.pooling_params": SUPPORTED,
    "embed.lora_request": _LORA,
    "embed.tokenization_kwargs": SUPPORTED,
    "encode": SUPPORTED,
    "encode.prompts": SUPPORTED,
    "encode.pooling_params": SUPPORTED,
    "encode.use_tqdm": SUPPORTED,
    "encode.lora_request": _LORA,
    "encode.pooling_task": SUPPORTED,
    "encode.tokenization_kwargs": SUPPORTED,
    "enqueue": "supported: the engine core starts on the requests at once (it runs in its "
    "own process); `wait_for_completion` gathers their outputs",
    "enqueue.prompts": SUPPORTED,
    "enqueue.sampling_params": SUPPORTED,
    "enqueue.lora_request": _LORA,
    "enqueue.priority": SUPPORTED,
    "enqueue.use_tqdm": _no_effect("sending the requests is one message"),
    "enqueue.tokenization_kwargs": SUPPORTED,
    "enqueue.mm_processor_kwargs": _MM_RAISES,
    "enqueue_chat": SUPPORTED,
    "enqueue_chat.messages": SUPPORTED,
    "enqueue_chat.sampling_params": SUPPORTED,
    "enqueue_chat.use_tqdm": _no_effect("sending the requests is one message"),
    "enqueue_chat.lora_request": _LORA,
    "enqueue_chat.priority": SUPPORTED,
    "enqueue_chat.chat_template": SUPPORTED,
    "enqueue_chat.chat_template_content_format": SUPPORTED,
    "enqueue_chat.add_generation_prompt": SUPPORTED,
    "enqueue_chat.continue_final_message": SUPPORTED,
    "enqueue_chat.tools": SUPPORTED,
    "enqueue_chat.chat_template_kwargs": SUPPORTED,
    "enqueue_chat.tokenization_kwargs": SUPPORTED,
    "enqueue_chat.mm_processor_kwargs": _MM_RAISES,
    "finish_weight_update": MISSING,
    "from_engine_args": "supported: with ember's `EngineArgs` (`from ember import EngineArgs`)",
    "from_engine_args.engine_args": SUPPORTED,
    "generate": SUPPORTED,
    "generate.prompts": SUPPORTED,
    "generate.sampling_params": SUPPORTED,
    "generate.use_tqdm": SUPPORTED,
    "generate.lora_request": _LORA,
    "generate.priority": SUPPORTED,
    "generate.tokenization_kwargs": SUPPORTED,
    "generate.mm_processor_kwargs": _MM_RAISES,
    "get_default_sampling_params": SUPPORTED,
    "get_metrics": SUPPORTED,
    "get_tokenizer": SUPPORTED,
    "get_weight_version": MISSING,
    "get_world_size": SUPPORTED,
    "get_world_size.include_dp": _no_effect(
        "ember has no data parallelism: the world size is the tensor-parallel ranks"
    ),
    "init_weight_transfer_engine": MISSING,
    "release_kv_cache_memory": MISSING,
    "reset_mm_cache": _no_effect("ember has no multimodal cache"),
    "reset_prefix_cache": SUPPORTED,
    "reset_prefix_cache.reset_running_requests": SUPPORTED,
    "reset_prefix_cache.reset_connector": _no_effect("ember has no KV connector to reset"),
    "score": SUPPORTED,
    "score.data_1": SUPPORTED,
    "score.data_2": SUPPORTED,
    "score.use_tqdm": SUPPORTED,
    "score.pooling_params": SUPPORTED,
    "score.lora_request": _LORA,
    "score.tokenization_kwargs": SUPPORTED,
    "score.chat_template": MISSING,
    "shutdown_weight_transfer_engine": MISSING,
    "sleep": "supported: levels 1 and 2 need `LLM(enable_sleep_mode=True)`",
    "sleep.level": SUPPORTED,
    "sleep.mode": _raises(
        "'wait' and 'keep' (ember's LLM runs one call at a time, so no request is in "
        "flight); 'abort' is supported"
    ),
    "start_draft_weight_update": MISSING,
    "start_profile": "supported: torch.profiler traces into `LLM(profile_dir=...)`",
    "start_profile.profile_prefix": SUPPORTED,
    "start_profile.delay_iterations": SUPPORTED,
    "start_profile.max_iterations": SUPPORTED,
    "start_weight_update": MISSING,
    "stop_profile": SUPPORTED,
    "update_weight_version": MISSING,
    "update_weights": MISSING,
    "wait_for_completion": SUPPORTED,
    "wait_for_completion.output_type": SUPPORTED,
    "wait_for_completion.use_tqdm": SUPPORTED,
    "wake_up": SUPPORTED,
    "wake_up.tags": SUPPORTED,
    # attributes
    "llm_engine": "supported: a view of the engine core with the `LLMEngine` methods and "
    "configuration scripts read",
    "model_config": "supported: a read-only view with vLLM's `ModelConfig` names",
    "engine_class": MISSING,
    "request_counter": MISSING,
    "default_sampling_params": SUPPORTED,
    "supported_tasks": SUPPORTED,
    "runner_type": SUPPORTED,
    "renderer": MISSING,
    "chat_template": SUPPORTED,
    "input_processor": MISSING,
    "pooling_task": MISSING,
    "chat_template_config": MISSING,
    "pooling_io_processors": MISSING,
}
# Reasons shown with a "missing" status, where there is one worth giving.
_MISSING_WHY: dict[str, str] = {
    "finish_weight_update": _RL,
    "get_weight_version": _RL,
    "init_weight_transfer_engine": _RL,
    "shutdown_weight_transfer_engine": _RL,
    "start_draft_weight_update": _RL,
    "start_weight_update": _RL,
    "update_weight_version": _RL,
    "update_weights": _RL,
}


def _init_status(argument: str) -> str:
    """The status of an argument of `LLM(...)`, from the engine-arguments table."""
    rule = vllm_engine_args.policy(argument)
    if rule is None:
        return MISSING
    if rule.kind == "ember":
        return f"supported: {rule.note}"
    if rule.kind == "no_effect":
        return _no_effect(rule.note)
    return _raises(f"a value other than vLLM's default: {rule.note}")


def status(key: str) -> str:
    """ember's status of `key`: a method or attribute ("generate") or an argument
    ("generate.use_tqdm")."""
    method, _, argument = key.partition(".")
    if method == "__init__" and argument and argument != "**kwargs":
        return _init_status(argument)
    if argument and _STATUS[method] == MISSING:  # a missing method's arguments are too
        return MISSING
    return _STATUS[key]


def keys() -> list[str]:
    """Every method, argument and attribute of vLLM's `LLM`, in the table's order."""
    result = []
    for method in VLLM_LLM_METHODS:
        result.append(method.name)
        result.extend(f"{method.name}.{name}" for name, _ in method.params)
    result.extend(VLLM_LLM_ATTRIBUTES)
    return result


def status_kind(text: str) -> str:
    """The kind of a status text: one of `STATUS_KINDS`."""
    for kind in STATUS_KINDS:
        if text == kind or text.startswith(kind + ":"):
            return kind
    raise ValueError(f"not a status: {text!r}")


def counts() -> dict[str, int]:
    """How many methods, arguments and attributes have each kind of status."""
    found = dict.fromkeys(STATUS_KINDS, 0)
    for key in keys():
        found[status_kind(status(key))] += 1
    return found


# ---- the README section --------------------------------------------------------------------

SECTION_HEADER = "## vLLM's LLM methods and arguments"
_NEXT_HEADER = "## vLLM's engine arguments"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _label(key: str) -> str:
    method, _, argument = key.partition(".")
    call = "LLM" if method == "__init__" else method
    if not argument:
        return f"`{call}()`" if key in _METHOD_NAMES else f"`{method}`"
    return f"`{call}({argument})`"


def _text(key: str) -> str:
    text = status(key)
    why = _MISSING_WHY.get(key)
    return f"{text}: {why}" if text == MISSING and why else text


def markdown() -> str:
    """The README's section: every public method of vLLM's `LLM`, each argument with its
    default in vLLM, each public attribute, and ember's status of each."""
    defaults = {f"{m.name}.{name}": default for m in VLLM_LLM_METHODS for name, default in m.params}
    summary = "; ".join(f"{kind}: {count}" for kind, count in counts().items())
    intro = (
        f"Every public method of vLLM {VLLM_VERSION}'s `LLM` with its arguments (from "
        "`inspect.signature`), and the attributes its `__init__` sets, with what ember's "
        "`LLM` does with each (" + summary + "). The table is `enginecore/vllm_llm_api.py`, "
        "printed by `python -m ember.enginecore.vllm_llm_api --markdown` "
        "(`--update-readme README.md` rewrites this copy; `tests/test_vllm_llm_api.py` checks "
        "it against ember's `LLM`). A `LLM(...)` argument's status comes from "
        "[vLLM's engine arguments](#vllms-engine-arguments)."
    )
    lines = [
        SECTION_HEADER,
        "",
        *textwrap.wrap(intro, width=100, break_on_hyphens=False),
        "",
        "| method / argument / attribute | vLLM's default | ember |",
        "| --- | --- | --- |",
    ]
    for key in keys():
        default = defaults.get(key)
        shown = "" if default is None or "." not in key else f"`{_cell(default)}`"
        if default is None and "." in key and not key.endswith(".**kwargs"):
            shown = "required"
        lines.append(f"| {_label(key)} | {shown} | {_cell(_text(key))} |")
    return "\n".join(lines) + "\n"


def update_readme(path: str) -> None:
    """Replace the section in `path` (its header to the next `## ` header) with `markdown()`,
    or insert it before the engine-arguments section."""
    with open(path) as f:
        lines = f.read().split("\n")
    if SECTION_HEADER in lines:
        start = lines.index(SECTION_HEADER)
        end = next(
            (i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines)
        )
    else:
        start = end = lines.index(_NEXT_HEADER)
    lines[start:end] = (markdown() + "\n").split("\n")[:-1]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def main(argv: list[str]) -> int:
    if argv == ["--markdown"]:
        sys.stdout.write(markdown())
    elif len(argv) == 2 and argv[0] == "--update-readme":
        update_readme(argv[1])
    else:
        print(
            "usage: python -m ember.enginecore.vllm_llm_api --markdown | --update-readme README.md",
            file=sys.stderr,
        )
        return 2
    return 0


_METHOD_NAMES = frozenset(method.name for method in VLLM_LLM_METHODS)

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
