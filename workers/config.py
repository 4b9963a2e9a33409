"""The engine's configuration: a chain of frozen dataclasses built once from the user's arguments.

Built by `ember.enginecore.arg_utils.EngineArgs.create_engine_config`, sent to every process
(msgspec encodes dataclasses), and read everywhere below. Each field is a plain value.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class PoolerConfig:
    """How a pooling model turns hidden states into its output (see `enginecore/pooling_config`).

    pooling_type: which tokens make the request's vector: "CLS" (the first), "MEAN" (all),
    "LAST" (the last). normalize: L2-normalise embeddings unless a request says otherwise.
    head: "embed" (the pooled hidden state is the output) or "classify" (a classifier turns it
    into `num_labels` logits). tasks: the pooling tasks the model serves.
    """

    pooling_type: str = "LAST"
    normalize: bool = True
    head: str = "embed"
    num_labels: int = 0
    hidden_size: int = 0
    tasks: tuple[str, ...] = ("embed", "token_embed")


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """Which weights, how they are read, and the facts of the model the scheduler needs."""

    model: str  # what the user asked for (repo id, directory, or .gguf file)
    model_dir: str  # local directory holding config.json (and tokenizer files)
    architecture: str  # e.g. "LlamaForCausalLM"
    dtype: str  # "float32" | "bfloat16" | "float16"
    max_model_len: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    load_format: str = "auto"  # "auto" | "safetensors" | "gguf" | "dummy"
    gguf_file: str | None = None  # path of the .gguf file when the weights come from one
    # "gguf": the GGUF file's 4- and 8-bit groups stay packed for decode-sized batches (CPU,
    # `ember.workers.layers.packed_int4`); None: weights dequantised to `dtype`
    quantization: str | None = None
    tokenizer: str | None = None  # tokenizer directory (defaults to model_dir)
    tokenizer_mode: str = "auto"  # "auto" | "hf" | "slow" | "mistral" (vLLM's)
    revision: str | None = None
    seed: int = 0
    trust_remote_code: bool = False
    # `LLM.sleep(level >= 1)` may release the weights and the KV cache (vLLM's flag)
    enable_sleep_mode: bool = False
    max_logprobs: int = 20  # vLLM's default; -1 allows the whole vocabulary
    # What logprobs report (vLLM's): "raw_logprobs" | "raw_logits" | "processed_logprobs" |
    # "processed_logits" (processed: after penalties, bias, masks, temperature, top-k/top-p)
    logprobs_mode: str = "raw_logprobs"
    runner: str = "generate"  # "generate" | "pooling" (vLLM's `runner`)
    convert: str = "none"  # "none" | "embed" | "classify": a causal LM adapted for pooling
    pooler: PoolerConfig | None = None  # set for runner="pooling"
    # the Hugging Face config as `ember.workers.hf_config.snapshot_config` records it; empty:
    # the workers read config.json in `model_dir` themselves
    hf_config: dict = field(default_factory=dict)
    # vLLM's generation_config as resolved: "auto", "vllm" or an absolute directory path
    generation_config: str = "auto"
    # the SamplingParams fields it and override_generation_config set (vLLM's
    # `get_diff_sampling_param`), the defaults of `LLM.get_default_sampling_params`
    default_sampling_params: dict = field(default_factory=dict)
    # vLLM's class-based logits processors, by reference: (module, qualified name, the sys.path
    # entry to import it from or None), built in the rank-0 worker
    logits_processors: tuple[tuple[str, str, str | None], ...] = ()


# The CPU KV budget when kv_cache_memory_bytes is None: this share of the free memory, at
# most this many bytes (split over the ranks; `LLM(data_parallel_size=N)` splits it over N).
DEFAULT_CPU_KV_FRACTION = 0.2
DEFAULT_CPU_KV_MAX_BYTES = 4 << 30


@dataclass(frozen=True, slots=True)
class CacheConfig:
    """The paged KV cache: block geometry and how much memory it may take."""

    block_size: int = 16
    kv_cache_memory_bytes: int | None = None  # CPU budget; None = derived from free memory
    num_kv_blocks: int | None = None  # set by the engine once the capacity is known
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    swap_space_gib: float = 4.0
    # vLLM's kv_cache_dtype: "auto" (the model's dtype; bfloat16 for integer-coded weights
    # on CPU) or "fp8" / "fp8_e4m3" (float8_e4m3fn with per-layer k_scale and v_scale)
    cache_dtype: str = "auto"
    # set each layer's k_scale / v_scale from the first step's keys and values (vLLM's)
    calculate_kv_scales: bool = False


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    """Limits of one engine step."""

    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int = 2048
    long_prefill_token_threshold: int = 0
    # "fcfs": waiting requests in arrival order, the newest running one preempted first;
    # "priority": both by (priority, arrival), a lower value first (vLLM's policies)
    policy: str = "fcfs"
    # Schedule the next step while the workers run this one (vLLM's async scheduling): the
    # workers feed each request the token they sampled themselves (`enginecore/engine_core.py`).
    async_scheduling: bool = False


EXPERT_PLACEMENT_STRATEGIES = ("linear", "round_robin")  # vLLM's ExpertPlacementStrategy


@dataclass(frozen=True, slots=True)
class LockstepConfig:
    """This engine is data-parallel rank `rank` of `size` (the VLLM_DP_* environment) of a MoE
    model with expert parallelism: the experts are placed over the workers of every rank, and
    the ranks step in lockstep (`enginecore/lockstep.py`), meeting through the store rank 0's
    user process hosts at master_ip:master_port. timeout_s: how long a rank waits for the
    others' engines at start (EMBER_DP_TIMEOUT_S)."""

    rank: int
    size: int
    master_ip: str
    master_port: int
    timeout_s: float = 300.0


