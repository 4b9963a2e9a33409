"""The W4A16 / W8A16 Triton GEMM (`kernels/quant_matmul_triton.py`) on a CUDA GPU: its error
against the torch reference, and its time against F.linear on the dequantized weight, on random
GPTQ-like weights of Llama-3.1-8B's shapes; then a few other tile sizes, for tuning. Needs only torch
and triton (no ember install: it finds `ember.kernels` in this checkout). About 30 s on an
H100 / H200; the exit status is the number of failed checks. Times are medians of CUDA-graph
replays (as ember's decode steps run), per call.

    python tools/gpu_check_quant_matmul.py          # from the repository root
    EMBER_CHECK_DEVICE=cpu python tools/gpu_check_quant_matmul.py   # a dry run: tiny shapes in
                                                    # Triton's interpreter, wall-clock times
"""

from __future__ import annotations

import functools
import importlib.util
import os
import statistics
import sys
import time
from pathlib import Path

DEVICE = os.environ.get("EMBER_CHECK_DEVICE", "cuda")
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch
import torch.nn.functional as F

TOKENS = (1, 16, 256, 2048) if DEVICE == "cuda" else (1, 16, 70)
# (N, K) of Llama-3.1-8B: fused qkv (32 + 2 x 8 heads of 128), fused gate|up, down
SHAPES = ((6144, 4096), (28672, 4096), (4096, 14336)) if DEVICE == "cuda" else ((72, 256),) * 3
# (name, bits, group size, act-order, dtype, shapes)
CASES = (
    ("4-bit g128 fp16", 4, 128, False, torch.float16, SHAPES),
    ("8-bit g128 fp16", 8, 128, False, torch.float16, SHAPES[:1]),
    ("4-bit g128 act-order fp16", 4, 128, True, torch.float16, SHAPES[:1]),
    ("4-bit g32 bf16", 4, 32, False, torch.bfloat16, SHAPES[:1]),
)
GRAPH_CALLS = 10  # calls captured in one CUDA graph, timed together
REPEATS = 20
RELATIVE_TOLERANCE = 1e-2  # max |error| / max |reference|; a wrong kernel is off by ~1
SWEEP_BUDGET_S = 30  # the tile sweep starts no new row once the run has taken this long
SWEEP = {  # (block_m, block_n, block_k, num_warps, num_stages) tried beside the default
    "decode": ((16, 32, 128, 4, 4), (16, 64, 64, 4, 4), (16, 128, 128, 4, 3), (16, 64, 128, 2, 4)),
    "prefill": (
        (128, 64, 64, 4, 3),
        (64, 128, 64, 4, 3),
        (128, 256, 64, 8, 3),
        (128, 128, 32, 4, 4),
    ),
}


def import_kernels():
    """`ember.kernels.quant_matmul` and `..._triton`, installed or from this checkout (the
    package layout of pyproject's package-dir: `ember` is frontend/, `ember.kernels` kernels/;
    neither `__init__` imports anything more)."""
    try:
        import ember.kernels  # noqa: F401
    except ModuleNotFoundError:
        root = Path(__file__).resolve().parents[1]
        for name, folder in (("ember", root / "frontend"), ("ember.kernels", root / "kernels")):
            spec = importlib.util.spec_from_file_location(
                name, folder / "__init__.py", submodule_search_locations=[str(folder)]
            )
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
    from ember.kernels import quant_matmul, quant_matmul_triton

    return quant_matmul, quant_matmul_triton


def random_weight(
    pack, outputs: int, inputs: int, bits: int, group_size: int, act_order: bool, dtype
):
    """A GPTQ-like packed weight: random codes, asymmetric zeros, float16 scales."""
    groups = inputs // group_size
    codes = torch.randint(0, 2**bits, (outputs, inputs), dtype=torch.int32, device=DEVICE)
    scales = (torch.rand(outputs, groups, device=DEVICE) * 0.01 + 1e-3).half().float()
    zeros = torch.randint(0, 2**bits, (outputs, groups), dtype=torch.int32, device=DEVICE)
    group_of_input = torch.arange(inputs, device=DEVICE) // group_size
    if act_order:
        group_of_input = group_of_input[torch.randperm(inputs, device=DEVICE)]
    return pack(codes, scales, zeros, group_of_input, bits, dtype)


def median_us(fn) -> tuple[float, bool]:
    """(median microseconds a call, whether under a CUDA graph): GRAPH_CALLS calls replayed
    from one graph, or eager calls if the capture fails."""
    if DEVICE == "cpu":
        started = time.perf_counter()
        fn()
        return (time.perf_counter() - started) * 1e6, False
    fn()
    torch.cuda.synchronize()
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()  # warm-up on a side stream, as before any capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(GRAPH_CALLS):
                fn()
        run, calls, graphed = graph.replay, GRAPH_CALLS, True
    except RuntimeError as error:
        print(f"    (no CUDA graph: {str(error).splitlines()[0]})")
        run, calls, graphed = fn, 1, False
    for _ in range(3):
        run()
    times = []
    for _ in range(REPEATS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / calls)
    return statistics.median(times), graphed


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.float() - expected.float()).abs().max() / expected.float().abs().max())


