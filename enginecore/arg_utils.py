"""`EngineArgs`: every engine option in one place, with vLLM's names and defaults, turned once
into the frozen `EngineConfig` that every process reads."""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from ember.enginecore.checkpoint_quantization import (
    QUANTIZATION_VALUES,
    resolve_checkpoint_quantization,
)
from ember.enginecore.generation_config import (
    diff_sampling_params,
    generation_config_source,
    override_fields,
    read_generation_config,
)
from ember.enginecore.pooling_config import (
    pooler_config,
    resolve_runner,
    sentence_transformers_max_seq_length,
)
from ember.enginecore.vllm_engine_args import log_no_effect
from ember.kernels.cpu_features import packed_kernels
from ember.workers.config import (
    EXPERT_PLACEMENT_STRATEGIES,
    CacheConfig,
    DeviceConfig,
    EngineConfig,
    LoRAConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
    StructuredOutputsConfig,
)
from ember.workers.hf_config import HFConfig, load_hf_config, rope_parameters
from ember.workers.logits_processor import processor_reference
from ember.workers.model_loader.resolve import resolve_model, resolve_tokenizer
from ember.workers.models.registry import resolve_architecture

_DTYPE_NAMES = {
    "float32": "float32",
    "float": "float32",
    "bfloat16": "bfloat16",
    "float16": "float16",
    "half": "float16",
}
_LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")
_LOGPROBS_MODES = ("raw_logprobs", "raw_logits", "processed_logprobs", "processed_logits")
# vLLM's tokenizer modes that need its own tokenizer classes.
_UNSUPPORTED_TOKENIZER_MODES = (
    "deepseek_v32",
    "deepseek_v4",
    "inkling",
    "kimi_k3",
    "cohere",
    "custom",
)
_MAX_LEN_KEYS = (  # vLLM's list
    "max_position_embeddings",
    "n_positions",
    "max_seq_len",
    "seq_length",
    "max_target_positions",
    "max_sequence_length",
    "max_seq_length",
    "seq_len",
)


