"""The pipeline's inputs in miniature, for the tests that run stages on them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hmoe_jax.checkpoint.synthetic import tiny_config, write_hf_checkpoint, write_tokenizer
from hmoe_jax.data import scenarios


def write_scenario_checkpoint(root: str | Path, *, n_train: int, n_eval: int = 8,
                              config: dict[str, Any] | None = None, extra_texts: tuple[str, ...] = (),
                              **checkpoint_kwargs) -> Path:
    """`root/data/{train,eval}.json` from the data set's generator and `root/ckpt`, a random checkpoint
    (`write_hf_checkpoint` options) with a tokenizer trained on the training prompts and `extra_texts`.
    Returns `root`."""
    root = Path(root)
    config = config if config is not None else tiny_config()
    scenarios.write_dataset(root / "data", n_train=n_train, n_eval=n_eval)
    prompts = [s["input_prompt"] for s in json.loads((root / "data" / "train.json").read_text())]
    write_hf_checkpoint(root / "ckpt", config, **checkpoint_kwargs)
    write_tokenizer(root / "ckpt", prompts + list(extra_texts), config)
    return root
