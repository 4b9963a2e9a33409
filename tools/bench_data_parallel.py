"""What data parallelism gives ember on one workload (W1 by default: 32 prompts of random ids,
32-256 tokens in, 64 out, greedy, EOS ignored), through `bench_throughput.py`: the same prompts
on `LLM(...)` and on `LLM(..., data_parallel_size=N)`, side by side.

    python tools/bench_data_parallel.py                    # DP=1 vs DP=2, default model, 2 threads
    python tools/bench_data_parallel.py --sizes 1,2 --threads 2 --repeat 2 --rounds 2

The configurations share `--threads` cores: DP=N gives each replica threads / N of them
(`num_threads`), so the figures compare two ways of using the same cores, not more cores. Each
round runs every configuration in turn (a fresh engine each); a configuration's figure is its
best pass over all rounds, so that a slow moment of a shared machine does not land on one only.
"""

from __future__ import annotations

import argparse
import json


def _configs(sizes: list[int], threads: int) -> list[tuple[str, list[str]]]:
    configs = []
    for size in sizes:
        kwargs = {"num_threads": max(1, threads // size)}
        if size > 1:
            kwargs["data_parallel_size"] = size
        extra = ["--engines", "ember", "--threads", str(threads)]
        configs.append((f"DP={size}", [*extra, "--ember-kwargs", json.dumps(kwargs)]))
    return configs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1,2", help="data_parallel_size values, comma-separated")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads shared by the replicas")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="runs of all sizes, interleaved")
    parser.add_argument("--single", action="store_true", help="batch-1 decode workload")
    args = parser.parse_args(argv)
    sizes = [int(size) for size in args.sizes.split(",")]
    from bench_throughput import best_of_rounds

    from ember.kernels.cpu_features import cpu_isa

    best = best_of_rounds(_configs(sizes, args.threads), args.rounds, args.repeat, args.single)
    results = list(best.items())
    base = results[0][1]["output_tok_s"]
    workload = "batch-1 decode" if args.single else "W1"
    passes = args.repeat * args.rounds
    print(
        f"ember, {workload}, {args.threads} threads, CPU ISA {cpu_isa()}, "
        f"best of {passes} passes in {args.rounds} rounds"
    )
    print("configuration, output tok/s, vs first, load s")
    for name, record in results:
        tok_s = record["output_tok_s"]
        print(
            f"{name:<13}, {tok_s:12.1f}, {tok_s / base - 1:+8.1%}, {record.get('load_s', 0):6.1f}"
        )


if __name__ == "__main__":
    main()
