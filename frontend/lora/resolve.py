"""The `lora_request` argument of `LLM.generate`, `chat`, `beam_search`, `encode`, ...: one
adapter for every prompt or one per prompt, checked in the user's process before any request
is sent (LoRA enabled, the path readable, rank <= max_lora_rank, supported targets)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ember.workers.lora_request import LoRARequest, read_adapter_config

if TYPE_CHECKING:
    from ember.enginecore.messages import EngineCoreReadyInfo


def lora_requests_per_prompt(
    lora_request: Any, num_prompts: int, engine_info: EngineCoreReadyInfo
) -> list[LoRARequest | None] | None:
    """None (no adapter), or one `LoRARequest | None` per prompt, checked against the engine's
    `max_lora_rank` (0: LoRA is off) and `lora_module_shapes`."""
    max_lora_rank = engine_info.max_lora_rank
    if lora_request is None:
        return None
    if isinstance(lora_request, LoRARequest):
        requests = [lora_request] * num_prompts
    elif isinstance(lora_request, (list, tuple)):
        if len(lora_request) != num_prompts:
            raise ValueError(
                f"lora_request has {len(lora_request)} entries for {num_prompts} prompts: give "
                "one LoRARequest, or one (or None) per prompt"
            )
        requests = list(lora_request)
    else:
        raise TypeError(
            "lora_request must be a LoRARequest, a list of them (or None) one per prompt, or "
            f"None; got {type(lora_request).__name__}"
        )
    for index, request in enumerate(requests):
        if request is not None and not isinstance(request, LoRARequest):
            raise TypeError(
                f"lora_request[{index}] must be a LoRARequest or None, got {type(request).__name__}"
            )
    if all(request is None for request in requests):
        return None
    if max_lora_rank <= 0:
        raise ValueError(
            "lora_request needs LoRA: start the engine with LLM(..., enable_lora=True)"
        )
    checked: dict[int, LoRARequest] = {}
    for request in requests:
        if request is None:
            continue
        seen = checked.get(request.lora_int_id)
        if seen is None:
            read_adapter_config(request, max_lora_rank, engine_info.lora_module_shapes)
            checked[request.lora_int_id] = request
        elif (seen.lora_name, seen.lora_path) != (request.lora_name, request.lora_path):
            raise ValueError(
                f"lora_int_id {request.lora_int_id} is given to two adapters "
                f"({seen.lora_name!r} and {request.lora_name!r}); each adapter needs its own id"
            )
    return requests
