#!/usr/bin/env bash
# A GPU session's checks in one run (the device tool runs it from the repository root, with the
# wheels ember needs beyond the image's packages in .whl/: pyzmq, msgspec, gguf). Each step
# has its own time limit and the run goes on past a failure; the log goes to $OUT/log.
#   bash tools/gpu_check.sh [quick]
set -u
out=${OUT:-/tmp/ember-gpu-check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
{
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
    # ember as its package layout says (pyproject's package-dir), without a build
    mkdir -p /tmp/ember/ember && cp -r frontend/. /tmp/ember/ember/
    for part in enginecore workers kernels; do cp -r "$part" /tmp/ember/ember/; done
    export PYTHONPATH=/tmp/ember:/tmp/site
    nvidia-smi -L
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
    step() { local limit=$1; shift; echo "=== $* (limit ${limit}s)"; local t0=$SECONDS
             timeout "$limit" "$@"; echo "=== exit $? after $((SECONDS - t0)) s"; }
    # most telling first: a run cut short by the device's limit still says the most
    step 60 python3 tools/gpu_check_quant_matmul.py
    step 100 python3 tools/gpu_check_fp8.py
    step 200 python3 tools/gpu_smoke.py
    step 30 python3 tools/gpu_check_kv_fp8.py
    step 120 python3 -m pytest -q -p no:randomly -p no:cacheprovider -k "cuda or triton or Triton" \
        tests/test_triton_kernels.py tests/test_quant_matmul_triton.py tests/test_fp8.py \
        tests/test_lora_units.py tests/test_cuda_paths.py tests/test_kv_cache_fp8.py
    step 60 python3 tools/gpu_check_moe.py
    [ "${1:-}" = quick ] || step 120 python3 tools/bench_throughput.py --device cuda \
        --model-shape qwen3-0.6b --engines ember,hf --num-prompts 256 --input-len-min 128 \
        --input-len-max 512 --output-len 256
} 2>&1 | tee "$out/log"
