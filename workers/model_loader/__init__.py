"""Finding a model's files and loading its weights (safetensors, GGUF, or random)."""
