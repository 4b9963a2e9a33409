"""Pieces of the pooling path without an engine: encoder attention against its reference, the
pooler's tasks, raw tensor frames, pooling requests in the scheduler, sentence-transformers
configs."""

from __future__ import annotations

import json

import msgspec
import pytest
import torch

from ember.enginecore.kv_cache_manager import KVCacheManager
from ember.enginecore.messages import EngineCoreOutput, EngineCoreOutputs, FinishReason
from ember.enginecore.pooling_config import sentence_transformers_pooling
from ember.enginecore.request import Request
from ember.enginecore.scheduler import Scheduler
from ember.enginecore.tensor_frames import attach_tensor_frames, split_tensor_frames
from ember.kernels.encoder_attention import encoder_attention, encoder_attention_reference
from ember.workers.config import PoolerConfig, SchedulerConfig
from ember.workers.layers.pooler import Pooler
from ember.workers.pooled_tensor import PooledTensor
from ember.workers.pooling_params import PoolingParams
from ember.workers.pooling_runner import to_pooled_tensor
from ember.workers.scheduler_output import ModelRunnerOutput


@pytest.mark.parametrize("seq_lens", [[7], [3, 1, 5, 2], [16, 16]])
def test_encoder_attention_matches_reference(seq_lens):
    generator = torch.Generator().manual_seed(0)
    shape = (sum(seq_lens), 4, 8)
    q, k, v = (torch.randn(shape, generator=generator) for _ in range(3))
    out = encoder_attention(q, k, v, seq_lens, scale=8**-0.5)
    expected = encoder_attention_reference(q, k, v, seq_lens, scale=8**-0.5)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_encoder_attention_is_bidirectional():
    """The first token sees the last one: changing the last value changes every output."""
    q, k, v = (torch.randn(5, 2, 4) for _ in range(3))
    before = encoder_attention(q, k, v, [5], 0.5)
    v2 = v.clone()
    v2[-1] += 1.0
    after = encoder_attention(q, k, v2, [5], 0.5)
    assert not torch.allclose(before[0], after[0])


def test_pooler_embed_and_classify_tasks():
    hidden = torch.randn(7, 6)
    spans = [(0, 3), (3, 7)]
    mean = Pooler(PoolerConfig(pooling_type="MEAN", normalize=True))
    out = mean(hidden, spans, [PoolingParams(task="embed"), PoolingParams(task="embed")])
    torch.testing.assert_close(out[1], torch.nn.functional.normalize(hidden[3:7].mean(0), dim=0))
    cls = Pooler(PoolerConfig(pooling_type="CLS", normalize=False))
    (first,) = cls(hidden, [(3, 7)], [PoolingParams(task="embed", dimensions=2)])
    torch.testing.assert_close(first, hidden[3, :2])
    head = torch.nn.Linear(6, 3)
    classify = Pooler(PoolerConfig(pooling_type="LAST", head="classify", num_labels=3), head)
    probs, logits = classify(
        hidden,
        spans,
        [PoolingParams(task="classify"), PoolingParams(task="classify", activation=False)],
    )
    with torch.no_grad():
        torch.testing.assert_close(probs, head(hidden[2]).softmax(-1))
        torch.testing.assert_close(logits, head(hidden[6]))


def test_pooled_tensors_travel_as_raw_frames():
    tensors = [torch.arange(6, dtype=torch.float32).view(2, 3), torch.tensor([0.5, -1.0])]
    outputs = EngineCoreOutputs(
        outputs=[
            EngineCoreOutput(rid, [], FinishReason.STOP, pooling_output=to_pooled_tensor(t))
            for rid, t in zip("ab", tensors)
        ]
        + [EngineCoreOutput("gen", [5])]
    )
    payload_struct, frames = split_tensor_frames(outputs)
    assert len(frames) == 2
    payload = msgspec.msgpack.encode(payload_struct)
    for tensor in tensors:  # the values are not in the msgpack payload
        assert tensor.numpy().tobytes() not in payload
    decoded = msgspec.msgpack.decode(payload, type=EngineCoreOutputs)
    buffers = attach_tensor_frames(decoded, frames)
    for output, tensor in zip(decoded.outputs, tensors):
        pooled = output.pooling_output
        values = torch.frombuffer(bytearray(buffers[output.request_id]), dtype=torch.float32)
        torch.testing.assert_close(values.view(pooled.shape), tensor)
    bad = EngineCoreOutputs(
        outputs=[EngineCoreOutput("x", [], pooling_output=PooledTensor("float32", [1], frame=3))]
    )
    with pytest.raises(ValueError, match="missing frame"):
        attach_tensor_frames(bad, frames)


