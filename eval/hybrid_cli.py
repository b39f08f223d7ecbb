"""`python -m eval hybrid`: score the integrated hybrid forward on an eval set.

Writes RESULTS/summary.json, RESULTS/report.md and PNG plots; refuses an existing RESULTS directory
unless --overwrite.

The model is sharded over every device (--mesh-expert, --mesh-tensor; the rest split the batch).
Multi-host: start the same command on every host with --coordinator-address, --num-processes and
--process-id (or their HMOE_* variables, or --distributed); process 0 writes RESULTS. See README.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from tqdm import tqdm

from hmoe_jax import distributed, evaluation
from hmoe_jax.checkpoint import CheckpointError
from hmoe_jax.config import ConfigError
from hmoe_jax.data import write_json_atomically
from hmoe_jax.loading import add_memory_arguments, memory_options

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "final_results.json"


def run(model, probes, data, out: Path, *, train=None, overwrite=False, batch_size=8, hybrid_params=None,
        mesh=None, keep_mxfp4=None, param_dtype=None, layerwise=False) -> dict:
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} exists and is not empty; pass --overwrite to replace it")
    from hmoe_jax.data import load_scenarios

    n = len(load_scenarios(data))
    with tqdm(total=n, unit="prompt", desc="hybrid forward", disable=not distributed.is_coordinator()) as bar:
        summary = evaluation.evaluate_hybrid(model, probes, data, train_path=train, batch_size=batch_size,
                                             progress=bar.update, hybrid_params=hybrid_params, mesh=mesh,
                                             keep_mxfp4=keep_mxfp4, param_dtype=param_dtype, layerwise=layerwise)
    if not distributed.is_coordinator():
        return summary  # every process computed the same summary; process 0 writes it
    # Everything is computed: only now replace the old results, via a sibling directory and a rename.
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    reference = json.loads(REFERENCE.read_text()) if REFERENCE.is_file() else None
    (tmp / "report.md").write_text(evaluation.report_markdown(summary, reference))
    evaluation.plot_errors(summary, tmp)
    write_json_atomically(tmp / "summary.json", {k: v for k, v in summary.items() if not k.startswith("_")})
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m eval hybrid", description=__doc__)
    p.add_argument("--model", required=True, help="checkpoint directory (HF or converted), with tokenizer.json")
    p.add_argument("--probes", required=True, help="a run directory of `python -m train probes`")
    p.add_argument("--data", required=True, help="eval.json")
    p.add_argument("--train", help="train.json for the constant-predictor baseline (default: regenerated, seed 42)")
    p.add_argument("--out", required=True)
    p.add_argument("--batch-size", type=int, default=None,
                   help="prompts per forward, a multiple of the data devices (default: 8, rounded up to one)")
    p.add_argument("--mesh-expert", type=int, default=1, help="devices on the expert axis (default 1)")
    p.add_argument("--mesh-tensor", type=int, default=1, help="devices on the tensor axis (default 1)")
    p.add_argument("--hybrid-params", help="a run directory of `python -m train hybrid`: its trained router rows and "
                                           "projections replace the initial ones")
    add_memory_arguments(p)
    p.add_argument("--overwrite", action="store_true")
    distributed.add_arguments(p)
    args = p.parse_args(argv)
    try:
        info = distributed.initialize(args)
        from hmoe_jax import make_mesh

        mesh = make_mesh(data=-1, expert=args.mesh_expert, tensor=args.mesh_tensor)
        data_devices = mesh.shape["data"]
        batch_size = args.batch_size or data_devices * -(-8 // data_devices)
        run(args.model, args.probes, args.data, Path(args.out), train=args.train, overwrite=args.overwrite,
            batch_size=batch_size, hybrid_params=args.hybrid_params, mesh=mesh, layerwise=args.layerwise,
            **memory_options(args))
        distributed.sync("eval.hybrid.written")
    except (FileNotFoundError, FileExistsError, CheckpointError, ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if info.is_coordinator:
        print((Path(args.out) / "report.md").read_text())
    return 0