@dataclass
class EngineArgs:
    model: str | None = None  # None = the embedded default model
    tokenizer: str | None = None
    tokenizer_mode: str = "auto"
    skip_tokenizer_init: bool = False
    trust_remote_code: bool = False
    tensor_parallel_size: int = 1
    # None or "mp": worker processes, ember's only executor ("uni" is accepted at TP=1 and runs
    # the same); vLLM's "ray" and "external_launcher" raise NotImplementedError.
    distributed_executor_backend: str | None = None
    disable_custom_all_reduce: bool = False  # accepted: ember's all-reduce is torch's
    execute_model_timeout_s: float = 300.0
    # vLLM's: MoE layers place whole experts over the tensor-parallel ranks ("linear" |
    # "round_robin"); no effect on a model without experts or at tensor_parallel_size=1
    enable_expert_parallel: bool = False
    expert_placement_strategy: str = "linear"
    dtype: str = "auto"
    quantization: str | None = None
    revision: str | None = None
    tokenizer_revision: str | None = None  # None: `revision`
    download_dir: str | None = None  # the hub cache for downloads; None: huggingface_hub's
    hf_token: bool | str | None = None  # huggingface_hub's `token`
    # vLLM's: a dict set on the Hugging Face config, or a callable taking and returning it
    hf_overrides: Any = None
    # On CPU no effect (weights are in host memory); on CUDA > 0 raises NotImplementedError.
    cpu_offload_gb: float = 0
    seed: int | None = 0
    gpu_memory_utilization: float = 0.9
    swap_space: float = 4
    enforce_eager: bool = False
    enable_sleep_mode: bool = False  # LLM.sleep(level=1 or 2) may release memory
    max_model_len: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    long_prefill_token_threshold: int = 0
    async_scheduling: bool | None = None  # vLLM's; None: on for CPU models (see the README)
    scheduling_policy: str = "fcfs"  # "fcfs" | "priority" (vLLM's; `priority=` per request)
    block_size: int = 16
    enable_prefix_caching: bool = True
    kv_cache_memory_bytes: int | None = None
    num_gpu_blocks_override: int | None = None
    # "auto" (the model's dtype) or "fp8" / "fp8_e4m3" (see `_check_kv_cache_dtype`)
    kv_cache_dtype: str = "auto"
    # earlier vLLM releases' (0.32 has none): the first step's keys and values set each layer's
    # k_scale / v_scale of an FP8 cache (largest magnitude / 200 and / 100), instead of 1.0
    calculate_kv_scales: bool = False
    load_format: str = "auto"
    device: str = "auto"
    num_threads: int | None = None
    max_logprobs: int = 20
    logprobs_mode: str = "raw_logprobs"
    runner: str = "auto"  # "auto" | "generate" | "pooling"
    convert: str = "auto"  # "auto" | "none" | "embed" | "classify"
    # vLLM's: a dict (or an object with these attributes) of backend ("auto" | "xgrammar" |
    # "guidance" | "outlines"), disable_any_whitespace, disable_additional_properties
    structured_outputs_config: Any = None
    # vLLM's: "auto" (the model's generation_config.json sets the defaults of
    # LLM.get_default_sampling_params), "vllm" (SamplingParams() defaults) or a directory
    # holding a generation_config.json; override_generation_config's fields win over it.
    generation_config: str = "auto"
    override_generation_config: dict | None = None
    # vLLM v1's class-based logits processors: classes (of `ember.logits_process`'s interface)
    # or "module:Class" strings, built in the rank-0 worker
    logits_processors: list | None = None
    # LoRA adapters per request (vLLM's names and defaults; see workers/config.LoRAConfig)
    enable_lora: bool = False
    max_loras: int = 1
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    @classmethod
    def add_cli_args(cls, parser: Any) -> Any:
        """vLLM's: a `--flag` for every vLLM engine argument, with vLLM's defaults, on an
        argparse parser or group (`ember.enginecore.engine_cli`); returns the parser."""
        from ember.enginecore.engine_cli import add_engine_cli_args, ember_field_annotations

        return add_engine_cli_args(parser, ember_field_annotations(cls))

    def _validate(self) -> None:
        if self.quantization is not None and self.quantization not in QUANTIZATION_VALUES:
            raise NotImplementedError(
                f"quantization={self.quantization!r} is not supported; ember reads "
                f"{', '.join(QUANTIZATION_VALUES)}"
            )
        if (
            not isinstance(self.tensor_parallel_size, int)
            or isinstance(self.tensor_parallel_size, bool)
            or self.tensor_parallel_size < 1
        ):
            raise ValueError(
                f"tensor_parallel_size must be a positive integer, got {self.tensor_parallel_size!r}"
            )
        if self.distributed_executor_backend in ("ray", "external_launcher"):
            raise NotImplementedError(
                f"distributed_executor_backend={self.distributed_executor_backend!r} is not "
                "supported; ember runs one worker process per rank ('mp')"
            )
        if self.distributed_executor_backend not in (None, "mp", "uni"):
            raise ValueError(
                "distributed_executor_backend must be None, 'mp' or 'uni', got "
                f"{self.distributed_executor_backend!r}"
            )
        if self.distributed_executor_backend == "uni" and self.tensor_parallel_size != 1:
            raise ValueError("distributed_executor_backend='uni' runs tensor_parallel_size=1 only")
        if not isinstance(self.enable_expert_parallel, bool):
            raise TypeError(
                f"enable_expert_parallel must be True or False, got {self.enable_expert_parallel!r}"
            )
        if self.expert_placement_strategy not in EXPERT_PLACEMENT_STRATEGIES:
            raise ValueError(
                "expert_placement_strategy must be 'linear' or 'round_robin', got "
                f"{self.expert_placement_strategy!r}"
            )
        if not isinstance(self.execute_model_timeout_s, (int, float)) or not (
            self.execute_model_timeout_s > 0
        ):
            raise ValueError(
                f"execute_model_timeout_s must be positive, got {self.execute_model_timeout_s!r}"
            )
        if self.tokenizer_mode in _UNSUPPORTED_TOKENIZER_MODES:
            raise NotImplementedError(
                f"tokenizer_mode={self.tokenizer_mode!r} is not supported (it needs vLLM's own "
                "tokenizer classes); ember loads Hugging Face tokenizers ('auto' = 'hf', "
                "'slow') and mistral_common's ('mistral')"
            )
        if self.tokenizer_mode not in ("auto", "hf", "slow", "mistral"):
            raise ValueError(
                "tokenizer_mode must be 'auto', 'hf', 'slow' or 'mistral', got "
                f"{self.tokenizer_mode!r}"
            )
        generation_config_source(self.generation_config)
        override_fields(self.override_generation_config)
        if self.async_scheduling is not None and not isinstance(self.async_scheduling, bool):
            raise TypeError(
                f"async_scheduling must be a bool or None, got {self.async_scheduling!r}"
            )
        if self.scheduling_policy not in ("fcfs", "priority"):
            raise ValueError(
                f"scheduling_policy must be 'fcfs' or 'priority', got {self.scheduling_policy!r}"
            )
        if self.load_format not in _LOAD_FORMATS:
            raise ValueError(
                f"load_format must be one of {_LOAD_FORMATS}, got {self.load_format!r}"
            )
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        if not isinstance(self.cpu_offload_gb, (int, float)) or self.cpu_offload_gb < 0:
            raise ValueError(f"cpu_offload_gb must be non-negative, got {self.cpu_offload_gb!r}")
        if self.hf_overrides is not None and not (
            isinstance(self.hf_overrides, dict) or callable(self.hf_overrides)
        ):
            raise TypeError(
                "hf_overrides must be a dict or a callable, got " + type(self.hf_overrides).__name__
            )
        if self.swap_space < 0:
            raise ValueError(f"swap_space must be non-negative, got {self.swap_space}")
        if self.block_size not in (1, 2, 4, 8, 16, 32, 64, 128):
            raise ValueError(f"block_size must be a power of two <= 128, got {self.block_size}")
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len", "num_threads"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.logprobs_mode not in _LOGPROBS_MODES:
            raise ValueError(
                f"logprobs_mode must be one of {_LOGPROBS_MODES}, got {self.logprobs_mode!r}"
            )
        if self.logits_processors is not None and not isinstance(
            self.logits_processors, (list, tuple)
        ):
            raise TypeError(
                "logits_processors must be a list of classes or '<module>:<class>' strings, "
                f"got {type(self.logits_processors).__name__}"
            )
        for entry in self.logits_processors or ():
            processor_reference(entry)  # raises for an entry the workers could not import
        if not isinstance(self.max_logprobs, int) or self.max_logprobs < -1:
            raise ValueError(
                f"max_logprobs must be -1 or a non-negative integer, got {self.max_logprobs!r}"
            )
        if self.kv_cache_memory_bytes is not None and self.kv_cache_memory_bytes <= 0:
            raise ValueError(
                f"kv_cache_memory_bytes must be positive, got {self.kv_cache_memory_bytes}"
            )
        _check_kv_cache_dtype(self.kv_cache_dtype)
        if not isinstance(self.calculate_kv_scales, bool):
            raise TypeError(
                "calculate_kv_scales must be a bool, got " + type(self.calculate_kv_scales).__name__
            )

        _structured_outputs_config(self.structured_outputs_config)
        _lora_config(self)

    def _device(self) -> str:
        if self.device == "auto":
            return "cuda" if _cuda_available() else "cpu"
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")
        return self.device

    def create_engine_config(self) -> EngineConfig:
        self._validate()
        device = self._device()
        _check_cpu_offload(self.cpu_offload_gb, device)
        hub = {"download_dir": self.download_dir, "hf_token": self.hf_token}
        model_dir, gguf_file = resolve_model(self.model, self.revision, **hub)
        if gguf_file is not None and self.quantization not in (None, "gguf"):
            raise ValueError(
                f"quantization={self.quantization!r} reads a safetensors checkpoint; the model "
                "is a GGUF file (use quantization='gguf' or None)"
            )
        hf_config = load_hf_config(model_dir, self.trust_remote_code, self.hf_overrides)
        architecture = resolve_architecture(hf_config)
        _check_tensor_parallel(hf_config, self.tensor_parallel_size)
        runner, convert = resolve_runner(architecture, self.runner, self.convert)
        max_model_len = self.max_model_len
        if runner == "pooling" and max_model_len is None:
            max_model_len = sentence_transformers_max_seq_length(model_dir)
        max_model_len = _max_model_len(hf_config, max_model_len)
        default_batched_tokens = 8192 if device == "cuda" else 2048
        enable_prefix_caching = self.enable_prefix_caching
        max_num_batched_tokens = self.max_num_batched_tokens or default_batched_tokens
        pooler = None
        if runner == "pooling":
            # A pooling request is computed in one step over its whole prompt (no chunks, no
            # prefix cache: mean pooling and bidirectional encoders need every token at once).
            pooler = pooler_config(architecture, convert, hf_config, model_dir)
            enable_prefix_caching = False
            max_num_batched_tokens = max(max_num_batched_tokens, max_model_len)
            if self.long_prefill_token_threshold:
                raise ValueError("long_prefill_token_threshold applies to runner='generate' only")
        dtype = _resolve_dtype(self.dtype, hf_config, device)
        generation_source = generation_config_source(self.generation_config)
        generation_config = read_generation_config(generation_source, model_dir)
        model_config = ModelConfig(
            model=self.model or gguf_file or model_dir,
            model_dir=model_dir,
            architecture=architecture,
            dtype=dtype,
            max_model_len=max_model_len,
            vocab_size=hf_config.vocab_size,
            eos_token_ids=_eos_token_ids(
                read_generation_config("auto", model_dir), generation_config, hf_config
            ),
            load_format=self.load_format,
            gguf_file=gguf_file,
            quantization=resolve_checkpoint_quantization(
                self.quantization, hf_config, self.tensor_parallel_size
            )
            or _resolve_quantization(self.quantization, self.dtype, dtype, gguf_file, device),
            tokenizer=resolve_tokenizer(
                self.tokenizer,
                self.model,
                gguf_file or model_dir,  # a GGUF file's tokenizer converts beside the start
                revision=self.revision,
                tokenizer_revision=self.tokenizer_revision,
                **hub,
            ),
            tokenizer_mode=self.tokenizer_mode,
            revision=self.revision,
            seed=0 if self.seed is None else self.seed,
            trust_remote_code=self.trust_remote_code,
            enable_sleep_mode=self.enable_sleep_mode,
            max_logprobs=self.max_logprobs,
            logprobs_mode=self.logprobs_mode,
            logits_processors=tuple(
                (ref.module, ref.qualname, ref.path)
                for ref in map(processor_reference, self.logits_processors or ())
            ),
            runner=runner,
            convert=convert,
            pooler=pooler,
            hf_config=hf_config.snapshot(),
            generation_config=generation_source,
            default_sampling_params=diff_sampling_params(
                generation_config,
                generation_source,
                override_fields(self.override_generation_config),
            ),
        )
        return EngineConfig(
            model=model_config,
            cache=CacheConfig(
                block_size=self.block_size,
                kv_cache_memory_bytes=self.kv_cache_memory_bytes,
                num_kv_blocks=self.num_gpu_blocks_override,
                gpu_memory_utilization=self.gpu_memory_utilization,
                enable_prefix_caching=enable_prefix_caching,
                swap_space_gib=self.swap_space,
                cache_dtype=self.kv_cache_dtype,
                calculate_kv_scales=self.calculate_kv_scales,
            ),
            scheduler=SchedulerConfig(
                max_num_seqs=256 if self.max_num_seqs is None else self.max_num_seqs,
                max_num_batched_tokens=max_num_batched_tokens,
                max_model_len=max_model_len,
                long_prefill_token_threshold=self.long_prefill_token_threshold,
                policy=self.scheduling_policy,
                async_scheduling=_async_scheduling(self.async_scheduling, device),
            ),
            parallel=ParallelConfig(
                tensor_parallel_size=self.tensor_parallel_size,
                execute_model_timeout_s=float(self.execute_model_timeout_s),
                enable_expert_parallel=_expert_parallel(self, hf_config),
                expert_placement_strategy=self.expert_placement_strategy,
            ),
            device=DeviceConfig(
                device=device,
                num_threads=self.num_threads,
                enforce_eager=self.enforce_eager,
                cpu_offload_bytes=0 if device == "cpu" else int(self.cpu_offload_gb * 2**30),
            ),
            structured_outputs=_structured_outputs_config(self.structured_outputs_config),
            lora=_lora_config(self),
        )


