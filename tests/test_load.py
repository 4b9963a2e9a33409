"""Load: one `generate` call with 10,000 short prompts on a small random model completes, with
every output in its prompt's place and correct (spot-checked against Hugging Face), exact token
counts in the metrics, and the frontend's memory growth below 300 MB."""

from __future__ import annotations

import random
import threading
from typing import TYPE_CHECKING

import psutil
import pytest
import torch
from transformers import AutoModelForCausalLM

from ember import LLM, SamplingParams
from tests.helpers import hf_greedy, write_random_llama

if TYPE_CHECKING:
    from typing_extensions import Self

NUM_PROMPTS = 10_000
MAX_TOKENS = 3
MEMORY_GROWTH_LIMIT_BYTES = 300 * 2**20


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return write_random_llama(tmp_path_factory.mktemp("load_llama"), max_position_embeddings=128)


class _PeakRSS:
    """Samples this process's resident memory every 50 ms while in use."""

    def __init__(self) -> None:
        self.process = psutil.Process()
        self.peak = self.process.memory_info().rss
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(0.05):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


@pytest.mark.slow
def test_ten_thousand_prompts_in_one_generate_call(model_dir):
    rng = random.Random(0)
    # Distinct prompts (a counter in the first tokens), so any mix-up of places shows.
    prompts = [
        [3 + i % 500, 3 + i // 500] + [rng.randrange(3, 512) for _ in range(rng.randrange(1, 7))]
        for i in range(NUM_PROMPTS)
    ]
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    with LLM(model_dir, dtype="float32", skip_tokenizer_init=True, max_model_len=128) as llm:
        before = llm.get_metrics()
        baseline_rss = psutil.Process().memory_info().rss
        with _PeakRSS() as rss:
            outputs = llm.generate(prompts, params, use_tqdm=False)
        after = llm.get_metrics()
    growth = rss.peak - baseline_rss
    print(f"10,000 prompts: frontend peak RSS growth {growth / 2**20:.0f} MB")
    assert growth < MEMORY_GROWTH_LIMIT_BYTES, f"frontend grew {growth / 2**20:.0f} MB"
    assert len(outputs) == NUM_PROMPTS
    assert [o.prompt_token_ids for o in outputs] == prompts
    assert all(o.finished and 1 <= len(o.outputs[0].token_ids) <= MAX_TOKENS for o in outputs)
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    assert after.get("generation_tokens") - before.get("generation_tokens") == generated
    assert after.get("prompt_tokens") - before.get("prompt_tokens") == sum(map(len, prompts))
    assert after.get("request_success") - before.get("request_success", 0) == NUM_PROMPTS
    hf_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for index in random.Random(1).sample(range(NUM_PROMPTS), 20):
        assert outputs[index].outputs[0].token_ids == hf_greedy(
            hf_model, prompts[index], MAX_TOKENS
        ), index
