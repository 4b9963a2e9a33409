"""`LLM.beam_search`: vLLM's beam search, in the frontend, one engine request per beam and step.

Each step sends every live beam as a prompt with `max_tokens=1` and `logprobs=2 × beam_width`;
the prefix cache keeps a beam's earlier tokens, so a step computes about one block per beam.
Candidates are chosen as vLLM chooses them (not as Hugging Face's `num_beams` search does):

    prompt p (5 tokens), beam_width 2, one step:
      beams  [p a] cum -1.0, [p b] cum -1.5
      each beam's top 2 × 2 next tokens (its logprobs row) become candidates:
        [p a x] -1.2   [p a EOS] -1.4   [p b y] -1.6   [p a z] -1.9   ...
      every EOS candidate is finished, whatever its rank: [p a EOS]
      the others are ranked by score; the best 2 run on: [p a x], [p b y]

score = cum_logprob / len(tokens) ** length_penalty, where tokens are the prompt's and the
generated ones, a final EOS not counted (vLLM's `get_beam_search_score`). The search runs
`max_tokens` steps (no early stop); then the finished and running beams of a prompt are ranked
by score and the best `beam_width` returned, their text decoded from all their tokens.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ember.inputs import ProcessedPrompt, check_prompt, normalize_prompts, tokenize_prompt
from ember.lora.resolve import lora_requests_per_prompt
from ember.outputs import Logprob
from ember.structured_outputs import check_structured_outputs
from ember.workers.sampling_params import SamplingParams
from ember.workers.structured_outputs_params import StructuredOutputsParams

if TYPE_CHECKING:
    from ember.llm import LLM

# vLLM's cap on the allowed tokens a constrained beam gives the sampler.
_MAX_ALLOWED_TOKEN_IDS = 1024
_GRAMMAR_TIMEOUT_S = 600.0


@dataclass(slots=True)
class BeamSearchParams:
    """vLLM's beam-search parameters."""

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True  # how each beam's text is decoded
    structured_outputs: StructuredOutputsParams | None = None  # grammar-constrained beams
    watermarking: bool | None = None

    def __post_init__(self) -> None:
        if self.structured_outputs is not None and not isinstance(
            self.structured_outputs, StructuredOutputsParams
        ):
            raise TypeError(
                "structured_outputs must be a StructuredOutputsParams, got "
                f"{type(self.structured_outputs).__name__}"
            )
        if self.watermarking:
            raise NotImplementedError("BeamSearchParams.watermarking is not supported")
        for name in ("beam_width", "max_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        for name in ("temperature", "length_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"{name} must be a float, got {type(value).__name__}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be non-negative, got {self.temperature}")


@dataclass(slots=True)
class BeamSearchSequence:
    """One beam: the prompt's tokens then the generated ones, and per generated token the
    logprobs of the candidates it was chosen from."""

    tokens: list[int]
    logprobs: list[dict[int, Logprob]]
    lora_request: Any = None
    cum_logprob: float = 0.0
    text: str | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass(slots=True)
class BeamSearchOutput:
    """The best `beam_width` sequences of one prompt, best first."""

    sequences: list[BeamSearchSequence]


@dataclass(slots=True)
class _PromptBeams:
    beams: list[BeamSearchSequence]
    prompt_len: int
    finished: list[BeamSearchSequence] = field(default_factory=list)


def beam_score(beam: BeamSearchSequence, eos_token_id: int | None, length_penalty: float) -> float:
    """vLLM's score of a beam: its cumulative logprob over its length (prompt included, a
    final EOS not) to the power `length_penalty`."""
    length = len(beam.tokens)
    if beam.tokens and beam.tokens[-1] == eos_token_id:
        length -= 1
    return beam.cum_logprob / max(length, 1) ** length_penalty


