"""gpt-oss as a Flax NNX model, computing exactly what `transformers`' `GptOssForCausalLM` computes.

The forward reads top-down like `docs/gpt-oss.md`:

    x = embed[ids]
    for each block: x = x + attention(rmsnorm(x)); x = x + moe(rmsnorm(x))
    logits = lm_head(rmsnorm(x))

`DecoderLayer` is the one block: the same code runs the forward, the prefill (an empty KV cache comes
back filled) and each KV-cache decode step (`generate`). `EmbeddingAndHead` is the one embedding and
output head. How the parts execute is the model's `RunOptions.execution`: `run` jits a whole computation
as one program, or ("layerwise") calls it directly while `GptOssForCausalLM.part` compiles the
embedding, each kind of block and the head as programs of their own.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
from flax import nnx, struct

from ..runtime.options import AUTO, RunOptions, matmul_precision
from . import kernel_dispatch
from .config import GptOssConfig
from .layers import Attention, BlockContext, LayerCache, MoE, RMSNorm, attention_masks, param
from .rope import rope_tables


class DecoderLayer(nnx.Module):
    def __init__(self, config: GptOssConfig, layer_idx: int, options: RunOptions, *, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, rngs=rngs)
        self.self_attn = Attention(config, layer_idx, options, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, rngs=rngs)
        # Any module mapping (normed [B,T,H], block_input=, token_mask=) -> ([B,T,H], info dict): the
        # hybrid layer swaps itself in here.
        self.mlp = MoE(config, options, rngs=rngs)

    def __call__(self, x, ctx: BlockContext, cache: LayerCache | None = None):
        """x [B,T,H] -> (new residual, routing info, cache); see `Attention.__call__` for the cache."""
        h, cache = self.attention_residual(x, ctx, cache)
        out, info = self.moe_residual(h, x, ctx)
        return out, info, cache

    def attention_residual(self, x, ctx: BlockContext, cache: LayerCache | None = None):
        """The block's first half: x + attention(rmsnorm(x)), and the cache."""
        attn, cache = self.self_attn(self.input_layernorm(x), ctx, cache)
        return x + attn, cache

    def moe_residual(self, h, block_input, ctx: BlockContext):
        """The block's second half: h + moe(rmsnorm(h)), and the routing info. `block_input` is the
        block's input residual, which a hybrid layer's extraction reads."""
        y, info = self.mlp(self.post_attention_layernorm(h), block_input=block_input, token_mask=ctx.attention_mask)
        return h + y, info


@struct.dataclass
class CausalLMOutput:
    """`logits` [B,T,V] (None when the forward stopped early); `hidden_states` as in transformers:
    entry 0 the embeddings, entry i the output of block i-1, and the last (after all L blocks) after the
    final norm. `layer_info` holds per-layer routing details (router logits, expert indices, and for a
    hybrid layer its extracted arguments and formula results) when requested."""

    logits: jax.Array | None
    hidden_states: tuple[jax.Array, ...] | None = None
    layer_info: tuple[dict[str, Any], ...] | None = None


def default_position_ids(attention_mask: jax.Array) -> jax.Array:
    """Positions that make a left-padded prompt see the positions it has alone (what `generate`
    passes); transformers' plain forward uses `arange(T)` when no `position_ids` are given."""
    return jnp.clip(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0, None)


def embed_tokens(table: jax.Array, input_ids: jax.Array, dtype) -> jax.Array:
    """The embedding rows of `input_ids` in the compute dtype."""
    return jnp.take(table, input_ids, axis=0).astype(dtype)


# Vocabulary entries per lm_head chunk when the head is stored narrower than the compute dtype.
UNEMBED_CHUNK = 16384


def unembed(x: jax.Array, lm_head: jax.Array, dtype, kernels: str = "xla") -> jax.Array:
    """Logits x [..., H] @ lm_head [H, V] in `dtype`. A head stored narrower (bf16 weights, fp32 compute)
    is widened one vocabulary chunk at a time: widening the 20b's whole head at once is a 2.3 GB
    temporary. Each logit is the same dot over H either way. In the native `kernels` modes a few rows
    (decode) go through the CPU kernel, which widens each weight in registers instead."""
    logits = kernel_dispatch.widened_matmul(x, lm_head, 1, mode=kernels) if x.dtype == dtype else None
    if logits is not None:
        return logits
    precision = matmul_precision(dtype)
    vocab = lm_head.shape[1]
    if lm_head.dtype == dtype or vocab <= 2 * UNEMBED_CHUNK:
        return jnp.einsum("...e,ev->...v", x, lm_head.astype(dtype), precision=precision)
    parts = [jnp.einsum("...e,ev->...v", x, lm_head[:, start:start + UNEMBED_CHUNK].astype(dtype), precision=precision)
             for start in range(0, vocab, UNEMBED_CHUNK)]
    return jnp.concatenate(parts, axis=-1)


