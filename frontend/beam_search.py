"""`LLM.beam_search`: beam search in the frontend, one engine request per beam and step.

Each step sends every live beam as a prompt with `max_tokens=1` and `logprobs=2 × beam_width`;
the prefix cache keeps a beam's earlier tokens, so a step computes about one block per beam.
Candidates are chosen as Hugging Face's `num_beams` search chooses them:

    prompt p, beam_width 2, one step:
      beams  [a] cum -1.0, [b] cum -1.5
      top 2 × 2 continuations over both beams, best first:
        [a, x] -1.2   [a, EOS] -1.4   [b, y] -1.6   [a, z] -1.9
      [a, EOS] ranks 2nd (< beam_width): finished.  running: [a, x], [b, y]

An EOS continuation ranked below beam_width is dropped, and a prompt stops early once its best
running beam can no longer beat its worst finished one. Finished beams are scored by
cum_logprob / generated_len ** length_penalty (EOS not counted); all beams of a prompt share the
prompt, so this orders them as vLLM's score over whole sequences does when lengths are equal.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ember.inputs import ProcessedPrompt, check_prompt, normalize_prompts, tokenize_prompt
from ember.outputs import Logprob
from ember.workers.sampling_params import SamplingParams

if TYPE_CHECKING:
    from ember.llm import LLM


@dataclass(slots=True)
class BeamSearchParams:
    """vLLM's beam-search parameters."""

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
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
    num_prompt_tokens: int
    beams: list[BeamSearchSequence]
    finished: list[BeamSearchSequence] = field(default_factory=list)
    done: bool = False


def _score(beam: BeamSearchSequence, num_prompt_tokens: int, length_penalty: float) -> float:
    generated = len(beam.tokens) - num_prompt_tokens
    if beam.finish_reason == "stop":
        generated -= 1
    return beam.cum_logprob / max(generated, 1) ** length_penalty


def run_beam_search(
    llm: LLM,
    prompts: Any,
    params: BeamSearchParams,
    use_tqdm: bool = False,
    concurrency_limit: int | None = None,
) -> list[BeamSearchOutput]:
    """Beam search over `prompts` (strings, token ids or prompt dicts) on `llm`'s engine."""
    if not isinstance(params, BeamSearchParams):
        raise TypeError(f"params must be a BeamSearchParams, got {type(params).__name__}")
    if concurrency_limit is not None and (
        not isinstance(concurrency_limit, int) or concurrency_limit < 1
    ):
        raise ValueError(f"concurrency_limit must be a positive int, got {concurrency_limit!r}")
    tokenizer = llm.get_tokenizer()
    eos_token_id = None if tokenizer is None else tokenizer.eos_token_id
    searches = []
    for index, prompt in enumerate(normalize_prompts(prompts)):
        processed = tokenize_prompt(prompt, tokenizer, index)
        check_prompt(processed, index, llm.max_model_len, llm.vocab_size)
        start = BeamSearchSequence(tokens=list(processed.prompt_token_ids), logprobs=[])
        searches.append(_PromptBeams(len(start.tokens), [start]))
    step_params = SamplingParams(
        logprobs=2 * params.beam_width, max_tokens=1, temperature=params.temperature
    )
    batch_size = concurrency_limit or len(searches)
    for batch_start in range(0, len(searches), batch_size):
        batch = searches[batch_start : batch_start + batch_size]
        for _ in range(params.max_tokens):
            live = [s for s in batch if not s.done and s.beams]
            if not live:
                break
            beams = [beam for search in live for beam in search.beams]
            outputs = llm._run_requests(
                [ProcessedPrompt(None, beam.tokens) for beam in beams],
                [step_params] * len(beams),
                use_tqdm,
            )
            offset = 0
            for search in live:
                num_beams = len(search.beams)
                _advance(search, outputs[offset : offset + num_beams], params, eos_token_id, llm)
                offset += num_beams
    results = []
    for search in searches:
        for beam in search.beams:
            beam.finish_reason = beam.finish_reason or "length"
        candidates = search.finished + search.beams
        candidates.sort(
            key=lambda b: _score(b, search.num_prompt_tokens, params.length_penalty), reverse=True
        )
        best = candidates[: params.beam_width]
        for beam in best:
            beam.text = None if tokenizer is None else tokenizer.decode(beam.tokens)
        results.append(BeamSearchOutput(sequences=best))
    return results


def _advance(
    search: _PromptBeams,
    outputs: list,
    params: BeamSearchParams,
    eos_token_id: int | None,
    llm: LLM,
) -> None:
    """One step of one prompt: pick the next beams from the top continuations."""
    beam_width = params.beam_width
    candidates = []
    for beam, output in zip(search.beams, outputs):
        step_logprobs = output.outputs[0].logprobs[0]
        for token_id, logprob in step_logprobs.items():
            candidates.append((beam.cum_logprob + logprob.logprob, beam, token_id, step_logprobs))
    candidates.sort(key=lambda c: c[0], reverse=True)
    next_beams = []
    for rank, (cum_logprob, beam, token_id, step_logprobs) in enumerate(
        candidates[: 2 * beam_width]
    ):
        extended = BeamSearchSequence(
            tokens=[*beam.tokens, token_id],
            logprobs=[*beam.logprobs, step_logprobs],
            cum_logprob=cum_logprob,
        )
        if token_id == eos_token_id and not params.ignore_eos:
            if rank < beam_width:
                extended.finish_reason, extended.stop_reason = "stop", None
                search.finished.append(extended)
            continue
        if len(extended.tokens) >= llm.max_model_len:
            extended.finish_reason = "length"
            search.finished.append(extended)
            continue
        next_beams.append(extended)
        if len(next_beams) == beam_width:
            break
    search.beams = next_beams
    if len(search.finished) >= beam_width and next_beams:
        worst_finished = sorted(
            _score(b, search.num_prompt_tokens, params.length_penalty) for b in search.finished
        )[-beam_width]
        generated = len(next_beams[0].tokens) - search.num_prompt_tokens
        best_running = next_beams[0].cum_logprob / generated**params.length_penalty
        search.done = best_running <= worst_finished
