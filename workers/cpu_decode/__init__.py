"""The fused CPU decode step of Llama-shaped models (`llama_runner.LlamaCPUDecodeRunner`), a
decode runner that `ModelRunner` selects by a capability check, beside CUDA graphs; its one-call
C step (`decode_step.py`, `decode_step.c`) strings together the ops of `ember.kernels`."""
