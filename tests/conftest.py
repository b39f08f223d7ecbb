"""Test setup shared by every test module.

Eight host CPU devices, so every sharding claim runs on a real multi-device mesh. The flag must be set
before JAX initialises its backend, hence here, at import time of the test session.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import pytest  # noqa: E402

# Parity checks compare float32 against float32: keep XLA's dots at full precision everywhere.
jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture
def scratch_expert_names():
    """Names of deterministic experts a test registers; unregistered afterwards even if the test fails."""
    from hmoe_jax.formulas import registry

    names: list[str] = []
    yield names
    for name in names:
        if name in registry._REGISTRY:
            registry._unregister(name)
