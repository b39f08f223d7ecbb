"""The probe MLP of the Hybrid MoE paper, as pure functions over a parameter dict.

    Linear(d, 512) SiLU Dropout(0.1) Linear(512, 128) SiLU Dropout(0.05) Linear(128, 1)

Parameters are a dict {w1 [d,512], b1 [512], w2 [512,128], b2 [128], w3 [128,1], b3 [1]} (JAX
[in, out] layout). Any leading axes are an ensemble: stacking probes (arguments x folds x seeds) is
stacking their dicts, and `jax.vmap(probe_apply)` runs them all as one program. Targets live in
sign-log space: `encode(y) = sign(y) log1p(|y|)`, inverted by `decode`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

PROBE_HIDDEN = (512, 128)
PROBE_DROPOUT = (0.1, 0.05)
PARAM_NAMES = ("w1", "b1", "w2", "b2", "w3", "b3")


def probe_init(key: jax.Array, input_dim: int, hidden: tuple[int, int] = PROBE_HIDDEN, output_dim: int = 1,
               dtype=jnp.float32) -> dict[str, jax.Array]:
    """PyTorch `nn.Linear`'s default init (uniform +-1/sqrt(fan_in) for weights and biases), so a
    probe trained here starts from the same distribution as the reference's."""
    dims = (input_dim, *hidden, output_dim)
    params = {}
    keys = jax.random.split(key, 2 * (len(dims) - 1))
    for i, (fan_in, fan_out) in enumerate(zip(dims[:-1], dims[1:])):
        bound = 1.0 / jnp.sqrt(fan_in)
        params[f"w{i + 1}"] = jax.random.uniform(keys[2 * i], (fan_in, fan_out), dtype, -bound, bound)
        params[f"b{i + 1}"] = jax.random.uniform(keys[2 * i + 1], (fan_out,), dtype, -bound, bound)
    return params


def probe_apply(params: dict[str, jax.Array], x: jax.Array, dropout_key: jax.Array | None = None,
                dropout: tuple[float, float] = PROBE_DROPOUT, precision=jax.lax.Precision.HIGHEST) -> jax.Array:
    """x [..., d] -> [..., output_dim]. Dropout only when `dropout_key` is given (training)."""
    return probe_head(params, jnp.dot(x, params["w1"], precision=precision), dropout_key, dropout, precision)


def probe_head(params: dict[str, jax.Array], first: jax.Array, dropout_key: jax.Array | None = None,
               dropout: tuple[float, float] = PROBE_DROPOUT, precision=jax.lax.Precision.HIGHEST) -> jax.Array:
    """The probe after its first matmul: `first` = x @ w1 (bias not yet added) -> [..., output_dim]. A
    weighted average of inputs commutes with that linear map, so the hybrid layer pools `first`
    (`attention.causal_attention_pool`) instead of [H]-wide inputs."""

    def drop(h, rate, key):
        if key is None or rate == 0.0:
            return h
        keep = jax.random.bernoulli(key, 1.0 - rate, h.shape)
        return jnp.where(keep, h / (1.0 - rate), 0.0)

    k1, k2 = (None, None) if dropout_key is None else jax.random.split(dropout_key)
    h = jax.nn.silu(first + params["b1"])
    h = drop(h, dropout[0], k1)
    h = jax.nn.silu(jnp.dot(h, params["w2"], precision=precision) + params["b2"])
    h = drop(h, dropout[1], k2)
    return jnp.dot(h, params["w3"], precision=precision) + params["b3"]


def encode(y: jax.Array) -> jax.Array:
    """Sign-log target transform: raw values span 1e-1..1e8, this maps them to about [-20, 20]."""
    return jnp.sign(y) * jnp.log1p(jnp.abs(y))


def decode(v: jax.Array) -> jax.Array:
    return jnp.sign(v) * jnp.expm1(jnp.abs(v))
