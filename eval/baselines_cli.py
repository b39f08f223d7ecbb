"""`python -m eval baselines`: the same frozen model answering by greedy generation, regex-parsed.

For each prompt style (zero-shot, chain of thought, structured) every eval prompt is wrapped,
generated from with the KV-cache generator, decoded, parsed with the reference's sanity ranges and
scored under both protocols. Prompt formats (--prompt-format): raw, the text as it is (what the
reference and the paper's table used), and chat, the text as a user message in the checkpoint's chat
template (harmony for gpt-oss), stopping at the end of the assistant's turn and scoring only the final
channel. By default both when the checkpoint has a chat template, reported side by side.
Writes OUT/baselines.json, OUT/baselines.md and the generations.

The model is sharded over every device (--mesh-expert, --mesh-tensor; the rest split the batch).
Multi-host: start the same command on every host with --coordinator-address, --num-processes and
--process-id (or their HMOE_* variables, or --distributed); process 0 writes OUT. See README.md.
"""

from __future__ import annotations

import argparse
import sys

from hmoe_jax.evaluation.baselines import PROMPT_FORMATS, PROMPT_STYLES
from hmoe_jax.runtime import arguments, distributed
from hmoe_jax.runtime.files import user_path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m eval baselines", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="example: python -m eval baselines --model openai/gpt-oss-20b "
                                       "--data data/eval.json --out baselines --n 20 --prompt-format raw chat")
    p.add_argument("--model", required=True, help="checkpoint directory with tokenizer.json, or hub id")
    p.add_argument("--data", required=True, type=user_path, help="eval.json")
    p.add_argument("--out", required=True, type=user_path)
    p.add_argument("--styles", nargs="+", default=list(PROMPT_STYLES), choices=list(PROMPT_STYLES))
    p.add_argument("--prompt-format", nargs="+", choices=PROMPT_FORMATS, default=None,
                   help="raw, chat or both (default: both where the checkpoint has a chat template, else raw)")
    p.add_argument("--reasoning-effort", choices=("low", "medium", "high"), default="low",
                   help="chat format: the template's reasoning effort (gpt-oss's harmony template reads it; low "
                        "keeps the analysis channel short enough to reach the final one in --new-tokens)")
    p.add_argument("--n", type=int, default=200, help="first N scenarios (the reference used 200)")
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=None,
                   help="prompts per forward, a multiple of the data devices (default: 8, rounded up to one)")
    p.add_argument("--overwrite", action="store_true")
    arguments.add_domain_argument(p)
    arguments.add_model_options(p)
    arguments.add_mesh_arguments(p)
    arguments.add_distributed_arguments(p)
    args = p.parse_args(argv)
    from tqdm import tqdm

    from hmoe_jax.checkpoint.location import CheckpointError
    from hmoe_jax.evaluation.baselines import run_and_write_baselines
    from hmoe_jax.model.config import ConfigError
    from hmoe_jax.runtime.sharding import make_mesh

    bars = []
    try:
        info = distributed.initialize(args)

        def progress(style, prompts):
            bars.append(tqdm(total=prompts, unit="prompt", desc=style, disable=not info.is_coordinator))
            return bars[-1].update

        def note(message):  # why the default runs raw prompts only
            if info.is_coordinator:
                print(f"note: {message}", file=sys.stderr)

        mesh = make_mesh(data=-1, expert=args.mesh_expert, tensor=args.mesh_tensor)
        run = run_and_write_baselines(
            args.model, args.data, args.out, revision=args.revision, styles=args.styles, formats=args.prompt_format,
            reasoning_effort=args.reasoning_effort, n=args.n, new_tokens=args.new_tokens,
            batch_size=arguments.batch_size_for(args.batch_size, mesh), mesh=mesh,
            options=arguments.options_from_args(args), domain=args.domain, overwrite=args.overwrite,
            progress=progress, note=note)
    except (FileNotFoundError, FileExistsError, CheckpointError, ConfigError, ValueError) as e:
        return arguments.input_error("eval baselines", e)
    finally:
        for bar in bars:
            bar.close()
    if info.is_coordinator:
        print(run.report)
    distributed.sync("eval.baselines.written")
    return 0
