"""Sleep mode: the resident memory of the worker processes before `LLM.sleep`, asleep, and
after `wake_up`, for levels 1 and 2, on the default model (or --model); and the greedy tokens
after each wake-up against those before.

    python tools/bench_sleep.py
    python tools/bench_sleep.py --model /path/to/model --kv-cache-memory-bytes 1073741824

The KV cache of a CPU engine is mapped lazily: only the blocks a batch has written are
resident, so a batch of distinct prompts runs before each measurement.
"""

from __future__ import annotations

import argparse
import time

import psutil

from ember import LLM, SamplingParams

_MIB = 1 << 20


def workers_rss(llm: LLM) -> int:
    """Resident bytes of the engine's worker processes (the engine core's children)."""
    return sum(p.memory_info().rss for p in psutil.Process(llm.engine.process.pid).children())


def run_batch(llm: LLM, prompts: list[str], max_tokens: int) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    return [list(output.outputs[0].token_ids) for output in outputs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: ember's embedded model")
    parser.add_argument("--kv-cache-memory-bytes", type=int, default=512 * _MIB)
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    text = "Describe the history of the city, its rivers, its bridges and its markets. " * 6
    prompts = [f"Request {i}: {text}" for i in range(args.num_prompts)]
    with LLM(
        args.model, enable_sleep_mode=True, kv_cache_memory_bytes=args.kv_cache_memory_bytes
    ) as llm:
        started = workers_rss(llm)
        reference = run_batch(llm, prompts, args.max_tokens)
        print(
            f"workers' RSS: {started / _MIB:.0f} MiB started, "
            f"{workers_rss(llm) / _MIB:.0f} MiB after the batch"
        )
        usage = llm.collective_rpc("get_memory_usage")[0]
        block_bytes = llm.collective_rpc("kv_cache_block_bytes")[0]
        tokens = sum(len(p) for p in llm.tokenizer(prompts)["input_ids"]) + (
            args.num_prompts * args.max_tokens
        )
        print(
            f"model {llm.model_config.model}: weights {usage['weights_bytes'] / _MIB:.0f} MiB "
            f"(parameters), KV cache {usage['kv_cache_bytes'] / _MIB:.0f} MiB allocated, "
            f"~{tokens * block_bytes / llm.llm_engine.vllm_config.cache_config.block_size / _MIB:.0f}"
            f" MiB written by the batch ({tokens} tokens)"
        )
        for level in (1, 2):
            before = workers_rss(llm)
            start = time.perf_counter()
            llm.sleep(level=level)
            sleep_s = time.perf_counter() - start
            asleep = workers_rss(llm)
            start = time.perf_counter()
            llm.wake_up()
            wake_s = time.perf_counter() - start
            awake = workers_rss(llm)
            same = run_batch(llm, prompts, args.max_tokens) == reference
            after_batch = workers_rss(llm)
            print(
                f"level {level}: workers' RSS {before / _MIB:.0f} MiB -> asleep "
                f"{asleep / _MIB:.0f} MiB ({(asleep - before) / _MIB:+.0f}) -> woken "
                f"{awake / _MIB:.0f} MiB -> after the batch {after_batch / _MIB:.0f} MiB; "
                f"sleep {sleep_s:.2f} s, wake_up {wake_s:.2f} s; greedy tokens equal: {same}"
            )


if __name__ == "__main__":
    main()
