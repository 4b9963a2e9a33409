"""`LoRARequest` where vLLM users import it from (`vllm.lora.request`); defined in
`ember.workers.lora_request`."""

from ember.workers.lora_request import LoRARequest

__all__ = ["LoRARequest"]
