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

Each round runs the four configurations in turn (a fresh engine each); a configuration's
figure is its best pass over all rounds, so that a slow moment of a shared machine does not
land on one configuration only.

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
    args = parser.parse_args(argv)
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


if __name__ == "__main__":
    main()
