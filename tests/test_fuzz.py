"""Fuzzing (hypothesis): random and malformed msgspec frames thrown at the engine core's input
socket and at the workers' call decoder. Nothing crashes or hangs, and good requests sent between
the bad ones are still answered, with the same tokens as before the fuzzing."""

from __future__ import annotations

import msgspec
import pytest
import zmq
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from ember import LLM, SamplingParams
from ember.enginecore.arg_utils import EngineArgs
from ember.enginecore.engine_core import EngineCore
from ember.enginecore.multiproc_executor import MultiprocExecutor
from ember.workers.rpc import call_decoder
from tests.helpers import run_engine, write_random_llama

GOOD_PROMPT = [5, 6, 7, 8]
GOOD_PARAMS = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
FUZZ_SETTINGS = settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

# Anything msgpack can carry (64-bit integers at most).
msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats()
    | st.text(max_size=12)
    | st.binary(max_size=12),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
# Requests shaped like EngineCoreRequest with contents a frontend would refuse, or accept.
sampling_params_dicts = st.fixed_dictionaries(
    {},
    optional={
        "max_tokens": st.integers(-3, 24),
        "temperature": st.floats(-1, 3),
        "top_k": st.integers(-2, 600),
        "top_p": st.floats(-0.5, 1.5),
        "min_tokens": st.integers(-1, 30),
        "n": st.integers(0, 3),
        "seed": st.integers(-(2**63), 2**63 - 1) | st.none(),
        "stop_token_ids": st.lists(st.integers(-5, 600), max_size=3),
        "ignore_eos": st.booleans(),
    },
)
engine_requests = st.tuples(
    st.text(max_size=10),
    st.lists(st.integers(-10, 700), max_size=300),
    sampling_params_dicts | msgpack_values,
).map(list)
message_types = st.sampled_from([b"H", b"P", b"A", b"B", b"U", b"Z", b"", b"AB"])
utility_calls = st.tuples(
    st.integers(-5, 5),
    st.sampled_from(["get_scheduler_stats", "reset_prefix_cache", "get_stats", "nope"])
    | st.text(max_size=10),
    st.lists(msgpack_values, max_size=3),
).map(list)
engine_core_frames = st.one_of(
    st.lists(st.binary(max_size=48), min_size=1, max_size=4),
    st.tuples(message_types, msgpack_values).map(lambda t: [t[0], msgspec.msgpack.encode(t[1])]),
    st.lists(engine_requests, max_size=3).map(lambda r: [b"A", msgspec.msgpack.encode(r)]),
    utility_calls.map(lambda call: [b"U", msgspec.msgpack.encode(call)]),
    st.lists(st.text(max_size=10), max_size=3).map(lambda r: [b"B", msgspec.msgpack.encode(r)]),
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return write_random_llama(tmp_path_factory.mktemp("fuzz_llama"), max_position_embeddings=256)


@pytest.fixture(scope="module")
def llm(model_dir):
    with LLM(model_dir, dtype="float32", skip_tokenizer_init=True) as engine:
        yield engine


@pytest.fixture(scope="module")
def raw_socket(llm):
    context = zmq.Context()
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(llm.engine.input_address)
    yield socket
    socket.close()
    context.term()


def _good_tokens(llm: LLM) -> list[int]:
    return llm.generate([GOOD_PROMPT], GOOD_PARAMS, use_tqdm=False)[0].outputs[0].token_ids


def test_engine_core_survives_random_frames_and_answers_good_requests(llm, raw_socket):
    expected = _good_tokens(llm)
    assert len(expected) == 4

    @FUZZ_SETTINGS
    @given(frames=engine_core_frames)
    def throw(frames):
        raw_socket.send_multipart(frames)
        assert llm.engine.process.poll() is None, "the engine core died"
        assert _good_tokens(llm) == expected

    throw()
    assert llm.engine.is_alive()


@pytest.fixture(scope="module")
def engine_core(model_dir):
    args = EngineArgs(model=model_dir, dtype="float32", max_model_len=256)
    core = EngineCore(args.create_engine_config(), MultiprocExecutor)
    yield core
    core.shutdown()


worker_payloads = st.one_of(
    st.binary(max_size=64),
    msgpack_values.map(msgspec.msgpack.encode),
    st.tuples(
        st.sampled_from(["step", "init_kv", "blocks", "shutdown", "start_profile", "x"]),
        msgpack_values,
    ).map(lambda t: msgspec.msgpack.encode(list(t))),
)


def test_worker_answers_malformed_calls_with_an_error_and_keeps_serving(engine_core):
    executor = engine_core.executor
    expected = run_engine(engine_core, [GOOD_PROMPT], GOOD_PARAMS)

    @FUZZ_SETTINGS
    @given(payload=worker_payloads)
    def throw(payload):
        try:
            call_decoder.decode(payload)
            assume(False)  # a well-formed call is not what this test throws
        except msgspec.DecodeError:
            pass
        executor.broadcast.enqueue(payload)
        replies = executor._collect(timeout_s=10.0, what="a malformed call")
        assert replies[0].error is not None
        assert run_engine(engine_core, [GOOD_PROMPT], GOOD_PARAMS) == expected

    throw()
    executor.check_health()
