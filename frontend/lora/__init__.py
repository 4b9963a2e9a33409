"""vLLM's `vllm.lora` namespace: `ember.lora.request.LoRARequest`."""
