"""Runs the two CPU workloads of `tools/bench_throughput.py` (W1, the default batch; and
`--single`, batch-1 decode) for ember, llama.cpp and HF in one go, and draws them side by side
in a PNG (matplotlib).

    python tools/bench_chart.py                         # runs both workloads, writes the chart
    python tools/bench_chart.py --from-json w1.jsonl single.jsonl   # chart from saved results

The figures (output tokens/s and peak RSS per engine) are printed as well.
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
COLORS = {"ember": "#d9541e", "llama.cpp": "#4c72b0", "hf": "#8c8c8c"}


def run_workload(extra: list[str], engines: str, repeat: int, out: Path) -> list[dict]:
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
    subprocess.run(cmd, check=True)
    return read_results(out)


def read_results(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def draw(results: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4))
    for axis, (title, rows) in zip(axes, results.items()):
        rows = [r for r in rows if r.get("status") == "ok"]
        names = [r["engine"] for r in rows]
        speeds = [r["output_tok_s"] for r in rows]
        bars = axis.bar(names, speeds, color=[COLORS.get(n, "#55a868") for n in names])
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
    fig.suptitle("SmolLM2-135M-Instruct Q4_1 GGUF on CPU: ember vs llama.cpp vs HF transformers")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", default="ember,llama.cpp,hf")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--output", default=str(TOOLS / "bench_cpu.png"))
    parser.add_argument("--from-json", nargs=2, metavar=("W1_JSONL", "SINGLE_JSONL"))
    args = parser.parse_args()
    if args.from_json:
        results = {
            title: read_results(Path(path)) for title, path in zip(WORKLOADS, args.from_json)
        }
    else:
        results = {}
        with tempfile.TemporaryDirectory() as scratch:
            for index, (title, extra) in enumerate(WORKLOADS.items()):
                out = Path(scratch) / f"workload{index}.jsonl"
                results[title] = run_workload(extra, args.engines, args.repeat, out)
    for title, rows in results.items():
        print(title)
        for row in rows:
            if row.get("status") == "ok":
                print(
                    f"  {row['engine']:<10} {row['output_tok_s']:8.1f} tok/s   "
                    f"peak RSS {row['peak_rss_bytes'] / 2**20:6.0f} MiB"
                )
    draw(results, Path(args.output))
    print(f"chart written to {args.output}")


if __name__ == "__main__":
    main()
