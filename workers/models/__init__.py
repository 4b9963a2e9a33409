"""One module per model architecture; `registry` picks one by `architectures` in config.json."""
