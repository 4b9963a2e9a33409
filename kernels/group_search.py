"""Recovering the 4- and 8-bit groups of a dense weight in C (`csrc/find_groups.c`): the same
float32 arithmetic as the torch reference in `ember.workers.layers.packed_int4`, in one pass
instead of a dozen, for the first start's conversion of a GGUF file (SmolLM2: about 7 s in
torch on 2 cores).

Where the library cannot be built (`available()` False) the caller's torch reference serves.
"""

from __future__ import annotations

import ctypes

import torch

from ember.kernels.cpu_library import isa_cached, load_c_library

GROUP = 32
FORMS = {"q4_1": 0, "q4_0": 1, "q8_0": 2}


@isa_cached
def _library() -> ctypes.CDLL | None:
    # No fused multiply-adds: every product rounds as torch's reference rounds it.
    library = load_c_library("find_groups.c", ("-fopenmp", "-ffp-contract=off"))
    if library is None:
        library = load_c_library("find_groups.c", ("-ffp-contract=off",))
    if library is None:
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    library.ember_find_groups.argtypes = [ptr, i64, i64, ctypes.c_int, ptr, ptr, ptr]
    library.ember_find_groups.restype = ctypes.c_int
    library.ember_rebuild_fits.argtypes = [ptr, ptr, i64, i64, ptr, ptr, ptr]
    library.ember_rebuild_fits.restype = ctypes.c_int
    return library


def available() -> bool:
    return _library() is not None


def find_groups(
    weight: torch.Tensor, form: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(q [N, K] int8, step [N, K / 32], base [N, K / 32]) float32 of `weight` [N, K] in
    `form` (one of `FORMS`: the reference's `find_int4_groups` forms and `find_int8_groups`);
    None when some value does not fit. Needs `available()`."""
    library = _library()
    weight = weight.detach().float().contiguous()
    rows, cols = weight.shape
    if cols % GROUP:
        return None
    q = torch.empty(rows, cols, dtype=torch.int8)
    step = torch.empty(rows, cols // GROUP)
    base = torch.empty(rows, cols // GROUP)
    status = library.ember_find_groups(
        weight.data_ptr(), rows, cols, FORMS[form], q.data_ptr(), step.data_ptr(), base.data_ptr()
    )
    return (q, step, base) if status == 0 else None


def rebuild_fits(
    weight: torch.Tensor,
    q: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor | None,
    wide_scale: torch.Tensor,
) -> bool:
    """Whether q * scale + offset (float32 operands) lands on `weight` within the groups'
    tolerance (the reference's `_narrowed` check). Needs `available()`."""
    library = _library()
    weight = weight.detach().float().contiguous()
    q = q.to(torch.int8).contiguous()
    scale, wide_scale = scale.float().contiguous(), wide_scale.float().contiguous()
    offset = None if offset is None else offset.float().contiguous()
    status = library.ember_rebuild_fits(
        weight.data_ptr(),
        q.data_ptr(),
        weight.shape[0],
        weight.shape[1],
        scale.data_ptr(),
        None if offset is None else offset.data_ptr(),
        wide_scale.data_ptr(),
    )
    return status == 0
