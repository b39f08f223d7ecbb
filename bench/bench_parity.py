"""`python -m eval parity` on a full-size gpt-oss-20b: peak host memory (RSS) and time.

    python bench/bench_parity.py WORK_DIR [--n-prompts 2] [--dtype float32]

Uses (or writes, with make_synthetic_checkpoint.py) the random full-size 20b HF checkpoint in
WORK_DIR/hf, then runs the parity command in a child process so its peak RSS is its own. Target:
peak RSS <= 8 GiB (the command holds one decoder layer of each implementation at a time). Slow
(minutes per layer pair on 2 cores): not part of the test suite. Writes WORK_DIR/parity_out and
prints a markdown table.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time
from pathlib import Path

GIB = 1 << 30


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("work_dir", type=Path)
    p.add_argument("--n-prompts", type=int, default=2)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--layers", default=None, help="A:B subset (default all 24)")
    args = p.parse_args()
    hf = args.work_dir / "hf"
    if not (hf / "config.json").is_file():
        subprocess.run([sys.executable, str(Path(__file__).parent / "make_synthetic_checkpoint.py"), str(hf)],
                       check=True)
    cmd = [sys.executable, "-m", "eval", "parity", "--model", str(hf), "--n-prompts", str(args.n_prompts),
           "--dtype", args.dtype, "--out", str(args.work_dir / "parity_out")]
    if args.layers:
        cmd += ["--layers", args.layers]
    start = time.perf_counter()
    code = subprocess.run(cmd).returncode
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # Linux reports KiB
    print("| command | exit | wall time | peak RSS | target |\n|---|---|---|---|---|")
    print(f"| eval parity, 20b, {args.n_prompts} prompts, {args.dtype}, layers {args.layers or '0:24'} | {code} | "
          f"{seconds:.0f} s | {peak / GIB:.2f} GiB | <= 8 GiB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
