"""Engine checks on a CUDA GPU, on small random models written here (no hub, no embedded model):
greedy tokens of ember on the GPU against Hugging Face `transformers` on the same GPU and
weights, in float32, for a dense Llama (with and without CUDA graphs), GPTQ and AWQ checkpoints
(against HF on their dequantized weights) and FP8 checkpoints (against ember on the CPU, since
HF does not round activations through e4m3), and LoRA adapters in one mixed batch (against
`peft`'s PeftModel on the same GPU). Each check prints PASS or FAIL and the run goes
on; the exit status is the number of failures.

    python tools/gpu_smoke.py            # on a machine with a GPU, from the repository root
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.fp8_checkpoints import write_fp8_checkpoint
from tests.helpers import random_prompts, write_random_llama
from tests.quantized_checkpoints import (
    write_awq_checkpoint,
    write_dequantized_checkpoint,
    write_gptq_checkpoint,
)

# wide enough for 128-input groups and 128x128 FP8 blocks
SHAPE = {
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
}
NEW_TOKENS = 12
# EMBER_SMOKE_DEVICE=cpu runs the same checks on the CPU (a dry run of this script)
DEVICE = os.environ.get("EMBER_SMOKE_DEVICE", "cuda")
# EMBER_SMOKE_ONLY=gptq,lora runs only the checks whose names hold one of these words
ONLY = [word for word in os.environ.get("EMBER_SMOKE_ONLY", "").split(",") if word]
# the prompts fit one batch of 8: CUDA graphs for batch sizes up to 8 only (a faster start)
ENGINE = {"max_num_seqs": 8}


def hf_greedy(
    model_dir: str, prompts: list[list[int]], adapter: str | None = None
) -> list[list[int]]:
    """HF greedy tokens of each prompt, with a LoRA adapter applied by peft where given."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    model = model.to(DEVICE).eval()
    outputs = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt], device=DEVICE)
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS,
                do_sample=False,
                pad_token_id=0,
            )
            outputs.append(out[0, len(prompt) :].tolist())
    return outputs


def ember_greedy(model_dir: str, prompts: list[list[int]], **kwargs) -> list[list[int]]:
    from ember import LLM, SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    with LLM(model_dir, dtype="float32", skip_tokenizer_init=True, **ENGINE, **kwargs) as llm:
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outputs]


def write_adapter(base_dir: str, path: str, seed: int, settings: dict) -> str:
    """A random PEFT LoRA adapter (B not zero) on `base_dir`, saved as peft saves one."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **settings))
    for name, param in peft_model.named_parameters():
        if "lora_" in name:
            param.data.normal_(0, 0.1)
    peft_model.save_pretrained(path)
    return path


def ember_lora_greedy(
    base_dir: str, adapters: list[str | None], prompts: list[list[int]], **kwargs
) -> list[list[int]]:
    """Ember's greedy tokens of one batch in which prompt i runs under adapters[i]."""
    from ember import LLM, LoRARequest, SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    ids = {path: 1 + index for index, path in enumerate(dict.fromkeys(filter(None, adapters)))}
    requests = [
        None if path is None else LoRARequest(os.path.basename(path), ids[path], path)
        for path in adapters
    ]
    with LLM(
        base_dir,
        dtype="float32",
        skip_tokenizer_init=True,
        enable_lora=True,
        max_loras=2,
        **ENGINE,
        **kwargs,
    ) as llm:
        outputs = llm.generate(
            [{"prompt_token_ids": p} for p in prompts],
            params,
            lora_request=requests,
            use_tqdm=False,
        )
    return [list(o.outputs[0].token_ids) for o in outputs]


def agreement(ours: list[list[int]], reference: list[list[int]]) -> float:
    """The share of prompts whose tokens are all the reference's."""
    return sum(a == b for a, b in zip(ours, reference, strict=True)) / len(reference)


