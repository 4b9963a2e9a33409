"""vLLM's SamplingParams.extra_args and output_kind, PoolingParams.use_activation, the output
fields encoder_prompt / encoder_prompt_token_ids / num_cached_tokens, and class-based
`LLM(logits_processors=...)` with per-request options in extra_args, each against vLLM's
documented meaning: unit checks first, then one generating and one pooling engine (the greedy
oracle is Hugging Face's logits with the processor's rule applied by hand)."""

from __future__ import annotations

import msgspec
import pytest
import torch

from ember import LLM, EngineArgs, PoolingParams, SamplingParams
from ember.enginecore.messages import EngineCoreRequest
from ember.logits_process import BatchUpdate, LogitsProcessor
from ember.sampling_params import RequestOutputKind
from ember.workers.config import PoolerConfig
from ember.workers.layers.pooler import Pooler
from ember.workers.logits_processor import LogitsProcessors
from ember.workers.scheduler_output import NewRequestData
from tests.helpers import random_prompts, write_random_llama

MAX_TOKENS = 6


class BanToken(LogitsProcessor):
    """Per request, extra_args["ban_token_id"] is never sampled (may change the argmax)."""

    def __init__(self, vllm_config, device, is_pin_memory):
        self.banned: dict[int, int] = {}  # batch row -> token id

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        for index in batch_update.removed:
            self.banned.pop(index, None)
        for index, params, _prompt, _output in batch_update.added:
            self.banned.pop(index, None)
            token_id = (params.extra_args or {}).get("ban_token_id")
            if token_id is not None:
                self.banned[index] = token_id

    def apply(self, logits):
        for row, token_id in self.banned.items():
            logits[row, token_id] = float("-inf")
        return logits


class OnlyTokens(LogitsProcessor):
    """Per request, sample only extra_args["only_token_ids"]. It claims to be argmax-invariant,
    so, as in vLLM, greedy rows never see it (this is how the test tells the two kinds apart)."""

    def __init__(self, vllm_config, device, is_pin_memory):
        self.allowed: dict[int, list[int]] = {}

    def is_argmax_invariant(self) -> bool:
        return True

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        for index in batch_update.removed:
            self.allowed.pop(index, None)
        for index, params, _prompt, _output in batch_update.added:
            self.allowed.pop(index, None)
            only = (params.extra_args or {}).get("only_token_ids")
            if only is not None:
                self.allowed[index] = only

    def apply(self, logits):
        for row, token_ids in self.allowed.items():
            keep = logits[row, token_ids].clone()
            logits[row] = float("-inf")
            logits[row, token_ids] = keep
        return logits


class NotAProcessor:
    def apply(self, logits):
        return logits


def test_request_output_kind_has_vllms_members_and_values():
    assert [(kind.name, kind.value) for kind in RequestOutputKind] == [
        ("CUMULATIVE", 0),
        ("DELTA", 1),
        ("FINAL_ONLY", 2),
    ]
    assert SamplingParams().output_kind is RequestOutputKind.CUMULATIVE


def test_output_kind_must_be_a_request_output_kind():
    with pytest.raises(TypeError, match="output_kind"):
        SamplingParams(output_kind=2)


def test_extra_args_and_output_kind_travel_to_the_worker_unchanged():
    extra_args = {"ban": [7, 9], "nested": {"scale": 0.5, "name": "x", "flag": True}}
    params = SamplingParams(extra_args=extra_args, output_kind=RequestOutputKind.DELTA)
    request = EngineCoreRequest("r", [1, 2, 3], params)
    decoded = msgspec.msgpack.decode(msgspec.msgpack.encode(request), type=EngineCoreRequest)
    new = NewRequestData("r", [1, 2, 3], decoded.sampling_params, [0])
    at_worker = msgspec.msgpack.decode(msgspec.msgpack.encode(new), type=NewRequestData)
    assert at_worker.sampling_params.extra_args == extra_args
    assert at_worker.sampling_params.output_kind is RequestOutputKind.DELTA
    clone = params.clone()
    clone.extra_args["nested"]["scale"] = 2.0  # a deep copy, as vLLM's clone
    assert params.extra_args["nested"]["scale"] == 0.5


@pytest.mark.parametrize(
    ("extra_args", "error", "match"),
    [
        ([1, 2], TypeError, "extra_args must be a dict"),
        ({"big": 2**64}, ValueError, "between|in \\[-2\\*\\*63"),
        ({"deep": [{"small": -(2**63) - 1}]}, ValueError, "extra_args integers"),
        ({"obj": object()}, TypeError, "msgpack-encodable"),
    ],
)
def test_extra_args_must_survive_msgpack(extra_args, error, match):
    with pytest.raises(error, match=match):
        SamplingParams(extra_args=extra_args)


