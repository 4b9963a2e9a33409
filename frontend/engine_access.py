"""`LLM`'s access to its engine, with vLLM's names: `llm_engine`, `model_config`,
`supported_tasks`, `collective_rpc`, `apply_model`, `sleep` / `wake_up`, `reset_prefix_cache` and
`start_profile` / `stop_profile`. Mixed into `LLM`; each call is a utility of the engine core.

Functions go to the workers by reference (module and qualified name, as pickle sends a
function), never pickled: no pickle crosses a socket. The configuration views read the engine
core's `EngineConfig` once; they import neither torch nor transformers until `dtype` or
`hf_config` is read.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgspec

from ember.workers.config import EngineConfig, PoolerConfig
from ember.workers.hf_config import HFConfig
from ember.workers.rpc import FunctionRef, reference_to

if TYPE_CHECKING:
    from ember.enginecore.messages import EngineCoreReadyInfo

# collective_rpc: how long past its `timeout` the frontend waits for the engine core's answer.
_RPC_REPLY_MARGIN_S = 30.0
# sleep / wake_up: level 2 reloads the weights, which may take minutes for a large model.
_SLEEP_TIMEOUT_S = 900.0
_WAKE_UP_TAGS = ("weights", "kv_cache", "scheduling")


def supported_tasks(info: EngineCoreReadyInfo) -> tuple[str, ...]:
    """vLLM's `LLM.supported_tasks`: ("generate",) for a generative model, the pooling tasks
    of a pooling model (e.g. ("embed", "token_embed"))."""
    if info.runner == "pooling":
        return tuple(info.pooling_tasks)
    return ("generate",)


def function_reference(func: Callable, argument: str) -> FunctionRef:
    """`func` as the workers can find it (`ember.workers.rpc.reference_to`)."""
    return reference_to(func, argument)


# ---- configuration views -------------------------------------------------------------------


class ModelConfig:
    """vLLM's `ModelConfig`, read-only, from the engine's configuration. `dtype` is a
    torch.dtype and `hf_config` a transformers config, as in vLLM: each imports its package
    when first read (the user's process needs neither before)."""

    def __init__(self, config: EngineConfig, tokenizer_mode: str, skip_tokenizer_init: bool):
        model = config.model
        self._model_config = model
        self._hf_view: HFConfig | None = None
        self._hf_config: Any = None
        self.model = model.model
        self.served_model_name = model.model
        self.tokenizer = model.tokenizer
        self.tokenizer_mode = tokenizer_mode
        self.skip_tokenizer_init = skip_tokenizer_init
        self.trust_remote_code = model.trust_remote_code
        self.revision = model.revision
        self.seed = model.seed
        self.max_model_len = model.max_model_len
        self.max_logprobs = model.max_logprobs
        self.quantization = model.quantization
        self.runner_type = model.runner
        self.convert_type = model.convert
        self.pooler_config: PoolerConfig | None = model.pooler
        self.enforce_eager = config.device.enforce_eager
        self.enable_sleep_mode = model.enable_sleep_mode
        self.architectures = [model.architecture]
        self.architecture = model.architecture
        self.is_multimodal_model = False
        self.is_encoder_decoder = False

    def __repr__(self) -> str:
        return f"ModelConfig(model={self.model!r}, dtype={self._model_config.dtype!r})"

    @property
    def dtype(self) -> Any:
        """The compute dtype as a torch.dtype (vLLM's type); imports torch."""
        import torch

        return getattr(torch, self._model_config.dtype)

    @property
    def hf_config(self) -> Any:
        """The model's Hugging Face config (a transformers `PretrainedConfig`)."""
        if self._hf_config is None:
            self._hf_config = self._hf().to_transformers()
        return self._hf_config

    @property
    def hf_text_config(self) -> Any:
        return getattr(self.hf_config, "text_config", None) or self.hf_config

    def _hf(self) -> HFConfig:
        """The config's fields without transformers (ember's snapshot of it)."""
        if self._hf_view is None:
            view = HFConfig(self._model_config.hf_config)
            self._hf_view = getattr(view, "text_config", None) or view
        return self._hf_view

    def get_vocab_size(self) -> int:
        return self._model_config.vocab_size

    def get_hidden_size(self) -> int:
        return self._hf().hidden_size

    def get_head_size(self) -> int:
        hf = self._hf()
        return getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads

    def get_total_num_kv_heads(self) -> int:
        hf = self._hf()
        return getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads

    def get_num_kv_heads(self, parallel_config: Any) -> int:
        return max(1, self.get_total_num_kv_heads() // parallel_config.tensor_parallel_size)

    def get_num_attention_heads(self, parallel_config: Any) -> int:
        return self._hf().num_attention_heads // parallel_config.tensor_parallel_size

    def get_total_num_hidden_layers(self) -> int:
        return self._hf().num_hidden_layers

    def get_num_layers(self, parallel_config: Any) -> int:
        return self.get_total_num_hidden_layers()  # no pipeline parallelism

    def get_sliding_window(self) -> int | None:
        return getattr(self._hf(), "sliding_window", None)


@dataclasses.dataclass(frozen=True, slots=True)
class CacheConfigView:
    """vLLM's `CacheConfig` fields that scripts read: the KV capacity the engine found."""

    block_size: int
    num_gpu_blocks: int | None
    num_cpu_blocks: int | None
    enable_prefix_caching: bool
    gpu_memory_utilization: float
    swap_space: float
    kv_cache_memory_bytes: int | None
    cache_dtype: str = "auto"  # kv_cache_dtype
    calculate_kv_scales: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class ParallelConfigView:
    tensor_parallel_size: int
    pipeline_parallel_size: int = 1
    data_parallel_size: int = 1
    distributed_executor_backend: str = "mp"

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def world_size_across_dp(self) -> int:
        return self.world_size * self.data_parallel_size


@dataclasses.dataclass(frozen=True, slots=True)
class SchedulerConfigView:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    long_prefill_token_threshold: int
    async_scheduling: bool = False
    enable_chunked_prefill: bool = True


@dataclasses.dataclass(frozen=True, slots=True)
class DeviceConfigView:
    device_type: str

    @property
    def device(self) -> Any:
        import torch

        return torch.device(self.device_type)


@dataclasses.dataclass(frozen=True, slots=True)
class VllmConfig:
    """vLLM's `VllmConfig`: the sub-configs scripts read (`llm.llm_engine.vllm_config`)."""

    model_config: ModelConfig
    cache_config: CacheConfigView
    parallel_config: ParallelConfigView
    scheduler_config: SchedulerConfigView
    device_config: DeviceConfigView


def vllm_config(
    config: EngineConfig, model_config: ModelConfig, data_parallel_size: int = 1
) -> VllmConfig:
    cache, scheduler = config.cache, config.scheduler
    return VllmConfig(
        model_config=model_config,
        cache_config=CacheConfigView(
            block_size=cache.block_size,
            num_gpu_blocks=cache.num_kv_blocks,
            num_cpu_blocks=None,
            enable_prefix_caching=cache.enable_prefix_caching,
            gpu_memory_utilization=cache.gpu_memory_utilization,
            swap_space=cache.swap_space_gib,
            kv_cache_memory_bytes=cache.kv_cache_memory_bytes,
            cache_dtype=cache.cache_dtype,
            calculate_kv_scales=cache.calculate_kv_scales,
        ),
        parallel_config=ParallelConfigView(
            config.parallel.tensor_parallel_size, data_parallel_size=data_parallel_size
        ),
        scheduler_config=SchedulerConfigView(
            max_num_seqs=scheduler.max_num_seqs,
            max_num_batched_tokens=scheduler.max_num_batched_tokens,
            max_model_len=scheduler.max_model_len,
            long_prefill_token_threshold=scheduler.long_prefill_token_threshold,
            async_scheduling=scheduler.async_scheduling,
        ),
        device_config=DeviceConfigView(config.device.device),
    )


class LLMEngine:
    """`llm.llm_engine`: what vLLM scripts read from vLLM's `LLMEngine`, answered by the
    `LLM` (ember's engine is the engine-core process behind it)."""

    def __init__(self, llm: EngineAccessMixin):
        self._llm = llm

    @property
    def model_config(self) -> ModelConfig:
        return self._llm.model_config

    @property
    def vllm_config(self) -> VllmConfig:
        return self._llm._vllm_config()

    @property
    def tokenizer(self) -> Any:
        return self._llm.get_tokenizer()

    def get_tokenizer(self) -> Any:
        return self._llm.get_tokenizer()

    def get_model_config(self) -> ModelConfig:
        return self._llm.model_config

    def get_supported_tasks(self) -> tuple[str, ...]:
        return self._llm.supported_tasks

    def get_num_unfinished_requests(self) -> int:
        return 0  # LLM's calls run to completion: between them nothing is left

    def has_unfinished_requests(self) -> bool:
        return False

    def collective_rpc(
        self,
        method: str | Callable,
        timeout: float | None = None,
        args: tuple = (),
        kwargs: dict[str, Any] | None = None,
    ) -> list[Any]:
        return self._llm.collective_rpc(method, timeout, args, kwargs)

    def apply_model(self, func: Callable) -> list[Any]:
        return self._llm.apply_model(func)

    def reset_prefix_cache(
        self, reset_running_requests: bool = False, reset_connector: bool = False
    ) -> bool:
        return self._llm.reset_prefix_cache(reset_running_requests, reset_connector)

    def sleep(self, level: int = 1, mode: str = "abort") -> None:
        self._llm.sleep(level, mode)

    def wake_up(self, tags: list[str] | None = None) -> bool:
        return self._llm.wake_up(tags)

    def is_sleeping(self) -> bool:
        return bool(self._llm.engine.call_utility("is_sleeping"))

    def start_profile(
        self,
        profile_prefix: str | None = None,
        *,
        delay_iterations: int | None = None,
        max_iterations: int | None = None,
    ) -> None:
        self._llm.start_profile(
            profile_prefix, delay_iterations=delay_iterations, max_iterations=max_iterations
        )

    def stop_profile(self) -> list[str]:
        return self._llm.stop_profile()

    def get_metrics(self) -> Any:
        return self._llm.get_metrics()


# ---- the methods of LLM --------------------------------------------------------------------


class EngineAccessMixin:
    """The engine-access methods of `LLM` (they use its `engine` client)."""

    @property
    def llm_engine(self) -> LLMEngine:
        return LLMEngine(self)

    @property
    def model_config(self) -> ModelConfig:
        cached = self.__dict__.get("_model_config_view")
        if cached is None:
            args = getattr(self, "engine_args", None)
            cached = ModelConfig(
                self._engine_config(),
                tokenizer_mode=args.tokenizer_mode if args is not None else "auto",
                skip_tokenizer_init=self.get_tokenizer() is None,
            )
            self.__dict__["_model_config_view"] = cached
        return cached

    def _engine_config(self) -> EngineConfig:
        """The engine core's configuration (with its KV capacity), asked for once."""
        cached = self.__dict__.get("_engine_config_cache")
        if cached is None:
            cached = msgspec.convert(self.engine.call_utility("get_engine_config"), EngineConfig)
            self.__dict__["_engine_config_cache"] = cached
        return cached

    def _vllm_config(self) -> VllmConfig:
        return vllm_config(self._engine_config(), self.model_config, self._data_parallel_size())

    def _data_parallel_size(self) -> int:
        """The replicas behind this LLM (data_parallel_size), or VLLM_DP_SIZE for one rank of
        a group the environment joins; 1 otherwise."""
        dp_rank = getattr(self, "_dp_rank", None)
        if dp_rank is not None:
            return dp_rank.env.size
        return getattr(self.engine, "data_parallel_size", 1)

    @property
    def supported_tasks(self) -> tuple[str, ...]:
        return supported_tasks(self.engine.ready_info)

    @property
    def runner_type(self) -> str:
        return self.engine.ready_info.runner

    def get_world_size(self, include_dp: bool = True) -> int:
        """The number of worker ranks: tensor_parallel_size, times the data-parallel size
        when `include_dp` (vLLM's; ember has no pipeline parallelism)."""
        parallel = self._vllm_config().parallel_config
        return parallel.world_size_across_dp if include_dp else parallel.world_size

    # ---- collective_rpc / apply_model --------------------------------------------------

    def collective_rpc(
        self,
        method: str | Callable,
        timeout: float | None = None,
        args: tuple = (),
        kwargs: dict[str, Any] | None = None,
    ) -> list[Any]:
        """Run `method` on every worker rank and return the results, one per rank (vLLM's).

        `method`: the name of a public method of ember's `Worker` (`workers/worker.py`), or a
        function `f(worker, *args, **kwargs)` defined at the top level of an importable
        module: it is sent by reference, never pickled. Arguments and results must be plain
        data (msgspec: numbers, strings, lists, dicts, ...). `timeout` (seconds, None: no
        limit): past it TimeoutError, and the engine goes on.
        """
        if method == "apply_model" and len(args) == 1 and not kwargs and callable(args[0]):
            return self.apply_model(args[0])  # what vLLM's LLMEngine.apply_model sends
        if isinstance(method, str):
            spec: str | FunctionRef = method
        elif callable(method):
            spec = function_reference(method, "method")
        else:
            raise TypeError(f"method must be a str or a callable, got {type(method).__name__}")
        return self._collective_rpc(spec, timeout, args, kwargs)

    def apply_model(self, func: Callable) -> list[Any]:
        """`func(model)` on every rank's model (an `nn.Module`), the results one per rank
        (vLLM's). `func` goes by reference, as `collective_rpc`'s functions do."""
        if not callable(func):
            raise TypeError(f"func must be a callable, got {type(func).__name__}")
        spec = function_reference(func, "func")
        spec.on_model = True
        return self._collective_rpc(spec, None, (), None)

    def _collective_rpc(
        self,
        spec: str | FunctionRef,
        timeout: float | None,
        args: tuple,
        kwargs: dict[str, Any] | None,
    ) -> list[Any]:
        if timeout is not None and (
            not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or timeout <= 0
        ):
            raise ValueError(
                f"timeout must be a positive number of seconds or None, got {timeout!r}"
            )
        if not isinstance(args, (tuple, list)):
            raise TypeError(f"args must be a tuple, got {type(args).__name__}")
        if kwargs is not None and (
            not isinstance(kwargs, dict) or not all(isinstance(key, str) for key in kwargs)
        ):
            raise TypeError(f"kwargs must be a dict of str keys or None, got {kwargs!r}")
        try:
            msgspec.msgpack.encode([list(args), kwargs or {}])
        except TypeError as exc:
            raise TypeError(
                f"args and kwargs must be plain data (numbers, strings, lists, dicts): {exc}"
            ) from None
        wait_s = float("inf") if timeout is None else timeout + _RPC_REPLY_MARGIN_S
        results = self.engine.call_utility(
            "collective_rpc", spec, timeout, list(args), kwargs or {}, timeout_s=wait_s
        )
        return list(results)

    # ---- sleep mode --------------------------------------------------------------------

    def sleep(self, level: int = 1, mode: str = "abort") -> None:
        """vLLM's sleep levels. 0: scheduling pauses. 1: the KV cache is released (its
        contents are lost) and on a GPU the weights move to host memory; on CPU, where they
        already are, they stay. 2: the KV cache and the weights are released; `wake_up`
        loads the weights from the checkpoint again. Levels 1 and 2 need
        `LLM(enable_sleep_mode=True)`. Until `wake_up`, a request raises RuntimeError."""
        self.engine.call_utility("sleep", level, mode, timeout_s=_SLEEP_TIMEOUT_S)
        self.engine.asleep = f"LLM.sleep(level={level})"

    def wake_up(self, tags: list[str] | None = None) -> bool:
        """Bring back `tags` ("weights", "kv_cache", "scheduling"; None: everything); True
        once the engine is fully awake (it then takes requests again)."""
        if tags is not None and (
            not isinstance(tags, (list, tuple)) or any(tag not in _WAKE_UP_TAGS for tag in tags)
        ):
            raise ValueError(f"tags must be None or a list of {_WAKE_UP_TAGS}, got {tags!r}")
        wanted = None if tags is None else list(tags)
        fully_awake = bool(self.engine.call_utility("wake_up", wanted, timeout_s=_SLEEP_TIMEOUT_S))
        if fully_awake:
            self.engine.asleep = None
        return fully_awake

    # ---- caches and profiling ------------------------------------------------------------

    def reset_prefix_cache(
        self, reset_running_requests: bool = False, reset_connector: bool = False
    ) -> bool:
        """Forget every block in the engine's prefix cache (vLLM's method); False, with
        nothing done, while requests still hold blocks, unless `reset_running_requests`
        (they are then preempted and recomputed). ember has no KV connector to reset."""
        return bool(
            self.engine.call_utility("reset_prefix_cache", reset_running_requests, reset_connector)
        )

    def start_profile(
        self,
        profile_prefix: str | None = None,
        *,
        delay_iterations: int | None = None,
        max_iterations: int | None = None,
        profile_dir: str | None = None,
    ) -> None:
        """Trace the engine core's loop and every worker (torch.profiler) until
        `stop_profile`: after `delay_iterations` engine steps, for at most `max_iterations`
        (vLLM's arguments). The traces, one file per process named
        `[<profile_prefix>_]ember-<process>.trace.json`, go to `profile_dir`, else
        `LLM(profile_dir=...)`.

        ember's earlier form `start_profile(profile_dir)` still works: a first argument with
        a path separator, or one given when no directory is configured, is the directory."""
        if (
            profile_prefix is not None
            and profile_dir is None
            and (os.sep in profile_prefix or "/" in profile_prefix or self.profile_dir is None)
        ):
            profile_dir, profile_prefix = profile_prefix, None
        profile_dir = profile_dir or self.profile_dir
        if profile_dir is None:
            raise ValueError(
                "start_profile needs a directory for the traces: "
                "start_profile(profile_dir=...) or LLM(profile_dir=...)"
            )
        self.engine.call_utility(
            "start_profile",
            os.path.abspath(profile_dir),
            profile_prefix,
            delay_iterations,
            max_iterations,
        )

    def stop_profile(self) -> list[str]:
        """Stop tracing; return the paths of the trace files written."""
        return self.engine.call_utility("stop_profile", timeout_s=300.0)
