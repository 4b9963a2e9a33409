"""ember's worker layer: one process per tensor-parallel rank holding the model shard, the paged
KV cache and the sampler. The engine core drives it; it never imports the layers above it."""