def run_beam_search(
    llm: LLM,
    prompts: Any,
    params: BeamSearchParams,
    use_tqdm: bool = False,
    concurrency_limit: int | None = None,
    lora_request: Any = None,
) -> list[BeamSearchOutput]:
    """Beam search over `prompts` (strings, token ids or prompt dicts) on `llm`'s engine;
    `lora_request`: one adapter, or one per prompt, that each prompt's beams run with."""
    if not isinstance(params, BeamSearchParams):
        raise TypeError(f"params must be a BeamSearchParams, got {type(params).__name__}")
    if concurrency_limit is not None and (
        not isinstance(concurrency_limit, int) or concurrency_limit < 1
    ):
        raise ValueError(f"concurrency_limit must be a positive int, got {concurrency_limit!r}")
    tokenizer = llm.get_tokenizer()
    eos_token_id = None if tokenizer is None else tokenizer.eos_token_id
    searches = []
    prompt_list = normalize_prompts(prompts)
    loras = lora_requests_per_prompt(lora_request, len(prompt_list), llm.engine.ready_info)
    for index, prompt in enumerate(prompt_list):
        processed = tokenize_prompt(prompt, tokenizer, index)
        check_prompt(processed, index, llm.max_model_len, llm.vocab_size)
        start = BeamSearchSequence(
            tokens=list(processed.prompt_token_ids),
            logprobs=[],
            lora_request=None if loras is None else loras[index],
        )
        searches.append(_PromptBeams([start], len(start.tokens)))
    step_params = SamplingParams(
        logprobs=2 * params.beam_width, max_tokens=1, temperature=params.temperature
    )
    grammar = params.structured_outputs
    if grammar is not None:  # checked and compiled in the engine core before any step
        check_structured_outputs(llm.engine, [SamplingParams(structured_outputs=grammar)])
    batch_size = concurrency_limit or len(searches)
    for batch_start in range(0, len(searches), batch_size):
        batch = searches[batch_start : batch_start + batch_size]
        for _ in range(params.max_tokens):
            live = [s for s in batch if s.beams]
            if not live:
                break
            allowed = None
            if grammar is not None:
                allowed = _grammar_step(llm, grammar, live)
                live = [s for s in live if s.beams]
                if not live:
                    break
            beams = [beam for search in live for beam in search.beams]
            outputs = llm._run_requests(
                [ProcessedPrompt(None, beam.tokens) for beam in beams],
                _beam_step_params(step_params, allowed, len(beams)),
                use_tqdm,
                loras=None if loras is None else [beam.lora_request for beam in beams],
            )
            offset = 0
            for search in live:
                num_beams = len(search.beams)
                _advance(
                    search,
                    outputs[offset : offset + num_beams],
                    params,
                    eos_token_id,
                    llm,
                    None if allowed is None else allowed[offset : offset + num_beams],
                )
                offset += num_beams
    results = []
    for search in searches:
        candidates = search.finished + search.beams
        candidates.sort(
            key=lambda b: beam_score(b, eos_token_id, params.length_penalty), reverse=True
        )
        best = candidates[: params.beam_width]
        for beam in best:
            beam.text = (
                None
                if tokenizer is None
                else tokenizer.decode(beam.tokens, skip_special_tokens=params.skip_special_tokens)
            )
        results.append(BeamSearchOutput(sequences=best))
    return results


def _grammar_step(
    llm: LLM, grammar: StructuredOutputsParams, live: list[_PromptBeams]
) -> list[set[int]]:
    """vLLM's constrained beams: each beam's grammar, replayed over its generated tokens,
    gives the tokens allowed next; a beam whose grammar has ended is finished (unless it has
    generated nothing) and leaves the step. Returns the allowed sets of the beams that stay,
    in order."""
    beams = [beam for search in live for beam in search.beams]
    generated = [beam.tokens[search.prompt_len :] for search in live for beam in search.beams]
    results = llm.engine.call_utility(
        "structured_output_allowed_tokens", grammar, generated, timeout_s=_GRAMMAR_TIMEOUT_S
    )
    allowed, index = [], 0
    for search in live:
        staying = []
        for beam in search.beams:
            ids = results[index]
            if ids is None:
                if len(beam.tokens) > search.prompt_len:
                    search.finished.append(beam)
            else:
                staying.append(beam)
                allowed.append(set(ids))
            index += 1
        search.beams = staying
    assert index == len(beams)
    return allowed


def _beam_step_params(
    step_params: SamplingParams, allowed: list[set[int]] | None, num_beams: int
) -> list[SamplingParams]:
    """Each beam's parameters for one step: with a grammar, its allowed tokens are given to
    the sampler too while they are few (vLLM caps them at 1024; candidates are filtered by
    them either way, as logprobs are taken before masks)."""
    if allowed is None:
        return [step_params] * num_beams
    params = []
    for ids in allowed:
        if len(ids) <= _MAX_ALLOWED_TOKEN_IDS:
            beam_params = step_params.clone()
            beam_params.allowed_token_ids = sorted(ids)
            params.append(beam_params)
        else:
            params.append(step_params)
    return params


def _advance(
    search: _PromptBeams,
    outputs: list,
    params: BeamSearchParams,
    eos_token_id: int | None,
    llm: LLM,
    allowed: list[set[int]] | None = None,
) -> None:
    """One step of one prompt: every beam's top continuations (those its grammar allows, with
    one) become candidates; those ending in EOS are finished, the best `beam_width` of the
    others run on."""
    running = []
    for index, (beam, output) in enumerate(zip(search.beams, outputs)):
        step_logprobs = output.outputs[0].logprobs[0]
        beam_allowed = None if allowed is None else allowed[index]
        for token_id, logprob in step_logprobs.items():
            if beam_allowed is not None and token_id not in beam_allowed:
                continue
            extended = BeamSearchSequence(
                tokens=[*beam.tokens, token_id],
                logprobs=[*beam.logprobs, step_logprobs],
                cum_logprob=beam.cum_logprob + logprob.logprob,
                lora_request=beam.lora_request,
            )
            if token_id == eos_token_id and not params.ignore_eos:
                search.finished.append(extended)
            elif len(extended.tokens) >= llm.max_model_len:
                search.finished.append(extended)  # no room for another token
            else:
                running.append(extended)
    running.sort(key=lambda b: beam_score(b, eos_token_id, params.length_penalty), reverse=True)
    search.beams = running[: params.beam_width]
