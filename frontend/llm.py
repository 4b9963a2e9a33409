"""`LLM`: vLLM's offline entry point. Tokenizes and checks inputs here, in the user's process,
then runs requests on an engine-core process and turns its tokens into `RequestOutput`s."""

from __future__ import annotations

import functools
import itertools
import os
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import msgspec
from tqdm.auto import tqdm

from ember.beam_search import BeamSearchOutput, BeamSearchParams, run_beam_search
from ember.chat_content import load_chat_template
from ember.chat_utils import ChatMixin
from ember.core_client import EngineCoreClient
from ember.data_parallel import (
    DataParallelRank,
    check_data_parallel,
    leave_at_exit,
    leave_quietly,
    start_engine,
    wait_until_lockstep_idle,
    with_lockstep,
)
from ember.engine_access import EngineAccessMixin
from ember.enginecore.arg_utils import EngineArgs
from ember.enginecore.generation_config import log_sampling_defaults
from ember.enginecore.messages import EngineCoreRequest
from ember.enginecore.stats import SchedulerStats
from ember.enginecore.vllm_engine_args import ember_engine_kwargs
from ember.inputs import (
    EngineLimits,
    ProcessedPrompt,
    check_prompt,
    normalize_prompts,
    per_prompt_params,
    tokenize_options,
    tokenize_prompt,
    truncate_prompt,
)
from ember.lora.resolve import lora_requests_per_prompt
from ember.metrics import EngineMetrics
from ember.metrics_reader import MetricsList, read_metrics
from ember.output_processor import OutputProcessor, ParentRequest
from ember.outputs import RequestOutput
from ember.pooling_api import PoolingMixin
from ember.stat_logger import LoggingStatLogger
from ember.structured_outputs import check_structured_outputs
from ember.workers.lora_request import LoRARequest
from ember.workers.sampling_params import SamplingParams
from ember.workers.tokenizer_loader import load_tokenizer

if TYPE_CHECKING:
    from typing_extensions import Self

_OUTPUT_POLL_S = 1.0