# kv_cache_dtype values ember stores, and vLLM's others (its `CacheDType`), which it refuses.
KV_CACHE_DTYPE_VALUES = ("auto", "fp8", "fp8_e4m3")
_VLLM_ONLY_KV_CACHE_DTYPES = (
    "float16",
    "bfloat16",
    "fp8_e5m2",
    "fp8_inc",
    "fp8_ds_mla",
    "nvfp4_ds_mla",
    "turboquant_k8v4",
    "turboquant_4bit_nc",
    "turboquant_k3v4_nc",
    "turboquant_3bit_nc",
    "int4_per_token_head",
    "int8_per_token_head",
    "fp8_per_token_head",
    "nvfp4",
    "nvfp4_4over6",
)


def _check_kv_cache_dtype(value: Any) -> None:
    """kv_cache_dtype: "auto", or "fp8" = "fp8_e4m3" (OCP e4m3, torch.float8_e4m3fn, with a
    per-tensor k_scale / v_scale per layer, as vLLM's default "fp8"). vLLM's other formats
    (e5m2, Gaudi's, DeepSeek's MLA layouts, per-token-head and 4-bit caches) raise
    NotImplementedError; anything else is a ValueError."""
    if value in KV_CACHE_DTYPE_VALUES:
        return
    if value in _VLLM_ONLY_KV_CACHE_DTYPES:
        raise NotImplementedError(
            f"kv_cache_dtype={value!r} is not supported; ember stores the KV cache in the "
            "model's dtype ('auto') or in e4m3 ('fp8' = 'fp8_e4m3')"
        )
    raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPE_VALUES}, got {value!r}")


