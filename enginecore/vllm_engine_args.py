"""vLLM's engine arguments and what ember does with each: one table, checked by `LLM.__init__`
(`ember_engine_kwargs`) before any process starts, and printed as the README's table by
`python -m ember.enginecore.vllm_engine_args --markdown`.

Policies (one per argument of vLLM's):

- "no_effect": accepted whatever its value; it changes nothing in ember. A value other than
  vLLM's default is logged once per process and argument, at INFO, with the reason (vLLM's
  default is not logged: `LLM(**vars(vllm_engine_args))` passes every field, and a line per
  field would bury the ones that matter).
- "only": accepted at vLLM's default and at the values listed, which ember honours (a non-default
  one is logged like "no_effect": ember does that anyway); any other value raises
  `NotImplementedError` naming the argument and the value.
- "ember": an option of ember's own `EngineArgs` (or of `LLM`); the note says what ember does.
  Such an option is never refused here: `EngineArgs` checks it.

A name in neither vLLM's list nor ember's `EngineArgs` raises `TypeError`.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any, Literal

logger = logging.getLogger(__name__)

VLLM_VERSION = "0.32.0"


@dataclass(frozen=True, slots=True)
class ConfigDefault:
    """A default that is one of vLLM's config objects, built with its own defaults."""

    class_name: str

    def __repr__(self) -> str:
        return f"{self.class_name}()"


_C = ConfigDefault

