"""Structured outputs: a batch of JSON-schema requests against the same batch unconstrained, with
the grammar work shown apart, on the default model (or --model).

    python tools/bench_structured_outputs.py                       # ember, 32 requests
    python tools/bench_structured_outputs.py --backend guidance
    python tools/bench_structured_outputs.py --vllm-python /work/vllm-venv/bin/python

Both batches run the same number of decode steps, each with an empty prefix cache: every request is greedy over the same chat
prompts, the constrained run first, and the unconstrained run then asks each request for exactly
as many tokens as its constrained twin produced (`ignore_eos`), so the step overhead of the
grammar (bitmask fill in the engine core, masking in the worker, matcher advance) is the
difference of the two times. Reported apart:

- first grammar: the engine core's first validation (imports the grammar library, which for
  xgrammar means torch, and reads the tokenizer's vocabulary), with the engine core's RSS
  before and after;
- compile: the schema's compile, measured on a second, distinct schema.

With `--vllm-python`, vLLM (its CPU build, in its own venv) runs the same workload in a child
process and its figures print beside ember's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"type": "string", "maxLength": 16},
        "skills": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
    },
    "required": ["name", "age", "city", "skills"],
}
OTHER_SCHEMA = {**SCHEMA, "required": ["name", "age"]}
SUBJECTS = [
    "a baker",
    "a pilot",
    "a nurse",
    "a farmer",
    "a painter",
    "a coder",
    "a chef",
    "a judge",
]


def prompts(tokenizer, count: int) -> list[str]:
    return [
        tokenizer.apply_chat_template(
            [
                {
                    "role": "user",
                    "content": f"Describe {SUBJECTS[i % len(SUBJECTS)]} number {i} as JSON.",
                }
            ],
            tokenize=False,
            add_generation_prompt=True,
        )
        for i in range(count)
    ]


def _rss_mib(pid: int) -> float:
    import psutil

    return psutil.Process(pid).memory_info().rss / 2**20


def run_ember(args: argparse.Namespace) -> dict:
    from ember import LLM, SamplingParams, StructuredOutputsParams

    llm = LLM(args.model, structured_outputs_config={"backend": args.backend})
    core_pid = llm.engine.process.pid
    figures = {"engine": "ember", "backend": args.backend}
    try:
        texts = prompts(llm.get_tokenizer(), args.num_prompts)
        llm.generate(texts[:2], SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up
        rss_before = _rss_mib(core_pid)
        start = time.perf_counter()
        llm.engine.call_utility(
            "validate_structured_outputs",
            [StructuredOutputsParams(json=SCHEMA)],
            timeout_s=600.0,
        )
        figures["first_grammar_s"] = time.perf_counter() - start
        figures["core_rss_mib_before"] = rss_before
        figures["core_rss_mib_after"] = _rss_mib(core_pid)
        start = time.perf_counter()
        llm.engine.call_utility(
            "validate_structured_outputs", [StructuredOutputsParams(json=OTHER_SCHEMA)]
        )
        figures["compile_s"] = time.perf_counter() - start

        constrained = SamplingParams(
            temperature=0.0,
            max_tokens=args.max_tokens,
            structured_outputs=StructuredOutputsParams(json=SCHEMA),
        )
        llm.reset_prefix_cache()  # both timed runs compute their prompts
        start = time.perf_counter()
        outputs = llm.generate(texts, constrained, use_tqdm=False)
        figures["constrained_s"] = time.perf_counter() - start
        lengths = [len(o.outputs[0].token_ids) for o in outputs]
        valid = 0
        for output in outputs:
            try:
                json.loads(output.outputs[0].text)
                valid += 1
            except json.JSONDecodeError:
                pass
        figures["valid_json"] = f"{valid}/{len(outputs)}"
        free = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in lengths]
        llm.reset_prefix_cache()
        start = time.perf_counter()
        llm.generate(texts, free, use_tqdm=False)
        figures["unconstrained_s"] = time.perf_counter() - start
        figures["output_tokens"] = sum(lengths)
    finally:
        llm.shutdown()
    return figures


VLLM_SCRIPT = r"""
import json, sys, time
sys.path.insert(0, sys.argv[2])
from bench_structured_outputs import SCHEMA, prompts
from vllm import LLM, SamplingParams
from vllm.sampling_params import StructuredOutputsParams
args = json.loads(sys.argv[1])
llm = LLM(args["model_dir"], dtype="float32", enforce_eager=True, max_model_len=2048,
          gpu_memory_utilization=0.15,
          structured_outputs_config={"backend": args["backend"]})
