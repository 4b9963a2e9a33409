"""`make demo`: generation and chat on the embedded default model, with texts and throughput.

Uses only the public API a vLLM user knows: `from ember import LLM, SamplingParams`.
"""

from __future__ import annotations

import time

from ember import LLM, SamplingParams

PROMPTS = [
    "The capital of France is",
    "Here is a short poem about the sea:\n",
    "def fibonacci(n):",
]
CONVERSATION = [{"role": "user", "content": "Give me three tips for learning a language."}]


def main() -> None:
    start = time.perf_counter()
    llm = LLM()  # the embedded SmolLM2-135M-Instruct
    print(f"engine ready in {time.perf_counter() - start:.1f} s")
    params = SamplingParams(temperature=0.0, max_tokens=64)
    start = time.perf_counter()
    outputs = llm.generate(PROMPTS, params)
    outputs += llm.chat(CONVERSATION, params)  # rendered with the model's chat template
    elapsed = time.perf_counter() - start
    titles = PROMPTS + ["[chat] " + CONVERSATION[0]["content"]]
    for title, output in zip(titles, outputs):
        print(f"\n>>> {title}\n{output.outputs[0].text}")
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    print(f"\n{generated} tokens in {elapsed:.2f} s = {generated / elapsed:.1f} output tokens/s")

    prompts = [f"Write a sentence about the number {i}." for i in range(32)]
    start = time.perf_counter()
    outputs = llm.generate(prompts, SamplingParams(max_tokens=64, ignore_eos=True, seed=0))
    elapsed = time.perf_counter() - start
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    print(
        f"batch of {len(prompts)}: {generated} tokens in {elapsed:.2f} s = "
        f"{generated / elapsed:.1f} output tokens/s"
    )
    llm.shutdown()


if __name__ == "__main__":
    main()