# (name, default) of every field of vLLM 0.32.0's `EngineArgs` (vllm/engine/arg_utils.py), in its
# order. Enum defaults are given by value.
VLLM_ENGINE_ARGS: tuple[tuple[str, Any], ...] = (
    ("model", "Qwen/Qwen3-0.6B"),
    ("enable_return_routed_experts", False),
    ("return_sampling_mask", False),
    ("model_weights", ""),
    ("served_model_name", None),
    ("tokenizer", None),
    ("hf_config_path", None),
    ("runner", "auto"),
    ("convert", "auto"),
    ("skip_tokenizer_init", False),
    ("enable_prompt_embeds", False),
    ("tokenizer_mode", "auto"),
    ("trust_remote_code", False),
    ("allowed_local_media_path", ""),
    ("allowed_media_domains", None),
    ("download_dir", None),
    ("safetensors_load_strategy", None),
    ("safetensors_prefetch_num_threads", 8),
    ("safetensors_prefetch_block_size", 16777216),
    ("load_format", "auto"),
    ("config_format", "auto"),
    ("dtype", "auto"),
    ("kv_cache_dtype", "auto"),
    ("seed", 0),
    ("max_model_len", None),
    ("cudagraph_capture_sizes", None),
    ("max_cudagraph_capture_size", None),
    ("ir_op_priority", _C("IrOpPriorityConfig")),
    ("distributed_executor_backend", None),
    ("pipeline_parallel_size", 1),
    ("master_addr", "127.0.0.1"),
    ("master_port", 29501),
    ("nnodes", 1),
    ("node_rank", 0),
    ("distributed_timeout_seconds", None),
    ("cpu_distributed_timeout_seconds", None),
    ("numa_bind", False),
    ("numa_bind_nodes", None),
    ("numa_bind_cpus", None),
    ("device_ids", None),
    ("tensor_parallel_size", 1),
    ("prefill_context_parallel_size", 1),
    ("decode_context_parallel_size", 1),
    ("dcp_comm_backend", None),
    ("dcp_q_replicate", None),
    ("dcp_kv_cache_interleave_size", 1),
    ("cp_kv_cache_interleave_size", None),
    ("data_parallel_size", 1),
    ("data_parallel_rank", None),
    ("data_parallel_start_rank", None),
    ("data_parallel_size_local", None),
    ("data_parallel_address", None),
    ("data_parallel_rpc_port", None),
    ("data_parallel_hybrid_lb", False),
    ("data_parallel_external_lb", False),
    ("data_parallel_multi_port_external_lb", False),
    ("data_parallel_backend", "mp"),
    ("enable_hc_sp", False),
    ("enable_expert_parallel", False),
    ("enable_batch_sharded_sampling", None),
    ("enable_ep_weight_filter", False),
    ("moe_backend", "auto"),
    ("linear_backend", "auto"),
    ("sparse_indexer_topk_backend", "auto"),
    ("all2all_backend", "allgather_reducescatter"),
    ("enable_elastic_ep", False),
    ("elastic_ep_max_dp_size", None),
    ("enable_dbo", False),
    ("ubatch_size", 0),
    ("dbo_decode_token_threshold", 32),
    ("dp_sync_interval", 16),
    ("dbo_prefill_token_threshold", 512),
    ("disable_nccl_for_dp_synchronization", None),
    ("eplb_config", _C("EPLBConfig")),
    ("enable_eplb", False),
    ("expert_placement_strategy", "linear"),
    ("_api_process_count", 1),
    ("_api_process_rank", 0),
    ("max_parallel_loading_workers", None),
    ("block_size", None),
    ("enable_prefix_caching", None),
    ("prefix_caching_hash_algo", "sha256"),
    ("prefix_cache_retention_interval", 0),
    ("disable_sliding_window", False),
    ("disable_cascade_attn", None),
    ("offload_backend", "auto"),
    ("cpu_offload_gb", 0),
    ("cpu_offload_params", set()),
    ("offload_group_size", 0),
    ("offload_num_in_group", 1),
    ("offload_prefetch_step", 1),
    ("offload_params", set()),
    ("gpu_memory_utilization", 0.92),
    ("kv_cache_memory_bytes", None),
    ("max_num_batched_tokens", None),
    ("max_num_scheduled_tokens", None),
    ("long_prefill_token_threshold", 0),
    ("long_prefill_token_threshold_adaptive", False),
    ("max_num_seqs", None),
    ("max_num_active_seqs", None),
    ("max_num_queued_reqs", None),
    ("max_num_queued_tokens", None),
    ("max_logprobs", 20),
    ("logprobs_mode", "raw_logprobs"),
    ("use_fp64_gumbel", False),
    ("enable_trace_replay", False),
    ("disable_log_stats", False),
    ("aggregate_engine_logging", False),
    ("revision", None),
    ("code_revision", None),
    ("hf_token", None),
    ("hf_overrides", {}),
    ("model_class_overrides", {}),
    ("tokenizer_revision", None),
    ("quantization", None),
    ("quantization_config", None),
    ("allow_deprecated_quantization", False),
    ("enforce_eager", False),
    ("disable_custom_all_reduce", False),
    ("enable_shm_tensor_arena", False),
    ("language_model_only", False),
    ("limit_mm_per_prompt", {}),
    ("enable_mm_embeds", False),
    ("interleave_mm_strings", False),
    ("media_io_kwargs", {}),
    ("mm_processor_kwargs", None),
    ("mm_processor_cache_gb", 4),
    ("mm_processor_cache_type", "lru"),
    ("mm_hasher_algorithm", "blake3"),
    ("mm_shm_cache_max_object_size_mb", 128),
    ("mm_encoder_only", False),
    ("mm_encoder_tp_mode", "weights"),
    ("mm_encoder_attn_backend", None),
    ("mm_encoder_attn_dtype", None),
    ("mm_encoder_fp8_scale_path", None),
    ("mm_encoder_fp8_scale_save_path", None),
    ("mm_encoder_fp8_scale_save_margin", 1.5),
    ("io_processor_plugin", None),
    ("renderer_num_workers", 1),
    ("skip_mm_profiling", False),
    ("video_pruning_rate", None),
    ("video_pruning_method", "evs"),
    ("mm_tensor_ipc", "direct_rpc"),
    ("mm_processor_device", "auto"),
    ("mm_ipc_gpu_memory_gb", 0),
    ("mm_device_do_normalize", True),
    ("enable_lora", False),
    ("max_loras", 1),
    ("max_lora_rank", 16),
    ("default_mm_loras", None),
    ("fully_sharded_loras", False),
    ("max_cpu_loras", None),
    ("lora_dtype", "auto"),
    ("lora_target_modules", None),
    ("enable_tower_connector_lora", False),
    ("specialize_active_lora", False),
    ("enable_mixed_moe_lora_format", False),
    ("enable_moe_shared_loras", False),
    ("max_lora_cls_labels", None),
    ("ray_workers_use_nsight", False),
    ("num_gpu_blocks_override", None),
    ("model_loader_extra_config", {}),
    ("ignore_patterns", ["original/**/*"]),
    ("enable_chunked_prefill", None),
    ("disable_chunked_mm_input", False),
    ("scheduler_reserve_full_isl", True),
    ("prefill_schedule_interval", 1),
    ("watermark", 0.0),
    ("disable_hybrid_kv_cache_manager", None),
    ("structured_outputs_config", _C("StructuredOutputsConfig")),
    ("aux_output_config", _C("AuxOutputConfig")),
    ("reasoning_parser", ""),
    ("reasoning_parser_plugin", None),
    ("speculative_config", None),
    ("spec_method", None),
    ("spec_model", None),
    ("spec_tokens", None),
    ("watermark_config", None),
    ("diffusion_config", None),
    ("show_hidden_metrics_for_version", None),
    ("otlp_traces_endpoint", None),
    ("collect_detailed_traces", None),
    ("per_request_spec_decode_metrics", "none"),
    ("kv_cache_metrics", False),
    ("kv_cache_metrics_sample", 0.01),
    ("custom_histogram_buckets", None),
    ("cudagraph_metrics", False),
    ("enable_layerwise_nvtx_tracing", False),
    ("enable_mfu_metrics", False),
    ("enable_logging_iteration_details", False),
    ("jit_monitor_mode", "warn"),
    ("jit_monitor_verbose", False),
    ("enable_mm_processor_stats", False),
    ("scheduling_policy", "fcfs"),
    ("scheduler_cls", None),
    ("pooler_config", None),
    ("compilation_config", _C("CompilationConfig")),
    ("attention_config", _C("AttentionConfig")),
    ("engram_config", None),
    ("mamba_config", _C("MambaConfig")),
    ("kernel_config", _C("KernelConfig")),
    ("enable_flashinfer_autotune", None),
    ("worker_cls", "auto"),
    ("worker_extension_cls", ""),
    ("profiler_config", _C("ProfilerConfig")),
    ("logging_config", None),
    ("log_level", None),
    ("log_config_file", None),
    ("kv_transfer_config", None),
    ("kv_events_config", None),
    ("ec_transfer_config", None),
    ("ec_manager_config", _C("EncoderCacheManagerConfig")),
    ("reasoning_config", None),
    ("generation_config", "auto"),
    ("enable_sleep_mode", False),
    ("sleep_mode_offload_cudagraph", False),
    ("sleep_preserve_parameter_names", []),
    ("enable_cumem_allocator", False),
    ("enable_nccl_comm_suspend", False),
    ("override_generation_config", {}),
    ("model_impl", "auto"),
    ("attention_backend", None),
    ("kv_cache_dtype_skip_layers", []),
    ("mamba_cache_dtype", "auto"),
    ("mamba_ssm_cache_dtype", "auto"),
    ("mamba_block_size", None),
    ("prefix_match_unit", None),
    ("mamba_cache_mode", "none"),
    ("enable_mamba_shared_prefix_checkpoint", False),
    ("replayssm_buffer_len", 16),
    ("use_replayssm", False),
    ("mamba_backend", "triton"),
    ("mamba_ssu_algorithm", None),
    ("enable_mamba_cache_stochastic_rounding", False),
    ("mamba_cache_philox_rounds", 0),
    ("additional_config", {}),
    ("use_tqdm_on_load", True),
    ("pt_load_map_location", "cpu"),
    ("logits_processors", None),
    ("async_scheduling", None),
    ("stream_interval", 1),
    ("kv_sharing_fast_prefill", False),
    ("swa_bounded_replay", True),
    ("optimization_level", 2),
    ("performance_mode", "balanced"),
    ("fault_tolerance_config", _C("FaultToleranceConfig")),
    ("enable_fault_tolerance", False),
    ("kv_offloading_size", None),
    ("kv_offloading_backend", "native"),
    ("tokens_only", False),
    ("shutdown_timeout", 0),
    ("weight_transfer_config", None),
    ("fail_on_environ_validation", False),
    ("gdn_prefill_backend", None),
    ("kda_prefill_backend", None),
    ("kda_decode_backend", None),
)

