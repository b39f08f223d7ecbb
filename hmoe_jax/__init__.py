"""hmoe-jax: Hybrid MoE (exact deterministic experts in gpt-oss's routing pool) in JAX/Flax NNX.

Importing the package changes nothing in the process (no environment variable, no JAX setting, no
listener); `hmoe_jax.runtime.host.configure_host_memory()` applies what a full-size model on a CPU host
needs, and the pipeline's commands call it. The layers, each importing only from those before it:

    runtime     RunOptions, meshes and sharding rules, multi-host, host memory, atomic files
    formulas    the deterministic experts: exact formulas and their registry
    domains     a domain's metrics, data generator, records, router negatives; built in: cre, circuits
    kernels     Pallas GPU kernels (sink attention, MXFP4 grouped expert matmul)
    model       gpt-oss in Flax NNX: layers, MoE dispatch, the transformer, generation
    checkpoint  checkpoint layouts, from_pretrained, conversion, tokenizer
    data        scoring, prompts as model inputs, the feature store
    hybrid      the hybrid layer, the probe MLP, trained artifacts, the hybrid model's inference
    training    precompute, probe training, end-to-end hybrid training
    evaluation  hybrid evaluation, generation baselines, latency, parity, the demo
"""

from .checkpoint.loading import from_pretrained
from .checkpoint.location import CheckpointError
from .hybrid.layer import HybridConfig, HybridMoE, HybridParam, load_hybrid_config, make_hybrid
from .model.config import ConfigError, GptOssConfig, load_config
from .model.generate import generate
from .model.transformer import CausalLMOutput, GptOssForCausalLM, default_position_ids
from .runtime.options import RunOptions
from .runtime.sharding import LOGICAL_AXIS_RULES, make_mesh, shard_model

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
    "RunOptions",
    "default_position_ids",
    "from_pretrained",
    "generate",
    "load_config",
    "load_hybrid_config",
    "make_hybrid",
    "make_mesh",
    "shard_model",
]
