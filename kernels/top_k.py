"""The indices of each row's k largest values, in no particular order (`csrc/top_k.c`).

Called by the packed LM head (`gguf_packed.refine_top_logits`) at every decode step, where
torch.topk on the logits took as long as a tenth of the step's layers. The reference is
`top_k_indices_torch`; both give the same set wherever the row has no ties at its k-th value.
"""

from __future__ import annotations

import ctypes

import torch

from ember.kernels.cpu_library import isa_cached, load_openmp_library

MAX_K = 64  # the kernel's own limit; a larger k takes torch.topk


@isa_cached
def _library() -> ctypes.CDLL | None:
    library = load_openmp_library("top_k.c")
    if library is None:
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    library.ember_top_k.argtypes = [ptr, i64, i64, i64, ptr]
    library.ember_top_k.restype = ctypes.c_int
    return library


def top_k_indices(x: torch.Tensor, k: int) -> torch.Tensor:
    """The indices [M, k] (int64) of the k largest values of each row of x [M, N]."""
    if (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and x.dim() == 2
        and x.is_contiguous()
        and 0 < k <= min(MAX_K, x.shape[1])
    ):
        library = _library()
        if library is not None:
            out = torch.empty(x.shape[0], k, dtype=torch.int64)
            if library.ember_top_k(x.data_ptr(), x.shape[0], x.shape[1], k, out.data_ptr()) == 0:
                return out
    return top_k_indices_torch(x, k)


def top_k_indices_torch(x: torch.Tensor, k: int) -> torch.Tensor:
    return x.topk(k, dim=-1, sorted=False).indices
