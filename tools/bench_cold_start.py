"""Cold start: time from a fresh interpreter's `LLM(model)` to the first generated token, for
ember and its peers on the same GGUF file, each in its own process (`--repeat` runs each, the
first of which may fill caches; the fastest is reported).

    python tools/bench_cold_start.py                    # ember and llama.cpp, 3 runs each
    python tools/bench_cold_start.py --engines ember,llama.cpp,hf
    python tools/bench_cold_start.py --fresh --engines ember  # as on a fresh machine

`--fresh` gives every run an empty cache directory (`XDG_CACHE_HOME`): ember then compiles its
C kernels, converts the GGUF file and caches the config and tokenizer within the timed start,
as the first `LLM()` on a fresh machine does (`EMBER_CPU_ISA` and the other environment
variables pass through, so `EMBER_CPU_ISA=avx2` times the AVX2 path's first start).

For ember it also reports whether the engine-core process has torch loaded (it must not:
only the workers need it), read from the process's memory maps, and whether the user's process
has (not on a warm start: its config and tokenizer come from ember's cache).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

EMBER = """
import json, sys, time
t0 = time.perf_counter()
from ember import LLM, SamplingParams
llm = LLM(sys.argv[1])
t_ready = time.perf_counter()
llm.generate("Hello", SamplingParams(max_tokens=1, temperature=0.0), use_tqdm=False)
t_first = time.perf_counter()
core_pid = llm.engine.process.pid
with open(f"/proc/{core_pid}/maps") as maps:
    core_has_torch = "libtorch" in maps.read()
llm.shutdown()
print(json.dumps({"ready_s": t_ready - t0, "first_token_s": t_first - t0,
                  "core_imports_torch": core_has_torch,
                  "frontend_imports_torch": "torch" in sys.modules}))
"""

LLAMA_CPP = """
import json, sys, time
t0 = time.perf_counter()
from llama_cpp import Llama
llm = Llama(sys.argv[1], n_ctx=512, n_threads=2, verbose=False)
t_ready = time.perf_counter()
llm("Hello", max_tokens=1, temperature=0.0)
t_first = time.perf_counter()
print(json.dumps({"ready_s": t_ready - t0, "first_token_s": t_first - t0}))
"""

HF = """
import json, os, sys, time
t0 = time.perf_counter()
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
directory, name = os.path.split(sys.argv[1])
tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
t_ready = time.perf_counter()
ids = tokenizer("Hello", return_tensors="pt")
model.generate(**ids, max_new_tokens=1, do_sample=False)
t_first = time.perf_counter()
print(json.dumps({"ready_s": t_ready - t0, "first_token_s": t_first - t0}))
"""

SCRIPTS = {"ember": EMBER, "llama.cpp": LLAMA_CPP, "hf": HF}


def run_once(engine: str, model: str, fresh: bool) -> dict:
    with tempfile.TemporaryDirectory(prefix="ember-fresh-cache-") as cache:
        env = dict(os.environ, XDG_CACHE_HOME=cache) if fresh else None
        start = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-c", SCRIPTS[engine], model],
            capture_output=True,
            text=True,
            check=False,
            env=env,
        )
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1:]}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_s"] = time.perf_counter() - start
    return result


def main() -> None:
    from ember.workers.model_loader.resolve import default_model_path

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="GGUF file (default: the embedded model)")
    parser.add_argument("--engines", default="ember,llama.cpp")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--fresh", action="store_true", help="an empty cache directory for every run"
    )
    args = parser.parse_args()
    model = args.model or default_model_path()
    for engine in args.engines.split(","):
        runs = [run_once(engine, model, args.fresh) for _ in range(args.repeat)]
        good = [r for r in runs if "error" not in r]
        if not good:
            print(f"{engine:<10} failed: {runs[0]['error']}")
            continue
        best = min(good, key=lambda r: r["first_token_s"])
        extra = ""
        if "core_imports_torch" in best:
            extra = (
                f"   torch imported by the engine core: {best['core_imports_torch']}, "
                f"by the user's process: {best['frontend_imports_torch']}"
            )
        print(
            f"{engine:<10} first token {best['first_token_s']:5.2f} s  (ready "
            f"{best['ready_s']:5.2f} s; runs: "
            + ", ".join(f"{r['first_token_s']:.2f}" for r in good)
            + ")"
            + extra
        )


if __name__ == "__main__":
    main()
