"""Phi-3 (and Phi-3.5 / Phi-4-mini): Llama's shape, with checkpoints that already store the
fused `qkv_proj` and `gate_up_proj` tensors (loaded whole and split by the layers' loaders)."""

from __future__ import annotations

from typing import ClassVar

from ember.workers.models.llama import LlamaForCausalLM


class Phi3ForCausalLM(LlamaForCausalLM):
    # The checkpoint names are the fused parameters' own: nothing to map.
    packed_modules_mapping: ClassVar[dict] = {}
