"""What LoRA costs ember, on one workload (W1 by default), in one run: the four configurations
of issue #21, each through `bench_throughput.py` (same prompts, greedy, EOS ignored), side by
side:

- base: `enable_lora=False`;
- enable_lora, no adapter: `enable_lora=True`, every request on the base model;
- 1 adapter: one random rank-16 adapter on all seven targets, used by every request;
- 4 adapters: four random rank-16 adapters (`max_loras=4`), the prompts using them in turn.

    python tools/bench_lora.py                       # W1: 32 prompts of 32-256 tokens, 64 out
    python tools/bench_lora.py --single              # batch-1 decode instead
    python tools/bench_lora.py --repeat 3 --rank 16 --rounds 2
    python tools/bench_lora.py --same-engine --rounds 5   # the adapters' cost alone

Each round runs the four configurations in turn (a fresh engine each); a configuration's
figure is its best pass over all rounds, so that a slow moment of a shared machine does not
land on one configuration only.

`--same-engine` times the adapters apart from engine starts and the machine's slow moments:
one engine (`enable_lora=True`, `max_loras=4`) runs W1 with no adapter, with one adapter and
with four, in turn, `--rounds` times, and prints each configuration's median and best pass
against the no-adapter passes of the same engine (which run the code `enable_lora=False`
runs: the fused decode step, no LoRA math).

The ISA is the CPU's (set EMBER_CPU_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2
to time the AVX2 path); figures name it.
"""

from __future__ import annotations

import argparse


def _configs(rank: int) -> list[tuple[str, list[str]]]:
    return [
        ("base", []),
        ("enable_lora, no adapter", ["--ember-kwargs", '{"enable_lora": true}']),
        (f"1 adapter (rank {rank})", ["--lora", "1", "--lora-rank", str(rank)]),
        (f"4 adapters (rank {rank})", ["--lora", "4", "--lora-rank", str(rank)]),
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--single", action="store_true", help="batch-1 decode workload")
    parser.add_argument("--rounds", type=int, default=2, help="runs of all four, interleaved")
    parser.add_argument(
        "--same-engine", action="store_true", help="no adapter / one / four in one engine"
    )
    args = parser.parse_args(argv)
    if args.same_engine:
        same_engine(args.rank, args.rounds, args.single)
        return
    from bench_throughput import best_of_rounds

    from ember.kernels.cpu_features import cpu_isa

    configs = [(name, ["--engines", "ember", *extra]) for name, extra in _configs(args.rank)]
    best = best_of_rounds(configs, args.rounds, args.repeat, args.single)
    results = list(best.items())
    base = results[0][1]["output_tok_s"]
    workload = "batch-1 decode" if args.single else "W1"
    passes = args.repeat * args.rounds
    print(
        f"ember, {workload}, CPU ISA {cpu_isa()}, best of {passes} passes in {args.rounds} rounds"
    )
    print("configuration            , output tok/s, vs base")
    for name, record in results:
        tok_s = record["output_tok_s"]
        print(f"{name:<25}, {tok_s:12.1f}, {tok_s / base - 1:+8.1%}")


def same_engine(rank: int, rounds: int, single: bool) -> None:
    """No adapter, one, four: interleaved passes of one engine (see the module's text)."""
    import statistics
    import time
    from types import SimpleNamespace

    from bench_throughput import default_model, make_workload, write_random_adapters

    from ember import LLM, SamplingParams
    from ember.kernels.cpu_features import cpu_isa

    workload = SimpleNamespace(
        model=default_model(),
        model_shape="",
        seed=0,
        num_prompts=1 if single else 32,
        input_len_min=32,
        input_len_max=256,
        output_len=64,
    )
    work = make_workload(workload)
    prompts = [{"prompt_token_ids": ids} for ids in work["prompts"]]
    params = SamplingParams(max_tokens=work["output_len"], ignore_eos=True, temperature=0.0)
    llm = LLM(model=workload.model, enable_lora=True, max_loras=4, max_lora_rank=rank)
    adapters = write_random_adapters(llm, 4, rank)
    configs = {
        "no adapter": None,
        f"1 adapter (rank {rank})": adapters[0],
        f"4 adapters (rank {rank})": [adapters[i % 4] for i in range(len(prompts))],
    }
    tokens = len(prompts) * work["output_len"]
    seconds: dict[str, list[float]] = {name: [] for name in configs}
    for round_index in range(rounds + 1):  # the first round warms up, untimed
        for name, lora in configs.items():
            llm.reset_prefix_cache()
            start = time.perf_counter()
            llm.generate(prompts, params, lora_request=lora, use_tqdm=False)
            if round_index:
                seconds[name].append(time.perf_counter() - start)
    base = statistics.median(seconds["no adapter"])
    workload_name = "batch-1 decode" if single else "W1"
    print(f"ember, {workload_name}, CPU ISA {cpu_isa()}, one engine, {rounds} interleaved rounds")
    print("configuration            , median tok/s, vs none, best tok/s, passes (s)")
    for name, times in seconds.items():
        median = statistics.median(times)
        print(
            f"{name:<25}, {tokens / median:12.1f}, {base / median - 1:+7.1%}, "
            f"{tokens / min(times):10.1f}, {' '.join(f'{t:.2f}' for t in times)}"
        )
    llm.shutdown()


if __name__ == "__main__":
    main()
