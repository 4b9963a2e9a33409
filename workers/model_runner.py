"""Runs one engine step on this worker: updates the per-request state from the scheduler's
deltas, lays the scheduled tokens of all requests out flat, runs the model once, and samples.

Called by `ember.workers.worker.Worker`. No padding: a batch of a 3-token prefill chunk and two
decodes is 5 tokens.
"""

from __future__ import annotations

import math
import mmap
from dataclasses import dataclass, field

import numpy as np
import torch

from ember.kernels.attention import AttentionMetadata
from ember.workers.config import EngineConfig
from ember.workers.cuda_graphs import CudaGraphRunner
from ember.workers.host_to_device import to_device
from ember.workers.layers.attention import Attention
from ember.workers.model_loader.loader import DTYPES, get_model
from ember.workers.sampler import Sampler, SamplingMetadata
from ember.workers.sampling_params import SamplingParams
from ember.workers.scheduler_output import ModelRunnerOutput, SchedulerOutput

_GREEDY_TEMPERATURE = 1e-5


@dataclass(slots=True)
class CachedRequestState:
    """What a worker remembers of a request between steps."""

    req_id: str
    token_ids: list[int]  # prompt, then every generated token
    num_prompt_tokens: int
    sampling_params: SamplingParams
    generator: torch.Generator | None
    block_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0