# Keyword arguments vLLM 0.32.0's `LLM.__init__` (vllm/entrypoints/llm.py) takes besides the
# fields of its `EngineArgs`.
VLLM_LLM_ONLY_ARGS: tuple[tuple[str, Any], ...] = (("chat_template", None),)

PolicyKind = Literal["ember", "no_effect", "only"]


@dataclass(frozen=True, slots=True)
class ArgPolicy:
    """What ember does with one of vLLM's arguments (see the module docstring)."""

    kind: PolicyKind
    note: str  # the reason ("no_effect", "only"), or what ember does ("ember")
    values: tuple[Any, ...] = ()  # "only": values honoured besides vLLM's default
    honours: Callable[[Any], bool] | None = None  # "only": a test instead of `values`
    honoured_text: str = ""  # "only" with `honours`: the honoured values, in words


def _ember(note: str) -> ArgPolicy:
    return ArgPolicy("ember", note)


def _no_effect(reason: str) -> ArgPolicy:
    return ArgPolicy("no_effect", reason)


def _only(reason: str, *values: Any) -> ArgPolicy:
    return ArgPolicy("only", reason, values=values)


def _only_if(reason: str, honoured_text: str, honours: Callable[[Any], bool]) -> ArgPolicy:
    return ArgPolicy("only", reason, honours=honours, honoured_text=honoured_text)


def _setting(value: Any, name: str) -> Any:
    """`name` of a config given as a dict or as vLLM's config object (None when absent)."""
    if isinstance(value, Mapping):
        return value.get(name)
    return getattr(value, name, None)


_MULTIMODAL = _no_effect("multimodal input; ember runs text-only models")
_LORA = _no_effect(
    "a LoRA option ember lacks (it honours enable_lora, max_loras, max_lora_rank, max_cpu_loras)"
)
_MAMBA = _no_effect("Mamba state caches; ember has no Mamba models")
_DATA_PARALLEL = _no_effect(
    "configures vLLM's data-parallel coordination; ember's replicas (data_parallel_size, or "
    "the VLLM_DP_* environment) need none of it"
)
_CONTEXT_PARALLEL = _no_effect("configures context parallelism, which ember runs at size 1")
_EXPERTS = _no_effect(
    "expert load balancing and all-to-all kernels; ember's expert parallelism (enable_expert_"
    "parallel) places each expert on one rank and sums the ranks' outputs with one all-reduce"
)
_DUAL_BATCH = _no_effect("dual-batch overlap, an expert- and data-parallel optimisation")
_KERNELS = _no_effect("chooses vLLM's kernels; ember has one kernel per operation and device")
_LOADING = _no_effect("how vLLM reads weights; ember memory-maps safetensors and GGUF files")
_OFFLOAD = _no_effect("configures weight offloading (offload_group_size), which ember does not do")
_METRICS = _no_effect("vLLM's metrics and tracing; ember's metrics are LLM.get_metrics()")
_SCHEDULING = _no_effect("a scheduling heuristic of vLLM's; ember's outputs do not depend on it")
_SLEEP = _no_effect("configures sleep mode (enable_sleep_mode)")

