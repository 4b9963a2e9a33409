"""What lockstep data parallelism costs a MoE model on CPU (`enginecore/lockstep.py`), in one
run, on a random Mixtral-shaped model written once to .cache/bench/ (8 experts, top 2):

- the ranks' agreement alone: one all-reduce of two int64 over gloo between two processes;
- one engine (`LLM`, no data parallelism) decoding all the prompts;
- two lockstep ranks (VLLM_DP_*, expert parallelism), all prompts on rank 0 and none on rank
  1, which runs idle steps that serve its half of the experts;
- two lockstep ranks, half the prompts each.

    python tools/bench_lockstep.py                      # 16 prompts of 16 tokens, 64 out
    python tools/bench_lockstep.py --prompts 32 --output-len 32

The configurations share the machine's cores: `--threads` for the one engine, half of them for
each rank (and for the one engine again, the per-rank baseline). Figures: wall time of
`generate`, output tok/s over all ranks, milliseconds per step (the lockstep engines' step
count; a single engine's is taken as output_len + 1), and each rank's idle steps.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODEL_SETTINGS = {
    "vocab_size": 2048,
    "hidden_size": 512,
    "intermediate_size": 1024,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "max_position_embeddings": 1024,
}

RANK_SCRIPT = textwrap.dedent(
    """
    import json, os, random, sys, time
    from ember import LLM, SamplingParams
    model, count, input_len, output_len, threads = sys.argv[1:6]
    kwargs = dict(dtype="float32", skip_tokenizer_init=True, num_threads=int(threads),
                  enable_prefix_caching=False)
    if "VLLM_DP_RANK" in os.environ:
        kwargs["enable_expert_parallel"] = True
    llm = LLM(model, **kwargs)
    rng = random.Random(int(os.environ.get("VLLM_DP_RANK", 0)))
    prompts = [[rng.randrange(3, 2048) for _ in range(int(input_len))] for _ in range(int(count))]
    params = SamplingParams(temperature=0.0, max_tokens=int(output_len), ignore_eos=True)
    start = time.perf_counter()
    if prompts:
        llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    seconds = time.perf_counter() - start
    steps = None
    if "VLLM_DP_RANK" in os.environ:  # once the ranks are between waves, after a wave ran
        steps = llm.engine.call_utility("lockstep_idle")
        while not steps["steps"]:
            time.sleep(0.05)
            steps = llm.engine.call_utility("lockstep_idle")
    print("RECORD", json.dumps({"seconds": seconds, "tokens": len(prompts) * int(output_len),
                                "steps": steps}), flush=True)
    llm.shutdown()
    """
)

AGREEMENT_SCRIPT = textwrap.dedent(
    """
    import sys, time, torch, torch.distributed as dist
    rank, port, count = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    values = torch.tensor([1, 7], dtype=torch.int64)
    for _ in range(100):
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
    start = time.perf_counter()
    for _ in range(count):
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
    if rank == 0:
        print((time.perf_counter() - start) / count * 1e6, flush=True)
    dist.destroy_process_group()
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def model_dir() -> str:
    """The random MoE model, written once."""
    target = REPO / ".cache" / "bench" / "lockstep-moe"
    if (target / "config.json").exists():
        return str(target)
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    MixtralForCausalLM(MixtralConfig(**MODEL_SETTINGS)).save_pretrained(str(target))
    return str(target)


def agreement_us(count: int = 2000) -> float:
    """Microseconds of one agreement all-reduce between two gloo processes."""
    port = _free_port()
    ranks = [
        subprocess.Popen(
            [sys.executable, "-c", AGREEMENT_SCRIPT, str(rank), str(port), str(count)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [process.communicate(timeout=120)[0] for process in ranks]
    return float(outputs[0].strip())


def run(model: str, counts: list[int], threads: int, args: argparse.Namespace) -> list[dict]:
    """One engine (one count) or lockstep ranks (one count each), `threads` each; their
    records."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    port = _free_port()
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp, "rank.py")
        script.write_text(RANK_SCRIPT)
        processes = []
        for rank, count in enumerate(counts):
            rank_env = dict(env)
            if len(counts) > 1:
                rank_env.update(
                    VLLM_DP_RANK=str(rank),
                    VLLM_DP_RANK_LOCAL=str(rank),
                    VLLM_DP_SIZE=str(len(counts)),
                    VLLM_DP_MASTER_IP="127.0.0.1",
                    VLLM_DP_MASTER_PORT=str(port),
                )
            command = [sys.executable, str(script), model, str(count), str(args.input_len)]
            command += [str(args.output_len), str(threads)]
            processes.append(
                subprocess.Popen(command, env=rank_env, stdout=subprocess.PIPE, text=True)
            )
        records = []
        for process in processes:
            out = process.communicate(timeout=1200)[0]
            line = next(line for line in out.splitlines() if line.startswith("RECORD "))
            records.append(json.loads(line[7:]))
    return records


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--input-len", type=int, default=16)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    from ember.kernels.cpu_features import cpu_isa

    model = model_dir()
    half = args.prompts // 2
    configs = [
        ("one engine", [args.prompts]),
        ("one engine, half threads", [args.prompts]),
        ("2 ranks: all on rank 0", [args.prompts, 0]),
        ("2 ranks: half each", [half, args.prompts - half]),
    ]
    print(
        f"lockstep data parallelism, random Mixtral ({MODEL_SETTINGS['num_local_experts']} "
        f"experts, {MODEL_SETTINGS['num_hidden_layers']} layers), {args.prompts} prompts x "
        f"{args.input_len} in / {args.output_len} out, {args.threads} threads, CPU ISA "
        f"{cpu_isa()}"
    )
    print(f"agreement all-reduce (gloo, 2 processes): {agreement_us():.1f} us")
    print(
        "configuration            , threads, wall s, output tok/s, ms/step, steps, "
        "idle steps by rank"
    )
    for name, counts in configs:
        threads = args.threads if name == "one engine" else max(1, args.threads // 2)
        records = run(model, counts, threads, args)
        wall = max(record["seconds"] for record in records)
        tokens = sum(record["tokens"] for record in records)
        steps = [record["steps"] for record in records if record["steps"]]
        step_count = steps[0]["steps"] if steps else args.output_len + 1
        idle = " ".join(str(s["idle_steps"]) for s in steps) if steps else "-"
        print(
            f"{name:<25}, {threads:7d}, {wall:6.2f}, {tokens / wall:12.1f}, "
            f"{wall / step_count * 1e3:7.2f}, {step_count:5d}, {idle}"
        )


if __name__ == "__main__":
    main()
