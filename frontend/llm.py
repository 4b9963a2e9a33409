"""`LLM`: vLLM's offline entry point. Tokenizes and checks inputs here, in the user's process,
then runs requests on an engine-core process and turns its tokens into `RequestOutput`s."""

from __future__ import annotations

import itertools
import os
import time
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm
from transformers import AutoTokenizer

from ember.chat_utils import ChatMixin
from ember.core_client import EngineCoreClient
from ember.enginecore.arg_utils import EngineArgs
from ember.enginecore.messages import EngineCoreRequest
from ember.inputs import check_prompt, normalize_prompts, per_prompt_params, tokenize_prompt
from ember.output_processor import OutputProcessor
from ember.outputs import RequestOutput
from ember.pooling_api import PoolingMixin
from ember.workers.sampling_params import SamplingParams

if TYPE_CHECKING:
    from typing_extensions import Self

_OUTPUT_POLL_S = 1.0


class LLM(ChatMixin, PoolingMixin):
    """An LLM with an engine of its own: `LLM(model).generate(prompts, sampling_params)`.

    Arguments have vLLM's names, meanings and defaults; `model=None` loads ember's embedded
    default model (SmolLM2-135M-Instruct). Extra engine options (`max_num_batched_tokens`,
    `block_size`, `kv_cache_memory_bytes`, `num_threads`, `device`, `load_format`, ...) are
    keyword arguments; an unknown one raises TypeError.
    """

    def __init__(
        self,
        model: str | None = None,
        *,
        tokenizer: str | None = None,
        tokenizer_mode: str = "auto",
        skip_tokenizer_init: bool = False,
        trust_remote_code: bool = False,
        tensor_parallel_size: int = 1,
        dtype: str = "auto",
        quantization: str | None = None,
        revision: str | None = None,
        seed: int | None = 0,
        gpu_memory_utilization: float = 0.9,
        swap_space: float = 4,
        enforce_eager: bool = False,
        max_model_len: int | None = None,
        max_num_seqs: int = 256,
        **kwargs: Any,
    ) -> None:
        engine_address = kwargs.pop("engine_address", None)
        engine_token = kwargs.pop("engine_token", None)
        self.profile_dir = kwargs.pop("profile_dir", None)
        unknown = set(kwargs) - EngineArgs.field_names()
        if unknown:
            raise TypeError(f"LLM() got unexpected keyword argument(s): {sorted(unknown)}")
        if engine_address is not None:
            self._attach(
                engine_address,
                engine_token,
                model,
                tokenizer,
                tokenizer_mode,
                skip_tokenizer_init,
                trust_remote_code,
                revision,
            )
            return
        self.engine_args = EngineArgs(
            model=model,
            tokenizer=tokenizer,
            tokenizer_mode=tokenizer_mode,
            skip_tokenizer_init=skip_tokenizer_init,
            trust_remote_code=trust_remote_code,
            tensor_parallel_size=tensor_parallel_size,
            dtype=dtype,
            quantization=quantization,
            revision=revision,
            seed=seed,
            gpu_memory_utilization=gpu_memory_utilization,
            swap_space=swap_space,
            enforce_eager=enforce_eager,
            max_model_len=max_model_len,
            max_num_seqs=max_num_seqs,
            **kwargs,
        )
        self.config = self.engine_args.create_engine_config()
        self.tokenizer = None
        if not skip_tokenizer_init:
            self.tokenizer = AutoTokenizer.from_pretrained(
                self.config.model.tokenizer,
                use_fast=tokenizer_mode != "slow",
                trust_remote_code=trust_remote_code,
                revision=revision,
            )
        self.engine = EngineCoreClient(self.config)
        self.max_model_len = self.engine.ready_info.max_model_len
        self.vocab_size = self.engine.ready_info.vocab_size
        self._request_counter = itertools.count()

    def _attach(
        self,
        address,
        token,
        model,
        tokenizer,
        tokenizer_mode,
        skip_tokenizer_init,
        trust_remote_code,
        revision,
    ) -> None:
        """Use a standalone engine core (`python -m ember.enginecore --listen ADDR`): the
        tokenizer and detokenizer stay in this process, the model runs there."""
        self.engine_args = None
        self.config = None
        self.engine = EngineCoreClient(address=address, token=token)
        info = self.engine.ready_info
        self.max_model_len = info.max_model_len
        self.vocab_size = info.vocab_size
        self.tokenizer = None
        if not skip_tokenizer_init:
            self.tokenizer = AutoTokenizer.from_pretrained(
                tokenizer or info.tokenizer or model,
                use_fast=tokenizer_mode != "slow",
                trust_remote_code=trust_remote_code,
                revision=revision,
            )
        # Request ids must not collide with other clients' ids in the shared engine.
        prefix = self.engine.identity.hex()
        self._request_counter = (f"{prefix}-{i}" for i in itertools.count())

    # ---- lifecycle ---------------------------------------------------------------------

    def shutdown(self) -> None:
        """Stop the engine-core and worker processes and release their resources."""
        self.engine.shutdown()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()

    def get_tokenizer(self) -> Any:
        return self.tokenizer

    def start_profile(self, profile_dir: str | None = None) -> None:
        """Start tracing the engine core's loop and every worker (torch.profiler); the traces,
        one file per process, go to `profile_dir` (or `LLM(profile_dir=...)`)."""
        profile_dir = profile_dir or self.profile_dir
        if profile_dir is None:
            raise ValueError("start_profile needs a profile_dir (here or in LLM(profile_dir=...))")
        self.engine.call_utility("start_profile", os.path.abspath(profile_dir))

    def stop_profile(self) -> list[str]:
        """Stop tracing; return the paths of the trace files written."""
        return self.engine.call_utility("stop_profile", timeout_s=300.0)

    def reset_prefix_cache(self) -> bool:
        """Forget every block in the engine's prefix cache (vLLM's method); False, with
        nothing done, while requests still hold blocks."""
        return bool(self.engine.call_utility("reset_prefix_cache"))

    # ---- generation --------------------------------------------------------------------

    def generate(
        self,
        prompts: Any,
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
        lora_request: Any = None,
    ) -> list[RequestOutput]:
        """Generate completions for `prompts`; the outputs come back in input order."""
        if lora_request is not None:
            raise NotImplementedError("lora_request is not supported yet")
        if self.engine.ready_info.runner == "pooling":
            raise ValueError(
                "generate() needs a generative model; this is a pooling model: "
                "use encode(), embed(), classify() or score()"
            )
        prompt_list = normalize_prompts(prompts)
        params = per_prompt_params(sampling_params, len(prompt_list))
        vocab_size = self.vocab_size
        processed = []
        for index, prompt in enumerate(prompt_list):
            item = tokenize_prompt(prompt, self.tokenizer, index)
            check_prompt(item, index, self.max_model_len, vocab_size)
            processed.append(item)
        if not processed:
            return []
        processor = OutputProcessor(self.tokenizer)
        requests, order = [], {}
        now = time.time()
        for index, (item, request_params) in enumerate(zip(processed, params)):
            request_id = str(next(self._request_counter))
            order[request_id] = index
            processor.add_request(request_id, item.prompt, item.prompt_token_ids, request_params)
            requests.append(
                EngineCoreRequest(
                    request_id, item.prompt_token_ids, request_params, now, item.cache_salt
                )
            )
        results: list[RequestOutput | None] = [None] * len(requests)
        progress = _Progress(len(requests), use_tqdm)
        try:
            self.engine.add_requests(requests)
            while processor.states:
                outputs = self.engine.get_outputs(timeout_s=_OUTPUT_POLL_S)
                if outputs is None:
                    continue
                finished, to_abort = processor.process(outputs.outputs)
                self.engine.abort_requests(to_abort)
                for state in finished:
                    results[order[state.request_id]] = state.to_output()
                    progress.update(state)
        except BaseException:
            # Ctrl-C or a dead engine: nothing of this call may keep running in the engine.
            pending = processor.abort_all()
            if self.engine.is_alive():
                self.engine.abort_requests(pending)
            raise
        finally:
            progress.close()
        return results


class _Progress:
    """vLLM's progress bar: processed prompts, and input / output tokens per second."""

    def __init__(self, total: int, enabled: bool):
        self.bar = tqdm(
            total=total, desc="Processed prompts", dynamic_ncols=True, disable=not enabled
        )
        self.start = time.perf_counter()
        self.input_tokens = 0
        self.output_tokens = 0

    def update(self, state) -> None:
        self.input_tokens += len(state.prompt_token_ids)
        self.output_tokens += len(state.detokenizer.output_token_ids)
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        self.bar.set_postfix_str(
            f"est. speed input: {self.input_tokens / elapsed:.2f} toks/s, "
            f"output: {self.output_tokens / elapsed:.2f} toks/s",
            refresh=False,
        )
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
