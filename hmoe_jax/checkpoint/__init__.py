"""Checkpoint I/O: finding a checkpoint, its layouts as key tables, loading it as a model
(`from_pretrained`), converting it to our Flax format and back, and its tokenizer."""

from .loading import from_pretrained
from .location import CheckpointError, locate_checkpoint

__all__ = ["CheckpointError", "from_pretrained", "locate_checkpoint"]
