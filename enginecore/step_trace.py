"""A Chrome-trace recorder for the engine core's loop (the engine core does not import torch, so
this stands in for torch.profiler there). Open the file in chrome://tracing or Perfetto."""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Iterator


class StepTrace:
    """Records named spans while started; `stop` writes `{"traceEvents": [...]}`."""

    def __init__(self) -> None:
        self.path: str | None = None
        self.events: list[dict] = []

    @property
    def active(self) -> bool:
        return self.path is not None

    def start(self, path: str) -> None:
        self.path, self.events = path, []

    @contextlib.contextmanager
    def span(self, name: str) -> Iterator[None]:
        if self.path is None:
            yield
            return
        start_us = time.perf_counter_ns() / 1000
        try:
            yield
        finally:
            self.events.append(
                {
                    "name": name,
                    "ph": "X",
                    "ts": start_us,
                    "dur": time.perf_counter_ns() / 1000 - start_us,
                    "pid": os.getpid(),
                    "tid": threading.get_ident(),
                    "cat": "enginecore",
                }
            )

    def stop(self) -> str:
        if self.path is None:
            raise RuntimeError("the profiler was not started")
        path, self.path = self.path, None
        with open(path, "w") as f:
            json.dump({"traceEvents": self.events, "displayTimeUnit": "ms"}, f)
        self.events = []
        return path