def test_use_activation_switches_softmax_and_normalization():
    hidden = torch.randn(7, 6)
    spans = [(0, 3), (3, 7)]
    head = torch.nn.Linear(6, 3)
    classify = Pooler(PoolerConfig(pooling_type="LAST", head="classify", num_labels=3), head)
    probs, logits = classify(
        hidden,
        spans,
        [
            PoolingParams(task="classify", use_activation=True),
            PoolingParams(task="classify", use_activation=False),
        ],
    )
    with torch.no_grad():
        torch.testing.assert_close(probs, head(hidden[2]).softmax(-1))
        torch.testing.assert_close(logits, head(hidden[6]))
    embed = Pooler(PoolerConfig(pooling_type="MEAN", normalize=True))
    raw, unit = embed(
        hidden,
        spans,
        [PoolingParams(task="embed", use_activation=False), PoolingParams(task="embed")],
    )
    torch.testing.assert_close(raw, hidden[0:3].mean(0))
    torch.testing.assert_close(unit, torch.nn.functional.normalize(hidden[3:7].mean(0), dim=0))


def test_older_activation_and_normalize_spellings_agree_with_use_activation():
    assert PoolingParams(activation=False).apply_activation is False
    assert PoolingParams(normalize=False).apply_normalize is False
    assert PoolingParams(use_activation=False, activation=False).apply_activation is False
    assert PoolingParams().apply_activation is None and PoolingParams().apply_normalize is None
    with pytest.raises(ValueError, match="use_activation=True and activation=False disagree"):
        PoolingParams(use_activation=True, activation=False)
    with pytest.raises(ValueError, match="normalize"):
        PoolingParams(use_activation=False, normalize=True)
    with pytest.raises(TypeError, match="use_activation must be a bool"):
        PoolingParams(use_activation=1)
    # use_activation is vLLM's switch for every task, embeddings included.
    assert PoolingParams(use_activation=False).with_task("embed").use_activation is False
    decoded = msgspec.msgpack.decode(
        msgspec.msgpack.encode(PoolingParams(use_activation=False, task="classify")),
        type=PoolingParams,
    )
    assert decoded.use_activation is False


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_random_llama(tmp_path_factory.mktemp("tiny_fields"), max_position_embeddings=128)


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    with LLM(
        tiny_dir,
        dtype="float32",
        skip_tokenizer_init=True,
        block_size=4,
        enable_prefix_caching=True,
        logits_processors=[BanToken, f"{__name__}:OnlyTokens"],
    ) as llm:
        yield llm


