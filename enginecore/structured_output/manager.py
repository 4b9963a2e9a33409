"""The engine core's grammars: backends built on first use, compiles on a thread pool, one
matcher per constrained request, and each step's token bitmask.

    validate (before requests are added) ─▶ choose backend, compile ─▶ cache[backend, spec]
    add_request ─▶ RequestGrammar(future from the cache) ─▶ scheduled once the compile is done
    step: bitmask rows for the constrained requests that sample ─▶ workers mask their logits
    update: every sampled token advances its request's matcher

Nothing here runs on the busy loop for longer than a bitmask fill: compiles, the tokenizer load
and the grammar library's import (xgrammar imports torch) happen on the pool's threads.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

import numpy as np

from ember.enginecore.structured_output.backend_selection import select_backend
from ember.enginecore.structured_output.grammar import (
    GrammarBackend,
    GrammarMatcher,
    bitmask_words,
)
from ember.workers.config import ModelConfig, StructuredOutputsConfig
from ember.workers.structured_outputs_params import StructuredOutputsParams

logger = logging.getLogger(__name__)

# Threads that compile grammars; each compile is single-threaded C++ in the libraries.
_COMPILE_THREADS = 2
# Compiled grammars kept (distinct specs); the oldest are dropped past this.
_MAX_CACHED_GRAMMARS = 1024


class RequestGrammar:
    """One request's grammar: its compile (shared through the cache), then its own matcher."""

    def __init__(self, new_matcher: Callable[[object], GrammarMatcher], compiled: Future):
        self.new_matcher = new_matcher
        self.compiled = compiled
        self.matcher: GrammarMatcher | None = None

    @property
    def ready(self) -> bool:
        return self.compiled.done()

    def error(self) -> str | None:
        """Why the compile failed (None while it runs or when it succeeded)."""
        if not self.compiled.done() or self.compiled.exception() is None:
            return None
        exc = self.compiled.exception()
        return f"{type(exc).__name__}: {exc}"

    def start(self) -> GrammarMatcher:
        if self.matcher is None:
            self.matcher = self.new_matcher(self.compiled.result())
        return self.matcher

    def accept_token(self, request_id: str, token_id: int) -> None:
        """Advance the matcher by a sampled token (none after the grammar has ended, e.g.
        past an EOS kept by ignore_eos)."""
        matcher = self.start()
        if matcher.is_terminated():
            return
        if not matcher.accept_token(token_id):
            # Only a token the bitmask allowed is sampled, so this is a backend's fault.
            logger.error("grammar of request %r refused token %d", request_id[:64], token_id)


