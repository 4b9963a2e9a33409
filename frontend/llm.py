"""`LLM`: vLLM's offline entry point. Tokenizes and checks inputs here, in the user's process,
then runs requests on an engine-core process and turns its tokens into `RequestOutput`s."""

from __future__ import annotations

import itertools
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import msgspec
from tqdm.auto import tqdm

from ember.beam_search import BeamSearchOutput, BeamSearchParams, run_beam_search
from ember.chat_content import load_chat_template
from ember.chat_utils import ChatMixin
from ember.core_client import EngineCoreClient
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
from ember.metrics import EngineMetrics
from ember.metrics_reader import MetricsList, read_metrics
from ember.output_processor import OutputProcessor, ParentRequest
from ember.outputs import RequestOutput
from ember.pooling_api import PoolingMixin
from ember.stat_logger import LoggingStatLogger
from ember.structured_outputs import check_structured_outputs
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
        # vLLM's other engine arguments: checked (no effect, or NotImplementedError), then
        # dropped; a name vLLM does not have either raises TypeError.
        kwargs = ember_engine_kwargs(kwargs, EngineArgs.field_names())
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
        # The tokenizer loads on a thread while the engine starts (the wait for the engine
        # releases the GIL): cold start is the longer of the two, not their sum.
        with ThreadPoolExecutor(max_workers=1) as pool:
            tokenizer = None
            if not skip_tokenizer_init:
                tokenizer = pool.submit(
                    load_tokenizer,
                    self.config.model.tokenizer,
                    use_fast=tokenizer_mode != "slow",
                    trust_remote_code=trust_remote_code,
                    revision=revision,
                )
            self.engine = EngineCoreClient(self.config)
            try:
                self.tokenizer = None if tokenizer is None else tokenizer.result()
            except BaseException:
                self.engine.shutdown()
                raise
        self.max_model_len = self.engine.ready_info.max_model_len
        self.vocab_size = self.engine.ready_info.vocab_size
        self.max_logprobs = self.engine.ready_info.max_logprobs
        self._request_counter = itertools.count()
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
                use_fast=tokenizer_mode != "slow",
                trust_remote_code=trust_remote_code,
                revision=revision,
            )
        # Request ids must not collide with other clients' ids in the shared engine.
        prefix = self.engine.identity.hex()
        self._request_counter = (f"{prefix}-{i}" for i in itertools.count())

    # ---- lifecycle ---------------------------------------------------------------------

    def shutdown(self) -> None:
        """Stop the engine-core and worker processes and release their resources."""
        self.engine.shutdown()
        self._metrics.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()

    def get_tokenizer(self) -> Any:
        return self.tokenizer

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
    ) -> list[RequestOutput]:
        """Generate completions for `prompts`; the outputs come back in input order.
        `sampling_params=None` means `get_default_sampling_params()`; `priority` (one or one
        per prompt) orders requests under `LLM(scheduling_policy="priority")`;
        `tokenization_kwargs` (e.g. `{"truncation": True, "max_length": 512}`) as vLLM reads
        them, see `ember.inputs.tokenize_options`."""
        if lora_request is not None:
            raise NotImplementedError("lora_request is not supported yet")
        if self.engine.ready_info.runner == "pooling":
            raise ValueError(
                "generate() needs a generative model; this is a pooling model: "
                "use encode(), embed(), classify() or score()"
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
        processed = []
        for index, (prompt, request_params) in enumerate(zip(prompt_list, params)):
            item = tokenize_prompt(prompt, self.tokenizer, index, options)
            truncate_prompt(item, request_params, self.max_model_len)
            check_prompt(item, index, self.max_model_len, self.vocab_size)
            processed.append(item)
        if not processed:
            return []
        check_structured_outputs(self.engine, params)
        return self._run_requests(processed, params, use_tqdm, priorities)

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
        if lora_request is not None:
            raise NotImplementedError("lora_request is not supported yet")
        return run_beam_search(self, prompts, params, use_tqdm, concurrency_limit)

    def _run_requests(
        self,
        processed: list[ProcessedPrompt],
        params: list[SamplingParams],
        use_tqdm: bool,
        priorities: list[int] | None = None,
    ) -> list[RequestOutput]:
        """Send checked prompts to the engine and gather their outputs, in input order. A
        prompt with n > 1 becomes n child requests (child i seeded with seed + i) that share
        the prompt's cached KV blocks."""
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
                    )
                )
        results: list[RequestOutput | None] = [None] * len(processed)
        progress = _Progress(len(processed), use_tqdm)
        try:
            self.engine.add_requests(requests)
            while processor.states:
                outputs = self.engine.get_outputs(timeout_s=_OUTPUT_POLL_S)
                if self._stat_logger is not None:
                    self._stat_logger.maybe_log()
                if outputs is None:
                    continue
                if outputs.scheduler_stats is not None:
                    self._metrics.update_scheduler_stats(outputs.scheduler_stats)
                finished, to_abort = processor.process(outputs.outputs)
                self.engine.abort_requests(to_abort)
                for output in finished:
                    results[order[output.request_id]] = output
                    progress.update(output)
        except BaseException:
            # Ctrl-C or a dead engine: nothing of this call may keep running in the engine.
            pending = processor.abort_all()
            if self.engine.is_alive():
                self.engine.abort_requests(pending)
            raise
        finally:
            progress.close()
        return results


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
