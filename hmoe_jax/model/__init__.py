"""gpt-oss in Flax NNX: its configuration, layers, MoE dispatch, the transformer and generation."""

from .config import ConfigError, GptOssConfig, load_config
from .generate import generate
from .layers import MoE
from .transformer import CausalLMOutput, DecoderLayer, EmbeddingAndHead, GptOssForCausalLM, default_position_ids, run

__all__ = [
    "CausalLMOutput",
    "ConfigError",
    "DecoderLayer",
    "EmbeddingAndHead",
    "GptOssConfig",
    "GptOssForCausalLM",
    "MoE",
    "default_position_ids",
    "generate",
    "load_config",
    "run",
]
