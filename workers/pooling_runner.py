"""The pooling branch of the model runner: one forward over whole prompts, then the pooler.

Used by `ModelRunner.execute_model` when the engine runs a pooling model (`runner="pooling"`).
The scheduler gives each pooling request its whole prompt in one step, so every request of the
step ends here with its pooled output and nothing is sampled.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ember.workers.layers.pooler import Pooler
from ember.workers.pooled_tensor import PooledTensor
from ember.workers.scheduler_output import ModelRunnerOutput, SchedulerOutput

if TYPE_CHECKING:
    from ember.workers.model_runner import ModelRunner


def to_pooled_tensor(tensor: torch.Tensor) -> PooledTensor:
    array = tensor.detach().to("cpu", torch.float32).contiguous().numpy()
    return PooledTensor(dtype=str(array.dtype), shape=list(array.shape), data=array.tobytes())


class PoolingRunner:
    def __init__(self, runner: ModelRunner):
        self.runner = runner
        model = runner.model
        self.pooler = Pooler(runner.config.model.pooler, getattr(model, "pooling_head", None))
        self.uses_token_type_ids = getattr(model, "uses_token_type_ids", False)

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        runner = self.runner
        runner._update_states(scheduler_output)
        scheduler_output, lora_errored = runner._activate_loras(scheduler_output)
        if not scheduler_output.num_scheduled_tokens:
            return ModelRunnerOutput(errored_req_ids=lora_errored)
        runner.ran_model = True
        states, input_ids, positions, metadata, last_rows, _ = runner._prepare_inputs(
            scheduler_output
        )
        spans = [(row + 1 - len(s.token_ids), row + 1) for s, row in zip(states, last_rows)]
        kwargs = {}
        if self.uses_token_type_ids:
            kwargs["token_type_ids"] = self._token_type_ids(states, spans, input_ids)
        hidden_states = runner.model(input_ids, positions, metadata, **kwargs)
        params = [s.pooling_params for s in states]
        outputs = self.pooler(hidden_states, spans, params)
        for state in states:  # done: the scheduler frees it after this step
            runner.requests.pop(state.req_id, None)
        return ModelRunnerOutput(
            errored_req_ids=lora_errored,
            pooled_req_ids=[s.req_id for s in states],
            pooled_outputs=[to_pooled_tensor(t) for t in outputs],
        )

    @staticmethod
    def _token_type_ids(states, spans, input_ids: torch.Tensor) -> torch.Tensor:
        """0 for every token, 1 from a text pair's second text on (`segment_start`)."""
        token_type_ids = torch.zeros_like(input_ids)
        for state, (start, end) in zip(states, spans):
            segment_start = state.pooling_params.segment_start
            if segment_start is not None:
                token_type_ids[start + segment_start : end] = 1
        return token_type_ids
