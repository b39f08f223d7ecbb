"""`python -m eval latency`: one hybrid forward versus N-token greedy generation, JAX and transformers.

Same model, same backend, one prompt at a time (batch 1, as the reference timed), one warm-up run
excluded, medians over prompts (`hmoe_jax.evaluation.latency`). The transformers side runs on the same
HF checkpoint where it fits in memory (skipped with --no-torch). Writes OUT/latency.json,
OUT/latency.md and OUT/latency.png.
"""

from __future__ import annotations

import argparse

from hmoe_jax.runtime import arguments
from hmoe_jax.runtime.files import user_path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m eval latency", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="example: python -m eval latency --model ckpt --n-prompts 3 --new-tokens 32")
    p.add_argument("--model", required=True,
                   help="checkpoint directory with tokenizer.json (HF for the torch side), or hub id")
    p.add_argument("--probes", type=user_path,
                   help="probe run for the hybrid layer (default: untrained extraction, same cost)")
    p.add_argument("--layer", type=int, help="hybrid layer when no --probes (default: middle layer)")
    p.add_argument("--n-prompts", type=int, default=20)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--prompt-format", choices=("raw", "chat"), default="raw",
                   help="raw prompts (as the reference timed) or the checkpoint's chat template")
    p.add_argument("--out", type=user_path, default="latency_out")
    arguments.add_domain_argument(p)
    arguments.add_model_options(p)
    args = p.parse_args(argv)
    from hmoe_jax.checkpoint.location import CheckpointError, resolve_checkpoint
    from hmoe_jax.evaluation import latency
    from hmoe_jax.hybrid.artifacts import ArtifactError
    from hmoe_jax.model.config import ConfigError

    try:
        checkpoint = resolve_checkpoint(args.model, args.revision)
        res = latency.measure_latency(checkpoint, probes=args.probes, layer=args.layer, n_prompts=args.n_prompts,
                                      new_tokens=args.new_tokens, torch_reference=not args.no_torch,
                                      options=arguments.options_from_args(args), prompt_format=args.prompt_format,
                                      domain=args.domain)
    except (FileNotFoundError, ArtifactError, CheckpointError, ConfigError, ValueError) as e:
        return arguments.input_error("eval latency", e)
    latency.write_report(res, args.out)
    print(latency.report_markdown(res))
    return 0
