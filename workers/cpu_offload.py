"""vLLM's `cpu_offload_gb` on CUDA: up to that many bytes of the decoder layers' weights stay in
host memory (pinned) and are copied to the GPU for each forward of their layer, so a model a
little larger than the GPU still runs, at the cost of the copies.

The choice is vLLM's: layers are taken in order and their parameters one by one until the
budget is spent (the parameter that crosses it is still offloaded), and a layer with any
offloaded parameter runs through `torch.func.functional_call` on device copies of its state.
vLLM first tries zero-copy views of host memory (UVA, a custom op of its own); ember always
copies, which is vLLM's fallback. CUDA graphs are not captured over offloaded layers (the
worker runs eagerly when anything is offloaded).
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch.func import functional_call

logger = logging.getLogger(__name__)


class WeightOffloader:
    """Moves parameters to host memory until `max_bytes` are there; `offload` wraps a module."""

    def __init__(self, max_bytes: int, pin_memory: bool):
        self.max_bytes = max_bytes
        self.pin_memory = pin_memory
        self.offloaded_bytes = 0

    def offload(self, module: nn.Module, device: torch.device) -> bool:
        """Offload `module`'s parameters while budget is left; if any went, its forward copies
        its whole state to `device` first. Returns whether any went."""
        offloaded = False
        for param in module.parameters():
            if self.offloaded_bytes >= self.max_bytes:
                break
            if getattr(param, "_ember_offloaded", False):
                continue
            host = param.data.to("cpu")
            if self.pin_memory:
                host = host.pin_memory()
            param.data = host
            param._ember_offloaded = True
            self.offloaded_bytes += host.numel() * host.element_size()
            offloaded = True
        if offloaded:
            _stream_state_in(module, device)
        return offloaded


def _stream_state_in(module: nn.Module, device: torch.device) -> None:
    original_forward = module.forward

    def forward(*args, **kwargs):
        # Copies of every parameter and buffer on `device` (a no-op for those already there);
        # tie_weights=False as in vLLM: tied tensors come apart when copied one by one.
        state = {name: t.to(device, non_blocking=True) for name, t in module.state_dict().items()}
        module.forward = original_forward  # functional_call calls module.forward
        try:
            return functional_call(module, state, args, kwargs, tie_weights=False)
        finally:
            module.forward = forward

    module.forward = forward


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's stack of decoder layers: its first `layers` ModuleList."""
    for module in model.modules():
        layers = getattr(module, "layers", None)
        if isinstance(layers, nn.ModuleList):
            return layers
    raise ValueError(f"cpu_offload_gb: {type(model).__name__} has no `layers` list to offload")


def offload_decoder_layers(model: nn.Module, max_bytes: int, device: torch.device) -> int:
    """Offload the first decoder layers' weights up to `max_bytes`; returns the bytes offloaded."""
    offloader = WeightOffloader(max_bytes, pin_memory=device.type == "cuda")
    for layer in decoder_layers(model):
        if not offloader.offload(layer, device):
            break
    logger.info(
        "cpu_offload_gb: %.2f GiB of weights kept in host memory", offloader.offloaded_bytes / 2**30
    )
    return offloader.offloaded_bytes