_POLICIES: dict[str, ArgPolicy] = {
    "model": _ember(
        "a hub id, a directory or a .gguf file; None (ember's default) is the embedded "
        "SmolLM2-135M-Instruct"
    ),
    "enable_return_routed_experts": _only("returning MoE routing decisions is not supported"),
    "return_sampling_mask": _only("returning the sampling mask is not supported"),
    "model_weights": _only("ember reads the weights from `model`"),
    "served_model_name": _no_effect(
        "names the model in vLLM's server; ember's metrics are labelled with `model`"
    ),
    "tokenizer": _ember("a hub id or a directory; None: the model's"),
    "hf_config_path": _only("ember reads config.json from the model"),
    "runner": _ember("'auto', 'generate' or 'pooling'"),
    "convert": _ember("'auto', 'none', 'embed' or 'classify'"),
    "skip_tokenizer_init": _ember("honoured"),
    "enable_prompt_embeds": _only("prompts given as embeddings are not supported"),
    "tokenizer_mode": _ember(
        "'auto', 'hf', 'slow' or 'mistral' (mistral_common's tokenizer); vLLM's other "
        "tokenizer modes ('deepseek_v32', ...) raise NotImplementedError"
    ),
    "trust_remote_code": _ember("honoured"),
    "allowed_local_media_path": _MULTIMODAL,
    "allowed_media_domains": _MULTIMODAL,
    "download_dir": _ember("the hub cache that downloads go to and are read from"),
    "safetensors_load_strategy": _LOADING,
    "safetensors_prefetch_num_threads": _LOADING,
    "safetensors_prefetch_block_size": _LOADING,
    "load_format": _ember("'auto', 'safetensors', 'gguf' or 'dummy'; another raises ValueError"),
    "config_format": _only("ember reads the Hugging Face config.json", "hf"),
    "dtype": _ember("honoured; 'auto' is float32 on CPU"),
    "kv_cache_dtype": _ember(
        "'auto' (the model's dtype) or 'fp8' = 'fp8_e4m3': keys and values stored as e4m3 "
        "(one byte: twice the tokens of bfloat16 in the same memory) over a per-layer "
        "k_scale / v_scale, 1.0 unless calculate_kv_scales=True (an ember option, an engine "
        "argument of earlier vLLM releases) sets them from the first step, and read in place by attention (CPU and CUDA). "
        "vLLM's other formats (fp8_e5m2, fp8_inc, ...) raise NotImplementedError"
    ),
    "seed": _ember("honoured"),
    "max_model_len": _ember("honoured"),
    "cudagraph_capture_sizes": _no_effect(
        "ember picks its CUDA-graph batch sizes (enforce_eager=True turns graphs off)"
    ),
    "max_cudagraph_capture_size": _no_effect(
        "ember picks its CUDA-graph batch sizes (enforce_eager=True turns graphs off)"
    ),
    "ir_op_priority": _KERNELS,
    "distributed_executor_backend": _ember(
        "None, 'mp' or 'uni'; 'ray' and 'external_launcher' raise NotImplementedError"
    ),
    "pipeline_parallel_size": _only(
        "every rank holds all layers; split a model with tensor_parallel_size"
    ),
    "master_addr": _no_effect("ember's ranks meet on a private local address"),
    "master_port": _no_effect("ember's ranks meet on a private local address"),
    "nnodes": _only("ember runs on one machine"),
    "node_rank": _only("ember runs on one machine"),
    "distributed_timeout_seconds": _no_effect(
        "a stuck step fails after execute_model_timeout_s (ember's option)"
    ),
    "cpu_distributed_timeout_seconds": _no_effect(
        "a stuck step fails after execute_model_timeout_s (ember's option)"
    ),
    "numa_bind": _no_effect("ember does not bind workers to NUMA nodes (num_threads sets threads)"),
    "numa_bind_nodes": _no_effect("ember does not bind workers to NUMA nodes"),
    "numa_bind_cpus": _no_effect("ember does not bind workers to NUMA nodes"),
    "device_ids": _only("choose the GPUs with CUDA_VISIBLE_DEVICES"),
    "tensor_parallel_size": _ember("honoured (one worker process per rank)"),
    "prefill_context_parallel_size": _only("context parallelism is not supported"),
    "decode_context_parallel_size": _only("context parallelism is not supported"),
    "dcp_comm_backend": _CONTEXT_PARALLEL,
    "dcp_q_replicate": _CONTEXT_PARALLEL,
    "dcp_kv_cache_interleave_size": _CONTEXT_PARALLEL,
    "cp_kv_cache_interleave_size": _CONTEXT_PARALLEL,
    "data_parallel_size": _ember(
        "N engine-core replicas (each with tensor_parallel_size worker ranks, on CUDA its own "
        "slice of CUDA_VISIBLE_DEVICES) behind one LLM; each request goes to the replica with "
        "the fewest pending tokens and outputs come back in input order. VLLM_DP_RANK / "
        "VLLM_DP_SIZE / VLLM_DP_MASTER_IP / VLLM_DP_MASTER_PORT in the environment instead make "
        "the process one rank of a group that meets at start and shutdown (README: Data "
        "parallelism)"
    ),
    "data_parallel_rank": _DATA_PARALLEL,
    "data_parallel_start_rank": _DATA_PARALLEL,
    "data_parallel_size_local": _DATA_PARALLEL,
    "data_parallel_address": _DATA_PARALLEL,
    "data_parallel_rpc_port": _DATA_PARALLEL,
    "data_parallel_hybrid_lb": _DATA_PARALLEL,
    "data_parallel_external_lb": _DATA_PARALLEL,
    "data_parallel_multi_port_external_lb": _DATA_PARALLEL,
    "data_parallel_backend": _DATA_PARALLEL,
    "enable_hc_sp": _no_effect("HyperConnection sequence parallelism; ember has no such model"),
    "enable_expert_parallel": _ember(
        "MoE layers (Mixtral, Qwen2-MoE, Qwen3-MoE, GraniteMoE) hold whole experts, placed over "
        "the tensor-parallel ranks by expert_placement_strategy, instead of a slice of every "
        "expert; each rank runs its experts on the tokens routed to them and the all-reduce "
        "sums the ranks. No effect on a model without experts (logged) or at "
        "tensor_parallel_size=1. Experts of GPTQ / AWQ / compressed-tensors checkpoints too "
        "(each rank holds its experts' quantized layers whole)"
    ),
    "enable_batch_sharded_sampling": _no_effect("rank 0 samples the whole batch"),
    "enable_ep_weight_filter": _EXPERTS,
    "moe_backend": _KERNELS,
    "linear_backend": _KERNELS,
    "sparse_indexer_topk_backend": _KERNELS,
    "all2all_backend": _EXPERTS,
    "enable_elastic_ep": _EXPERTS,
    "elastic_ep_max_dp_size": _EXPERTS,
    "enable_dbo": _DUAL_BATCH,
    "ubatch_size": _DUAL_BATCH,
    "dbo_decode_token_threshold": _DUAL_BATCH,
    "dp_sync_interval": _DATA_PARALLEL,
    "dbo_prefill_token_threshold": _DUAL_BATCH,
    "disable_nccl_for_dp_synchronization": _DATA_PARALLEL,
    "eplb_config": _EXPERTS,
    "enable_eplb": _EXPERTS,
    "expert_placement_strategy": _ember(
        "'linear' (contiguous blocks, the remainder on the first ranks) or 'round_robin' "
        "(expert e on rank e % tensor_parallel_size), with enable_expert_parallel; another "
        "value raises ValueError. vLLM falls back from 'round_robin' to 'linear' for models "
        "without expert groups (all four of ember's); ember places as asked"
    ),
    "_api_process_count": _no_effect("vLLM's API-server processes"),
    "_api_process_rank": _no_effect("vLLM's API-server processes"),
    "max_parallel_loading_workers": _LOADING,
    "block_size": _ember("a power of two up to 128; None (vLLM's default): 16"),
    "enable_prefix_caching": _ember("honoured; None (vLLM's default): on, off for pooling"),
    "prefix_caching_hash_algo": _no_effect(
        "ember keys a cached block by a chained hash and its token ids, so a hit is exact"
    ),
    "prefix_cache_retention_interval": _no_effect(
        "sliding-window and Mamba prefix checkpoints; ember caches whole blocks"
    ),
    "disable_sliding_window": _only("sliding-window models run with their window"),
    "disable_cascade_attn": _no_effect("ember has no cascade attention"),
    "offload_backend": _OFFLOAD,
    "cpu_offload_gb": _ember(
        "on CUDA, that many GiB of the decoder layers' weights stay in pinned host memory and "
        "are copied in for each forward (vLLM's non-UVA path; CUDA graphs off); on CPU, no "
        "effect (the weights are in host memory already)"
    ),
    "cpu_offload_params": _OFFLOAD,
    "offload_group_size": _only("prefetch offloading of layer groups is not supported"),
    "offload_num_in_group": _OFFLOAD,
    "offload_prefetch_step": _OFFLOAD,
    "offload_params": _OFFLOAD,
    "gpu_memory_utilization": _ember("honoured on CUDA; ember's default is 0.9"),
    "kv_cache_memory_bytes": _ember("honoured (on CPU the KV-cache budget)"),
    "max_num_batched_tokens": _ember("honoured; None: 2048 on CPU, 8192 on CUDA"),
    "max_num_scheduled_tokens": _no_effect(
        "ember schedules up to max_num_batched_tokens (it differs only with speculative decoding)"
    ),
    "long_prefill_token_threshold": _ember("honoured"),
    "long_prefill_token_threshold_adaptive": _SCHEDULING,
    "max_num_seqs": _ember("honoured; None (vLLM's default): 256"),
    "max_num_active_seqs": _no_effect("ember admits up to max_num_seqs running requests"),
    "max_num_queued_reqs": _no_effect(
        "rejects server requests with HTTP 503; ember's LLM queues every request"
    ),
    "max_num_queued_tokens": _no_effect(
        "rejects server requests with HTTP 503; ember's LLM queues every request"
    ),
    "max_logprobs": _ember("honoured; -1 allows the whole vocabulary"),
    "logprobs_mode": _ember("honoured: raw or processed, logprobs or logits"),
    "use_fp64_gumbel": _no_effect("ember's sampler draws its random numbers in float32"),
    "enable_trace_replay": _no_effect(
        "it lets requests set trace_decode_token_ids, which ember's SamplingParams lacks"
    ),
    "disable_log_stats": _ember("False adds a periodic stats line; metrics are always kept"),
    "aggregate_engine_logging": _DATA_PARALLEL,
    "revision": _ember("honoured"),
    "code_revision": _only("remote code comes from the model's own revision"),
    "hf_token": _ember("passed to huggingface_hub for downloads"),
    "hf_overrides": _ember(
        "a dict merged into the Hugging Face config, or a function of the config returning it"
    ),
    "model_class_overrides": _only("ember's model classes are fixed"),
    "tokenizer_revision": _ember("honoured; None: the model's revision"),
    "quantization": _ember(
        "None (the checkpoint's own quantization_config, if any), 'gguf', 'gptq', 'awq', "
        "'compressed-tensors', 'fp8' (a checkpoint's, or FP8 at load of a dense one) (and "
        "vLLM's 'gptq_marlin', 'awq_marlin' for the same checkpoints); one that contradicts "
        "the checkpoint raises ValueError, another NotImplementedError"
    ),
    "quantization_config": _only("quantization settings are not supported"),
    "allow_deprecated_quantization": _no_effect(
        "ember has no deprecated quantization methods to allow"
    ),
    "enforce_eager": _ember("honoured (no CUDA graphs)"),
    "disable_custom_all_reduce": _no_effect("ember's all-reduce is torch.distributed's"),
    "enable_shm_tensor_arena": _no_effect("ember's shared-memory ring carries its own messages"),
    "language_model_only": _MULTIMODAL,
    "limit_mm_per_prompt": _MULTIMODAL,
    "enable_mm_embeds": _MULTIMODAL,
    "interleave_mm_strings": _MULTIMODAL,
    "media_io_kwargs": _MULTIMODAL,
    "mm_processor_kwargs": _MULTIMODAL,
    "mm_processor_cache_gb": _MULTIMODAL,
    "mm_processor_cache_type": _MULTIMODAL,
    "mm_hasher_algorithm": _MULTIMODAL,
    "mm_shm_cache_max_object_size_mb": _MULTIMODAL,
    "mm_encoder_only": _MULTIMODAL,
    "mm_encoder_tp_mode": _MULTIMODAL,
    "mm_encoder_attn_backend": _MULTIMODAL,
    "mm_encoder_attn_dtype": _MULTIMODAL,
    "mm_encoder_fp8_scale_path": _MULTIMODAL,
    "mm_encoder_fp8_scale_save_path": _MULTIMODAL,
    "mm_encoder_fp8_scale_save_margin": _MULTIMODAL,
    "io_processor_plugin": _only("IO processor plugins are not supported"),
    "renderer_num_workers": _no_effect(
        "ember tokenizes in the LLM's process (vLLM's LLM ignores it too)"
    ),
    "skip_mm_profiling": _MULTIMODAL,
    "video_pruning_rate": _MULTIMODAL,
    "video_pruning_method": _MULTIMODAL,
    "mm_tensor_ipc": _MULTIMODAL,
    "mm_processor_device": _MULTIMODAL,
    "mm_ipc_gpu_memory_gb": _MULTIMODAL,
    "mm_device_do_normalize": _MULTIMODAL,
    "enable_lora": _ember(
        "honoured: PEFT adapters on q/k/v/o/gate/up/down_proj per request (lora_request)"
    ),
    "max_loras": _ember("honoured: distinct adapters in one step (device slots)"),
    "max_lora_rank": _ember("honoured: the largest adapter rank; a larger one raises ValueError"),
    "default_mm_loras": _LORA,
    "fully_sharded_loras": _LORA,
    "max_cpu_loras": _ember("honoured: adapters kept loaded in host memory (LRU)"),
    "lora_dtype": _LORA,
    "lora_target_modules": _LORA,
    "enable_tower_connector_lora": _LORA,
    "specialize_active_lora": _LORA,
    "enable_mixed_moe_lora_format": _LORA,
    "enable_moe_shared_loras": _LORA,
    "max_lora_cls_labels": _LORA,
    "ray_workers_use_nsight": _no_effect("ember does not run on Ray"),
    "num_gpu_blocks_override": _ember("honoured (the number of KV-cache blocks)"),
    "model_loader_extra_config": _LOADING,
    "ignore_patterns": _no_effect(
        "ember downloads config, tokenizer and weight files only, never original/ or "
        "consolidated* copies"
    ),
    "enable_chunked_prefill": _only(
        "ember always splits a prompt longer than the step's token budget (max_num_batched_tokens)",
        True,
    ),
    "disable_chunked_mm_input": _MULTIMODAL,
    "scheduler_reserve_full_isl": _SCHEDULING,
    "prefill_schedule_interval": _DATA_PARALLEL,
    "watermark": _SCHEDULING,
    "disable_hybrid_kv_cache_manager": _no_effect("ember's KV cache is one pool of blocks"),
    "structured_outputs_config": _ember("honoured (backends xgrammar, guidance, outlines)"),
    "aux_output_config": _only_if(
        "returning MoE routing decisions is not supported",
        "enable_return_routed_experts False",
        lambda value: not _setting(value, "enable_return_routed_experts"),
    ),
    "reasoning_parser": _only("reasoning parsers are not supported"),
    "reasoning_parser_plugin": _only("reasoning parsers are not supported"),
    "speculative_config": _no_effect(
        "speculative decoding changes speed, not outputs; ember decodes a token per step"
    ),
    "spec_method": _no_effect(
        "speculative decoding changes speed, not outputs; ember decodes a token per step"
    ),
    "spec_model": _no_effect(
        "speculative decoding changes speed, not outputs; ember decodes a token per step"
    ),
    "spec_tokens": _no_effect(
        "speculative decoding changes speed, not outputs; ember decodes a token per step"
    ),
    "watermark_config": _only("text watermarking is not supported"),
    "diffusion_config": _only("diffusion language models are not supported"),
    "show_hidden_metrics_for_version": _METRICS,
    "otlp_traces_endpoint": _METRICS,
    "collect_detailed_traces": _METRICS,
    "per_request_spec_decode_metrics": _METRICS,
    "kv_cache_metrics": _METRICS,
    "kv_cache_metrics_sample": _METRICS,
    "custom_histogram_buckets": _METRICS,
    "cudagraph_metrics": _METRICS,
    "enable_layerwise_nvtx_tracing": _METRICS,
    "enable_mfu_metrics": _METRICS,
    "enable_logging_iteration_details": _METRICS,
    "jit_monitor_mode": _no_effect("vLLM's monitor of JIT compilation after warm-up"),
    "jit_monitor_verbose": _no_effect("vLLM's monitor of JIT compilation after warm-up"),
    "enable_mm_processor_stats": _MULTIMODAL,
    "scheduling_policy": _ember("'fcfs' or 'priority' (a request's `priority`)"),
    "scheduler_cls": _only("ember's scheduler is fixed"),
    "pooler_config": _only(
        "ember's pooler follows the model (sentence-transformers files) and `convert`"
    ),
    "compilation_config": _no_effect(
        "ember runs no torch.compile; CUDA graphs follow enforce_eager"
    ),
    "attention_config": _KERNELS,
    "engram_config": _only("n-gram embedding models are not supported"),
    "mamba_config": _MAMBA,
    "kernel_config": _KERNELS,
    "enable_flashinfer_autotune": _KERNELS,
    "worker_cls": _only("ember's worker class is fixed"),
    "worker_extension_cls": _only("ember's worker class is fixed"),
    "profiler_config": _only_if(
        "ember traces with torch.profiler into LLM(profile_dir=...)",
        "profiler None",
        lambda value: _setting(value, "profiler") is None,
    ),
    "logging_config": _no_effect("configures vLLM's loggers; ember logs under 'ember'"),
    "log_level": _no_effect("configures vLLM's loggers; ember logs under 'ember'"),
    "log_config_file": _no_effect("configures vLLM's loggers; ember logs under 'ember'"),
    "kv_transfer_config": _only("KV transfer between instances is not supported"),
    "kv_events_config": _only("publishing KV-cache events is not supported"),
    "ec_transfer_config": _only("encoder-cache transfer between instances is not supported"),
    "ec_manager_config": _MULTIMODAL,
    "reasoning_config": _only("reasoning-model settings are not supported"),
    "generation_config": _ember(
        "'auto' (the model's generation_config.json sets the default sampling parameters), "
        "'vllm', or a directory"
    ),
    "enable_sleep_mode": _ember("honoured (LLM.sleep, LLM.wake_up)"),
    "sleep_mode_offload_cudagraph": _SLEEP,
    "sleep_preserve_parameter_names": _SLEEP,
    "enable_cumem_allocator": _no_effect("ember allocates through torch's caching allocator"),
    "enable_nccl_comm_suspend": _SLEEP,
    "override_generation_config": _ember("fields that win over generation_config's"),
    "model_impl": _only("ember runs its own model implementations", "vllm"),
    "attention_backend": _KERNELS,
    "kv_cache_dtype_skip_layers": _only(
        "kv_cache_dtype='fp8' stores every layer's keys and values in e4m3"
    ),
    "mamba_cache_dtype": _MAMBA,
    "mamba_ssm_cache_dtype": _MAMBA,
    "mamba_block_size": _MAMBA,
    "prefix_match_unit": _no_effect("ember's prefix cache matches whole blocks (block_size)"),
    "mamba_cache_mode": _MAMBA,
    "enable_mamba_shared_prefix_checkpoint": _MAMBA,
    "replayssm_buffer_len": _MAMBA,
    "use_replayssm": _MAMBA,
    "mamba_backend": _MAMBA,
    "mamba_ssu_algorithm": _MAMBA,
    "enable_mamba_cache_stochastic_rounding": _MAMBA,
    "mamba_cache_philox_rounds": _MAMBA,
    "additional_config": _no_effect("settings for vLLM's platform plugins"),
    "use_tqdm_on_load": _no_effect("ember shows no progress bar while loading"),
    "pt_load_map_location": _LOADING,
    "logits_processors": _ember(
        "honoured: vLLM v1's class-based processors (`ember.logits_process` interface), by "
        "class or '<module>:<class>'; built in the rank-0 worker, options per request in "
        "SamplingParams.extra_args"
    ),
    "async_scheduling": _ember(
        "honoured: the next step is scheduled while the workers run this one (their own "
        "sampled tokens feed it); None: on for CPU models, off on CUDA (not yet checked there)"
    ),
    "stream_interval": _no_effect("streaming granularity of vLLM's server"),
    "kv_sharing_fast_prefill": _no_effect(
        "for models whose layers share KV (Gemma 3n); ember has none"
    ),
    "swa_bounded_replay": _no_effect(
        "DeepSeek-V4.1's sliding-window prefix caching; ember has no such model"
    ),
    "optimization_level": _no_effect(
        "ember has one optimisation level (enforce_eager turns CUDA graphs off)"
    ),
    "performance_mode": _no_effect(
        "ember has one optimisation level (enforce_eager turns CUDA graphs off)"
    ),
    "fault_tolerance_config": _no_effect(
        "ember fails pending requests with EngineDeadError when a process dies"
    ),
    "enable_fault_tolerance": _no_effect(
        "ember fails pending requests with EngineDeadError when a process dies"
    ),
    "kv_offloading_size": _no_effect(
        "ember keeps the KV cache on its device; offloading changes speed, not outputs"
    ),
    "kv_offloading_backend": _no_effect(
        "ember keeps the KV cache on its device; offloading changes speed, not outputs"
    ),
    "tokens_only": _only("pass skip_tokenizer_init=True"),
    "shutdown_timeout": _no_effect("LLM.shutdown() aborts in-flight requests and stops"),
    "weight_transfer_config": _only("weight transfer between instances is not supported"),
    "fail_on_environ_validation": _no_effect("ember reads no VLLM_* environment variables"),
    "gdn_prefill_backend": _KERNELS,
    "kda_prefill_backend": _KERNELS,
    "kda_decode_backend": _KERNELS,
    "chat_template": _ember("chat()'s default template (a file, or the template)"),
}