class ModelRunner:
    def __init__(self, config: EngineConfig, device: torch.device):
        self.config = config
        self.device = device
        self.block_size = config.cache.block_size
        self.dtype = DTYPES[config.model.dtype]
        self.model = get_model(config.model, device)
        self.attention_layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        self.requests: dict[str, CachedRequestState] = {}
        generator = torch.Generator(device=device).manual_seed(config.model.seed)
        self.sampler = Sampler(generator)
        self.kv_caches: list[torch.Tensor] = []
        self.cuda_graphs: CudaGraphRunner | None = None  # set by the worker on CUDA

    # ---- KV cache ----------------------------------------------------------------------

    def kv_cache_block_bytes(self) -> int:
        """Bytes one KV block takes across all layers of this rank."""
        element_bytes = torch.empty(0, dtype=self.dtype).element_size()
        return sum(
            2 * self.block_size * layer.num_kv_heads * layer.head_dim * element_bytes
            for layer in self.attention_layers
        )

    def initialize_kv_cache(self, num_blocks: int) -> None:
        """Allocate every layer's cache [2, num_blocks, block_size, Hkv, D] and bind it.

        Zeroed, never garbage: attention multiplies masked-out slots by a zero weight, and a
        NaN there would still poison the sum. On CPU the memory is an anonymous mapping, which
        the kernel zero-fills page by page on first write, so resident memory grows with the
        blocks actually used rather than with the budget.
        """
        self.kv_caches = []
        for layer in self.attention_layers:
            shape = (2, num_blocks, self.block_size, layer.num_kv_heads, layer.head_dim)
            if self.device.type == "cpu":
                numel = math.prod(shape)
                element_bytes = torch.empty(0, dtype=self.dtype).element_size()
                buffer = mmap.mmap(-1, numel * element_bytes)
                cache = torch.frombuffer(buffer, dtype=self.dtype, count=numel).view(shape)
            else:
                cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
            layer.kv_cache = cache
            self.kv_caches.append(cache)

    # ---- one step ----------------------------------------------------------------------

    def _update_states(self, scheduler_output: SchedulerOutput) -> None:
        for req_id in scheduler_output.finished_req_ids:
            self.requests.pop(req_id, None)
        for new in scheduler_output.scheduled_new_reqs:
            params = new.sampling_params
            resumed = self.requests.get(new.req_id)
            generator = None
            if resumed is not None:  # preempted earlier: its seeded draws carry on
                generator = resumed.generator
            elif params.seed is not None:
                generator = torch.Generator(device=self.device).manual_seed(params.seed)
            self.requests[new.req_id] = CachedRequestState(
                req_id=new.req_id,
                token_ids=list(new.prompt_token_ids) + list(new.output_token_ids),
                num_prompt_tokens=len(new.prompt_token_ids),
                sampling_params=params,
                generator=generator,
                block_ids=list(new.block_ids),
                num_computed_tokens=new.num_computed_tokens,
            )
        for cached in scheduler_output.scheduled_cached_reqs:
            state = self.requests[cached.req_id]
            state.block_ids.extend(cached.new_block_ids)
            state.num_computed_tokens = cached.num_computed_tokens

    def _prepare_inputs(
        self, scheduler_output: SchedulerOutput
    ) -> tuple[list[CachedRequestState], torch.Tensor, torch.Tensor, AttentionMetadata, list[int]]:
        """Flat input ids and positions, attention metadata, and the rows to sample from.

        Decodes (one scheduled token) go first so that attention can batch them.
        """
        scheduled = scheduler_output.num_scheduled_tokens
        req_ids = sorted(scheduled, key=lambda r: scheduled[r] != 1)
        states = [self.requests[r] for r in req_ids]
        num_tokens = [scheduled[r] for r in req_ids]
        query_start_loc = np.zeros(len(states) + 1, dtype=np.int64)
        np.cumsum(num_tokens, out=query_start_loc[1:])
        input_ids = np.empty(query_start_loc[-1], dtype=np.int64)
        positions = np.empty(query_start_loc[-1], dtype=np.int64)
        max_blocks = max(len(s.block_ids) for s in states)
        block_table = np.zeros((len(states), max_blocks), dtype=np.int64)
        seq_lens, sample_rows, sampled_states = [], [], []
        for i, (state, count) in enumerate(zip(states, num_tokens)):
            start, end = query_start_loc[i], query_start_loc[i + 1]
            computed = state.num_computed_tokens
            input_ids[start:end] = state.token_ids[computed : computed + count]
            positions[start:end] = np.arange(computed, computed + count)
            block_table[i, : len(state.block_ids)] = state.block_ids
            seq_lens.append(computed + count)
            if computed + count == len(state.token_ids):
                sample_rows.append(int(end) - 1)
                sampled_states.append(state)
        req_index = np.repeat(np.arange(len(states)), num_tokens)
        slot_mapping = (
            block_table[req_index, positions // self.block_size] * self.block_size
            + positions % self.block_size
        )
        device = self.device
        metadata = AttentionMetadata(
            slot_mapping=to_device(slot_mapping, device, torch.int64),
            query_start_loc=to_device(query_start_loc, device, torch.int32),
            seq_lens=to_device(seq_lens, device, torch.int32),
            block_table=to_device(block_table, device, torch.int64),
            num_decodes=sum(1 for count in num_tokens if count == 1),
            max_query_len=max(num_tokens),
            max_seq_len=max(seq_lens),
            query_start_loc_cpu=query_start_loc.tolist(),
            seq_lens_cpu=seq_lens,
        )
        return (
            sampled_states,
            to_device(input_ids, device, torch.int64),
            to_device(positions, device, torch.int64),
            metadata,
            sample_rows,
        )

    def _sampling_metadata(self, states: list[CachedRequestState]) -> SamplingMetadata:
        params = [s.sampling_params for s in states]
        temperature = torch.tensor([p.temperature for p in params], dtype=torch.float32)
        vocab_size = self.config.model.vocab_size
        top_k = top_p = None
        if any(0 < p.top_k < vocab_size for p in params):
            top_k = torch.tensor([p.top_k if p.top_k > 0 else vocab_size for p in params])
        if any(p.top_p < 1.0 for p in params):
            top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32)
        greedy = [p.temperature < _GREEDY_TEMPERATURE for p in params]
        return SamplingMetadata(
            temperature=to_device(temperature, self.device, torch.float32),
            top_k=None if top_k is None else to_device(top_k, self.device, torch.int64),
            top_p=None if top_p is None else to_device(top_p, self.device, torch.float32),
            generators={i: s.generator for i, s in enumerate(states) if s.generator is not None},
            all_greedy=all(greedy),
            all_random=not any(greedy),
        )

    @torch.inference_mode()
    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        self._update_states(scheduler_output)
        if not scheduler_output.num_scheduled_tokens:
            return ModelRunnerOutput()
        states, input_ids, positions, metadata, sample_rows = self._prepare_inputs(scheduler_output)
        if self.cuda_graphs is not None and self.cuda_graphs.can_replay(len(input_ids), metadata):
            hidden_states = self.cuda_graphs.replay(input_ids, positions, metadata)
        else:
            hidden_states = self.model(input_ids, positions, metadata)
        if not states:
            return ModelRunnerOutput()
        rows = to_device(sample_rows, self.device, torch.int64)
        logits = self.model.compute_logits(hidden_states.index_select(0, rows))
        sampled = self.sampler(logits, self._sampling_metadata(states)).tolist()
        for state, token_id in zip(states, sampled):
            state.token_ids.append(token_id)
        return ModelRunnerOutput(req_ids=[s.req_id for s in states], sampled_token_ids=sampled)