class EmbeddingAndHead(nnx.Module):
    """What runs before and after the blocks: the token embedding [V, H], and the output head (final
    norm, lm_head [H, V]). `GptOssForCausalLM` is one with blocks added; `shared_with=model` makes one
    holding that model's own variables, which the per-part programs jit apart from the blocks."""

    def __init__(self, config: GptOssConfig, options: RunOptions, *, head: bool = True, rngs: nnx.Rngs | None = None,
                 shared_with: EmbeddingAndHead | None = None):
        self.config = config
        self.options = options
        self.has_head = head
        if shared_with is not None:
            self.embed_tokens = shared_with.embed_tokens
            if head:
                self.norm, self.lm_head = shared_with.norm, shared_with.lm_head
            return
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        c, pd = config, options.storage_dtype
        self.embed_tokens = param(rngs, (c.vocab_size, c.hidden_size), ("vocab", "embed"), pd)
        if head:
            self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, rngs=rngs)
            self.lm_head = param(rngs, (c.hidden_size, c.vocab_size), ("embed", "vocab"), pd)

    def embed(self, input_ids, attention_mask=None, position_ids=None) -> tuple[jax.Array, BlockContext]:
        """The embeddings [B,T,H] in the compute dtype, and what every block reads beside them."""
        c, dtype = self.config, self.options.compute_dtype
        b, t = input_ids.shape
        if attention_mask is None:
            attention_mask = jnp.ones((b, t), jnp.int32)
        if position_ids is None:
            position_ids = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        full, sliding = attention_masks(attention_mask, c.sliding_window)
        cos, sin = rope_tables(position_ids, c, dtype)
        return embed_tokens(self.embed_tokens[...], input_ids, dtype), BlockContext(cos, sin, attention_mask, full,
                                                                                    sliding)

    def final_norm(self, x) -> jax.Array:
        return self.norm(x)

    def logits(self, normed) -> jax.Array:
        return unembed(normed, self.lm_head[...], self.options.compute_dtype, self.options.kernels)


def parameter_bytes(module: nnx.Module) -> int:
    """Bytes of a module's parameters as created (abstract shapes under `nnx.eval_shape` count too)."""
    return sum(int(v.size) * jnp.dtype(v.dtype).itemsize for v in jax.tree.leaves(nnx.state(module, nnx.Param)))