@dataclass(frozen=True, slots=True)
class ParallelConfig:
    """The worker ranks. execute_model_timeout_s: how long the engine core waits for every
    rank to answer one step before it reports the engine dead (a rank stopped or stuck in a
    collective); vLLM's VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS, 300 s by default there too."""

    tensor_parallel_size: int = 1
    execute_model_timeout_s: float = 300.0
    # MoE layers place whole experts over the ranks ("linear": contiguous blocks, the
    # remainder on the first ranks; "round_robin": expert e on rank e % size), vLLM's options
    enable_expert_parallel: bool = False
    expert_placement_strategy: str = "linear"
    # set on the data-parallel ranks of a MoE model with expert parallelism (None: this engine
    # is alone, or a dense model's independent replica)
    lockstep: LockstepConfig | None = None


@dataclass(frozen=True, slots=True)
class DeviceConfig:
    device: str = "cpu"  # "cpu" | "cuda"
    num_threads: int | None = None  # torch intra-op threads on CPU; None = torch's default
    enforce_eager: bool = False
    # vLLM's cpu_offload_gb in bytes, on CUDA only: that much of the decoder layers' weights
    # stays in host memory and is copied in for each forward (`ember.workers.cpu_offload`)
    cpu_offload_bytes: int = 0


@dataclass(frozen=True, slots=True)
class StructuredOutputsConfig:
    """vLLM's `structured_outputs_config`: the grammar engine and its JSON options.

    backend: "auto" (xgrammar, falling back to guidance, or outlines, per request as vLLM
    decides), "xgrammar", "guidance" or "outlines" (no fallback).
    """

    backend: str = "auto"
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False


@dataclass(frozen=True, slots=True)
class LoRAConfig:
    """LoRA serving (`LLM(enable_lora=True)`, vLLM's limits and defaults): `max_loras`
    adapters in one step (the device slots of stacked weights, padded to `max_lora_rank`),
    and an LRU of `max_cpu_loras` adapters read from disk (None: max_loras, as vLLM)."""

    max_loras: int = 1
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None

    @property
    def num_cpu_loras(self) -> int:
        return self.max_loras if self.max_cpu_loras is None else self.max_cpu_loras


@dataclass(frozen=True, slots=True)
class EngineConfig:
    model: ModelConfig
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)
    structured_outputs: StructuredOutputsConfig = field(default_factory=StructuredOutputsConfig)
    lora: LoRAConfig | None = None  # set with enable_lora=True
