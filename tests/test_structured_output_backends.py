"""The grammar backends of structured outputs (xgrammar, guidance, outlines) on SmolLM2's real
tokenizer: each kind compiles, a known valid output walks through the matcher with every step's
bitmask checked against `accept_token`, bad specs raise errors naming the field, and
`select_backend` follows vLLM's rules. No engine is started."""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from ember.enginecore.structured_output.backend_selection import select_backend
from ember.enginecore.structured_output.grammar import (
    allow_only_tokens,
    bitmask_words,
    choice_as_grammar,
    disallow_tokens_from,
    grammar_is_likely_lark,
    token_allowed,
)
from ember.enginecore.structured_output.guidance_backend import closed_objects
from ember.enginecore.structured_output.outlines_backend import choice_as_regex
from ember.workers.structured_outputs_params import StructuredOutputsParams

BACKEND_NAMES = ("xgrammar", "guidance", "outlines")
# The backends are built for a model whose vocabulary is padded past the tokenizer's (as many
# checkpoints pad their embedding table): those ids must never be allowed.
PADDING = 64
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}
TAGGED = {
    "type": "object",
    "properties": {"a": {"type": "integer"}},
    "required": ["a"],
}
LEGACY_STRUCTURAL_TAG = json.dumps(
    {
        "type": "structural_tag",
        "structures": [{"begin": "<f>", "schema": TAGGED, "end": "</f>"}],
        "triggers": ["<f"],
    }
)
NEW_STRUCTURAL_TAG = json.dumps(
    {
        "type": "structural_tag",
        "format": {
            "type": "tag",
            "begin": "<f>",
            "content": {"type": "json_schema", "json_schema": TAGGED},
            "end": "</f>",
        },
    }
)
# kind id -> (spec, a valid output, backends that take it)
CASES = {
    "json": ({"json": PERSON}, '{"name": "ab", "age": 3}', BACKEND_NAMES),
    "json_text": (
        {"json": '{"type": "array", "items": {"type": "boolean"}}'},
        "[true, false]",
        BACKEND_NAMES,
    ),
    "json_object": ({"json_object": True}, '{"a": [1, {"b": null}]}', BACKEND_NAMES),
    "regex": ({"regex": r"[a-z]{2,4}-[0-9]+"}, "abc-42", BACKEND_NAMES),
    "choice": (
        {"choice": ["red", "green apple", 'say "hi"\\\n', "a|b(c)."]},
        'say "hi"\\\n',
        BACKEND_NAMES,
    ),
    # Multi-byte characters split across byte-level tokens.
    "choice_unicode": (
        {"choice": ["plain", "h\u00e9llo \U0001f600"]},
        "h\u00e9llo \U0001f600",
        BACKEND_NAMES,
    ),
    "choice_regex_chars": ({"choice": ["x", "a|b(c)."]}, "a|b(c).", BACKEND_NAMES),
    "grammar_ebnf": (
        {"grammar": 'root ::= "yes" | "no" | "maybe " [0-9]'},
        "maybe 7",
        ("xgrammar", "guidance"),
    ),
    "grammar_lark": (
        {"grammar": 'start: "yes" | "no" | /[0-9]+/'},
        "1234",
        ("xgrammar", "guidance"),
    ),
    "structural_tag": (
        {"structural_tag": LEGACY_STRUCTURAL_TAG},
        'ok <f>{"a": 1}</f>',
        ("xgrammar", "guidance"),
    ),
    "structural_tag_format": (
        {"structural_tag": NEW_STRUCTURAL_TAG},
        '<f>{"a": 12}</f>',
        ("xgrammar",),
    ),
}
# outlines compiles "any object" into a 7,000-character regex: about 11 s on two cores.
SLOW_WALKS = {("outlines", "json_object")}
WALKS = [
    pytest.param(
        name,
        case,
        id=f"{name}-{case}",
        marks=[pytest.mark.slow] if (name, case) in SLOW_WALKS else [],
    )
    for case, (_, _, names) in CASES.items()
    for name in names
]


@pytest.fixture(scope="module")
def smollm2():
    """(tokenizer, the model's vocab_size, its EOS ids)."""
    from ember.enginecore.arg_utils import EngineArgs
    from ember.workers.model_loader.resolve import default_model_path

    try:
        from ember.workers.tokenizer_loader import load_tokenizer
    except ImportError:  # before the loader moved to the workers package
        from ember.tokenizer_loader import load_tokenizer

    config = EngineArgs(model=default_model_path()).create_engine_config()
    tokenizer = load_tokenizer(config.model.tokenizer, revision=None)
    return tokenizer, config.model.vocab_size, tuple(config.model.eos_token_ids)


