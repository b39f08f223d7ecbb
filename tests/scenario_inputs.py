"""The pipeline's inputs in miniature, for the tests that run stages on them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hmoe_jax.checkpoint.synthetic import tiny_config, write_hf_checkpoint, write_tokenizer
from hmoe_jax.domains import load_domain, read_records, write_dataset


def write_scenario_checkpoint(root: str | Path, *, n_train: int, n_eval: int = 8,
                              config: dict[str, Any] | None = None, extra_texts: tuple[str, ...] = (),
                              domain: str | None = None, **checkpoint_kwargs) -> Path:
    """`root/data/{train,eval}.json` from the domain's generator (default CRE) and `root/ckpt`, a random
    checkpoint (`write_hf_checkpoint` options) with a tokenizer trained on the training prompts and
    `extra_texts`. Returns `root`."""
    root = Path(root)
    config = config if config is not None else tiny_config()
    write_dataset(load_domain(domain), root / "data", 42, n_train, n_eval)
    prompts = [r["input_prompt"] for r in read_records(root / "data" / "train.json")[0]]
    write_hf_checkpoint(root / "ckpt", config, **checkpoint_kwargs)
    write_tokenizer(root / "ckpt", prompts + list(extra_texts), config)
    return root
