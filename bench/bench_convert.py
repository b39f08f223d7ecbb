"""Conversion and loading at gpt-oss-20b scale: throughput and peak host memory (RSS).

    python bench/bench_convert.py WORK_DIR [--keep-files] [--forward]

Steps, each in a fresh child process so its peak RSS is its own:
1. `make_synthetic_checkpoint.py` writes a random full-size 20b HF checkpoint (MXFP4 experts) to
   WORK_DIR/hf, unless one is there;
2. convert it with dense experts (decoded to bf16, ~42 GB written), then delete the output;
3. convert it with `--keep-mxfp4` (~13 GB written);
4. `from_pretrained(..., dtype="bfloat16", param_dtype="bfloat16")` (bf16 weights and compute) of the
   packed conversion (and with `--forward`, one forward pass of 8 tokens, jitted as one program).
Targets: conversion peak RSS <= 4 GiB, loading the packed 20b <= 16 GiB. Slow (minutes per step)
and disk hungry (~60 GB at the peak): not part of the test suite. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

GIB = 1 << 30


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _child(step: str, src: Path, dst: Path) -> dict:
    """Runs in the child process; returns what it measured."""
    start = time.perf_counter()
    result: dict = {"step": step}
    if step in ("convert_dense", "convert_packed"):
        from hmoe_jax.checkpoint.convert import convert_checkpoint

        summary = convert_checkpoint(src, dst, keep_mxfp4=step == "convert_packed")
        result.update(source_bytes=summary.bytes, tensors=summary.tensors, written_bytes=_du(dst))
    elif step in ("load_packed", "load_packed_forward"):
        import jax
        import numpy as np
        from flax import nnx

        import hmoe_jax

        # bf16 storage and compute, the experts as the conversion stored them (packed), the forward as one
        # jitted program: what this step has always measured, not the loader's CPU defaults (float32
        # compute, "layerwise" execution for a model this size).
        model = hmoe_jax.from_pretrained(src, dtype="bfloat16", param_dtype="bfloat16", experts="packed",
                                         execution="program")
        param_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model)))
        result.update(param_bytes=param_bytes, load_seconds=time.perf_counter() - start)
        if step == "load_packed_forward":
            ids = np.arange(8)[None] + 1000
            t0 = time.perf_counter()
            logits = np.asarray(model(ids).logits, np.float32)
            result.update(forward_seconds=time.perf_counter() - t0, logits_finite=bool(np.isfinite(logits).all()))
    else:
        raise ValueError(step)
    result["seconds"] = time.perf_counter() - start
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return result


def _run(step: str, src: Path, dst: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", step, str(src), str(dst)],
                         check=True, stdout=subprocess.PIPE, text=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    print(json.dumps(result), flush=True)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("work", type=Path, nargs="?", help="directory for the checkpoints (required)")
    parser.add_argument("--keep-files", action="store_true", help="keep the checkpoints written under WORK")
    parser.add_argument("--forward", action="store_true", help="also run one forward pass of the loaded 20b")
    parser.add_argument("--child", nargs=3, metavar=("STEP", "SRC", "DST"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        step, src, dst = args.child
        print(json.dumps(_child(step, Path(src), Path(dst))))
        return 0
    if args.work is None:
        parser.error("WORK_DIR is required")

    hf, dense, packed = args.work / "hf", args.work / "flax_dense", args.work / "flax_packed"
    if not hf.exists():
        t0 = time.perf_counter()
        subprocess.run([sys.executable, str(Path(__file__).with_name("make_synthetic_checkpoint.py")), str(hf)],
                       check=True)
        print(f"synthetic checkpoint: {_du(hf) / 1e9:.2f} GB in {time.perf_counter() - t0:.0f} s")
    rows = []
    for step, dst in (("convert_dense", dense), ("convert_packed", packed)):
        shutil.rmtree(dst, ignore_errors=True)
        r = _run(step, hf, dst)
        rows.append((f"convert, {'--keep-mxfp4' if step == 'convert_packed' else 'dense bf16 experts'}",
                     f"{r['source_bytes'] / 1e9:.2f} GB read, {r['written_bytes'] / 1e9:.2f} GB written",
                     f"{r['seconds']:.0f} s ({r['source_bytes'] / 1e6 / r['seconds']:.0f} MB/s read)",
                     r["peak_rss_bytes"], 4 * GIB))
        if dst == dense and not args.keep_files:
            shutil.rmtree(dense)
    r = _run("load_packed_forward" if args.forward else "load_packed", packed, packed)
    extra = f", forward 8 tokens {r['forward_seconds']:.0f} s" if args.forward else ""
    rows.append(("from_pretrained, packed, bf16", f"{r['param_bytes'] / 1e9:.2f} GB of parameters",
                 f"{r['load_seconds']:.0f} s{extra}", r["peak_rss_bytes"], 16 * GIB))
    if not args.keep_files:
        shutil.rmtree(packed)
        shutil.rmtree(hf)

    print("\n| step | data | time | peak RSS | target |\n|---|---|---|---|---|")
    for name, data, seconds, rss, target in rows:
        print(f"| {name} | {data} | {seconds} | {rss / GIB:.2f} GiB | <= {target / GIB:.0f} GiB "
              f"{'ok' if rss <= target else 'MISSED'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