def _build(name: str, tokenizer, vocab_size: int, stop_token_ids, **options):
    if name == "xgrammar":
        from ember.enginecore.structured_output.xgrammar_backend import XgrammarBackend

        return XgrammarBackend(tokenizer, vocab_size, stop_token_ids, **options)
    if name == "guidance":
        from ember.enginecore.structured_output.guidance_backend import GuidanceBackend

        return GuidanceBackend(tokenizer, vocab_size, stop_token_ids, **options)
    from ember.enginecore.structured_output.outlines_backend import OutlinesBackend

    return OutlinesBackend(tokenizer, vocab_size, stop_token_ids, **options)


@pytest.fixture(scope="module")
def backends(smollm2):
    """name -> backend over the padded vocabulary, built on first use."""
    tokenizer, vocab_size, eos_ids = smollm2
    built = {}

    def get(name: str):
        if name not in built:
            built[name] = _build(name, tokenizer, vocab_size + PADDING, eos_ids)
        return built[name]

    return get


def _rng() -> np.random.Generator:
    return np.random.default_rng(0)


def _tokens(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def _allowed(bitmask: np.ndarray, row: int, vocab_size: int) -> np.ndarray:
    """The row as one bool per token id."""
    words = bitmask[row].view(np.uint32)
    bits = (words[:, None] >> np.arange(32, dtype=np.uint32)) & 1
    return bits.reshape(-1)[:vocab_size].astype(bool)


def _walk(backend, tokenizer, params, text: str, stop_ids: tuple[int, ...], rng) -> None:
    """Feed `text`'s tokens then the first stop token; at each step the bitmask allows the next token, and for a
    sample of ids (random ones, some allowed ones, the stop tokens, padding ids) a token is allowed by the
    bitmask exactly when `accept_token` takes it."""
    vocab_size = backend.vocab_size
    tokenizer_size = len(tokenizer)
    eos_id = stop_ids[0]
    matcher = backend.matcher(backend.compile(params))
    bitmask = np.zeros((3, bitmask_words(vocab_size)), dtype=np.int32)
    for token_id in [*_tokens(tokenizer, text), eos_id]:
        bitmask[1] = -1  # every bit set: the fill must clear what it does not allow
        matcher.fill_bitmask(bitmask, 1)
        allowed = _allowed(bitmask, 1, vocab_size)
        assert allowed[token_id], f"bitmask refuses the next true token {token_id}"
        assert not allowed[tokenizer_size:].any(), "an id past the tokenizer's vocab is allowed"
        whole_row = _allowed(bitmask, 1, bitmask.shape[1] * 32)
        assert not whole_row[vocab_size:].any(), "a bit past vocab_size is set"
        allowed_ids = np.flatnonzero(allowed)
        sample = {
            *rng.integers(0, vocab_size, 200).tolist(),
            *rng.choice(allowed_ids, min(len(allowed_ids), 20), replace=False).tolist(),
            *stop_ids,
            min(tokenizer_size, vocab_size - 1),
            vocab_size - 1,
        }
        for candidate in sorted(sample):
            accepted = matcher.accept_token(candidate)
            assert accepted == bool(allowed[candidate]), (candidate, accepted)
            if accepted:
                assert matcher.is_terminated() == (candidate in stop_ids)
                matcher.rollback(1)
        assert not matcher.is_terminated()
        assert matcher.accept_token(token_id)
    assert matcher.is_terminated()
    # Terminated: nothing more is accepted, the mask allows only the stop tokens, and a
    # rollback of the stop token reopens the grammar.
    assert not matcher.accept_token(eos_id)
    matcher.fill_bitmask(bitmask, 2)
    assert np.flatnonzero(_allowed(bitmask, 2, vocab_size)).tolist() == sorted(stop_ids)
    matcher.rollback(1)
    assert not matcher.is_terminated()
    assert matcher.accept_token(eos_id) and matcher.is_terminated()
    assert (bitmask[0] == 0).all(), "a fill wrote outside its row"


@pytest.mark.parametrize(("name", "case"), WALKS)
def test_valid_output_walks_with_bitmask_matching_accept(name, case, smollm2, backends):
    tokenizer, _, eos_ids = smollm2
    spec, text, _ = CASES[case]
    _walk(backends(name), tokenizer, StructuredOutputsParams(**spec), text, eos_ids, _rng())


@pytest.mark.parametrize("name", BACKEND_NAMES)
def test_invalid_continuation_is_rejected(name, smollm2, backends):
    tokenizer, vocab_size, eos_ids = smollm2
    backend = backends(name)
    matcher = backend.matcher(backend.compile(StructuredOutputsParams(json=PERSON)))
    hello = _tokens(tokenizer, "hello")[0]
    assert not matcher.accept_token(hello)
    assert not matcher.accept_token(eos_ids[0])  # the grammar has not ended
    assert not matcher.accept_token(vocab_size + 1)  # a padding id
    assert not matcher.accept_token(-1)
    for token_id in _tokens(tokenizer, '{"name": "ab"'):  # refusals left the state alone
        assert matcher.accept_token(token_id)
    assert not matcher.accept_token(_tokens(tokenizer, "}")[0])  # "age" is required


@pytest.mark.parametrize("name", BACKEND_NAMES)
def test_disable_any_whitespace_refuses_spaces(name, smollm2, backends):
    tokenizer, _, eos_ids = smollm2
    backend = backends(name)
    params = StructuredOutputsParams(json=PERSON, disable_any_whitespace=True)
    _walk(backend, tokenizer, params, '{"name":"ab","age":3}', eos_ids, _rng())
    matcher = backend.matcher(backend.compile(params))
    tokens = _tokens(tokenizer, '{"name": "ab"')
    accepted = [matcher.accept_token(token_id) for token_id in tokens]
    assert not all(accepted)


@pytest.mark.parametrize("name", ["guidance", "outlines"])
def test_whitespace_pattern_replaces_the_default(name, smollm2, backends):
    tokenizer, _, eos_ids = smollm2
    params = StructuredOutputsParams(json=PERSON, whitespace_pattern="[ ]*")
    _walk(backends(name), tokenizer, params, '{"name":   "ab",  "age":3}', eos_ids, _rng())


def test_guidance_disable_additional_properties(smollm2, backends):
    tokenizer, _, _ = smollm2
    backend = backends("guidance")
    extra = _tokens(tokenizer, '{"name": "ab", "age": 3, "x": 1}')
    for closed in (False, True):
        params = StructuredOutputsParams(json=PERSON, disable_additional_properties=closed)
        matcher = backend.matcher(backend.compile(params))
        assert all(matcher.accept_token(t) for t in extra) is not closed


INVALID = {
    "json": {"json": {"type": "foo"}},
    "regex": {"regex": "a("},
    "grammar": {"grammar": "root ::= undefined_rule"},
    "structural_tag": {"structural_tag": '{"structures": [{"begin": "<f>"}], "triggers": []}'},
}


@pytest.mark.parametrize("name", BACKEND_NAMES)
@pytest.mark.parametrize("field", INVALID)
def test_invalid_spec_raises_naming_the_field(name, field, backends):
    with pytest.raises(ValueError, match=rf"^structured_outputs\.{field}: \S"):
        backends(name).compile(StructuredOutputsParams(**INVALID[field]))


def test_outlines_refuses_grammar_and_structural_tag(backends):
    backend = backends("outlines")
    with pytest.raises(ValueError, match=r"^structured_outputs\.grammar: .*does not support"):
        backend.compile(StructuredOutputsParams(grammar='root ::= "a"'))
    with pytest.raises(ValueError, match=r"^structured_outputs\.structural_tag: .*not support"):
        backend.compile(StructuredOutputsParams(structural_tag=LEGACY_STRUCTURAL_TAG))


def test_xgrammar_refuses_schema_features_it_would_ignore(backends):
    backend = backends("xgrammar")
    for schema in ({"type": "number", "multipleOf": 3}, {"type": "array", "uniqueItems": True}):
        with pytest.raises(ValueError, match=r"^structured_outputs\.json: xgrammar does not"):
            backend.compile(StructuredOutputsParams(json=schema))


@pytest.mark.parametrize("name", BACKEND_NAMES)
def test_exact_vocab_and_several_stop_tokens(name, smollm2):
    """Unpadded vocabulary (the bitmask row ends exactly at the tokenizer's last id) and two
    stop tokens: both end the grammar."""
    tokenizer, vocab_size, eos_ids = smollm2
    stop_ids = (eos_ids[0], 0)
    backend = _build(name, tokenizer, vocab_size, stop_ids)
    params = StructuredOutputsParams(regex="(ab)+")
    _walk(backend, tokenizer, StructuredOutputsParams(regex="[0-9]{3}"), "123", stop_ids, _rng())
    matcher = backend.matcher(backend.compile(params))
    for token_id in _tokens(tokenizer, "abab"):
        assert matcher.accept_token(token_id)
    bitmask = np.zeros((1, bitmask_words(vocab_size)), dtype=np.int32)
    matcher.fill_bitmask(bitmask, 0)
    assert all(token_allowed(bitmask, 0, stop) for stop in stop_ids)
    assert matcher.accept_token(0) and matcher.is_terminated()


@pytest.mark.parametrize("name", BACKEND_NAMES)
def test_compile_from_several_threads(name, backends):
    backend = backends(name)
    specs = [StructuredOutputsParams(regex=f"x{i}[a-c]+") for i in range(8)]
    with ThreadPoolExecutor(4) as pool:
        compiled = list(pool.map(backend.compile, specs))
    for index, grammar in enumerate(compiled):
        matcher = backend.matcher(grammar)
        bitmask = np.zeros((1, bitmask_words(backend.vocab_size)), dtype=np.int32)
        matcher.fill_bitmask(bitmask, 0)
        assert _allowed(bitmask, 0, backend.vocab_size).any(), index


def test_bitmask_row_shape_is_checked(backends):
    backend = backends("guidance")
    matcher = backend.matcher(backend.compile(StructuredOutputsParams(regex="a")))
    with pytest.raises(ValueError, match="words per row"):
        matcher.fill_bitmask(np.zeros((1, 3), dtype=np.int32), 0)
    with pytest.raises(ValueError, match="int32"):
        matcher.fill_bitmask(np.zeros((1, bitmask_words(backend.vocab_size)), np.int64), 0)


# ---- backend selection ---------------------------------------------------------------------


def test_auto_picks_xgrammar_for_a_plain_schema(backends):
    params = StructuredOutputsParams(json=PERSON)
    assert select_backend(params, "auto", backends) == ("xgrammar", True)
    assert params._backend is None and not params._backend_was_auto  # left to the caller


def test_auto_falls_back_to_guidance_for_what_xgrammar_ignores(backends):
    for schema in (
        {"type": "number", "multipleOf": 3},
        {"allOf": [{"type": "string"}, {"enum": ["yes", "no"]}]},
    ):
        params = StructuredOutputsParams(json=schema)
        assert select_backend(params, "auto", backends) == ("guidance", True)


def test_auto_raises_the_fallbacks_error_when_guidance_refuses_too(backends):
    # xgrammar would ignore uniqueItems, and llguidance 1.9 does not implement it: vLLM raises.
    params = StructuredOutputsParams(json={"type": "array", "uniqueItems": True})
    with pytest.raises(ValueError, match=r"^structured_outputs\.json: .*uniqueItems"):
        select_backend(params, "auto", backends)


def test_choice_stays_a_choice(backends):
    params = StructuredOutputsParams(choice=["a", "b"])
    assert select_backend(params, "auto", backends) == ("xgrammar", True)
    assert params.choice == ["a", "b"] and params.grammar is None


def test_explicit_backend_never_falls_back(backends):
    multiple_of = StructuredOutputsParams(json={"type": "integer", "multipleOf": 5})
    with pytest.raises(ValueError, match=r"^structured_outputs\.json: xgrammar does not"):
        select_backend(multiple_of, "xgrammar", backends)
    assert select_backend(multiple_of, "guidance", backends) == ("guidance", False)
    with pytest.raises(ValueError, match=r"^structured_outputs\.grammar: "):
        select_backend(StructuredOutputsParams(grammar='root ::= "a"'), "outlines", backends)
    with pytest.raises(ValueError, match=r"^structured_outputs\.regex: "):
        select_backend(StructuredOutputsParams(regex="(a"), "guidance", backends)


def test_request_backend_must_match_the_engines():
    def no_backend(name):
        raise AssertionError(f"no compile expected, asked for {name}")

    params = StructuredOutputsParams(regex="a")
    params._backend = "guidance"
    with pytest.raises(ValueError, match="'guidance' was requested.*'xgrammar'"):
        select_backend(params, "xgrammar", no_backend)
    with pytest.raises(ValueError, match="'guidance' was requested.*'auto'"):
        select_backend(params, "auto", no_backend)
    with pytest.raises(ValueError, match="must be one of"):
        select_backend(StructuredOutputsParams(regex="a"), "lmfe", no_backend)


class _Stub:
    """A backend that records its compiles and refuses what it is told to."""

    def __init__(self, name: str, refuses: bool, calls: list):
        self.name, self.refuses, self.calls = name, refuses, calls

    def compile(self, params):
        self.calls.append(self.name)
        if self.refuses:
            raise ValueError(f"structured_outputs.{params.kind}: {self.name} refuses")
        return object()

    def matcher(self, compiled):
        raise NotImplementedError


def _stubs(refusing: set[str]):
    calls: list[str] = []
    stubs = {name: _Stub(name, name in refusing, calls) for name in BACKEND_NAMES}
    return stubs.__getitem__, calls


def test_selection_rules_with_stub_backends():
    params = StructuredOutputsParams(json=PERSON)
    get, calls = _stubs({"xgrammar"})
    assert select_backend(params, "auto", get) == ("guidance", True)
    assert calls == ["xgrammar", "guidance"]
    # vLLM keeps schemas with patternProperties away from guidance: outlines takes them.
    get, calls = _stubs({"xgrammar"})
    pattern = StructuredOutputsParams(json={"type": "object", "patternProperties": {"^x": {}}})
    assert select_backend(pattern, "auto", get) == ("outlines", True)
    assert calls == ["xgrammar", "outlines"]
    # The fallback's error is the one raised; an explicit backend is the only one tried.
    get, calls = _stubs({"xgrammar", "guidance"})
    with pytest.raises(ValueError, match="guidance refuses"):
        select_backend(params, "auto", get)
    get, calls = _stubs({"guidance"})
    with pytest.raises(ValueError, match="guidance refuses"):
        select_backend(params, "guidance", get)
    assert calls == ["guidance"]
    # A _backend set by an earlier "auto" choice is re-decided, not refused.
    reused = StructuredOutputsParams(json=PERSON)
    reused._backend, reused._backend_was_auto = "guidance", True
    get, calls = _stubs(set())
    assert select_backend(reused, "auto", get) == ("xgrammar", True)
    same = StructuredOutputsParams(json=PERSON)
    same._backend = "outlines"
    assert select_backend(same, "outlines", get) == ("outlines", False)


# ---- shared helpers --------------------------------------------------------------------------


def test_bitmask_helpers():
    assert bitmask_words(70) == 3 and bitmask_words(64) == 2 and bitmask_words(1) == 1
    bitmask = np.full((2, 3), -1, dtype=np.int32)
    allow_only_tokens(bitmask, 1, [0, 31, 63, 69])
    assert [t for t in range(96) if token_allowed(bitmask, 1, t)] == [0, 31, 63, 69]
    assert (bitmask[0] == -1).all()
    disallow_tokens_from(bitmask, 0, 40)
    assert [t for t in range(96) if token_allowed(bitmask, 0, t)] == list(range(40))


def test_choice_as_grammar_escapes():
    grammar = choice_as_grammar(["a", 'q"b\\', "x\ny\t\x01"])
    assert grammar == 'root ::= "a" | "q\\"b\\\\" | "x\\ny\\t\\x01"'
    assert choice_as_regex(["a.b", "(c)|d", "\x01"]) == r"(a\.b|\(c\)\|d|\x{1})"


def test_grammar_is_likely_lark():
    assert grammar_is_likely_lark('start: "a"\n')
    assert not grammar_is_likely_lark('root ::= "a"')
    assert not grammar_is_likely_lark('# a comment with start: \nroot ::= "a" # x: y')
    assert grammar_is_likely_lark('// root ::= "a"\nstart: "b"')
    assert not grammar_is_likely_lark("")


def test_closed_objects_adds_additional_properties_false():
    schema = {
        "type": "object",
        "properties": {"inner": {"type": "object", "properties": {"x": {}}}},
        "$defs": {"open": {"properties": {}, "additionalProperties": True}},
        "anyOf": [{"properties": {"y": {}}}],
    }
    closed = closed_objects(schema)
    assert closed["additionalProperties"] is False
    assert closed["properties"]["inner"]["additionalProperties"] is False
    assert closed["$defs"]["open"]["additionalProperties"] is True
    assert closed["anyOf"][0]["additionalProperties"] is False
    assert "additionalProperties" not in schema  # a copy


def test_importing_the_backends_does_not_import_torch():
    code = (
        "import sys\n"
        "import ember.enginecore.structured_output.xgrammar_backend\n"
        "import ember.enginecore.structured_output.guidance_backend\n"
        "import ember.enginecore.structured_output.outlines_backend\n"
        "import ember.enginecore.structured_output.backend_selection\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.parametrize("name", BACKEND_NAMES)
def test_model_vocab_smaller_than_the_tokenizers(name, smollm2):
    """A model whose embedding table stops before the tokenizer's last ids: those ids are
    never allowed (the bitmask row is sized for the model)."""
    tokenizer, vocab_size, eos_ids = smollm2
    backend = _build(name, tokenizer, vocab_size - 40, eos_ids)
    _walk(backend, tokenizer, StructuredOutputsParams(regex="[a-z]+"), "hello", eos_ids, _rng())
