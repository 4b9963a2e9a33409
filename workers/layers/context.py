"""What every layer is built with: `ModelContext` holds this rank's `ParallelContext` and the
model's `QuantizationConfig`. The model runner makes one per model and passes it down through
the model's constructors; layers read nothing global."""

from __future__ import annotations

from dataclasses import dataclass, field

from ember.workers.distributed import SINGLE_RANK, ParallelContext
from ember.workers.layers.quantization import QuantizationConfig, get_quantization_config


@dataclass(frozen=True, slots=True)
class ModelContext:
    parallel: ParallelContext = SINGLE_RANK
    quant_config: QuantizationConfig = field(default_factory=lambda: get_quantization_config(None))

    @property
    def tp_rank(self) -> int:
        return self.parallel.rank

    @property
    def tp_size(self) -> int:
        return self.parallel.world_size

    @property
    def expert_parallel(self) -> bool:
        """Whether MoE layers hold whole experts, each rank its own (vLLM: EP over one rank
        is no EP); always across data-parallel ranks in lockstep."""
        parallel = self.parallel
        return parallel.lockstep is not None or (
            parallel.enable_expert_parallel and parallel.world_size > 1
        )
