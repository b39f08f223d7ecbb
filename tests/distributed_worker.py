"""One process of a multi-process test run: `python tests/distributed_worker.py MODULE [CLI args...]`.

Runs `MODULE.main(args)` (e.g. `train.precompute_cli`) with the settings the in-process tests use
(conftest.py: float32 matmuls at full precision), and with `HMOE_TEST_ROWS_PER_CHUNK` as the feature
store's rows per chunk, so a small store has several chunks to deal out to the processes. The
multi-host flags come with the CLI args; the device count with XLA_FLAGS.
"""

import importlib
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from hmoe_jax.data import features  # noqa: E402

features.ROWS_PER_CHUNK = int(os.environ.get("HMOE_TEST_ROWS_PER_CHUNK", features.ROWS_PER_CHUNK))

if __name__ == "__main__":
    sys.exit(importlib.import_module(sys.argv[1]).main(sys.argv[2:]) or 0)
