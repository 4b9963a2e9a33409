"""Runs the two CPU workloads of `tools/bench_throughput.py` (W1, the default batch; and
`--single`, batch-1 decode) for ember, llama.cpp (its batched decoding and one sequence at a
time), vLLM's CPU build (where `$EMBER_BENCH_VLLM_PYTHON` names its venv's interpreter) and HF
in one go, and draws them side by side in a PNG (matplotlib).

    python tools/bench_chart.py                         # runs both workloads, writes the chart
    python tools/bench_chart.py --from-json w1.jsonl single.jsonl   # chart from saved results
    EMBER_CPU_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \
        LLAMA_CPP_LIB_PATH=.cache/llama-avx2/lib \
        python tools/bench_chart.py --output tools/bench_cpu_avx2.png \
        --vllm-kwargs '{"dtype": "float32"}'   # the AVX2 path (vLLM's CPU build: float32 there)

The chart's title names the instruction set ember's kernels ran on (`EMBER_CPU_ISA`, see
`ember.kernels.cpu_features`); under the avx2 override, llama.cpp must be an AVX2 build too
(`LLAMA_CPP_LIB_PATH`: the directory of an AVX2 `libllama.so`, which llama-cpp-python loads
instead of its own). `--save-json DIR` keeps the results; `--vllm-kwargs` goes to vLLM's
`LLM(...)`. An engine that fails is left out of the chart (its error is printed), the others
are drawn. The figures (output tokens/s and peak RSS per engine) are printed as well.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
WORKLOADS = {"W1 (32 prompts, 64 tokens each)": [], "batch-1 decode (--single)": ["--single"]}
COLORS = {
    "ember": "#d9541e",
    "llama.cpp-batched": "#2a4d8f",
    "llama.cpp": "#4c72b0",
    "hf": "#8c8c8c",
    "vllm": "#55a868",
}
# Axis labels: two short lines each, so that five engines fit side by side.
LABELS = {
    "ember": "ember",
    "llama.cpp-batched": "llama.cpp\nbatched",
    "llama.cpp": "llama.cpp\n1 sequence",
    "hf": "HF",
    "vllm": "vLLM\nCPU",
}


def run_workload(
    extra: list[str], engines: str, repeat: int, out: Path, vllm_kwargs: str | None = None
) -> list[dict]:
    """One workload's results (`bench_throughput.py --json`); an engine that failed has a row
    whose status says so, and the run stops only where no engine wrote one."""
    cmd = [
        sys.executable,
        str(TOOLS / "bench_throughput.py"),
        *extra,
        "--engines",
        engines,
        "--repeat",
        str(repeat),
        "--json",
        str(out),
    ]
    if vllm_kwargs:
        cmd += ["--vllm-kwargs", vllm_kwargs]
    finished = subprocess.run(cmd, check=False)
    rows = read_results(out) if out.exists() else []
    if finished.returncode != 0 and not rows:
        raise SystemExit(f"bench_throughput.py failed (exit {finished.returncode}): {cmd}")
    return rows


def read_results(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def draw(results: dict[str, list[dict]], path: Path, isa: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4))
    for axis, (title, rows) in zip(axes, results.items()):
        rows = [r for r in rows if r.get("status") == "ok"]
        names = [r["engine"] for r in rows]
        speeds = [r["output_tok_s"] for r in rows]
        labels = [LABELS.get(n, n) for n in names]
        bars = axis.bar(labels, speeds, color=[COLORS.get(n, "#55a868") for n in names])
        for bar, row in zip(bars, rows):
            label = f"{row['output_tok_s']:.1f}\n{row['peak_rss_bytes'] / 2**20:.0f} MiB"
            axis.annotate(
                label,
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center",
                va="bottom",
                fontsize=8,
            )
        axis.set_title(title)
        axis.set_ylabel("output tokens / s (2 threads)")
        axis.margins(y=0.2)
    engines = dict.fromkeys(
        LABELS.get(r["engine"], r["engine"]).split("\n")[0]
        for rows in results.values()
        for r in rows
        if r.get("status") == "ok"
    )
    fig.suptitle(f"SmolLM2-135M-Instruct Q4_1 GGUF on CPU ({isa}): {' vs '.join(engines)}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", default="ember,vllm,llama.cpp-batched,llama.cpp,hf")
    parser.add_argument("--save-json", default=None, metavar="DIR", help="keep the results")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--output", default=str(TOOLS / "bench_cpu.png"))
    parser.add_argument("--from-json", nargs=2, metavar=("W1_JSONL", "SINGLE_JSONL"))
    parser.add_argument("--vllm-kwargs", default=None, help="JSON, for vLLM's LLM(...)")
    args = parser.parse_args()
    if args.from_json:
        results = {
            title: read_results(Path(path)) for title, path in zip(WORKLOADS, args.from_json)
        }
    else:
        results = {}
        with tempfile.TemporaryDirectory() as scratch:
            for index, (title, extra) in enumerate(WORKLOADS.items()):
                out = Path(args.save_json or scratch) / f"workload{index}.jsonl"
                out.parent.mkdir(parents=True, exist_ok=True)
                results[title] = run_workload(
                    extra, args.engines, args.repeat, out, args.vllm_kwargs
                )
    for title, rows in results.items():
        print(title)
        for row in rows:
            if row.get("status") == "ok":
                print(
                    f"  {row['engine']:<18} {row['output_tok_s']:8.1f} tok/s   "
                    f"peak RSS {row['peak_rss_bytes'] / 2**20:6.0f} MiB"
                )
    from ember.kernels.cpu_features import cpu_isa

    draw(results, Path(args.output), cpu_isa())
    print(f"chart written to {args.output}")


if __name__ == "__main__":
    main()
