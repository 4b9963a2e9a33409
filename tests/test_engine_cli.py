"""`EngineArgs.add_cli_args` and `FlexibleArgumentParser` (vLLM's command line for engine
arguments): a script in the style of vLLM's offline examples, `LLM(**vars(parser.parse_args()))`,
runs with every vLLM flag at its default, and flags parse as vLLM's do."""

from __future__ import annotations

import pytest

from ember import LLM, EngineArgs, SamplingParams
from ember.enginecore.vllm_engine_args import VLLM_ENGINE_ARGS
from ember.utils import FlexibleArgumentParser
from ember.utils.argparse_utils import FlexibleArgumentParser as FromModule
from tests.helpers import hf_greedy


def _parser() -> FlexibleArgumentParser:
    parser = FlexibleArgumentParser()
    engine_group = parser.add_argument_group("Engine arguments")
    EngineArgs.add_cli_args(engine_group)
    engine_group.set_defaults(model="not/used")
    sampling_group = parser.add_argument_group("Sampling parameters")
    sampling_group.add_argument("--max-tokens", type=int)
    return parser


def test_every_vllm_engine_argument_has_a_flag_with_vllms_default():
    assert FlexibleArgumentParser is FromModule
    args = vars(_parser().parse_args([]))
    assert set(args) == {name for name, _ in VLLM_ENGINE_ARGS} | {"max_tokens"}
    assert args["model"] == "not/used"
    assert args["tensor_parallel_size"] == 1 and args["enable_chunked_prefill"] is None
    assert args["compilation_config"] is None  # a config object in vLLM: ember's default


def test_flags_parse_as_vllms_do():
    args = _parser().parse_args(
        [
            "--max_model_len", "128",  # underscores work as dashes
            "-tp", "2",
            "--no-enable-prefix-caching",
            "--hf-overrides", '{"rope_theta": 5000.0}',
            "--revision", "1234",  # a str field stays a str
            "--gpu-memory-utilization=0.5",
            "--enforce-eager",
        ]
    )  # fmt: skip
    assert args.max_model_len == 128 and args.tensor_parallel_size == 2
    assert args.enable_prefix_caching is False
    assert args.hf_overrides == {"rope_theta": 5000.0}
    assert args.revision == "1234"
    assert args.gpu_memory_utilization == 0.5 and args.enforce_eager is True
    with pytest.raises(SystemExit):
        _parser().parse_args(["--max-model-len", "many"])


def test_an_example_style_script_runs_with_every_flag_at_its_default(tiny_llama_dir):
    """vLLM's examples pass every parsed flag to `LLM`; sampling flags are popped first."""
    from transformers import AutoModelForCausalLM

    args = vars(
        _parser().parse_args(
            ["--model", tiny_llama_dir, "--dtype", "float32", "--max-tokens", "6",
             "--skip-tokenizer-init"]
        )
    )  # fmt: skip
    max_tokens = args.pop("max_tokens")
    with LLM(**args) as llm:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
        output = llm.generate([[1, 5, 9, 3]], params, use_tqdm=False)[0]
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    assert output.outputs[0].token_ids == hf_greedy(model, [1, 5, 9, 3], 6)
