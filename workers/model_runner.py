"""Runs one engine step on this worker: updates the per-request state from the scheduler's
deltas, lays the scheduled tokens of all requests out flat, runs the model once, and samples.

Called by `ember.workers.worker.Worker`. No padding: a batch of a 3-token prefill chunk and two
decodes is 5 tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec
import numpy as np
import torch

from ember.kernels.attention import AttentionMetadata
from ember.kernels.token_bitmask import apply_token_bitmask_
from ember.workers.config import EngineConfig
from ember.workers.cpu_decode.llama_runner import LlamaCPUDecodeRunner
from ember.workers.cpu_offload import offload_decoder_layers
from ember.workers.cuda_graphs import CudaGraphRunner
from ember.workers.distributed import SINGLE_RANK, ParallelContext
from ember.workers.host_kv_cache import HostKVCache
from ember.workers.host_to_device import to_device
from ember.workers.layers.attention import Attention
from ember.workers.layers.fused_moe import FusedMoE
from ember.workers.layers.quantization import has_integer_codes
from ember.workers.logits_processor import LogitsProcessors, OutputTokenIds
from ember.workers.logprobs import LogprobsLists
from ember.workers.lora_manager import LoRAManager
from ember.workers.lora_request import LoRARequest
from ember.workers.model_loader.loader import DTYPES, get_model
from ember.workers.nonfinite import scrub_nonfinite_blocks
from ember.workers.pooling_params import PoolingParams
from ember.workers.pooling_runner import PoolingRunner
from ember.workers.rpc import FunctionRef
from ember.workers.sampler import (
    LogprobsTensors,
    PenaltyInputs,
    Sampler,
    SamplingMetadata,
    bad_word_bans,
    compute_logprobs,
)
from ember.workers.sampling_params import SamplingParams
from ember.workers.scheduler_output import ModelRunnerOutput, SchedulerOutput

_GREEDY_TEMPERATURE = 1e-5
# kv_cache_dtype values other than "auto" (checked by `EngineArgs`): the cache's torch dtype.
KV_CACHE_DTYPES = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn}


@dataclass(slots=True)
class CachedRequestState:
    """What a worker remembers of a request between steps."""

    req_id: str
    token_ids: list[int]  # prompt, then every generated token
    num_prompt_tokens: int
    sampling_params: SamplingParams | None
    generator: torch.Generator | None
    block_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    # Prompt positions whose logprobs were already returned (a preempted request that is
    # recomputed does not send them twice).
    num_prompt_logprobs_done: int = 1
    # [V] bool, True where allowed_token_ids forbids the token; made on first use.
    disallowed_mask: torch.Tensor | None = None
    pooling_params: PoolingParams | None = None  # a pooling request (sampling_params is None)
    lora_request: LoRARequest | None = None  # its LoRA adapter (enable_lora)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens


@dataclass(slots=True)
class PromptLogprobsJob:
    """Rows of this step's flat batch whose logits give a request's prompt logprobs: row i
    predicts `target_token_ids[i]`."""

    req_id: str
    first_row: int
    target_token_ids: list[int]
    num_logprobs: int


class ModelRunner:
    """Every rank runs every step on its shard; rank 0 alone gets the gathered logits (other
    ranks' `compute_logits` returns None), samples, and broadcasts the sampled ids so that every
    rank's request state stays the same."""

    def __init__(
        self, config: EngineConfig, device: torch.device, parallel: ParallelContext = SINGLE_RANK
    ):
        self.config = config
        self.device = device
        self.parallel = parallel
        self.block_size = config.cache.block_size
        self.dtype = DTYPES[config.model.dtype]
        self.kv_cache_dtype = self.dtype  # see `load_model`
        self.requests: dict[str, CachedRequestState] = {}
        # Requests that failed here (adapter, non-finite logits), until the engine core's
        # finished ids forget them: a step scheduled before it knew still lists them.
        self.failed_req_ids: set[str] = set()
        generator = torch.Generator(device=device).manual_seed(config.model.seed)
        self.sampler = Sampler(generator, config.model.logprobs_mode)
        # Custom logits processors run where the sampler runs: rank 0 (it gets the logits).
        self.logits_processors = None
        if parallel.rank == 0 and config.model.logits_processors:
            self.logits_processors = LogitsProcessors.build(
                [FunctionRef(*ref) for ref in config.model.logits_processors],
                config,
                device,
                is_pin_memory=device.type == "cuda",
            )
        self.kv_caches: list[torch.Tensor] = []
        self.host_kv_cache: HostKVCache | None = None  # the CPU cache's mappings
        self.cuda_graphs: CudaGraphRunner | None = None  # set by the worker on CUDA
        self.ran_model = False  # whether the last execute_model ran the model's forward
        self.load_model()

    def load_model(self) -> None:
        """Load the weights (again, after `unload_model`) and what is built on the model: the
        pooler, and the fused CPU decode step where its capability check passes (it logs the
        choice). An allocated KV cache is bound to the new attention layers."""
        config = self.config
        self.model = get_model(config.model, self.device, self.parallel)
        # The CPU fast path of integer codes (GGUF's groups, GPTQ/AWQ/compressed-tensors codes
        # in the same tiles) keeps float32 activations but stores keys and values in bfloat16:
        # half the cache memory and half the bytes attention reads (the fused decode step
        # reads that cache), and its greedy tokens still agree with float32
        # (tests/test_packed_int4.py, tests/test_gptq_awq.py). FP8 weights are dense here.
        if self.device.type == "cpu" and has_integer_codes(self.model):
            self.kv_cache_dtype = torch.bfloat16
        # kv_cache_dtype="fp8": e4m3, a byte a value, whatever the weights (vLLM's rule); each
        # attention layer's k_scale / v_scale (1.0, or set by the first step below with
        # calculate_kv_scales) scale what it stores.
        self.kv_cache_dtype = KV_CACHE_DTYPES.get(config.cache.cache_dtype, self.kv_cache_dtype)
        self.kv_scales_pending = config.cache.calculate_kv_scales
        if config.device.cpu_offload_bytes:
            offload_decoder_layers(self.model, config.device.cpu_offload_bytes, self.device)
        self.attention_layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        # in the order the forward calls them (`idle_moe_step`)
        self.moe_layers = [m for m in self.model.modules() if isinstance(m, FusedMoE)]
        for layer, cache in zip(self.attention_layers, self.kv_caches):
            layer.kv_cache = cache
        self.lora = None
        if config.lora is not None:  # before the fast paths: they check for it
            self.lora = LoRAManager(self.model, config.lora, self.dtype, self.device)
        self.pooling = PoolingRunner(self) if config.model.runner == "pooling" else None
        self.cpu_decode = LlamaCPUDecodeRunner.select(self.model, config, self.device)

    def unload_model(self) -> None:
        """Drop the model and everything that holds its weights (`Worker.sleep(level=2)`)."""
        self.model = None
        self.attention_layers = []
        self.pooling = None
        self.cpu_decode = None
        self.moe_layers = []
        self.cuda_graphs = None
        self.lora = None

    def move_weights(self, device: torch.device) -> None:
        """Move every parameter and buffer of the model to `device` (host memory while a GPU
        worker sleeps at level 1). Tensors a layer keeps outside its parameters and buffers
        stay where they are."""
        for module in self.model.modules():
            for param in module.parameters(recurse=False):
                param.data = param.data.to(device)
            for name, buffer in module.named_buffers(recurse=False):
                module._buffers[name] = buffer.to(device)

    # ---- KV cache ----------------------------------------------------------------------

    def kv_cache_block_bytes(self) -> int:
        """Bytes one KV block takes across all layers of this rank."""
        element_bytes = torch.empty(0, dtype=self.kv_cache_dtype).element_size()
        return sum(
            2 * self.block_size * layer.num_kv_heads * layer.head_dim * element_bytes
            for layer in self.attention_layers
        )

    def initialize_kv_cache(self, num_blocks: int) -> None:
        """Allocate every layer's cache [2, num_blocks, block_size, Hkv, D] and bind it.

        Zeroed, never garbage: attention multiplies masked-out slots by a zero weight, and a
        NaN there would still poison the sum. On CPU the memory is anonymous mappings, zero
        until written, whose pages `_prepare_inputs` populates ahead of the blocks a step
        writes (`HostKVCache`): resident memory grows with the blocks actually used rather
        than with the budget.
        """
        shapes = [
            (2, num_blocks, self.block_size, layer.num_kv_heads, layer.head_dim)
            for layer in self.attention_layers
        ]
        self.host_kv_cache = None
        if self.device.type == "cpu":
            self.host_kv_cache = HostKVCache(shapes, self.kv_cache_dtype)
            self.kv_caches = list(self.host_kv_cache.tensors)
        else:
            self.kv_caches = [
                torch.zeros(shape, dtype=self.kv_cache_dtype, device=self.device)
                for shape in shapes
            ]
        for layer, cache in zip(self.attention_layers, self.kv_caches):
            layer.kv_cache = cache

    def free_kv_cache(self) -> None:
        """Release every layer's cache (`Worker.sleep`); the CUDA graphs, which read it, go
        too. `initialize_kv_cache` allocates it again, zeroed."""
        self.cuda_graphs = None
        for layer in self.attention_layers:
            layer.kv_cache = torch.empty(0)
        self.kv_caches = []
        self.host_kv_cache = None

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
            elif params is not None and params.seed is not None:
                generator = torch.Generator(device=self.device).manual_seed(params.seed)
            state = CachedRequestState(
                req_id=new.req_id,
                token_ids=list(new.prompt_token_ids) + list(new.output_token_ids),
                num_prompt_tokens=len(new.prompt_token_ids),
                sampling_params=params,
                generator=generator,
                block_ids=list(new.block_ids),
                num_computed_tokens=new.num_computed_tokens,
                pooling_params=new.pooling_params,
                lora_request=new.lora_request,
            )
            if resumed is not None:
                state.num_prompt_logprobs_done = resumed.num_prompt_logprobs_done
            self.requests[new.req_id] = state
        for cached in scheduler_output.scheduled_cached_reqs:
            state = self.requests[cached.req_id]
            state.block_ids.extend(cached.new_block_ids)
            state.num_computed_tokens = cached.num_computed_tokens

    def _without_failed(self, scheduler_output: SchedulerOutput) -> SchedulerOutput:
        """The step without the requests that failed here in an earlier step: with async
        scheduling the engine core scheduled this step before that step's output told it (it
        finishes them with "error" from that output; this step computes nothing for them)."""
        failed = self.failed_req_ids
        if not failed:
            return scheduler_output
        failed.difference_update(scheduler_output.finished_req_ids)
        scheduled = scheduler_output.num_scheduled_tokens
        if not failed.intersection(scheduled):
            return scheduler_output
        return msgspec.structs.replace(
            scheduler_output,
            scheduled_cached_reqs=[
                c for c in scheduler_output.scheduled_cached_reqs if c.req_id not in failed
            ],
            num_scheduled_tokens={r: n for r, n in scheduled.items() if r not in failed},
        )

    def _activate_loras(
        self, scheduler_output: SchedulerOutput
    ) -> tuple[SchedulerOutput, list[str]]:
        """Put the step's adapters into the LoRA slots. A request whose adapter cannot be
        loaded (e.g. made for another base model) leaves the step and fails alone: the step
        without it, and its id."""
        scheduled = scheduler_output.num_scheduled_tokens
        if self.lora is None:
            return scheduler_output, []
        lora_requests = [
            state.lora_request
            for state in map(self.requests.get, scheduled)
            if state is not None and state.lora_request is not None
        ]
        _, errors = self.lora.activate(lora_requests)
        if not errors:
            return scheduler_output, []
        errored = [
            req_id
            for req_id in scheduled
            if (lora := self.requests[req_id].lora_request) is not None
            and lora.lora_int_id in errors
        ]
        for req_id in errored:
            self.requests.pop(req_id)
        kept = {r: n for r, n in scheduled.items() if r not in errored}
        return msgspec.structs.replace(scheduler_output, num_scheduled_tokens=kept), errored

    def _prepare_inputs(
        self, scheduler_output: SchedulerOutput
    ) -> tuple[
        list[CachedRequestState],
        torch.Tensor,
        torch.Tensor,
        AttentionMetadata,
        list[int],
        list[PromptLogprobsJob],
    ]:
        """Flat input ids and positions, attention metadata, the rows to sample from, and the
        rows that give prompt logprobs.

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
        seq_lens, sample_rows, sampled_states, prompt_jobs = [], [], [], []
        for i, (state, count) in enumerate(zip(states, num_tokens)):
            start, end = query_start_loc[i], query_start_loc[i + 1]
            computed = state.num_computed_tokens
            params = state.sampling_params  # None for a pooling request
            if params is not None and params.prompt_logprobs is not None:
                job = self._prompt_logprobs_job(state, int(start), computed, count)
                if job is not None:
                    prompt_jobs.append(job)
            input_ids[start:end] = state.token_ids[computed : computed + count]
            positions[start:end] = np.arange(computed, computed + count)
            block_table[i, : len(state.block_ids)] = state.block_ids
            seq_lens.append(computed + count)
            if computed + count == len(state.token_ids):
                sample_rows.append(int(end) - 1)
                sampled_states.append(state)
        req_index = np.repeat(np.arange(len(states)), num_tokens)
        if self.lora is not None:
            self.lora.set_token_slots(self._token_lora_slots(states, req_index))
        slot_mapping = (
            block_table[req_index, positions // self.block_size] * self.block_size
            + positions % self.block_size
        )
        if self.host_kv_cache is not None and len(slot_mapping):
            self.host_kv_cache.populate_through(int(slot_mapping.max()) // self.block_size)
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
            all_slots_valid=True,
        )
        return (
            sampled_states,
            to_device(input_ids, device, torch.int64),
            to_device(positions, device, torch.int64),
            metadata,
            sample_rows,
            prompt_jobs,
        )

    def _token_lora_slots(
        self, states: list[CachedRequestState], req_index: np.ndarray
    ) -> np.ndarray | None:
        """The LoRA slot of each token of the step (-1: the base model); None: no adapter."""
        if all(state.lora_request is None for state in states):
            return None
        slot_of = self.lora.slot_of
        request_slots = np.array(
            [-1 if s.lora_request is None else slot_of[s.lora_request.lora_int_id] for s in states],
            dtype=np.int64,
        )
        return request_slots[req_index]

    @staticmethod
    def _prompt_logprobs_job(
        state: CachedRequestState, first_row: int, computed: int, count: int
    ) -> PromptLogprobsJob | None:
        """Row j of a chunk at position p predicts prompt token p + 1; positions already
        returned before a preemption are skipped."""
        first_target = max(computed + 1, state.num_prompt_logprobs_done)
        end_target = min(computed + count, state.num_prompt_tokens - 1) + 1
        if first_target >= end_target:
            return None
        state.num_prompt_logprobs_done = end_target
        return PromptLogprobsJob(
            req_id=state.req_id,
            first_row=first_row + first_target - 1 - computed,
            target_token_ids=state.token_ids[first_target:end_target],
            num_logprobs=state.sampling_params.prompt_logprobs,
        )

    def _sampling_metadata(self, states: list[CachedRequestState]) -> SamplingMetadata:
        params = [s.sampling_params for s in states]
        device = self.device
        temperature = torch.tensor([p.temperature for p in params], dtype=torch.float32)
        vocab_size = self.config.model.vocab_size
        top_k = top_p = min_p = None
        if any(0 < p.top_k < vocab_size for p in params):
            top_k = torch.tensor([p.top_k if p.top_k > 0 else vocab_size for p in params])
        if any(p.top_p < 1.0 for p in params):
            top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32)
        if any(p.min_p > 0.0 for p in params):
            min_p = torch.tensor([p.min_p for p in params], dtype=torch.float32)
        greedy = [p.temperature < _GREEDY_TEMPERATURE for p in params]
        requested_logprobs = [p.logprobs for p in params if p.logprobs is not None]
        max_num_logprobs = None
        if requested_logprobs:
            max_num_logprobs = -1 if -1 in requested_logprobs else max(requested_logprobs)
        metadata = SamplingMetadata(
            temperature=to_device(temperature, device, torch.float32),
            top_k=None if top_k is None else to_device(top_k, device, torch.int64),
            top_p=None if top_p is None else to_device(top_p, device, torch.float32),
            generators={i: s.generator for i, s in enumerate(states) if s.generator is not None},
            all_greedy=all(greedy),
            all_random=not any(greedy),
            min_p=None if min_p is None else min_p.to(device),
            max_num_logprobs=max_num_logprobs,
        )
        self._add_logits_processor_inputs(metadata, states)
        return metadata

    def _add_logits_processor_inputs(
        self, metadata: SamplingMetadata, states: list[CachedRequestState]
    ) -> None:
        """Penalties, logit_bias, allowed_token_ids, bad words and min_tokens stops, for the
        rows that use them (most steps: none, and this costs one pass over the rows)."""
        device = self.device
        penalty_rows, bias_rows, bias_ids, biases = [], [], [], []
        allowed_rows, banned_rows, banned_ids = [], [], []
        for row, state in enumerate(states):
            params = state.sampling_params
            if (
                params.presence_penalty != 0.0
                or params.frequency_penalty != 0.0
                or params.repetition_penalty != 1.0
            ):
                penalty_rows.append(row)
            if params.logit_bias:
                bias_rows.extend([row] * len(params.logit_bias))
                bias_ids.extend(params.logit_bias)
                biases.extend(params.logit_bias.values())
            if params.allowed_token_ids is not None:
                allowed_rows.append(row)
            banned = self._banned_token_ids(state)
            banned_rows.extend([row] * len(banned))
            banned_ids.extend(banned)
        as_tensor = lambda values, dtype=torch.int64: torch.tensor(values, dtype=dtype).to(device)
        if penalty_rows:
            metadata.penalties = self._penalty_inputs([states[r] for r in penalty_rows])
            metadata.penalties.rows = as_tensor(penalty_rows)
        if bias_rows:
            metadata.logit_bias = (
                as_tensor(bias_rows),
                as_tensor(bias_ids),
                as_tensor(biases, torch.float32),
            )
        if allowed_rows:
            masks = torch.stack([self._disallowed_mask(states[r]) for r in allowed_rows])
            metadata.disallowed = (as_tensor(allowed_rows), masks)
        if banned_rows:
            metadata.banned = (as_tensor(banned_rows), as_tensor(banned_ids))

    def _disallowed_mask(self, state: CachedRequestState) -> torch.Tensor:
        if state.disallowed_mask is None:
            mask = torch.ones(self.config.model.vocab_size, dtype=torch.bool)
            mask[state.sampling_params.allowed_token_ids] = False
            state.disallowed_mask = mask.to(self.device)
        return state.disallowed_mask

    def _banned_token_ids(self, state: CachedRequestState) -> list[int]:
        """Tokens this request may not sample now: the stops while fewer than min_tokens
        tokens exist, and the last token of each bad word whose other tokens were just made."""
        params = state.sampling_params
        banned = []
        num_output = state.num_output_tokens
        if num_output < params.min_tokens:
            banned.extend(params.stop_token_ids)
            if not params.ignore_eos:
                banned.extend(self.config.model.eos_token_ids)
        if params.bad_words_token_ids:
            banned.extend(bad_word_bans(state.token_ids, num_output, params.bad_words_token_ids))
        return banned

    def _penalty_inputs(self, states: list[CachedRequestState]) -> PenaltyInputs:
        vocab_size = self.config.model.vocab_size
        prompt_len = max(s.num_prompt_tokens for s in states)
        output_len = max(max(s.num_output_tokens for s in states), 1)
        prompt_ids = np.full((len(states), prompt_len), vocab_size, dtype=np.int64)
        output_ids = np.full((len(states), output_len), vocab_size, dtype=np.int64)
        for i, state in enumerate(states):
            prompt_ids[i, : state.num_prompt_tokens] = state.token_ids[: state.num_prompt_tokens]
            output_ids[i, : state.num_output_tokens] = state.token_ids[state.num_prompt_tokens :]
        params = [s.sampling_params for s in states]
        floats = lambda name: torch.tensor(
            [getattr(p, name) for p in params], dtype=torch.float32, device=self.device
        )
        return PenaltyInputs(
            rows=torch.empty(0),
            prompt_token_ids=torch.from_numpy(prompt_ids).to(self.device),
            output_token_ids=torch.from_numpy(output_ids).to(self.device),
            presence=floats("presence_penalty"),
            frequency=floats("frequency_penalty"),
            repetition=floats("repetition_penalty"),
        )

    def _prompt_logprobs(
        self, hidden_states: torch.Tensor, jobs: list[PromptLogprobsJob]
    ) -> dict[str, LogprobsLists]:
        results = {}
        for job in jobs:
            rows = hidden_states[job.first_row : job.first_row + len(job.target_token_ids)]
            targets = torch.tensor(job.target_token_ids, device=self.device)
            logits = self.model.compute_logits(rows)  # a collective: every rank computes
            if logits is not None:
                results[job.req_id] = _to_lists(compute_logprobs(logits, targets, job.num_logprobs))
        return results

    def _sample(
        self,
        logits: torch.Tensor,
        states: list[CachedRequestState],
        scheduler_output: SchedulerOutput,
    ) -> tuple[list[int], list[int], LogprobsLists | None]:
        """Sampled ids, a finite flag per row, and the requested logprobs (rank 0).

        Non-finite logits fail only their request. The check rides on the one host sync of
        the step (reading the sampled ids); a failed row's draw is dropped. A row's sum is
        non-finite exactly when the row holds a NaN or an inf (finite logits are far below
        float32's range divided by the vocabulary), and costs a fiftieth of isfinite().all()
        on CPU (28 us against 173 us for one row of 49152)."""
        finite_rows = torch.isfinite(logits.sum(dim=-1))
        if scheduler_output.grammar_req_ids:
            self._apply_grammar_bitmask(logits, states, scheduler_output)
        metadata = self._sampling_metadata(states)
        if self.logits_processors is not None:
            self.logits_processors.update(
                [
                    (
                        (s.req_id, id(s)),
                        s.sampling_params,
                        s.token_ids[: s.num_prompt_tokens],
                        OutputTokenIds(s.token_ids, s.num_prompt_tokens),
                    )
                    for s in states
                ]
            )
            metadata.custom_processors = self.logits_processors
        sampler_output = self.sampler(logits, metadata)
        sampled, finite = torch.stack(
            [sampler_output.sampled_token_ids, finite_rows.to(torch.int64)]
        ).tolist()
        logprobs = sampler_output.logprobs
        if logprobs is not None:
            logprobs = _to_lists(logprobs, states)
        return sampled, finite, logprobs

    def _apply_grammar_bitmask(
        self,
        logits: torch.Tensor,
        states: list[CachedRequestState],
        scheduler_output: SchedulerOutput,
    ) -> None:
        """Structured outputs: the tokens a request's grammar does not allow now become -inf
        (before any sampling rule, so logprobs show the constrained distribution, as vLLM's)."""
        row_of = {state.req_id: row for row, state in enumerate(states)}
        bitmask = torch.frombuffer(bytearray(scheduler_output.grammar_bitmask), dtype=torch.int32)
        bitmask = bitmask.view(len(scheduler_output.grammar_req_ids), -1)
        rows = [row_of[req_id] for req_id in scheduler_output.grammar_req_ids]
        apply_token_bitmask_(
            logits,
            bitmask.to(logits.device, non_blocking=True),
            to_device(rows, self.device, torch.int64),
        )

    def _share_sampled(
        self, sampled: list[int] | None, finite: list[int] | None, num_rows: int
    ) -> tuple[list[int], list[int]]:
        """Rank 0's sampled ids and finite flags on every rank (one broadcast of [2, rows])."""
        if sampled is None:
            shared = torch.empty(2, num_rows, dtype=torch.int64, device=self.device)
        else:
            shared = torch.tensor([sampled, finite], dtype=torch.int64, device=self.device)
        sampled, finite = self.parallel.broadcast(shared).tolist()
        return sampled, finite

    @torch.inference_mode()
    def idle_moe_step(self) -> None:
        """A step of a lockstep data-parallel rank with no tokens: each MoE layer, in the
        model's order, serves the other ranks' tokens (`FusedMoE.forward_across_data_parallel`
        with none of its own), so that every rank makes the same collectives."""
        for module in self.moe_layers:
            hidden = torch.empty(0, module.hidden_size, dtype=self.dtype, device=self.device)
            logits = torch.empty(0, module.num_experts, device=self.device)  # float32
            module(hidden, logits)

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        self.ran_model = False
        if self.pooling is not None:
            return self.pooling.execute_model(scheduler_output)
        scheduler_output = self._without_failed(scheduler_output)
        self._update_states(scheduler_output)
        scheduler_output, lora_errored = self._activate_loras(scheduler_output)
        self.failed_req_ids.update(lora_errored)
        if not scheduler_output.num_scheduled_tokens:
            return ModelRunnerOutput(errored_req_ids=lora_errored)
        self.ran_model = True
        states, input_ids, positions, metadata, sample_rows, prompt_jobs = self._prepare_inputs(
            scheduler_output
        )
        hidden_states = None
        lora_step = self.lora is not None and bool(self.lora.step.groups)
        if self.kv_scales_pending:
            # calculate_kv_scales: this first step's keys and values set each layer's scales,
            # in the model's own forward (vLLM's rule too)
            self.kv_scales_pending = False
            for layer in self.attention_layers:
                layer.calculate_kv_scales = True
            hidden_states = self.model(input_ids, positions, metadata)
        elif (
            self.cuda_graphs is not None
            and not lora_step  # graphs are captured without adapters
            and self.cuda_graphs.can_replay(len(input_ids), metadata)
        ):
            hidden_states = self.cuda_graphs.replay(input_ids, positions, metadata)
        elif self.cpu_decode is not None and self.cpu_decode.can_run(
            input_ids, positions, metadata
        ):
            # None when a kernel refused the step: the forward below makes its KV writes again.
            # With an adapter in the step the layers run one by one, adding its deltas.
            hidden_states = self.cpu_decode.run(input_ids, positions, metadata, lora=lora_step)
        if hidden_states is None:
            hidden_states = self.model(input_ids, positions, metadata)
        output = ModelRunnerOutput(errored_req_ids=lora_errored)
        if prompt_jobs:
            output.prompt_logprobs = self._prompt_logprobs(hidden_states, prompt_jobs)
        if not states:
            return output
        rows = to_device(sample_rows, self.device, torch.int64)
        logits = self.model.compute_logits(hidden_states.index_select(0, rows))
        sampled = finite = logprobs = None
        if logits is not None:  # rank 0
            sampled, finite, logprobs = self._sample(logits, states, scheduler_output)
        if self.parallel.world_size > 1:
            sampled, finite = self._share_sampled(sampled, finite, len(states))
        if not all(finite):
            errored_states = [state for state, ok in zip(states, finite) if not ok]
            scrub_nonfinite_blocks(self.kv_caches, [s.block_ids for s in errored_states])
            for state in errored_states:
                self.requests.pop(state.req_id, None)
                self.failed_req_ids.add(state.req_id)
            output.errored_req_ids = lora_errored + [s.req_id for s in errored_states]
            keep = [row for row, ok in enumerate(finite) if ok]
            states = [states[row] for row in keep]
            sampled = [sampled[row] for row in keep]
            if logprobs is not None:
                logprobs = LogprobsLists(
                    [logprobs.token_ids[row] for row in keep],
                    [logprobs.logprobs[row] for row in keep],
                    [logprobs.ranks[row] for row in keep],
                )
        for state, token_id in zip(states, sampled):
            state.token_ids.append(token_id)
        output.req_ids = [s.req_id for s in states]
        output.sampled_token_ids = sampled
        output.logprobs = logprobs
        return output


def _to_lists(
    tensors: LogprobsTensors, states: list[CachedRequestState] | None = None
) -> LogprobsLists:
    """To plain lists; with `states`, each row keeps only the chosen token and the top
    `logprobs` of its own request (none for a request that asked for none)."""
    lists = LogprobsLists(
        tensors.token_ids.tolist(), tensors.logprobs.tolist(), tensors.ranks.tolist()
    )
    if states is not None:
        for row, state in enumerate(states):
            num_logprobs = state.sampling_params.logprobs
            keep = 0 if num_logprobs is None else len(lists.token_ids[row])
            if num_logprobs is not None and num_logprobs >= 0:
                keep = num_logprobs + 1
            lists.token_ids[row] = lists.token_ids[row][:keep]
            lists.logprobs[row] = lists.logprobs[row][:keep]
    return lists
