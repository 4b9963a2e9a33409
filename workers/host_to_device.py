"""Host data onto the worker's device without making the host wait for the GPU.

Called by `ember.workers.model_runner` for each step's inputs. On CUDA the data goes through
page-locked (pinned) memory and a non-blocking copy, queued on the stream behind the previous
step's kernels; torch's caching host allocator hands the same pinned buffers out again and keeps
each alive until its copy has run. A copy from ordinary (pageable) memory would instead block
until the GPU is idle, a host sync in every step.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def to_device(
    data: np.ndarray | torch.Tensor | Sequence[int] | Sequence[float],
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    """`data` as a `dtype` tensor on `device`; on CUDA the copy is asynchronous to the host."""
    if isinstance(data, np.ndarray):
        tensor = torch.from_numpy(data)
    elif isinstance(data, torch.Tensor):
        tensor = data
    else:
        tensor = torch.tensor(data, dtype=dtype)
    tensor = tensor.to(dtype)
    if device.type != "cuda":
        return tensor.to(device)
    if tensor.device.type == "cpu":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)
