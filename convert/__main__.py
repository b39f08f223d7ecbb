"""`python -m convert SRC DST`: a gpt-oss checkpoint (HF or OpenAI `original/`) or a probe `.pt` -> a
Flax checkpoint that `hmoe_jax.from_pretrained` / `hmoe_jax.load_probe` read.
`python -m convert --to hf SRC DST`: a converted checkpoint -> an HF checkpoint transformers loads.

Exit status: 0 on success, 1 when the input is unusable or DST cannot be written (the message names
the file and key; nothing is left at DST), 2 on a usage error.
"""

import argparse
import signal
import sys

from hmoe_jax.checkpoint import convert
from hmoe_jax.runtime import arguments
from hmoe_jax.runtime.files import user_path


def _parser():
    parser = argparse.ArgumentParser(
        prog="python -m convert",
        description="Convert a gpt-oss checkpoint into a Flax (orbax) checkpoint, or export one back to HF.",
        epilog="example: python -m convert gpt-oss-20b gpt-oss-20b-flax --keep-mxfp4",
    )
    parser.add_argument("src", help="HF checkpoint dir or hub id (openai/gpt-oss-20b), OpenAI original/ dir (or its "
                                    "parent), probe .pt; with --to hf: a converted Flax checkpoint")
    parser.add_argument("--revision", default=None, help="with a hub id as SRC: the branch, tag or commit")
    parser.add_argument("dst", type=user_path, help="output directory (written atomically)")
    parser.add_argument("--to", choices=("flax", "hf"), default="flax", help="output format (default %(default)s)")
    parser.add_argument("--keep-mxfp4", action="store_true",
                        help="keep MXFP4 experts packed; they are decoded inside the jitted forward")
    parser.add_argument("--mxfp4", action="store_true", help="with --to hf: write experts as MXFP4 blocks/scales")
    parser.add_argument("--dtype", choices=sorted(convert.DTYPES),
                        help="dtype of floating-point tensors (default: lossless for the source)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty DST")
    return parser


def _exit_on_sigterm(signum, frame):
    # As an exception, so the half-written temporary output is removed (as for Ctrl-C).
    raise SystemExit(128 + signum)


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.to == "hf" and args.keep_mxfp4:
        parser.error("--keep-mxfp4 applies to --to flax; use --mxfp4 for MXFP4 experts in an HF export")
    if args.to == "flax" and args.mxfp4:
        parser.error("--mxfp4 applies to --to hf; use --keep-mxfp4 to keep experts packed in a Flax checkpoint")
    from hmoe_jax.hybrid.artifacts import convert_any

    try:
        summary = convert_any(args.src, args.dst, to=args.to, revision=args.revision, keep_mxfp4=args.keep_mxfp4,
                              mxfp4=args.mxfp4, dtype=args.dtype, overwrite=args.overwrite, progress=True)
    except (OSError, ValueError) as e:  # CheckpointError, ConfigError and FileExistsError among them
        return arguments.input_error("convert", e)
    print(f"wrote {summary.destination} from {summary.source_layout}: {summary.tensors} tensors, "
          f"{summary.bytes / 1e9:.2f} GB in {summary.seconds:.1f} s ({summary.megabytes_per_second:.0f} MB/s)")
    return 0


if __name__ == "__main__":
    from hmoe_jax.runtime.host import configure_host_memory

    configure_host_memory()  # before JAX starts its backend
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    sys.exit(main())
