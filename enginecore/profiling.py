"""One profiling session of `LLM.start_profile` ... `stop_profile`, with vLLM's per-session
options: a trace file name prefix, engine steps to skip before tracing, and a step limit.

Driven by `core_process.EngineCoreProc`: `step_done()` after every engine step. Traces: the
engine core's loop (`StepTrace`) and every worker (torch.profiler), one file per process.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ember.enginecore.executor import Executor
    from ember.enginecore.step_trace import StepTrace

_PREFIX_CHARS = "._-"


def check_profile_options(prefix: object, delay_iterations: object, max_iterations: object) -> None:
    """vLLM's checks of `start_profile`'s arguments; errors name the argument."""
    if prefix is not None and (
        not isinstance(prefix, str)
        or not 1 <= len(prefix) <= 128
        or not prefix.isascii()
        or not prefix[0].isalnum()
        or any(not (char.isalnum() or char in _PREFIX_CHARS) for char in prefix[1:])
    ):
        raise ValueError(
            "profile_prefix must be 1-128 ASCII characters, start with a letter or number, and "
            f"contain only letters, numbers, '.', '_', or '-'; got {prefix!r}"
        )
    for name, value in (("delay_iterations", delay_iterations), ("max_iterations", max_iterations)):
        if value is not None and (
            not isinstance(value, int) or isinstance(value, bool) or value < 0
        ):
            raise ValueError(f"{name} must be an integer >= 0 or None, got {value!r}")


class ProfileSession:
    """Skips `delay_iterations` engine steps, then traces for `max_iterations` steps (0: until
    `finish`). `finish` returns the paths of the traces written (none when tracing never
    began)."""

    def __init__(
        self,
        trace: StepTrace,
        executor: Executor,
        profile_dir: str,
        prefix: str | None = None,
        delay_iterations: int | None = None,
        max_iterations: int | None = None,
    ):
        check_profile_options(prefix, delay_iterations, max_iterations)
        os.makedirs(profile_dir, exist_ok=True)
        self.trace = trace
        self.executor = executor
        self.profile_dir = profile_dir
        self.prefix = prefix or ""
        self.delay_iterations = delay_iterations or 0
        self.max_iterations = max_iterations or 0
        self.num_steps = 0  # steps since the session began, then since tracing began
        self.tracing = False
        self.trace_paths: list[str] = []
        if self.delay_iterations == 0:
            self._start()

    def _start(self) -> None:
        name = "ember-enginecore.trace.json"
        if self.prefix:
            name = f"{self.prefix}_{name}"
        self.trace.start(os.path.join(self.profile_dir, name))
        try:
            self.executor.start_profile(self.profile_dir, self.prefix)
        except BaseException:
            self.trace.path = None  # nothing recorded yet: drop the loop's trace too
            raise
        self.tracing = True
        self.num_steps = 0

    def _stop(self) -> None:
        paths = self.executor.stop_profile()
        self.trace_paths = [self.trace.stop(), *paths]
        self.tracing = False

    def step_done(self) -> None:
        self.num_steps += 1
        if self.tracing:
            if self.max_iterations and self.num_steps >= self.max_iterations:
                self._stop()
        elif not self.trace_paths and self.num_steps >= self.delay_iterations:
            self._start()

    def finish(self) -> list[str]:
        if self.tracing:
            self._stop()
        return self.trace_paths