def describe(config) -> str:
    return (
        f"{config.block_m}x{config.block_n}x{config.block_k} split {config.split_k} "
        f"w{config.num_warps} s{config.num_stages}"
    )


def check_case(kernels, limits, case) -> int:
    """The table rows of one case: error and times at each M; returns the failures."""
    quant_matmul, triton_module = kernels
    name, bits, group_size, act_order, dtype, shapes = case
    failures = 0
    for outputs, inputs in shapes:
        weight = random_weight(
            quant_matmul.pack_group_weight, outputs, inputs, bits, group_size, act_order, dtype
        )
        dense = weight.dequantize().to(dtype)
        for tokens in TOKENS:
            x = torch.randn(tokens, inputs, device=DEVICE, dtype=dtype)
            row = f"{name:<26} {tokens:>5} {outputs:>6} {inputs:>6}"
            try:
                run = functools.partial(triton_module.quant_matmul_triton, x, weight)
                error = relative_error(run(), quant_matmul.quant_matmul_torch(x, weight))
                triton_us, graphed = median_us(run)
            except Exception as exc:  # noqa: BLE001 - report and go on to the next row
                print(f"{row}  FAIL {type(exc).__name__}: {exc}")
                failures += 1
                continue
            dense_us, _ = median_us(functools.partial(F.linear, x, dense))
            config = triton_module.block_config(
                tokens, outputs, inputs, weight.group_size, x.element_size(), limits
            )
            failed = error >= RELATIVE_TOLERANCE
            failures += failed
            print(
                f"{row}  {error:8.1e}  {triton_us:9.1f}  {dense_us:8.1f}  "
                f"{dense_us / triton_us:12.2f}  {describe(config)}"
                f"{'' if graphed else ' (eager)'}{'  FAIL' if failed else ''}"
            )
        stored = (weight.qweight, weight.scales, weight.zeros)
        packed_mib = sum(t.numel() * t.element_size() for t in stored) / 2**20
        dense_mib = dense.numel() * dense.element_size() / 2**20
        print(f"    {outputs}x{inputs}: packed {packed_mib:.1f} MiB, dense {dense_mib:.1f} MiB")
    return failures


def sweep_row(kernels, limits, weight, tokens: int) -> tuple[str, int]:
    """Times of the default config and the SWEEP alternatives at one M (4-bit g128 fp16)."""
    quant_matmul, triton_module = kernels
    outputs, inputs = weight.shape
    x = torch.randn(tokens, inputs, device=DEVICE, dtype=torch.float16)
    expected = quant_matmul.quant_matmul_torch(x, weight)
    configs = [triton_module.block_config(tokens, outputs, inputs, 128, 2, limits)]
    for block_m, block_n, block_k, warps, stages in SWEEP["decode" if tokens <= 16 else "prefill"]:
        tiles = -(-tokens // block_m) * -(-outputs // block_n)
        split = max(1, min(-(-2 * limits[0] // tiles), inputs // block_k, 16))
        configs.append(triton_module.BlockConfig(block_m, block_n, block_k, split, warps, stages))
    results, failures = [], 0
    for config in configs:
        run = functools.partial(triton_module.quant_matmul_triton, x, weight, config)
        try:
            error = relative_error(run(), expected)
            us, _ = median_us(run)
        except Exception as exc:  # noqa: BLE001 - a config that does not build is reported
            results.append(f"{describe(config)}: {type(exc).__name__}")
            continue
        failed = error >= RELATIVE_TOLERANCE
        failures += failed
        results.append(f"{describe(config)} {us:.1f}{' FAIL' if failed else ''}")
    return " | ".join(results), failures


def main() -> int:
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("needs a CUDA GPU (EMBER_CHECK_DEVICE=cpu: a dry run)")
        return 1
    torch.backends.cuda.matmul.allow_tf32 = False  # an exact float32 reference
    started = time.perf_counter()
    kernels = import_kernels()
    quant_matmul, triton_module = kernels
    limits = triton_module.device_limits(torch.device(DEVICE))
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "CPU (interpreted)"
    print(f"{name}, torch {torch.__version__}; multiprocessors, shared bytes: {limits}")
    torch.manual_seed(0)
    print(
        f"{'case':<26} {'M':>5} {'N':>6} {'K':>6}  {'rel err':>8}  {'triton us':>9}  "
        f"{'dense us':>8}  {'dense/triton':>12}  config"
    )
    failures = sum(check_case(kernels, limits, case) for case in CASES)
    print(
        f"--- tile sweep, 4-bit g128 fp16, us a call, default first ({time.perf_counter() - started:.0f} s so far)"
    )
    for outputs, inputs in SHAPES[:2]:
        weight = random_weight(
            quant_matmul.pack_group_weight, outputs, inputs, 4, 128, False, torch.float16
        )
        for tokens in TOKENS:
            if time.perf_counter() - started > SWEEP_BUDGET_S:
                print("    (sweep stopped: time budget)")
                break
            row, row_failures = sweep_row(kernels, limits, weight, tokens)
            failures += row_failures
            print(f"  M {tokens:>5} N {outputs:>6} K {inputs:>6}: {row}")
    print(f"done in {time.perf_counter() - started:.0f} s, {failures} failed")
    return failures


if __name__ == "__main__":
    sys.exit(main())
