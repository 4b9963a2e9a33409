"""Model load benchmark: seconds from `LLM(...)` to ready, beside Hugging Face `from_pretrained`
on the same files.

Models:

- ``default``: ember's embedded SmolLM2-135M-Instruct Q4_1 GGUF (dequantised on load; its config
  and tokenizer come from ember's conversion cache after the first start). ember gets it as a
  user does, `LLM()` with its tokenizer; Hugging Face `from_pretrained(dir, gguf_file=...)`.
- ``random-500mb``: a random Llama of about 500 MB in float32 safetensors, written once into
  ``--workdir``. ember: `LLM(dir, skip_tokenizer_init=True)` (the directory has no tokenizer);
  Hugging Face: `from_pretrained(dir)`.

Both engines load in float32. Each measurement runs in a fresh subprocess of this script (hidden
``--_run-one``), timing only the call (imports excluded); ember's time includes starting its
engine-core and worker processes, whose imports are part of getting ready. ``--repeat N`` reports
the fastest of N subprocesses (a shared CPU makes single runs noisy). Peak RSS is the
subprocess's own for Hugging Face and the sum over ember's process tree.

    python tools/bench_load.py                      # both models, both engines
    python tools/bench_load.py --models random-500mb --repeat 3
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import threading
import time

MODELS = ("default", "random-500mb")
ENGINES = ("ember", "hf")
RESULT_MARKER = "@@LOAD_RESULT@@ "


def write_random_model(directory: str) -> str:
    """A random Llama of ~500 MB (float32) in `directory`, written once."""
    if os.path.exists(os.path.join(directory, "model.safetensors")):
        return directory
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=16000,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=8,
        num_attention_heads=16,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )
    config.architectures = ["LlamaForCausalLM"]
    with torch.device("meta"):
        shapes = {name: p.shape for name, p in LlamaForCausalLM(config).state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    tensors = {name: torch.randn(s, generator=generator) * 0.02 for name, s in shapes.items()}
    os.makedirs(directory, exist_ok=True)
    config.save_pretrained(directory)
    save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    return directory


def model_source(model: str, workdir: str) -> dict:
    if model == "default":
        from ember.workers.model_loader.resolve import default_model_path

        return {"gguf": default_model_path()}
    return {"dir": write_random_model(os.path.join(workdir, "random-500mb"))}


def weights_bytes(source: dict) -> int:
    if "gguf" in source:
        return os.path.getsize(source["gguf"])
    return os.path.getsize(os.path.join(source["dir"], "model.safetensors"))


# ---- one measurement, in its own process ----------------------------------------------------


def _tree_rss_sampler(stop: threading.Event, peak: list[int]) -> None:
    import psutil

    me = psutil.Process()
    while not stop.wait(0.02):
        total = 0
        for proc in [me, *me.children(recursive=True)]:
            try:
                total += proc.memory_info().rss
            except psutil.Error:
                pass
        peak[0] = max(peak[0], total)


def run_one(engine: str, source: dict) -> dict:
    stop, peak = threading.Event(), [0]
    if engine == "ember":
        from ember import LLM

        sampler = threading.Thread(target=_tree_rss_sampler, args=(stop, peak), daemon=True)
        sampler.start()
        start = time.perf_counter()
        if "gguf" in source:
            llm = LLM(source["gguf"], dtype="float32")
        else:
            llm = LLM(source["dir"], dtype="float32", skip_tokenizer_init=True)
        seconds = time.perf_counter() - start
        stop.set()
        llm.shutdown()
    else:
        import torch
        from transformers import AutoModelForCausalLM

        start = time.perf_counter()
        if "gguf" in source:
            directory, filename = os.path.split(source["gguf"])
            AutoModelForCausalLM.from_pretrained(directory, gguf_file=filename, dtype=torch.float32)
        else:
            AutoModelForCausalLM.from_pretrained(source["dir"], dtype=torch.float32)
        seconds = time.perf_counter() - start
    peak_rss = max(peak[0], resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"seconds": seconds, "peak_rss": peak_rss}


def measure(engine: str, source: dict, repeat: int) -> dict:
    best = None
    for _ in range(repeat):
        result = subprocess.run(
            [sys.executable, __file__, "--_run-one", engine, json.dumps(source)],
            capture_output=True,
            text=True,
            check=False,
        )
        lines = [line for line in result.stdout.splitlines() if line.startswith(RESULT_MARKER)]
        if result.returncode != 0 or not lines:
            return {"error": (result.stderr or result.stdout).strip().splitlines()[-1:]}
        run = json.loads(lines[-1][len(RESULT_MARKER) :])
        # ember's worker logs how long building the model and reading the weights took
        loaded = re.findall(r"loaded \S+ \(.*?\) in ([\d.]+) s", result.stderr)
        run["weights_s"] = float(loaded[-1]) if loaded else None
        if best is None or run["seconds"] < best["seconds"]:
            best = run
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--workdir", default=None, help="where the random model is written")
    parser.add_argument("--_run-one", nargs=2, metavar=("ENGINE", "SOURCE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._run_one:
        engine, source = args._run_one
        print(RESULT_MARKER + json.dumps(run_one(engine, json.loads(source))), flush=True)
        return
    with tempfile.TemporaryDirectory(prefix="ember-bench-load-") as tmp:
        workdir = args.workdir or tmp
        print(f"{'model':<14} {'engine':<6} {'load s':>7} {'weights s':>9} {'peak RSS':>9}  files")
        for model in args.models.split(","):
            source = model_source(model, workdir)
            size_mb = weights_bytes(source) / 1e6
            for engine in args.engines.split(","):
                result = measure(engine, source, args.repeat)
                if "error" in result:
                    print(f"{model:<14} {engine:<6} failed: {result['error']}")
                    continue
                weights_s = f"{result['weights_s']:.2f}" if result.get("weights_s") else "-"
                print(
                    f"{model:<14} {engine:<6} {result['seconds']:>7.2f} {weights_s:>9} "
                    f"{result['peak_rss'] / 1e6:>7.0f}MB  {size_mb:.0f} MB"
                )


if __name__ == "__main__":
    main()
