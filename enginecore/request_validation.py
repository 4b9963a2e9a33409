"""Checks a request that arrived on the engine core's socket before it reaches the scheduler.

The frontend refuses bad input in the user's process; these checks guard the engine against a
client that skipped them (another program, a fuzzer): a request the model cannot run (an empty
prompt, a token id outside the vocabulary, a prompt too long, parameters for the other kind of
model) is answered with "error" instead of taking the engine down. Called by `core_process.EngineCoreProc` on each ADD.
"""

from __future__ import annotations

from ember.enginecore.messages import EngineCoreRequest


def request_problem(
    request: EngineCoreRequest, max_model_len: int, vocab_size: int, runner: str
) -> str | None:
    """Why the engine cannot run `request` on a `runner` ("generate" | "pooling") model, or
    None when it can."""
    prompt = request.prompt_token_ids
    if not request.request_id:
        return "empty request_id"
    if runner == "pooling" and request.pooling_params is None:
        return "a pooling model needs pooling_params"
    if runner != "pooling" and (
        request.sampling_params is None or request.pooling_params is not None
    ):
        return "a generative model needs sampling_params and no pooling_params"
    if not prompt:
        return "empty prompt"
    if len(prompt) >= max_model_len:
        return f"prompt of {len(prompt)} tokens, max_model_len is {max_model_len}"
    if min(prompt) < 0 or max(prompt) >= vocab_size:
        return f"token id outside [0, {vocab_size})"
    return None
