"""Layers shared by every model: parallel linear layers, embeddings, norms, rotary, attention."""