class GptOssForCausalLM(EmbeddingAndHead):
    """gpt-oss. `forward` is the traceable computation; calling the model runs it as its options say
    (one jitted program, or layerwise)."""

    def __init__(self, config: GptOssConfig, options: RunOptions | None = None, *, head: bool = True,
                 rngs: nnx.Rngs | None = None):
        """`options`: the run-time choices (`RunOptions`); each "auto" is resolved here for JAX's default
        backend. `head=False`: no final norm and no lm_head: the first layers of a deeper model, for
        features (`from_pretrained(num_layers=...)`); every hidden state is then a raw residual and
        there are no logits."""
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        options = (options or RunOptions()).resolved()
        super().__init__(config, options, head=head, rngs=rngs)
        self.layers = nnx.List([DecoderLayer(config, i, options, rngs=rngs) for i in range(config.num_hidden_layers)])
        if AUTO in (options.execution, options.kernels):  # the choices that depend on the model's size
            self.set_options(options)

    # ------------------------------------------------------------------ options

    def set_options(self, options: RunOptions | None = None, **changes) -> GptOssForCausalLM:
        """Change the run-time choices (compute dtype, MoE backend, kernel path, execution) of every module,
        in place; "auto" values are resolved. How the parameters are stored cannot change here."""
        new = (options or self.options).replace(**changes).resolved()
        if AUTO in (new.execution, new.kernels):
            new = new.resolved(param_bytes=parameter_bytes(self))
        for field in ("param_dtype", "experts"):
            if getattr(new, field) != getattr(self.options, field):
                raise ValueError(f"RunOptions.{field} is how the parameters are stored ({getattr(self.options, field)})"
                                 f": load the checkpoint again to change it")
        for _, module in nnx.iter_modules(self):
            if isinstance(getattr(module, "options", None), RunOptions):
                module.options = new
        return self

    @contextlib.contextmanager
    def using(self, **changes):
        """Within the block the model runs with these run-time options changed (`set_options`); they
        are restored on leaving it."""
        original = self.options
        self.set_options(**changes)
        try:
            yield self
        finally:
            self.set_options(original)

    # ------------------------------------------------------------------ execution

    @property
    def embedding_and_head(self) -> EmbeddingAndHead:
        """The embedding and head alone (this model's variables): what per-part programs compile."""
        return EmbeddingAndHead(self.config, self.options, head=self.has_head, shared_with=self)

    def runs_per_part(self, *args) -> bool:
        """True when parts run as programs of their own: "layerwise" execution, called outside a trace."""
        return self.options.execution == "layerwise" and not any(
            isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(args))

    def part(self, fn: Callable, module: nnx.Module, *args, static: tuple = ()):
        """`fn(module, *args, *static)`: inline, or its own jitted program when `runs_per_part`. Modules
        of one structure (blocks of one kind) share a program."""
        if self.runs_per_part(*args):
            return _jitted(fn, static, *nnx.split(module), *args)
        return fn(module, *args, *static)

    def residual_stream(self, input_ids, attention_mask=None, position_ids=None,
                        n_layers: int | None = None) -> Iterator[tuple[int, jax.Array, dict | None]]:
        """Yield (i, hidden_states[i], routing info of block i-1) for i = 0..n_layers (every block for
        None): the embeddings (info None), then each block's residual; as in transformers, the state
        after the last of all blocks is final-normed when the model has a head. A caller that keeps only
        the states it needs holds one residual at a time."""
        n_layers = self.layer_count(n_layers)
        embedding_and_head = self.embedding_and_head
        x, ctx = self.part(EmbeddingAndHead.embed, embedding_and_head, input_ids, attention_mask, position_ids)
        yield 0, x, None
        for i, (x, info, _) in enumerate(self.blocks(x, ctx, n_layers), start=1):
            if i == self.config.num_hidden_layers and self.has_head:
                x = self.part(EmbeddingAndHead.final_norm, embedding_and_head, x)
            yield i, x, info

    def blocks(self, x, ctx: BlockContext, n_layers: int | None = None,
               caches: list[LayerCache] | None = None) -> Iterator[tuple[jax.Array, dict, LayerCache | None]]:
        """Yield (residual after block i, its routing info, its cache) for blocks 0..n_layers-1."""
        for i in range(self.layer_count(n_layers)):
            x, info, cache = self.part(DecoderLayer.__call__, self.layers[i], x, ctx,
                                       None if caches is None else caches[i])
            yield x, info, cache

    def layer_count(self, stop_after_layer: int | None) -> int:
        """How many blocks a forward with `stop_after_layer` runs (all for None)."""
        c = self.config
        n_layers = c.num_hidden_layers if stop_after_layer is None else stop_after_layer
        if not 0 <= n_layers <= c.num_hidden_layers:
            raise ValueError(f"stop_after_layer={stop_after_layer} is outside [0, {c.num_hidden_layers}]")
        return n_layers

    # ------------------------------------------------------------------ the forward

    def forward(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        position_ids: jax.Array | None = None,
        output_hidden_states: bool = False,
        output_layer_info: bool = False,
        stop_after_layer: int | None = None,
    ) -> CausalLMOutput:
        """`stop_after_layer=L` runs blocks 0..L-1 only: no later block, no final norm, no lm_head
        (precompute needs only `hidden_states[L]`, which is then the last entry)."""
        n_layers = self.layer_count(stop_after_layer)
        keep_all = output_hidden_states or stop_after_layer is not None
        hidden, infos = [], []
        for _, x, info in self.residual_stream(input_ids, attention_mask, position_ids, n_layers):
            hidden = hidden + [x] if keep_all else [x]
            if info is not None:
                infos.append(info)
        logits = None
        if n_layers == self.config.num_hidden_layers and self.has_head:
            logits = self.part(EmbeddingAndHead.logits, self.embedding_and_head, hidden[-1])
        return CausalLMOutput(logits=logits, hidden_states=tuple(hidden) if keep_all else None,
                              layer_info=tuple(infos) if output_layer_info else None)

    def __call__(self, input_ids, attention_mask=None, position_ids=None, output_hidden_states: bool = False,
                 output_layer_info: bool = False, stop_after_layer: int | None = None) -> CausalLMOutput:
        """`forward`, executed as the options say (`run`)."""
        return run(self, GptOssForCausalLM.forward, input_ids, attention_mask, position_ids,
                   static=(output_hidden_states, output_layer_info, stop_after_layer))


def run(model: GptOssForCausalLM, fn: Callable, *args, static: tuple = ()):
    """`fn(model, *args, *static)` as the model's options say: "program" compiles it as one jitted
    program, keyed on the model's graph (which holds its options) and on `fn` and `static`; "layerwise"
    calls it directly, its embedding, blocks and head each running as a program of their own
    (`GptOssForCausalLM.part`). Arguments become JAX arrays; None stays None."""
    args = tuple(None if a is None else jnp.asarray(a) for a in args)
    if model.options.execution == "layerwise":
        return fn(model, *args, *static)
    return _jitted(fn, static, *nnx.split(model), *args)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _jitted(fn, static, graphdef, state, *args):
    return fn(nnx.merge(graphdef, state), *args, *static)
