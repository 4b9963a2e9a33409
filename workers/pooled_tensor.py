"""`PooledTensor`: one pooled output (an embedding, class probabilities, per-token vectors) on
its way from the worker's pooler to the user.

Worker -> engine core: inside `ModelRunnerOutput`, the bytes inline (msgspec on the shared-memory
queue). Engine core -> frontend: the bytes leave the struct and travel as a raw ZeroMQ frame
after the msgpack payload; `frame` says which (see `ember.enginecore.tensor_frames`). No torch
here: the engine core imports this module.
"""

from __future__ import annotations

import msgspec


class PooledTensor(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    dtype: str  # numpy's name, e.g. "float32"
    shape: list[int]
    data: bytes = b""  # the values, C order; empty once moved to a raw frame
    frame: int = -1  # index of the raw frame holding the values (engine core -> frontend)
