"""`python -m eval doctor`: what this machine runs, and whether the GPU kernels work on it.

Reports the JAX version, backend and devices with their memory; which path each Pallas kernel takes
under the options given (default "auto": on a GPU each kernel where it compiles, the XLA path with a
warning where it does not); for each kernel, at a tiny config's shapes and gpt-oss-20b's (and --model's),
whether it compiles for this device and agrees with the XLA path; and whether --model fits one device.
Exits 1 when a kernel that compiles disagrees with the XLA path, or when --kernels pallas is asked for and
a kernel does not compile; 0 otherwise. On a CPU nothing compiles (Pallas compiles for GPUs): --interpret
checks the kernels' arithmetic in interpret mode at the tiny shapes instead.
"""

from __future__ import annotations

import argparse

from hmoe_jax.runtime import arguments
from hmoe_jax.runtime.files import user_path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m eval doctor", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="example: python -m eval doctor --model openai/gpt-oss-20b --out doctor_out")
    p.add_argument("--model", help="a checkpoint (path or hub id) whose shapes and size to check")
    p.add_argument("--interpret", action="store_true",
                   help="where a kernel does not compile, check its arithmetic in interpret mode (tiny shapes)")
    p.add_argument("--shapes", nargs="+", choices=("tiny", "gpt-oss-20b"), default=["tiny", "gpt-oss-20b"],
                   help="which configs' shapes to check the kernels at (default: both)")
    p.add_argument("--out", type=user_path, help="also write doctor.json and doctor.md here")
    arguments.add_model_options(p)
    args = p.parse_args(argv)
    from tqdm import tqdm

    from hmoe_jax.checkpoint.location import CheckpointError
    from hmoe_jax.evaluation import doctor
    from hmoe_jax.model.config import ConfigError

    bar = tqdm(desc="doctor", unit="check", leave=False)
    try:
        report = doctor.run_doctor(args.model, arguments.options_from_args(args), interpret=args.interpret,
                                   revision=args.revision, shape_sets=tuple(args.shapes),
                                   progress=lambda what: (bar.set_postfix_str(what), bar.update()))
    except (FileNotFoundError, CheckpointError, ConfigError, ValueError) as e:
        return arguments.input_error("eval doctor", e)
    finally:
        bar.close()
    if args.out:
        doctor.write_report(report, args.out)
    print(doctor.report_markdown(report))
    return 0 if report.ok else 1
