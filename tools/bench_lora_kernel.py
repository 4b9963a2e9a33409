"""The CPU LoRA kernel alone (`kernels/lora_cpu.lora_add`, `csrc/lora_add.c`) on the default
model's four linear layers (SmolLM2-135M: q|k|v, o, gate|up, down), one rank-16 adapter on
every row, against the same delta in plain float32 torch (`x @ A^T`, then each slice's block
of B), side by side:

    python tools/bench_lora_kernel.py                # 32 rows: a W1 decode step
    python tools/bench_lora_kernel.py --rows 1 8 32 256

Microseconds a call, best of `--repeat` runs of `--calls` calls. The C figures include the
ctypes call (printed apart: the fused decode step calls the kernel from C without it). The
ISA is the CPU's (EMBER_CPU_ISA=avx2 or generic times those builds); figures name it.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

# name -> (input width K, the output slices' widths)
LAYERS = {
    "q|k|v": (576, [576, 192, 192]),
    "o": (576, [576]),
    "gate|up": (576, [1536, 1536]),
    "down": (1536, [576]),
}


def best_us(call: Callable[[], object], calls: int, repeat: int) -> float:
    call()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(calls):
            call()
        best = min(best, (time.perf_counter() - start) / calls * 1e6)
    return best


def time_layer(
    rows: int,
    k: int,
    widths: list[int],
    rank: int,
    args: argparse.Namespace,
    generator: torch.Generator,
) -> tuple[float, float, int]:
    """(C us, torch us, FLOP) of one layer's delta for `rows` rows of one adapter."""
    from ember.kernels.lora_cpu import LoRACWeights, lora_add

    n_rank, n = len(widths) * rank, sum(widths)
    lora_a = torch.randn(n_rank, k, generator=generator) * 0.05
    lora_bt = torch.randn(rank, n, generator=generator) * 0.05
    ends = torch.tensor(widths, dtype=torch.int64).cumsum(0)
    weights = LoRACWeights(lora_a.T.contiguous()[None], lora_bt[None], rank, ends)
    slots = torch.zeros(rows, dtype=torch.int64)
    x = torch.randn(rows, k, generator=generator).bfloat16()
    out = torch.zeros(rows, n).bfloat16()
    assert lora_add(x, out, slots, weights)
    x32, out32 = x.float(), out.float()
    starts = [int(end) - width for end, width in zip(ends, widths)]
    blocks = [lora_bt[:, s : s + w].T.contiguous() for s, w in zip(starts, widths)]

    def torch_delta() -> None:
        shrunk = x32 @ lora_a.T
        for index, (start, block) in enumerate(zip(starts, blocks)):
            ranks = shrunk[:, index * rank : (index + 1) * rank]
            out32[:, start : start + block.shape[0]].addmm_(ranks, block.T)

    c_us = best_us(lambda: lora_add(x, out, slots, weights), args.calls, args.repeat)
    torch_us = best_us(torch_delta, args.calls, args.repeat)
    return c_us, torch_us, 2 * rows * (n_rank * k + rank * n)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[32])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    from ember.kernels.cpu_features import cpu_isa
    from ember.kernels.lora_cpu import LoRACWeights, available, lora_add

    if not available():
        raise SystemExit("the LoRA C kernel does not build here (no C compiler)")
    generator = torch.Generator().manual_seed(0)
    rank = args.rank
    print(f"LoRA delta, rank {rank}, CPU ISA {cpu_isa()}, {torch.get_num_threads()} threads")
    print("rows, layer  , C us (ctypes incl.), torch float32 us, C GFLOP/s")
    for rows in args.rows:
        for name, (k, widths) in LAYERS.items():
            c_us, torch_us, flops = time_layer(rows, k, widths, rank, args, generator)
            print(
                f"{rows:4d}, {name:<7}, {c_us:19.1f}, {torch_us:16.1f}, {flops / c_us / 1e3:9.1f}"
            )
    empty = torch.full((32,), -1, dtype=torch.int64)
    x, out = torch.zeros(32, 576).bfloat16(), torch.zeros(32, 576).bfloat16()
    weights = LoRACWeights(
        torch.zeros(1, 576, rank), torch.zeros(1, rank, 576), rank, torch.tensor([576])
    )
    overhead = best_us(lambda: lora_add(x, out, empty, weights), args.calls, args.repeat)
    print(f"the ctypes call with no adapted row: {overhead:.1f} us")


if __name__ == "__main__":
    main()