# Options ember's `EngineArgs` takes although they change nothing (logged when given to LLM).
_NO_EFFECT_EMBER_FIELDS = frozenset({"disable_custom_all_reduce"})
# Options whose vLLM default None means "the platform's default": ember's default then.
_NONE_IS_EMBER_DEFAULT = frozenset({"block_size", "enable_prefix_caching", "max_num_seqs"})


def policy(name: str) -> ArgPolicy | None:
    """ember's policy for vLLM's argument `name`; None when vLLM has no such argument."""
    return _POLICIES.get(name)


def vllm_argument_defaults() -> dict[str, Any]:
    """vLLM's default of each of its arguments, `EngineArgs` fields first, in vLLM's order."""
    return dict(VLLM_ENGINE_ARGS + VLLM_LLM_ONLY_ARGS)


def checked_names() -> frozenset[str]:
    """The arguments ember accepts through this table ("no_effect" and "only")."""
    return frozenset(name for name, rule in _POLICIES.items() if rule.kind in ("no_effect", "only"))


def _is_default(value: Any, default: Any) -> bool:
    """Whether `value` asks for what vLLM's default gives: equal to it, or, for a default that
    is a container or a config object, None or empty."""
    empty = value is None or (isinstance(value, (dict, list, set, tuple)) and not value)
    if empty and (default is None or isinstance(default, (dict, list, set, ConfigDefault))):
        return True
    if isinstance(default, ConfigDefault):  # a config object given: not comparable here
        return False
    if isinstance(value, bool) != isinstance(default, bool):  # True == 1, but not here
        return False
    try:
        return bool(value == default)
    except (TypeError, ValueError):  # an array, say: not the default
        return False