texts = prompts(llm.get_tokenizer(), args["num_prompts"])
llm.generate(texts[:2], SamplingParams(max_tokens=4), use_tqdm=False)
constrained = SamplingParams(temperature=0.0, max_tokens=args["max_tokens"],
                             structured_outputs=StructuredOutputsParams(json=SCHEMA))
start = time.perf_counter()
llm.generate(texts[:1], constrained, use_tqdm=False)
first = time.perf_counter() - start
llm.reset_prefix_cache()
start = time.perf_counter()
outputs = llm.generate(texts, constrained, use_tqdm=False)
constrained_s = time.perf_counter() - start
lengths = [len(o.outputs[0].token_ids) for o in outputs]
free = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
        for n in lengths]
llm.reset_prefix_cache()
start = time.perf_counter()
llm.generate(texts, free, use_tqdm=False)
unconstrained_s = time.perf_counter() - start
print("RESULT " + json.dumps({"engine": "vllm", "backend": args["backend"],
      "first_grammar_s": first, "constrained_s": constrained_s,
      "unconstrained_s": unconstrained_s, "output_tokens": sum(lengths)}))
"""


def run_vllm(args: argparse.Namespace) -> dict:
    """vLLM on the same weights, as a Hugging Face directory written from the GGUF file
    (`bench_throughput.hf_copy_of_gguf`, shared with the throughput benchmark)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_throughput import hf_copy_of_gguf

    payload = {
        "model_dir": hf_copy_of_gguf(args.model),
        "backend": args.backend,
        "num_prompts": args.num_prompts,
        "max_tokens": args.max_tokens,
    }
    env = {**os.environ, "VLLM_LOGGING_LEVEL": "WARNING"}
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{(os.cpu_count() or 1) - 1}")
    result = subprocess.run(
        [args.vllm_python, "-c", VLLM_SCRIPT, json.dumps(payload), os.path.dirname(__file__)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    for line in result.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise RuntimeError(f"vLLM run failed:\n{result.stderr[-3000:]}")


def report(rows: list[dict]) -> None:
    print(
        f"{'engine':8} {'backend':9} {'first':>7} {'compile':>8} {'constr.':>8} "
        f"{'free':>8} {'tokens':>7} {'overhead':>9} {'valid':>6}"
    )
    for row in rows:
        overhead = row["constrained_s"] / row["unconstrained_s"] - 1
        compile_s = row.get("compile_s")
        print(
            f"{row['engine']:8} {row['backend']:9} {row['first_grammar_s']:6.2f}s "
            + (f"{compile_s * 1000:6.0f}ms " if compile_s is not None else f"{'-':>8} ")
            + f"{row['constrained_s']:7.2f}s {row['unconstrained_s']:7.2f}s "
            f"{row['output_tokens']:7d} {overhead:+8.1%} {row.get('valid_json', '-'):>6}"
        )
    for row in rows:
        if "core_rss_mib_before" in row:
            print(
                f"ember engine-core RSS: {row['core_rss_mib_before']:.0f} MiB before the first "
                f"grammar, {row['core_rss_mib_after']:.0f} MiB after"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="default: the embedded SmolLM2 GGUF")
    parser.add_argument("--backend", default="xgrammar")
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--vllm-python", default=None, help="a Python with vLLM installed")
    args = parser.parse_args()
    if args.model is None:
        from ember.workers.model_loader.resolve import default_model_path

        args.model = default_model_path()
    rows = [run_ember(args)]
    if args.vllm_python:
        rows.append(run_vllm(args))
    report(rows)


if __name__ == "__main__":
    main()
