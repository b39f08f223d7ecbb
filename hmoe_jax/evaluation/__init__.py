"""The evaluation stages: the hybrid model scored, generation baselines, latency, parity against
PyTorch, and the whole pipeline as one demo."""