def _honoured(rule: ArgPolicy, value: Any) -> bool:
    if rule.honours is not None:
        return rule.honours(value)
    return any(type(value) is type(allowed) and value == allowed for allowed in rule.values)


def _short_repr(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


@functools.cache
def _logged_names() -> set[str]:
    """The arguments this process has logged as having no effect (one set per process)."""
    return set()


def log_no_effect(name: str, value: Any, reason: str) -> None:
    """Log at INFO, once per process and argument, that `name=value` changes nothing here."""
    if name in _logged_names():
        return
    _logged_names().add(name)
    logger.info(
        "%s=%s is accepted and has no effect in ember: %s", name, _short_repr(value), reason
    )


def check_vllm_engine_args(kwargs: Mapping[str, Any]) -> None:
    """Apply the table to keyword arguments: log a "no_effect" one given a non-default value
    (once per process and argument), raise NotImplementedError for an "only" one at a value
    ember does not honour. Names the table does not check are left alone."""
    defaults = vllm_argument_defaults()
    for name, value in kwargs.items():
        rule = _POLICIES.get(name)
        if rule is None or rule.kind not in ("no_effect", "only"):
            continue
        if _is_default(value, defaults[name]):
            continue
        if rule.kind == "only" and not _honoured(rule, value):
            raise NotImplementedError(
                f"{name}={_short_repr(value)} is not supported: {rule.note} "
                f"(ember accepts {_accepted_text(name, rule)})"
            )
        log_no_effect(name, value, rule.note)


def ember_engine_kwargs(
    kwargs: Mapping[str, Any], ember_fields: Collection[str], caller: str = "LLM()"
) -> dict[str, Any]:
    """The keyword arguments of `caller` that ember's `EngineArgs` takes (`ember_fields`), once
    the rest are checked against vLLM's table: TypeError for a name neither has. An option of
    ember's own is never refused here (its checks are `EngineArgs`'); one the table says has
    no effect (disable_custom_all_reduce) is logged, and one given as None where None is
    vLLM's "platform default" (block_size, ...) is left to ember's default."""
    unknown = set(kwargs) - set(ember_fields) - checked_names()
    if unknown:
        raise TypeError(f"{caller} got unexpected keyword argument(s): {sorted(unknown)}")
    check_vllm_engine_args(
        {
            name: value
            for name, value in kwargs.items()
            if name not in ember_fields or name in _NO_EFFECT_EMBER_FIELDS
        }
    )
    return {
        name: value
        for name, value in kwargs.items()
        if name in ember_fields and not (value is None and name in _NONE_IS_EMBER_DEFAULT)
    }


# ---- the README table ----------------------------------------------------------------------


def _accepted_text(name: str, rule: ArgPolicy) -> str:
    if rule.honours is not None:
        return rule.honoured_text
    values = [vllm_argument_defaults()[name], *rule.values]
    if None in values and len(values) > 1:  # None is vLLM's "platform default"
        values = [value for value in values if value is not None] + [None]
    return ", ".join(repr(value) for value in values)


def _describe(name: str, rule: ArgPolicy) -> str:
    if rule.kind == "ember":
        return f"ember option: {rule.note}"
    if rule.kind == "no_effect":
        return f"accepted, no effect: {rule.note}"
    if rule.kind == "only":
        return (
            f"only `{_accepted_text(name, rule)}`; another value raises NotImplementedError: "
            f"{rule.note}"
        )
    raise AssertionError(f"{name}: unknown policy kind {rule.kind!r}")


def markdown_table() -> str:
    """The README's table: every argument of vLLM's `EngineArgs` and `LLM`, its default in
    vLLM, and what ember does with it."""
    lines = [_TABLE_HEADER.rstrip("\n"), "| --- | --- | --- |"]
    for name, default in VLLM_ENGINE_ARGS + VLLM_LLM_ONLY_ARGS:
        text = _describe(name, _POLICIES[name]).replace("|", "\\|")
        lines.append(f"| `{name}` | `{default!r}` | {text} |")
    return "\n".join(lines) + "\n"


_TABLE_HEADER = "| argument | vLLM's default | ember |\n"


def update_readme(path: str) -> None:
    """Replace the table in `path` (from its header line to the first line that is not a
    table row) with `markdown_table()`."""
    with open(path) as f:
        lines = f.readlines()
    start = lines.index(_TABLE_HEADER)
    end = start
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    lines[start:end] = markdown_table().splitlines(keepends=True)
    with open(path, "w") as f:
        f.writelines(lines)


def main(argv: list[str]) -> int:
    if argv == ["--markdown"]:
        sys.stdout.write(markdown_table())
    elif len(argv) == 2 and argv[0] == "--update-readme":
        update_readme(argv[1])
    else:
        print(
            "usage: python -m ember.enginecore.vllm_engine_args --markdown | "
            "--update-readme README.md",
            file=sys.stderr,
        )
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
