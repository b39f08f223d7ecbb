"""The Hybrid MoE method: deterministic experts joined to a frozen gpt-oss's routing pool.

`layer` (the extended router, argument extraction, exact formulas and result projection, as one
`HybridMoE`), `probe` (the paper's probe MLP, pure functions), `attention` (the attention-pooled
extractor: a learned query per argument over the prompt's tokens, then the probe MLP), `artifacts`
(trained probes and hybrid parameters on disk) and `inference` (a checkpoint made hybrid from a probe
run, and its outputs).
"""

from .layer import (
    ExtractionParam,
    HybridConfig,
    HybridMoE,
    HybridParam,
    ProjectionParam,
    RouterRowParam,
    load_hybrid_config,
    make_hybrid,
)

__all__ = [
    "ExtractionParam",
    "HybridConfig",
    "HybridMoE",
    "HybridParam",
    "ProjectionParam",
    "RouterRowParam",
    "load_hybrid_config",
    "make_hybrid",
]
