"""hmoe-jax: Hybrid MoE (exact deterministic experts in gpt-oss's routing pool) in JAX/Flax NNX."""

from .config import ConfigError, GptOssConfig, load_config
from .checkpoint import CheckpointError
from .loading import from_pretrained
from .model import CausalLMOutput, GptOssForCausalLM, default_position_ids
from .sharding import LOGICAL_AXIS_RULES, make_mesh, shard_model

__all__ = [
    "CausalLMOutput",
    "CheckpointError",
    "ConfigError",
    "GptOssConfig",
    "GptOssForCausalLM",
    "LOGICAL_AXIS_RULES",
    "default_position_ids",
    "from_pretrained",
    "load_config",
    "make_mesh",
    "shard_model",
]