def _pooling_request(request_id: str, prompt_len: int) -> Request:
    return Request(
        request_id=request_id,
        prompt_token_ids=list(range(10, 10 + prompt_len)),
        sampling_params=None,
        eos_token_ids=(2,),
        pooling_params=PoolingParams(task="embed"),
    )


def test_pooling_requests_are_never_chunked_and_finish_with_their_output():
    config = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=16, max_model_len=16)
    scheduler = Scheduler(config, KVCacheManager(64, 4, enable_caching=False))
    for request_id, length in (("a", 10), ("b", 10), ("c", 4)):
        scheduler.add_request(_pooling_request(request_id, length))
    first = scheduler.schedule()
    # "b" does not fit whole after "a" (10 + 10 > 16): it waits, and so does "c" behind it
    assert first.num_scheduled_tokens == {"a": 10}
    assert first.scheduled_new_reqs[0].pooling_params.task == "embed"
    tensor = to_pooled_tensor(torch.ones(3))
    outputs = scheduler.update_from_output(
        first, ModelRunnerOutput(pooled_req_ids=["a"], pooled_outputs=[tensor])
    )
    assert [(o.request_id, o.finish_reason) for o in outputs] == [("a", FinishReason.STOP)]
    assert outputs[0].pooling_output == tensor
    assert scheduler.num_running == 0
    second = scheduler.schedule()
    assert second.num_scheduled_tokens == {"b": 10, "c": 4}
    assert second.finished_req_ids == ["a"]


def test_sentence_transformers_modules_decide_pooling(tmp_path):
    assert sentence_transformers_pooling(str(tmp_path)) is None
    modules = [
        {"path": "", "type": "sentence_transformers.models.Transformer"},
        {"path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    (tmp_path / "1_Pooling").mkdir()
    pooling = tmp_path / "1_Pooling" / "config.json"
    pooling.write_text(json.dumps({"pooling_mode_lasttoken": True}))
    assert sentence_transformers_pooling(str(tmp_path)) == ("LAST", True)
    pooling.write_text(json.dumps({"pooling_mode_max_tokens": True}))
    with pytest.raises(NotImplementedError, match="max_tokens"):
        sentence_transformers_pooling(str(tmp_path))
    modules.append({"path": "3_Dense", "type": "sentence_transformers.models.Dense"})
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    pooling.write_text(json.dumps({"pooling_mode_cls_token": True}))
    with pytest.raises(NotImplementedError, match="Dense"):
        sentence_transformers_pooling(str(tmp_path))


def test_engine_core_process_imports_neither_torch_nor_transformers():
    """The pooling pieces the engine core uses (messages, frames, pooling facts) stay light."""
    import subprocess
    import sys

    code = (
        "import sys, ember.enginecore.core_process\n"
        "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_params_given_once_or_once_per_prompt():
    from ember.inputs import one_per_prompt
    from ember.workers.pooling_params import PoolingParams

    params = PoolingParams(normalize=False)
    assert one_per_prompt(params, 3, "pooling_params") == [params] * 3
    both = [PoolingParams(), PoolingParams(dimensions=4)]
    assert one_per_prompt(tuple(both), 2, "pooling_params") == both
    with pytest.raises(ValueError, match="pooling_params has 2 entries for 3 prompts"):
        one_per_prompt(both, 3, "pooling_params")
