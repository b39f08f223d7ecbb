"""`python -m convert`: turn gpt-oss checkpoints (and probe state dicts) into Flax checkpoints, and back."""
