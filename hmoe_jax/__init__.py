"""hmoe-jax: Hybrid MoE (exact deterministic experts in gpt-oss's routing pool) in JAX/Flax NNX."""

from .config import ConfigError, GptOssConfig, load_config
from .checkpoint import CheckpointError
from .hybrid import HybridConfig, HybridMoE, HybridParam, load_hybrid_config, make_hybrid
from .loading import from_pretrained, load_probe
from .model import CausalLMOutput, GptOssForCausalLM, default_position_ids
from .sharding import LOGICAL_AXIS_RULES, make_mesh, shard_model

__all__ = [
    "CausalLMOutput",
    "CheckpointError",
    "ConfigError",
    "GptOssConfig",
    "GptOssForCausalLM",
    "HybridConfig",
    "HybridMoE",
    "HybridParam",
    "LOGICAL_AXIS_RULES",
    "default_position_ids",
    "from_pretrained",
    "load_probe",
    "load_config",
    "load_hybrid_config",
    "make_hybrid",
    "make_mesh",
    "shard_model",
]
