"""`LLM.encode`, `embed`, `classify` and `score`: vLLM's pooling API, mixed into `LLM`.

Prompts are tokenized and checked here, in the user's process, before anything is sent; each
request carries `PoolingParams` with its task, and the engine core answers with one pooled
tensor per request (a raw frame), which becomes vLLM's output objects.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ember.enginecore.messages import EngineCoreRequest
from ember.inputs import (
    ProcessedPrompt,
    TokenizeOptions,
    check_prompt,
    normalize_prompts,
    one_per_prompt,
    tokenize_options,
    tokenize_prompt,
)
from ember.lora.resolve import lora_requests_per_prompt
from ember.pooling_outputs import (
    ClassificationRequestOutput,
    EmbeddingRequestOutput,
    PoolingOutput,
    PoolingRequestOutput,
    ScoringOutput,
    ScoringRequestOutput,
)
from ember.workers.lora_request import LoRARequest
from ember.workers.pooling_params import POOLING_TASKS, PoolingParams

_OUTPUT_POLL_S = 1.0


class PoolingMixin:
    """The pooling methods of `LLM` (they use its engine, tokenizer and request counter)."""

    # ---- what the model serves --------------------------------------------------------

    @property
    def supported_pooling_tasks(self) -> tuple[str, ...]:
        return tuple(self.engine.ready_info.pooling_tasks)

    def _require_task(self, task: str, method: str) -> None:
        info = self.engine.ready_info
        if info.runner != "pooling":
            raise ValueError(
                f"{method}() needs a pooling model; this one generates text. Load an embedding "
                "or classification model, or convert this one: LLM(model, runner='pooling', "
                "convert='embed') (or convert='classify')"
            )
        if task not in info.pooling_tasks:
            raise ValueError(
                f"{method}(): this model does not serve the pooling task {task!r}; it serves "
                f"{list(info.pooling_tasks)}"
            )

    # ---- public API ---------------------------------------------------------------------

    def encode(
        self,
        prompts: Any,
        pooling_params: PoolingParams | list[PoolingParams] | None = None,
        *,
        truncate_prompt_tokens: int | None = None,
        use_tqdm: bool = True,
        lora_request: Any = None,
        pooling_task: str | None = None,
        tokenization_kwargs: dict[str, Any] | None = None,
    ) -> list[PoolingRequestOutput]:
        """Pool each prompt with `pooling_task` (default: the model's first task, "embed" for
        an embedding model, "classify" for a classifier). Outputs come in input order; for
        "embed" they are `EmbeddingRequestOutput`s, for "classify" `ClassificationRequestOutput`s,
        otherwise `PoolingRequestOutput`s whose `outputs.data` is the tensor.
        `tokenization_kwargs` as for `generate`, truncating on the right as vLLM's pooling
        tokenizer does (`{"truncation": True, "max_length": N}` keeps the first N tokens, the
        special ones the tokenizer adds included)."""
        if pooling_task is None:
            tasks = self.engine.ready_info.pooling_tasks
            pooling_task = tasks[0] if tasks else "embed"
        if pooling_task not in POOLING_TASKS:
            raise ValueError(f"pooling_task must be one of {POOLING_TASKS}, got {pooling_task!r}")
        self._require_task(pooling_task, "encode")
        options = _pooling_options(tokenization_kwargs, self.max_model_len)
        prompt_list = normalize_prompts(prompts)
        params = self._pooling_params(pooling_params, len(prompt_list), pooling_task)
        loras = lora_requests_per_prompt(lora_request, len(prompt_list), self.engine.ready_info)
        items = [
            self._tokenize_for_pooling(prompt, i, p, truncate_prompt_tokens, options)
            for i, (prompt, p) in enumerate(zip(prompt_list, params))
        ]
        outputs = self._run_pooling(items, params, use_tqdm, loras)
        if pooling_task == "embed":
            return [EmbeddingRequestOutput.from_base(o) for o in outputs]
        if pooling_task == "classify":
            return [ClassificationRequestOutput.from_base(o) for o in outputs]
        return outputs

    def embed(
        self,
        prompts: Any,
        *,
        truncate_prompt_tokens: int | None = None,
        use_tqdm: bool = True,
        pooling_params: PoolingParams | list[PoolingParams] | None = None,
        lora_request: Any = None,
        tokenization_kwargs: dict[str, Any] | None = None,
    ) -> list[EmbeddingRequestOutput]:
        """One embedding per prompt (`output.outputs.embedding`)."""
        self._require_task("embed", "embed")
        return self.encode(
            prompts,
            pooling_params,
            truncate_prompt_tokens=truncate_prompt_tokens,
            use_tqdm=use_tqdm,
            lora_request=lora_request,
            pooling_task="embed",
            tokenization_kwargs=tokenization_kwargs,
        )

    def classify(
        self,
        prompts: Any,
        *,
        truncate_prompt_tokens: int | None = None,
        use_tqdm: bool = True,
        pooling_params: PoolingParams | list[PoolingParams] | None = None,
        lora_request: Any = None,
        tokenization_kwargs: dict[str, Any] | None = None,
    ) -> list[ClassificationRequestOutput]:
        """Class probabilities per prompt (`output.outputs.probs`)."""
        self._require_task("classify", "classify")
        return self.encode(
            prompts,
            pooling_params,
            truncate_prompt_tokens=truncate_prompt_tokens,
            use_tqdm=use_tqdm,
            lora_request=lora_request,
            pooling_task="classify",
            tokenization_kwargs=tokenization_kwargs,
        )

    def score(
        self,
        data_1: str | list[str],
        data_2: str | list[str],
        /,
        *,
        truncate_prompt_tokens: int | None = None,
        use_tqdm: bool = True,
        pooling_params: PoolingParams | None = None,
        lora_request: Any = None,
        tokenization_kwargs: dict[str, Any] | None = None,
    ) -> list[ScoringRequestOutput]:
        """Scores of text pairs: 1 -> 1, 1 -> N (the first text against each second one) or
        N -> N (pairwise). A cross-encoder (classification model with one label) reads each
        pair together; an embedding model scores the cosine similarity of the embeddings.
        `lora_request`: one adapter for every pair (a list: one per pair).
        `tokenization_kwargs` as for `encode` (for a cross-encoder: the pair's tokenization)."""
        texts_1 = _as_texts(data_1, "data_1")
        texts_2 = _as_texts(data_2, "data_2")
        if len(texts_1) == 1:
            texts_1 = texts_1 * len(texts_2)
        if len(texts_1) != len(texts_2):
            raise ValueError(
                f"score() pairs data_1 and data_2: give one data_1 text or as many as data_2 "
                f"({len(texts_1)} vs {len(texts_2)})"
            )
        if pooling_params is not None and not isinstance(pooling_params, PoolingParams):
            raise TypeError("pooling_params must be a PoolingParams")
        options = _pooling_options(tokenization_kwargs, self.max_model_len)
        info = self.engine.ready_info
        if info.runner == "pooling" and "score" in info.pooling_tasks:
            if options is not None and options.keep_tokens() is not None:
                truncate_prompt_tokens = options.keep_tokens()
            return self._cross_encoder_score(
                texts_1, texts_2, pooling_params, truncate_prompt_tokens, use_tqdm, lora_request
            )
        self._require_task("embed", "score")
        return self._embedding_score(
            texts_1, texts_2, pooling_params, use_tqdm, lora_request, tokenization_kwargs
        )

    # ---- helpers -------------------------------------------------------------------------

    def _pooling_params(self, params: Any, count: int, task: str) -> list[PoolingParams]:
        params = one_per_prompt(
            PoolingParams() if params is None else params, count, "pooling_params"
        )
        checked = []
        for index, p in enumerate(params):
            if not isinstance(p, PoolingParams):
                raise TypeError(
                    f"pooling_params[{index}] must be a PoolingParams, got {type(p).__name__}"
                )
            p = p.with_task(task)
            size = self.engine.ready_info.pooling_size
            if p.dimensions is not None and p.dimensions > size:
                raise ValueError(
                    f"pooling_params.dimensions={p.dimensions} is larger than the model's "
                    f"embedding size {size}"
                )
            checked.append(p)
        return checked

    def _tokenize_for_pooling(
        self,
        prompt: Any,
        index: int,
        params: PoolingParams,
        truncate: int | None,
        options: TokenizeOptions | None = None,
    ) -> ProcessedPrompt:
        if options is not None:
            keep = options.keep_tokens()
            if isinstance(prompt, str) and keep is not None and options.truncation_side is None:
                # No side given: the tokenizer truncates (on the right), keeping the special
                # tokens it adds, as vLLM's pooling tokenizer does.
                if self.tokenizer is None:
                    raise ValueError("text prompts need a tokenizer (skip_tokenizer_init=True)")
                text = prompt.lower() if options.do_lower_case else prompt
                encoded = self.tokenizer(
                    text,
                    truncation=True,
                    max_length=keep,
                    add_special_tokens=options.add_special_tokens,
                )
                item = ProcessedPrompt(prompt, list(encoded["input_ids"]))
            else:
                side = options.truncation_side or "right"
                item = tokenize_prompt(
                    prompt,
                    self.tokenizer,
                    index,
                    dataclasses.replace(options, truncation_side=side),
                )
            check_prompt(item, index, self.max_model_len, self.vocab_size)
            return item
        truncate = params.truncate_prompt_tokens if truncate is None else truncate
        if truncate == -1:
            truncate = self.max_model_len
        if isinstance(prompt, str) and truncate is not None:
            if self.tokenizer is None:
                raise ValueError("text prompts need a tokenizer (skip_tokenizer_init=True)")
            ids = self.tokenizer(prompt, truncation=True, max_length=truncate)["input_ids"]
            item = ProcessedPrompt(prompt, list(ids))
        else:
            item = tokenize_prompt(prompt, self.tokenizer, index)
            if truncate is not None:
                item.prompt_token_ids = item.prompt_token_ids[-truncate:]
        check_prompt(item, index, self.max_model_len, self.vocab_size)
        return item

    def _run_pooling(
        self,
        items: list[ProcessedPrompt],
        params: list[PoolingParams],
        use_tqdm: bool,
        loras: list[LoRARequest | None] | None = None,
    ) -> list[PoolingRequestOutput[PoolingOutput]]:
        """Send the requests (longest first, so that a step's prompts are of like length and
        an encoder pads little), gather one pooled tensor each; results in input order."""
        import torch  # the user's process loads torch for pooled outputs only

        if not items:
            return []
        order = sorted(range(len(items)), key=lambda i: -len(items[i].prompt_token_ids))
        request_ids = [str(next(self._request_counter)) for _ in items]
        index_of = {request_ids[i]: i for i in range(len(items))}
        now = time.time()
        requests = [
            EngineCoreRequest(
                request_ids[i],
                items[i].prompt_token_ids,
                None,
                now,
                pooling_params=params[i],
                lora_request=None if loras is None else loras[i],
            )
            for i in order
        ]
        results: list[PoolingRequestOutput | None] = [None] * len(items)
        pending = set(request_ids)
        progress = tqdm(
            total=len(items), desc="Processed prompts", dynamic_ncols=True, disable=not use_tqdm
        )
        try:
            self.engine.add_requests(requests)
            while pending:
                outputs = self.engine.get_outputs(timeout_s=_OUTPUT_POLL_S)
                if outputs is None:
                    continue
                for output in outputs.outputs:
                    if output.request_id not in pending:
                        continue
                    pending.discard(output.request_id)
                    tensor = output.pooling_output
                    if tensor is None:
                        raise RuntimeError(
                            f"pooling request {output.request_id} ended without an output "
                            f"({output.finish_reason})"
                        )
                    values = np.frombuffer(tensor.data, dtype=np.dtype(tensor.dtype))
                    data = torch.from_numpy(values.reshape(tensor.shape).copy())
                    i = index_of[output.request_id]
                    results[i] = PoolingRequestOutput(
                        output.request_id,
                        PoolingOutput(data),
                        items[i].prompt_token_ids,
                        output.num_cached_tokens,
                    )
                    progress.update(1)
        except BaseException:
            if self.engine.is_alive():
                self.engine.abort_requests(sorted(pending))
            raise
        finally:
            progress.close()
        return results

    def _cross_encoder_score(self, texts_1, texts_2, params, truncate, use_tqdm, lora_request):
        info = self.engine.ready_info
        if info.num_labels != 1:
            raise ValueError(
                f"score() on a classification model needs one label (a cross-encoder); this "
                f"one has {info.num_labels}: use classify()"
            )
        if self.tokenizer is None:
            raise ValueError("score() needs a tokenizer (skip_tokenizer_init=True was given)")
        params = (params or PoolingParams()).with_task("score")
        loras = lora_requests_per_prompt(lora_request, len(texts_1), info)
        truncate = params.truncate_prompt_tokens if truncate is None else truncate
        if truncate == -1:
            truncate = self.max_model_len
        items, request_params = [], []
        for index, (text_1, text_2) in enumerate(zip(texts_1, texts_2)):
            kwargs = {"truncation": True, "max_length": truncate} if truncate else {}
            encoded = self.tokenizer(text_1, text_2, **kwargs)
            item = ProcessedPrompt(None, list(encoded["input_ids"]))
            check_prompt(item, index, self.max_model_len, self.vocab_size)
            segment_start = None
            token_types = encoded.get("token_type_ids")
            if token_types is not None and 1 in token_types:
                segment_start = list(token_types).index(1)
            items.append(item)
            request_params.append(
                PoolingParams(
                    use_activation=params.use_activation,
                    activation=params.activation,
                    task="score",
                    segment_start=segment_start,
                )
            )
        outputs = self._run_pooling(items, request_params, use_tqdm, loras)
        return [
            ScoringRequestOutput(
                o.request_id,
                ScoringOutput(float(o.outputs.data[0])),
                o.prompt_token_ids,
                o.num_cached_tokens,
            )
            for o in outputs
        ]

    def _embedding_score(
        self, texts_1, texts_2, params, use_tqdm, lora_request=None, tokenization_kwargs=None
    ):
        params = params or PoolingParams()
        if isinstance(lora_request, (list, tuple)):  # one adapter per pair: no sharing
            embeddings = self.embed(
                texts_1 + texts_2,
                pooling_params=params,
                use_tqdm=use_tqdm,
                lora_request=list(lora_request) * 2,
                tokenization_kwargs=tokenization_kwargs,
            )
            pairs = list(zip(embeddings[: len(texts_1)], embeddings[len(texts_1) :]))
        else:
            unique = list(dict.fromkeys(texts_1 + texts_2))
            embeddings = self.embed(
                unique,
                pooling_params=params,
                use_tqdm=use_tqdm,
                lora_request=lora_request,
                tokenization_kwargs=tokenization_kwargs,
            )
            by_text = dict(zip(unique, embeddings))
            pairs = [(by_text[text_1], by_text[text_2]) for text_1, text_2 in zip(texts_1, texts_2)]
        import torch

        results = []
        for first, second in pairs:
            cosine = torch.nn.functional.cosine_similarity(
                first.outputs.data, second.outputs.data, dim=0
            )
            results.append(
                ScoringRequestOutput(
                    f"{first.request_id}_{second.request_id}",
                    ScoringOutput(float(cosine)),
                    first.prompt_token_ids + second.prompt_token_ids,
                    first.num_cached_tokens + second.num_cached_tokens,
                )
            )
        return results


def _pooling_options(
    tokenization_kwargs: dict[str, Any] | None, max_model_len: int
) -> TokenizeOptions | None:
    """`tokenization_kwargs` checked as `generate` checks them (None when not given)."""
    if tokenization_kwargs is None:
        return None
    return tokenize_options(tokenization_kwargs, max_model_len)


def _as_texts(data: Any, name: str) -> list[str]:
    if isinstance(data, str):
        return [data]
    if isinstance(data, (list, tuple)) and data and all(isinstance(t, str) for t in data):
        return list(data)
    raise TypeError(f"{name} must be a str or a non-empty list of str")
