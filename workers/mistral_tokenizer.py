"""`tokenizer_mode="mistral"`: the model's own mistral_common tokenizer (`tekken.json` or
`tokenizer.model.v*` in its directory), as vLLM loads it.

transformers' `MistralCommonBackend` wraps mistral_common in the tokenizer interface ember uses
elsewhere (`encode`, `decode`, `__call__`, `convert_ids_to_tokens`, special ids), so the rest of
ember needs to know only three things about it, asked through `is_mistral_tokenizer`:
- chat prompts come from `apply_chat_template(..., tokenize=True)`, which renders with
  mistral_common's request validator and instruct encoder; there is no Jinja template;
- its token strings do not join back into text (byte tokens, `convert_tokens_to_string` is
  unsupported), so incremental detokenization decodes windows of ids instead;
- grammar backends get its vocabulary through `xgrammar_tokenizer_info`.
"""

from __future__ import annotations

from typing import Any

MISTRAL_TOKENIZER_FILES = ("tekken.json", "tokenizer.model.v*")


def load_mistral_tokenizer(name: str, *, revision: str | None = None) -> Any:
    """`MistralCommonBackend.from_pretrained(name)` in mistral_common's "test" validation mode
    (vLLM's: requests are rendered for inference, not checked as training data)."""
    try:
        from mistral_common.protocol.instruct.validator import ValidationMode
        from transformers.tokenization_mistral_common import MistralCommonBackend
    except ImportError as exc:
        raise NotImplementedError(
            "tokenizer_mode='mistral' needs the mistral_common package (pip install mistral_common)"
        ) from exc
    kwargs = {} if revision is None else {"revision": revision}
    try:
        return MistralCommonBackend.from_pretrained(name, mode=ValidationMode.test, **kwargs)
    except ImportError as exc:  # e.g. sentencepiece, for a tokenizer.model.v* file
        raise NotImplementedError(f"tokenizer_mode='mistral': {exc}") from exc
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise ValueError(
            f"tokenizer_mode='mistral': no mistral_common tokenizer in {name!r} "
            f"(looked for {' or '.join(MISTRAL_TOKENIZER_FILES)}): {exc}"
        ) from exc


def is_mistral_tokenizer(tokenizer: Any) -> bool:
    """Whether `tokenizer` is transformers' mistral_common wrapper (checked by class name, so
    that callers need not import transformers)."""
    return any(cls.__name__ == "MistralCommonBackend" for cls in type(tokenizer).__mro__)


def xgrammar_tokenizer_info(tokenizer: Any, vocab_size: int, stop_token_ids: list[int]) -> Any:
    """xgrammar's view of a mistral_common vocabulary, which `TokenizerInfo.from_huggingface`
    does not read: Tekken's tokens are raw bytes, SentencePiece's use byte fallback
    (vLLM builds it the same way)."""
    import xgrammar as xgr
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer

    inner = tokenizer.tokenizer.instruct_tokenizer.tokenizer
    vocab = inner.vocab()
    vocab_type = xgr.VocabType.RAW if isinstance(inner, Tekkenizer) else xgr.VocabType.BYTE_FALLBACK
    return xgr.TokenizerInfo(
        encoded_vocab=vocab,
        vocab_type=vocab_type,
        vocab_size=max(vocab_size, len(vocab)),
        stop_token_ids=stop_token_ids,
        add_prefix_space=True,
    )