class StructuredOutputManager:
    def __init__(self, model_config: ModelConfig, config: StructuredOutputsConfig):
        self.model_config = model_config
        self.config = config
        self.vocab_size = model_config.vocab_size
        self.num_words = bitmask_words(model_config.vocab_size)
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._tokenizer = None
        self._backends: dict[str, GrammarBackend] = {}
        self._compiled: dict[tuple[str, str], Future] = {}

    # ---- backends and compiles (thread-safe) -------------------------------------------

    def _tokenizer_for_grammars(self):
        with self._lock:
            if self._tokenizer is None:
                from ember.workers.tokenizer_loader import load_tokenizer

                model = self.model_config
                self._tokenizer = load_tokenizer(
                    model.tokenizer or model.model_dir,
                    tokenizer_mode=model.tokenizer_mode,
                    trust_remote_code=model.trust_remote_code,
                    revision=model.revision,
                )
            return self._tokenizer

    def backend(self, name: str) -> GrammarBackend:
        """The backend called `name`, built on first use (imports its library, reads the
        tokenizer's vocabulary)."""
        tokenizer = self._tokenizer_for_grammars()
        with self._lock:
            backend = self._backends.get(name)
            if backend is None:
                backend = self._backends[name] = _build_backend(
                    name, tokenizer, self.model_config, self.config
                )
            return backend

    def _submit(self, fn: Callable, *args) -> Future:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(_COMPILE_THREADS, thread_name_prefix="grammar")
            return self._pool.submit(fn, *args)

    def _compile(self, backend_name: str, params: StructuredOutputsParams, here: bool = False):
        """The compile of `params` under `backend_name`, cached: started on the pool when new
        (or run on this thread when `here`, as validation does on a pool thread)."""
        key = (backend_name, params.cache_key())
        with self._lock:
            future = self._compiled.get(key)
            if future is not None and not (future.done() and future.exception() is not None):
                return future
            if here:
                future = Future()
                future.set_running_or_notify_cancel()
            self._compiled[key] = future
            while len(self._compiled) > _MAX_CACHED_GRAMMARS:
                self._compiled.pop(next(iter(self._compiled)))
        if not here:
            future = self._submit(lambda: self.backend(backend_name).compile(params))
            with self._lock:
                self._compiled[key] = future
            return future
        try:
            future.set_result(self.backend(backend_name).compile(params))
        except BaseException as exc:  # noqa: BLE001 (kept in the future, as the pool does)
            future.set_exception(exc)
        return future

    def validate(self, specs: list[StructuredOutputsParams]) -> Future:
        """Choose each spec's backend (vLLM's rules, see `backend_selection`) and compile it,
        on the pool. The future's result: per spec, [backend, was_auto] or [None, error]."""
        return self._submit(self._validate_now, specs)

    def _validate_now(self, specs: list[StructuredOutputsParams]) -> list[list]:
        results = []
        for params in specs:
            try:
                name, was_auto = select_backend(params, self.config.backend, self.backend)
                self._compile(name, params, here=True).result()
                results.append([name, was_auto])
            except (ValueError, TypeError, NotImplementedError) as exc:
                results.append([None, str(exc)])
        return results

    def allowed_tokens_after(
        self, params: StructuredOutputsParams, token_seqs: list[list[int]]
    ) -> Future:
        """For beam search (vLLM's grammar-constrained beams): per token sequence, the ids
        the grammar allows after it, or None when it ended the grammar (or broke it, or
        allows nothing). On the pool; the compile is the cached one."""
        return self._submit(self._allowed_tokens_now, params, token_seqs)

    def _allowed_tokens_now(
        self, params: StructuredOutputsParams, token_seqs: list[list[int]]
    ) -> list[list[int] | None]:
        name = params._backend
        if name is None or name == "auto":
            name = "xgrammar" if self.config.backend == "auto" else self.config.backend
        compiled = self._compile(name, params, here=True).result()
        backend = self.backend(name)
        bitmask = np.zeros((1, self.num_words), dtype=np.int32)
        allowed = []
        for tokens in token_seqs:
            matcher = backend.matcher(compiled)
            if not all(matcher.accept_token(int(t)) for t in tokens) or matcher.is_terminated():
                allowed.append(None)
                continue
            bitmask.fill(0)
            matcher.fill_bitmask(bitmask, 0)
            bits = np.unpackbits(bitmask.view(np.uint8), bitorder="little")
            ids = np.flatnonzero(bits[: self.model_config.vocab_size]).tolist()
            allowed.append(ids or None)
        return allowed

    # ---- requests (busy loop) ----------------------------------------------------------

    def request_grammar(self, params: StructuredOutputsParams) -> RequestGrammar:
        """Start (or find) the compile of a request's grammar; it is scheduled once done."""
        name = params._backend
        if name is None or name == "auto":  # not validated by a frontend: choose here
            name = "xgrammar" if self.config.backend == "auto" else self.config.backend
        future = self._compile(name, params)
        return RequestGrammar(lambda compiled: self.backend(name).matcher(compiled), future)

    def fill_bitmask(self, grammars: list[RequestGrammar]) -> np.ndarray:
        """One int32 row of allowed tokens per grammar (all allowed once it terminated)."""
        bitmask = np.full((len(grammars), self.num_words), -1, dtype=np.int32)
        for row, grammar in enumerate(grammars):
            matcher = grammar.start()
            if not matcher.is_terminated():
                matcher.fill_bitmask(bitmask, row)
        return bitmask

    def wait_for_compiles(self, grammars: list[RequestGrammar], timeout_s: float) -> None:
        """Block until one of these compiles is done, or `timeout_s`."""
        pending = [g.compiled for g in grammars if not g.compiled.done()]
        if pending:
            wait(pending, timeout=timeout_s, return_when=FIRST_COMPLETED)

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


def _build_backend(
    name: str, tokenizer, model_config: ModelConfig, config: StructuredOutputsConfig
) -> GrammarBackend:
    vocab_size = model_config.vocab_size
    stop_token_ids = list(model_config.eos_token_ids)
    if name == "xgrammar":
        from ember.enginecore.structured_output.xgrammar_backend import XgrammarBackend

        return XgrammarBackend(
            tokenizer,
            vocab_size,
            stop_token_ids,
            disable_any_whitespace=config.disable_any_whitespace,
        )
    if name == "guidance":
        from ember.enginecore.structured_output.guidance_backend import GuidanceBackend

        return GuidanceBackend(
            tokenizer,
            vocab_size,
            stop_token_ids,
            disable_any_whitespace=config.disable_any_whitespace,
            disable_additional_properties=config.disable_additional_properties,
        )
    if name == "outlines":
        from ember.enginecore.structured_output.outlines_backend import OutlinesBackend

        return OutlinesBackend(tokenizer, vocab_size, stop_token_ids)
    raise ValueError(f"unknown structured outputs backend {name!r}")
