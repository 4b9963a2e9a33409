"""The FP8 GEMM (`kernels/fp8_matmul.py`, `kernels/fp8_matmul_triton.py`) on a CUDA GPU: each path's
error against the float32 reference and its time against F.linear in bfloat16 on the
dequantized weight, for per-tensor (static activations), per-row and 128 x 128 block weights
(dynamic ones) on Llama-3.1-8B's projection shapes (fused qkv, fused gate|up, down) at
M = 1, 16, 512. Needs only torch and triton (no ember
install: it finds `ember.kernels` in this checkout). About 20 s on an H100 / H200, most of it
Triton's compiles; the exit status is the number of failed checks.

    python tools/gpu_check_fp8.py          # from the repository root

Paths: `_scaled_mm` tensorwise (per tensor) or rowwise (per row; bfloat16 out), the Triton
kernel on the FP8 tensor cores (`triton fp8`), the exact kernel a float32 model takes (`triton
fp16`: codes widened to fp16, float32 out), and `fp8_linear` as a bfloat16 layer calls it
(activation quantization included).
"""

from __future__ import annotations

import importlib.util
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

TOKENS = (1, 16, 512)
# (N, K) of Llama-3.1-8B: fused qkv (32 + 2 x 8 heads of 128), fused gate|up, down
SHAPES = ((6144, 4096), (28672, 4096), (4096, 14336))
GRAPH_CALLS = 10  # calls captured in one CUDA graph, timed together
WARMUP = 3
REPEATS = 20
# max |error| / max |reference|: bfloat16 rounding; Hopper's FP8 sums (2.2e-4 measured);
# fp16 tensor cores' float32 sums. A wrong scale is off by far more.
TOLERANCE = {"bf16": 1e-2, "fp8-f32": 1e-3, "exact": 1e-4}
BUDGET_S = 80


def import_kernels():
    """`ember.kernels.fp8_matmul` and `..._triton`, installed or from this checkout (the package
    layout of pyproject's package-dir: `ember` is frontend/, `ember.kernels` kernels/)."""
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
    from ember.kernels import fp8_matmul, fp8_matmul_triton

    return fp8_matmul, fp8_matmul_triton


def median_us(fn) -> tuple[float, bool]:
    """(median microseconds of one call, whether it ran under a CUDA graph): GRAPH_CALLS calls
    replayed from one graph (as ember's decode steps run), or eagerly if capture fails."""
    fn()
    torch.cuda.synchronize()
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()  # warm-up on the capture stream
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(GRAPH_CALLS):
                fn()
        run, calls, graphed = graph.replay, GRAPH_CALLS, True
    except RuntimeError as error:
        print(f"    (no CUDA graph: {str(error).splitlines()[0]})")
        run, calls, graphed = fn, 1, False
    for _ in range(WARMUP):
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


def paths(fm, triton_module, layout, codes, scales, weight, x, input_scale, fp8_cores: bool):
    """(name, tolerance key, callable) of each path this layout runs through on this GPU."""
    found = []
    if layout != "block" and fp8_cores:
        name = "_scaled_mm tensorwise" if layout == "tensor" else "_scaled_mm rowwise"
        if fm._scaled_mm_or_none(codes, scales, weight, torch.bfloat16) is not None:
            run = lambda: fm._scaled_mm_or_none(codes, scales, weight, torch.bfloat16)
            found.append((name, "bf16", run))
        else:
            print(f"    ({name} does not take this call: Triton instead)")
        if layout == "tensor":
            run = lambda: fm._scaled_mm_or_none(codes, scales, weight, torch.float32)
            found.append(("_scaled_mm f32 out", "fp8-f32", run))

    def triton(out_dtype, fp8_dot):
        return lambda: triton_module.fp8_matmul_triton(
            codes, scales, weight, out_dtype, fp8_dot=fp8_dot
        )

    if fp8_cores:
        found.append(("triton fp8", "bf16", triton(torch.bfloat16, True)))
        found.append(("triton fp8 f32 out", "fp8-f32", triton(torch.float32, True)))
    found.append(("triton fp16 (exact)", "exact", triton(torch.float32, False)))
    found.append(("fp8_linear bf16", "bf16", lambda: fm.fp8_linear(x, weight, input_scale)))
    return found