def _lora_config(args: EngineArgs) -> LoRAConfig | None:
    """vLLM's LoRA arguments, checked: None unless enable_lora."""
    if not isinstance(args.enable_lora, bool):
        raise TypeError(f"enable_lora must be a bool, got {type(args.enable_lora).__name__}")
    for name in ("max_loras", "max_lora_rank"):
        value = getattr(args, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    max_cpu_loras = args.max_cpu_loras
    if max_cpu_loras is not None and (
        not isinstance(max_cpu_loras, int) or max_cpu_loras < args.max_loras
    ):
        raise ValueError(
            f"max_cpu_loras ({max_cpu_loras!r}) must be an integer >= max_loras ({args.max_loras})"
        )
    if not args.enable_lora:
        return None
    return LoRAConfig(args.max_loras, args.max_lora_rank, max_cpu_loras)


_STRUCTURED_OUTPUTS_BACKENDS = ("auto", "xgrammar", "guidance", "outlines")
# vLLM's other StructuredOutputsConfig fields: reasoning parsers, which ember does not have.
_STRUCTURED_OUTPUTS_IGNORED = ("reasoning_parser", "reasoning_parser_plugin", "enable_in_reasoning")


def _structured_outputs_config(value: Any) -> StructuredOutputsConfig:
    """`structured_outputs_config` (None, a dict, or vLLM's config object) checked as vLLM's
    `StructuredOutputsConfig` checks it; errors name the field."""
    if value is None:
        return StructuredOutputsConfig()
    if isinstance(value, StructuredOutputsConfig):
        fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    elif isinstance(value, dict):
        fields = dict(value)
    elif hasattr(value, "backend"):  # vLLM's own StructuredOutputsConfig
        fields = {
            name: getattr(value, name)
            for name in ("backend", "disable_any_whitespace", "disable_additional_properties")
            if hasattr(value, name)
        }
    else:
        raise TypeError("structured_outputs_config must be a dict, got " + type(value).__name__)
    for name in _STRUCTURED_OUTPUTS_IGNORED:
        if fields.pop(name, None) not in (None, "", False):
            raise NotImplementedError(f"structured_outputs_config.{name} is not supported")
    known = {f.name for f in dataclasses.fields(StructuredOutputsConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise TypeError(f"structured_outputs_config has no field {unknown[0]!r}")
    config = StructuredOutputsConfig(**fields)
    if config.backend == "lm-format-enforcer":
        raise NotImplementedError(
            "structured_outputs_config.backend='lm-format-enforcer' is not supported"
        )
    if config.backend not in _STRUCTURED_OUTPUTS_BACKENDS:
        raise ValueError(
            f"structured_outputs_config.backend must be one of {_STRUCTURED_OUTPUTS_BACKENDS}, "
            f"got {config.backend!r}"
        )
    for name in ("disable_any_whitespace", "disable_additional_properties"):
        if not isinstance(getattr(config, name), bool):
            raise TypeError(f"structured_outputs_config.{name} must be a bool")
    if config.disable_any_whitespace and config.backend not in ("xgrammar", "guidance"):
        raise ValueError(
            "structured_outputs_config.disable_any_whitespace is only supported for the "
            "xgrammar and guidance backends"
        )
    if config.disable_additional_properties and config.backend != "guidance":
        raise ValueError(
            "structured_outputs_config.disable_additional_properties is only supported for "
            "the guidance backend"
        )
    return config


def _check_cpu_offload(cpu_offload_gb: float, device: str) -> None:
    """vLLM's `cpu_offload_gb` keeps that much of the weights in host memory and streams it
    in for each step (on CUDA: `ember.workers.cpu_offload`). On CPU the weights are in host
    memory already."""
    if not cpu_offload_gb or device != "cpu":
        return
    log_no_effect("cpu_offload_gb", cpu_offload_gb, "on CPU the weights are in host memory")


def _expert_parallel(args: EngineArgs, hf_config: HFConfig) -> bool:
    """enable_expert_parallel as the workers get it: on a model without experts it does
    nothing (vLLM's MoE layers are the only ones that read it), which is logged."""
    if not args.enable_expert_parallel:
        return False
    num_experts = getattr(hf_config, "num_local_experts", None) or getattr(
        hf_config, "num_experts", None
    )
    if not num_experts:
        log_no_effect("enable_expert_parallel", True, "the model has no experts")
        return False
    return True


def _check_tensor_parallel(hf_config: HFConfig, tp_size: int) -> None:
    """Refuse, before any process starts, a tensor-parallel size the model's heads do not
    split into (the layers check every other size when they are built)."""
    if tp_size == 1:
        return
    heads = getattr(hf_config, "num_attention_heads", None)
    if heads is not None and heads % tp_size:
        raise ValueError(
            f"tensor_parallel_size={tp_size} must divide the model's {heads} attention heads"
        )
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
    if kv_heads is not None and kv_heads % tp_size and tp_size % kv_heads:
        raise ValueError(
            f"tensor_parallel_size={tp_size} and the model's {kv_heads} KV heads must divide "
            "one another (each rank holds whole KV heads, replicated when they are fewer)"
        )


def _cuda_available() -> bool:
    """Whether torch sees a GPU. A CPU build of torch (version "+cpu") cannot, which is known
    without importing torch (a second of a CPU machine's cold start)."""
    if "torch" not in sys.modules:
        try:
            if metadata.version("torch").endswith("+cpu"):
                return False
        except metadata.PackageNotFoundError:
            return False
    import torch

    return torch.cuda.is_available()


def _max_model_len(hf_config: HFConfig, requested: int | None) -> int:
    """vLLM's rule: the smallest length key of the config, stretched by the rope scaling factor
    (yarn: from `original_max_position_embeddings`; not for llama3 / longrope, whose configs
    state the stretched length already). A longer `requested` is refused.

    Decision for `dynamic` rope: the default stays the unstretched length, where ember equals
    Hugging Face; a longer `max_model_len` may be asked for (up to the stretched length), and
    the rotary table is then NTK-scaled for it as vLLM does."""
    derived = None
    for key in _MAX_LEN_KEYS:
        value = getattr(hf_config, key, None)
        if isinstance(value, int) and value > 0:
            derived = value if derived is None else min(derived, value)
    if derived is None:
        derived = 2048
    default = limit = derived
    rope = rope_parameters(hf_config)
    rope_type = rope.get("rope_type", "default")
    factor = rope.get("factor")
    if rope_type not in ("default", "llama3", "longrope", "su") and factor:
        if rope_type == "yarn" and rope.get("original_max_position_embeddings"):
            limit = rope["original_max_position_embeddings"]
        limit = int(limit * factor)
        default = derived if rope_type == "dynamic" else limit
    if requested is None:
        return default
    if requested > limit:
        raise ValueError(
            f"max_model_len={requested} is longer than the model's maximum of {limit} "
            "(from its config.json)"
        )
    return requested


# Models whose activations overflow float16 (vLLM refuses them too).
_FLOAT16_UNSTABLE_MODEL_TYPES = ("gemma2", "gemma3", "gemma3_text")


def _async_scheduling(requested: bool | None, device: str) -> bool:
    """vLLM's `async_scheduling`: None turns it on where it has been measured (CPU models:
    2026-12-05, batch-1 decode +3-7%, W1 +1-9%); on CUDA it stays off until a GPU run has
    checked it there. A lockstep data-parallel rank steps the ranks together, never
    overlapped, whatever it says."""
    if requested is None:
        return device == "cpu"
    return requested


def _resolve_dtype(dtype: Any, hf_config: HFConfig, device: str) -> str:
    """vLLM's rules: "auto" takes the config's dtype, float32 becoming bfloat16 on a GPU; a named
    dtype is used as given, unless the device or the model cannot compute in it.

    On CPU "auto" is float32: a model wholly in bfloat16 agreed with float32 on the first 16
    greedy tokens for only 6 of 8 chat prompts (SmolLM2-135M). The CPU's bfloat16 speed comes
    instead from the matmuls of quantization="gguf", under float32 activations."""
    if type(dtype).__module__ == "torch" and type(dtype).__name__ == "dtype":
        dtype = str(dtype).removeprefix("torch.")
    if dtype == "auto":
        if device == "cpu":
            return "float32"
        config_dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
        name = str(config_dtype).removeprefix("torch.") if config_dtype is not None else "float32"
        name = "bfloat16" if name == "float32" else _DTYPE_NAMES.get(name, "bfloat16")
        if name == "float16" and hf_config.model_type in _FLOAT16_UNSTABLE_MODEL_TYPES:
            name = "bfloat16"
        if name == "bfloat16" and not _cuda_bf16_supported():
            name = "float16"
        return name
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"dtype must be 'auto' or one of {sorted(_DTYPE_NAMES)}, got {dtype!r}")
    name = _DTYPE_NAMES[dtype]
    if name == "float16" and hf_config.model_type in _FLOAT16_UNSTABLE_MODEL_TYPES:
        raise ValueError(
            f"dtype={dtype!r}: {hf_config.model_type} overflows in float16; use 'bfloat16' "
            "or 'float32'"
        )
    if name == "float16" and device == "cpu" and not _cpu_computes("float16"):
        raise ValueError(
            f"dtype={dtype!r}: this torch build ({metadata.version('torch')}) cannot compute in "
            "float16 on CPU; use 'bfloat16' or 'float32'"
        )
    if name == "bfloat16" and device == "cuda" and not _cuda_bf16_supported():
        raise ValueError(
            f"dtype={dtype!r}: this GPU has no bfloat16 support (compute capability < 8.0); "
            "use 'float16' or 'float32'"
        )
    return name


def _resolve_quantization(
    quantization: str | None, dtype_arg: object, dtype: str, gguf_file: str | None, device: str
) -> str | None:
    """ "gguf" keeps a GGUF file's 4- and 8-bit groups packed for decode batches (CPU only, with
    float32 activations). Asked for by default when a GGUF model runs on an x86-64 CPU whose
    packed kernels run (AVX2 or AVX-512: `cpu_features.packed_kernels`) and `dtype` is "auto";
    an explicit dtype="float32" dequantises (the exact float32 reference the parity tests
    use)."""
    if quantization is None:
        wanted = dtype_arg == "auto" and gguf_file is not None and device == "cpu"
        return "gguf" if wanted and dtype == "float32" and packed_kernels() else None
    if gguf_file is None:
        raise ValueError("quantization='gguf' needs a .gguf model file")
    if device != "cpu":
        raise NotImplementedError(
            "quantization='gguf' runs on CPU only; on a GPU ember dequantises"
        )
    if dtype != "float32":
        raise ValueError(f"quantization='gguf' computes in float32; got dtype={dtype_arg!r}")
    return quantization


def _cuda_bf16_supported() -> bool:
    import torch

    return torch.cuda.is_bf16_supported()


def _cpu_computes(dtype_name: str) -> bool:
    """Whether the operations a model runs (matmul, attention, softmax, norms) work in the
    dtype on this CPU with this torch build."""
    import torch

    dtype = getattr(torch, dtype_name)
    try:
        x = torch.ones(1, 2, 4, 8, dtype=dtype)
        torch.nn.functional.scaled_dot_product_attention(x, x, x, is_causal=True)
        torch.nn.functional.linear(x, torch.ones(8, 8, dtype=dtype)).softmax(-1)
        torch.nn.functional.silu(x).float().pow(2).mean(-1)
        torch.nn.functional.layer_norm(x, (8,))
    except RuntimeError:
        return False
    return True


def _eos_token_ids(
    model_generation_config: dict, generation_config: dict, hf_config: HFConfig
) -> tuple[int, ...]:
    """The model's generation_config.json eos_token_id (what transformers' GenerationConfig
    reads), else its config's; then the extra EOS ids of a `generation_config` directory, which
    vLLM's input processor also stops on."""
    model_eos = model_generation_config.get("eos_token_id")
    if model_eos is None:
        model_eos = getattr(hf_config, "eos_token_id", None)
    ids: list[int] = []
    for eos in (model_eos, generation_config.get("eos_token_id")):
        if eos is None:
            continue
        for token_id in eos if isinstance(eos, (list, tuple)) else (eos,):
            if token_id not in ids:
                ids.append(token_id)
    return tuple(ids)
