"""Per-request failure on a worker: scrubs what a request whose logits were not finite (NaN or
inf) left in its KV blocks. Called by the `ModelRunner`, which finds those rows.

A masked-out slot still enters attention as `0 * value`, and `0 * NaN` is NaN: a block freed by
a failed request must hold no NaN when the next request gets it.
"""

from __future__ import annotations

import torch


def scrub_nonfinite_blocks(kv_caches: list[torch.Tensor], block_ids: list[list[int]]) -> None:
    """Replace non-finite values with zeros in the given blocks of every layer's cache
    [2, num_blocks, block_size, Hkv, D]; finite values (shared prefix blocks) stay as they are."""
    ids = sorted({block_id for ids in block_ids for block_id in ids})
    if not ids:
        return
    index = torch.tensor(ids, device=kv_caches[0].device if kv_caches else None)
    for cache in kv_caches:
        blocks = cache.index_select(1, index)
        if cache.dtype == torch.float8_e4m3fn:  # no infinities; NaN is 0x7f / 0xff
            codes = blocks.view(torch.uint8)
            codes = codes.masked_fill((codes & 0x7F) == 0x7F, 0)
            cache.view(torch.uint8).index_copy_(1, index, codes)
            continue
        cache.index_copy_(1, index, torch.nan_to_num(blocks, nan=0.0, posinf=0.0, neginf=0.0))
