"""`apply_token_bitmask_`: the torch reference against a per-token Python loop and xgrammar's own
CPU kernel, the Triton kernel against the reference (on CPU in Triton's interpreter, which
`tests/conftest.py` turns on), and the argument checks.
"""

from __future__ import annotations

import importlib
import importlib.util
import os

import pytest
import torch

from ember.kernels import apply_token_bitmask_, token_bitmask
from ember.kernels.token_bitmask import apply_token_bitmask_torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (batch, vocab, bitmask words per row, logits row of each bitmask row)
CASES = [
    pytest.param(3, 64, 2, [0, 1, 2], id="vocab-a-multiple-of-32"),
    pytest.param(4, 70, 3, [2, 0, 3, 1], id="vocab-not-a-multiple-of-32-rows-permuted"),
    pytest.param(6, 100, 2, [4, 0, 3], id="vocab-past-the-bitmask-rows-a-subset"),
    pytest.param(5, 70, 5, [1, 4], id="bitmask-past-the-vocab"),
    pytest.param(3, 40, 0, [2], id="empty-bitmask-forbids-every-token"),
    pytest.param(2, 50, 2, [], id="no-rows"),
]


def random_case(
    batch: int, vocab: int, num_words: int, rows: list[int], dtype: torch.dtype, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits with a NaN and both infinities in them, a random bitmask whose first word allows
    token 31 alone (the sign bit), and the rows as an int64 tensor, all on CPU."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, vocab, generator=generator).to(dtype)
    logits[:, :3] = torch.tensor([float("nan"), float("inf"), float("-inf")], dtype=dtype)
    bitmask = torch.randint(
        -(2**31), 2**31, (len(rows), num_words), generator=generator, dtype=torch.int32
    )
    if len(rows) and num_words:
        bitmask[0, 0] = -(2**31)
    return logits, bitmask, torch.tensor(rows, dtype=torch.int64)


def masked_by_loop(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The oracle, token by token: allowed iff the token's word exists and has the token's bit."""
    expected = logits.clone()
    words = bitmask.tolist()
    for bitmask_row, logits_row in enumerate(rows.tolist()):
        for token in range(logits.shape[1]):
            word_index, bit = divmod(token, 32)
            row_words = words[bitmask_row]
            if word_index >= len(row_words) or not (row_words[word_index] >> bit) & 1:
                expected[logits_row, token] = float("-inf")
    return expected


def masked_by_xgrammar(
    logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor
) -> torch.Tensor:
    """xgrammar's CPU kernel. Its `indices` name rows of logits and bitmask alike and it leaves
    tokens past the bitmask unmasked, so the bitmask is scattered to the logits' rows and padded
    with forbidding zero words to cover the vocabulary first."""
    xgrammar = pytest.importorskip("xgrammar")
    batch, vocab = logits.shape
    num_words = -(-vocab // 32)
    covered = min(bitmask.shape[1], num_words)
    full_bitmask = torch.zeros(batch, num_words, dtype=torch.int32)
    full_bitmask[rows, :covered] = bitmask[:, :covered]
    expected = logits.clone()
    if len(rows):
        xgrammar.apply_token_bitmask_inplace(
            expected, full_bitmask, indices=rows.tolist(), backend="cpu"
        )
    return expected


def assert_same_values(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual.cpu(), expected.cpu(), rtol=0, atol=0, equal_nan=True)


@pytest.fixture(scope="module")
def triton_kernel():
    """`apply_token_bitmask_triton`; on CPU interpreted (`tests/conftest.py` sets
    TRITON_INTERPRET before anything imports triton)."""
    if importlib.util.find_spec("triton") is None:
        pytest.fail("triton is not installed (make setup installs it)")
    if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.fail("without a GPU the kernel needs TRITON_INTERPRET=1 (set in tests/conftest.py)")
    module = importlib.import_module("ember.kernels.token_bitmask_triton")
    return module.apply_token_bitmask_triton


@pytest.fixture(params=["dispatch", "torch", "triton"])
def implementation(request):
    """Each way in: the public function (Triton on a GPU, torch on CPU), and each kernel."""
    if request.param == "dispatch":
        return apply_token_bitmask_
    if request.param == "torch":
        return apply_token_bitmask_torch
    return request.getfixturevalue("triton_kernel")


# ---- the torch reference against independent oracles ----------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("batch", "vocab", "num_words", "rows"), CASES)
def test_torch_reference_masks_the_tokens_a_per_token_loop_masks(
    batch, vocab, num_words, rows, dtype
):
    logits, bitmask, row_indices = random_case(batch, vocab, num_words, rows, dtype)
    expected = masked_by_loop(logits, bitmask, row_indices)
    apply_token_bitmask_torch(logits, bitmask, row_indices)
    assert_same_values(logits, expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("batch", "vocab", "num_words", "rows"),
    [*CASES, pytest.param(8, 49155, 1537, [6, 1, 7, 2, 4], id="large-vocab-rows-a-subset")],
)
def test_torch_reference_masks_the_tokens_xgrammar_masks(batch, vocab, num_words, rows, dtype):
    logits, bitmask, row_indices = random_case(batch, vocab, num_words, rows, dtype, seed=1)
    expected = masked_by_xgrammar(logits, bitmask, row_indices)
    apply_token_bitmask_torch(logits, bitmask, row_indices)
    assert_same_values(logits, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_reference_masks_rows_chunk_by_chunk_alike(monkeypatch, dtype):
    """Two rows of 70 logits per pass: chunks of rows 0-1, 2-3 and a last one of row 4."""
    monkeypatch.setattr(token_bitmask, "_CHUNK_LOGITS", 140)
    logits, bitmask, row_indices = random_case(5, 70, 3, [4, 1, 2], dtype, seed=5)
    expected = masked_by_loop(logits, bitmask, row_indices)
    apply_token_bitmask_torch(logits, bitmask, row_indices)
    assert_same_values(logits, expected)


def test_sign_bit_of_a_word_allows_its_token_31():
    logits = torch.zeros(1, 40)
    apply_token_bitmask_torch(
        logits, torch.tensor([[-(2**31), 1 << 3]], dtype=torch.int32), torch.tensor([0])
    )
    allowed = (logits[0] == 0).nonzero().flatten().tolist()
    assert allowed == [31, 35]


# ---- the Triton kernel against the reference -------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("batch", "vocab", "num_words", "rows"), CASES)
def test_triton_kernel_masks_the_tokens_the_torch_reference_masks(
    triton_kernel, batch, vocab, num_words, rows, dtype
):
    logits, bitmask, row_indices = random_case(batch, vocab, num_words, rows, dtype, seed=2)
    expected = logits.clone()
    apply_token_bitmask_torch(expected, bitmask, row_indices)
    logits, bitmask = logits.to(DEVICE), bitmask.to(DEVICE)
    triton_kernel(logits, bitmask, row_indices.to(DEVICE, torch.int32))
    assert_same_values(logits, expected)


def test_triton_kernel_spans_several_token_blocks(triton_kernel):
    logits, bitmask, row_indices = random_case(3, 2500, 79, [2, 0], torch.float32, seed=3)
    expected = masked_by_loop(logits, bitmask, row_indices)
    logits = logits.to(DEVICE)
    triton_kernel(logits, bitmask.to(DEVICE), row_indices.to(DEVICE))
    assert_same_values(logits, expected)


# ---- behaviour through each implementation ---------------------------------------------------


def test_strided_logits_are_masked_in_place(implementation):
    """Logits as a view of a wider (padded-vocabulary) buffer, bitmask a column slice."""
    logits, bitmask, row_indices = random_case(4, 70, 6, [3, 1], torch.float32, seed=4)
    expected = masked_by_loop(logits, bitmask[:, 1:4], row_indices)
    buffer = torch.full((4, 96), 7.0, device=DEVICE)
    buffer[:, :70] = logits
    implementation(buffer[:, :70], bitmask.to(DEVICE)[:, 1:4], row_indices.to(DEVICE))
    assert_same_values(buffer[:, :70], expected)
    assert (buffer[:, 70:] == 7.0).all()


def test_all_ones_bitmask_changes_nothing(implementation):
    logits = torch.randn(4, 100, device=DEVICE)
    original = logits.clone()
    all_ones = torch.full((3, 4), -1, dtype=torch.int32, device=DEVICE)
    implementation(logits, all_ones, torch.tensor([3, 0, 2], device=DEVICE))
    assert_same_values(logits, original)


@pytest.mark.parametrize("token", [0, 31, 32, 63, 98])
def test_one_hot_bitmask_makes_its_token_the_argmax(implementation, token):
    logits = torch.randn(3, 99, device=DEVICE)
    logits[:, token] = -50.0  # far below the rest, so only the mask can make it win
    original = logits.clone()
    word_index, bit = divmod(token, 32)
    one_hot = torch.zeros(1, 4, dtype=torch.int32)
    one_hot[0, word_index] = (1 << bit) - (2**32 if bit == 31 else 0)  # the bit as a signed int32
    implementation(logits, one_hot.to(DEVICE), torch.tensor([1], device=DEVICE))
    assert logits[1].argmax().item() == token
    assert torch.isinf(logits[1]).sum().item() == 98
    assert_same_values(logits[[0, 2]], original[[0, 2]])


# ---- argument checks -------------------------------------------------------------------------


def _arguments(**override):
    arguments = {
        "logits": torch.zeros(4, 64),
        "bitmask": torch.zeros(2, 2, dtype=torch.int32),
        "rows": torch.tensor([0, 3]),
    }
    return {**arguments, **override}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"logits": torch.zeros(64)}, "logits must be a"),
        ({"logits": torch.zeros(4, 64, dtype=torch.float64)}, "logits must be a"),
        ({"logits": torch.zeros(4, 64, dtype=torch.int32)}, "logits must be a"),
        ({"bitmask": torch.zeros(4, dtype=torch.int32)}, "bitmask must be a"),
        ({"bitmask": torch.zeros(2, 2, dtype=torch.int64)}, "bitmask must be a"),
        ({"rows": torch.tensor([[0, 3]])}, "rows must be a 1-D"),
        ({"rows": torch.tensor([0.0, 3.0])}, "rows must be a 1-D"),
        ({"rows": torch.tensor([0, 1, 3])}, "one entry per bitmask row"),
        (
            {"bitmask": torch.zeros(5, 2, dtype=torch.int32), "rows": torch.arange(5)},
            "more than the 4 rows",
        ),
        ({"rows": torch.tensor([0, 3], device="meta")}, "on one device"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(override, message):
    with pytest.raises(ValueError, match=message):
        apply_token_bitmask_(**_arguments(**override))
