"""What a GPTQ or AWQ checkpoint costs or gains ember on CPU against the same weights as a GGUF
file and as float32, on one workload (W1 by default), in one run.

The checkpoints are written once from the embedded SmolLM2's weights (a float32 Hugging Face
copy of the GGUF, `bench_throughput.hf_copy_of_gguf`) by the test packer that matches
AutoGPTQ's, GPTQModel's and AutoAWQ's own (`tests/quantized_checkpoints.py`), into
.cache/bench/. SmolLM2's 576-wide layers take groups of 64 (576 is not a multiple of 128).
Each goes through `bench_throughput.py --ember-model` (same prompts, greedy, EOS ignored):

    python tools/bench_quantized.py                  # W1: 32 prompts of 32-256 tokens, 64 out
    python tools/bench_quantized.py --single         # batch-1 decode instead
    python tools/bench_quantized.py --rounds 2 --repeat 2 --hf
    python tools/bench_quantized.py --model-shape qwen3-0.6b --single   # 0.6B random weights

`--model-shape qwen3-0.6b` writes random weights of Qwen3-0.6B's shape once (bfloat16, 1.2 GB
in .cache/bench/) and compares bfloat16, float32, GPTQ / AWQ 4-bit (groups of 128), GPTQ 8-bit
and FP8 at load (`quantization="fp8"`) on them.

Each round runs every configuration in turn (a fresh engine each); a configuration's figure
is its best pass over all rounds. `--hf` adds HF transformers on the float32 weights.
The ISA is the CPU's (EMBER_CPU_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2
times the AVX2 path); figures name it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE.parent.parent))  # `ember` when run from a checkout
sys.path.insert(0, str(_HERE.parent))  # `tests` (the packer)

FORMATS = {
    "gptq-4bit-g64": ("gptq", {"bits": 4, "group_size": 64, "sym": True}),
    "gptq-4bit-g64-act-order": (
        "gptq",
        {"bits": 4, "group_size": 64, "sym": False, "desc_act": True},
    ),
    "gptq-8bit-g64": ("gptq", {"bits": 8, "group_size": 64, "sym": True}),
    "awq-4bit-g64": ("awq", {"group_size": 64}),
}


def quantized_checkpoints(hf_dir: str) -> dict[str, str]:
    """The directory of each of `FORMATS`, written once next to `hf_dir`."""
    from tests.quantized_checkpoints import write_awq_checkpoint, write_gptq_checkpoint

    directories = {}
    for name, (kind, options) in FORMATS.items():
        target = Path(hf_dir).parent / f"{Path(hf_dir).name}-{name}"
        if not (target / "config.json").exists():
            writer = write_gptq_checkpoint if kind == "gptq" else write_awq_checkpoint
            writer(hf_dir, str(target), **options)
        directories[name] = str(target)
    return directories


def print_records(best: dict[str, dict]) -> None:
    for name, record in best.items():
        if "output_tok_s" not in record:
            print(f"{name:<26}, failed: {record.get('reason', record)}")
            continue
        rss = record["peak_rss_bytes"] / 2**20
        held = record.get("weight_bytes")  # ember only: what the loaded weights hold
        held = f"{held / 2**20:10.1f}" if held is not None else f"{'':>10}"
        print(f"{name:<26}, {record['output_tok_s']:12.1f}, {rss:12.0f}, {held}")


def random_weights_of_shape(shape: str) -> str:
    """A Hugging Face directory of random weights (bfloat16) of a `bench_throughput` model
    shape, written once into .cache/bench/ of the checkout."""
    import torch
    import transformers
    from bench_throughput import MODEL_SHAPES

    target = _HERE.parent / ".cache" / "bench" / f"{shape}-random"
    if not (target / "config.json").exists():
        class_name, settings = MODEL_SHAPES[shape]
        config = getattr(transformers, class_name)(**settings, dtype="bfloat16")
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.save_pretrained(str(target))
    return str(target)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--single", action="store_true", help="batch-1 decode workload")
    parser.add_argument("--hf", action="store_true", help="also HF transformers (float32)")
    parser.add_argument(
        "--model-shape", default="", help="random weights of this shape instead of SmolLM2"
    )
    args = parser.parse_args(argv)
    if args.model_shape:
        shape_main(args)
        return
    from bench_throughput import best_of_rounds, hf_copy_of_gguf

    from ember.kernels.cpu_features import cpu_isa
    from ember.workers.model_loader.resolve import default_model_path

    hf_dir = hf_copy_of_gguf(default_model_path())
    configs = [
        ("GGUF Q4_1 (default)", "ember", []),
        ("float32", "ember", ["--ember-model", hf_dir]),
    ]
    configs += [
        (name, "ember", ["--ember-model", path])
        for name, path in quantized_checkpoints(hf_dir).items()
    ]
    if args.hf:
        configs.append(("HF transformers, float32", "hf", []))
    best = best_of_rounds(
        [(name, ["--engines", engine, *extra]) for name, engine, extra in configs],
        args.rounds,
        args.repeat,
        args.single,
    )
    workload = "batch-1 decode" if args.single else "W1"
    passes = args.repeat * args.rounds
    print(f"SmolLM2-135M, {workload}, CPU ISA {cpu_isa()}, best of {passes} passes")
    print("weights                   , output tok/s, peak RSS MiB, weights MiB")
    print_records(best)


SHAPE_FORMATS = {
    "gptq-4bit-g128": ("gptq", {"bits": 4, "group_size": 128, "sym": True}),
    "awq-4bit-g128": ("awq", {"group_size": 128}),
    "gptq-8bit-g128": ("gptq", {"bits": 8, "group_size": 128, "sym": True}),
}


def shape_main(args: argparse.Namespace) -> None:
    """bfloat16, float32, the 4- and 8-bit formats and FP8 at load on random weights of
    `args.model_shape`, through `bench_throughput.py --model-shape ... --ember-model`."""
    from bench_throughput import best_of_rounds

    from ember.kernels.cpu_features import cpu_isa
    from tests.quantized_checkpoints import write_awq_checkpoint, write_gptq_checkpoint

    dense = random_weights_of_shape(args.model_shape)
    shape = ["--model-shape", args.model_shape, "--engines", "ember"]
    configs = [
        ("bfloat16", [*shape, "--ember-model", dense, "--ember-kwargs", '{"dtype": "bfloat16"}']),
        ("float32", [*shape, "--ember-model", dense, "--ember-kwargs", '{"dtype": "float32"}']),
        (
            "fp8 at load (float32)",
            [
                *shape,
                "--ember-model",
                dense,
                "--ember-kwargs",
                '{"dtype": "float32", "quantization": "fp8"}',
            ],
        ),
    ]
    for name, (kind, options) in SHAPE_FORMATS.items():
        target = Path(dense).parent / f"{Path(dense).name}-{name}"
        if not (target / "config.json").exists():
            writer = write_gptq_checkpoint if kind == "gptq" else write_awq_checkpoint
            writer(dense, str(target), **options)
        configs.append((name, [*shape, "--ember-model", str(target)]))
    best = best_of_rounds(configs, args.rounds, args.repeat, args.single)
    workload = "batch-1 decode" if args.single else "W1"
    print(
        f"{args.model_shape} random weights, {workload}, CPU ISA {cpu_isa()}, "
        f"best of {args.repeat * args.rounds} passes"
    )
    print("weights                   , output tok/s, peak RSS MiB, weights MiB")
    print_records(best)


if __name__ == "__main__":
    main()
