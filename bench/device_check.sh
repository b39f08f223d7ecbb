#!/usr/bin/env bash
# One prepared check of this project on a GPU, in under 10 minutes, on a machine where JAX with CUDA is
# already installed (its JAX version may differ from the one setup.cfg pins: it is kept as it is).
#
#   bash bench/device_check.sh [OUT]   # OUT: the argument, else $OUT, else device_check_out (relative to
#                                      # the working directory)
#
# Steps, each with a time limit (together 8 minutes at most), each writing its log to OUT; a failed step
# does not stop the others:
#   environment   nvidia-smi, Python, JAX and every package version; what had to be installed
#   doctor        `python -m eval doctor`: devices, kernel paths, each kernel compiled at a tiny config's
#                 and gpt-oss-20b's shapes and checked against the XLA path (OUT/doctor/doctor.md)
#   kernel_tests  the compiled-kernel and fallback tests (tests/test_kernels.py, tests/test_kernel_fallback.py)
#   bench_kernels `bench/bench_kernels.py` at gpt-oss-20b shapes: kernels vs XLA, timed (OUT/bench_kernels.md)
#   parity_xla, parity_pallas   a tiny random checkpoint against transformers on both kernel paths
#                 (needs torch and transformers; skipped, saying so, where they are missing)
# OUT/summary.md lists every step with its exit status and time (124 or 137: it ran out of time).
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:-${OUT:-device_check_out}}"
mkdir -p "$OUT" || { echo "device_check: cannot create $OUT" >&2; exit 1; }
OUT="$(cd "$OUT" && pwd)"
PY="${PYTHON:-python3}"
export OUT PY REPO
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"  # the project from this checkout, no reinstall
export TOKENIZERS_PARALLELISM=false
cd "$REPO"

SUMMARY="$OUT/summary.md"
printf '# device_check (%s)\n\n| step | exit | seconds | log |\n|---|---:|---:|---|\n' "$(date -u +%FT%TZ)" > "$SUMMARY"

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to OUT/NAME.log, record the outcome
  local name=$1 limit=$2 start rc
  shift 2
  echo "== $name (limit ${limit}s)"
  start=$(date +%s)
  # Through bash -c, so a step may be one of this script's (exported) functions.
  timeout --kill-after=5 "$limit" bash -c '"$@"' "$name" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then echo "(out of time after ${limit}s)" >> "$OUT/$name.log"; fi
  printf '| %s | %s | %s | %s.log |\n' "$name" "$rc" "$(( $(date +%s) - start ))" "$name" >> "$SUMMARY"
  tail -n 3 "$OUT/$name.log"
}

# The packages the project needs besides JAX, as setup.cfg pins them, one at a time (a pin that conflicts
# with the installed JAX is retried unpinned); JAX itself is held at its installed version.
environment() {
  nvidia-smi || echo "nvidia-smi: not found"
  "$PY" - "$OUT" <<'EOF'
import configparser, importlib, pathlib, subprocess, sys
cfg = configparser.ConfigParser()
cfg.read("setup.cfg")
pins = [l.strip() for l in cfg["options"]["install_requires"].splitlines() if l.strip()]
pins += [l.strip() for l in cfg["options.extras_require"]["dev"].splitlines() if l.strip()]
module = {"orbax-checkpoint": "orbax.checkpoint", "huggingface_hub": "huggingface_hub"}
import jax, jaxlib.version
print("python", sys.version.split()[0], "| jax", jax.__version__, "| jaxlib", jaxlib.version.__version__,
      "| backend", jax.default_backend(), "| devices", jax.devices(), flush=True)
constraint = pathlib.Path(sys.argv[1]) / "constraints.txt"
constraint.write_text(f"jax=={jax.__version__}\njaxlib=={jaxlib.version.__version__}\n")
for pin in pins:
    name = pin.split("==")[0]
    if name in ("jax", "jaxlib"):
        continue
    try:
        importlib.import_module(module.get(name, name.replace("-", "_").lower()))
        continue
    except ImportError:
        pass
    for spec in (pin, name):
        print("installing", spec, "(jax held)", flush=True)
        if subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-c", str(constraint), spec]).returncode == 0:
            break
subprocess.run([sys.executable, "-m", "pip", "freeze"], check=False)
EOF
}
export -f environment
step environment 60 environment

step doctor 120 "$PY" -m eval doctor --out "$OUT/doctor"
step kernel_tests 120 "$PY" -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_kernel_fallback.py \
  -k "compiled or lower or disagrees or per_kernel or auto_picks"
step bench_kernels 120 "$PY" bench/bench_kernels.py --seq 1024 4096 --tokens 1 64 512 4096 --model-seq 2048 \
  --runs 10 --out "$OUT/bench_kernels.md"

parity() {  # a tiny random checkpoint written by transformers, then `eval parity` on one kernel path
  if ! "$PY" -c "import torch, transformers" 2>/dev/null; then
    echo "skipped: torch and transformers are not installed here (pip install '.[torch]' to run it)"
    return 0
  fi
  if [ ! -f "$OUT/tiny_ckpt/config.json" ]; then
    "$PY" - "$OUT/tiny_ckpt" <<'EOF' || return 1
import sys
from hmoe_jax.checkpoint import synthetic
synthetic.write_hf_checkpoint(sys.argv[1], synthetic.tiny_config(num_hidden_layers=4), experts="mxfp4", seed=0)
EOF
  fi
  "$PY" -m eval parity --model "$OUT/tiny_ckpt" --kernels "$1" --n-prompts 2 --out "$OUT/parity_$1"
}
export -f parity
step parity_xla 45 parity xla
step parity_pallas 45 parity pallas

echo
cat "$SUMMARY"
echo "everything is in $OUT"