def main() -> int:
    failures = 0
    root = tempfile.mkdtemp(prefix="ember-gpu-smoke-")
    dense = write_random_llama(os.path.join(root, "dense"), **SHAPE)
    prompts = random_prompts(6, 512, [5, 17, 40, 3, 64, 9], seed=1)

    def check(name: str, run, reference, minimum: float = 1.0) -> None:
        nonlocal failures
        if ONLY and not any(word in name for word in ONLY):
            return
        start = time.perf_counter()
        try:
            share = agreement(run(), reference())
            ok = share >= minimum
            print(f"{'PASS' if ok else 'FAIL'} {name}: {share:.0%} of prompts equal", end="")
        except Exception:  # noqa: BLE001 - report and go on to the next check
            ok = False
            print(f"FAIL {name}: raised\n{traceback.format_exc()}", end="")
        print(f" ({time.perf_counter() - start:.1f} s)", flush=True)
        failures += not ok

    check(
        "dense, CUDA graphs",
        lambda: ember_greedy(dense, prompts, device=DEVICE),
        lambda: hf_greedy(dense, prompts),
    )
    check(
        "dense, eager",
        lambda: ember_greedy(dense, prompts, device=DEVICE, enforce_eager=True),
        lambda: hf_greedy(dense, prompts),
    )
    for name, writer in (
        ("gptq 4-bit g128", lambda d: write_gptq_checkpoint(dense, d, bits=4, group_size=128)),
        (
            "gptq 4-bit act-order asym",
            lambda d: write_gptq_checkpoint(dense, d, bits=4, desc_act=True, sym=False),
        ),
        ("gptq 8-bit g64", lambda d: write_gptq_checkpoint(dense, d, bits=8, group_size=64)),
        ("awq g128", lambda d: write_awq_checkpoint(dense, d, group_size=128)),
    ):
        quant_dir = writer(os.path.join(root, name.replace(" ", "-")))
        dequantized = write_dequantized_checkpoint(quant_dir, quant_dir + "-dense")
        # the codes' products in another summation order (and, on the CPU, bfloat16
        # activations) can tip a near-tie of the random model; a wrong kernel agrees on none
        check(
            name,
            lambda q=quant_dir: ember_greedy(q, prompts, device=DEVICE),
            lambda d=dequantized: hf_greedy(d, prompts),
            minimum=0.5,
        )
    for scheme, activations in (("per-tensor", "static"), ("block", "dynamic")):
        quant_dir = write_fp8_checkpoint(
            dense,
            os.path.join(root, f"fp8-{scheme}"),
            scheme=scheme,
            activation_scheme=activations,
        )
        # e4m3 activation rounding can tip a near-tie between devices: most prompts agree
        check(
            f"fp8 {scheme} {activations} (CUDA vs CPU ember)",
            lambda q=quant_dir: ember_greedy(q, prompts, device=DEVICE),
            lambda q=quant_dir: ember_greedy(q, prompts, device="cpu"),
            minimum=0.5,
        )
    check(
        "online fp8 (CUDA vs CPU ember)",
        lambda: ember_greedy(dense, prompts, device=DEVICE, quantization="fp8"),
        lambda: ember_greedy(dense, prompts, device="cpu", quantization="fp8"),
        minimum=0.5,
    )
    # the CPU engine's FP8 cache is checked against HF with k/v rounded through e4m3
    # (tests/test_kv_cache_fp8.py); the GPU's against it
    check(
        "kv_cache_dtype fp8 (CUDA vs CPU ember)",
        lambda: ember_greedy(dense, prompts, device=DEVICE, kv_cache_dtype="fp8"),
        lambda: ember_greedy(dense, prompts, device="cpu", kv_cache_dtype="fp8"),
        minimum=0.5,
    )
    # LoRA: prompts under an attention adapter, an MLP adapter (another rank) and none, mixed
    # in one batch; each against peft on its own adapter
    attention = write_adapter(
        dense,
        os.path.join(root, "lora-attn"),
        seed=11,
        settings={
            "r": 8,
            "lora_alpha": 16,
            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
        },
    )
    mlp = write_adapter(
        dense,
        os.path.join(root, "lora-mlp"),
        seed=12,
        settings={"r": 4, "lora_alpha": 8, "target_modules": ["gate_proj", "up_proj", "down_proj"]},
    )
    which = [attention, mlp, None, attention, mlp, None]
    for eager in (False, True):
        check(
            f"lora, two adapters and none in one batch ({'eager' if eager else 'CUDA graphs'})",
            lambda e=eager: ember_lora_greedy(
                dense, which, prompts, device=DEVICE, enforce_eager=e
            ),
            lambda: [
                hf_greedy(dense, [prompt], adapter=path)[0] for path, prompt in zip(which, prompts)
            ],
        )
    print(f"{failures} failed", flush=True)
    return failures


if __name__ == "__main__":
    sys.exit(main())
