"""How a run meets its environment: the run-time options a model holds, device meshes and sharding
rules, multi-host processes, host-memory settings, and files written atomically."""

from .options import RunOptions
from .sharding import LOGICAL_AXIS_RULES, make_mesh, shard_model

__all__ = ["LOGICAL_AXIS_RULES", "RunOptions", "make_mesh", "shard_model"]
