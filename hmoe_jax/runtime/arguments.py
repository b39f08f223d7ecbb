"""The command-line flags the pipeline's commands share, and the run-time objects they become.

- Model options: `--revision` (of a hub id as `--model`), `--dtype`, `--param-dtype`, `--experts`,
  `--moe-backend`, `--kernels`, `--execution`
  (each defaulting to "auto", which follows the checkpoint and the platform: `RunOptions`), and the
  older `--keep-mxfp4` and `--layerwise`, kept as overrides. `options_from_args` gives the
  `RunOptions`.
- The device mesh: `--mesh-expert`, `--mesh-tensor` (the rest of the devices split the batch).
- Multi-host: `--coordinator-address`, `--num-processes`, `--process-id`, `--local-device-ids`,
  `--distributed`, each falling back to its `HMOE_*` environment variable
  (`distributed.settings_from_args`).
- Input errors: `input_error`, the one exit rule of every command.
"""

from __future__ import annotations

import argparse
import sys

from . import distributed
from .options import AUTO, COMPUTE_DTYPES, EXECUTIONS, EXPERT_STORAGE, KERNEL_PATHS, MOE_BACKENDS, RunOptions

# The exit status of a command refused for its input (a wrong path, a corrupt file, a bad value): 2, as
# argparse's own refusals, so a script tells bad input (2) from a crash (1).
INPUT_ERROR = 2


def input_error(command: str, error: object) -> int:
    """Print `command: error: <what is wrong>` to stderr, as argparse does, and return INPUT_ERROR."""
    print(f"{command}: error: {error}", file=sys.stderr)
    return INPUT_ERROR


def add_model_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "model options", "how the model runs; every default follows the checkpoint and the platform (README, "
                         "'Defaults')")
    group.add_argument("--dtype", choices=(AUTO, *COMPUTE_DTYPES), default=AUTO,
                       help="compute dtype (auto: float32 on a CPU host, the checkpoint's on an accelerator)")
    group.add_argument("--param-dtype", choices=(AUTO, *COMPUTE_DTYPES), default=AUTO,
                       help="how weights are stored (auto: as the checkpoint stores each tensor)")
    group.add_argument("--experts", choices=(AUTO, *EXPERT_STORAGE), default=AUTO,
                       help="MXFP4 experts kept packed and decoded inside the product, or decoded at load "
                            "(auto: packed when the checkpoint has MXFP4 experts)")
    group.add_argument("--keep-mxfp4", action="store_true", help="the same as --experts packed")
    group.add_argument("--moe-backend", choices=(AUTO, *MOE_BACKENDS), default=AUTO,
                       help="how tokens reach their experts (auto: by platform and size)")
    group.add_argument("--kernels", choices=(AUTO, *KERNEL_PATHS), default=AUTO,
                       help="Pallas kernels or XLA (auto: on a GPU each kernel where it compiles, else XLA with a "
                            "warning; XLA elsewhere; pallas: the kernels or an error)")
    group.add_argument("--execution", choices=(AUTO, *EXECUTIONS), default=AUTO,
                       help="one jitted program, or each block a program of its own (auto: layerwise for a "
                            "model of 4 GiB or more on a CPU host)")
    group.add_argument("--layerwise", action="store_true", help="the same as --execution layerwise")
    add_revision_argument(group)


def add_revision_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--revision", default=None,
                        help="with a hub id as --model (openai/gpt-oss-20b): the branch, tag or commit (default main)")


def options_from_args(args: argparse.Namespace) -> RunOptions:
    """The `RunOptions` that `add_model_options`' flags ask for ("auto" where they were left out)."""
    return RunOptions(
        dtype=args.dtype, param_dtype=args.param_dtype,
        experts="packed" if args.keep_mxfp4 else args.experts,
        moe_backend=args.moe_backend, kernels=args.kernels,
        execution="layerwise" if args.layerwise else args.execution,
    )


def add_mesh_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mesh-expert", type=int, default=1, help="devices on the expert axis (default 1)")
    parser.add_argument("--mesh-tensor", type=int, default=1, help="devices on the tensor axis (default 1)")


def add_distributed_arguments(parser: argparse.ArgumentParser) -> None:
    """The multi-host flags, in their own help group."""
    group = parser.add_argument_group(
        "multi-host", "run as one of several processes (one per host); each flag falls back to its HMOE_* "
                      "environment variable; without any, the run is single-process")
    group.add_argument("--coordinator-address", default=None, metavar="HOST:PORT",
                       help=f"address of process 0, reachable by every process (env {distributed.ENV_COORDINATOR})")
    group.add_argument("--num-processes", type=int, default=None, metavar="N",
                       help=f"number of processes in the run (env {distributed.ENV_NUM_PROCESSES})")
    group.add_argument("--process-id", type=int, default=None, metavar="I",
                       help=f"this process's index, 0..N-1 (env {distributed.ENV_PROCESS_ID})")
    group.add_argument("--local-device-ids", default=None, metavar="0,1,...",
                       help=f"the devices this process drives (default: all it sees; env "
                            f"{distributed.ENV_LOCAL_DEVICE_IDS})")
    group.add_argument("--distributed", action="store_true", default=None,
                       help=f"let JAX detect the cluster (TPU pod slice, SLURM, Open MPI, Kubernetes) for what "
                            f"the flags leave out (env {distributed.ENV_AUTO}=1)")


def batch_size_for(requested: int | None, mesh, per_device: int = 8) -> int:
    """`requested`, or `per_device` prompts rounded up to a multiple of the mesh's data devices."""
    data_devices = mesh.shape["data"]
    return requested or data_devices * -(-per_device // data_devices)


DOMAIN_HELP = ("the domain: a built-in name (cre, the default; circuits), an installed entry point "
               "(hmoe_jax.domains), a module (pkg.mod or pkg.mod:ATTR) or a .py file; default: the one "
               "the input records (a recorded .py file is never run unless named here)")


def add_domain_argument(parser: argparse.ArgumentParser) -> None:
    """`--domain`, as every command takes it (resolved by `domains.load_domain` / `resolve_domain`)."""
    parser.add_argument("--domain", default=None, metavar="DOMAIN", help=DOMAIN_HELP)
