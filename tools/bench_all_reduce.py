"""What tensor parallelism's collectives cost on this machine: gloo all-reduce, gather and
broadcast between worker-like processes, timed per call at decode-step sizes, and summed per
decode step of a model shape (SmolLM2-135M by default: 30 layers, hidden 576, vocab 49152).

One decode step of a TP model makes (2 x layers + 1) all-reduces of [tokens, hidden] (each
layer's o_proj and down_proj, and the embedding), one gather of the logits' shares
[tokens, vocab / tp] to rank 0, and one broadcast of the sampled ids [2, tokens].

    python tools/bench_all_reduce.py [--world-size 2] [--tokens 1,8,32] [--iters 200]
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _time_us(fn, iters: int) -> float:
    for _ in range(10):
        fn()
    dist.barrier()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def _run(rank: int, args: argparse.Namespace, store: str, results) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=args.world_size
    )
    rows = []
    for tokens in args.tokens:
        hidden = torch.randn(tokens, args.hidden)
        shard = torch.randn(tokens, args.vocab // args.world_size)
        parts = [torch.empty_like(shard) for _ in range(args.world_size)] if rank == 0 else None
        sampled = torch.zeros(2, tokens, dtype=torch.int64)
        all_reduce = _time_us(functools.partial(dist.all_reduce, hidden), args.iters)
        gather = _time_us(functools.partial(dist.gather, shard, parts, dst=0), args.iters)
        broadcast = _time_us(functools.partial(dist.broadcast, sampled, src=0), args.iters)
        rows.append((tokens, all_reduce, gather, broadcast))
    if rank == 0:
        results.put(rows)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--tokens", default="1,8,32", help="rows per collective (decodes)")
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--iters", type=int, default=200)
    args = parser.parse_args()
    args.tokens = [int(t) for t in args.tokens.split(",")]
    context = mp.get_context("spawn")
    results = context.Queue()
    with tempfile.TemporaryDirectory() as directory:
        store = os.path.join(directory, "store")
        processes = [
            context.Process(target=_run, args=(rank, args, store, results))
            for rank in range(args.world_size)
        ]
        for process in processes:
            process.start()
        rows = results.get(timeout=600)
        for process in processes:
            process.join()
    all_reduces = 2 * args.layers + 1
    print(
        f"gloo, world size {args.world_size}, {os.cpu_count()} CPUs; hidden {args.hidden}, "
        f"vocab {args.vocab}, {args.layers} layers ({all_reduces} all-reduces a step); "
        "median us per call"
    )
    print("tokens, all-reduce [T, hidden], gather logits [T, vocab/tp], broadcast ids, per step ms")
    for tokens, all_reduce, gather, broadcast in rows:
        per_step_ms = (all_reduces * all_reduce + gather + broadcast) / 1000
        print(
            f"{tokens:6d}, {all_reduce:10.1f}, {gather:10.1f}, {broadcast:10.1f}, {per_step_ms:8.2f}"
        )


if __name__ == "__main__":
    main()