@pytest.fixture(scope="module")
def hf_tiny(tiny_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()


def _hf_greedy_without(model, prompt: list[int], max_tokens: int, banned: int | None):
    outputs: list[int] = []
    with torch.no_grad():
        for _ in range(max_tokens):
            logits = model(torch.tensor([prompt + outputs])).logits[0, -1].double()
            if banned is not None:
                logits[banned] = float("-inf")
            outputs.append(int(logits.argmax()))
    return outputs


def test_batch_update_reports_changed_rows_as_added_and_dropped_rows_as_removed():
    seen = []

    class Recorder:
        def is_argmax_invariant(self):
            return False

        def update_state(self, batch_update):
            seen.append(batch_update)

    processors = LogitsProcessors([Recorder()])
    a, b, c = (("a", 1), "pa", [1], [10]), (("b", 2), "pb", [2], []), (("c", 3), "pc", [3], [])
    processors.update([a, b, c])
    processors.update([a, b, c])
    processors.update([a, c])
    added = [(0, "pa", [1], [10]), (1, "pb", [2], []), (2, "pc", [3], [])]
    assert seen[0] == BatchUpdate(3, [], added, [])
    assert seen[1] is None  # nothing changed
    assert seen[2] == BatchUpdate(2, [2], [(1, "pc", [3], [])], [])


def test_logits_processors_are_checked_when_the_engine_is_configured(tiny_dir):
    with pytest.raises(ValueError, match="'<module>:<class>'"):
        EngineArgs(
            model=tiny_dir, logits_processors=["tests.no_colon.Class"]
        ).create_engine_config()
    with pytest.raises(TypeError, match="lacks is_argmax_invariant, update_state"):
        EngineArgs(model=tiny_dir, logits_processors=[NotAProcessor]).create_engine_config()

    class Local(BanToken):
        pass

    with pytest.raises(TypeError, match="top level of an importable module"):
        EngineArgs(model=tiny_dir, logits_processors=[Local]).create_engine_config()
    with pytest.raises(TypeError, match="must be classes"):
        EngineArgs(
            model=tiny_dir, logits_processors=[BanToken(None, None, False)]
        ).create_engine_config()


def test_custom_processor_bans_a_token_per_request_as_hf_greedy_with_it_at_minus_inf(tiny, hf_tiny):
    prompts = random_prompts(4, 512, [5, 9, 12, 7], seed=11)
    plain = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    unbanned = [o.outputs[0].token_ids for o in tiny.generate(prompts, plain, use_tqdm=False)]
    # Ban a token each prompt's greedy output holds (so the ban matters), except for prompt 2.
    bans = [unbanned[0][0], unbanned[1][0], None, unbanned[3][1]]
    params = [
        SamplingParams(
            temperature=0.0,
            max_tokens=MAX_TOKENS,
            ignore_eos=True,
            extra_args=None if ban is None else {"ban_token_id": ban},
        )
        for ban in bans
    ]
    outputs = tiny.generate(prompts, params, use_tqdm=False)
    for prompt, ban, output in zip(prompts, bans, outputs):
        assert output.outputs[0].token_ids == _hf_greedy_without(hf_tiny, prompt, MAX_TOKENS, ban)
        if ban is not None:
            assert ban not in output.outputs[0].token_ids
    assert outputs[2].outputs[0].token_ids == unbanned[2]


def test_argmax_invariant_processor_shapes_sampling_but_not_greedy(tiny):
    prompts = random_prompts(2, 512, [6, 10], seed=13)
    only = {"only_token_ids": [5, 6, 7]}
    sampled = SamplingParams(temperature=1.0, seed=0, max_tokens=MAX_TOKENS, extra_args=only)
    greedy = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    greedy_only = SamplingParams(
        temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, extra_args=only
    )
    params = [sampled] * 2 + [greedy] * 2 + [greedy_only] * 2
    outputs = tiny.generate(prompts * 3, params, use_tqdm=False)
    for output in outputs[:2]:
        assert set(output.outputs[0].token_ids) <= {5, 6, 7}
    greedy_ids = [o.outputs[0].token_ids for o in outputs[2:4]]
    assert [o.outputs[0].token_ids for o in outputs[4:]] == greedy_ids


def test_generate_returns_final_outputs_whatever_the_output_kind(tiny):
    prompts = random_prompts(3, 512, [9, 13, 6], seed=3)
    plain = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in tiny.generate(prompts, plain, use_tqdm=False)]
    for kind in RequestOutputKind:
        params = SamplingParams(
            temperature=0.0,
            max_tokens=MAX_TOKENS,
            ignore_eos=True,
            output_kind=kind,
            extra_args={"unused": [1, 2]},
        )
        outputs = tiny.generate(prompts, params, use_tqdm=False)
        assert all(o.finished for o in outputs)
        # DELTA would hold only the last token in a streamed output; offline it is the whole.
        assert [o.outputs[0].token_ids for o in outputs] == expected
        assert params.output_kind is kind  # the user's object is left as it was


def test_request_output_has_encoder_fields_and_cached_token_count(tiny):
    prompt = random_prompts(1, 512, [16], seed=5)[0]
    params = SamplingParams(temperature=0.0, max_tokens=2)
    (first,) = tiny.generate([prompt], params, use_tqdm=False)
    (second,) = tiny.generate([prompt], params, use_tqdm=False)
    assert first.encoder_prompt is None and first.encoder_prompt_token_ids is None
    assert "encoder_prompt=None" in repr(first)
    # block_size 4: the second run finds the first 12 prompt tokens (3 full blocks; the last
    # prompt token is always computed) in the prefix cache.
    assert second.num_cached_tokens == 12
    assert first.num_cached_tokens == 0


def test_pooling_outputs_carry_num_cached_tokens_and_use_activation(tiny_dir):
    from transformers import AutoModel

    prompts = random_prompts(2, 512, [7, 11], seed=9)
    with LLM(tiny_dir, runner="pooling", skip_tokenizer_init=True) as llm:
        unit = llm.embed(prompts, use_tqdm=False)
        raw = llm.embed(prompts, pooling_params=PoolingParams(use_activation=False), use_tqdm=False)
    model = AutoModel.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    for prompt, unit_output, raw_output in zip(prompts, unit, raw):
        with torch.no_grad():
            last = model(torch.tensor([prompt])).last_hidden_state[0, -1]
        torch.testing.assert_close(raw_output.outputs.data, last, atol=1e-4, rtol=1e-4)
        expected = torch.nn.functional.normalize(last, dim=0)
        torch.testing.assert_close(unit_output.outputs.data, expected, atol=1e-4, rtol=1e-4)
        # Pooling models run without the prefix cache by default (vLLM's default too).
        assert unit_output.num_cached_tokens == 0 and unit_output.finished
