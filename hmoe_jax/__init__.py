"""hmoe-jax: Hybrid MoE (exact deterministic experts in gpt-oss's routing pool) in JAX/Flax NNX."""

import os as _os

# XLA:CPU's default "concurrency-optimized" scheduler keeps independent work alive side by side; for a
# gpt-oss forward that means every layer's decoded MXFP4 experts at once (measured on the 20b, 12
# layers, 32 x 128 tokens: 40 GiB of temporaries instead of 3.9 GiB). The memory-minimising scheduler
# reuses one layer's buffers for the next. XLA reads XLA_FLAGS when its CPU backend starts, so this
# works when hmoe_jax is imported before the first computation; HMOE_XLA_CPU_SCHEDULER=default keeps
# XLA's choice, and a flag already in XLA_FLAGS wins.
_SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler"
if (_os.environ.get("HMOE_XLA_CPU_SCHEDULER", "memory") != "default"
        and _SCHEDULER_FLAG not in _os.environ.get("XLA_FLAGS", "")):
    _os.environ["XLA_FLAGS"] = (_os.environ.get("XLA_FLAGS", "") + f" {_SCHEDULER_FLAG}=false").strip()

from . import heap as _heap
from .config import ConfigError, GptOssConfig, load_config
from .checkpoint import CheckpointError
from .hybrid import HybridConfig, HybridMoE, HybridParam, load_hybrid_config, make_hybrid
from .loading import from_pretrained, load_probe
from .model import CausalLMOutput, GptOssForCausalLM, default_position_ids
from .sharding import LOGICAL_AXIS_RULES, make_mesh, shard_model

# Return the XLA compiler's freed heap to the OS after each long compile (hmoe_jax.heap).
_heap.install()

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
