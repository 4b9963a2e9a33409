"""How a layer holds its weights: a `QuantizationConfig` hands each linear layer, embedding and LM
head a method object that creates its parameters, turns them into the format it computes with
once the checkpoint is loaded, and applies them (vLLM's `QuantizeMethodBase` shape).

    layer.__init__        quant_method = ctx.quant_config.get_quant_method(layer)
                          quant_method.create_weights(layer, ...)     parameters + weight_loader
    loader                checkpoint tensors -> each parameter's weight_loader (this rank's shard)
    loader                quant_method.process_weights_after_loading(layer)
    layer.forward         quant_method.apply(layer, x, bias)

The unquantized method keeps dense weights; `gguf_packed` keeps GGUF's 4- and 8-bit groups
packed for the CPU. AWQ, GPTQ and FP8 are further methods; LoRA wraps the layers.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn

WeightLoader = Callable[..., None]


class LinearMethodBase(ABC):
    """The weight format of one linear layer (`weight` is [output, input] per rank)."""

    @abstractmethod
    def create_weights(
        self,
        layer: nn.Module,
        input_size_per_partition: int,
        output_size_per_partition: int,
        input_size: int,
        output_size: int,
        weight_loader: WeightLoader,
    ) -> None:
        """Register the layer's parameters, each carrying `weight_loader`."""

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Turn the loaded parameters into the format `apply` computes with."""

    @abstractmethod
    def apply(
        self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x [T, input] @ weight.T (+ bias) -> [T, output] in x's dtype."""

    def input_dtype(self, layer: nn.Module, num_tokens: int) -> torch.dtype | None:
        """The dtype `apply` rounds a batch of `num_tokens` input rows to before its matmul,
        where it always does so and rounds its output to the same (a model may then keep the
        values between two such layers in that dtype, and skip the conversions); None: the
        input is multiplied as it is given."""
        return None


class EmbeddingMethodBase(ABC):
    """The weight format of a vocabulary table: an embedding (rows read) or an LM head (also
    multiplied by)."""

    @abstractmethod
    def create_weights(
        self, layer: nn.Module, rows_per_partition: int, embedding_dim: int, weight_loader
    ) -> None:
        """Register `layer.weight` [rows_per_partition, embedding_dim]."""

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Turn the loaded table into the format `embedding` and `apply` read."""

    @abstractmethod
    def embedding(self, layer: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` (any shape, local to this rank) -> [*ids.shape, embedding_dim]."""

    @abstractmethod
    def apply(self, layer: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
        """Logits of this rank's rows: hidden [N, H] -> [N, rows_per_partition], float32."""


class QuantizationConfig(ABC):
    """One weight format for a whole model; `get_quant_method` picks each layer's method."""

    # True where a MoE block's experts are quantized too, as linear layers of this format
    # (`fused_moe.FusedMoE`); otherwise they stay dense.
    quantizes_experts = False

    @classmethod
    @abstractmethod
    def get_name(cls) -> str:
        """The `quantization=` value that selects it."""

    @abstractmethod
    def get_quant_method(self, layer: nn.Module) -> LinearMethodBase | EmbeddingMethodBase:
        """The method of `layer` (a linear layer, embedding or LM head)."""

    def is_layer_skipped(self, checkpoint_name: str) -> bool:
        """True for a linear layer the checkpoint keeps dense (FP8's `ignored_layers`, AWQ's
        `modules_to_not_convert`), by its checkpoint module name, e.g.
        "model.layers.0.self_attn.q_proj" (`skip_dense_layers` asks for each part of a fused
        layer)."""
        return False

    def layer_method(self, checkpoint_name: str) -> LinearMethodBase | None:
        """A linear layer's own method where the checkpoint gives it settings of its own
        (GPTQModel's `dynamic`), by its checkpoint module name; None: the model-wide one."""
        return None


def skip_dense_layers(
    model: nn.Module, config: QuantizationConfig, packed_modules_mapping: dict
) -> None:
    """Give the linear layers the checkpoint keeps dense an unquantized method, and those with
    settings of their own their own method (`layer_method`), before any weight loads. A fused
    layer (qkv_proj) is asked for by its parts (q_proj, k_proj, v_proj), which must agree."""
    from ember.workers.layers.linear import LinearBase
    from ember.workers.layers.quantization.unquantized import UnquantizedLinearMethod

    parts_of: dict[str, list[str]] = {}
    for part, (fused, _) in packed_modules_mapping.items():
        parts_of.setdefault(fused, []).append(part)
    for name, module in model.named_modules():
        if not isinstance(module, LinearBase):
            continue
        prefix, _, leaf = name.rpartition(".")
        names = [f"{prefix}.{part}" if prefix else part for part in parts_of.get(leaf, [leaf])]
        skipped = {config.is_layer_skipped(checkpoint_name) for checkpoint_name in names}
        if len(skipped) > 1:
            raise ValueError(
                f"the checkpoint quantizes some of {', '.join(names)} and not the others; "
                f"they are one fused layer ({name}) here"
            )
        if skipped == {True}:
            module.replace_quant_method(UnquantizedLinearMethod())
            continue
        own = [config.layer_method(checkpoint_name) for checkpoint_name in names]
        settings = {None if m is None else (type(m), tuple(sorted(vars(m).items()))) for m in own}
        if len(settings) > 1:
            raise ValueError(
                f"the checkpoint gives {', '.join(names)} different settings; they are one "
                f"fused layer ({name}) here"
            )
        if own[0] is not None:
            module.replace_quant_method(own[0])


def process_weights_after_loading(model: nn.Module) -> None:
    """Call every layer's `process_weights_after_loading` once its checkpoint is loaded. Methods
    whose processing reads and writes only their own layer (`layers_independent`) run on a
    thread per core: their work is C kernels and torch ops, which release the GIL (the
    default GGUF's packing, 2 cores: 1.65 -> 1.05 s)."""
    independent, in_order = [], []
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if method is not None:
            kind = independent if getattr(method, "layers_independent", False) else in_order
            kind.append((method, module))
    for method, module in in_order:
        method.process_weights_after_loading(module)
    if len(independent) < 2:
        for method, module in independent:
            method.process_weights_after_loading(module)
        return
    threads = min(len(independent), len(os.sched_getaffinity(0)))
    with ThreadPoolExecutor(threads, thread_name_prefix="ember-pack") as pool:
        done = [
            pool.submit(method.process_weights_after_loading, module)
            for method, module in independent
        ]
        for future in done:
            future.result()