class LLM(ChatMixin, PoolingMixin, EngineAccessMixin):
    """An LLM with an engine of its own: `LLM(model).generate(prompts, sampling_params)`.

    Arguments have vLLM's names, meanings and defaults; `model=None` loads ember's embedded
    default model (SmolLM2-135M-Instruct). Extra engine options (`max_num_batched_tokens`,
    `block_size`, `kv_cache_memory_bytes`, `num_threads`, `device`, `load_format`, ...) are
    keyword arguments; an unknown one raises TypeError.

    `data_parallel_size=N` runs N engine replicas behind this LLM (`ember.dp_client`); with
    VLLM_DP_RANK / VLLM_DP_SIZE / VLLM_DP_MASTER_IP / VLLM_DP_MASTER_PORT set, this LLM is one
    rank of a data-parallel group of processes (`ember.data_parallel`).
    """

    def __init__(
        self,
        model: str | None = None,
        *,
        tokenizer: str | None = None,
        tokenizer_mode: str = "auto",
        skip_tokenizer_init: bool = False,
        trust_remote_code: bool = False,
        tensor_parallel_size: int = 1,
        dtype: str = "auto",
        quantization: str | None = None,
        revision: str | None = None,
        seed: int | None = 0,
        gpu_memory_utilization: float = 0.9,
        swap_space: float = 4,
        enforce_eager: bool = False,
        max_model_len: int | None = None,
        max_num_seqs: int = 256,
        chat_template: str | os.PathLike | None = None,
        **kwargs: Any,
    ) -> None:
        # vLLM's: the default template of chat() (a file path or the template itself)
        self.chat_template = load_chat_template(chat_template)
        self.default_sampling_params: dict[str, Any] | None = None  # read on first use
        engine_address = kwargs.pop("engine_address", None)
        engine_token = kwargs.pop("engine_token", None)
        self.profile_dir = kwargs.pop("profile_dir", None)
        disable_log_stats = kwargs.pop("disable_log_stats", True)
        data_parallel_size = kwargs.pop("data_parallel_size", 1)
        self._dp_rank: DataParallelRank | None = None
        # vLLM's other engine arguments: checked (no effect, or NotImplementedError), then
        # dropped; a name vLLM does not have either raises TypeError.
        kwargs = ember_engine_kwargs(kwargs, EngineArgs.field_names())
        dp_env = check_data_parallel(data_parallel_size, engine_address)
        if engine_address is not None:
            self._attach(
                engine_address,
                engine_token,
                model,
                tokenizer,
                tokenizer_mode,
                skip_tokenizer_init,
                trust_remote_code,
                revision,
            )
            self._init_metrics(model or self.engine.ready_info.model, disable_log_stats)
            return
        self.engine_args = EngineArgs(
            model=model,
            tokenizer=tokenizer,
            tokenizer_mode=tokenizer_mode,
            skip_tokenizer_init=skip_tokenizer_init,
            trust_remote_code=trust_remote_code,
            tensor_parallel_size=tensor_parallel_size,
            dtype=dtype,
            quantization=quantization,
            revision=revision,
            seed=seed,
            gpu_memory_utilization=gpu_memory_utilization,
            swap_space=swap_space,
            enforce_eager=enforce_eager,
            max_model_len=max_model_len,
            max_num_seqs=max_num_seqs,
            **kwargs,
        )
        self.config = self.engine_args.create_engine_config()
        self.tokenizer = None
        if dp_env is not None:
            # One rank of a group the VLLM_DP_* environment joins: check in before loading.
            self.config = with_lockstep(self.config, dp_env)
            self._dp_rank = DataParallelRank(dp_env)
            weakref.finalize(self, leave_quietly, self._dp_rank)
            leave_at_exit(self._dp_rank)
        # The tokenizer loads on a thread while the engine starts (the wait for the engine
        # releases the GIL): cold start is the longer of the two, not their sum.
        with ThreadPoolExecutor(max_workers=1) as pool:
            tokenizer = None
            if not skip_tokenizer_init:
                tokenizer = pool.submit(
                    load_tokenizer,
                    self.config.model.tokenizer,
                    tokenizer_mode=tokenizer_mode,
                    trust_remote_code=trust_remote_code,
                    revision=revision,
                )
            try:
                self.engine = start_engine(self.config, data_parallel_size, dp_env)
            except BaseException:
                if self._dp_rank is not None:
                    self._dp_rank.abandon()
                raise
            try:
                self.tokenizer = None if tokenizer is None else tokenizer.result()
            except BaseException:
                self.engine.shutdown()
                raise
        if self._dp_rank is not None and self.config.parallel.lockstep is not None:
            self._dp_rank.before_leaving = functools.partial(wait_until_lockstep_idle, self.engine)
        self.max_model_len = self.engine.ready_info.max_model_len
        self.vocab_size = self.engine.ready_info.vocab_size
        self.max_logprobs = self.engine.ready_info.max_logprobs
        self._request_counter = itertools.count()
        self._enqueued: list[_Batch] = []  # sent by enqueue(), gathered by wait_for_completion
        self._init_metrics(self.config.model.model, disable_log_stats)

    def _init_metrics(self, model_name: str | None, disable_log_stats: bool) -> None:
        """Metrics are always kept (vLLM needs disable_log_stats=False for them); the flag
        only turns on the periodic stats line."""
        self._metrics = EngineMetrics(str(model_name or ""), self.max_model_len)
        self._stat_logger = None if disable_log_stats else LoggingStatLogger(self._metrics)

    def _attach(
        self,
        address,
        token,
        model,
        tokenizer,
        tokenizer_mode,
        skip_tokenizer_init,
        trust_remote_code,
        revision,
    ) -> None:
        """Use a standalone engine core (`python -m ember.enginecore --listen ADDR`): the
        tokenizer and detokenizer stay in this process, the model runs there."""
        self.engine_args = None
        self.config = None
        self.engine = EngineCoreClient(address=address, token=token)
        info = self.engine.ready_info
        self.max_model_len = info.max_model_len
        self.vocab_size = info.vocab_size
        self.max_logprobs = info.max_logprobs
        self.tokenizer = None
        if not skip_tokenizer_init:
            self.tokenizer = load_tokenizer(
                tokenizer or info.tokenizer or model,
                tokenizer_mode=tokenizer_mode,
                trust_remote_code=trust_remote_code,
                revision=revision,
            )
        # Request ids must not collide with other clients' ids in the shared engine.
        prefix = self.engine.identity.hex()
        self._request_counter = (f"{prefix}-{i}" for i in itertools.count())
        self._enqueued = []

    # ---- lifecycle ---------------------------------------------------------------------

    def shutdown(self) -> None:
        """Stop the engine-core and worker processes and release their resources. As one
        rank of a VLLM_DP_* group, then wait for the other ranks (DataParallelError if one
        died)."""
        if self._dp_rank is not None and self._dp_rank.before_leaving is not None:
            try:  # lockstep: the engine serves the other ranks' steps until every rank is done
                self._dp_rank.leave()
            finally:
                self.engine.shutdown()
                self._metrics.close()
            return
        self.engine.shutdown()
        self._metrics.close()
        if self._dp_rank is not None:
            self._dp_rank.leave()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()

    @classmethod
    def from_engine_args(cls, engine_args: EngineArgs) -> LLM:
        """vLLM's: an `LLM` built from every field of `engine_args`."""
        if not isinstance(engine_args, EngineArgs):
            raise TypeError(
                f"engine_args must be an ember EngineArgs, got {type(engine_args).__name__}"
            )
        return cls(**{name: getattr(engine_args, name) for name in EngineArgs.field_names()})

    def get_tokenizer(self) -> Any:
        return self.tokenizer

    def reset_mm_cache(self) -> None:
        """vLLM's; ember serves text-only models, so there is no multimodal cache to clear."""

    def get_default_sampling_params(self) -> SamplingParams:
        """vLLM's: SamplingParams() with the fields the model's generation config sets
        (`LLM(generation_config=..., override_generation_config=...)`: temperature, top_p,
        top_k, min_p, penalties, max_new_tokens as max_tokens); what generate() and chat() use
        when sampling_params is None. The first call logs vLLM's line when they differ."""
        if self.default_sampling_params is None:
            info = self.engine.ready_info
            self.default_sampling_params = dict(info.default_sampling_params)
            log_sampling_defaults(self.default_sampling_params, info.generation_config)
        return SamplingParams(**self.default_sampling_params)

    # start_profile / stop_profile, reset_prefix_cache, collective_rpc, sleep / wake_up,
    # llm_engine, model_config: `ember.engine_access.EngineAccessMixin`.

    def get_metrics(self) -> MetricsList:
        """This engine's metrics as vLLM's reader objects (`Counter`, `Gauge`, `Histogram`),
        with vLLM's `vllm:` names; the list also answers `.get("num_requests_running", 0)`."""
        if self.engine.is_alive():
            stats = self.engine.call_utility("get_scheduler_stats")
            self._metrics.update_scheduler_stats(msgspec.convert(stats, SchedulerStats))
        return read_metrics(self._metrics.registry.collect())

    # ---- generation --------------------------------------------------------------------

    def generate(
        self,
        prompts: Any,
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
        lora_request: Any = None,
        priority: int | list[int] | None = None,
        tokenization_kwargs: dict[str, Any] | None = None,
        mm_processor_kwargs: dict[str, Any] | None = None,
    ) -> list[RequestOutput]:
        """Generate completions for `prompts`; the outputs come back in input order.
        `sampling_params=None` means `get_default_sampling_params()`; `priority` (one or one
        per prompt) orders requests under `LLM(scheduling_policy="priority")`;
        `tokenization_kwargs` (e.g. `{"truncation": True, "max_length": 512}`) as vLLM reads
        them, see `ember.inputs.tokenize_options`."""
        request = self._prepare_generation(
            "generate",
            prompts,
            sampling_params,
            lora_request,
            priority,
            tokenization_kwargs,
            mm_processor_kwargs,
        )
        if request is None:
            return []
        batch = self._send_requests(*request)
        self._gather([batch], use_tqdm)
        return batch.results

    def enqueue(
        self,
        prompts: Any,
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        lora_request: Any = None,
        priority: int | list[int] | None = None,
        use_tqdm: bool = True,
        tokenization_kwargs: dict[str, Any] | None = None,
        mm_processor_kwargs: dict[str, Any] | None = None,
    ) -> list[str]:
        """vLLM's: check `prompts` as `generate` does and send them to the engine without
        waiting; returns their request ids. `wait_for_completion()` gathers the outputs (the
        engine core runs them meanwhile, and a `generate` call in between keeps their outputs
        for it). use_tqdm has nothing to show: sending is one message."""
        request = self._prepare_generation(
            "enqueue",
            prompts,
            sampling_params,
            lora_request,
            priority,
            tokenization_kwargs,
            mm_processor_kwargs,
        )
        if request is None:
            return []
        batch = self._send_requests(*request)
        self._enqueued.append(batch)
        return list(batch.order)

    def wait_for_completion(
        self, output_type: type | tuple[type, ...] | None = None, *, use_tqdm: bool = True
    ) -> list[RequestOutput]:
        """vLLM's: the outputs of every request `enqueue` / `enqueue_chat` sent since the last
        call, once all have finished, in the order they were enqueued (vLLM's request-id
        order). `output_type` checks their type, as vLLM does."""
        batches, self._enqueued = self._enqueued, []
        self._gather(batches, use_tqdm)
        results = [output for batch in batches for output in batch.results]
        if output_type is not None:
            for output in results:
                if not isinstance(output, output_type):
                    raise TypeError(
                        f"wait_for_completion: expected {output_type}, got {type(output).__name__}"
                    )
        return results

    def _prepare_generation(
        self,
        caller: str,
        prompts: Any,
        sampling_params: SamplingParams | list[SamplingParams] | None,
        lora_request: Any,
        priority: int | list[int] | None,
        tokenization_kwargs: dict[str, Any] | None,
        mm_processor_kwargs: dict[str, Any] | None,
    ) -> tuple | None:
        """Everything `generate` and `enqueue` check before any work: the arguments of
        `_send_requests`, or None when there are no prompts."""
        if self.engine.ready_info.runner == "pooling":
            raise ValueError(
                f"{caller}() needs a generative model; this is a pooling model: "
                "use encode(), embed(), classify() or score()"
            )
        if mm_processor_kwargs is not None:
            raise NotImplementedError(
                "mm_processor_kwargs is not supported: ember runs text-only models"
            )
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        options = tokenize_options(tokenization_kwargs, self.max_model_len)
        prompt_list = normalize_prompts(prompts)
        limits = EngineLimits(
            self.vocab_size, self.max_model_len, self.max_logprobs, self.tokenizer
        )
        params = per_prompt_params(sampling_params, len(prompt_list), limits)
        priorities = priority_per_prompt(priority, len(prompt_list))
        loras = lora_requests_per_prompt(lora_request, len(prompt_list), self.engine.ready_info)
        processed = []
        for index, (prompt, request_params) in enumerate(zip(prompt_list, params)):
            item = tokenize_prompt(prompt, self.tokenizer, index, options)
            truncate_prompt(item, request_params, self.max_model_len)
            check_prompt(item, index, self.max_model_len, self.vocab_size)
            processed.append(item)
        if not processed:
            return None
        check_structured_outputs(self.engine, params)
        return processed, params, priorities, loras

    def beam_search(
        self,
        prompts: list[Any],
        params: BeamSearchParams,
        lora_request: Any = None,
        use_tqdm: bool = False,
        concurrency_limit: int | None = None,
    ) -> list[BeamSearchOutput]:
        """vLLM's beam search: `beam_width` sequences per prompt, extended one token a step
        by their top 2 × beam_width next tokens; see `ember.beam_search`."""
        return run_beam_search(self, prompts, params, use_tqdm, concurrency_limit, lora_request)

    def _run_requests(
        self,
        processed: list[ProcessedPrompt],
        params: list[SamplingParams],
        use_tqdm: bool,
        priorities: list[int] | None = None,
        loras: list[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        """Send checked prompts to the engine and gather their outputs, in input order."""
        batch = self._send_requests(processed, params, priorities, loras)
        self._gather([batch], use_tqdm)
        return batch.results

    def _send_requests(
        self,
        processed: list[ProcessedPrompt],
        params: list[SamplingParams],
        priorities: list[int] | None = None,
        loras: list[LoRARequest | None] | None = None,
    ) -> _Batch:
        """Send checked prompts to the engine. A prompt with n > 1 becomes n child requests
        (child i seeded with seed + i) that share the prompt's cached KV blocks. `loras`: each
        prompt's adapter (checked)."""
        processor = OutputProcessor(self.tokenizer, self._metrics)
        requests, order = [], {}
        now = time.time()
        for index, (item, request_params) in enumerate(zip(processed, params)):
            request_id = str(next(self._request_counter))
            order[request_id] = index
            parent = None if request_params.n == 1 else ParentRequest(request_id, request_params.n)
            for child_index, child_params in enumerate(_child_params(request_params)):
                child_id = request_id if parent is None else f"{child_index}_{request_id}"
                processor.add_request(
                    child_id,
                    item.prompt,
                    item.prompt_token_ids,
                    child_params,
                    now,
                    child_index,
                    parent,
                )
                requests.append(
                    EngineCoreRequest(
                        child_id,
                        item.prompt_token_ids,
                        child_params,
                        now,
                        item.cache_salt,
                        priority=0 if priorities is None else priorities[index],
                        lora_request=None if loras is None else loras[index],
                    )
                )
        self.engine.add_requests(requests)
        return _Batch(processor, order, loras, [None] * len(processed))

    def _gather(self, batches: list[_Batch], use_tqdm: bool) -> None:
        """Read the engine's outputs until every request of `batches` has finished, filling
        their results. Outputs of requests `enqueue` sent are kept for `wait_for_completion`."""
        progress = _Progress(sum(len(batch.results) for batch in batches), use_tqdm)
        readers = batches + [batch for batch in self._enqueued if batch not in batches]
        try:
            while any(batch.processor.states for batch in batches):
                outputs = self.engine.get_outputs(timeout_s=_OUTPUT_POLL_S)
                if self._stat_logger is not None:
                    self._stat_logger.maybe_log()
                if outputs is None:
                    continue
                if outputs.scheduler_stats is not None:
                    self._metrics.update_scheduler_stats(outputs.scheduler_stats)
                for batch in readers:
                    for output in batch.process(outputs.outputs, self.engine):
                        if batch in batches:
                            progress.update(output)
        except BaseException:
            # Ctrl-C or a dead engine: nothing of this call may keep running in the engine.
            for batch in batches:
                pending = batch.processor.abort_all()
                if self.engine.is_alive():
                    self.engine.abort_requests(pending)
            raise
        finally:
            progress.close()


class _Batch:
    """The requests one call sent to the engine, and their outputs as they finish (results in
    input order)."""

    def __init__(
        self,
        processor: OutputProcessor,
        order: dict[str, int],
        loras: list[LoRARequest | None] | None,
        results: list[RequestOutput | None],
    ):
        self.processor = processor
        self.order = order  # request id -> index in the call's input
        self.loras = loras
        self.results = results

    def process(self, outputs: list, engine: EngineCoreClient) -> list[RequestOutput]:
        """Apply one step's outputs (others' requests are passed over); returns the outputs
        of this batch's requests that finished."""
        finished, to_abort = self.processor.process(outputs)
        engine.abort_requests(to_abort)
        for output in finished:
            index = self.order[output.request_id]
            output.lora_request = None if self.loras is None else self.loras[index]
            self.results[index] = output
        return finished


def priority_per_prompt(priority: int | list[int] | None, num_prompts: int) -> list[int]:
    """vLLM's `priority` argument: None (0 for all), one int, or one int per prompt."""
    if priority is None:
        return [0] * num_prompts
    values = [priority] * num_prompts if isinstance(priority, int) else priority
    if not isinstance(values, (list, tuple)) or any(
        isinstance(v, bool) or not isinstance(v, int) for v in values
    ):
        raise TypeError(f"priority must be an int or a list of int, got {type(priority).__name__}")
    if len(values) != num_prompts:
        raise ValueError(
            f"The lengths of prompts ({num_prompts}) and priority ({len(values)}) must be the same."
        )
    return list(values)


def _child_params(params: SamplingParams) -> list[SamplingParams]:
    """The parameters of each of a prompt's n sequences (vLLM's parallel sampling)."""
    if params.n == 1:
        return [params]
    children = []
    for index in range(params.n):
        child = params.clone()
        child.n = 1
        if params.seed is not None:
            child.seed = params.seed + index
        children.append(child)
    return children


class _Progress:
    """vLLM's progress bar: processed prompts, and input / output tokens per second."""

    def __init__(self, total: int, enabled: bool):
        self.bar = tqdm(
            total=total, desc="Processed prompts", dynamic_ncols=True, disable=not enabled
        )
        self.start = time.perf_counter()
        self.input_tokens = 0
        self.output_tokens = 0

    def update(self, output: RequestOutput) -> None:
        self.input_tokens += len(output.prompt_token_ids or ())
        self.output_tokens += sum(len(c.token_ids) for c in output.outputs)
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        self.bar.set_postfix_str(
            f"est. speed input: {self.input_tokens / elapsed:.2f} toks/s, "
            f"output: {self.output_tokens / elapsed:.2f} toks/s",
            refresh=False,
        )
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