def check(fm, triton_module, layout, weight, tokens, device, timer) -> int:
    """Print one table row per path of `layout` at `tokens` tokens; the number that failed."""
    outputs, inputs = weight.shape
    dense_bf16 = weight.dequantize(torch.bfloat16)
    x = torch.randn(tokens, inputs, device=device, dtype=torch.bfloat16)
    x[:, 5] *= 30  # an outlier channel, as real activations have
    # per tensor: static activations (tensorwise); the others dynamic, per token (and group)
    input_scale = None
    if layout == "tensor":
        input_scale = (x.float().abs().amax() / fm.FP8_MAX).reshape(())
    codes, scales = fm.quantize_activations(x, input_scale, weight.group_k)
    expected = fm.fp8_matmul_torch(codes, scales, weight, torch.float32)
    dense_us, _ = timer(lambda: F.linear(x, dense_bf16))
    config = triton_module.block_config(
        tokens, outputs, inputs, weight.group_k, triton_module.device_limits(device)
    )
    config_text = (
        f"{config.block_m}x{config.block_n}x{config.block_k} split {config.split_k} "
        f"w{config.num_warps} s{config.num_stages}"
    )
    fp8_cores = fm.has_fp8_tensor_cores(device)
    failures = 0
    for name, tolerance, run in paths(
        fm, triton_module, layout, codes, scales, weight, x, input_scale, fp8_cores
    ):
        try:
            error = relative_error(run(), expected)
            us, graphed = timer(run)
        except Exception as exc:  # noqa: BLE001 - report and go on
            print(f"{layout:<7} {tokens:>4}  {name:<22} FAIL {type(exc).__name__}: {exc}")
            failures += 1
            continue
        status = "" if error < TOLERANCE[tolerance] else "  FAIL"
        failures += bool(status)
        shown = config_text if name.startswith("triton") else ""
        print(
            f"{layout:<7} {tokens:>4}  {name:<22} {error:8.1e}  {us:8.1f}  {dense_us:8.1f}  "
            f"{dense_us / us:9.2f}  {shown}{'' if graphed else ' eager'}{status}"
        )
    return failures


def main() -> int:
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 1
    torch.backends.cuda.matmul.allow_tf32 = False  # an exact float32 reference
    started = time.perf_counter()
    fm, triton_module = import_kernels()
    import triton

    device = torch.device("cuda")
    capability = torch.cuda.get_device_capability()
    print(torch.cuda.get_device_name(), capability, "torch", torch.__version__, end=" ")
    print("triton", triton.__version__)
    if not fm.has_fp8_tensor_cores(device):
        print("no FP8 tensor cores (sm_89+): only the fp16-widened Triton kernel is checked")
    print(f"rowwise torch._scaled_mm: {fm.rowwise_scaled_mm_works(device)}")
    torch.manual_seed(0)
    failures = 0
    print(
        f"{'layout':<7} {'M':>4}  {'path':<22} {'rel err':>8}  {'us':>8}  {'bf16 us':>8}  "
        f"{'bf16/path':>9}  config"
    )
    for layout in fm.WEIGHT_LAYOUTS:
        for outputs, inputs in SHAPES:
            print(f"  {layout} weight, N {outputs} K {inputs}")
            weight = fm.quantize_weight(torch.randn(outputs, inputs, device=device) * 0.02, layout)
            for tokens in TOKENS:
                if time.perf_counter() - started > BUDGET_S:
                    print("    (stopped: time budget)")
                    break
                failures += check(fm, triton_module, layout, weight, tokens, device, median_us)
    print(f"done in {time.perf_counter() - started:.0f} s, {failures} failed")
    return failures


if __name__ == "__main__":
    sys.exit(main())
